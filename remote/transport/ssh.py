"""The SSH transport: tasks on remote hosts over asyncssh, detached under the same wrapper as local ones.

One connection per host. All task I/O (launch, poll, output reads, result files, kills) goes through one long-lived
control shell on that connection: a `sh` reading scripts from its stdin and answering each with a marker line. That
costs one SSH channel however many GPUs the host has (far below sshd's MaxSessions of 10) and avoids starting a
login shell per poll. Short foreground commands (nvidia-smi) use their own channels, bounded by a semaphore; a refused
channel is back-pressure and is retried, never a task failure.

A dropped or black-holed link is noticed by asyncssh keepalives within keepalive_interval x (keepalive_count_max + 1)
seconds (15 s by default) or by an operation timeout, and surfaces as ConnectionLost; the next operation reconnects
with exponential backoff. Tasks never depend on the connection: they run under setsid with their output in files,
and the engine resumes each tail from the byte offset it committed to the journal.

Host keys are always verified: against the user's known_hosts (or the files named by UserKnownHostsFile) plus
benchfleet's own file, which `benchfleet trust HOST` appends to. Nothing here can turn verification off.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncssh

from remote.aio import within
from remote.transport.base import CommandResult, ConnectionLost, Handle, HostError, LaunchSpec, ProcState, Transport
from remote.wrapper import WRAPPER_NAME, WRAPPER_SCRIPT, env_file_text, parse_rc

T = TypeVar("T")

KEEPALIVE_INTERVAL = 5.0
KEEPALIVE_COUNT_MAX = 2
CONNECT_TIMEOUT = 15.0
OP_TIMEOUT = 60.0
MAX_CHANNELS = 8
"""Concurrent exec channels per connection: below OpenSSH's default MaxSessions (10), leaving room for the control
shell and a user's own session multiplexing."""
BACKOFF_MAX = 30.0


def benchfleet_home() -> Path:
    """benchfleet's own per-user folder (known_hosts lives here); $BENCHFLEET_HOME overrides it."""
    env = os.environ.get("BENCHFLEET_HOME")
    return Path(env) if env else Path.home() / ".config" / "benchfleet"


def own_known_hosts() -> Path:
    return benchfleet_home() / "known_hosts"


@dataclass(frozen=True)
class Target:
    """Where to connect, as the recipe says it: an ssh_config alias, or user@host:port."""

    host: str
    port: int | None
    user: str | None


def parse_target(text: str) -> Target:
    """`alias`, `host`, `user@host`, `user@host:port`, `user@[v6addr]:port`."""
    user: str | None = None
    rest = text.strip()
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
        if not user:
            raise ValueError(f"empty user name in {text!r}; expected user@host[:port]")
    port: int | None = None
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {text!r}; expected user@[address]:port")
        host, tail = rest[1:end], rest[end + 1 :]
        if tail:
            if not tail.startswith(":") or not tail[1:].isdigit():
                raise ValueError(f"bad port in {text!r}; expected user@[address]:port")
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
        if not port_text.isdigit():
            raise ValueError(f"bad port in {text!r}; expected user@host:port with a number")
        port = int(port_text)
    else:
        host = rest
    if not host:
        raise ValueError(f"no host in {text!r}; expected an ssh_config alias or user@host[:port]")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port {port} out of range in {text!r}")
    return Target(host=host, port=port, user=user)


def config_files(extra: str | None) -> list[str]:
    """ssh_config files to read: the recipe's extra one, $BENCHFLEET_SSH_CONFIG, then ~/.ssh/config."""
    files: list[str] = []
    if extra:
        files.append(os.path.expanduser(extra))
    env = os.environ.get("BENCHFLEET_SSH_CONFIG")
    if env:
        files.extend(p for p in env.split(os.pathsep) if p)
    user = Path.home() / ".ssh" / "config"
    if user.is_file():
        files.append(str(user))
    return files


def known_hosts_files(options: asyncssh.SSHClientConnectionOptions) -> list[str]:
    """The user's known_hosts (as ssh_config names them) plus benchfleet's own file; never empty, never None."""
    configured = options.known_hosts
    files: list[str]
    if isinstance(configured, list | tuple) and configured and all(isinstance(f, str) for f in configured):
        files = [os.path.expanduser(str(f)) for f in configured]
    else:
        files = [str(Path.home() / ".ssh" / "known_hosts")]
    files.append(str(own_known_hosts()))
    return [f for f in files if os.path.isfile(f)]


