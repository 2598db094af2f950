"""Snapshots of the main screens at fixed sizes, compared as plain text with golden files in tests/snapshots/.

The run is built directly in a journal with fixed timestamps (and the console's clock fixed), so every frame
is reproducible. After an intended change, regenerate the goldens and review the diff:

    BENCHFLEET_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_console_snapshots.py
"""

from __future__ import annotations

import itertools
import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from console.app import BenchfleetApp
from remote.journal import Journal
from remote.rundir import EngineLock, RunDir, prepare
from tests.test_console_app import screen_text, until

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("BENCHFLEET_UPDATE_SNAPSHOTS") == "1"

T0 = 1_750_000_000.0
"""When the synthetic run was created; the console's clock reads T0 + NOW."""
NOW = 754.0
RUN_NAME = "quickstart-20250615-120000"

RECIPE = """\
name = "quickstart"
description = "ReDrafter-style beam grid on two GPU hosts"
[hosts.gpu-a]
ssh = "gpu-a"
[hosts.gpu-b]
ssh = "gpu-b"
[[stage]]
kind = "queue"
name = "sweep"
grid = { beam_width = "1..4", beam_length = "2..5" }
command = "python3 generate.py --beam_width={beam_width} --beam_length={beam_length}"
done = "^Tokens/second"
[metrics]
tokens_per_sec = '^Tokens/second\\s+([\\d.]+)'
[results]
columns = ["beam_width", "beam_length", "tokens_per_sec"]
sort = ["beam_width", "beam_length"]
[[plot]]
kind = "heatmap"
title = "tokens/s over beam width x beam length"
x = "beam_width"
y = "beam_length"
value = "tokens_per_sec"
"""

SLOTS = [f"gpu-a:{g}" for g in range(4)] + [f"gpu-b:{g}" for g in range(4)]


def _build_run(base: Path) -> Path:
    """A campaign twelve minutes in: 8 cells done, 1 failed, 6 running, 1 queued; one slot paused."""
    run = base / RUN_NAME
    rd = prepare(run, resume=False)
    (run / "recipe.toml").write_text(RECIPE)
    journal = Journal(rd.journal)
    journal.set_meta("recipe", "quickstart")
    journal.set_meta("created", str(T0))
    journal.set_meta("state", "running")
    journal.set_meta("slots", json.dumps(SLOTS))
    journal.set_meta("slot_names", json.dumps({k: "NVIDIA H100 80GB HBM3" for k in SLOTS}))
    journal.set_meta("paused_slots", json.dumps(["gpu-b:3"]))
    journal.set_meta("queue_paused", "0")
    journal.set_meta("hosts_offline", "[]")
    cells = [(w, length) for w in range(1, 5) for length in range(2, 6)]
    plan: list[tuple[str, str, int | None, float, float | None]] = []
    # (state, slot, None, started offset, ended offset) per cell, in grid order
    done_slots = ["gpu-a:0", "gpu-a:1", "gpu-a:2", "gpu-a:3", "gpu-b:0", "gpu-b:1", "gpu-b:3", "gpu-b:3"]
    for i, slot in enumerate(done_slots):
        plan.append(("done", slot, None, 60.0 + 40 * i, 300.0 + 40 * i))
    plan.append(("failed", "gpu-b:2", None, 420.0, 431.0))
    running = ["gpu-a:0", "gpu-a:1", "gpu-a:2", "gpu-a:3", "gpu-b:0", "gpu-b:1"]
    for i, slot in enumerate(running):
        plan.append(("running", slot, None, 600.0 + 17 * i, None))
    plan.append(("queued", "", None, 0.0, None))
    for idx, ((width, length), (state, slot, _, start, end)) in enumerate(zip(cells, plan, strict=True)):
        task_id = f"{idx:016x}"
        label = f"beam_width={width} beam_length={length}"
        log_name = f"sweep.beam_width={width}.beam_length={length}-{task_id[:8]}"
        journal.upsert_task(task_id=task_id, stage="sweep", idx=idx, label=label, log_name=log_name,
                            values={"beam_width": width, "beam_length": length}, argv=["python3"], env={})
        if state == "queued":
            continue
        host, _, gpu = slot.partition(":")
        journal.begin_attempt(task_id=task_id, attempt=1, host=host, gpu=int(gpu), name=f"{task_id}.1")
        tps = round(40 + 9.5 * width - 2.25 * length + 0.1 * idx, 1)
        lines = [f"Loading tiny-target on cuda:{gpu}", "Generating: 80/80 [00:41<00:00, 1.93it/s]",
                 "Average number of tokens per step: 1.882353", f"Tokens/second {tps}"]
        if state == "failed":
            lines = [f"Loading tiny-target on cuda:{gpu}", "RuntimeError: CUDA error: out of memory"]
        elif state == "running":
            progress = f"Generating: {20 + 9 * idx % 50}/80 [00:21<00:24]"
            lines = [f"Loading tiny-target on cuda:{gpu}", progress]
        (rd.logs / f"{log_name}.log").write_text("\n".join(lines) + "\n")
        fields: dict[str, object] = {"started": T0 + start, "attempts": 1, "host": host, "gpu": int(gpu)}
        if state != "running":
            fields.update(ended=T0 + (end or start), rc=0 if state == "done" else 1,
                          reason="exit 0" if state == "done" else "exit 1", last_line=lines[-1])
            journal.set_metrics(task_id, {"tokens_per_sec": tps} if state == "done" else {})
        journal.set_task_state(task_id, state, **fields)
    for n in range(24):
        journal.add_gpu_samples("gpu-a", [(g, float((n * 7 + g * 13) % 60 + 35), 30000.0 + 900 * g + 150 * n,
                                             81559.0) for g in range(4)])
        busy = [(g, float((n * 11 + g * 5) % 70 + 20), 18000.0 + 2000 * g, 81559.0) for g in range(2)]
        journal.add_gpu_samples("gpu-b", [*busy, *((g, 0.0, 600.0, 81559.0) for g in range(2, 4))])
    journal.close()
    return run


