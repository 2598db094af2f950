"""One launched (or adopted) attempt of a task as the engine watches it, and what its exit means.

Shared by the engine's core (launch, poll, finalize) and the stage kinds in remote/stages/ (services wait for an
attempt's readiness line and tear it down), so it lives in neither.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from dataclasses import dataclass, field
from typing import BinaryIO

from remote.extract import LineSplitter, TaskExtractor
from remote.plan import StagePlan, TaskPlan
from remote.slots import Slot
from remote.transport.base import Handle, ProcState, Transport

RESULT_FILE_LIMIT = 64 << 20
"""Largest result file (metrics `file`, fetch stages) read back from a host."""


@dataclass
class Attempt:
    """A launched (or adopted) attempt being watched."""

    task: TaskPlan
    stage: StagePlan
    slot: Slot
    number: int
    handle: Handle
    transport: Transport
    log: BinaryIO
    extractor: TaskExtractor
    offset: int = 0
    splitter: LineSplitter = field(default_factory=LineSplitter)
    started: float = field(default_factory=time.time)
    timed_out: bool = False
    interrupted: bool = False
    cancelled: bool = False
    aborted: str | None = None
    """Killed because its trial failed (a service died); recorded as a failure that is not retried."""
    progress: tuple[int, int] | None = None
    finished: asyncio.Future[ProcState] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Services: set when the readiness log line was seen."""
    ready_pattern: re.Pattern[str] | None = None
    capture_patterns: dict[str, re.Pattern[str]] = field(default_factory=dict)
    captured: dict[str, str] = field(default_factory=dict)
    stopping: bool = False
    """Services: being torn down on purpose, so its exit is not a failure."""


class TrialFailed(Exception):
    """A trial cannot go on (a service never became ready, or died); one line with the service, host, last lines."""


def exit_reason(rc: int | None) -> str:
    """An exit code as a person reads it: 127 is a missing program, 128+N a signal."""
    if rc is None:
        return "no exit code"
    if rc == 127:
        return "exit 127: program not found (check the command and PATH on the host)"
    if rc == 126:
        return "exit 126: working directory missing or program not executable"
    if rc > 128:
        try:
            name = signal.Signals(rc - 128).name
        except ValueError:
            name = f"signal {rc - 128}"
        return f"exit {rc}: killed by {name}"
    return f"exit {rc}"
