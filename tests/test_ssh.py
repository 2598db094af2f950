"""SSH hosts against real OpenSSH sshd on the testbed: sweeps, dropped links, engine crashes, host keys, quoting."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remote.engine import Engine, EngineError, EngineOptions
from remote.events import EngineNote, Event, TaskStarted
from remote.recipe_loader import load_recipe
from remote.rundir import prepare
from remote.testbed import Testbed, start_sshd, stop_sshd, testbed_down, testbed_up
from remote.transport.base import ConnectionLost, HostError, LaunchSpec
from remote.transport.ssh import SSHTransport
from tests.conftest import REPO, cli, cli_popen, run_engine

pytestmark = pytest.mark.ssh

WORKLOAD = REPO / "tests" / "workloads" / "table_task.py"
Writer = Callable[..., Path]


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    folder = tmp_path_factory.mktemp("ssh") / "testbed"
    tb = testbed_up(folder, 2, gpus=4)
    try:
        yield tb
    finally:
        testbed_down(folder)


def hosts_toml(tb: Testbed, gpus: str = '"auto"') -> str:
    return "".join(f'[hosts.{h.name}]\nssh = "{h.name}"\nssh_config = "{tb.ssh_config}"\ngpus = {gpus}\n'
                   for h in tb.hosts)


def sweep_recipe(hosts: str, *, lines: int = 3, interval: float = 0.0, marks: Path | None = None,
                 grid: str = '{ beam_width = "1..4", beam_length = "2..5" }') -> str:
    marks_arg = f" --marks {marks}" if marks else ""
    return f"""
name = "sshsweep"
{hosts}
[[stage]]
kind = "queue"
name = "sweep"
grid = {grid}
command = '''{{python}} {WORKLOAD} --beam_width={{beam_width}} --beam_length={{beam_length}}
  --lines={lines} --interval={interval}{marks_arg}'''
done = "^Tokens/second"
[metrics]
average_num_accepted_tokens = 'Average number of tokens per step:\\s+([\\d.]+)'
tokens_per_sec = '^Tokens/second\\s+([\\d.]+)'
[results]
columns = ["beam_width", "beam_length", "average_num_accepted_tokens", "tokens_per_sec", "host", "gpu"]
sort = ["beam_width", "beam_length"]
format = {{ average_num_accepted_tokens = "%f" }}
"""


def _metrics_only(rows: list[dict[str, object]]) -> list[tuple[object, ...]]:
    return [(r["beam_width"], r["beam_length"], r["average_num_accepted_tokens"], r["tokens_per_sec"]) for r in rows]


def test_sweep_over_two_hosts_matches_the_local_host(testbed: Testbed, write_recipe: Writer,
                                                      tmp_path: Path) -> None:
    remote = write_recipe(sweep_recipe(hosts_toml(testbed)), "remote.toml")
    local = write_recipe(sweep_recipe("[hosts.here]\ngpus = 8\n"), "local.toml")
    finished, events = run_engine(remote, tmp_path / "remote")
    assert finished.counts["done"] == 16, finished
    run_engine(local, tmp_path / "local")
    remote_rows = json.loads((tmp_path / "remote" / "results.json").read_text())
    local_rows = json.loads((tmp_path / "local" / "results.json").read_text())
    assert _metrics_only(remote_rows) == _metrics_only(local_rows)
    # gpus = "auto" found the fake nvidia-smi's 4 GPUs on each host, and both hosts did work.
    slots = {e.slot for e in events if isinstance(e, TaskStarted)}
    assert slots <= {f"{h}:{g}" for h in ("tb1", "tb2") for g in range(4)}
    assert {r["host"] for r in remote_rows} == {"tb1", "tb2"}
    assert (tmp_path / "remote" / "results.csv").read_text() .splitlines()[0].startswith("beam_width,beam_length")


@pytest.mark.slow
def test_sshd_killed_mid_run_loses_no_line_and_no_task(testbed: Testbed, write_recipe: Writer,
                                                       tmp_path: Path) -> None:
    if testbed.mode != "netns":
        pytest.skip("needs network namespaces to kill one host's sshd")
    marks = tmp_path / "marks"
    recipe = write_recipe(sweep_recipe(hosts_toml(testbed), lines=60, interval=0.1, marks=marks,
                                       grid='{ beam_width = "1..4", beam_length = [2, 3] }'))
    events: list[Event] = []
    outage: dict[str, float] = {}

    def fault() -> None:
        deadline = time.monotonic() + 30
        while sum(1 for e in list(events) if isinstance(e, TaskStarted)) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        outage["killed"] = len(stop_sshd(testbed.folder, "tb1"))
        time.sleep(3.0)
        start_sshd(testbed.folder, "tb1")
        outage["restarted"] = time.monotonic()

    thread = threading.Thread(target=fault)
    thread.start()
    async def go() -> None:
        engine = Engine(load_recipe(recipe), prepare(tmp_path / "run", resume=False), resume=False,
                        options=EngineOptions(poll_interval=0.1))
        engine.subscribe(events.append)
        finished = await engine.run()
        assert finished.counts["done"] == 8, finished

    asyncio.run(go())
    thread.join()
    assert outage["killed"] >= 2  # the listener and at least the engine's session
    notes = [e.text for e in events if isinstance(e, EngineNote)]
    assert any("host tb1" in n and "keep running" in n for n in notes), notes
    assert any(n == "host tb1: reconnected" for n in notes), notes
    # Every task ran once, and every log holds each numbered line exactly once, in order.
    assert len(marks.read_text().splitlines()) == 8
    logs = [p for p in (tmp_path / "run" / "logs").iterdir() if ".attempt" not in p.name]
    assert len(logs) == 8
    for log in logs:
        numbered = [line for line in log.read_text().splitlines() if line.startswith("line ")]
        assert numbered == [f"line {i}" for i in range(1, 61)], log.name


@pytest.mark.slow
def test_sigkilled_engine_reattaches_to_remote_tasks(testbed: Testbed, write_recipe: Writer,
                                                     tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    recipe = write_recipe(sweep_recipe(hosts_toml(testbed, gpus="1"), lines=20, interval=0.1, marks=marks,
                                       grid='{ beam_width = "1..3", beam_length = [2, 3] }'))
    run = tmp_path / "run"
    engine = cli_popen("--recipe", str(recipe), "--run-dir", str(run))
    deadline = time.monotonic() + 60
    while len(marks.read_text().splitlines() if marks.exists() else []) < 4:
        assert time.monotonic() < deadline, "tasks did not start"
        time.sleep(0.05)
    os.kill(engine.pid, signal.SIGKILL)
    engine.wait()
    result = cli("--recipe", str(recipe), "--run-dir", str(run), "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    starts = sorted(marks.read_text().splitlines())
    assert starts == sorted(f"start {w}-{ln}" for w in (1, 2, 3) for ln in (2, 3)), "each task ran exactly once"
    for log in (run / "logs").iterdir():
        numbered = [line for line in log.read_text().splitlines() if line.startswith("line ")]
        assert numbered == [f"line {i}" for i in range(1, 21)], log.name


class BlackHoleProxy:
    """A TCP proxy that can stop forwarding without closing anything, like a dead route or a stuck NAT."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.blackholed = False
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                while self.blackholed:
                    await asyncio.sleep(3600)
                dst.write(data)
                await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def _alias_config(tb: Testbed, tmp_path: Path, name: str, hostname: str, port: int, known_hosts: Path) -> Path:
    config = tmp_path / f"{name}.config"
    config.write_text(f"Host {name}\n  HostName {hostname}\n  Port {port}\n  User {tb.user}\n"
                      f"  IdentityFile {tb.identity}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known_hosts}\n")
    return config