def client_options(host_name: str, target: Target, ssh_config: str | None, *,
                   keepalive_interval: float = KEEPALIVE_INTERVAL, keepalive_count_max: int = KEEPALIVE_COUNT_MAX,
                   connect_timeout: float = CONNECT_TIMEOUT) -> asyncssh.SSHClientConnectionOptions:
    """Connection options with verification pinned on; the one place where a connection's security is decided."""
    base = asyncssh.SSHClientConnectionOptions(
        host=target.host, port=target.port if target.port is not None else (),
        username=target.user if target.user is not None else (), config=config_files(ssh_config),
    )
    known = known_hosts_files(base)
    # An empty list means "no key is trusted" (every host refused), never "verification off" (which is None).
    return asyncssh.SSHClientConnectionOptions(
        options=base, known_hosts=known if known else b"",
        keepalive_interval=keepalive_interval, keepalive_count_max=keepalive_count_max,
        connect_timeout=connect_timeout,
    )


def describe_error(host: str, target: str, exc: BaseException) -> str:
    """One line for a connection failure, saying what to do."""
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return (f"host {host}: the SSH host key of {target} is unknown or has changed ({exc.reason}); "
                f"check it, then run `benchfleet trust {target}` to record it")
    if isinstance(exc, asyncssh.PermissionDenied):
        return (f"host {host}: SSH authentication to {target} failed; check User/IdentityFile in ssh_config "
                "or load your key into ssh-agent")
    if isinstance(exc, asyncssh.ConnectionLost | asyncssh.DisconnectError):
        return f"host {host}: SSH connection to {target} lost ({exc}); reconnecting"
    if isinstance(exc, TimeoutError):
        return f"host {host}: no answer from {target} in time; check the address and that sshd runs there"
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        return f"host {host}: cannot reach {target}: {reason}; check the address, port and network"
    return f"host {host}: SSH to {target} failed: {exc}"


# Helpers defined once in the control shell. Liveness reads /proc/PID/stat (a zombie is dead; a recycled pid is
# caught by the start time); `read` is a builtin, so polling costs almost no forks.
_PRELUDE = r"""
bf_start() { read -r s < "/proc/$1/stat" 2>/dev/null || { echo 0; return; }; s=${s##*) }; set -- $s; echo "${20}"; }
bf_alive() { want=$2; read -r s < "/proc/$1/stat" 2>/dev/null || return 1; s=${s##*) }; set -- $s
  [ "$1" = Z ] && return 1; [ "$1" = X ] && return 1; [ "$want" = 0 ] || [ "${20}" = "$want" ]; }
bf_size() { if [ -f "$1" ]; then wc -c < "$1" | tr -d ' '; else echo 0; fi; }
bf_poll() { while [ $# -ge 3 ]; do d=$1; p=$2; st=$3; shift 3; rc=-
  [ -f "$d/rc" ] && read -r rc < "$d/rc"
  if [ "$rc" = - ]; then if bf_alive "$p" "$st"; then a=1; else a=0; [ -f "$d/rc" ] && read -r rc < "$d/rc"; fi
  else a=0; fi
  echo "$rc $a $(bf_size "$d/out")"; done; }
bf_members() { pg=$1; n=0; for f in /proc/[0-9]*/stat; do read -r s < "$f" 2>/dev/null || continue
  s=${s##*) }; set -- $s; [ "$3" = "$pg" ] && [ "$1" != Z ] && n=$((n+1)); done; echo $n; }
bf_read() { f=$1; off=$2; lim=$3; s=$(bf_size "$f"); n=$((s - off)); [ $n -gt $lim ] && n=$lim; [ $n -lt 0 ] && n=0
  echo $n; [ $n -gt 0 ] && tail -c +$((off + 1)) "$f" | head -c $n; return 0; }
"""


