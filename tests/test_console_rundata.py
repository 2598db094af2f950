"""The console's data side, no Textual: tailing logs, reading a run directory, plot data, picker lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from console.picker import find_recipes, find_runs
from console.rundata import (
    LogTailer,
    RunReader,
    engine_holder,
    format_duration,
    heatmap_data,
    read_log_tail,
    series_data,
    sparkline,
)
from remote.journal import Journal
from remote.recipe import PlotSpec
from remote.rundir import EngineLock, RunDir
from tests.conftest import REPO, run_engine

Writer = Callable[..., Path]

GRID = """
    name = "grid"
    [hosts.here]
    gpus = 2
    [[stage]]
    kind = "queue"
    name = "sweep"
    grid = { a = "1..3", b = [10, 20] }
    command = "sh -c 'echo first line a={a}; echo score: $(({a} * {b})); test {a}{b} != 220'"
    [metrics]
    score = { regex = 'score: (\\d+)', type = "int" }
    [results]
    columns = ["a", "b", "score"]
    sort = ["-score"]
    [[plot]]
    kind = "heatmap"
    x = "a"
    y = "b"
    value = "score"
"""


# -- log tailing ---------------------------------------------------------------------------------------------


def test_tailer_follows_appends_and_keeps_partial_lines(tmp_path: Path) -> None:
    log = tmp_path / "task.log"
    log.write_bytes(b"one\ntw")
    tailer = LogTailer(log)
    assert tailer.poll().lines == ["one"]
    with log.open("ab") as f:
        f.write(b"o\nthree\n")
    assert tailer.poll().lines == ["two", "three"]
    assert tailer.poll().lines == []


def test_tailer_starts_near_the_end_of_a_big_file(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    batch = LogTailer(log, start_bytes=1000).poll()
    # Only whole lines from the last kilobyte, ending with the file's last line.
    assert batch.lines[-1] == "line 99999"
    assert 50 < len(batch.lines) < 130
    assert all(line.startswith("line ") for line in batch.lines)


def test_tailer_rereads_a_replaced_or_truncated_file(tmp_path: Path) -> None:
    log = tmp_path / "task.log"
    log.write_text("attempt 1\n")
    tailer = LogTailer(log)
    assert tailer.poll().lines == ["attempt 1"]
    # A new attempt: the engine renames the old log and starts a new file in its place.
    log.rename(tmp_path / "task.attempt1.log")
    log.write_text("attempt 2 says hi\n")
    assert tailer.poll().lines == ["attempt 2 says hi"]
    # A resumed engine cuts uncommitted bytes: shorter than what was read.
    log.write_text("x\n")
    assert tailer.poll().lines == ["x"]


def test_tailer_skips_ahead_when_a_task_prints_faster_than_it_reads(tmp_path: Path) -> None:
    log = tmp_path / "fast.log"
    log.write_text("start\n")
    tailer = LogTailer(log, read_limit=4096)
    tailer.poll()
    with log.open("a") as f:
        f.write("".join(f"{i:08d}\n" for i in range(100_000)))
    batch = tailer.poll()
    assert batch.skipped > 800_000
    assert batch.lines[-1] == "00099999"
    assert len(batch.lines) <= 4096 // 9
    assert tailer.poll().lines == []


def test_read_log_tail_includes_an_unterminated_last_line(tmp_path: Path) -> None:
    log = tmp_path / "done.log"
    log.write_text("a\nb\nlast without newline")
    assert read_log_tail(log, 2) == ["b", "last without newline"]
    assert read_log_tail(tmp_path / "missing.log", 5) == []


# -- reading a run -------------------------------------------------------------------------------------------


def test_reader_shows_a_finished_run(write_recipe: Writer, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_engine(write_recipe(GRID), run)
    reader = RunReader(run)
    snap = reader.snapshot()
    assert snap.available and snap.state == "finished" and snap.recipe == "grid"
    assert snap.engine_alive is False
    assert snap.counts["done"] == 5 and snap.counts["failed"] == 1 and snap.total == 6
    assert [s.key for s in snap.slots] == ["here:0", "here:1"]
    assert sum(s.done for s in snap.slots) == 5 and sum(s.failed for s in snap.slots) == 1
    assert all(not s.running and s.util == () for s in snap.slots)
    # Results: the recipe's columns plus state, in the recipe's order (-score), failed row included.
    assert snap.columns == ("a", "b", "score", "state")
    assert [r["score"] for r in snap.results] == [60, 40, 30, 20, 20, 10]
    failed = [r for r in snap.results if r["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["a"] == 2 and failed[0]["b"] == 20
    assert Path(str(failed[0]["log"])).read_text().startswith("first line a=2")
    assert snap.stages[0].name == "sweep" and snap.stages[0].state == "failed"
    assert snap.plots[0].kind == "heatmap"
    # Each slot's log view starts with the last task that ran there, under a header line.
    for slot in snap.slots:
        lines = snap.log_lines[slot.key]
        assert lines[0].startswith("── a=") and lines[1].startswith("first line")
        assert reader.slot_lines(slot.key) == (list(lines), len(lines))
        assert slot.last_line.startswith("score: ")
    # The next snapshot brings no lines again: batches carry only what is new.
    assert reader.snapshot().log_lines == {}


def test_reader_counts_pins_per_slot_and_the_engine_lock(write_recipe: Writer, tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe = write_recipe("""
        name = "pins"
        [hosts.here]
        gpus = 2
        [[stage]]
        kind = "queue"
        placement = "round-robin"
        grid = { i = "1..4" }
        command = "true"
    """)
    run_engine(recipe, run)
    # Pretend the run is midway: two tasks queued again, one pinned to each slot by round-robin.
    with _writable(run) as journal:
        for row in journal.tasks():
            if row.idx >= 2:
                journal.set_task_state(row.id, "queued")
        journal.set_meta("state", "running")
        journal.set_meta("paused_slots", json.dumps(["here:1"]))
        journal.add_gpu_samples("here", [(0, 50.0, 1024.0, 8192.0)])
    lock = EngineLock(RunDir(run))
    lock.acquire()
    try:
        snap = RunReader(run).snapshot()
    finally:
        lock.release()
    assert snap.engine_alive is True and snap.engine_pid == os.getpid() and snap.state == "running"
    by_key = {s.key: s for s in snap.slots}
    assert by_key["here:0"].queued == 1 and not by_key["here:0"].shared_queue
    assert by_key["here:1"].queued == 1 and by_key["here:1"].paused and by_key["here:1"].state == "paused"
    assert by_key["here:0"].util == (50.0,) and by_key["here:0"].mem_total == 8192.0
    assert by_key["here:1"].util == ()
    # Without the lock the same journal reads as a run whose engine went away.
    assert RunReader(run).snapshot().state == "stopped"


class _writable:
    """A writable journal as a context manager (tests fake run states with it)."""

    def __init__(self, run: Path) -> None:
        self.journal = Journal(run / "journal.sqlite")

    def __enter__(self) -> Journal:
        return self.journal

    def __exit__(self, *exc: object) -> None:
        self.journal.close()


def test_engine_holder_reads_proc_locks_without_locking(tmp_path: Path) -> None:
    assert engine_holder(tmp_path) == (False, None)
    lock = EngineLock(RunDir(tmp_path))
    lock.acquire()
    try:
        assert engine_holder(tmp_path) == (True, os.getpid())
        # A lock held by another process is seen as well.
        code = ("import sys; from console.rundata import engine_holder; from pathlib import Path; "
                "print(engine_holder(Path(sys.argv[1])))")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                             check=True, cwd=REPO)
        assert out.stdout.strip() == f"(True, {os.getpid()})"
    finally:
        lock.release()
    assert engine_holder(tmp_path) == (False, None)


def test_reader_waits_for_a_journal(tmp_path: Path) -> None:
    snap = RunReader(tmp_path / "not-yet").snapshot()
    assert not snap.available and "waiting" in snap.problem


def test_rundata_does_not_load_textual() -> None:
    code = ("import sys, console.rundata, console.picker\n"
            "print(','.join(sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


# -- plot data and formatting --------------------------------------------------------------------------------


def test_heatmap_data_orders_numeric_axes_and_skips_missing_values() -> None:
    rows: list[dict[str, object]] = [
        {"w": 2, "l": 3, "tps": 10.0}, {"w": 1, "l": 3, "tps": 5.0}, {"w": 1, "l": 2, "tps": None},
        {"w": 10, "l": 2, "tps": 7},
    ]
    data = heatmap_data(rows, PlotSpec(kind="heatmap", x="w", y="l", value="tps"))
    assert data.xs == (1, 2, 10) and data.ys == (2, 3)
    assert data.cells == {(2, 3): 10.0, (1, 3): 5.0, (10, 2): 7.0}
    assert data.bounds == (5.0, 10.0)


def test_series_data_groups_and_keeps_the_last_value_per_x() -> None:
    rows: list[dict[str, object]] = [
        {"x": 2, "y": 4.0, "g": "a"}, {"x": 1, "y": 1.0, "g": "a"}, {"x": 1, "y": 3.0, "g": "b"},
        {"x": 1, "y": 2.0, "g": "a"},
    ]
    series = series_data(rows, PlotSpec(kind="line", x="x", y="y", group="g"))
    assert [(s.name, s.xs, s.ys) for s in series] == [("a", (1, 2), (2.0, 4.0)), ("b", (1,), (3.0,))]


def test_sparkline_and_durations() -> None:
    assert sparkline([0.0, 50.0, 100.0], 3, 0.0, 100.0) == "▁▅█"
    assert sparkline([None, 100.0], 4, 0.0, 100.0) == "   █"
    assert sparkline(list(range(100)), 5, 0.0, 99.0) == "█████"
    assert format_duration(5) == "5s" and format_duration(65) == "1m05s" and format_duration(3700) == "1h01m"
    assert format_duration(None) == ""


def test_picker_lists_recipes_with_errors_and_runs_newest_first(tmp_path: Path, write_recipe: Writer) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "good.toml").write_text('name = "good"\ndescription = "does things"\n[[stage]]\n'
                                       'kind = "queue"\ncommand = "true"\n')
    (recipes / "bad.toml").write_text('name = "bad"\n[[stage]]\nkind = "nope"\n')
    entries = find_recipes(recipes)
    assert [e.name for e in entries] == ["bad", "good"]
    assert entries[0].error is not None and "bad.toml" in entries[0].error
    assert entries[1].error is None and entries[1].description == "does things"
    runs = tmp_path / "runs"
    recipe = write_recipe('name = "r"\n[hosts.h]\ngpus = 1\n[[stage]]\nkind = "queue"\ncommand = "true"\n')
    run_engine(recipe, runs / "old")
    run_engine(recipe, runs / "new")
    os.utime(runs / "old" / "journal.sqlite", (1, 1))
    (runs / "not-a-run").mkdir()
    listed = find_runs(runs)
    assert [r.path.name for r in listed] == ["new", "old"]
    assert listed[0].state == "finished" and listed[0].done == 1 and listed[0].total == 1
