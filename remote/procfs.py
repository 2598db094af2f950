"""Liveness from /proc, because PID 1 may not reap: `kill -0` calls a zombie alive, /proc/PID/stat says `Z`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat the engine needs."""

    state: str
    pgrp: int
    start: int


def read_stat(pid: int, proc: Path = Path("/proc")) -> ProcStat | None:
    """Parsed /proc/PID/stat, or None when the process does not exist."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses; everything after the last ')' is space separated.
    rest = text[text.rfind(")") + 2 :].split()
    return ProcStat(state=rest[0], pgrp=int(rest[2]), start=int(rest[19]))


def is_alive(pid: int, start: int | None = None) -> bool:
    """True when `pid` runs and is not a zombie (and, if `start` is given, is the same process as then)."""
    st = read_stat(pid)
    if st is None or st.state in ("Z", "X"):
        return False
    return start is None or start in (0, st.start)


def group_members(pgrp: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members: list[int] = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = read_stat(int(entry.name))
            if st is not None and st.pgrp == pgrp and st.state not in ("Z", "X"):
                members.append(int(entry.name))
    return members
