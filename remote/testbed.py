"""Local test hosts reached by SSH: one OpenSSH sshd per host, each in its own network namespace.

`benchfleet testbed up N` builds them so a recipe can be rehearsed (and the test suite run) before booking GPUs:
every host has its own address on a bridge, a fake `nvidia-smi` reporting G GPUs, and an entry in an ssh_config
file that both OpenSSH and asyncssh read. Where namespaces are not allowed, sshds listen on loopback ports instead.
Everything `up` creates is recorded in the folder's state.json first, so `down` can undo a half-finished `up`.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

STATE_FILE = "state.json"
STATE_VERSION = 1
MARKER_ENV = "BENCHFLEET_TESTBED"
"""Set in every sshd's and SSH session's environment, so `down` finds their processes (detached ones too)."""
SUPERNET = ipaddress.IPv4Network("198.18.0.0/15")
"""RFC 2544's benchmarking range: never routed on the Internet and unlikely to clash with a site's networks."""
FIRST_HOST_OCTET = 11
MAX_HOSTS = 200
MAX_GPUS = 64
INTERFACE = "eth0"
DEFAULT_SSHD = Path("/usr/sbin/sshd")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Mode = Literal["netns", "loopback"]


class TestbedError(Exception):
    """A testbed could not be built, read or removed; the message is one line saying what to do."""

    __test__ = False


@dataclass(frozen=True)
class TestbedHost:
    """One test host as a recipe sees it: an SSH alias with an address, a port and G fake GPUs."""

    __test__ = False

    name: str
    address: str
    port: int
    netns: str | None
    """The network namespace sshd runs in; None in loopback mode."""
    interface: str
    """The host's own interface inside its namespace (what `tc` shapes); "lo" in loopback mode."""
    gpus: int


