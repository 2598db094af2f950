"""Service stages, captures, trials (matrix) and fetching, on the local host with real processes and ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from remote.events import EngineNote
from remote.journal import Journal
from remote.plan import build_plan
from remote.procfs import is_alive
from remote.recipe_loader import RecipeError, load_recipe
from remote.slots import declared_slots
from remote.stages.ray_stage import parse_ray_status
from remote.stages.service_stage import choose_initial_peer
from tests.conftest import REPO, cli, cli_popen, free_port, run_engine

Writer = Callable[..., Path]
SERVICE = REPO / "tests" / "workloads" / "tiny_service.py"




def _service_pids(run: Path) -> list[int]:
    j = Journal(run / "journal.sqlite", readonly=True)
    try:
        rows = j._db.execute("SELECT pid FROM attempts a JOIN tasks t ON t.id = a.task_id WHERE t.stage='svc'")
        return [int(r[0]) for r in rows if r[0] is not None]
    finally:
        j.close()


def test_service_ready_by_port_captures_value_and_is_torn_down(write_recipe: Writer, tmp_path: Path) -> None:
    port = free_port()
    recipe = write_recipe(f"""
        name = "svc"
        [hosts.here]
        gpus = 2
        [[stage]]
        kind = "service"
        name = "svc"
        command = "{{python}} {SERVICE} --port {port} --token tok-A --delay 0.3"
        ready = {{ port = {port}, timeout = "20s" }}
        capture = {{ peer = '--peer (\\S+)' }}
        [[stage]]
        kind = "queue"
        name = "client"
        grid = {{ i = [1, 2, 3] }}
        command = "sh -c 'echo peer={{svc.peer}} i={{i}}'"
        [metrics]
        peer_seen = {{ regex = 'peer=(\\S+)', type = "str", stage = "client" }}
        [results]
        columns = ["i", "peer_seen", "state"]
        sort = ["i"]
    """)
    finished, events = run_engine(recipe, tmp_path / "run")
    assert finished.counts["done"] == 3, [e for e in events if isinstance(e, EngineNote)]
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["peer_seen"] for r in rows] == [f"tcp://127.0.0.1:{port}/tok-A"] * 3
    pids = _service_pids(tmp_path / "run")
    assert pids and not any(is_alive(p) for p in pids), "the service survived its trial"
    j = Journal(tmp_path / "run" / "journal.sqlite", readonly=True)
    states = {t.stage: t.state for t in j.tasks()}
    assert states["svc"] == "stopped"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the port is still open after teardown"


def test_service_dying_mid_trial_fails_the_trial_clearly(write_recipe: Writer, tmp_path: Path) -> None:
    port = free_port()
    marks = tmp_path / "marks"
    recipe = write_recipe(f"""
        name = "svcdie"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "service"
        name = "svc"
        command = "{{python}} {SERVICE} --port {port} --die-after 1.5"
        ready = {{ log = 'serving', timeout = "20s" }}
        [[stage]]
        kind = "queue"
        name = "client"
        grid = {{ i = "1..5" }}
        command = "sh -c 'echo {{i}} >> {marks}; sleep 1'"
    """)
    finished, events = run_engine(recipe, tmp_path / "run")
    notes = [e.text for e in events if isinstance(e, EngineNote) and e.level == "error"]
    assert any("service svc on here exited (exit 3) while the trial ran" in n and "dying on purpose" in n
               for n in notes), notes
    assert len(marks.read_text().split()) < 5, "the trial went on after its service died"
    assert finished.counts["failed"] >= 1


def test_service_never_ready_times_out_with_what_was_missing(write_recipe: Writer, tmp_path: Path) -> None:
    recipe = write_recipe(f"""
        name = "svcslow"
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "service"
        name = "svc"
        command = "{{python}} {SERVICE} --port {free_port()}"
        ready = {{ log = 'never printed', timeout = "1s" }}
        [[stage]]
        kind = "run"
        command = "true"
    """)
    finished, events = run_engine(recipe, tmp_path / "run")
    notes = [e.text for e in events if isinstance(e, EngineNote) and e.level == "error"]
    assert any("service svc on here was not ready after 1s (waiting for a line matching 'never printed')" in n
               for n in notes), notes
    assert finished.counts["failed"] >= 1
    assert not any(is_alive(p) for p in _service_pids(tmp_path / "run"))


def test_matrix_runs_every_stage_per_trial_and_tags_results(write_recipe: Writer, tmp_path: Path) -> None:
    recipe = write_recipe("""
        name = "matrix"
        [matrix]
        setup = ["fast", "slow"]
        [hosts.here]
        gpus = 1
        [[stage]]
        kind = "queue"
        grid = { i = [1, 2] }
        command = "sh -c 'echo setup={setup} i={i}'"
        [metrics]
        seen = { regex = 'setup=(\\S+)', type = "str" }
        [results]
        columns = ["setup", "i", "seen"]
        sort = ["setup", "i"]
    """)
    finished, _ = run_engine(recipe, tmp_path / "run")
    assert finished.counts["done"] == 4
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(r["setup"], r["i"], r["seen"]) for r in rows] == [
        ("fast", 1, "fast"), ("fast", 2, "fast"), ("slow", 1, "slow"), ("slow", 2, "slow")]


def test_fetch_copies_files_and_extracts_metrics(write_recipe: Writer, tmp_path: Path) -> None:
    out = tmp_path / "work"
    out.mkdir()
    recipe = write_recipe(f"""
        name = "fetch"
        [[trial]]
        name = "a"
        b = 1
        [[trial]]
        name = "c"
        b = 4
        [hosts.here]
        gpus = 1
        workdir = "{out}"
        [[stage]]
        kind = "run"
        command = "sh -c 'printf \\"%s\\\\t%s\\\\n\\" {{b}} 9.5 > out-{{b}}.tsv'"
        [[stage]]
        kind = "fetch"
        files = ["out-{{b}}.tsv"]
        [metrics]
        batch = {{ file = "out-{{b}}.tsv", regex = '^(\\d+)\\t', type = "int", stage = "fetch" }}
        throughput = {{ file = "out-{{b}}.tsv", regex = '\\t([\\d.]+)$', stage = "fetch" }}
        [results]
        columns = ["name", "b", "batch", "throughput"]
        sort = ["b"]
    """)
    finished, _ = run_engine(recipe, tmp_path / "run")
    assert finished.counts["failed"] == 0
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(r["name"], r["batch"], r["throughput"]) for r in rows] == [("a", 1, 9.5), ("c", 4, 9.5)]
    fetched = tmp_path / "run" / "fetched"
    assert (fetched / "a" / "here" / "out-1.tsv").read_text() == "1\t9.5\n"
    assert (fetched / "c" / "here" / "out-4.tsv").read_text() == "4\t9.5\n"


def test_parsers_for_cluster_outputs() -> None:
    status = """======== Autoscaler status: 2026-11-22 ========
