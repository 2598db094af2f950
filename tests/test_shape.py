"""tc shaping as a self-reverting transaction: real tc on real testbed hosts (network namespaces) over SSH."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from remote import procfs
from remote.stages.shape import (
    Applied,
    ShapeError,
    ShapeRequest,
    _arm_and_apply,
    _inspect,
    _plan,
    apply,
    confirm,
    current_qdisc,
    normalise_delay,
    normalise_rate,
    probe,
    revert,
    revert_stale,
)
from remote.testbed import Testbed
from remote.transport.base import Transport
from remote.transport.local import LocalTransport
from remote.transport.ssh import SSHTransport
from tests.conftest import host_qdiscs, kernel_has_netem, netns_testbed, wait_for

T = TypeVar("T")
STATE = Path.home() / ".cache" / "benchfleet" / "shape"


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    with netns_testbed(tmp_path_factory, "shape", hosts=1, gpus=0) as tb:
        yield tb


@pytest.fixture
def run_id() -> Iterator[str]:
    rid = f"shape-test-{secrets.token_hex(4)}"
    yield rid
    assert not (STATE / rid).exists(), "a test left shaping state behind"


def over_ssh(tb: Testbed, work: Callable[[Transport], Awaitable[T]]) -> T:
    """Run `work` with a fresh SSH transport to tb1 (a new connection: what a restarted engine would have)."""
    async def go() -> T:
        transport = SSHTransport("tb1", "tb1", ssh_config=str(tb.ssh_config))
        try:
            return await work(transport)
        finally:
            await transport.close()

    return asyncio.run(go())


RATE_ONLY = ShapeRequest(interface="eth0", delay=None, rate="0.1gbit", limit=None)


def shaping(request: ShapeRequest, run_id: str) -> Callable[[Transport], Awaitable[Applied]]:
    """apply() on tb1's eth0, its only interface and so its control interface: the guard is the safety net."""
    return lambda t: apply(t, "tb1", request, run_id=run_id, allow_control_interface=True)


def test_tbf_shows_on_the_host_and_revert_restores_the_qdisc(testbed: Testbed, run_id: str) -> None:
    host = testbed.hosts[0]
    before = current_qdisc(host_qdiscs(host))
    seen: dict[str, str] = {}

    async def work(t: Transport) -> Applied:
        assert await probe(t, "tb1", RATE_ONLY, allow_control_interface=True) == "tbf"
        applied = await apply(t, "tb1", RATE_ONLY, run_id=run_id, allow_control_interface=True)
        seen["shaped"] = host_qdiscs(host)
        seen["guard_alive"] = str(procfs.is_alive(applied.guard_pid))
        seen["state"] = str((STATE / run_id / "eth0" / "state").is_file())
        await revert(t, applied)
        await revert(t, applied)  # idempotent: a second revert finds nothing and says nothing
        return applied

    applied = over_ssh(testbed, work)
    assert applied.qdisc == "tbf" and applied.description == "tbf rate 100mbit"
    assert applied.before == before
    assert current_qdisc(seen["shaped"]) == "tbf" and "rate 100Mbit" in seen["shaped"]
    assert applied.handle in seen["shaped"]
    assert seen["guard_alive"] == "True" and seen["state"] == "True"
    assert current_qdisc(host_qdiscs(host)) == before
    assert not procfs.is_alive(applied.guard_pid)


def test_the_control_interface_is_refused_unless_allowed(testbed: Testbed, run_id: str) -> None:
    host = testbed.hosts[0]
    shown = host_qdiscs(host)
    with pytest.raises(ShapeError) as caught:
        over_ssh(testbed, lambda t: apply(t, "tb1", RATE_ONLY, run_id=run_id))
    message = str(caught.value)
    assert message.startswith("host tb1: eth0 carries ") and "SSH connection" in message
    assert "allow_control_interface" in message and "\n" not in message
    assert host_qdiscs(host) == shown


def test_delay_is_refused_without_netem_and_nothing_changes(testbed: Testbed, run_id: str) -> None:
    if kernel_has_netem():
        pytest.skip("this kernel has netem; the refusal is for kernels without it")
    host = testbed.hosts[0]
    shown = host_qdiscs(host)
    request = ShapeRequest(interface="eth0", delay="10ms", rate="1Gbit", limit=225000)
    with pytest.raises(ShapeError) as caught:
        over_ssh(testbed, shaping(request, run_id))
    assert str(caught.value) == (
        "host tb1: the kernel has no netem qdisc, so delay=10ms cannot be applied; results would be "
        "mislabelled as shaped. Load sch_netem or drop `delay`")
    assert host_qdiscs(host) == shown