@dataclass(frozen=True)
class Testbed:
    """A running testbed, as recorded in its folder's state.json."""

    __test__ = False

    folder: Path
    mode: Mode
    hosts: tuple[TestbedHost, ...]
    ssh_config: Path
    known_hosts: Path
    identity: Path
    user: str

    def recipe_hosts_toml(self) -> str:
        """The `[hosts.*]` tables for pasting into a recipe."""
        return "\n".join(
            f'[hosts.{host.name}]\nssh = "{host.name}"\nssh_config = "{self.ssh_config}"\ngpus = "auto"\n'
            for host in self.hosts
        )

    def instructions(self) -> str:
        """What `benchfleet testbed up` prints: the hosts, and how to point a recipe (or ssh) at them."""
        where = "own network namespace" if self.mode == "netns" else "loopback port"
        lines = [f"Testbed up in {self.folder}: {len(self.hosts)} hosts, each sshd on its {where}."]
        for host in self.hosts:
            netns = f"  netns {host.netns} ({host.interface})" if host.netns else ""
            lines.append(f"  {host.name:<6} {host.address}:{host.port}  {host.gpus} GPUs{netns}")
        lines += [
            "",
            "The recipe entries below name this testbed's ssh_config; for plain ssh, put this line at the top of",
            f"~/.ssh/config:  Include {self.ssh_config}",
            f"Try one: ssh -F {shlex.quote(str(self.ssh_config))} {self.hosts[0].name} nvidia-smi -L",
            "",
            "Hosts for a recipe:",
            self.recipe_hosts_toml().rstrip(),
            "",
            f"Remove it with: benchfleet testbed down --dir {shlex.quote(str(self.folder))}",
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------- running tools


def _run(argv: list[str], what: str, *, env: dict[str, str] | None = None) -> str:
    """Run a tool to completion; a failure becomes one TestbedError line with the tool's own complaint."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TestbedError(f"{what} failed: {exc}") from None
    if done.returncode != 0:
        complaint = " ".join((done.stderr or done.stdout).split()) or f"exit code {done.returncode}"
        raise TestbedError(f"{what} failed: {complaint} (ran: {shlex.join(argv)})")
    return done.stdout


def _ip(*args: str) -> str:
    return _run(["ip", *args], f"ip {' '.join(args[:3])}")


def _namespace_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def netns_available() -> bool:
    """Whether this machine lets us create network namespaces (root, `ip` present, not forbidden)."""
    if shutil.which("ip") is None:
        return False
    probe = f"bfprobe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except TestbedError:
        return False
    with contextlib.suppress(TestbedError):
        _ip("netns", "del", probe)
    return True


# ---------------------------------------------------------------- processes


def _proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/PID/stat, or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces, so split after the last ')'.
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie (Z) counts as gone because PID 1 here may never reap it."""
    return _proc_state(pid) not in (None, "Z", "X")


def _marked_pids(testbed_id: str) -> set[int]:
    """Processes whose environment carries this testbed's marker: sshds, sessions and what they launched."""
    needle = f"{MARKER_ENV}={testbed_id}".encode()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.add(int(entry.name))
    return found


def _pidfile_pid(pidfile: Path, config: Path) -> int | None:
    """The sshd pid from its pid file, if that process is still the sshd we started with this config."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if str(config).encode() in cmdline else None


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _terminate(pids: set[int], grace: float = 3.0) -> list[int]:
    """TERM, then KILL what is still alive after the grace period; returns the pids that were signalled."""
    signalled: list[int] = []
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        living = [pid for pid in sorted(pids) if _alive(pid)]
        if not living:
            break
        for pid in living:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                if pid not in signalled:
                    signalled.append(pid)
        deadline = time.monotonic() + wait
        while any(_alive(pid) for pid in living) and time.monotonic() < deadline:
            time.sleep(0.02)
    survivors = [pid for pid in pids if _alive(pid)]
    if survivors:
        raise TestbedError(f"processes {survivors} survived SIGKILL; check them with `ps -o pid,stat,cmd -p ...`")
    return signalled


# ---------------------------------------------------------------- state


def _state_path(folder: Path) -> Path:
    return folder / STATE_FILE


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    """Write state.json atomically, so a crash never leaves `down` a half-written record."""
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.chmod(0o600)
    tmp.replace(_state_path(folder))


def _read_state(folder: Path) -> dict[str, Any] | None:
    path = _state_path(folder)
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TestbedError(f"{path} is unreadable ({exc}); remove the namespaces `ip netns` lists by hand") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise TestbedError(f"{path} is not a benchfleet testbed state (version {STATE_VERSION}); remove it by hand")
    return state


def load_testbed(folder: Path) -> Testbed:
    """The testbed `up` built in this folder."""
    folder = folder.resolve()
    state = _read_state(folder)
    if state is None:
        raise TestbedError(f"no testbed in {folder} (no {STATE_FILE}); start one with `benchfleet testbed up N`")
    if not state.get("ready"):
        raise TestbedError(
            f"the testbed in {folder} did not come up completely; remove it with `benchfleet testbed down`"
        )
    hosts = tuple(
        TestbedHost(
            name=h["name"],
            address=h["address"],
            port=h["port"],
            netns=h["netns"] if state["mode"] == "netns" else None,
            interface=h["interface"],
            gpus=h["gpus"],
        )
        for h in state["hosts"]
    )
    return Testbed(
        folder=folder,
        mode=state["mode"],
        hosts=hosts,
        ssh_config=folder / "ssh_config",
        known_hosts=folder / "known_hosts",
        identity=folder / "id_ed25519",
        user=state["user"],
    )


# ---------------------------------------------------------------- addresses and ports


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    """Serialise subnet choice between testbeds coming up at once (e.g. parallel test sessions)."""
    path = Path(tempfile.gettempdir()) / "benchfleet-testbed.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of 198.18.0.0/15 that no address or route on this machine touches."""
    used: list[ipaddress.IPv4Network] = []
    for line in _ip("-4", "-o", "addr", "show").splitlines():
        fields = line.split()
        if "inet" in fields:
            used.append(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]).network)
    for line in _ip("-4", "route", "show", "table", "all").splitlines():
        # Routes start with their destination ("default" and local-table types are covered by addresses).
        with contextlib.suppress(ValueError, IndexError):
            used.append(ipaddress.IPv4Network(line.split()[0]))
    for subnet in SUPERNET.subnets(new_prefix=24):
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise TestbedError("every /24 of 198.18.0.0/15 is in use; take a testbed down with `benchfleet testbed down`")