@pytest.fixture
def live_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The synthetic run, opened by a relative path (so no temporary path shows up on screen), engine lock
    held by this process so the run reads as live."""
    run = _build_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    lock = EngineLock(RunDir(run))
    lock.acquire()
    try:
        yield Path(RUN_NAME)
    finally:
        lock.release()


def assert_snapshot(name: str, text: str) -> None:
    """Compare with tests/snapshots/NAME.txt (trailing spaces ignored); BENCHFLEET_UPDATE_SNAPSHOTS=1
    rewrites it."""
    actual = "\n".join(line.rstrip() for line in text.splitlines()).rstrip() + "\n"
    golden = SNAPSHOTS / f"{name}.txt"
    if UPDATE or not golden.exists():
        SNAPSHOTS.mkdir(exist_ok=True)
        golden.write_text(actual)
        if not UPDATE:
            pytest.fail(f"{golden} did not exist; written now, review it and run again")
        return
    expected = golden.read_text()
    if actual != expected:
        pairs = itertools.zip_longest(expected.splitlines(), actual.splitlines(), fillvalue="")
        diff = "\n".join(f"- {e}\n+ {a}" for e, a in pairs if e != a)
        pytest.fail(f"{name}: the screen differs from {golden} (BENCHFLEET_UPDATE_SNAPSHOTS=1 accepts it):\n"
                    f"{diff}")


async def _snapshot(run: Path, size: tuple[int, int], keys: tuple[str, ...], name: str) -> None:
    app = BenchfleetApp(run, refresh_interval=60.0, clock=lambda: T0 + NOW)
    async with app.run_test(size=size) as pilot:
        await until(pilot, lambda: app.snapshots >= 1 and "12m34s" in screen_text(app), "the first frame")
        for key in keys:
            await pilot.press(key)
        await pilot.pause(0.2)
        await pilot.wait_for_scheduled_animations()
        assert_snapshot(name, screen_text(app))


async def test_fleet_80x24(live_run: Path) -> None:
    await _snapshot(live_run, (80, 24), (), "fleet_80x24")


async def test_fleet_200x50(live_run: Path) -> None:
    await _snapshot(live_run, (200, 50), (), "fleet_200x50")


async def test_logs_80x24(live_run: Path) -> None:
    await _snapshot(live_run, (80, 24), ("down", "down", "enter"), "logs_80x24")


async def test_merged_logs_120x30(live_run: Path) -> None:
    await _snapshot(live_run, (120, 30), ("2", "m"), "merged_logs_120x30")


async def test_results_80x24(live_run: Path) -> None:
    await _snapshot(live_run, (80, 24), ("3",), "results_80x24")


async def test_plots_100x30(live_run: Path) -> None:
    await _snapshot(live_run, (100, 30), ("4",), "plots_100x30")


async def test_picker_80x24(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "quickstart.toml").write_text(RECIPE)
    (tmp_path / "recipes" / "broken.toml").write_text(textwrap.dedent("""\
        name = "broken"
        [[stage]]
        kind = "queue"
        command = "echo {nope}"
    """))
    _build_run(tmp_path / "runs")
    os.utime(tmp_path / "runs" / RUN_NAME / "journal.sqlite", (T0 + NOW, T0 + NOW))
    monkeypatch.chdir(tmp_path)
    app = BenchfleetApp(None, clock=lambda: T0 + NOW)
    async with app.run_test(size=(80, 24)) as pilot:
        # Both lists fill in the background: wait for the recipes (with the broken one's error) and the runs.
        await until(pilot, lambda: all(s in screen_text(app) for s in ("quickstart-20250615", "unknown placeholder",
                                                                        "ReDrafter-style beam grid")),
                    "the picker's lists")
        assert_snapshot("picker_80x24", screen_text(app))
