"""The local transport: tasks on this machine, under the same wrapper the SSH transport uses on remote hosts.

State lives in the run directory (`state/<host>/<attempt>/`), so a resumed engine finds it where it left it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from remote import procfs
from remote.aio import within
from remote.transport.base import CommandResult, Handle, HostError, LaunchSpec, ProcState, Transport
from remote.wrapper import (
    ENV_FILE,
    OUT_FILE,
    PID_FILE,
    RC_FILE,
    WRAPPER_NAME,
    WRAPPER_SCRIPT,
    env_file_text,
    parse_rc,
)

PID_WAIT_SECONDS = 10.0


class LocalTransport(Transport):
    """Subprocesses on this machine, detached with setsid so they outlive the engine."""

    def __init__(self, host: str, state_root: Path, workdir: str, env: dict[str, str] | None = None) -> None:
        self.host = host
        self._state_root = state_root
        self._workdir = workdir
        self._env = env or {}
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self.on_exit: Callable[[], None] | None = None
        """Called as soon as a watched task's wrapper exits (pidfd), so the engine polls at once, not at its next
        tick: short tasks are noticed in microseconds."""

    def default_workdir(self) -> str:
        return self._workdir

    async def open(self, run_id: str) -> None:
        self._state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        wrapper = self._state_root / WRAPPER_NAME
        if not wrapper.exists():
            tmp = wrapper.with_suffix(".tmp")
            tmp.write_text(WRAPPER_SCRIPT)
            tmp.chmod(0o700)
            tmp.replace(wrapper)

    async def launch(self, spec: LaunchSpec) -> Handle:
        task_dir = self._state_root / spec.name
        task_dir.mkdir(mode=0o700)
        fd = os.open(task_dir / ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(env_file_text({**self._env, **spec.env}))
        try:
            # Popen, not asyncio's subprocess: no child-watcher thread per task; poll() reaps finished wrappers.
            proc = subprocess.Popen(
                ["sh", str(self._state_root / WRAPPER_NAME), str(task_dir), spec.workdir, *spec.argv],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise HostError(f"host {self.host}: cannot start sh: {exc}") from None
        self._children[proc.pid] = proc
        start = 0
        st = procfs.read_stat(proc.pid)
        if st is not None:
            start = st.start
        await self._wait_pid_file(task_dir, proc)
        self._watch_exit(proc.pid)
        return Handle(task_dir=str(task_dir), pid=proc.pid, pid_start=start)

    def _watch_exit(self, pid: int) -> None:
        """Ask the kernel to tell the event loop when `pid` exits (Linux pidfd); without it, polling still works."""
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            return
        loop = asyncio.get_running_loop()

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            if self.on_exit is not None:
                self.on_exit()

        loop.add_reader(fd, exited)

    async def _wait_pid_file(self, task_dir: Path, proc: subprocess.Popen[bytes]) -> None:
        deadline = asyncio.get_running_loop().time() + PID_WAIT_SECONDS
        while not (task_dir / PID_FILE).exists():
            if proc.poll() is not None and not (task_dir / PID_FILE).exists():
                raise HostError(f"host {self.host}: the task wrapper exited before starting (rc {proc.returncode})")
            if asyncio.get_running_loop().time() > deadline:
                raise HostError(f"host {self.host}: the task wrapper did not start within {PID_WAIT_SECONDS:.0f}s")
            await asyncio.sleep(0.005)

    async def find(self, name: str) -> Handle | None:
        task_dir = self._state_root / name
        try:
            pid = int((task_dir / PID_FILE).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        st = procfs.read_stat(pid)
        if st is not None:
            self._watch_exit(pid)  # an adopted task: its exit wakes the engine just the same
        return Handle(task_dir=str(task_dir), pid=pid, pid_start=st.start if st else 0)

    async def poll(self, handles: Sequence[Handle]) -> list[ProcState]:
        self._reap()
        return [self._poll_one(h) for h in handles]

    def _reap(self) -> None:
        """Collect exit statuses of finished wrappers so they never linger as zombies of the engine."""
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]

    def _poll_one(self, handle: Handle) -> ProcState:
        task_dir = Path(handle.task_dir)
        rc = _read_rc(task_dir)
        if rc is None and not procfs.is_alive(handle.pid, handle.pid_start):
            rc = _read_rc(task_dir)  # it may have written its rc between the two looks
            if rc is None:
                return ProcState(status="lost", rc=None, out_size=_size(task_dir / OUT_FILE))
        size = _size(task_dir / OUT_FILE)
        if rc is None:
            return ProcState(status="running", rc=None, out_size=size)
        return ProcState(status="exited", rc=rc, out_size=size)

    async def read_output(self, handle: Handle, offset: int, limit: int) -> bytes:
        try:
            with open(Path(handle.task_dir) / OUT_FILE, "rb") as f:
                f.seek(offset)
                return f.read(limit)
        except FileNotFoundError:
            return b""

    async def kill(self, handle: Handle, grace: float) -> None:
        pgrp = handle.pid
        if not procfs.is_alive(pgrp, handle.pid_start) and not procfs.group_members(pgrp):
            return
        _killpg(pgrp, signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + grace
        while procfs.group_members(pgrp) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if procfs.group_members(pgrp):
            _killpg(pgrp, signal.SIGKILL)

    async def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={**os.environ, **self._env}, cwd=self._workdir,
            )
        except FileNotFoundError:
            return CommandResult(rc=127, stdout="", stderr=f"{argv[0]}: not found")
        except OSError as exc:
            return CommandResult(rc=126, stdout="", stderr=str(exc))
        try:
            out, err = await within(timeout, proc.communicate())
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return CommandResult(rc=124, stdout="", stderr=f"timed out after {timeout:.0f}s")
        return CommandResult(rc=proc.returncode or 0, stdout=out.decode(errors="replace"),
                             stderr=err.decode(errors="replace"))

    async def read_file(self, path: str, workdir: str, limit: int) -> bytes | None:
        full = Path(workdir) / path
        try:
            with open(full, "rb") as f:
                return f.read(limit)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    async def put_file(self, name: str, text: str) -> str:
        path = self._state_root / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o700)
        tmp.replace(path)
        return str(path)

    async def check(self, workdir: str, programs: Sequence[str]) -> list[str]:
        missing: list[str] = []
        if not Path(workdir).is_dir():
            missing.append(f"working directory {workdir} does not exist")
            return missing
        for program in programs:
            if "/" in program:
                path = Path(workdir) / program
                if not (path.is_file() and os.access(path, os.X_OK)):
                    missing.append(f"program {program} is not an executable file (from {workdir})")
            elif shutil.which(program, path=self._search_path()) is None:
                missing.append(f"program {program} is not on PATH")
        return missing

    def _search_path(self) -> str:
        return self._env.get("PATH", os.environ.get("PATH", os.defpath))

    async def close(self) -> None:
        self._reap()


def _read_rc(task_dir: Path) -> int | None:
    try:
        return parse_rc((task_dir / RC_FILE).read_text())
    except FileNotFoundError:
        return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _killpg(pgrp: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgrp, sig)


def engine_python() -> str:
    """The interpreter running the engine: the right `{python}` for local tasks (it has benchfleet's extras)."""
    return sys.executable