def _free_loopback_ports(count: int) -> list[int]:
    """Ports the kernel hands out now; held open together so no two hosts get the same one."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# ---------------------------------------------------------------- files


def _quote_config(value: str) -> str:
    """Quote an sshd_config/ssh_config argument that holds spaces (both accept double quotes)."""
    return f'"{value}"' if any(c.isspace() for c in value) else value


def _keygen(path: Path, comment: str) -> str:
    """An ed25519 key pair at `path` (private 0600); returns the public key line."""
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], f"ssh-keygen {path}")
    path.chmod(0o600)
    return path.with_suffix(".pub").read_text().strip()


def install_fake_nvidia_smi(bin_dir: Path, gpus: int) -> None:
    """Copy the fake nvidia-smi with a shebang naming this interpreter, and the GPU count next to it."""
    bin_dir.mkdir(mode=0o755, exist_ok=True)
    source = (Path(__file__).parent / "fake_nvidia_smi.py").read_text()
    script = bin_dir / "nvidia-smi"
    # -I: no user site or PYTHON* variables from the session, so the script behaves the same on every host.
    script.write_text(f"#!{sys.executable} -I\n{source}")
    script.chmod(0o755)
    (bin_dir / "nvidia-smi.gpus").write_text(f"{gpus}\n")


def _sshd_config(folder: Path, host: dict[str, Any], testbed_id: str) -> str:
    """The sshd_config of one host: key-only root login, files in the folder, PATH with the fake nvidia-smi."""
    host_dir = folder / host["name"]
    # The engine's interpreter folder follows the fake: hosts run the same Python as the engine rehearsing on them.
    session_path = f"{host_dir / 'bin'}:{Path(sys.executable).parent}:{SYSTEM_PATH}"
    authorized = str(folder / "authorized_keys").replace("%", "%%")  # sshd expands %-tokens in this option
    options = [
        ("ListenAddress", host["address"]),
        ("Port", str(host["port"])),
        ("HostKey", str(host_dir / "ssh_host_ed25519_key")),
        ("PidFile", str(host_dir / "sshd.pid")),
        ("AuthorizedKeysFile", authorized),
        ("PubkeyAuthentication", "yes"),
        ("PasswordAuthentication", "no"),
        ("KbdInteractiveAuthentication", "no"),
        ("PermitRootLogin", "prohibit-password"),
        ("UsePAM", "no"),
        # The folder may live under /tmp (world-writable), which StrictModes would reject for authorized_keys.
        ("StrictModes", "no"),
        ("AllowAgentForwarding", "no"),
        ("X11Forwarding", "no"),
        ("PrintMotd", "no"),
        ("LogLevel", "INFO"),
        ("Subsystem", "sftp internal-sftp"),
    ]
    lines = [f"# benchfleet testbed {testbed_id}, host {host['name']}"]
    lines += [f"{key} {value if key == 'Subsystem' else _quote_config(value)}" for key, value in options]
    # SetEnv beats the default PATH sshd gives sessions, for `ssh host cmd` as much as for login shells.
    setenv = [f"PATH={session_path}", f"{MARKER_ENV}={testbed_id}", f"BENCHFLEET_TESTBED_HOST={host['name']}"]
    lines.append("SetEnv " + " ".join(_quote_config(item) for item in setenv))
    return "\n".join(lines) + "\n"


def _ssh_config(folder: Path, hosts: list[dict[str, Any]], user: str) -> str:
    lines = [f"# benchfleet testbed in {folder}: `Include` this file from ~/.ssh/config, or pass it with -F."]
    for host in hosts:
        lines += [
            f"Host {host['name']}",
            f"  HostName {host['address']}",
            f"  Port {host['port']}",
            f"  User {user}",
            f"  IdentityFile {_quote_config(str(folder / 'id_ed25519'))}",
            f"  UserKnownHostsFile {_quote_config(str(folder / 'known_hosts'))}",
            "  StrictHostKeyChecking yes",
            "  IdentitiesOnly yes",
            "  ForwardAgent no",
            "",
        ]
    return "\n".join(lines)


def _known_hosts_line(host: dict[str, Any], public_key: str) -> str:
    """The host's key under its address and its alias, `[name]:port` style when the port is not 22."""
    names = [host["address"], host["name"]]
    if host["port"] != 22:
        names = [f"[{name}]:{host['port']}" for name in names]
    key_type, key_data = public_key.split()[:2]
    return f"{','.join(names)} {key_type} {key_data}"


