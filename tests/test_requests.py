"""Requests a viewer writes into the journal (what the console's keys do), acted on by a live engine."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from remote.engine import Engine, EngineOptions
from remote.events import Event, RunFinished, TaskExited, TaskStarted
from remote.journal import Journal
from remote.procfs import is_alive
from remote.recipe_loader import load_recipe
from remote.rundir import prepare
from remote.testbed import install_fake_nvidia_smi
from tests.conftest import wait_for_async

Writer = Callable[..., Path]


def drive(recipe: Path, run_dir: Path,
          script: Callable[[Journal, list[Event]], Awaitable[None]]) -> tuple[RunFinished, list[Event]]:
    """Run the engine, and meanwhile `script` acting as a viewer through its own journal connection."""
    events: list[Event] = []

    async def go() -> RunFinished:
        engine = Engine(load_recipe(recipe), prepare(run_dir, resume=False), resume=False,
                        options=EngineOptions(poll_interval=0.05, kill_grace=1.0))
        engine.subscribe(events.append)
        run = asyncio.create_task(engine.run())
        started = await wait_for_async(lambda: (run_dir / "journal.sqlite").exists()
                                       and any(isinstance(e, TaskStarted) for e in events))
        assert started, "timed out waiting for: the journal and a started task"
        viewer = Journal(run_dir / "journal.sqlite")
        try:
            await script(viewer, events)
        finally:
            viewer.close()
        return await asyncio.wait_for(run, 60)

    return asyncio.run(go()), events


def _outcomes(journal: Journal) -> list[tuple[str, str]]:
    rows = journal._db.execute("SELECT kind, outcome FROM requests ORDER BY seq").fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


def _handled(journal: Journal, seq: int) -> bool:
    row = journal._db.execute("SELECT handled FROM requests WHERE seq=?", (seq,)).fetchone()
    return row is not None and row[0] is not None


SLEEPY = """
    name = "req"
    [hosts.here]
    gpus = 2
    [[stage]]
    kind = "queue"
    placement = "round-robin"
    grid = {{ i = "1..6" }}
    command = "sh -c 'echo $$ > {pids}/{{i}}; echo start {{i}} >> {marks}; sleep {sleep}'"
"""


def test_pause_whole_queue_then_resume(write_recipe: Writer, tmp_path: Path) -> None:
    marks, pids = tmp_path / "marks", tmp_path / "pids"
    pids.mkdir()
    recipe = write_recipe(SLEEPY.format(marks=marks, pids=pids, sleep=0.3))

    async def viewer(j: Journal, events: list[Event]) -> None:
        seq = j.add_request("pause")
        assert await wait_for_async(lambda: _handled(j, seq)), "timed out waiting for: the pause request handled"
        assert j.meta("queue_paused") == "1"
        started = len(marks.read_text().splitlines())
        await asyncio.sleep(1.0)  # long enough for the running tasks to end and, unpaused, for more to start
        assert len(marks.read_text().splitlines()) == started, "a paused queue started new tasks"
        seq = j.add_request("resume")
        assert await wait_for_async(lambda: _handled(j, seq)), "timed out waiting for: the resume request handled"
        assert j.meta("queue_paused") == "0"

    finished, _ = drive(recipe, tmp_path / "run", viewer)
    assert finished.counts["done"] == 6


def test_cancel_running_and_waiting_tasks(write_recipe: Writer, tmp_path: Path) -> None:
    marks, pids = tmp_path / "marks", tmp_path / "pids"
    pids.mkdir()
    recipe = write_recipe(SLEEPY.format(marks=marks, pids=pids, sleep=3))

    async def viewer(j: Journal, events: list[Event]) -> None:
        running = [e for e in events if isinstance(e, TaskStarted)]
        first = running[0]
        pid_file = pids / first.label.split("=")[1]
        assert await wait_for_async(pid_file.exists), "timed out waiting for: the running task's pid file"
        pid = int(pid_file.read_text())
        waiting = [t for t in j.tasks() if t.state == "queued"][-1]  # far back: still waiting when cancelled
        s1 = j.add_request("cancel", first.task_id)
        s2 = j.add_request("cancel", waiting.id)
        handled = await wait_for_async(lambda: _handled(j, s1) and _handled(j, s2))
        assert handled, "timed out waiting for: both cancel requests handled"
        assert not is_alive(pid), "the cancelled task's process still runs"
        out = dict(_outcomes(j))
        assert out["cancel"].startswith("cancelled")

    finished, events = drive(recipe, tmp_path / "run", viewer)
    assert finished.counts["cancelled"] == 2 and finished.counts["done"] == 4
    exits = [e for e in events if isinstance(e, TaskExited) and e.state == "cancelled"]
    assert len(exits) == 1  # the running one; the waiting one never started
    started = {line.split()[1] for line in marks.read_text().splitlines()}
    assert len(started) == 5


def test_retry_failed_while_the_stage_runs(write_recipe: Writer, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    recipe = write_recipe(f"""
        name = "retry"
        [hosts.here]
        gpus = 2
        [[stage]]
        kind = "queue"
        placement = "round-robin"
        grid = {{ i = [1, 2] }}
        command = "sh -c 'if [ {{i}} = 1 ]; then [ -e {flag} ] || (touch {flag}; exit 5); else sleep 3; fi'"
    """)

    async def viewer(j: Journal, events: list[Event]) -> None:
        failed = await wait_for_async(lambda: any(isinstance(e, TaskExited) and e.state == "failed" for e in events))
        assert failed, "timed out waiting for: a failed task"
        seq = j.add_request("retry-failed")
        assert await wait_for_async(lambda: _handled(j, seq)), "timed out waiting for: the retry-failed request handled"
        assert dict(_outcomes(j))["retry-failed"] == "1 failed task(s) queued again"

    finished, events = drive(recipe, tmp_path / "run", viewer)
    assert finished.counts["done"] == 2 and finished.counts["failed"] == 0
    states = [e.state for e in events if isinstance(e, TaskExited) and e.label == "i=1"]
    assert states == ["failed", "done"]


def test_stop_request_interrupts_resumably(write_recipe: Writer, tmp_path: Path) -> None:
    marks, pids = tmp_path / "marks", tmp_path / "pids"
    pids.mkdir()
    recipe = write_recipe(SLEEPY.format(marks=marks, pids=pids, sleep=30))

    async def viewer(j: Journal, events: list[Event]) -> None:
        j.add_request("stop")

    finished, _ = drive(recipe, tmp_path / "run", viewer)
    assert finished.interrupted
    assert finished.counts["queued"] == 6
    for f in pids.iterdir():
        assert not is_alive(int(f.read_text()))


def test_gpu_samples_from_nvidia_smi(write_recipe: Writer, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    install_fake_nvidia_smi(bin_dir, 2)
    recipe = write_recipe(f"""
        name = "gpus"
        [hosts.here]
        gpus = "auto"
        env = {{ PATH = "{bin_dir}:{os.environ['PATH']}" }}
        [[stage]]
        kind = "queue"
        grid = {{ i = "1..2" }}
        command = "sh -c 'echo gpu $CUDA_VISIBLE_DEVICES; sleep 0.5'"
    """)

    async def viewer(j: Journal, events: list[Event]) -> None:
        assert await wait_for_async(lambda: bool(j.gpu_samples("here", 1))), "timed out waiting for: a GPU sample"

    finished, _ = drive(recipe, tmp_path / "run", viewer)
    assert finished.counts["done"] == 2
    slots = json.loads(Journal(tmp_path / "run" / "journal.sqlite", readonly=True).meta("slots") or "[]")
    assert slots == ["here:0", "here:1"]
