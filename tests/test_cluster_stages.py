"""Topology stages end to end through the real engine: a Ray cluster and a hivemind swarm over two SSH
testbed hosts, a pipeline ring of stand-in workers, and tc shaping that survives an engine crash. Nothing may
outlive a test."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remote.events import EngineNote, Event
from remote.journal import Journal
from remote.procfs import group_members, is_alive
from remote.recipe_loader import load_recipe
from remote.stages.pipeline import split_layers
from remote.stages.ray_stage import parse_ray_status
from remote.testbed import Testbed, TestbedHost
from tests.conftest import (
    REPO,
    cli,
    cli_popen,
    free_ports,
    host_qdiscs,
    kernel_has_netem,
    netns_testbed,
    run_engine,
    the_log,
    wait_for,
)

Writer = Callable[..., Path]
BIN = Path(sys.executable).parent
"""The testbed hosts' PATH holds this interpreter's folder: its `ray` and `hivemind-dht` are the hosts'."""
WORKLOADS = REPO / "tests" / "workloads"
DESERVE = REPO / "recipes" / "workloads"
SHAPE_STATE = Path.home() / ".cache" / "benchfleet" / "shape"
ROUTING_TABLE_OF_TWO = "2 DHT nodes (including this one) are in the local routing table"


def needs(program: str) -> None:
    if not (BIN / program).exists():
        pytest.skip(f"{program} is not installed next to {sys.executable}; pip install -e '.[cluster]'")


# -- the testbed and what runs on it -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    with netns_testbed(tmp_path_factory, "cluster", hosts=2, gpus=2) as tb:
        yield tb


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def host_processes(tb: Testbed, host: TestbedHost) -> dict[int, str]:
    """Live processes in the host's network namespace except its sshd listener: pid -> command line."""
    assert host.netns is not None
    argv = ["ip", "netns", "pids", host.netns]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    listener = int((tb.folder / host.name / "sshd.pid").read_text())
    return {pid: _cmdline(pid) for pid in map(int, out.split()) if pid != listener and is_alive(pid)}


def host_tc(host: TestbedHost) -> str:
    """The root qdisc line of the host's interface, read from outside benchfleet."""
    return next((line for line in host_qdiscs(host).splitlines() if " root " in line), "")


@pytest.fixture
def hosts_clean(testbed: Testbed) -> Iterator[Testbed]:
    """After the test, nothing the stages started may survive on the hosts (SSH sessions get a moment to
    close) and the interfaces are as before; leftovers are killed so that one failure spoils no other test."""
    before = {h.name: host_tc(h).split()[1] for h in testbed.hosts}
    yield testbed
    left: dict[int, str] = {}

    def gone() -> bool:
        left.clear()
        for h in testbed.hosts:
            left.update({pid: f"{h.name}: {cmd[:160]}" for pid, cmd in host_processes(testbed, h).items()})
        return not left

    clean = wait_for(gone, 10.0)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    after = {h.name: host_tc(h).split()[1] for h in testbed.hosts}
    for h in testbed.hosts:
        if after[h.name] != before[h.name]:
            assert h.netns is not None
            subprocess.run(["ip", "netns", "exec", h.netns, "tc", "qdisc", "del", "dev", h.interface, "root"],
                           check=False)
    assert clean, f"processes outlived the run: {sorted(left.values())}"
    assert after == before, f"root qdiscs changed: {before} -> {after}"


def hosts_toml(tb: Testbed, gpus: str, env: str = "") -> str:
    return "".join(f'[hosts.{h.name}]\nssh = "{h.name}"\nssh_config = "{tb.ssh_config}"\n'
                   f"gpus = {gpus}\n{env}\n" for h in tb.hosts)


def error_notes(events: list[Event]) -> list[str]:
    return [e.text for e in events if isinstance(e, EngineNote) and e.level == "error"]


def journal_events(run: Path, kind: str) -> list[dict[str, object]]:
    j = Journal(run / "journal.sqlite", readonly=True)
    try:
        return [data for _seq, _t, k, _task, data in j.events(limit=100_000) if k == kind]
    finally:
        j.close()


def task_states(run: Path, stage: str) -> list[str]:
    j = Journal(run / "journal.sqlite", readonly=True)
    try:
        return sorted(t.state for t in j.tasks(stage))
    finally:
        j.close()


# -- Ray ---------------------------------------------------------------------------------------------------

DRIVER = """import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("cluster GPU", ray.cluster_resources().get("GPU", 0))
alive = [node for node in ray.nodes() if node["Alive"]]
print("alive nodes", len(alive))
print("node addresses", ",".join(sorted(node["NodeManagerAddress"] for node in alive)))
"""


