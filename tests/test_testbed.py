"""The SSH testbed: real sshd in real network namespaces (and on loopback), reached by OpenSSH and asyncssh."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from remote.testbed import (
    Testbed,
    TestbedError,
    load_testbed,
    netns_available,
    testbed_down,
    testbed_up,
)

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="OpenSSH server is not installed")
needs_netns = pytest.mark.skipif(not netns_available(), reason="network namespaces are not allowed here")

GPU_LINE = "{}, NVIDIA H100 80GB HBM3, 81559 MiB"


def _ssh(bed: Testbed, host: str, command: str) -> subprocess.CompletedProcess[str]:
    """Run a command with OpenSSH's client, configured only by the testbed's ssh_config."""
    argv = ["ssh", "-F", str(bed.ssh_config), "-o", "BatchMode=yes", host, command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _testbed_id(folder: Path) -> str:
    testbed_id: str = json.loads((folder / "state.json").read_text())["id"]
    return testbed_id


def _sshd_pids(bed: Testbed) -> list[int]:
    return [int((bed.folder / host.name / "sshd.pid").read_text()) for host in bed.hosts]


@pytest.fixture(scope="module")
def netns_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    if not netns_available():
        pytest.skip("network namespaces are not allowed here")
    folder = tmp_path_factory.mktemp("netns") / "bed"
    try:
        yield testbed_up(folder, 2, 3, mode="netns")
    finally:
        testbed_down(folder)


@pytest.fixture(scope="module")
def loopback_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    folder = tmp_path_factory.mktemp("loopback") / "bed"
    try:
        yield testbed_up(folder, 2, 3, mode="loopback")
    finally:
        testbed_down(folder)


@pytest.fixture(params=["netns", "loopback"])
def bed(request: pytest.FixtureRequest) -> Testbed:
    fixture: Testbed = request.getfixturevalue(f"{request.param}_bed")
    return fixture


def test_hosts_and_files_are_laid_out(bed: Testbed) -> None:
    assert [h.name for h in bed.hosts] == ["tb1", "tb2"]
    assert all(h.gpus == 3 for h in bed.hosts)
    assert bed.folder.stat().st_mode & 0o777 == 0o700
    assert bed.identity.stat().st_mode & 0o777 == 0o600
    assert (bed.folder / "tb1" / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert load_testbed(bed.folder) == bed
    if bed.mode == "netns":
        assert [h.port for h in bed.hosts] == [22, 22]
        assert all(h.address.startswith("198.1") for h in bed.hosts)
        assert len({h.address for h in bed.hosts}) == 2
        assert {h.netns for h in bed.hosts} <= _namespaces()
    else:
        assert {h.address for h in bed.hosts} == {"127.0.0.1"}
        assert len({h.port for h in bed.hosts}) == 2
        assert all(h.netns is None for h in bed.hosts)
    assert f'[hosts.tb2]\nssh = "tb2"\nssh_config = "{bed.ssh_config}"\ngpus = "auto"' in bed.recipe_hosts_toml()
    assert f"Include {bed.ssh_config}" in bed.instructions()


def test_openssh_client_sees_fake_gpus(bed: Testbed) -> None:
    done = _ssh(bed, "tb1", "nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [GPU_LINE.format(i) for i in range(3)]


def test_fake_nvidia_smi_answers_like_the_real_one(bed: Testbed) -> None:
    script = "; ".join(
        [
            "nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total --format=csv,noheader,nounits",
            "nvidia-smi -L",
            "nvidia-smi --query-gpu=index,bogus.field --format=csv; echo rc=$?",
        ]
    )
    done = _ssh(bed, "tb2", script)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == [f"{i}, 0, 0, 81559" for i in range(3)]
    assert [line.split(" (UUID: GPU-")[0] for line in lines[3:6]] == [
        f"GPU {i}: NVIDIA H100 80GB HBM3" for i in range(3)
    ]
    assert 'Field "bogus.field" is not a valid field to query.' in lines
    assert lines[-1] == "rc=2"


async def test_asyncssh_honours_the_ssh_config(bed: Testbed) -> None:
    for host in bed.hosts:
        async with asyncssh.connect(host.name, config=[str(bed.ssh_config)], connect_timeout=10) as conn:
            result = await conn.run("echo $BENCHFLEET_TESTBED_HOST; hostname -I", check=True, timeout=10)
            assert conn.get_extra_info("peername")[:2] == (host.address, host.port)
        lines = str(result.stdout).splitlines()
        assert lines[0] == host.name
        if bed.mode == "netns":
            assert lines[1].split() == [host.address]


async def test_wrong_known_hosts_entry_is_refused(bed: Testbed, tmp_path: Path) -> None:
    # tb1's names with tb2's key: the UserKnownHostsFile from the config must be what asyncssh checks.
    tb2_key = " ".join((bed.folder / "tb2" / "ssh_host_ed25519_key.pub").read_text().split()[:2])
    tb1_names = bed.known_hosts.read_text().splitlines()[0].split()[0]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{tb1_names} {tb2_key}\n")
    config = tmp_path / "ssh_config"
    config.write_text(bed.ssh_config.read_text().replace(str(bed.known_hosts), str(wrong)))
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        async with asyncssh.connect("tb1", config=[str(config)], connect_timeout=10):
            pass
    refused = subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", "tb1", "true"], capture_output=True, text=True, check=False
    )
    assert refused.returncode == 255
    assert "HOST IDENTIFICATION HAS CHANGED" in refused.stderr


@needs_netns
def test_hosts_reach_each_other_and_can_be_shaped(netns_bed: Testbed) -> None:
    tb1, tb2 = netns_bed.hosts
    probe = f"import socket; print(socket.create_connection(({tb2.address!r}, 22), 5).recv(4).decode())"
    done = _ssh(netns_bed, "tb1", shlex.join([sys.executable, "-c", probe]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SSH-"
    assert tb1.netns is not None
    shape = ["ip", "netns", "exec", tb1.netns, "tc", "qdisc", "replace", "dev", tb1.interface, "root"]
    subprocess.run([*shape, "tbf", "rate", "100mbit", "burst", "32kbit", "latency", "50ms"], check=True)
    subprocess.run(["ip", "netns", "exec", tb1.netns, "tc", "qdisc", "del", "dev", tb1.interface, "root"], check=True)


def _launch_detached(bed: Testbed, pidfile: Path) -> int:
    """Start a detached sleeper on tb1 the way the engine launches tasks, and return its pid."""
    inner = f"echo $$ > {shlex.quote(str(pidfile))}; exec sleep 300"
    done = _ssh(bed, "tb1", f"setsid sh -c {shlex.quote(inner)} </dev/null >/dev/null 2>&1 &")
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 5
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline, "the detached task never started"
        time.sleep(0.02)
    return int(pidfile.read_text())


@pytest.mark.parametrize("mode", ["auto", "loopback"])
def test_down_removes_everything_and_spares_other_testbeds(
    mode: str, loopback_bed: Testbed, tmp_path: Path
) -> None:
    folder = tmp_path / "bed"
    started = time.monotonic()
    bed = testbed_up(folder, 2, 1, mode="auto" if mode == "auto" else "loopback")
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"testbed_up(n=2) took {elapsed:.2f} s"
    try:
        assert bed.mode == ("netns" if mode == "auto" and netns_available() else "loopback")
        sshd_pids = _sshd_pids(bed)
        task_pid = _launch_detached(bed, tmp_path / "task.pid")
        bridge = f"bf{_testbed_id(folder)}br"
    finally:
        removed = testbed_down(folder)
    assert f"folder {folder}" in removed
    assert not folder.exists()
    assert not any(_alive(pid) for pid in [*sshd_pids, task_pid])
    assert f"process {task_pid} (sleep)" in removed
    if bed.mode == "netns":
        assert not {h.netns for h in bed.hosts} & _namespaces()
        assert not Path("/sys/class/net", bridge).exists()
    assert testbed_down(folder) == []
    # The other testbed of this session is untouched.
    assert _ssh(loopback_bed, "tb1", "true").returncode == 0


@needs_netns
def test_failed_up_leaves_nothing_running(tmp_path: Path) -> None:
    broken_sshd = tmp_path / "sshd"
    broken_sshd.write_text("#!/bin/sh\necho 'no host keys here' >&2\nexit 1\n")
    broken_sshd.chmod(0o755)
    folder = tmp_path / "bed"
    with pytest.raises(TestbedError) as caught:
        testbed_up(folder, 2, mode="netns", sshd=broken_sshd)
    message = str(caught.value)
    assert "\n" not in message
    assert "starting sshd for tb1 failed: no host keys here" in message
    with pytest.raises(TestbedError, match="did not come up completely"):
        load_testbed(folder)
    testbed_id = _testbed_id(folder)
    assert not any(name.endswith(testbed_id) for name in _namespaces())
    assert not Path("/sys/class/net", f"bf{testbed_id}br").exists()
    assert testbed_down(folder) == [f"folder {folder}"]


def test_up_refuses_a_folder_in_use(loopback_bed: Testbed) -> None:
    with pytest.raises(TestbedError, match="already in"):
        testbed_up(loopback_bed.folder, 1)
    assert _ssh(loopback_bed, "tb2", "true").returncode == 0


def test_down_refuses_a_folder_that_is_not_a_testbed(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(TestbedError, match="holds no testbed"):
        testbed_down(tmp_path)
    assert (tmp_path / "notes.txt").exists()