class _ControlShell:
    """A `sh` on the host answering scripts one at a time, each followed by a marker line carrying its status."""

    def __init__(self, proc: asyncssh.SSHClientProcess[bytes]) -> None:
        self._proc = proc
        self._marker = f"__BF_{secrets.token_hex(8)}_".encode()
        self._lock = asyncio.Lock()

    async def define(self, prelude: str, *, timeout: float = OP_TIMEOUT) -> bytes:
        """Define shell functions in the control shell itself (not in a subshell); returns what it printed."""
        async with self._lock:
            self._proc.stdin.write(f"{prelude}\nprintf '\\n%s0\\n' '{self._marker.decode()}'\n".encode())
            out = await within(timeout, self._proc.stdout.readuntil(self._marker))
            await within(timeout, self._proc.stdout.readline())
            return out[: -len(self._marker) - 1]

    async def run(self, script: str, *, timeout: float = OP_TIMEOUT) -> tuple[int, bytes]:
        """Run `script` in a subshell; returns its status and its stdout (stderr of the scripts is discarded)."""
        async with self._lock:
            payload = f"( {script}\n) 2>/dev/null\nprintf '\\n%s%d\\n' '{self._marker.decode()}' \"$?\"\n"
            self._proc.stdin.write(payload.encode())
            out = await within(timeout, self._proc.stdout.readuntil(self._marker))
            status = await within(timeout, self._proc.stdout.readline())
            body = out[: -len(self._marker) - 1]  # the marker line starts with our own newline
            return int(status.strip() or b"1"), body

    async def read_sized(self, script: str, *, timeout: float = OP_TIMEOUT) -> bytes | None:
        """Run a script that prints a byte count line then exactly that many bytes (-1: nothing there)."""
        async with self._lock:
            payload = f"( {script}\n) 2>/dev/null\nprintf '%s%d\\n' '{self._marker.decode()}' \"$?\"\n"
            self._proc.stdin.write(payload.encode())
            header = await within(timeout, self._proc.stdout.readline())
            n = int(header.strip() or b"-1")
            data = await within(timeout, self._proc.stdout.readexactly(n)) if n > 0 else b""
            await within(timeout, self._proc.stdout.readuntil(self._marker))
            await within(timeout, self._proc.stdout.readline())
            return None if n < 0 else data

    def close(self) -> None:
        self._proc.close()