@pytest.mark.slow
@pytest.mark.ssh
def test_ray_cluster_spans_both_hosts_and_leaves_nothing_behind(hosts_clean: Testbed, write_recipe: Writer,
                                                                 tmp_path: Path) -> None:
    needs("ray")
    tb = hosts_clean
    # A small object store: each node would otherwise reserve 30% of this machine's memory.
    env = 'env = { RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION = "0.02" }'
    recipe = write_recipe('name = "raycluster"\n' + hosts_toml(tb, '"auto"', env) + f"""
[[stage]]
kind = "ray"
head = "tb1"
cpus_per_host = 1
timeout = "120s"
[[stage]]
kind = "run"
name = "driver"
hosts = ["tb1"]
command = ["python3", "-c", {json.dumps(DRIVER)}, "{{ray.address}}"]
[[stage]]
kind = "queue"
name = "onray"
executor = "ray"
grid = {{ i = "1..4" }}
command = '''sh -c 'echo cell={{i}} node=$(hostname -I) gpu=$CUDA_VISIBLE_DEVICES t0=$(date +%s.%N);
                 sleep 3; echo t1=$(date +%s.%N)' '''
[metrics]
cell = {{ regex = '^cell=(\\d+)', type = "int", stage = "onray" }}
node = {{ regex = 'node=(\\S+)', type = "str", stage = "onray" }}
ray_gpu = {{ regex = 'gpu=(\\S*) t0=', type = "str", stage = "onray" }}
t0 = {{ regex = 't0=([\\d.]+)', stage = "onray" }}
t1 = {{ regex = '^t1=([\\d.]+)', stage = "onray" }}
cluster_gpus = {{ regex = '^cluster GPU ([\\d.]+)', stage = "driver" }}
alive_nodes = {{ regex = '^alive nodes (\\d+)', type = "int", stage = "driver" }}
node_addresses = {{ regex = '^node addresses (\\S+)', type = "str", stage = "driver" }}
""")
    run = tmp_path / "run"
    finished, events = run_engine(recipe, run)
    assert finished.counts.get("failed", 0) == 0 and not error_notes(events), error_notes(events)
    tb1, tb2 = tb.hosts
    captured = {str(e["key"]): str(e["value"]) for e in journal_events(run, "captured")}
    assert captured["ray.address"] == f"{tb1.address}:6379"
    # The engine's own check: `ray status` on the head saw both nodes and the 2 + 2 GPUs of the fake
    # nvidia-smis.
    (status,) = journal_events(run, "ray-status")
    assert parse_ray_status(str(status["status"])) == (2, 4.0)
    assert "Ray runtime started" in the_log(run, "ray.tb2-*.log")
    rows = json.loads((run / "results.json").read_text())
    (row,) = [r for r in rows if r["stage"] == "driver"]
    assert (row["cluster_gpus"], row["alive_nodes"]) == (4.0, 2), the_log(run, "driver.*.log")
    # executor = "ray": the four cells ran as Ray tasks needing one GPU each, on both nodes, each seeing exactly
    # the GPU Ray gave it, and no two tasks that ran at the same time shared a GPU.
    cells = [r for r in rows if r["stage"] == "onray"]
    assert sorted(r["cell"] for r in cells) == [1, 2, 3, 4] and {r["state"] for r in cells} == {"done"}
    assert {r["node"] for r in cells} == {tb1.address, tb2.address}
    assert all(r["ray_gpu"] in ("0", "1") for r in cells), cells
    for a, b in itertools.combinations(cells, 2):
        if a["t0"] < b["t1"] and b["t0"] < a["t1"]:
            assert (a["node"], a["ray_gpu"]) != (b["node"], b["ray_gpu"]), (a, b)
    assert row["node_addresses"] == ",".join(sorted((tb1.address, tb2.address)))
    assert task_states(run, "ray") == ["stopped", "stopped"]


# -- hivemind ----------------------------------------------------------------------------------------------


def swarm_stage(identity: Path, servers: bool) -> str:
    server_lines = (
        'servers = "hivemind-dht --host_maddrs /ip4/0.0.0.0/tcp/0 --initial_peers {swarm.initial_peers} '
        '--refresh_period 1"\nserver_ready = "Running a DHT instance"\n' if servers else "")
    return f"""
[[stage]]
kind = "swarm"
coordinator = "tb1"
identity = "{identity}"
dht_command = ["hivemind-dht", "--host_maddrs", "/ip4/0.0.0.0/tcp/{{dht_port}}",
               "--identity_path", "{{identity}}", "--refresh_period", "1"]
timeout = "60s"
{server_lines}"""