def test_black_holed_link_is_detected_within_the_keepalive_bound(testbed: Testbed, tmp_path: Path) -> None:
    host = testbed.hosts[0]
    key = next(line for line in testbed.known_hosts.read_text().splitlines() if line.strip()).split(None, 1)[1]

    async def go() -> float:
        proxy = BlackHoleProxy((host.address, host.port))
        await proxy.start()
        known = tmp_path / "known_hosts"
        known.write_text(f"[127.0.0.1]:{proxy.port} {key}\n")
        config = _alias_config(testbed, tmp_path, "proxied", "127.0.0.1", proxy.port, known)
        transport = SSHTransport("proxied", "proxied", ssh_config=str(config), keepalive_interval=1.0,
                                 keepalive_count_max=2, op_timeout=120.0)
        assert transport.keepalive_bound == 3.0
        await transport.open("blackhole-test")
        assert await transport.poll([]) == []
        await transport.check("/", ["sh"])  # a round trip that works
        proxy.blackholed = True
        t0 = time.monotonic()
        with pytest.raises(ConnectionLost):
            await transport.check("/", ["sh"])
        detected = time.monotonic() - t0
        await transport.close()
        proxy.close()
        return detected

    detected = asyncio.run(go())
    assert detected <= 3.0 + 2.0, f"dead link noticed after {detected:.1f}s; the bound is 3s"


