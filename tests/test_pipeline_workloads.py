"""The DeServe stand-ins: a planned ring of deserve_worker processes serves deserve_client's workload."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from recipes.workloads import deserve_worker
from remote.slots import declared_slots
from remote.stages.pipeline import WorkerPlan, plan_pipeline
from remote.template import render_argv
from tests.conftest import free_ports

WORKLOADS = Path(__file__).resolve().parent.parent / "recipes" / "workloads"
WORKER, CLIENT = WORKLOADS / "deserve_worker.py", WORKLOADS / "deserve_client.py"
# The seed's worker command, with the stand-in in place of `python3 -m deserve_worker.worker_api`.
WORKER_COMMAND = (
    "{python} {worker} --model=llama-3-70b --num-rounds={num_rounds} --layer-begin={layer_begin} "
    "--layer-end={layer_end} --batch-size=4 --port={port} --num-main-pages=9000 --num-swap-pages=0 "
    "--controller-url={controller_url} --next-worker-url={next_url} --simulated-latency=0.0 "
    "--prefill-first-aggregate --buddy-height=16 --report-interval=0.5 --host=127.0.0.1"
)
REPORT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d: Total batch size: \d+; Avg stage time: \d+\.\d\dms; ", re.MULTILINE
)




def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    """Readiness as upstream has it: the port accepts connections (bounded polling; fails fast on exit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"worker on port {port} exited with {proc.returncode}: {log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    pytest.fail(f"worker on port {port} did not accept connections within {timeout} s")


def wait_for_text(path: Path, pattern: re.Pattern[str], timeout: float = 3.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text()
        if pattern.search(text):
            return text
        time.sleep(0.1)
    pytest.fail(f"{path.name} never printed {pattern.pattern!r}: {path.read_text()!r}")


def expected_tokens(input_len: int, max_tokens: int) -> list[int]:
    """What a request gets back if each token passed every one of the model's 83 parts exactly once, in
    order: proof the planned slices chain into a complete, non-overlapping ring."""
    token, out = input_len, []
    for step in range(1, max_tokens + 1):
        for layer in range(len(deserve_worker.layer_names("llama-3-70b"))):
            token = (token * 1_103_515_245 + layer + 12_345) % deserve_worker.VOCAB
        out.append(deserve_worker.STOP_TOKEN if step == max_tokens else token)
    return out


@pytest.fixture
def ring(tmp_path: Path) -> Iterator[tuple[list[WorkerPlan], int, list[Path]]]:
    """Three stand-in workers on localhost, started from the plan's values; stopped and reaped afterwards."""
    controller_port = free_ports(1)
    plan = plan_pipeline(declared_slots("local", 3), num_layers=80, base_port=free_ports(3),
                         host_addresses={"local": "127.0.0.1"})
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for worker in plan:
            values = {**worker.values(), "python": sys.executable, "worker": str(WORKER),
                      "controller_url": f"http://127.0.0.1:{controller_port}"}
            log = tmp_path / f"worker{worker.rank}.log"
            logs.append(log)
            with log.open("wb") as out:
                procs.append(subprocess.Popen(render_argv(WORKER_COMMAND, values), stdout=out,
                                              stderr=subprocess.STDOUT))
        for worker, proc, log in zip(plan, procs, logs, strict=True):
            wait_for_port(worker.port, proc, log)
        yield plan, controller_port, logs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CLIENT), *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_planned_ring_serves_the_whole_workload(ring: tuple[list[WorkerPlan], int, list[Path]]) -> None:
    plan, controller_port, logs = ring
    started = time.monotonic()
    proc = run_client("--batch-size=4", "--workload=fixed6:8:2", "--max-tokens=5", "--trace", "--seed=3",
                      f"--first-worker-url={plan[0].url}", f"--controller-port={controller_port}",
                      "--controller-host=127.0.0.1", "--idle-timeout=10")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 5
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # nothing but the one JSON line, as upstream
    result = json.loads(lines[0])
    assert result["requests_finished_total"] == 6
    assert result["output_throughput_total"] == 6 * 5
    assert result["time_used"] > 0
    assert result["real_output_throughput"] == pytest.approx(30 / result["time_used"])
    assert result["real_input_throughput"] > 0
    # no time limit: upstream divides by -1
    assert result["standard_input_throughput"] < 0 and result["standard_output_throughput"] < 0
    # Each answer is what passing through all 83 parts once per token gives, so the slices chained correctly.
    for entry in result["trace"]:
        input_len = int(entry["request"].strip("<>").split()[0])
        assert entry["response"].split() == [str(t) for t in expected_tokens(input_len, 5)]

    for worker in plan:
        with urllib.request.urlopen(f"{worker.url}/info", timeout=5) as response:
            info = json.load(response)
        assert (info["layer_begin"], info["layer_end"]) == (worker.layer_begin, worker.layer_end)
        assert info["port"] == worker.port
        assert info["next_worker_url"] == worker.next_url
        assert info["num_rounds"] == 3
    assert plan[-1].next_url == plan[0].url

    first = wait_for_text(logs[0], REPORT_LINE)
    assert first.startswith("Serve from llama-3-70b-instruct-slice/tok_embeddings to "
                            "llama-3-70b-instruct-slice/layers.26\n")
    assert "Maximum number of layers served: " in first
    last = wait_for_text(logs[2], REPORT_LINE)
    assert last.startswith("Serve from llama-3-70b-instruct-slice/layers.54 to "
                           "llama-3-70b-instruct-slice/output\n")
    # the report after the workload ran counted the tasks that went through
    counts = [int(m) for m in re.findall(r"Total batch size: (\d+);", wait_for_text(logs[1], REPORT_LINE))]
    deadline = time.monotonic() + 3
    while max(counts, default=0) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        counts = [int(m) for m in re.findall(r"Total batch size: (\d+);", logs[1].read_text())]
    assert max(counts) > 0


def test_client_with_no_pipeline_fails_with_one_line() -> None:
    dead = free_ports(1)
    proc = run_client("--workload=fixed2:4:0", "--max-tokens=2",
                      f"--first-worker-url=http://127.0.0.1:{dead}",
                      f"--controller-port={free_ports(1)}", "--controller-host=127.0.0.1")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert f"cannot reach the first worker at http://127.0.0.1:{dead}" in proc.stderr


def test_client_rejects_workloads_it_cannot_generate() -> None:
    proc = run_client("--workload=sharegpt", f"--controller-port={free_ports(1)}",
                      "--controller-host=127.0.0.1")
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("deserve_client: workload 'sharegpt' is not supported by this stand-in; "
                                   "use fixedN:input:variation")


def test_worker_rejects_an_empty_slice_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, str(WORKER), "--model=llama-3-8b", "--num-rounds=2", "--layer-begin=16",
         "--layer-end=16", "--batch-size=4", f"--port={free_ports(1)}", "--controller-url=http://127.0.0.1:1",
         "--next-worker-url=http://127.0.0.1:2"],
        capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "empty slice" in proc.stderr


def test_help_says_which_upstream_program_each_stands_in_for() -> None:
    worker, client = (subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                                     check=True) for script in (WORKER, CLIENT))
    assert "stand-in for DeServe's `python3 -m deserve_worker.worker_api`" in worker.stdout
    assert "stand-in for DeServe's `python3 -m src.benchmark.deserve`" in client.stdout
