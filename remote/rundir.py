"""The run directory, the contract between the engine and every viewer.

runs/<recipe>-<stamp>/ holds journal.sqlite, logs/, results.csv, results.json, recipe.toml (the exact recipe that
ran), state/ (local hosts' task directories), engine.log and engine.pid when detached. It is private (0700): logs
and environments may hold secrets. One engine at a time: an flock on engine.lock, released by the kernel even when
the engine is SIGKILLed.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from remote.journal import JOURNAL_NAME


class RunDirError(Exception):
    """The run directory cannot be used as asked; one line saying what to do."""


@dataclass
class RunDir:
    """Paths inside a run directory."""

    path: Path

    @property
    def journal(self) -> Path:
        return self.path / JOURNAL_NAME

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def recipe_copy(self) -> Path:
        return self.path / "recipe.toml"

    @property
    def engine_log(self) -> Path:
        return self.path / "engine.log"

    @property
    def results_csv(self) -> Path:
        return self.path / "results.csv"

    @property
    def results_json(self) -> Path:
        return self.path / "results.json"

    def state_root(self, host: str) -> Path:
        return self.path / "state" / host

    def log_path(self, log_name: str) -> Path:
        return self.logs / f"{log_name}.log"


def default_run_dir(recipe_name: str, base: Path = Path("runs")) -> Path:
    """runs/<recipe>-<YYYYmmdd-HHMMSS>, with a suffix if two runs start in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = base / f"{recipe_name}-{stamp}"
    n = 2
    while candidate.exists():
        candidate = base / f"{recipe_name}-{stamp}-{n}"
        n += 1
    return candidate


def prepare(path: Path, *, resume: bool) -> RunDir:
    """Create (or, with resume, reopen) a run directory; refuses to mix two runs in one folder.

    The path is made absolute: tasks run in their own working directories, and the wrapper writes into the run
    directory from there.
    """
    path = path.absolute()
    rd = RunDir(path)
    has_journal = rd.journal.exists()
    if resume and not has_journal:
        raise RunDirError(f"{path}: no run to resume here (no {JOURNAL_NAME}); expected a run directory of an "
                          "earlier run, or drop --resume to start a new one")
    if not resume and has_journal:
        raise RunDirError(f"{path}: already holds a run; pass --resume to continue it, or choose another --run-dir")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path}: exists and is not a directory; expected a directory for the run")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.chmod(0o700)
        rd.logs.mkdir(exist_ok=True, mode=0o700)
    except OSError as exc:
        raise RunDirError(f"{path}: cannot create the run directory: {exc.strerror}; "
                          "expected a writable location (see --run-dir)") from None
    return rd


def write_private(path: Path, content: str | bytes) -> None:
    """Write a file atomically with mode 0600 (recipes, fetched results: they may hold anything)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    data = content.encode() if isinstance(content, str) else content
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class EngineLock:
    """Exclusive lock on a run directory for the engine's lifetime."""

    def __init__(self, rd: RunDir) -> None:
        self._path = rd.path / "engine.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_pid(self._path)
            who = f" (engine pid {holder})" if holder else ""
            raise RunDirError(f"{self._path.parent}: another engine is running on this run{who}; "
                              "wait for it, or open it with `benchfleet attach`") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