@pytest.mark.slow
@pytest.mark.ssh
def test_swarm_server_joins_the_coordinator_which_keeps_its_peer_id(hosts_clean: Testbed,
                                                                     write_recipe: Writer,
                                                                     tmp_path: Path) -> None:
    needs("hivemind-dht")
    tb = hosts_clean
    identity = tmp_path / "coordinator.id"
    recipe = write_recipe('name = "swarm"\n' + hosts_toml(tb, "1") + swarm_stage(identity, servers=True) + """
[[stage]]
kind = "run"
name = "seen"
hosts = ["tb2"]
command = "sh -c 'echo peer={swarm.initial_peers} servers={swarm.servers}; sleep 2'"
[metrics]
peer_seen = { regex = 'peer=(\\S+)', type = "str", stage = "seen" }
servers = { regex = 'servers=(\\d+)', type = "int", stage = "seen" }
""")
    load_recipe(recipe)  # the swarm's own {swarm.initial_peers} is allowed in `servers`
    peers: list[str] = []
    for n in (1, 2):
        run = tmp_path / f"run{n}"
        finished, events = run_engine(recipe, run)
        assert finished.counts.get("failed", 0) == 0 and not error_notes(events), error_notes(events)
        (row,) = json.loads((run / "results.json").read_text())
        # {swarm.initial_peers} is the coordinator's address on the testbed network, not its loopback.
        assert str(row["peer_seen"]).startswith(f"/ip4/{tb.hosts[0].address}/tcp/31337/p2p/"), row
        assert row["servers"] == 1
        peers.append(str(row["peer_seen"]))
        server = the_log(run, "swarm.tb2*.log")
        coordinator = the_log(run, "swarm.tb1-*.log")
        assert "Running a DHT instance" in server
        assert ROUTING_TABLE_OF_TWO in server and ROUTING_TABLE_OF_TWO in coordinator, coordinator
        assert ("Generating new identity" in coordinator) == (n == 1)
    assert identity.exists()
    assert peers[0] == peers[1], "the identity file did not keep the coordinator's peer id"


def coordinator_pid(host: TestbedHost, tb: Testbed) -> int | None:
    """The coordinator's hivemind-dht process itself (its parent is the task wrapper), not its helpers."""
    for pid, cmd in host_processes(tb, host).items():
        if "hivemind-dht" in cmd and "--identity_path" in cmd:
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if "bf-wrap.sh" in _cmdline(ppid):
                return pid
    return None


@pytest.mark.slow
@pytest.mark.ssh
def test_killing_the_coordinator_fails_the_trial_and_tears_down_the_rest(hosts_clean: Testbed,
                                                                          write_recipe: Writer,
                                                                          tmp_path: Path) -> None:
    needs("hivemind-dht")
    tb = hosts_clean
    swarm = swarm_stage(tmp_path / "c.id", servers=False)
    recipe = write_recipe('name = "swarmkill"\n' + hosts_toml(tb, "1") + swarm + """
[[stage]]
kind = "service"
name = "peer"
hosts = ["tb2"]
command = ["hivemind-dht", "--host_maddrs", "/ip4/0.0.0.0/tcp/0", "--initial_peers", "{swarm.initial_peers}",
           "--refresh_period", "1"]
ready = { log = "Running a DHT instance", timeout = "60s" }
[[stage]]
kind = "queue"
name = "load"
grid = { i = "1..4" }
command = "sleep 60"
""")
    killed: dict[str, float] = {}

    def kill_coordinator_under_load() -> None:
        def loaded() -> bool:
            return any(cmd == "sleep 60" for h in tb.hosts for cmd in host_processes(tb, h).values())

        if wait_for(loaded, 90.0) and (pid := coordinator_pid(tb.hosts[0], tb)) is not None:
            os.kill(pid, signal.SIGKILL)
            killed["at"] = time.monotonic()

    thread = threading.Thread(target=kill_coordinator_under_load)
    thread.start()
    try:
        finished, events = run_engine(recipe, tmp_path / "run")
    finally:
        thread.join()
    assert "at" in killed, "the load stage never started, or the coordinator was not found"
    assert time.monotonic() - killed["at"] < 30, "the trial waited for its tasks instead of failing"
    assert finished.counts["failed"] >= 1
    notes = error_notes(events)
    assert any(n.startswith("service swarm on tb1 exited (exit 137) while the trial ran; last lines:")
               for n in notes), notes
    run = tmp_path / "run"
    assert "done" not in task_states(run, "load") and "failed" in task_states(run, "load")
    assert task_states(run, "swarm") == ["failed"]  # it died: not recorded as a service stopped on purpose
    assert task_states(run, "peer") == ["stopped"]


