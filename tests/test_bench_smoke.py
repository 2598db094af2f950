"""The benchmark scripts run end to end at tiny sizes, print their tables and JSON, and leave no files behind.

Timings are never asserted, except that a measured makespan cannot beat the schedule's lower bound (which would
mean tasks were skipped, not that a tool is fast).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.makespan import POLICIES, Cell, lower_bound, simulate

REPO = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch)}
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          env=env, cwd=tmp, timeout=120, check=False)


def test_dispatch_overhead_prints_every_tool_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "dispatch.json"
    proc = run_bench("dispatch_overhead.py", "--tasks", "6", "--slots", "2", "--repeat", "1", "--json", str(out),
                     tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("benchfleet --recipe (whole command)", "engine in-process: first TaskStarted to RunFinished",
                 "GNU parallel -j2", "bash FIFOs (run.bash style, md5)"):
        assert name in proc.stdout
    assert "vs parallel" in proc.stdout and "peak RSS MiB" in proc.stdout
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert data["params"] == {"tasks": 6, "slots": 2, "repeat": 1}
    assert all(len(r["seconds"]) == 1 and r["median_s"] > 0 for r in rows.values())
    assert rows["bash FIFOs (run.bash style, md5)"]["vs_bash"] == 1.0
    if os.access("/usr/bin/time", os.X_OK):  # the RSS column comes from GNU time
        assert rows["benchfleet --recipe (whole command)"]["peak_rss_mib"] > 5  # a Python process, not GNU time's
    assert list((tmp_path / "scratch").iterdir()) == []


def test_makespan_measures_every_policy_no_faster_than_the_bound(tmp_path: Path) -> None:
    out = tmp_path / "makespan.json"
    proc = run_bench("makespan.py", "--width", "3", "--length", "2", "--slots", "2", "--repeat", "1", "--json",
                     str(out), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "lower bound" in proc.stdout
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == [p.name for p in POLICIES]
    assert data["durations_s"] == [0.025, 0.05, 0.05, 0.1, 0.075, 0.15]
    for row in data["rows"]:
        assert row["median_s"] >= data["lower_bound_s"] * 0.95, row["name"]
        assert row["median_s"] >= row["simulated_s"] * 0.95 or row["placement"] == "free-slot", row["name"]
    assert list((tmp_path / "scratch").iterdir()) == []


def test_simulated_schedules_follow_each_policy() -> None:
    cells = [Cell(1, n, s) for n, s in enumerate([1.0, 1.0, 1.0, 1.0, 4.0], start=1)]
    by_name = {p.name: p for p in POLICIES}
    assert lower_bound(cells, 2) == 4.0
    assert simulate(cells, 2, by_name["benchfleet free-slot (grid order)"]) == 6.0  # the 4 s task starts last
    assert simulate(cells, 2, by_name["benchfleet free-slot, longest-first"]) == 4.0
    assert simulate(cells, 2, by_name["benchfleet round-robin"]) == 6.0  # slot 0: 1 + 1 + 4


def test_bad_sizes_get_one_line_and_no_run(tmp_path: Path) -> None:
    proc = run_bench("dispatch_overhead.py", "--tasks", "0", tmp=tmp_path)
    assert proc.returncode == 2
    assert "--tasks, --slots and --repeat must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr
