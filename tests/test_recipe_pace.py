"""AMD PACE offline recipes: the two-host recipe plans, the local rehearsal runs end to end through the
engine, and the stand-in for benchmark_llm_offline.py writes PACE's results JSON and log format."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from recipes.workloads import pace_offline_benchmark as pob
from remote.recipe import FetchStage, MetricSpec, RunStage
from remote.recipe_loader import load_recipe, stage_name
from tests.conftest import REPO, cli

SCRIPT = Path(pob.__file__)
REAL = REPO / "recipes" / "pace-offline.toml"
LOCAL = REPO / "recipes" / "local" / "pace-offline.toml"
GOLDEN = REPO / "tests" / "golden" / "pace_results.json"

SCALARS = ("total_tps", "output_tps", "average_gen_time", "average_latency_per_token", "average_ttft")
LISTS = ("time_per_tokens", "cpu_usage", "ram_usage")
METRIC_KEYS = {"total_tokens", "total_gen_tokens", "average_gen_time", "average_latency_per_token",
               "total_tps", "output_tps", "average_ttft", "time_per_tokens"}
LOG_LINE = re.compile(r"^\d\d-[A-Z][a-z]{2}-\d\d \d\d:\d\d:\d\d\.\d{3} ([IWE]) benchmark_llm_offline\.py:\d+ "
                      r"pace-llm-benchmark: (.*)$")

HAVE_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "tokenizers"))
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="needs transformers and tokenizers (the hf framework)")
Run = tuple[subprocess.CompletedProcess[str], dict[str, Any]]


def _pace_problem() -> str | None:
    problem = pob.pace_cpu_problem(pob.cpu_flags())
    if problem is None and importlib.util.find_spec("pace") is None:
        problem = "amd-pace is not installed"
    return problem


def _config(tmp: Path, **over: Any) -> Path:
    """A config with the seed's fields: hf, tiny sizes, every monitor on; `over` replaces top-level fields."""
    doc: dict[str, Any] = {
        "frameworks": ["hf"],
        "model_args": {"model_name": "meta-llama/Llama-3.1-8B", "dtype": "bf16",
                       "llm_operators": {"Norm": "NATIVE", "QKVProjection": "TPP", "Attention": "JIT",
                                         "OutProjection": "TPP", "MLP": "TPP", "LMHead": "TPP"}},
        "use_real_data": True,
        "generation_args": {"input_tokens": 8, "output_tokens": 6, "batch_size": 2, "num_beams": 1,
                            "kv_cache_type": "BMC", "do_sample": False, "manual_seed": 0},
        "warmup_runs": 1,
        "num_runs": 3,
        "visualize": False,
        "verbose": True,
        "output_dir": str(tmp / "results"),
        "token_metrics": {"time_to_first_token": True, "time_per_tokens": True},
        "system_metrics": True,
    }
    doc.update(over)
    path = tmp / "cfg.json"
    path.write_text(json.dumps(doc))
    return path