# -- pipeline ----------------------------------------------------------------------------------------------




INFO = """import json, sys, urllib.request
for url in sys.argv[1].split(","):
    print("INFO", url, urllib.request.urlopen(url + "/info", timeout=5).read().decode())
"""


def test_pipeline_workers_get_their_slices_and_ring_and_serve_the_client(write_recipe: Writer,
                                                                          tmp_path: Path) -> None:
    base, controller = free_ports(3), free_ports(1)
    worker = (f"{{python}} {DESERVE / 'deserve_worker.py'} --model llama-3-8b --num-rounds {{num_rounds}} "
              "--layer-begin {layer_begin} --layer-end {layer_end} --batch-size 4 --port {port} "
              f"--controller-url http://127.0.0.1:{controller} --next-worker-url {{next_url}} "
              "--report-interval 0.5")
    client = (f"{{python}} {DESERVE / 'deserve_client.py'} --first-worker-url {{pipeline.first_url}} "
              f"--controller-port {controller} --workload fixed6:8:0 --max-tokens 4 --batch-size 3 "
              "--idle-timeout 20")
    recipe = write_recipe(f"""
name = "pipeline"
[hosts.here]
gpus = 3
[[stage]]
kind = "pipeline"
layers = 32
base_port = {base}
timeout = "30s"
command = "{worker}"
[[stage]]
kind = "run"
name = "info"
command = ["{{python}}", "-c", {json.dumps(INFO)}, "{{pipeline.urls}}"]
[[stage]]
kind = "run"
name = "client"
command = "{client}"
[metrics]
requests_finished_total = {{ json = "requests_finished_total", type = "int", stage = "client" }}
""")
    run = tmp_path / "run"
    finished, events = run_engine(recipe, run)
    assert finished.counts.get("failed", 0) == 0 and not error_notes(events), error_notes(events)
    urls = [f"http://127.0.0.1:{base + rank}" for rank in range(3)]
    infos = {line.split()[1]: json.loads(line.split(maxsplit=2)[2])
             for line in the_log(run, "info.*.log").splitlines() if line.startswith("INFO ")}
    assert list(infos) == urls
    for rank, ((begin, end), url) in enumerate(zip(split_layers(32, 3), urls, strict=True)):
        info = infos[url]
        assert (info["layer_begin"], info["layer_end"], info["port"]) == (begin, end, base + rank)
        assert info["next_worker_url"] == urls[(rank + 1) % 3] and info["num_rounds"] == 3
    assert [the_log(run, f"pipeline.here_{g}-*.log").splitlines()[0] for g in range(3)] == [
        "Serve from llama-3-8b-instruct-slice/tok_embeddings to llama-3-8b-instruct-slice/layers.10",
        "Serve from llama-3-8b-instruct-slice/layers.11 to llama-3-8b-instruct-slice/layers.21",
        "Serve from llama-3-8b-instruct-slice/layers.22 to llama-3-8b-instruct-slice/output"]
    # Ready by port, in order, before anything used them.
    assert len(journal_events(run, "service-ready")) == 3
    rows = {r["stage"]: r for r in json.loads((run / "results.json").read_text())}
    assert rows["client"]["requests_finished_total"] == 6
    j = Journal(run / "journal.sqlite", readonly=True)
    try:
        groups = [a.pid for t in j.tasks("pipeline") for a in j.attempts(t.id) if a.pid is not None]
    finally:
        j.close()
    assert len(groups) == 3 and not any(group_members(g) for g in groups), "a worker outlived its trial"
    for port in (base, base + 1, base + 2, controller):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still listens"


# -- shaping -----------------------------------------------------------------------------------------------


def shape_recipe(tb: Testbed, shape: str, probe: list[str]) -> str:
    """Shape tb1's eth0 (its only interface, so also the SSH link: the armed guard is the safety net), then
    run `probe` on tb1."""
    return 'name = "shaped"\n' + hosts_toml(tb, "1") + f"""
[[stage]]
kind = "shape"
hosts = ["tb1"]
interface = "eth0"
allow_control_interface = true
{shape}
[[stage]]
kind = "run"
name = "probe"
hosts = ["tb1"]
command = {json.dumps(probe)}
[metrics]
qdisc = {{ regex = '^qdisc (\\w+) [0-9a-f]+: root', type = "str", stage = "probe" }}
rate = {{ regex = '^qdisc tbf .* rate (\\S+)', type = "str", stage = "probe" }}
"""