Node status
---------------------------------------------------------------
Active:
 1 node_0a1b2c3d4e5f
 1 node_9f8e7d6c5b4a
Pending:
 (no pending nodes)
Recent failures:
 (no failures)

Resources
---------------------------------------------------------------
Usage:
 0.0/8.0 CPU
 0.0/8.0 GPU
 0B/1.00GiB memory
"""
    assert parse_ray_status(status) == (2, 8.0)
    assert parse_ray_status(status.replace("Active:", "Healthy:")) == (2, 8.0)
    assert parse_ray_status("") == (0, 0.0)
    peers = ["/ip4/127.0.0.1/tcp/31337/p2p/QmA", "/ip4/198.18.0.11/tcp/31337/p2p/QmA"]
    assert choose_initial_peer(peers) == "/ip4/198.18.0.11/tcp/31337/p2p/QmA"
    assert choose_initial_peer(peers[:1]) == peers[0]
    assert choose_initial_peer([]) == ""


def test_ray_executor_needs_an_earlier_ray_stage_and_free_slot(write_recipe: Writer) -> None:
    base = """
        name = "rayexec"
        [hosts.a]
        gpus = 2
        {ray}
        [[stage]]
        kind = "queue"
        executor = "ray"
        {extra}
        grid = {{ i = [1, 2] }}
        command = "echo {{i}}"
    """
    ray_stage = '[[stage]]\n        kind = "ray"'
    with pytest.raises(RecipeError, match='needs a kind = "ray" stage before this one'):
        load_recipe(write_recipe(base.format(ray="", extra="")))
    with pytest.raises(RecipeError, match="means nothing when Ray places the tasks"):
        load_recipe(write_recipe(base.format(ray=ray_stage, extra='placement = "md5"')))
    with pytest.raises(RecipeError, match="'nope' is not a ray stage before this one"):
        load_recipe(write_recipe(base.format(ray=ray_stage, extra='cluster = "nope"')))
    loaded = load_recipe(write_recipe(base.format(ray=ray_stage, extra="gpus_per_task = 0.5")))
    plan = build_plan(loaded, {"a": declared_slots("a", 2)})
    queue = plan.stages[1]
    # Ray places the tasks: dispatch slots are "as many tasks as the cluster's GPUs hold" (2 GPUs / 0.5), on the head.
    assert [s.key for s in queue.slots] == ["a:0", "a:1", "a:2", "a:3"]
    assert all(t.pinned_slot is None for t in queue.tasks)


@pytest.mark.slow
def test_resume_after_crash_stops_old_services_before_starting_them_again(write_recipe: Writer,
                                                                         tmp_path: Path) -> None:
    """The old service still holds its port after the engine is SIGKILLed: resume must stop it (never duplicate it),
    start it again for the trial, and finish the cells that did not finish."""
    port = free_port()
    marks = tmp_path / "marks"
    recipe = write_recipe(f"""
        name = "svcresume"
        [hosts.here]
        gpus = 2
        [[stage]]
        kind = "service"
        name = "svc"
        command = "{{python}} {SERVICE} --port {port}"
        ready = {{ port = {port}, timeout = "20s" }}
        [[stage]]
        kind = "queue"
        name = "client"
        grid = {{ i = "1..6" }}
        command = "sh -c 'echo {{i}} >> {marks}; sleep 1.5; echo done {{i}}'"
    """)
    run = tmp_path / "run"
    engine = cli_popen("--recipe", str(recipe), "--run-dir", str(run))
    deadline = time.monotonic() + 60
    while (len(marks.read_text().split()) if marks.exists() else 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(engine.pid, signal.SIGKILL)
    engine.wait()
    (old_pid,) = _service_pids(run)
    assert is_alive(old_pid), "the crashed engine's service should still be running (it is detached)"
    result = cli("--recipe", str(recipe), "--run-dir", str(run), "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped; it restarts with its trial" in result.stdout
    assert not is_alive(old_pid)
    pids = _service_pids(run)
    assert len(pids) == 2 and not any(is_alive(p) for p in pids)
    j = Journal(run / "journal.sqlite", readonly=True)
    try:
        assert sorted(t.state for t in j.tasks() if t.stage == "client") == ["done"] * 6
    finally:
        j.close()
