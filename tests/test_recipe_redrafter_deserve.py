"""The ReDrafter beam-grid and DeServe pipeline recipes: the local rehearsals run end to end through the
engine (ReDrafter's results equal what upstream's make_csv.awk | sort makes of the same logs), and the
two-host recipes validate and plan a queue or a worker per GPU of two 8-GPU hosts."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from remote.journal import Journal
from remote.plan import build_plan
from remote.recipe_loader import load_recipe
from remote.slots import declared_slots
from remote.stages.pipeline import split_layers
from tests.conftest import REPO, cli, free_ports, run_engine
from tests.test_redrafter_csv_parity import MAKE_CSV_AWK

RECIPES = REPO / "recipes"
REDRAFTER = RECIPES / "redrafter-beam-grid.toml"
REDRAFTER_LOCAL = RECIPES / "local" / "redrafter-beam-grid.toml"
DESERVE = RECIPES / "deserve-pipeline.toml"
DESERVE_LOCAL = RECIPES / "local" / "deserve-pipeline.toml"


def cells(text: str) -> list[list[str]]:
    """CSV rows with blanks around cells dropped (make_csv.awk writes ", " between cells, results.csv ",")."""
    return [[cell.strip() for cell in line.split(",")] for line in text.splitlines()]




# -- ReDrafter -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_redrafter_grid_gives_the_rows_make_csv_awk_and_sort_give(tmp_path: Path) -> None:
    gawk = shutil.which("gawk")
    if gawk is None:
        pytest.fail("gawk is not installed; the parity check needs it (apt-get install gawk), as upstream")
    run = tmp_path / "run"
    finished, _ = run_engine(REDRAFTER_LOCAL, run)
    assert finished.counts["done"] == 9 and finished.counts["failed"] == 0, finished.counts

    # Upstream's logs: one per GPU, each task's output appended (tee --append) after run.bash's "On GPU"
    # line.
    j = Journal(run / "journal.sqlite", readonly=True)
    try:
        tasks = sorted(j.tasks("sweep"), key=lambda t: t.started or 0.0)
    finally:
        j.close()
    per_gpu: dict[int, bytearray] = {}
    for t in tasks:
        assert t.gpu is not None
        length, width = t.values["beam_length"], t.values["beam_width"]
        header = f"On GPU {t.gpu}, beam_length: {length}, beam_width {width}\n".encode()
        log = (run / "logs" / f"{t.log_name}.log").read_bytes()
        per_gpu.setdefault(t.gpu, bytearray()).extend(header + log)
    assert sorted(per_gpu) == [0, 1], "both slots should have run tasks"
    logs = []
    for gpu, content in sorted(per_gpu.items()):
        path = tmp_path / f"bs-2-np-4-beam-3-len-4-gpu-{gpu}.log"
        path.write_bytes(bytes(content) + f"done on GPU_{gpu}\n".encode())
        logs.append(str(path))
    (tmp_path / "make_csv.awk").write_text(MAKE_CSV_AWK)
    awk = subprocess.run([gawk, "-f", str(tmp_path / "make_csv.awk"), *logs], capture_output=True, check=True)
    ordered = subprocess.run(["sort", "-t,", "-k1,1n", "-k2,2n"], input=awk.stdout, capture_output=True,
                             check=True, env={"LC_ALL": "C"})
    expected = cells(ordered.stdout.decode())

    ours = cells((run / "results.csv").read_text())
    assert ours == expected
    assert ours[0] == ["beam_width", "beam_length", "average_num_accepted_tokens", "tokens_per_sec"]
    assert [(int(w), int(length)) for w, length, _, _ in ours[1:]] == [
        (w, length) for w in (1, 2, 3) for length in (2, 3, 4)]
    for _, length, accepted, tps in ours[1:]:
        assert re.fullmatch(r"\d+\.\d{6}", accepted), accepted  # make_csv.awk's %f
        assert 1.0 <= float(accepted) <= int(length) and float(tps) > 0


def test_redrafter_recipe_plans_the_upstream_grid_over_two_8_gpu_hosts() -> None:
    proc = cli("check", str(REDRAFTER), "--assume-gpus", "8")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "720 task(s), 16 slot(s)" in out
    assert re.search(r"^  gpu-a +ssh gpu-a +8 GPU slot\(s\)$", out, re.MULTILINE), out
    assert re.search(r"^  gpu-b +ssh gpu-b +8 GPU slot\(s\)$", out, re.MULTILINE), out
    assert ("stage sweep (queue, placement free-slot, order longest-first): 720 task(s) over 16 slot(s)"
            in out)
    assert "    beam_length=16 beam_width=48\n" in out  # the longest cell goes first

    recipe = load_recipe(REDRAFTER).recipe
    stage = recipe.stage[0]
    assert stage.kind == "queue" and stage.isolate_gpu
    argv = " ".join(stage.command) if isinstance(stage.command, list) else stage.command
    assert "--use_gpu=0 " in argv and "{gpu}" not in argv
    assert recipe.results.columns == ["beam_width", "beam_length", "average_num_accepted_tokens",
                                      "tokens_per_sec"]


def test_the_commented_md5_alternative_reproduces_run_bash_placement(tmp_path: Path) -> None:
    """Uncommenting placement = "md5" and its key on one 8-GPU host puts every cell on run.bash's GPU."""
    text = REDRAFTER.read_text()
    assert '\n# placement = "md5"\n# key = "{beam_length}-{beam_width}"\n' in text
    text = text.replace('\nplacement = "free-slot"', "\n")
    text = text.replace('# placement = "md5"', 'placement = "md5"')
    text = text.replace('# key = "{beam_length}-{beam_width}"', 'key = "{beam_length}-{beam_width}"')
    text = re.sub(r"\n\[hosts\.gpu-b\]\n[^\[]*", "\n", text)  # one host, as run.bash has
    (tmp_path / "md5.toml").write_text(text)
    loaded = load_recipe(tmp_path / "md5.toml")
    plan = build_plan(loaded, {"gpu-a": declared_slots("gpu-a", 8)})
    ours = {(str(t.values["beam_length"]), str(t.values["beam_width"])): t.pinned_slot
            for t in plan.all_tasks()}

    # run.bash's own loop and rule, in bash with md5sum.
    script = r"""
for beam_length in {2..16}; do for beam_width in {1..48}; do
  hash=$(echo "$beam_length-$beam_width" | md5sum | cut -c 1-8)
  echo "$beam_length $beam_width $((16#$hash % 8))"
done; done"""
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    upstream = {(length, width): f"gpu-a:{gpu}" for length, width, gpu in (line.split() for line in
                                                                            out.splitlines())}
    assert len(upstream) == 720
    assert ours == upstream