# ---------------------------------------------------------------- sshd


def _start_sshd(sshd: Path, folder: Path, host: dict[str, Any], mode: Mode, testbed_id: str) -> None:
    host_dir = folder / host["name"]
    config = host_dir / "sshd_config"
    config.write_text(_sshd_config(folder, host, testbed_id))
    config.chmod(0o600)
    (host_dir / "sshd.pid").unlink(missing_ok=True)
    argv = [str(sshd), "-f", str(config), "-E", str(host_dir / "sshd.log")]
    if mode == "netns":
        argv = ["ip", "netns", "exec", host["netns"], *argv]
    env = {**os.environ, MARKER_ENV: testbed_id}
    _run(argv, f"starting sshd for {host['name']}", env=env)


def _last_log_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log written"
    return lines[-1] if lines else "log is empty"


def _accepts(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5) as sock:
            sock.settimeout(0.5)
            return sock.recv(4) == b"SSH-"
    except OSError:
        return False


def _wait_ready(folder: Path, hosts: list[dict[str, Any]], timeout: float) -> list[str]:
    """Wait until every sshd answers on its TCP port; returns names of hosts whose sshd died on a busy port."""
    deadline = time.monotonic() + timeout
    waiting = {host["name"]: host for host in hosts}
    busy: list[str] = []
    while waiting:
        for name, host in list(waiting.items()):
            host_dir = folder / name
            pid = _pidfile_pid(host_dir / "sshd.pid", host_dir / "sshd_config")
            if pid is not None and _accepts(host["address"], host["port"]):
                del waiting[name]
                continue
            log = host_dir / "sshd.log"
            last = _last_log_line(log)
            if "Cannot bind any address" in last or "fatal" in last.lower():
                text = log.read_text(errors="replace")
                if "Address already in use" in text and host["netns"] is None:
                    busy.append(name)
                    del waiting[name]
                    continue
                raise TestbedError(f"sshd for {name} exited: {last} (log: {log})")
        if not waiting:
            break
        if time.monotonic() > deadline:
            names = ", ".join(sorted(waiting))
            raise TestbedError(
                f"sshd for {names} did not accept connections within {timeout:g} s; see {folder}/<host>/sshd.log"
            )
        time.sleep(0.02)
    return busy


# ---------------------------------------------------------------- up and down


def _check_tools(sshd: Path) -> None:
    if not (sshd.is_file() and os.access(sshd, os.X_OK)):
        raise TestbedError(f"OpenSSH server not found at {sshd}; install it (apt-get install openssh-server)")
    if shutil.which("ssh-keygen") is None:
        raise TestbedError("ssh-keygen not found; install OpenSSH (apt-get install openssh-client)")
    if os.geteuid() == 0:
        # sshd refuses to start without its privilege separation directory, which a fresh container lacks.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)


def _prepare_folder(folder: Path) -> None:
    if _state_path(folder).exists():
        raise TestbedError(f"a testbed is already in {folder}; remove it with `benchfleet testbed down` first")
    if folder.exists() and any(folder.iterdir()):
        raise TestbedError(f"{folder} is not empty; give `--dir` a new or empty folder (down deletes it)")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)


