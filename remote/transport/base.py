"""What the engine needs from a host: launch detached tasks, observe them, read their output, stop them.

Every method is batched or cheap enough to call often; the SSH transport maps each to one remote command, the local
transport to file reads. Transports never decide anything: success, retries and extraction belong to the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal


class HostError(Exception):
    """A host cannot do what was asked (unreachable, missing program, no permission); one line naming the host."""


class ConnectionLost(HostError):
    """The link to a host dropped or stalled; transient: the transport reconnects with backoff, tasks keep running."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one attempt of a task."""

    name: str
    """Folder name of the attempt's task directory, unique in the run (`<task_id>.<attempt>`)."""
    argv: Sequence[str]
    env: Mapping[str, str]
    workdir: str


@dataclass(frozen=True)
class Handle:
    """Where a launched attempt lives on its host; enough to find it again after an engine restart."""

    task_dir: str
    pid: int
    pid_start: int
    """Process start time (field 22 of /proc/PID/stat) so a recycled pid is never mistaken for the task."""


@dataclass(frozen=True)
class ProcState:
    """What a poll saw: running, exited with an rc, or lost (the process is gone without writing an rc)."""

    status: Literal["running", "exited", "lost"]
    rc: int | None
    out_size: int


@dataclass(frozen=True)
class CommandResult:
    """A short foreground command's outcome (preflight, nvidia-smi)."""

    rc: int
    stdout: str
    stderr: str


class Transport(ABC):
    """One host."""

    host: str

    @abstractmethod
    async def open(self, run_id: str) -> None:
        """Connect if needed and prepare the run's state directory and the wrapper on the host."""

    @abstractmethod
    async def launch(self, spec: LaunchSpec) -> Handle:
        """Start an attempt detached under the wrapper; returns once its pid file exists."""

    @abstractmethod
    async def find(self, name: str) -> Handle | None:
        """The attempt launched as `name` if it got as far as writing its pid file (reattach after a crash)."""

    @abstractmethod
    async def poll(self, handles: Sequence[Handle]) -> list[ProcState]:
        """The state of each attempt, in order."""

    @abstractmethod
    async def read_output(self, handle: Handle, offset: int, limit: int) -> bytes:
        """Up to `limit` bytes of the attempt's output from byte `offset`."""

    @abstractmethod
    async def kill(self, handle: Handle, grace: float) -> None:
        """Stop the attempt's whole process group: TERM, then KILL after `grace` seconds."""

    @abstractmethod
    async def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        """Run a short command in the foreground (discovery, preflight)."""

    @abstractmethod
    async def read_file(self, path: str, workdir: str, limit: int) -> bytes | None:
        """A file a task wrote (relative paths from `workdir`), or None when it does not exist."""

    @abstractmethod
    async def put_file(self, name: str, text: str) -> str:
        """Install a helper file (a script benchfleet runs there) in the run's state directory; returns its path."""

    @abstractmethod
    async def check(self, workdir: str, programs: Sequence[str]) -> list[str]:
        """Preflight: what is missing on the host (the working directory, programs not on PATH), one item each."""

    @abstractmethod
    def default_workdir(self) -> str:
        """Working directory for commands that name none."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; never stops tasks."""