def guards(tb: Testbed) -> list[str]:
    return [cmd for cmd in host_processes(tb, tb.hosts[0]).values() if "bf-shape-guard" in cmd]


@pytest.mark.ssh
def test_shape_stage_applies_tbf_for_later_stages_and_reverts_it(hosts_clean: Testbed, write_recipe: Writer,
                                                                 tmp_path: Path) -> None:
    tb = hosts_clean
    recipe = write_recipe(shape_recipe(tb, 'rate = "100mbit"', ["tc", "qdisc", "show", "dev", "eth0"]))
    run = tmp_path / "run"
    finished, events = run_engine(recipe, run)
    assert finished.counts.get("failed", 0) == 0 and not error_notes(events), error_notes(events)
    (row,) = json.loads((run / "results.json").read_text())
    assert (row["qdisc"], row["rate"]) == ("tbf", "100Mbit")
    assert host_tc(tb.hosts[0]).split()[1] == "noqueue" and not guards(tb)


def _journal_meta(run: Path, key: str) -> str:
    j = Journal(run / "journal.sqlite", readonly=True)
    try:
        return j.meta(key) or ""
    finally:
        j.close()


@pytest.mark.slow
@pytest.mark.ssh
def test_sigkilled_engine_leaves_shaping_armed_and_resume_reverts_it_first(hosts_clean: Testbed,
                                                                          write_recipe: Writer,
                                                                          tmp_path: Path) -> None:
    tb = hosts_clean
    release = tmp_path / "release"
    wait = f"while [ ! -e {release} ]; do sleep 0.1; done; tc qdisc show dev eth0"
    recipe = write_recipe(shape_recipe(tb, 'rate = "100mbit"', ["sh", "-c", wait]))
    run = tmp_path / "run"
    engine = cli_popen("--recipe", str(recipe), "--run-dir", str(run))
    try:
        def probing_now() -> bool:
            return any(cmd.startswith("sh -c while") for cmd in host_processes(tb, tb.hosts[0]).values())

        probing = wait_for(probing_now, 60.0)
        os.kill(engine.pid, signal.SIGKILL)
    finally:
        engine.wait()
        assert engine.stdout is not None
        engine.stdout.close()
    assert probing, "the probe stage never started"
    assert host_tc(tb.hosts[0]).split()[1] == "tbf", "the crash should leave the shaping in place"
    run_id = _journal_meta(run, "run_id")
    (guard,) = guards(tb)
    assert run_id in guard, "the armed revert guard would undo it by itself at its deadline"
    release.touch()
    resumed = cli("--recipe", str(recipe), "--run-dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    lines = resumed.stdout.splitlines()
    reverted = [i for i, ln in enumerate(lines)
                if "host tb1: reverted shaping left by the previous engine (eth0: tbf rate 100mbit)" in ln]
    applied = [i for i, ln in enumerate(lines) if "stage shape: tbf rate 100mbit on tb1" in ln]
    assert reverted and applied and reverted[0] < applied[0], resumed.stdout
    assert host_tc(tb.hosts[0]).split()[1] == "noqueue" and not guards(tb)
    assert not (SHAPE_STATE / run_id).exists()


@pytest.mark.ssh
def test_delay_without_netem_fails_in_one_line_and_applies_nothing(hosts_clean: Testbed, write_recipe: Writer,
                                                                   tmp_path: Path) -> None:
    if kernel_has_netem():
        pytest.skip("this kernel has netem, so the delay would be applied")
    tb = hosts_clean
    recipe = write_recipe(shape_recipe(tb, 'delay = "10ms"', ["tc", "qdisc", "show", "dev", "eth0"]))
    run = tmp_path / "run"
    result = cli("--recipe", str(recipe), "--run-dir", str(run))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    errors = [ln for ln in output.splitlines() if "error" in ln]
    assert len(errors) == 1 and errors[0].endswith(
        "error: host tb1: the kernel has no netem qdisc, so delay=10ms cannot be applied; results would be "
        "mislabelled as shaped. Load sch_netem or drop `delay`"), output
    assert task_states(run, "probe") == ["queued"], "the stage after a refused shape must not run"
    assert host_tc(tb.hosts[0]).split()[1] == "noqueue" and not guards(tb)
    assert not (SHAPE_STATE / _journal_meta(run, "run_id")).exists()
