"""The console driven with Pilot against the real engine on small local sweeps.

Each test asserts what a person would see (rows, counts, log lines, plots) and what the keys did to the run
(the journal's requests and task states, and the tasks' processes in /proc).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from rich.console import Console
from textual.pilot import Pilot  # noqa: TID251 (the console's own tests drive it with Pilot)

from console.app import BenchfleetApp
from console.screens.dialogs import ConfirmScreen
from console.screens.run import RunScreen
from console.widgets.fleet import FleetTable
from console.widgets.logview import LogPane
from console.widgets.plots import ChartPlot, PlotsPane
from console.widgets.results import ResultsTable
from remote.engine import Engine, EngineOptions
from remote.procfs import group_members, is_alive
from remote.recipe_loader import load_recipe
from remote.rundir import prepare
from tests.conftest import cli, run_engine, wait_for_async

Writer = Callable[..., Path]

GATED = """
    name = "gated"
    [hosts.here]
    gpus = {gpus}
    [[stage]]
    kind = "queue"
    name = "sweep"
    placement = "{placement}"
    grid = {{ i = "1..{n}" }}
    command = '''sh -c 'echo started {{i}} on {{gpu}}; while [ ! -e {gate} ]; do sleep 0.05; done;
                 echo value: {{i}}0''''
    [metrics]
    value = {{ regex = 'value: (\\\\d+)', type = "int" }}
"""


# -- helpers shared by the console tests ---------------------------------------------------------------------


def screen_text(app: BenchfleetApp) -> str:
    """The screen as plain text, as a person would read it (Textual renders it off-screen in tests)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, color_system=None,
                      record=True, legacy_windows=False, safe_box=False)
    # The compositor's full update is what export_screenshot prints too; private, so only tests use it.
    update = app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)
    console.print(update)
    return console.export_text(styles=False)