# -- DeServe ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_deserve_pipeline_serves_every_client_cell(tmp_path: Path) -> None:
    # The recipe as shipped, its ports moved to free ones so parallel test runs never collide; it sits in
    # a recipes/local/ copy whose ../workloads is the real one.
    (tmp_path / "recipes" / "local").mkdir(parents=True)
    (tmp_path / "recipes" / "workloads").symlink_to(RECIPES / "workloads")
    base, controller = free_ports(3), free_ports(1)
    text = DESERVE_LOCAL.read_text()
    text, n1 = re.subn(r"(?m)^base_port = \d+", f"base_port = {base}", text)
    text, n2 = re.subn(r"(?m)^controller_port = \d+", f"controller_port = {controller}", text)
    assert n1 == n2 == 1
    recipe = tmp_path / "recipes" / "local" / "deserve-pipeline.toml"
    recipe.write_text(text)

    run = tmp_path / "run"
    finished, _ = run_engine(recipe, run)
    assert finished.counts.get("failed", 0) == 0, finished.counts
    rows = json.loads((run / "results.json").read_text())
    assert sorted((r["workload"], r["batch_size"]) for r in rows) == [
        ("fixed12:16:2", 2), ("fixed12:16:2", 4), ("fixed6:8:0", 2), ("fixed6:8:0", 4)]
    for r in rows:
        assert r["requests_finished_total"] == int(r["workload"][len("fixed"):].split(":")[0])
        assert r["time_used"] > 0 and r["real_input_throughput"] > 0
        # 8 tokens per request (max_tokens), all counted within time_used
        expected = r["requests_finished_total"] * 8 / r["time_used"]
        assert r["real_output_throughput"] == pytest.approx(expected)
    header = (run / "results.csv").read_text().splitlines()[0]
    assert header == ("workload,batch_size,requests_finished_total,real_input_throughput,"
                      "real_output_throughput,time_used")

    firsts = [next((run / "logs").glob(f"pipeline.local_{g}-*.log")).read_text().splitlines()[0]
              for g in range(3)]
    assert firsts == [
        "Serve from llama-3-8b-instruct-slice/tok_embeddings to llama-3-8b-instruct-slice/layers.10",
        "Serve from llama-3-8b-instruct-slice/layers.11 to llama-3-8b-instruct-slice/layers.21",
        "Serve from llama-3-8b-instruct-slice/layers.22 to llama-3-8b-instruct-slice/output"]
    for port in (base, base + 1, base + 2, controller):  # the workers were stopped with their trial
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still listens"


