"""The engine end to end on the local host: real processes, real journal, real run directory."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from remote.engine import EngineError
from remote.events import TaskExited, TaskStarted
from remote.procfs import is_alive
from remote.rundir import EngineLock, RunDir, RunDirError
from tests.conftest import run_engine

Writer = Callable[..., Path]


def _runs(marks: Path) -> list[str]:
    """Executions recorded by the tasks themselves (one line per execution), not by the journal."""
    return marks.read_text().split() if marks.exists() else []


def test_queue_runs_every_cell_and_writes_results(write_recipe: Writer, tmp_path: Path) -> None:
    recipe = write_recipe("""
        name = "basic"
        [hosts.here]
        gpus = 2
        [[stage]]
        kind = "queue"
        name = "sweep"
        grid = { a = "1..3", b = [10, 20] }
        command = "sh -c 'echo a={a} b={b} gpu=$CUDA_VISIBLE_DEVICES arg={gpu}; echo score: $(({a} * {b}))'"
        [metrics]
        score = { regex = 'score: (\\d+)', type = "int" }
        gpu_seen = { regex = 'gpu=(\\d+)', type = "int" }
        arg_seen = { regex = 'arg=(\\d+)', type = "int" }
        [results]
        columns = ["a", "b", "score", "gpu", "gpu_seen", "arg_seen", "state"]
        sort = ["-score"]
    """)
    finished, _ = run_engine(recipe, tmp_path / "run")
    assert finished.counts["done"] == 6 and finished.counts["failed"] == 0
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["score"] for r in rows] == [60, 40, 30, 20, 20, 10]
    for r in rows:
        # The task saw its own slot both in CUDA_VISIBLE_DEVICES and in {gpu}.
        assert r["gpu_seen"] == r["gpu"] == r["arg_seen"]
        assert r["state"] == "done"
    csv = (tmp_path / "run" / "results.csv").read_text().splitlines()
    assert csv[0] == "a,b,score,gpu,gpu_seen,arg_seen,state"
    assert len(csv) == 7


def test_failed_task_does_not_stop_its_slot_queue(write_recipe: Writer, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    recipe = write_recipe(f"""
        name = "fails"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        placement = "round-robin"
        grid = {{ i = "1..5" }}
        command = "sh -c 'echo {{i}} >> {marks}; test {{i}} -ne 2'"
    """)
    finished, events = run_engine(recipe, tmp_path / "run")
    assert sorted(_runs(marks)) == ["1", "2", "3", "4", "5"]
    assert finished.counts["done"] == 4 and finished.counts["failed"] == 1
    failed = [e for e in events if isinstance(e, TaskExited) and e.state == "failed"]
    assert len(failed) == 1 and failed[0].label == "i=2" and failed[0].rc == 1


def test_retry_then_success_keeps_earlier_attempt_log(write_recipe: Writer, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    recipe = write_recipe(f"""
        name = "retry"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        retries = 2
        command = "sh -c 'if [ -e {flag} ]; then echo second try ok; else touch {flag}; echo first try; exit 3; fi'"
    """)
    finished, events = run_engine(recipe, tmp_path / "run")
    assert finished.counts["done"] == 1
    exits = [e for e in events if isinstance(e, TaskExited)]
    assert [(e.attempt, e.state) for e in exits] == [(1, "queued"), (2, "done")]
    logs = sorted(p.name for p in (tmp_path / "run" / "logs").iterdir())
    assert len(logs) == 2 and any(".attempt1." in n for n in logs)
    current = next(p for p in (tmp_path / "run" / "logs").iterdir() if ".attempt" not in p.name)
    assert current.read_text() == "second try ok\n"


def test_retries_exhausted_marks_failed(write_recipe: Writer, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    recipe = write_recipe(f"""
        name = "retry"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        retries = 2
        command = "sh -c 'echo x >> {marks}; exit 4'"
    """)
    finished, _ = run_engine(recipe, tmp_path / "run")
    assert finished.counts["failed"] == 1
    assert len(_runs(marks)) == 3


def test_halt_first_failure_stops_dispatch(write_recipe: Writer, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    recipe = write_recipe(f"""
        name = "halt"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        halt = "first-failure"
        grid = {{ i = "1..6" }}
        command = "sh -c 'echo {{i}} >> {marks}; test {{i}} -ne 2'"
        [[stage]]
        kind = "run"
        name = "after"
        command = "sh -c 'echo after >> {marks}'"
    """)
    finished, _ = run_engine(recipe, tmp_path / "run")
    assert _runs(marks) == ["1", "2"]
    assert finished.halted
    assert finished.counts["done"] == 1 and finished.counts["failed"] == 1 and finished.counts["queued"] == 5


def test_halt_after_n_failures(write_recipe: Writer, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    recipe = write_recipe(f"""
        name = "halt"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        halt = "2-failures"
        grid = {{ i = "1..8" }}
        command = "sh -c 'echo {{i}} >> {marks}; test $(({{i}} % 3)) -ne 0'"
    """)
    finished, _ = run_engine(recipe, tmp_path / "run")
    assert _runs(marks) == ["1", "2", "3", "4", "5", "6"]
    assert finished.halted and finished.counts["failed"] == 2


def test_timeout_kills_the_whole_process_group(write_recipe: Writer, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    recipe = write_recipe(f"""
        name = "timeout"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        timeout = 1
        command = "sh -c 'sleep 60 & echo $! > {pids}; wait'"
    """)
    t0 = time.monotonic()
    finished, events = run_engine(recipe, tmp_path / "run")
    assert time.monotonic() - t0 < 20
    assert finished.counts["failed"] == 1
    exited = next(e for e in events if isinstance(e, TaskExited))
    assert exited.reason.startswith("timed out after 1s")
    grandchild = int(pids.read_text())
    assert not is_alive(grandchild)


def test_done_regex_required_for_success(write_recipe: Writer, tmp_path: Path) -> None:
    recipe = write_recipe("""
        name = "done"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        grid = { i = [1, 2] }
        done = "^Tokens/second"
        command = "sh -c 'test {i} -eq 1 && echo Tokens/second 3.5; exit 0'"
    """)
    finished, events = run_engine(recipe, tmp_path / "run")
    assert finished.counts["done"] == 1 and finished.counts["failed"] == 1
    failed = next(e for e in events if isinstance(e, TaskExited) and e.state == "failed")
    assert "no line matched done" in failed.reason


def test_preflight_refuses_to_start_with_a_missing_program(write_recipe: Writer, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    recipe = write_recipe(f"""
        name = "missing"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        command = "sh -c 'echo ran >> {marks}'"
        [[stage]]
        kind = "run"
        command = "definitely-not-a-program-xyz --flag"
        [[stage]]
        kind = "run"
        name = "elsewhere"
        workdir = "/no/such/dir"
        command = "true"
    """)
    with pytest.raises(EngineError) as info:
        run_engine(recipe, tmp_path / "run")
    lines = str(info.value).splitlines()
    assert lines == [
        "host here: stage run: program definitely-not-a-program-xyz is not on PATH; install it there or fix the "
        "recipe (or set preflight = false if an earlier stage creates it)",
        "host here: stage elsewhere: working directory /no/such/dir does not exist; install it there or fix the "
        "recipe (or set preflight = false if an earlier stage creates it)",
    ]
    assert not marks.exists(), "nothing ran: the campaign does not start half-way"


def test_missing_program_without_preflight_is_a_clear_failure(write_recipe: Writer, tmp_path: Path) -> None:
    recipe = write_recipe("""
        name = "missing"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        preflight = false
        command = "definitely-not-a-program-xyz --flag"
    """)
    finished, events = run_engine(recipe, tmp_path / "run")
    exited = next(e for e in events if isinstance(e, TaskExited))
    assert exited.rc == 127 and "program not found" in exited.reason
    assert finished.counts["failed"] == 1


def test_log_copy_is_byte_exact_and_progress_is_tracked(write_recipe: Writer, tmp_path: Path) -> None:
    script = tmp_path / "tqdm.py"
    script.write_text(
        "import sys, time\n"
        "for k in range(1, 6):\n"
        "    sys.stderr.write(f'\\rGenerating: {k}/5'); sys.stderr.flush(); time.sleep(0.05)\n"
        "sys.stderr.write('\\n')\n"
        "print('héllo wörld')\n"
        "print('Tokens/second   12.5')\n"
    )
    recipe = write_recipe(f"""
        name = "logs"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        command = "{{python}} {script}"
        done = "^Tokens/second"
        [metrics]
        tps = '^Tokens/second\\s+([\\d.]+)'
    """)
    finished, _ = run_engine(recipe, tmp_path / "run")
    assert finished.counts["done"] == 1
    run = tmp_path / "run"
    (log,) = list((run / "logs").iterdir())
    state_out = next((run / "state" / "here").glob("*/out"))
    assert log.read_bytes() == state_out.read_bytes()
    assert b"\rGenerating: 3/5" in log.read_bytes()
    db = sqlite3.connect(run / "journal.sqlite")
    progress = db.execute("SELECT progress_done, progress_total FROM tasks").fetchone()
    assert progress == (5, 5)
    offset = db.execute("SELECT out_offset FROM attempts").fetchone()[0]
    assert offset == log.stat().st_size
    tps = db.execute("SELECT value FROM metrics WHERE name='tps'").fetchone()[0]
    assert json.loads(tps) == 12.5


def test_run_directory_is_private(write_recipe: Writer, tmp_path: Path) -> None:
    recipe = write_recipe("""
        name = "private"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        command = "true"
        env = { TOKEN = "s3cret" }
    """)
    run_engine(recipe, tmp_path / "run")
    run = tmp_path / "run"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    for name in ("journal.sqlite", "recipe.toml", "results.csv", "results.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o600, name
    env_file = next((run / "state" / "here").glob("*/env"))
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert (run / "recipe.toml").read_text() == recipe.read_text()


def test_secret_env_never_on_the_command_line(write_recipe: Writer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cmdlines"
    monkeypatch.setenv("HF_TOKEN", "hf_s3cret_value")
    recipe = write_recipe(f"""
        name = "secret"
        secrets = ["HF_TOKEN"]
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        command = '''sh -c 'echo token=$(printf %s "$HF_TOKEN" | md5sum);
                     cat /proc/[0-9]*/cmdline | tr "\\0" " " > {out}' '''
        [metrics]
        token = {{ regex = 'token=(\\S+)', type = "str" }}
    """)
    finished, _ = run_engine(recipe, tmp_path / "run")
    assert finished.counts["done"] == 1
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rows[0]["token"] == hashlib.md5(b"hf_s3cret_value").hexdigest()
    assert "hf_s3cret_value" not in out.read_text()
    # Nor in the journal or the recipe copy: only the name travels with the run.
    run = tmp_path / "run"
    assert b"hf_s3cret_value" not in (run / "journal.sqlite").read_bytes()
    assert "hf_s3cret_value" not in (run / "recipe.toml").read_text()


def test_missing_secret_is_a_preflight_error(write_recipe: Writer, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BF_ABSENT_TOKEN", raising=False)
    recipe = write_recipe("""
        name = "secret"
        secrets = ["BF_ABSENT_TOKEN"]
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        command = "true"
    """)
    with pytest.raises(EngineError, match="secret BF_ABSENT_TOKEN is not set"):
        run_engine(recipe, tmp_path / "run")


def test_resume_skips_finished_cells_even_when_grid_reordered_and_extended(write_recipe: Writer,
                                                                          tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    body = """
        name = "resume"
        [hosts.here]
        gpus = 2
        [[stage]]
        kind = "queue"
        grid = {{ i = {grid} }}
        command = "sh -c 'echo {{i}} >> {marks}'"
    """
    recipe = write_recipe(body.format(grid='"1..3"', marks=marks))
    run_engine(recipe, tmp_path / "run")
    assert sorted(_runs(marks)) == ["1", "2", "3"]
    recipe = write_recipe(body.format(grid="[4, 3, 2, 1, 5]", marks=marks))
    finished, _ = run_engine(recipe, tmp_path / "run", resume=True)
    assert sorted(_runs(marks)) == ["1", "2", "3", "4", "5"]
    assert finished.counts["done"] == 5
    # The earlier recipe is kept beside the new one.
    assert len(list((tmp_path / "run").glob("recipe.*.toml"))) == 1


def test_resume_adopts_tasks_left_running(write_recipe: Writer, tmp_path: Path) -> None:
    """A run interrupted mid-task leaves no zombie state: the next engine reruns only what did not finish."""
    marks = tmp_path / "marks"
    recipe = write_recipe(f"""
        name = "adopt"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        grid = {{ i = "1..3" }}
        command = "sh -c 'echo {{i}} >> {marks}; sleep 0.2'"
    """)
    finished, events = run_engine(recipe, tmp_path / "run")
    assert finished.counts["done"] == 3
    started = [e for e in events if isinstance(e, TaskStarted)]
    assert len(started) == 3
    finished2, events2 = run_engine(recipe, tmp_path / "run", resume=True)
    assert finished2.counts["done"] == 3
    assert not [e for e in events2 if isinstance(e, TaskStarted)]
    assert sorted(_runs(marks)) == ["1", "2", "3"]


def test_two_engines_cannot_share_a_run_directory(write_recipe: Writer, tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    first = EngineLock(rd)
    first.acquire()
    try:
        second = EngineLock(rd)
        try:
            second.acquire()
        except RunDirError as exc:
            assert f"engine pid {os.getpid()}" in str(exc)
        else:
            raise AssertionError("a second engine got the lock")
    finally:
        first.release()