def _build_network(state: dict[str, Any], forced: bool) -> bool:
    """Create bridge, namespaces and veths; False when namespaces are refused and loopback may be used."""
    hosts: list[dict[str, Any]] = state["hosts"]
    try:
        _ip("netns", "add", hosts[0]["netns"])
    except TestbedError as exc:
        if forced:
            raise TestbedError(f"cannot create network namespaces ({exc}); run as root or use loopback mode") from None
        return False
    with _allocation_lock():
        subnet = _free_subnet()
        root_address = f"{subnet.network_address + 1}/24"
        state.update(subnet=str(subnet), root_address=root_address)
        for index, host in enumerate(hosts):
            host["address"] = str(subnet.network_address + FIRST_HOST_OCTET + index)
        bridge = state["bridge"]
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", root_address, "dev", bridge)
    _ip("link", "set", bridge, "up")
    for index, host in enumerate(hosts):
        netns, veth = host["netns"], host["veth"]
        if index > 0:
            _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", INTERFACE, "netns", netns)
        _ip("link", "set", veth, "master", bridge, "up")
        _ip("-n", netns, "addr", "add", f"{host['address']}/24", "dev", INTERFACE)
        _ip("-n", netns, "link", "set", INTERFACE, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        # A default route through the bridge, as a real host has: programs that pick "their" address from the
        # routing table (Ray, hivemind) then announce the namespace's address rather than 127.0.0.1.
        _ip("-n", netns, "route", "add", "default", "via", str(root_address).split("/")[0])
    return True


def testbed_up(
    folder: Path,
    n: int,
    gpus: int = 4,
    *,
    mode: Literal["auto", "netns", "loopback"] = "auto",
    sshd: Path = DEFAULT_SSHD,
    timeout: float = 15.0,
) -> Testbed:
    """Start N SSH test hosts with G fake GPUs each; on failure, remove what was built and raise TestbedError."""
    if not 1 <= n <= MAX_HOSTS:
        raise TestbedError(f"a testbed has 1 to {MAX_HOSTS} hosts, not {n}")
    if not 0 <= gpus <= MAX_GPUS:
        raise TestbedError(f"a testbed host has 0 to {MAX_GPUS} GPUs, not {gpus}")
    folder = folder.resolve()
    _check_tools(sshd)
    _prepare_folder(folder)
    testbed_id = secrets.token_hex(3)
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "id": testbed_id,
        "mode": "netns" if mode != "loopback" else "loopback",
        "ready": False,
        "user": getpass.getuser(),
        "gpus": gpus,
        "bridge": f"bf{testbed_id}br",
        "subnet": None,
        "root_address": None,
        # Names are fixed before anything exists, so `down` can remove whatever a crashed `up` got to.
        "hosts": [
            {
                "name": f"tb{i}",
                "address": "127.0.0.1",
                "port": 22,
                "netns": f"bf{i}-{testbed_id}",
                "veth": f"bf{testbed_id}v{i}",
                "interface": INTERFACE,
                "gpus": gpus,
            }
            for i in range(1, n + 1)
        ],
    }
    _write_state(folder, state)
    try:
        _bring_up(folder, state, mode, sshd, timeout)
    except BaseException as exc:
        with contextlib.suppress(TestbedError):
            _teardown(folder, state, keep_folder=True)
        _write_state(folder, {**state, "ready": False})
        if isinstance(exc, TestbedError):
            raise TestbedError(f"{exc}; the half-built testbed was removed except {folder}") from None
        raise
    return load_testbed(folder)


def _bring_up(
    folder: Path, state: dict[str, Any], mode: Literal["auto", "netns", "loopback"], sshd: Path, timeout: float
) -> None:
    hosts: list[dict[str, Any]] = state["hosts"]
    if mode == "loopback" or not _build_network(state, forced=mode == "netns"):
        state["mode"] = "loopback"
        for host, port in zip(hosts, _free_loopback_ports(len(hosts)), strict=True):
            host.update(address="127.0.0.1", port=port, interface="lo")
    _write_state(folder, state)

    client_public = _keygen(folder / "id_ed25519", f"benchfleet-testbed-{state['id']}")
    (folder / "authorized_keys").write_text(client_public + "\n")
    (folder / "authorized_keys").chmod(0o600)
    for host in hosts:
        host_dir = folder / host["name"]
        host_dir.mkdir(mode=0o700)
        host["public_key"] = _keygen(host_dir / "ssh_host_ed25519_key", host["name"])
        install_fake_nvidia_smi(host_dir / "bin", host["gpus"])

    pending = hosts
    for _attempt in range(3):
        for host in pending:
            _start_sshd(sshd, folder, host, state["mode"], state["id"])
        busy = set(_wait_ready(folder, pending, timeout))
        pending = [host for host in hosts if host["name"] in busy]
        if not pending:
            break
        # Another program took a loopback port between our pick and sshd's bind: pick again.
        for host, port in zip(pending, _free_loopback_ports(len(pending)), strict=True):
            host["port"] = port
        _write_state(folder, state)
    if pending:
        raise TestbedError(f"no free loopback port stayed free for {pending[0]['name']}'s sshd; try again")

    known = [_known_hosts_line(host, host["public_key"]) for host in hosts]
    (folder / "known_hosts").write_text("\n".join(known) + "\n")
    (folder / "ssh_config").write_text(_ssh_config(folder, hosts, state["user"]))
    for name in ("known_hosts", "ssh_config"):
        (folder / name).chmod(0o600)
    state["ready"] = True
    _write_state(folder, state)


