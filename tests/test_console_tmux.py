"""The real console in a real terminal: `benchfleet RECIPE` inside tmux, driven with send-keys as a person
would, read back with capture-pane during a small sweep."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

Writer = Callable[..., Path]

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


class Tmux:
    """One tmux server of our own (its own socket), one window of a fixed size."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def run(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10,
                             check=False)
        return out.stdout

    def start(self, command: str, width: int, height: int, cwd: Path) -> None:
        subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", "new-session", "-d", "-s", "t",
                        "-x", str(width), "-y", str(height), "-c", str(cwd), command], check=True, timeout=10)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def wait_for(self, predicate: Callable[[str], bool], what: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen shows:\n{text}")
            time.sleep(0.1)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    # A socket of its own per test: a server still shutting down from the last test cannot refuse this one.
    t = Tmux(f"benchfleet-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield t
    finally:
        t.run("kill-server")


def test_console_in_tmux_runs_a_sweep_as_a_person_sees_it(tmux: Tmux, write_recipe: Writer,
                                                           tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    recipe = write_recipe(f"""
        name = "tmuxed"
        description = "four cells on two slots"
        [hosts.local]
        gpus = 2
        [[stage]]
        kind = "queue"
        name = "sweep"
        grid = {{ beam_width = [1, 2], beam_length = [2, 3] }}
        command = '''sh -c 'echo warming up {{beam_width}}x{{beam_length}};
                     while [ ! -e {gate} ]; do sleep 0.05; done;
                     echo Tokens/second 4{{beam_width}}.{{beam_length}}''''
        [metrics]
        tokens_per_sec = '^Tokens/second\\s+([\\d.]+)'
        [[plot]]
        kind = "heatmap"
        x = "beam_width"
        y = "beam_length"
        value = "tokens_per_sec"
    """)
    env = f"PYTHONPATH={REPO} TERM=xterm-256color"
    command = (f"env {env} {sys.executable} -m console.cli {recipe} --run-dir {tmp_path / 'run'}; "
               "echo CONSOLE-EXIT=$?; sleep 60")
    started = time.monotonic()
    tmux.start(command, 80, 24, tmp_path)
    screen = tmux.wait_for(lambda s: s.count("▶ running") == 2, "both slots running")
    assert time.monotonic() - started < 30
    assert "tmuxed" in screen and "0/4" in screen and "2 running" in screen and "2 queued" in screen
    assert "local" in screen and "beam_width=1 beam_length=2" in screen
    tmux.wait_for(lambda s: "╰ warming up 1x2" in s, "the last log line in the row")
    # The logs view of the first slot, then back.
    tmux.keys("Enter")
    screen = tmux.wait_for(lambda s: "follow on" in s, "the logs view")
    assert "warming up 1x2" in screen and "local:0" in screen
    tmux.keys("1")
    tmux.wait_for(lambda s: "HOST" in s and "QUEUE" in s, "the fleet view again")
    gate.write_text("open")
    screen = tmux.wait_for(lambda s: "4/4" in s and "finished" in s, "the sweep finished")
    assert "4 done" in screen and "0 failed" in screen
    tmux.keys("3")
    screen = tmux.wait_for(lambda s: "4 finished" in s, "the results view")
    assert "41.2" in screen and "42.3" in screen
    tmux.keys("4")
    screen = tmux.wait_for(lambda s: "beam_width" in s and "41.3" in s, "the heatmap")
    tmux.keys("q")  # a finished run quits without asking
    screen = tmux.wait_for(lambda s: "CONSOLE-EXIT=" in s, "the console to exit")
    assert "CONSOLE-EXIT=0" in screen
    assert "sweep" in screen and "results:" in screen  # the summary printed after the console closed


def test_quitting_a_started_run_in_tmux_asks_then_stops_it(tmux: Tmux, write_recipe: Writer,
                                                            tmp_path: Path) -> None:
    recipe = write_recipe("""
        name = "longrun"
        [hosts.local]
        gpus = 1
        [[stage]]
        kind = "queue"
        grid = { i = [1, 2] }
        command = "sh -c 'echo sleeping {i}; sleep 60'"
    """)
    run = tmp_path / "run"
    command = (f"env PYTHONPATH={REPO} {sys.executable} -m console.cli {recipe} --run-dir {run}; "
               "echo CONSOLE-EXIT=$?; sleep 60")
    tmux.start(command, 80, 24, tmp_path)
    tmux.wait_for(lambda s: "▶ running" in s, "the task running")
    tmux.keys("q")
    tmux.wait_for(lambda s: "Stop the run and quit?" in s, "the question")
    tmux.keys("n")
    tmux.wait_for(lambda s: "Stop the run and quit?" not in s and "▶ running" in s, "the run still going")
    tmux.keys("q")
    tmux.wait_for(lambda s: "Stop the run and quit?" in s, "the question again")
    tmux.keys("y")
    tmux.wait_for(lambda s: "CONSOLE-EXIT=130" in s and "--resume" in s,
                  "the console to stop the run, say how to resume, and exit with 130")