def test_the_guard_reverts_by_itself_at_the_deadline(testbed: Testbed, run_id: str) -> None:
    host = testbed.hosts[0]
    before = current_qdisc(host_qdiscs(host))
    request = replace(RATE_ONLY, rate="1gbit", revert_after=2.0)
    applied = over_ssh(testbed, shaping(request, run_id))
    assert current_qdisc(host_qdiscs(host)) == "tbf"
    # Nobody reverts: the engine is gone. The guard alone brings the host back.
    assert wait_for(lambda: current_qdisc(host_qdiscs(host)) == before, timeout=6.0)
    assert wait_for(lambda: not procfs.is_alive(applied.guard_pid), timeout=2.0)
    with pytest.raises(ShapeError, match=r"no longer applied .*its guard reached its deadline"):
        over_ssh(testbed, lambda t: confirm(t, applied))
    assert over_ssh(testbed, lambda t: revert_stale(t, "tb1", run_id)) == ["eth0: tbf rate 1gbit"]


def test_an_unconfirmed_apply_reverts_within_the_confirm_window(testbed: Testbed, run_id: str) -> None:
    host = testbed.hosts[0]
    before = current_qdisc(host_qdiscs(host))
    request = replace(RATE_ONLY, revert_after=3600.0, confirm_within=1.0)

    async def arm_only(t: Transport) -> Applied:
        # Steps 1 and 2 without step 3: as when the link dies (or the engine is killed) right after applying.
        plan = _plan("tb1", request)
        info = await _inspect(t, "tb1", plan, allow_control_interface=True)
        return await _arm_and_apply(t, "tb1", plan, info, run_id)

    applied = over_ssh(testbed, arm_only)
    assert current_qdisc(host_qdiscs(host)) == "tbf"
    assert wait_for(lambda: current_qdisc(host_qdiscs(host)) == before, timeout=4.0)
    assert wait_for(lambda: not procfs.is_alive(applied.guard_pid), timeout=2.0)
    with pytest.raises(ShapeError, match="was not confirmed in time"):
        over_ssh(testbed, lambda t: confirm(t, applied))
    over_ssh(testbed, lambda t: revert(t, applied))


def test_revert_stale_after_a_crash_restores_the_host_and_kills_its_guard(testbed: Testbed,
                                                                          run_id: str) -> None:
    host = testbed.hosts[0]
    before = current_qdisc(host_qdiscs(host))
    applied = over_ssh(testbed, shaping(RATE_ONLY, run_id))
    # The engine "crashed": its transport is gone, nothing was reverted, the guard has hours left.
    assert current_qdisc(host_qdiscs(host)) == "tbf" and procfs.is_alive(applied.guard_pid)
    with pytest.raises(ShapeError, match=f"eth0 is still shaped by benchfleet run {run_id} \\(tbf "):
        over_ssh(testbed, shaping(RATE_ONLY, run_id))
    assert current_qdisc(host_qdiscs(host)) == "tbf" and procfs.is_alive(applied.guard_pid)
    reverted = over_ssh(testbed, lambda t: revert_stale(t, "tb1", run_id))
    assert reverted == ["eth0: tbf rate 100mbit"]
    assert current_qdisc(host_qdiscs(host)) == before
    assert wait_for(lambda: not procfs.is_alive(applied.guard_pid), timeout=2.0)
    assert over_ssh(testbed, lambda t: revert_stale(t, "tb1", run_id)) == []


def test_a_missing_interface_is_named_with_the_ones_there(testbed: Testbed) -> None:
    with pytest.raises(ShapeError) as caught:
        over_ssh(testbed, lambda t: probe(t, "tb1", replace(RATE_ONLY, interface="eth7")))
    assert str(caught.value) == ("host tb1: no interface eth7 (it has: eth0, lo); set the shape stage's "
                                 "interface to one of them")