class SSHTransport(Transport):
    """One remote host."""

    def __init__(self, host: str, target: str, *, ssh_config: str | None = None, workdir: str | None = None,
                 env: dict[str, str] | None = None, keepalive_interval: float = KEEPALIVE_INTERVAL,
                 keepalive_count_max: int = KEEPALIVE_COUNT_MAX, connect_timeout: float = CONNECT_TIMEOUT,
                 op_timeout: float = OP_TIMEOUT) -> None:
        self.host = host
        self.target_text = target
        try:
            self.target = parse_target(target)
        except ValueError as exc:
            raise HostError(f"host {host}: ssh = {target!r}: {exc}") from None
        self._ssh_config = ssh_config
        self._workdir = workdir
        self._env = env or {}
        self._keepalive = (keepalive_interval, keepalive_count_max)
        self._connect_timeout = connect_timeout
        self._op_timeout = op_timeout
        self._conn: asyncssh.SSHClientConnection | None = None
        self._ctl: _ControlShell | None = None
        self._connecting = asyncio.Lock()
        self._channels = asyncio.Semaphore(MAX_CHANNELS)
        self._failures = 0
        self._next_try = 0.0
        self._home = ""
        self._root = ""
        self._run_id = ""
        self.connected_since: float | None = None
        self.reconnects = 0
        self.address = self.target.host
        """How other hosts reach this one: the HostName ssh_config resolves the alias to (pipeline URLs)."""

    @property
    def keepalive_bound(self) -> float:
        """Seconds within which a silent dead link is detected."""
        interval, count = self._keepalive
        return interval * (count + 1)

    # -- connection ---------------------------------------------------------------------------------------------

    async def _control(self) -> _ControlShell:
        if self._ctl is not None and self._conn is not None:
            return self._ctl
        async with self._connecting:
            if self._ctl is not None and self._conn is not None:
                return self._ctl
            wait = self._next_try - time.monotonic()
            if wait > 0:
                raise ConnectionLost(f"host {self.host}: unreachable; next reconnect attempt in {wait:.0f}s")
            try:
                await self._connect()
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                self._failures += 1
                self._next_try = time.monotonic() + min(BACKOFF_MAX, 0.5 * 2 ** (self._failures - 1))
                message = describe_error(self.host, self.target_text, exc)
                if isinstance(exc, asyncssh.HostKeyNotVerifiable | asyncssh.PermissionDenied):
                    raise HostError(message) from None
                raise ConnectionLost(message) from None
            self._failures = 0
            assert self._ctl is not None
            return self._ctl

    async def _connect(self) -> None:
        interval, count = self._keepalive
        options = client_options(self.host, self.target, self._ssh_config, keepalive_interval=interval,
                                 keepalive_count_max=count, connect_timeout=self._connect_timeout)
        conn = await within(self._connect_timeout + 5, asyncssh.connect(options=options))
        self.address = str(options.host)
        try:
            proc = await conn.create_process("exec sh", encoding=None, stderr=asyncssh.DEVNULL)
            ctl = _ControlShell(proc)
            home = await ctl.define(_PRELUDE + '\necho "$HOME"', timeout=self._op_timeout)
        except BaseException:
            conn.close()
            raise
        if self._conn is not None:
            self.reconnects += 1
        self._conn, self._ctl = conn, ctl
        self._home = home.decode().strip() or "."
        self.connected_since = time.time()

    def _drop(self) -> None:
        """Forget a broken connection; the next operation reconnects."""
        if self._ctl is not None:
            self._ctl.close()
        if self._conn is not None:
            self._conn.close()
        self._ctl = None
        self._conn = None
        self.connected_since = None

    async def _sh(self, script: str) -> tuple[int, bytes]:
        ctl = await self._control()
        return await self._guarded(ctl.run(script, timeout=self._op_timeout))

    async def _sh_sized(self, script: str) -> bytes | None:
        ctl = await self._control()
        return await self._guarded(ctl.read_sized(script, timeout=self._op_timeout))

    async def _guarded(self, operation: Awaitable[T]) -> T:
        """Await a control-shell operation; any failure of the link drops the connection and is ConnectionLost."""
        try:
            return await operation
        except (OSError, asyncssh.Error, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            self._drop()
            raise ConnectionLost(describe_error(self.host, self.target_text, exc)) from None

    # -- Transport ----------------------------------------------------------------------------------------------

    def default_workdir(self) -> str:
        return self._workdir or self._home or "."

    async def open(self, run_id: str) -> None:
        await self._control()
        self._run_id = run_id
        self._root = f"{self._home}/.cache/benchfleet/runs/{run_id}/{self.host}"
        wrapper = f"{self._root}/{WRAPPER_NAME}"
        nonce = secrets.token_hex(8)
        script = (f"(umask 077; mkdir -p {shlex.quote(self._root)} && cat > {shlex.quote(wrapper)}.tmp <<'BF{nonce}'\n"
                  f"{WRAPPER_SCRIPT}BF{nonce}\n) && mv -f {shlex.quote(wrapper)}.tmp {shlex.quote(wrapper)}")
        status, _ = await self._sh(script)
        if status != 0:
            raise HostError(f"host {self.host}: cannot create {self._root} (status {status}); check disk space "
                            "and permissions in the home directory")

    async def launch(self, spec: LaunchSpec) -> Handle:
        task_dir = f"{self._root}/{spec.name}"
        nonce = secrets.token_hex(8)
        env_text = env_file_text({**self._env, **spec.env})
        start = shlex.join(["setsid", "-f", "sh", f"{self._root}/{WRAPPER_NAME}", task_dir, spec.workdir,
                            *spec.argv])
        qdir = shlex.quote(task_dir)
        # The environment (secrets included) travels in a here-document on the control shell's stdin: it is never
        # on any process's command line. A launch is idempotent: if the pid file exists, it already ran.
        script = (
            f"if [ ! -f {qdir}/pid ]; then\n"
            f"(umask 077; mkdir -p {qdir} && cat > {qdir}/env <<'BF{nonce}'\n{env_text}BF{nonce}\n) || exit 3\n"
            f"cd / && {start} </dev/null >/dev/null 2>&1 || exit 4\n"
            f"fi\n"
            f"i=0; while [ ! -s {qdir}/pid ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done\n"
            f"[ -s {qdir}/pid ] || exit 5\n"
            f"read -r p < {qdir}/pid; echo \"$p $(bf_start $p)\""
        )
        status, out = await self._sh(script)
        if status != 0:
            what = {3: "cannot write the task directory", 4: "setsid is missing (install util-linux)",
                    5: "the task wrapper did not start within 10s"}.get(status, f"status {status}")
            raise HostError(f"host {self.host}: launch failed: {what}")
        pid_text, start_text = out.decode().split()
        return Handle(task_dir=task_dir, pid=int(pid_text), pid_start=int(start_text))

    async def find(self, name: str) -> Handle | None:
        qdir = shlex.quote(f"{self._root}/{name}")
        status, out = await self._sh(f"[ -s {qdir}/pid ] || exit 1; read -r p < {qdir}/pid; echo \"$p $(bf_start $p)\"")
        if status != 0:
            return None
        pid_text, start_text = out.decode().split()
        return Handle(task_dir=f"{self._root}/{name}", pid=int(pid_text), pid_start=int(start_text))

    async def poll(self, handles: Sequence[Handle]) -> list[ProcState]:
        if not handles:
            return []
        args = [x for h in handles for x in (h.task_dir, str(h.pid), str(h.pid_start))]
        status, out = await self._sh("bf_poll " + shlex.join(args))
        lines = out.decode().split("\n")
        if status != 0 or len(lines) < len(handles):
            raise ConnectionLost(f"host {self.host}: unreadable poll answer; retrying")
        states: list[ProcState] = []
        for line in lines[: len(handles)]:
            rc_text, alive, size = line.split()
            rc = parse_rc(rc_text) if rc_text != "-" else None
            if rc is not None:
                states.append(ProcState(status="exited", rc=rc, out_size=int(size)))
            elif alive == "1":
                states.append(ProcState(status="running", rc=None, out_size=int(size)))
            else:
                states.append(ProcState(status="lost", rc=None, out_size=int(size)))
        return states

    async def read_output(self, handle: Handle, offset: int, limit: int) -> bytes:
        data = await self._sh_sized(f"bf_read {shlex.quote(handle.task_dir + '/out')} {int(offset)} {int(limit)}")
        return data or b""

    async def kill(self, handle: Handle, grace: float) -> None:
        pg = int(handle.pid)
        await self._sh(f"kill -TERM -{pg} 2>/dev/null; true")
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            _, out = await self._sh(f"bf_members {pg}")
            if out.strip() in (b"0", b""):
                return
            await asyncio.sleep(0.1)
        await self._sh(f"kill -KILL -{pg} 2>/dev/null; true")

    async def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        await self._control()
        conn = self._conn
        assert conn is not None
        async with self._channels:
            for attempt in range(6):
                try:
                    result = await within(timeout, conn.run(shlex.join(argv), check=False))
                    break
                except asyncssh.ChannelOpenError:
                    # sshd's MaxSessions reached: back-pressure, wait and retry.
                    await asyncio.sleep(0.2 * 2 ** attempt)
                except TimeoutError:
                    return CommandResult(rc=124, stdout="", stderr=f"timed out after {timeout:.0f}s")
                except (OSError, asyncssh.Error) as exc:
                    self._drop()
                    raise ConnectionLost(describe_error(self.host, self.target_text, exc)) from None
            else:
                raise ConnectionLost(f"host {self.host}: sshd keeps refusing new channels (MaxSessions?)")
        return CommandResult(rc=result.exit_status if result.exit_status is not None else 255,
                             stdout=_text(result.stdout), stderr=_text(result.stderr))

    async def read_file(self, path: str, workdir: str, limit: int) -> bytes | None:
        full = path if path.startswith("/") else f"{workdir}/{path}"
        q = shlex.quote(full)
        return await self._sh_sized(f"if [ -f {q} ]; then bf_read {q} 0 {int(limit)}; else echo -1; fi")

    async def put_file(self, name: str, text: str) -> str:
        path = f"{self._root}/{name}"
        nonce = secrets.token_hex(8)
        if not text.endswith("\n"):
            text += "\n"
        status, _ = await self._sh(f"(umask 077; cat > {shlex.quote(path)}.tmp <<'BF{nonce}'\n{text}BF{nonce}\n) && "
                                   f"mv -f {shlex.quote(path)}.tmp {shlex.quote(path)}")
        if status != 0:
            raise HostError(f"host {self.host}: cannot write {path} (status {status}); check disk space")
        return path

    async def check(self, workdir: str, programs: Sequence[str]) -> list[str]:
        q = shlex.quote(workdir)
        lines = [f"cd {q} 2>/dev/null || {{ echo 'working directory {workdir} does not exist'; exit 0; }}"]
        for program in programs:
            p = shlex.quote(program)
            if "/" in program:
                lines.append(f"[ -x {p} ] || echo {shlex.quote(f'program {program} is not an executable file')}")
            else:
                missing = shlex.quote(f"program {program} is not on PATH")
                lines.append(f"command -v {p} >/dev/null 2>&1 || echo {missing}")
        _, out = await self._sh("(\n" + "\n".join(lines) + "\n)")
        return [line for line in out.decode().splitlines() if line.strip()]

    async def close(self) -> None:
        conn = self._conn
        self._drop()
        if conn is not None:
            await conn.wait_closed()


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value or "")