async def until(pilot: Pilot[int], condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Let the app run until `condition` holds; fail naming `what` after `timeout` seconds."""
    if not await wait_for_async(condition, timeout, pause=pilot.pause):
        raise AssertionError(f"timed out waiting for: {what}")


def owned_app(recipe: Path, run_dir: Path, **kwargs: object) -> BenchfleetApp:
    """A console that runs the engine itself, fast polling for tests."""
    rd = prepare(run_dir, resume=False)
    options = EngineOptions(poll_interval=0.05, kill_grace=1.0)
    engine = Engine(load_recipe(recipe), rd, resume=False, options=options)
    return BenchfleetApp(run_dir, engine=engine, refresh_interval=0.2, **kwargs)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def console(app: BenchfleetApp, size: tuple[int, int]) -> AsyncIterator[Pilot[int]]:
    """Run the app headless at `size` until its run screen is up; on the way out (even after a failed
    assertion) stop the engine, so no task outlives the test."""
    async with app.run_test(size=size) as pilot:
        await started(pilot, app)
        try:
            yield pilot
        finally:
            await stop_engine(pilot, app)


async def stop_engine(pilot: Pilot[int], app: BenchfleetApp) -> None:
    """Leave no task behind: stop the engine and wait for it before the test's app goes away."""
    if app.engine is not None and not app.engine_done:
        app.engine.request_stop()
        await until(pilot, lambda: app.engine_done, "the engine to stop", timeout=30)


def run_screen(app: BenchfleetApp) -> RunScreen:
    screen = app.run_screen
    assert screen is not None
    return screen


async def started(pilot: Pilot[int], app: BenchfleetApp) -> RunScreen:
    """The run screen, once mounted."""
    await until(pilot, lambda: app.run_screen is not None and app.run_screen.is_mounted, "the run screen")
    return run_screen(app)


def asking(app: BenchfleetApp) -> bool:
    """A confirmation dialog is open."""
    return isinstance(app.screen, ConfirmScreen)


def journal_rows(run_dir: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{run_dir / 'journal.sqlite'}?mode=ro", uri=True) as db:
        return list(db.execute(sql, params).fetchall())


def meta(run_dir: Path, key: str) -> str | None:
    rows = journal_rows(run_dir, "SELECT value FROM meta WHERE key=?", key)
    return str(rows[0][0]) if rows else None


def task_states(run_dir: Path) -> dict[str, int]:
    rows = journal_rows(run_dir, "SELECT state, COUNT(*) FROM tasks GROUP BY state")
    return {str(s): int(str(n)) for s, n in rows}


def gated(write_recipe: Writer, tmp_path: Path, *, n: int, gpus: int,
          placement: str = "free-slot") -> tuple[Path, Path]:
    gate = tmp_path / "gate"
    return write_recipe(GATED.format(gpus=gpus, n=n, gate=gate, placement=placement)), gate


# -- the fleet view ------------------------------------------------------------------------------------------


async def test_fleet_shows_a_row_per_slot_and_counts_follow_the_run(write_recipe: Writer,
                                                                     tmp_path: Path) -> None:
    recipe, gate = gated(write_recipe, tmp_path, n=6, gpus=3)
    app = owned_app(recipe, tmp_path / "run")
    async with console(app, (120, 30)) as pilot:
        fleet = run_screen(app).query_one(FleetTable)
        await until(pilot, lambda: sum(s.running for s in fleet.slots) == 3, "three running slots")
        text = screen_text(app)
        assert [s.key for s in fleet.slots] == ["here:0", "here:1", "here:2"]
        assert text.count("▶ running") == 3
        assert "0/6" in text and "3 running" in text and "3 queued" in text
        # The last log line of each running task is in its row.
        await until(pilot, lambda: screen_text(app).count("started ") >= 3, "the tasks' first lines")
        gate.write_text("open")
        await until(pilot, lambda: task_states(tmp_path / "run").get("done") == 6, "6 done")
        await until(pilot, lambda: "6/6" in screen_text(app), "6/6 on screen")
        text = screen_text(app)
        assert "6 done" in text and "▶ running" not in text and "finished" in text
        await until(pilot, lambda: app.engine_done, "the engine to finish")
        await pilot.press("q")  # a finished run: no question asked
        await until(pilot, lambda: app.return_value is not None, "the app to exit")
    assert app.return_value == 0


async def test_logs_view_shows_a_slot_then_all_slots_merged_and_filters(write_recipe: Writer,
                                                                         tmp_path: Path) -> None:
    recipe, gate = gated(write_recipe, tmp_path, n=2, gpus=2, placement="round-robin")
    app = owned_app(recipe, tmp_path / "run")
    async with console(app, (100, 30)) as pilot:
        fleet = run_screen(app).query_one(FleetTable)
        await until(pilot, lambda: sum(s.running for s in fleet.slots) == 2, "two running slots")
        fleet.option_list.focus()
        await pilot.press("end", "enter")  # the second slot's log
        logs = run_screen(app).query_one("#logs", LogPane)
        await until(pilot, lambda: "started 2 on 1" in logs.lines, "slot here:1's first line")
        assert run_screen(app).view == "logs" and "here:1" in logs.source_title and logs.path.endswith(".log")
        assert not any("started 1" in line for line in logs.lines)
        await pilot.press("m")  # merged: both slots, each line prefixed by its slot
        def both() -> bool:
            lines = logs.lines
            return (any(line.startswith("here:0") and "started 1 on 0" in line for line in lines)
                    and any(line.startswith("here:1") and "started 2 on 1" in line for line in lines))

        await until(pilot, both, "both slots in the merged view")
        await pilot.press("ampersand", "2", "enter")  # filter: task 2's lines only
        await until(pilot, lambda: logs.filter_term == "2", "the filter")
        assert logs.lines and all("2" in line for line in logs.lines)
        gate.write_text("open")
        await until(pilot, lambda: any("value: 20" in line for line in logs.lines),
                    "new lines through the filter")
        assert not any("value: 10" in line for line in logs.lines)
        await pilot.press("escape")
        await until(pilot, lambda: any("value: 10" in line for line in logs.lines), "the filter cleared")


# -- actions -------------------------------------------------------------------------------------------------


async def test_cancel_kills_the_selected_task(write_recipe: Writer, tmp_path: Path) -> None:
    recipe = write_recipe("""
        name = "cancel"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        grid = { i = [1, 2] }
        command = "sh -c 'echo task {i}; sleep 60'"
    """)
    run = tmp_path / "run"
    app = owned_app(recipe, run)
    async with console(app, (100, 30)) as pilot:
        fleet = run_screen(app).query_one(FleetTable)
        await until(pilot, lambda: any(s.running for s in fleet.slots), "a running task")
        first = fleet.slots[0].task_id
        pid_rows = journal_rows(run, "SELECT pid FROM attempts WHERE task_id=? AND pid IS NOT NULL", first)
        pid_sql = "SELECT pid FROM attempts WHERE task_id=? AND pid > 0"
        await until(pilot, lambda: bool(journal_rows(run, pid_sql, first)), "the task's pid")
        pid = int(str(journal_rows(run, "SELECT pid FROM attempts WHERE task_id=?", first)[0][0]))
        assert is_alive(pid) or pid_rows == []
        await pilot.press("c")
        assert asking(app)
        await pilot.press("y")
        state_sql = "SELECT state FROM tasks WHERE id=?"
        await until(pilot, lambda: journal_rows(run, state_sql, first) == [("cancelled",)],
                    "the task cancelled in the journal")
        assert journal_rows(run, "SELECT kind, target FROM requests") == [("cancel", first)]
        await until(pilot, lambda: not group_members(pid), "the task's process group gone")
        # The slot moved on to the next task.
        await until(pilot, lambda: fleet.slots[0].running and fleet.slots[0].task_id != first,
                    "the next task")


async def test_pause_and_resume_the_queue_and_a_slot(write_recipe: Writer, tmp_path: Path) -> None:
    recipe, gate = gated(write_recipe, tmp_path, n=3, gpus=1)
    run = tmp_path / "run"
    app = owned_app(recipe, run)
    async with console(app, (100, 30)) as pilot:
        fleet = run_screen(app).query_one(FleetTable)
        await until(pilot, lambda: any(s.running for s in fleet.slots), "the first task running")
        await pilot.press("P")
        await until(pilot, lambda: meta(run, "queue_paused") == "1", "queue_paused in the journal")
        await until(pilot, lambda: "queue paused" in screen_text(app), "the paused queue on screen")
        assert fleet.slots[0].state == "pausing"
        gate.write_text("open")
        await until(pilot, lambda: task_states(run).get("done") == 1, "the running task to finish")
        # Paused: nothing new starts while we watch for a second.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert task_states(run).get("running", 0) == 0
            await pilot.pause(0.05)
        await until(pilot, lambda: fleet.slots[0].state == "paused", "the slot shown paused")
        await pilot.press("P")
        await until(pilot, lambda: task_states(run).get("done") == 3, "the queue resumed and finished")
        assert [k for k, _ in journal_rows(run, "SELECT kind, target FROM requests")] == ["pause", "resume"]
        assert meta(run, "queue_paused") == "0"


async def test_pause_one_slot_keeps_the_other_running(write_recipe: Writer, tmp_path: Path) -> None:
    recipe, gate = gated(write_recipe, tmp_path, n=4, gpus=2, placement="round-robin")
    run = tmp_path / "run"
    app = owned_app(recipe, run)
    async with console(app, (100, 30)) as pilot:
        fleet = run_screen(app).query_one(FleetTable)
        await until(pilot, lambda: sum(s.running for s in fleet.slots) == 2, "two running slots")
        fleet.option_list.focus()
        await pilot.press("home", "p")  # pause here:0
        await until(pilot, lambda: meta(run, "paused_slots") == json.dumps(["here:0"]), "here:0 paused")
        gate.write_text("open")
        await until(pilot, lambda: task_states(run).get("done") == 3, "slot here:1 running its queue")
        assert journal_rows(run, "SELECT COUNT(*) FROM tasks WHERE gpu=0 AND state='done'") == [(1,)]
        await until(pilot, lambda: fleet.slots[0].state == "paused", "here:0 shown paused")
        await pilot.press("p")  # resume it
        await until(pilot, lambda: task_states(run).get("done") == 4, "here:0 resumed")


async def test_retry_failed_runs_the_failed_tasks_again(write_recipe: Writer, tmp_path: Path) -> None:
    flags = tmp_path / "flags"
    flags.mkdir()
    gate = tmp_path / "gate"
    recipe = write_recipe(f"""
        name = "retry"
        [hosts.here]
        gpus = 2
        [[stage]]
        kind = "queue"
        placement = "round-robin"
        grid = {{ i = [1, 2, 3] }}
        command = '''sh -c 'if [ {{i}} = 2 ]; then while [ ! -e {gate} ]; do sleep 0.05; done; fi;
            if [ -e {flags}/{{i}} ]; then echo ok; else touch {flags}/{{i}}; echo failing; exit 3; fi''''
    """)
    run = tmp_path / "run"
    app = owned_app(recipe, run)
    async with console(app, (100, 30)) as pilot:
        await until(pilot, lambda: app.snapshot is not None and app.snapshot.counts.get("failed") == 2,
                    "two failed tasks")
        await pilot.press("r")
        await until(pilot, lambda: journal_rows(run, "SELECT kind FROM requests") == [("retry-failed",)],
                    "the request in the journal")
        await until(pilot, lambda: task_states(run).get("done") == 2, "the failed tasks done on their retry")
        gate.write_text("open")
        await until(pilot, lambda: app.engine_done, "the run to finish")
        assert task_states(run) == {"done": 2, "failed": 1}  # task 2 failed its only attempt, after the retry
        attempts = journal_rows(run, "SELECT COUNT(*) FROM attempts GROUP BY task_id ORDER BY 1")
        assert attempts == [(1,), (2,), (2,)]


# -- attach --------------------------------------------------------------------------------------------------


async def test_attach_to_a_finished_run_shows_results_and_plots(write_recipe: Writer, tmp_path: Path) -> None:
    recipe = write_recipe("""
        name = "beams"
        [hosts.here]
        gpus = 2
        [[stage]]
        kind = "queue"
        grid = { beam_width = "1..3", beam_length = "2..4" }
        command = "sh -c 'echo Tokens/second $(({beam_width} * 10 + {beam_length}))'"
        [metrics]
        tokens_per_sec = '^Tokens/second\\s+([\\d.]+)'
        [results]
        columns = ["beam_width", "beam_length", "tokens_per_sec"]
        sort = ["beam_width", "beam_length"]
        [[plot]]
        kind = "heatmap"
        title = "tokens/s over width x length"
        x = "beam_width"
        y = "beam_length"
        value = "tokens_per_sec"
    """)
    run = tmp_path / "run"
    await asyncio.to_thread(run_engine, recipe, run)  # the engine runs its own loop
    app = BenchfleetApp(run, refresh_interval=0.2)
    async with console(app, (120, 36)) as pilot:
        await until(pilot, lambda: "9/9" in screen_text(app), "the finished run on screen")
        assert "finished" in screen_text(app)
        await pilot.press("3")
        table = run_screen(app).query_one(ResultsTable)
        await until(pilot, lambda: table.row_count == 9, "nine result rows")
        headers = [str(c.label) for c in table.columns.values()]
        assert headers[:3] == ["beam_width", "beam_length", "tokens_per_sec"]
        assert str(table.get_row_at(0)[2]) == "12" and str(table.get_row_at(8)[2]) == "34"
        # Sort by tokens_per_sec, descending on the second press.
        await pilot.press("right", "right", "s", "s")
        assert str(table.get_row_at(0)[2]) == "34"
        await pilot.press("4")
        plots = run_screen(app).query_one(PlotsPane)
        await until(pilot, lambda: len(plots.rows) == 9, "the plot's data")
        chart = plots.query(ChartPlot).first()
        assert chart.spec is not None and chart.spec.kind == "heatmap"
        await pilot.pause(0.1)
        text = screen_text(app)
        assert "tokens/s over width x length" in text and "beam_width" in text
        assert "34" in text and "12" in text  # cell values are written in the heatmap
        await pilot.press("q")
        await until(pilot, lambda: app.return_value is not None, "the app to exit")
    assert app.return_value == 0


async def test_a_list_metric_is_drawn_as_one_line_per_result_row(write_recipe: Writer, tmp_path: Path) -> None:
    # Each task prints a per-token time list whose first item is 2 (pace) or 3 (hf).
    recipe = write_recipe(r"""
        name = "lists"
        [hosts.here]
        gpus = 2
        [[stage]]
        kind = "queue"
        grid = { framework = ["pace", "hf"] }
        command = ["sh", "-c", 'test "$1" = pace && t=2 || t=3; printf "{{\"tpt\": [%s, 0.5, 0.5, 0.5]}}\n" $t',
                   "sh", "{framework}"]
        [metrics]
        tpt = { json = "tpt", type = "list" }
        [results]
        columns = ["framework", "tpt"]
        [[plot]]
        kind = "line"
        title = "time per token"
        y = "tpt"
        group = "framework"
        xlabel = "token"
    """)
    run = tmp_path / "run"
    await asyncio.to_thread(run_engine, recipe, run)
    app = BenchfleetApp(run, refresh_interval=0.2)
    async with console(app, (120, 36)) as pilot:
        await until(pilot, lambda: "2/2" in screen_text(app), "the finished run on screen")
        await pilot.press("3")
        table = run_screen(app).query_one(ResultsTable)
        await until(pilot, lambda: table.row_count == 2, "two result rows")
        cells = sorted(str(table.get_row_at(i)[1]) for i in range(2))
        assert cells == ["[4] mean 0.875", "[4] mean 1.125"]  # a list cell: its length and mean
        await pilot.press("4")
        plots = run_screen(app).query_one(PlotsPane)
        await until(pilot, lambda: len(plots.rows) == 2, "the plot's data")
        await pilot.pause(0.1)
        shown = screen_text(app)
        assert "time per token" in shown and "token" in shown
        assert "pace" in shown and "hf" in shown  # the legend names one line per row
        await pilot.press("q")
        await until(pilot, lambda: app.return_value is not None, "the app to exit")


async def test_quitting_an_attached_console_leaves_a_detached_run_running(write_recipe: Writer,
                                                                         tmp_path: Path) -> None:
    recipe, gate = gated(write_recipe, tmp_path, n=2, gpus=1)
    run = tmp_path / "run"
    detached = cli("--recipe", str(recipe), "--run-dir", str(run), "--detach")
    assert detached.returncode == 0, detached.stderr
    engine_pid_file = run / "engine.pid"
    try:
        app = BenchfleetApp(run, refresh_interval=0.2)
        async with console(app, (100, 30)) as pilot:
            await until(pilot, lambda: app.snapshot is not None and app.snapshot.counts.get("running") == 1,
                        "the detached run's task on screen", timeout=60)
            assert "attached" in screen_text(app)
            await pilot.press("q")
            await until(pilot, lambda: app.return_value is not None, "the console to exit")
        assert app.return_value == 0
        deadline = time.monotonic() + 10
        while not engine_pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        engine_pid = int(engine_pid_file.read_text())
        assert is_alive(engine_pid)
        gate.write_text("open")
        deadline = time.monotonic() + 60
        while is_alive(engine_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert task_states(run) == {"done": 2}
    finally:
        gate.write_text("open")
        if engine_pid_file.exists():
            pid = int(engine_pid_file.read_text())
            if is_alive(pid):
                os.kill(pid, signal.SIGTERM)


async def test_quitting_a_run_the_console_started_asks_first(write_recipe: Writer, tmp_path: Path) -> None:
    recipe, gate = gated(write_recipe, tmp_path, n=2, gpus=1)
    run = tmp_path / "run"
    app = owned_app(recipe, run)
    async with console(app, (100, 30)) as pilot:
        fleet = run_screen(app).query_one(FleetTable)
        await until(pilot, lambda: any(s.running for s in fleet.slots), "a running task")
        pid = int(str(journal_rows(run, "SELECT pid FROM attempts WHERE pid > 0")[0][0]))
        await pilot.press("q")
        assert asking(app)
        await pilot.press("n")  # keep running
        assert not asking(app) and app.engine_running and is_alive(pid)
        await pilot.press("q", "y")
        await until(pilot, lambda: app.return_value is not None, "the console to stop the run and exit")
    assert app.return_value == 130
    assert not group_members(pid)
    assert meta(run, "state") == "interrupted"
    assert not gate.exists()