@pytest.mark.parametrize(("change", "expected"), [
    ({"interface": "eth0; reboot"}, "host h: interface 'eth0; reboot' is not a network interface name"),
    ({"interface": "a-very-long-interface"}, "is not a network interface name"),
    ({"rate": "fast"}, "host h: rate 'fast' is not a rate; write it like 1gbit"),
    ({"rate": "1gbps"}, "rate '1gbps' is not a rate"),
    ({"rate": "0.5bit"}, "must be a whole number of bits per second"),
    ({"delay": "10 parsecs"}, "host h: delay '10 parsecs' is not a duration"),
    ({"delay": "0ms"}, "must be a positive whole number of microseconds"),
    ({"limit": 0}, "host h: eth0: limit 0 must be a whole number"),
    ({"rate": None}, "host h: eth0: nothing to shape; give a delay, a rate or both"),
    ({"delay": "10ms", "qdisc": "tbf"}, "tbf cannot add delay=10ms"),
    ({"revert_after": 0.0}, "revert_after 0.0 must be between 0 and"),
])
def test_bad_requests_give_one_line_errors(change: dict[str, object], expected: str) -> None:
    request = replace(RATE_ONLY, **change)  # type: ignore[arg-type]
    with pytest.raises(ShapeError) as caught:
        _plan("h", request)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_rates_and_delays_are_normalised_for_tc() -> None:
    assert [normalise_rate(r) for r in ("1gbit", "1Gbit", "0.1Gbit", "100mbit", "2.5mbit", "1500bit")] == [
        "1gbit", "1gbit", "100mbit", "100mbit", "2500kbit", "1500bit"]
    assert [normalise_delay(d) for d in ("10ms", "0.1s", "100ms", "1s", "250us", "1.5ms")] == [
        "10ms", "100ms", "100ms", "1s", "250us", "1500us"]
    assert _plan("h", ShapeRequest("eth0", "10ms", "0.1Gbit", 22500)).description() == (
        "netem delay 10ms rate 100mbit limit 22500")


def test_current_qdisc_reads_the_root_line() -> None:
    assert current_qdisc("qdisc noqueue 0: root refcnt 2 \n") == "noqueue"
    assert current_qdisc("qdisc mq 0: root \nqdisc fq_codel 0: parent :1 limit 10240p\n") == "mq"
    assert current_qdisc("qdisc tbf 1a2b: root refcnt 2 rate 1Mbit burst 4000b lat 50ms \n") == "tbf"
    assert current_qdisc("qdisc fq_codel 0: parent :1 limit 10240p\n") == ""
    assert current_qdisc("") == ""


@pytest.fixture
def veth() -> Iterator[str]:
    """A veth pair in this machine's own namespace: LocalTransport can shape it without touching eth0."""
    name = f"bfsh{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p"],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a veth pair: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def test_local_transport_shapes_confirms_and_refuses_foreign_qdiscs(veth: str, tmp_path: Path) -> None:
    def tc(*args: str) -> str:
        return subprocess.run(["tc", "qdisc", *args], capture_output=True, text=True, check=True).stdout

    before = current_qdisc(tc("show", "dev", veth))
    request = replace(RATE_ONLY, interface=veth, limit=100000)

    async def work(t: Transport) -> None:
        applied = await apply(t, "here", request, run_id="local1")
        assert applied.description == "tbf rate 100mbit limit 100000"
        # tc shows a byte limit as latency: (limit - burst) / rate = (100000 - 50000) B / 12.5 MB/s = 4 ms.
        assert "rate 100Mbit burst 50000b lat 4ms" in tc("show", "dev", veth)
        assert (tmp_path / ".cache/benchfleet/shape/local1" / veth / "state").is_file()
        tc("del", "dev", veth, "root")  # someone else removes it mid-run
        gone = f"host here: {veth}: tbf rate 100mbit limit 100000 is no longer applied"
        with pytest.raises(ShapeError, match=gone):
            await confirm(t, applied)
        await revert(t, applied)
        assert not procfs.is_alive(applied.guard_pid)
        assert not (tmp_path / ".cache/benchfleet/shape/local1").exists()
        tc("add", "dev", veth, "root", "handle", "1:", "tbf", "rate", "1mbit", "burst", "4000",
           "limit", "9000")
        with pytest.raises(ShapeError, match=r"already has a configured root qdisc \(tbf 1:\)"):
            await apply(t, "here", request, run_id="local2")
        assert "qdisc tbf 1: root" in tc("show", "dev", veth)  # left exactly as it was
        tc("del", "dev", veth, "root")

    async def go() -> None:
        t = LocalTransport("here", tmp_path / "state", str(tmp_path), env={"HOME": str(tmp_path)})
        try:
            await work(t)
        finally:  # a failed assertion must not leave a guard sleeping for hours
            for rid in ("local1", "local2"):
                await revert_stale(t, "here", rid)

    asyncio.run(go())
    assert current_qdisc(tc("show", "dev", veth)) == before