def _teardown(folder: Path, state: dict[str, Any], *, keep_folder: bool) -> list[str]:
    """Kill the testbed's processes, delete its namespaces, links and bridge, then (unless kept) the folder."""
    removed: list[str] = []
    hosts: list[dict[str, Any]] = state.get("hosts", [])
    pids = _marked_pids(state["id"])
    for host in hosts:
        host_dir = folder / host["name"]
        pid = _pidfile_pid(host_dir / "sshd.pid", host_dir / "sshd_config")
        if pid is not None:
            pids.add(pid)
        if _namespace_exists(host["netns"]):
            with contextlib.suppress(TestbedError):
                pids.update(int(p) for p in _ip("netns", "pids", host["netns"]).split())
    names = {pid: _command_name(pid) for pid in pids}
    removed += [f"process {pid} ({names[pid]})" for pid in _terminate(pids)]
    for host in hosts:
        # The veth goes first: deleting it removes its peer at once, while a namespace is cleaned up lazily.
        if _link_exists(host["veth"]):
            _ip("link", "del", host["veth"])
            removed.append(f"link {host['veth']}")
        if _namespace_exists(host["netns"]):
            _ip("netns", "del", host["netns"])
            removed.append(f"namespace {host['netns']}")
    if _link_exists(state["bridge"]):
        _ip("link", "del", state["bridge"])
        removed.append(f"bridge {state['bridge']}")
    if not keep_folder and folder.exists():
        shutil.rmtree(folder)
        removed.append(f"folder {folder}")
    return removed


def stop_sshd(folder: Path, name: str) -> list[int]:
    """Kill one host's sshd and every SSH session it serves (netns mode): its connections drop, its tasks live on.

    Fault-injection for tests and rehearsals: `start_sshd` brings the host back.
    """
    state = _read_state(folder)
    if state is None:
        raise TestbedError(f"{folder}: no testbed here")
    host = next((h for h in state["hosts"] if h["name"] == name), None)
    if host is None or host.get("netns") is None:
        raise TestbedError(f"{name}: not a network-namespace host of the testbed in {folder}")
    pids = {int(p) for p in _ip("netns", "pids", host["netns"]).split()}
    sshds = {pid for pid in pids if _command_name(pid) in ("sshd", "sshd-session")}
    return _terminate(sshds, grace=1.0)


def start_sshd(folder: Path, name: str, *, timeout: float = 15.0) -> None:
    """Start a host's sshd again after `stop_sshd` and wait until it accepts connections."""
    state = _read_state(folder)
    if state is None:
        raise TestbedError(f"{folder}: no testbed here")
    host = next((h for h in state["hosts"] if h["name"] == name), None)
    if host is None:
        raise TestbedError(f"{name}: no such host in the testbed in {folder}")
    _start_sshd(Path("/usr/sbin/sshd"), folder, host, state["mode"], state["id"])
    _wait_ready(folder, [host], timeout)


def testbed_down(folder: Path) -> list[str]:
    """Remove everything `up` created for this folder (also after a failed `up`); returns what was removed."""
    folder = folder.resolve()
    if not folder.exists():
        return []
    state = _read_state(folder)
    if state is None:
        raise TestbedError(f"{folder} holds no testbed ({STATE_FILE} is missing); nothing was removed")
    return _teardown(folder, state, keep_folder=False)


# Their names start with "test", so pytest would collect them from any test module that imports them.
testbed_up.__test__ = False  # type: ignore[attr-defined]
testbed_down.__test__ = False  # type: ignore[attr-defined]
