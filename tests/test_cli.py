"""The `benchfleet` command as a user runs it: exit codes, one-line errors, crashes, Ctrl-C, --detach, check."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from remote.procfs import is_alive
from tests.conftest import cli, cli_popen, wait_for

Writer = Callable[..., Path]

SLOW_GRID = """
    name = "crash"
    [hosts.here]
    gpus = 2
    [[stage]]
    kind = "queue"
    grid = {{ i = "1..8" }}
    command = "sh -c 'echo start {{i}} >> {marks}; sleep $(cat {sleep}); echo line {{i}}; echo {{i}} >> {done}'"
    [metrics]
    line = {{ regex = 'line (\\d+)', type = "int" }}
"""


def _sleep_file(tmp_path: Path, seconds: float) -> Path:
    """Task duration read at run time, so a test can shorten it without changing the tasks' content hash."""
    path = tmp_path / "sleep"
    path.write_text(f"{seconds}\n")
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_recipe_error_is_one_line_with_exit_2(write_recipe: Writer, tmp_path: Path) -> None:
    recipe = write_recipe("""
        name = "bad"
        [[stage]]
        kind = "queue"
        grid = { beam_width = "1..x" }
        command = "echo {beam_width}"
    """)
    result = cli("--recipe", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert str(recipe) in lines[0] and ":5:" in lines[0] and "beam_width" in lines[0]
    assert not (tmp_path / "run").exists()


def test_missing_recipe_file_is_one_line(tmp_path: Path) -> None:
    result = cli("--recipe", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot read the recipe" in result.stderr


def test_exit_status_reflects_failures(write_recipe: Writer, tmp_path: Path) -> None:
    ok = write_recipe('name = "ok"\n[hosts.h]\ngpus = 1\n[[stage]]\nkind = "queue"\ncommand = "true"\n', "ok.toml")
    bad = write_recipe('name = "bad"\n[hosts.h]\ngpus = 1\n[[stage]]\nkind = "queue"\ncommand = "false"\n', "b.toml")
    r_ok = cli("--recipe", str(ok), "--run-dir", str(tmp_path / "ok"))
    r_bad = cli("--recipe", str(bad), "--run-dir", str(tmp_path / "bad"))
    assert r_ok.returncode == 0, r_ok.stdout + r_ok.stderr
    assert r_bad.returncode == 1
    assert "results:" in r_ok.stdout and "run directory:" in r_ok.stdout
    assert "failed: " in r_bad.stdout


def test_existing_run_dir_needs_resume(write_recipe: Writer, tmp_path: Path) -> None:
    ok = write_recipe('name = "ok"\n[hosts.h]\ngpus = 1\n[[stage]]\nkind = "queue"\ncommand = "true"\n')
    assert cli("--recipe", str(ok), "--run-dir", str(tmp_path / "run")).returncode == 0
    again = cli("--recipe", str(ok), "--run-dir", str(tmp_path / "run"))
    assert again.returncode == 3 and "--resume" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigkilled_engine_resumes_and_runs_every_task_exactly_once(write_recipe: Writer, tmp_path: Path) -> None:
    marks, done = tmp_path / "marks", tmp_path / "done"
    recipe = write_recipe(SLOW_GRID.format(marks=marks, done=done, sleep=_sleep_file(tmp_path, 1.0)))
    run = tmp_path / "run"
    engine = cli_popen("--recipe", str(recipe), "--run-dir", str(run))
    # Kill it while tasks run on both slots and some already finished.
    midway = wait_for(lambda: len(_lines(done)) >= 2 and len(_lines(marks)) >= 4)
    assert midway, "timed out waiting for: 2 tasks done and 4 started"
    os.kill(engine.pid, signal.SIGKILL)
    engine.wait()
    running_then = len(_lines(marks)) - len(_lines(done))
    assert running_then >= 1
    result = cli("--recipe", str(recipe), "--run-dir", str(run), "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    starts = sorted(line.split()[1] for line in _lines(marks))
    assert starts == sorted(str(i) for i in range(1, 9)), "every task ran exactly once"
    assert sorted(_lines(done)) == sorted(str(i) for i in range(1, 9))
    rows = json.loads((run / "results.json").read_text())
    assert sorted(r["line"] for r in rows) == list(range(1, 9))
    # Adopted tasks' logs are complete: exactly the lines the task printed.
    for log in (run / "logs").iterdir():
        assert log.read_text().count("line ") == 1, log.name


@pytest.mark.slow
def test_ctrl_c_kills_running_groups_and_resume_finishes(write_recipe: Writer, tmp_path: Path) -> None:
    marks, done = tmp_path / "marks", tmp_path / "done"
    sleep = _sleep_file(tmp_path, 30)
    recipe = write_recipe(SLOW_GRID.format(marks=marks, done=done, sleep=sleep))
    run = tmp_path / "run"
    engine = cli_popen("--recipe", str(recipe), "--run-dir", str(run))
    assert wait_for(lambda: len(_lines(marks)) >= 2), "timed out waiting for: 2 tasks started"
    db = sqlite3.connect(run / "journal.sqlite")
    running = "SELECT COUNT(*) FROM attempts WHERE state='running'"
    assert wait_for(lambda: db.execute(running).fetchone()[0] == 2), "timed out waiting for: 2 running attempts"
    pids = [r[0] for r in db.execute("SELECT pid FROM attempts WHERE state='running'")]
    os.kill(engine.pid, signal.SIGINT)
    out, _ = engine.communicate(timeout=60)
    assert engine.returncode == 130, out
    assert "--resume" in out
    for pid in pids:
        assert not is_alive(pid)
    states = dict(db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall())
    assert states == {"queued": 8}
    interrupted = db.execute("SELECT COUNT(*) FROM attempts WHERE state='interrupted'").fetchone()[0]
    assert interrupted == 2
    db.close()
    _sleep_file(tmp_path, 0.01)
    result = cli("--recipe", str(recipe), "--run-dir", str(run), "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(_lines(done)) == sorted(str(i) for i in range(1, 9))
    # The two interrupted tasks started twice (killed, then rerun); every other task once.
    starts = [line.split()[1] for line in _lines(marks)]
    assert len(starts) == 10 and sorted(set(starts)) == sorted(str(i) for i in range(1, 9))


@pytest.mark.slow
def test_detach_runs_in_background_and_logs_to_run_dir(write_recipe: Writer, tmp_path: Path) -> None:
    marks, done = tmp_path / "marks", tmp_path / "done"
    recipe = write_recipe(SLOW_GRID.format(marks=marks, done=done, sleep=_sleep_file(tmp_path, 0.05)))
    run = tmp_path / "run"
    result = cli("--recipe", str(recipe), "--run-dir", str(run), "--detach")
    assert result.returncode == 0
    assert str(run) in result.stdout
    finished = wait_for(lambda: len(_lines(done)) == 8 and not (run / "engine.pid").exists(), timeout=60)
    assert finished, "timed out waiting for: the detached engine to run all 8 tasks and exit"
    log = (run / "engine.log").read_text()
    assert "stage queue finished" in log
    assert (run / "results.csv").exists()


def test_check_prints_plan_with_slots(write_recipe: Writer) -> None:
    recipe = write_recipe("""
        name = "plan"
        [hosts.a]
        gpus = 2
        [hosts.b]
        gpus = "auto"
        ssh = "b.example"
        [[stage]]
        kind = "queue"
        placement = "md5"
        key = "{beam_length}-{beam_width}"
        grid = { beam_length = "2..3", beam_width = "1..2" }
        command = "echo {beam_width} {beam_length} {gpu}"
    """)
    no_gpus = cli("check", str(recipe))
    assert no_gpus.returncode == 3 and "--assume-gpus" in no_gpus.stderr
    result = cli("check", str(recipe), "--assume-gpus", "2", "--all")
    assert result.returncode == 0, result.stderr
    assert "4 task(s) over 4 slot(s)" in result.stdout
    for slot in ("a:0", "a:1", "b:0", "b:1"):
        assert slot in result.stdout


def test_relative_run_dir_with_tasks_in_another_working_directory(write_recipe: Writer, tmp_path: Path) -> None:
    """The README's main job: `runs/...` is relative to the caller, the tasks run in the recipe's folder."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    recipe = write_recipe(f"""
        name = "rel"
        [hosts.here]
        gpus = 2
        workdir = "{work}"
        [[stage]]
        kind = "queue"
        grid = {{ i = "1..4" }}
        command = "sh -c 'pwd; echo i={{i}}'"
        [metrics]
        i_seen = {{ regex = 'i=(\\d+)', type = "int" }}
    """)
    caller = tmp_path / "caller"
    caller.mkdir()
    result = cli("--recipe", str(recipe), "--run-dir", "runs/rel", cwd=caller)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((caller / "runs" / "rel" / "results.json").read_text())
    assert sorted(r["i_seen"] for r in rows) == [1, 2, 3, 4]
    for log in (caller / "runs" / "rel" / "logs").iterdir():
        assert log.read_text().splitlines()[0] == str(work)