def _run(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """The harness as a program; `prelude` runs first in the same interpreter (to hide a module)."""
    argv = [str(SCRIPT), *args]
    code = (f"{prelude}import runpy, sys\nsys.argv = {argv!r}\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          check=False)


# ----------------------------------------------------------------------------------------------------------
# The recipes


def test_two_host_recipe_checks_and_plans_every_stage_per_framework_and_host() -> None:
    proc = cli("check", str(REAL), "--assume-gpus", "8")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "8 stage(s), 16 task(s), 2 slot(s)" in out
    for stage in ("config", "benchmark", "collect", "fetch"):
        for framework in ("pace", "hf"):
            for host in ("cpu-a", "cpu-b"):
                assert f"name={framework} framework={framework} {stage}@{host}" in out


def test_local_recipe_has_the_real_recipes_stages_metrics_and_plots() -> None:
    real, local = load_recipe(REAL), load_recipe(LOCAL)
    assert real.stage_names == local.stage_names == ("config", "benchmark", "collect", "fetch")
    assert [s.kind for s in real.recipe.stage] == [s.kind for s in local.recipe.stage]
    trials = ({"name": "pace", "framework": "pace"}, {"name": "hf", "framework": "hf"})
    assert real.trials == local.trials == trials
    for loaded in (real, local):
        specs = loaded.recipe.metrics
        assert set(SCALARS) <= set(specs)
        fetch = next(s for s in loaded.recipe.stage if isinstance(s, FetchStage))
        for name in SCALARS:
            spec = specs[name]
            assert isinstance(spec, MetricSpec) and spec.stage == stage_name(fetch)
            assert spec.json_path == f"benchmark_results.0.metrics.{name}"
            assert spec.file == fetch.files[0]  # the metrics read the file the fetch stage copies
        plots = [(p.kind, p.x, p.y, p.step) for p in loaded.recipe.plot]
        assert plots == [*(("bar", "framework", name, None) for name in SCALARS),
                         ("line", None, "time_per_tokens", None), ("line", None, "cpu_usage", "interval"),
                         ("line", None, "ram_usage", "interval")]
        for name in LISTS:
            spec = specs[name]
            assert isinstance(spec, MetricSpec) and spec.type == "list" and spec.file == fetch.files[0]
    # Only the benchmark program differs: upstream's script there, the stand-in here.
    bench = {n: s for n, s in zip(real.stage_names, real.recipe.stage, strict=True)}["benchmark"]
    assert isinstance(bench, RunStage) and isinstance(bench.command, str)
    assert bench.command.startswith("python3 {pace_bench}/benchmark_llm_offline.py --config ")


# ----------------------------------------------------------------------------------------------------------
# The stand-in's output


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One hf run of the harness (tiny model built into a temporary cache), its output and results JSON."""
    if not HAVE_HF:
        pytest.skip("needs transformers and tokenizers")
    tmp = tmp_path_factory.mktemp("pace-hf")
    cfg = _config(tmp)
    proc = _run("--config", str(cfg), "--model-dir", str(tmp / "models"), "--system-interval", "0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((tmp / "results").glob("*_results.json"))
    assert len(files) == 1, files
    return proc, json.loads(files[0].read_text())


@needs_hf
def test_results_json_has_pace_fields_and_upstreams_arithmetic(
    hf_run: Run,
) -> None:
    _, doc = hf_run
    golden = json.loads(GOLDEN.read_text())
    assert list(doc) == list(golden) == ["model_args", "generation_args", "num_runs", "warmup_runs",
                                         "benchmark_results"]
    assert doc["model_args"]["model_name"] == "meta-llama/Llama-3.1-8B"
    assert (doc["num_runs"], doc["warmup_runs"]) == (3, 1)
    [entry] = doc["benchmark_results"]
    assert list(entry) == list(golden["benchmark_results"][0]) == ["framework", "metrics", "system_metrics"]
    assert entry["framework"] == "hf"
    m = entry["metrics"]
    assert set(m) == METRIC_KEYS == set(golden["benchmark_results"][0]["metrics"])
    # Upstream's counts: sequence lengths summed over the timed runs, times the batch size.
    assert m["total_tokens"] == 2 * 3 * (8 + 6)
    assert m["total_gen_tokens"] == 2 * 3 * 6
    total_time = m["average_gen_time"] * 3
    assert m["total_tps"] == pytest.approx(m["total_tokens"] / total_time)
    assert m["output_tps"] == pytest.approx(m["total_gen_tokens"] / total_time)
    assert m["average_latency_per_token"] == pytest.approx(total_time / m["total_tokens"])
    assert len(m["time_per_tokens"]) == 6 and all(t > 0 for t in m["time_per_tokens"])
    assert 0 < m["average_ttft"] < m["average_gen_time"]
    system = entry["system_metrics"]
    assert set(system) == {"interval", "cpu_usage", "ram_usage", "peak_ram_usage"}
    assert system["interval"] == 0.05 and len(system["cpu_usage"]) == len(system["ram_usage"]) >= 1
    assert system["peak_ram_usage"] == max(system["ram_usage"])


@needs_hf
def test_log_lines_are_in_paces_format_and_end_with_the_results_path(
    hf_run: Run,
) -> None:
    proc, _ = hf_run
    lines = proc.stderr.splitlines()
    messages = [m[2] for m in map(LOG_LINE.match, lines) if m]
    assert "Running benchmark for model: meta-llama/Llama-3.1-8B using hf framework" in messages
    assert messages.index("Performing warm-up runs...") < messages.index("Starting timed runs...")
    # tqdm bars, redrawn with carriage returns, end at k/N.
    assert re.search(r"Warming up: 100%\|[^|]*\| 1/1 ", proc.stderr)
    assert re.search(r"Benchmarking: 100%\|[^|]*\| 3/3 ", proc.stderr)
    last = LOG_LINE.match(lines[-1])
    assert last is not None and last[2].startswith("Results saved to: ")
    saved = Path(last[2].removeprefix("Results saved to: "))
    assert saved.is_file()
    assert re.fullmatch(r"hf_meta-llama--Llama-3\.1-8B_torch\.bfloat16_bs2_it8_nt6_\d{8}_\d{6}_results\.json",
                        saved.name)


@pytest.mark.parametrize(
    ("over", "says"),
    [
        ({"frameworks": ["vllm"]}, "frameworks: 'vllm' runs only with upstream's script"),
        ({"num_runs": 0}, "num_runs: must be a positive integer"),
        ({"output_dir": "results"}, "output_dir: invalid path 'results': its parent directory must exist"),
        ({"token_metrics": {"time_to_first_token": True}}, "token_metrics.time_per_tokens: missing"),
    ],
)
def test_config_mistakes_fail_with_one_line(tmp_path: Path, over: dict[str, Any], says: str) -> None:
    cfg = _config(tmp_path, **over)
    proc = _run("--config", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"pace_offline_benchmark: {cfg}: ") and says in proc.stderr


def test_pace_without_amd_pace_fails_with_one_line_before_anything_runs(tmp_path: Path) -> None:
    cfg = _config(tmp_path, frameworks=["hf", "pace"])
    proc = _run("--config", str(cfg), "--model-dir", str(tmp_path / "models"),
                prelude="import sys; sys.modules['pace'] = None; ")  # as if amd-pace were not installed
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("pace_offline_benchmark: framework pace cannot run on this host: ")
    if pob.pace_cpu_problem(pob.cpu_flags()) is None:
        assert "importing pace failed" in proc.stderr and "pip install amd-pace" in proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "models").exists()


def test_pace_needs_avx512_bf16(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n\nprocessor\t: 1\n")
    flags = pob.cpu_flags(str(info))
    assert flags is not None and "avx512f" in flags
    assert pob.pace_cpu_problem(flags) == ("this CPU lacks avx512_bf16 (amd-pace 1.3.0 needs AVX512F and "
                                           "AVX512_BF16)")
    assert pob.pace_cpu_problem(flags | {"avx512_bf16"}) is None
    assert pob.cpu_flags(str(tmp_path / "absent")) is None
    assert "cannot read the CPU flags" in (pob.pace_cpu_problem(None) or "")


def test_tiny_model_is_built_once_under_a_lock_and_local_models_are_used_as_they_are(tmp_path: Path) -> None:
    builds: list[str] = []

    def slow_build(target: Path, name: str) -> None:
        builds.append(name)
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        (target / "config.json").write_text("{}")

    got: list[Path] = []
    def resolve() -> None:
        got.append(pob.resolve_model("org/m", tmp_path, print, slow_build))

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == ["org/m"] and got[0] == got[1] == pob.model_path(tmp_path, "org/m")
    assert (got[0] / "config.json").is_file() and not list(tmp_path.glob("*.tmp"))
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert pob.resolve_model(str(local), tmp_path / "cache", print, slow_build) == local
    assert builds == ["org/m"]


# ----------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
@needs_hf
def test_local_recipe_runs_both_frameworks_through_the_engine(tmp_path: Path) -> None:
    problem = _pace_problem()
    if problem is not None:
        pytest.skip(f"framework pace cannot run here: {problem}")
    run = tmp_path / "run"
    proc = cli("--recipe", str(LOCAL), "--run-dir", str(run))  # headless, as a person runs it: plots included
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"plots: {run / 'plots'} (8 text" in proc.stdout
    rows = json.loads((run / "results.json").read_text())
    assert [r["framework"] for r in rows] == ["hf", "pace"]
    for row in rows:
        assert row["host"] == "local"
        assert row["total_tokens"] == 2 * 5 * (32 + 32) and row["total_gen_tokens"] == 2 * 5 * 32
        for name in SCALARS:
            assert isinstance(row[name], float) and row[name] > 0, (row["framework"], name)
        assert row["total_tps"] == pytest.approx(row["total_tokens"] / (5 * row["average_gen_time"]))
    for row in rows:
        entry = json.loads((run / "fetched" / row["framework"] / "local" / "results.json").read_text())
        [result] = entry["benchmark_results"]
        assert result["framework"] == row["framework"]
        # The lists in the table are the fetched file's, item for item.
        assert row["time_per_tokens"] == result["metrics"]["time_per_tokens"] and len(row["time_per_tokens"]) == 32
        assert row["cpu_usage"] == result["system_metrics"]["cpu_usage"]
        assert row["ram_usage"] == result["system_metrics"]["ram_usage"] and row["interval"] == 0.2
    # The seed's line charts: one line per framework.
    for n, title in ((6, "time_per_token_s_"), (7, "CPU_usage_"), (8, "RAM_usage_above_the_start_MB_")):
        text = (run / "plots" / f"{n}-{title}.txt").read_text()
        assert "• hf" in text and "+ pace" in text, text
