"""Shared fixtures: write recipes into a temporary folder and run the real engine on them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from remote.engine import Engine, EngineOptions
from remote.events import Event, RunFinished
from remote.extract import MetricSet, TaskExtractor
from remote.recipe import MetricSpec, QueueStage, Recipe
from remote.recipe_loader import load_recipe
from remote.rundir import prepare
from remote.testbed import Testbed, TestbedError, TestbedHost, testbed_down, testbed_up

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[[str], Path]:
    """Write a recipe (dedented) as tmp_path/recipe.toml and return its path."""

    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


def run_engine(recipe: Path, run_dir: Path, *, resume: bool = False,
               options: EngineOptions | None = None) -> tuple[RunFinished, list[Event]]:
    """Run the engine in-process to completion; returns the final event and every event seen."""
    events: list[Event] = []

    async def go() -> RunFinished:
        rd = prepare(run_dir, resume=resume)
        engine = Engine(load_recipe(recipe), rd, resume=resume,
                        options=options or EngineOptions(poll_interval=0.05, kill_grace=1.0))
        engine.subscribe(events.append)
        return await engine.run()

    return asyncio.run(go()), events


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real `benchfleet` entry point in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "console.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env, check=False)


def cli_popen(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "console.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env, start_new_session=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> int:
    """A base port with `count` consecutive free ports from it (pipelines count ports up per host)."""
    for _ in range(100):
        base = free_port()
        if base + count > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports")


# -- waiting for a condition ---------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False); it is always checked once more
    after the deadline. A bool rather than a raise, so that each caller fails with its own message (or cleans
    up first, as hosts_clean does)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


async def wait_for_async(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05, *,
                         pause: Callable[[float], Awaitable[None]] = asyncio.sleep) -> bool:
    """wait_for for code on an event loop: sleeps with `pause`, so the engine (or a Textual app, whose pilot's
    pause also lets it process its messages) keeps running while the test waits."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await pause(interval)
    return True


# -- the network-namespace testbed ---------------------------------------------------------------------------


@contextlib.contextmanager
def netns_testbed(tmp_path_factory: pytest.TempPathFactory, name: str, hosts: int, gpus: int) -> Iterator[Testbed]:
    """A testbed of `hosts` hosts in network namespaces (each its own interface, for tc), torn down on the way
    out; skips the test where namespaces cannot be made (no root, no `ip netns`), since that is the machine's
    lack, not a fault. For a module-scoped fixture: one testbed per module, as starting sshds is slow."""
    folder = tmp_path_factory.mktemp(name) / "testbed"
    try:
        tb = testbed_up(folder, hosts, gpus=gpus, mode="netns")
    except TestbedError as exc:
        pytest.skip(f"needs network namespaces: {exc}")
    try:
        yield tb
    finally:
        testbed_down(folder)


def host_qdiscs(host: TestbedHost) -> str:
    """`tc qdisc show` of the host's interface, run in its namespace: read from outside benchfleet, so that a
    test does not trust the code it checks."""
    assert host.netns is not None
    return subprocess.run(["ip", "netns", "exec", host.netns, "tc", "qdisc", "show", "dev", host.interface],
                          capture_output=True, text=True, check=True).stdout


def kernel_has_netem() -> bool:
    """Whether this kernel can add a netem qdisc (tried in a throwaway namespace): delay needs it, and the
    tests of the refusal without it only mean something where it is missing."""
    argv = ["unshare", "-n", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


# -- run directories and metrics -----------------------------------------------------------------------------


def the_log(run: Path, pattern: str) -> str:
    """The text of the one task log under run/logs matching `pattern`; more or fewer is itself a failure."""
    logs = sorted((run / "logs").glob(pattern))
    assert len(logs) == 1, f"{pattern}: {logs}"
    return logs[0].read_text()


def extractor(metrics: dict[str, str | MetricSpec], stage: str = "queue") -> TaskExtractor:
    """A task extractor for `metrics` alone, without loading a recipe file: a one-stage recipe around them."""
    recipe = Recipe(name="t", stage=[QueueStage(kind="queue", command="true")], metrics=metrics)
    return TaskExtractor(MetricSet.from_recipe(recipe), stage, done=None, progress=None)