def test_deserve_recipe_plans_a_16_worker_ring_over_two_8_gpu_hosts() -> None:
    proc = cli("check", str(DESERVE), "--assume-gpus", "8")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^  gpu-a +ssh gpu-a +8 GPU slot\(s\)$", out, re.MULTILINE), out
    assert re.search(r"^  gpu-b +ssh gpu-b +8 GPU slot\(s\)$", out, re.MULTILINE), out
    assert "stage pipeline (pipeline): 16 task(s) over 16 slot(s)" in out
    assert all(f"    pipeline@gpu-{h}:{g}\n" in out for h in "ab" for g in range(8))
    assert "stage client (queue, placement free-slot, order grid): 6 task(s) over 1 slot(s)" in out

    # What each worker is told: its slice of llama-3-70b's 80 layers, its port, the next worker and the
    # controller.
    loaded = load_recipe(DESERVE)
    slots = {"gpu-a": declared_slots("gpu-a", 8), "gpu-b": declared_slots("gpu-b", 8),
             "client": declared_slots("client", 1)}
    plan = build_plan(loaded, slots, {"gpu-a": "10.0.0.1", "gpu-b": "10.0.0.2", "client": "10.0.0.1"})
    workers = next(s for s in plan.stages if s.name == "pipeline").tasks
    flags = [dict(a.split("=", 1) for a in t.argv if a.startswith("--") and "=" in a) for t in workers]
    urls = [f"http://10.0.0.{1 + i // 8}:{8080 + i % 8}" for i in range(16)]
    assert [(f["--layer-begin"], f["--layer-end"]) for f in flags] == split_layers(80, 16)
    assert flags[0]["--layer-begin"] == "emb" and flags[-1]["--layer-end"] == "output"
    assert [f"http://10.0.0.{1 + i // 8}:{f['--port']}" for i, f in enumerate(flags)] == urls
    assert [f["--next-worker-url"] for f in flags] == urls[1:] + urls[:1]  # a ring
    assert {f["--num-rounds"] for f in flags} == {"16"}
    assert {f["--model"] for f in flags} == {"llama-3-70b"}
    assert {f["--controller-url"] for f in flags} == {"http://gpu-a:19000"}
    # each worker pinned to its own slot, and CUDA_VISIBLE_DEVICES filled with that slot's GPU at launch
    assert [t.pinned_slot for t in workers] == [f"gpu-{h}:{g}" for h in "ab" for g in range(8)]
    assert {t.env["CUDA_VISIBLE_DEVICES"] for t in workers} == {"{gpu}"}
    client = next(s for s in plan.stages if s.name == "client").tasks[0]
    assert client.argv[:3] == ("python3", "-m", "src.benchmark.deserve")
    assert "--first-worker-url={pipeline.first_url}" in client.argv