def test_unknown_host_key_is_refused_and_trust_fixes_it(testbed: Testbed, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "bfhome"
    monkeypatch.setenv("BENCHFLEET_HOME", str(home))
    host = testbed.hosts[0]
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    config = _alias_config(testbed, tmp_path, "stranger", host.address, host.port, empty)

    async def open_once() -> None:
        transport = SSHTransport("gpu-a", "stranger", ssh_config=str(config))
        try:
            await transport.open("trust-test")
        finally:
            await transport.close()

    with pytest.raises(HostError) as info:
        asyncio.run(open_once())
    message = str(info.value)
    assert "host key" in message and "benchfleet trust stranger" in message and "\n" not in message
    refused = cli("trust", "stranger", "--ssh-config", str(config))
    assert refused.returncode == 2 and "--yes" in refused.stderr  # no terminal, no confirmation: nothing recorded
    result = cli("trust", "stranger", "--ssh-config", str(config), "--yes")
    assert result.returncode == 0, result.stderr
    assert "SHA256:" in result.stdout and "recorded in" in result.stdout
    assert oct((home / "known_hosts").stat().st_mode & 0o777) == "0o600"
    asyncio.run(open_once())  # now trusted
    again = cli("trust", "stranger", "--ssh-config", str(config), "--yes")
    assert "already trusted" in again.stdout

    # A changed key (the file lists another key for this host) is refused the same way.
    other = tmp_path / "other_known_hosts"
    stale_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHvcUYQ3lxDXbyvj9CPkKg2ghRJw1pnOuVMcuSS8P4Ba"
    other.write_text(f"{host.address} {stale_key}\n")
    config2 = _alias_config(testbed, tmp_path, "changed", host.address, host.port, other)
    monkeypatch.setenv("BENCHFLEET_HOME", str(tmp_path / "fresh"))

    async def open_changed() -> None:
        transport = SSHTransport("gpu-a", "changed", ssh_config=str(config2))
        await transport.open("trust-test")

    with pytest.raises(HostError, match="unknown or has changed"):
        asyncio.run(open_changed())


HOSTILE = ["a b", "it's", 'say "hi"', "x;rm -rf /tmp/bf-pwned", "$(touch /tmp/bf-pwned)", "`id`", "line\nbreak",
           "back\\slash", "*", "~", "-n", "--help", "$HOME", "{gpu}", "", " ", "\t", "é ü 中"]


@pytest.fixture(scope="module")
def connected(testbed: Testbed) -> Iterator[tuple[asyncio.AbstractEventLoop, SSHTransport]]:
    loop = asyncio.new_event_loop()
    transport = SSHTransport("tb2", "tb2", ssh_config=str(testbed.ssh_config))
    loop.run_until_complete(transport.open(f"quoting-{uuid.uuid4().hex[:8]}"))
    try:
        yield loop, transport
    finally:
        loop.run_until_complete(transport.close())
        loop.close()


_counter = iter(range(10**9))


def _echo_argv(loop: asyncio.AbstractEventLoop, transport: SSHTransport, value: str) -> list[str]:
    async def go() -> list[str]:
        spec = LaunchSpec(name=f"q{next(_counter)}.1", workdir="/",
                          argv=["python3", "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", value, "end"],
                          env={"BF_VALUE": value})
        handle = await transport.launch(spec)
        for _ in range(400):
            (state,) = await transport.poll([handle])
            if state.status != "running":
                break
            await asyncio.sleep(0.02)
        out = await transport.read_output(handle, 0, 1 << 20)
        result: list[str] = json.loads(out.decode())
        return result

    return loop.run_until_complete(go())


def test_hostile_values_arrive_as_literal_argv(connected: tuple[asyncio.AbstractEventLoop, SSHTransport]) -> None:
    loop, transport = connected
    for value in HOSTILE:
        assert _echo_argv(loop, transport, value) == [value, "end"]
    assert not Path("/tmp/bf-pwned").exists()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40))
def test_any_text_arrives_as_one_literal_argument(connected: tuple[asyncio.AbstractEventLoop, SSHTransport],
                                                  value: str) -> None:
    loop, transport = connected
    assert _echo_argv(loop, transport, value) == [value, "end"]


def test_hostile_grid_values_through_the_engine(testbed: Testbed, write_recipe: Writer, tmp_path: Path) -> None:
    values = json.dumps(["a b", "x;touch /tmp/bf-pwned2", "$(touch /tmp/bf-pwned2)", "it's \"q\""])
    recipe = write_recipe(f"""
        name = "hostile"
        [hosts.tb1]
        ssh = "tb1"
        ssh_config = "{testbed.ssh_config}"
        gpus = 1
        [[stage]]
        kind = "queue"
        grid = {{ v = {values} }}
        command = ["{{python}}", "-c", "import sys; print('got=' + repr(sys.argv[1]))", "{{v}}"]
        [metrics]
        got = {{ regex = 'got=(.*)', type = "str" }}
    """)
    finished, _ = run_engine(recipe, tmp_path / "run")
    assert finished.counts["done"] == 4
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sorted(r["got"] for r in rows) == sorted(repr(v) for v in json.loads(values))
    assert not Path("/tmp/bf-pwned2").exists()


def test_preflight_names_the_host_and_the_missing_program(testbed: Testbed, write_recipe: Writer,
                                                          tmp_path: Path) -> None:
    recipe = write_recipe(f"""
        name = "preflight"
        {hosts_toml(testbed, gpus="1")}
        [[stage]]
        kind = "run"
        hosts = ["tb2"]
        command = "no-such-benchmark-binary --suite gpt"
    """)
    with pytest.raises(EngineError) as info:
        run_engine(recipe, tmp_path / "run")
    assert str(info.value).startswith("host tb2: stage run: program no-such-benchmark-binary is not on PATH")


def test_unreachable_host_is_one_clear_line(write_recipe: Writer, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    recipe = write_recipe(f"""
        name = "down"
        [hosts.gone]
        ssh = "root@127.0.0.1:{port}"
        gpus = 1
        [[stage]]
        kind = "queue"
        command = "true"
    """)
    result = cli("--recipe", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "host gone" in result.stderr and f"127.0.0.1:{port}" in result.stderr
