"""Alpa and Petals recipes: missing markers (failed cases), per-match rows, typed named groups, derived values
(`expr`), the baseline verdict; the upstream formats parsed with the shipped recipes' own metrics; both local
variants end to end (a real Ray cluster, a real hivemind swarm); `benchfleet check` on the real-cluster recipes."""

from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from remote.extract import ExprError, LineSplitter, MetricError, MetricSet, TaskExtractor, compile_expr
from remote.journal import Journal
from remote.procfs import is_alive
from remote.recipe import Baseline, MetricSpec, ResultsSpec
from remote.recipe_loader import LoadedRecipe, RecipeError, load_recipe
from remote.results import FAILED_CASE, MATCH_ROWS, finish_rows, select_columns, verdict, write_results
from tests.conftest import REPO, cli, extractor, free_port, run_engine, the_log

Writer = Callable[..., Path]
GOLDEN = REPO / "tests" / "golden"
RECIPES = REPO / "recipes"
WORKLOADS = RECIPES / "workloads"


def lines_of(data: bytes) -> list[str]:
    splitter = LineSplitter()
    return splitter.feed(data) + splitter.flush()


def recipe_extractor(loaded: LoadedRecipe, stage: str) -> TaskExtractor:
    return TaskExtractor(MetricSet.from_recipe(loaded.recipe), stage, done=None, progress=None)


# -- missing markers, per-match rows, typed groups ---------------------------------------------------------


def test_alpa_golden_log_gives_one_row_per_case_and_the_failed_case_has_no_numbers() -> None:
    loaded = load_recipe(RECIPES / "alpa-suites.toml")
    ex = recipe_extractor(loaded, "suites")
    ex.feed_lines(lines_of((GOLDEN / "alpa_cases.log").read_bytes()))
    values = ex.finish({})
    assert ex.conversion_errors == []
    ok, failed = finish_rows([{"task": "t1", "stage": "suites", "state": "done", **values}], loaded.recipe.results)
    assert {k: ok[k] for k in ("type", "microbatch", "gpus", "mean_time", "std_time", "params", "tflops",
                               "peak_mem", "compile_time", "benchmark_time", FAILED_CASE)} == {
        "type": "gpt", "microbatch": 4, "gpus": 8, "mean_time": 2.454, "std_time": 0.0, "params": 2.649,
        "tflops": 37.16, "peak_mem": 8.745, "compile_time": 66.46, "benchmark_time": 18.06, FAILED_CASE: False}
    assert ok["model_config"] == ("GPTModelConfig(seq_len=1024, hidden_size=2560, num_layers=32, num_heads=32, "
                                  "vocab_size=51200)")
    assert str(ok["parallel_config"]).startswith("UniformParallelArgs(prefer_reduce_scatter=True, use_remat=True")
    assert str(ok["metadata"]).startswith("{'compilation_times': 'None'") and str(ok["metadata"]).endswith("}")
    assert str(ok["case"]).startswith("BenchmarkCase(batch_size=32") and ok["task"] == "t1"
    # The OOM case: -1.000 / -1.00 are markers, never numbers; what it did print (params, compile) stays.
    assert failed[FAILED_CASE] is True
    assert [failed[k] for k in ("mean_time", "std_time", "tflops", "peak_mem")] == [None] * 4
    assert (failed["params"], failed["compile_time"], failed["microbatch"]) == (6.658, 71.02, 1)
    assert "benchmark_time" not in failed  # the case never got that far: not carried over from the first case


def test_a_case_that_fails_early_does_not_shift_later_cases_values() -> None:
    ex = extractor({
        "case": MetricSpec(regex=r"^Working on case: (\S+)", type="str", each=True),
        "compile_time": MetricSpec(regex=r"Compile \(driver\): ([\d.]+) s", each=True),
        "mean_time": MetricSpec(regex=r"Mean Time \(s\): (\S+)", missing=["-1.000"], each=True),
    })
    ex.feed_lines(["Working on case: A", " - Compile (driver): 1.0 s", "Mean Time (s): 2.0",
                   "Working on case: B", "Mean Time (s): -1.000",  # failed before compiling
                   "Working on case: C", " - Compile (driver): 3.0 s", "Mean Time (s): 4.0"])
    assert ex.rows == [
        {"case": "A", "compile_time": 1.0, "mean_time": 2.0, FAILED_CASE: False},
        {"case": "B", "mean_time": None, FAILED_CASE: True},
        {"case": "C", "compile_time": 3.0, "mean_time": 4.0, FAILED_CASE: False},
    ]
    assert ex.values == {MATCH_ROWS: ex.rows}


def test_missing_marker_on_a_plain_metric_marks_the_task_and_never_records_a_number() -> None:
    spec = MetricSpec(regex=r"TFLOPs: (\S+)", missing=["-1.00"])
    never = extractor({"tflops": spec})
    never.feed_lines(["nothing here"])
    assert never.values == {}  # the metric never matched: the case status is unknown, not "ok"
    ex = extractor({"tflops": spec})
    ex.feed_lines(["TFLOPs: 3.5"])
    assert ex.values == {"tflops": 3.5, FAILED_CASE: False}
    assert ex.feed_lines(["TFLOPs: -1.00"]) is True
    assert ex.values == {FAILED_CASE: True} and ex.conversion_errors == []
    ex.feed_lines(["TFLOPs: 4.0"])
    assert ex.values == {"tflops": 4.0, FAILED_CASE: True}  # a failure is never undone by a later line
    # A marker outside the rows fails every row of its task.
    rows = finish_rows([{"state": "done", FAILED_CASE: True, MATCH_ROWS: [{"x": 1}, {"x": 2, FAILED_CASE: False}]}],
                       ResultsSpec())
    assert [r[FAILED_CASE] for r in rows] == [True, True]


def test_types_per_named_group_and_their_errors() -> None:
    ex = extractor({"r": MetricSpec(regex=r"(?P<n>\S+) (?P<x>\S+) (?P<s>\S+)", types={"n": "int", "s": "str"})})
    ex.feed_lines(["8 2.5 gpt", "8.0 2.5 gpt"])
    assert ex.values == {"x": 2.5, "s": "gpt"}  # "8.0" is not an int: missing, with the reason
    assert ex.conversion_errors == ["n: '8.0' is not an int"]
    with pytest.raises(MetricError, match=r"metrics\.r\.types: nope is not a value of this metric"):
        extractor({"r": MetricSpec(regex=r"(?P<n>\d+)", types={"nope": "int"})})


# -- derived values ----------------------------------------------------------------------------------------


def test_derived_value_reads_metrics_rows_and_captures() -> None:
    ex = extractor({
        "petals": MetricSpec(regex=r"^(?P<seq_len>\d+)\t(?P<throughput>\S+)$", types={"seq_len": "int"}, each=True),
        "setup": MetricSpec(regex=r"^setup (\d+)", type="int"),
        "per_server": MetricSpec(expr="throughput / swarm.servers"),
        "scaled": MetricSpec(expr="setup * max(2, batch)", type="int"),
    })
    ex.feed_lines(["setup 3", "128\t18.42", "512\t14.07"])
    values = ex.finish({"swarm.servers": "2", "batch": 4})  # captures may arrive as text
    assert values["scaled"] == 12 and "per_server" not in values  # no task-level throughput
    assert [(r["seq_len"], r["per_server"]) for r in ex.rows] == [(128, 9.21), (512, 7.035)]
    assert ex.finish({"swarm.servers": 2, "batch": 4}) == values  # idempotent


def test_derived_value_failures_are_missing_with_one_reason() -> None:
    ex = extractor({"t": r"t=(\S+)", "per": MetricSpec(expr="t / n"), "other": MetricSpec(expr="t * missing_one")})
    ex.feed_lines(["t=6"])
    assert ex.finish({"n": 0}) == {"t": 6.0}
    assert ex.conversion_errors == ["per: 't / n' divides by zero (t = 6, n = 0)"]  # missing input: no error
    ex2 = extractor({"t": r"t=(\S+)", "per": MetricSpec(expr="t / n", type="int")})
    ex2.feed_lines(["t=7"])
    assert ex2.finish({"n": "two"}) == {"t": 7.0}
    assert ex2.finish({"n": 2}) == {"t": 7.0}
    assert ex2.conversion_errors == ["per: n = 'two' is not a number", "per: 3.5 is not an int"]


@pytest.mark.parametrize(("expr", "message"), [
    ("__import__('os').system('true')", r"is not allowed"),
    ("open('x')", r"is not allowed"),
    ("a.__class__", None),  # a dotted name is only a capture key; it reads nothing but the named value
    ("(a + b).real", r"is not allowed"),
    ("a[0]", r"is not allowed"),
    ("'text'", r"is not a number"),
    ("lambda: 1", r"is not allowed"),
    ("abs(a, b)", r"wrong number of arguments"),
    ("max(a)", r"wrong number of arguments"),
    ("a +", r"does not parse"),
])
def test_expressions_admit_arithmetic_only(expr: str, message: str | None) -> None:
    if message is None:
        formula = compile_expr(expr)
        assert formula.names == ("a.__class__",)
        assert formula.evaluate({"a": 3}) is None  # absent: missing, nothing looked up on the value
        return
    with pytest.raises(ExprError, match=message):
        compile_expr(expr)


# -- recipe checks -----------------------------------------------------------------------------------------


BASE = """
name = "t"
[[stage]]
kind = "service"
name = "svc"
command = "sleep 60"
capture = {{ servers = 'n=(\\d+)' }}
[[stage]]
kind = "queue"
grid = {{ b = [1, 2] }}
command = "echo {{b}}"
{extra}
"""


@pytest.mark.parametrize(("extra", "message"), [
    ('[metrics]\nt = \'t=(\\S+)\'\nper = { expr = "t / svc.servers / b" }', None),
    ('[metrics]\nt = \'t=(\\S+)\'\nper = { expr = "t / nope" }',
     r":14: metrics\.per\.expr: unknown name 'nope' in 't / nope'; expected a metric"),
    ('[metrics]\nt = { regex = \'t=(\\S+)\', stage = "svc" }\nper = { expr = "t / queue.x", stage = "svc" }',
     r"'queue\.x' reads a capture, but stage 'queue' does not run before stage 'svc'"),
    ('[metrics]\nt = \'t=(\\S+)\'\na = { expr = "b2 * 2" }\nb2 = { expr = "t * 2" }',
     r"'b2' is a derived value defined after 'a'"),
    ('[metrics]\nper = { expr = "1 / 2", regex = \'(x)\' }', r"a derived value \(expr\) reads no output"),
    ('[metrics]\nper = { expr = "1 / 2", missing = ["-1"] }', r"metrics\.per\.missing: missing describes captured"),
    ('[metrics]\nper = { expr = "import os" }', r"metrics\.per\.expr: 'import os' does not parse"),
    ('[metrics]\nfailed_case = \'(x)\'', r"metric 'failed_case' has the name of a column benchfleet fills itself"),
    ('[metrics]\nr = { regex = \'(?P<v>x)\', types = { w = "int" } }', r"'w' is not a named group of this metric"),
    ('[metrics]\nr = { regex = \'(x)\', each = true, last = false }', r"expected no `last` with it"),
    ('[metrics]\nt = \'t=(\\S+)\'\n[results]\ncolumns = ["t", "failed_case"]', r"unknown column 'failed_case'"),
    ('[metrics]\nt = { regex = \'t=(\\S+)\', missing = ["-1"] }\n[results]\ncolumns = ["t", "failed_case"]', None),
    ('[metrics]\nt = \'t=(\\S+)\'\n[results]\ncolumns = ["t", "verdict"]', r"unknown column 'verdict'"),
    ('[metrics]\nt = \'t=(\\S+)\'\n[results]\ncolumns = ["t", "verdict"]\n'
     '[results.baseline]\nt = { value = 2.0, where = { b = 1, stage = "queue" } }', None),
    ('[metrics]\nt = \'t=(\\S+)\'\n[results.baseline]\ntt = { value = 2.0 }',
     r":15: results\.baseline\.tt: unknown metric 'tt' \(did you mean 't'\?\)"),
    ('[metrics]\nt = \'t=(\\S+)\'\n[results.baseline]\nt = { value = 0 }', r"an expected value of 0"),
    ('[metrics]\nt = \'t=(\\S+)\'\n[results.baseline]\nt = { value = 1, where = { suite = "x" } }',
     r"results\.baseline\.t\.where\.suite: unknown column 'suite'"),
    ('[metrics]\nt = \'t=(\\S+)\'\n[results.baseline]\nt = { value = 1, better = "faster" }',
     r"results\.baseline\.t\.better"),
    ('[metrics]\nt = \'t=(\\S+)\'\n[results.baseline]\nt = { value = 1, tolerance = -0.1 }',
     r"results\.baseline\.t\.tolerance"),
])
def test_recipe_checks_name_the_field_and_the_fix(write_recipe: Writer, extra: str, message: str | None) -> None:
    path = write_recipe(BASE.format(extra=extra))
    if message is None:
        load_recipe(path)
        return
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)


# -- verdicts ----------------------------------------------------------------------------------------------


def test_verdicts_against_the_p316_baseline() -> None:
    time_ = {"mean_time": Baseline(value=2.454, tolerance=0.10, better="lower")}
    both = {**time_, "tflops": Baseline(value=37.16, tolerance=0.10, better="higher")}
    assert verdict({"state": "done", "mean_time": 2.454}, time_) == "ok"
    assert verdict({"state": "done", "mean_time": 2.69}, time_) == "ok"  # +9.6%: inside the tolerance
    assert verdict({"state": "done", "mean_time": 2.70}, time_) == "regressed by 10%"  # just outside
    assert verdict({"state": "done", "mean_time": 2.75}, time_) == "regressed by 12%"
    assert verdict({"state": "done", "mean_time": 2.16}, time_) == "improved by 12%"
    assert verdict({"state": "done", "mean_time": None}, time_) == "missing"
    assert verdict({"state": "done", "mean_time": None, FAILED_CASE: True}, time_) == "failed"
    assert verdict({"state": "failed"}, time_) == "failed"
    assert verdict({"state": "running"}, time_) is None
    assert verdict({"state": "done", "mean_time": 2.4, "tflops": 37.0}, both) == "ok"
    assert verdict({"state": "done", "mean_time": 2.4, "tflops": 30.0}, both) == (
        "mean_time ok; tflops regressed by 19%")
    assert verdict({"state": "done", "tflops": 40.0, "mean_time": 2.2}, {
        "tflops": Baseline(value=37.16, tolerance=0.05, better="higher")}) == "improved by 7.6%"
    where = {"mean_time": Baseline(value=2.454, where={"stage": "regression", "gpus": 8})}
    assert verdict({"stage": "regression", "gpus": 8.0, "mean_time": 2.454}, where) == "ok"
    assert verdict({"stage": "suites", "gpus": 8, "mean_time": 9.0}, where) is None
    assert verdict({"stage": "regression", "gpus": "8", "mean_time": 9.0}, where) == "regressed by 267%"


def test_written_results_expand_rows_and_carry_the_verdict(tmp_path: Path) -> None:
    spec = ResultsSpec(sort=["stage", "mean_time"], baseline={"mean_time": Baseline(value=2.0, tolerance=0.1)})
    rows: list[dict[str, object]] = [
        {"task": "a", "stage": "suites", "state": "done",
         MATCH_ROWS: [{"mean_time": 2.5, FAILED_CASE: False}, {"mean_time": None, FAILED_CASE: True}]},
        {"task": "b", "stage": "regression", "state": "done", "mean_time": 1.9},
    ]
    columns = select_columns(spec, [], ["mean_time", FAILED_CASE])
    assert columns[:3] == ["mean_time", FAILED_CASE, "verdict"]
    write_results(tmp_path, rows, ["task", "stage", *columns[:3]], spec)
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.reader(f))
    assert table == [["task", "stage", "mean_time", FAILED_CASE, "verdict"],
                     ["b", "regression", "1.9", "", "ok"],
                     ["a", "suites", "2.5", "false", "regressed by 25%"],
                     ["a", "suites", "", "true", "failed"]]
    assert MATCH_ROWS in rows[0]  # the engine's rows are not changed
    assert "@rows" not in (tmp_path / "results.json").read_text()


# -- the Petals TSV with the shipped recipes' metrics ------------------------------------------------------


@pytest.mark.parametrize("recipe", ["petals-swarm.toml", "local/petals-swarm.toml"])
def test_petals_tsv_parses_into_named_columns_and_throughput_per_server(recipe: str) -> None:
    text = (RECIPES / recipe).read_text()
    # The real recipe's shape values are per-trial placeholders; the metrics are what this test reads.
    text = re.sub(r'^(delay|rate|limit) = "\{\w+\}"$', lambda m: {"delay": 'delay = "10ms"', "rate": 'rate = "1gbit"',
                                                                  "limit": "limit = 225000"}[m[1]], text, flags=re.M)
    from remote.recipe_loader import parse_recipe  # noqa: PLC0415

    loaded = parse_recipe(text, RECIPES / recipe)
    ex = recipe_extractor(loaded, "fetch")
    (template, names), = ex.file_metrics()
    assert names == "batch_size, num_micro_batches, num_processes, seq_len, max_tokens, throughput, latency"
    ex.feed_file(template, (GOLDEN / "petals_out.tsv").read_bytes())
    ex.finish({"swarm.servers": 2, "name": "10ms-1gbit"})
    rows = finish_rows([{"name": "10ms-1gbit", "state": "done", **ex.values}], loaded.recipe.results)
    assert [{k: r[k] for k in ("batch_size", "num_micro_batches", "num_processes", "seq_len", "max_tokens",
                               "throughput", "latency", "throughput_per_server")} for r in rows] == [
        {"batch_size": 1, "num_micro_batches": 2, "num_processes": 6, "seq_len": 128, "max_tokens": 128,
         "throughput": 18.42, "latency": 0.3257, "throughput_per_server": 9.21},
        {"batch_size": 1, "num_micro_batches": 2, "num_processes": 6, "seq_len": 512, "max_tokens": 128,
         "throughput": 14.07, "latency": 0.4264, "throughput_per_server": 7.035},
    ]
    assert ex.conversion_errors == []


# -- benchfleet check on the real-cluster recipes ----------------------------------------------------------


def test_check_alpa_suites_plans_every_suite_into_one_queue() -> None:
    result = cli("check", str(RECIPES / "alpa-suites.toml"), "--assume-gpus", "8")
    assert result.returncode == 0, result.stderr
    assert "alpa-suites" in result.stdout and "16 slot(s)" in result.stdout
    queue = result.stdout.split("stage suites")[1]
    assert re.search(r"head:\d\s+3 task\(s\)\n\s+suite=gpt\.perf_test_auto\n\s+suite=moe\.perf_test_auto\n"
                     r"\s+suite=wresnet\.perf_test_auto", queue), queue


@pytest.mark.parametrize("setup", [("10ms", "1gbit", 225000), ("10ms", "100mbit", 22500),
                                   ("100ms", "100mbit", 2250000)])
def test_check_petals_swarm_passes_with_each_setups_shaping(tmp_path: Path, setup: tuple[str, str, int]) -> None:
    delay, rate, limit = setup
    text = (RECIPES / "petals-swarm.toml").read_text()
    text = text.replace('delay = "{delay}"', f'delay = "{delay}"').replace('rate = "{rate}"', f'rate = "{rate}"')
    text = text.replace('limit = "{limit}"', f"limit = {limit}")
    path = tmp_path / "petals-swarm.toml"
    path.write_text(text)
    result = cli("check", str(path), "--assume-gpus", "8")
    assert result.returncode == 0, result.stderr
    assert "3 task(s)" in result.stdout.split("stage swarm")[1]  # the DHT and a server on each GPU host


def test_check_petals_swarm_as_shipped() -> None:
    """The three network setups fill the shape stage's delay/rate/limit from each trial."""
    result = cli("check", str(RECIPES / "petals-swarm.toml"), "--assume-gpus", "8")
    assert result.returncode == 0, result.stderr


# -- the local variants, end to end ------------------------------------------------------------------------




def local_copy(name: str, tmp_path: Path, replacements: dict[str, str]) -> Path:
    """The local recipe with the stand-ins' absolute path (the copy lives elsewhere) and test-only values."""
    text = (RECIPES / "local" / name).read_text().replace("{recipe_dir}/../workloads", str(WORKLOADS))
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def processes_with(marker: str) -> list[str]:
    """Live processes whose command line holds `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and is_alive(int(proc.name)):
            found.append(cmdline[:160])
    return found


def wait_gone(marker: str, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
def test_local_alpa_suites_on_a_real_ray_cluster(tmp_path: Path) -> None:
    port = free_port()
    prof = tmp_path / "prof"
    recipe = local_copy("alpa-suites.toml", tmp_path, {"port = 6379": f"port = {port}",
                                                        '"/tmp/benchfleet-alpa-prof"': f'"{prof}"'})
    run = tmp_path / "run"
    finished, _events = run_engine(recipe, run)
    assert finished.counts.get("failed", 0) == 0, [the_log(run, "suites.*moe*.log")]
    rows = json.loads((run / "results.json").read_text())
    regression = [r for r in rows if r["stage"] == "regression"]
    suites = [r for r in rows if r["stage"] == "suites"]
    assert len(regression) == 1 and len(suites) == 6  # 3 suites x 2 cases: one row per case
    assert {(r["suite"], r["type"]) for r in suites} == {
        ("gpt.perf_test_auto", "gpt"), ("moe.perf_test_auto", "moe"), ("wresnet.perf_test_auto", "wresnet")}
    assert all(r["gpus"] == 2 and r["state"] == "done" for r in rows)  # {ray.hosts} x {ray.gpus_per_host}
    failed = [r for r in suites if r[FAILED_CASE]]
    assert len(failed) == 1 and failed[0]["suite"] == "moe.perf_test_auto" and failed[0]["microbatch"] == 4
    assert [failed[0][k] for k in ("mean_time", "std_time", "tflops", "peak_mem")] == [None] * 4
    fine = [r for r in rows if not r[FAILED_CASE]]
    assert all(isinstance(r["mean_time"], float) and r["mean_time"] > 0 for r in fine), fine
    (reg,) = regression
    expected = 0.02
    change = (reg["mean_time"] - expected) / expected
    assert reg["verdict"] == ("ok" if abs(change) <= 0.5 else
                              f"{'regressed' if change > 0 else 'improved'} by {abs(change) * 100:.0f}%")
    assert all(r["verdict"] is None for r in suites)
    # The TSVs the stand-in appended hold the same values, in Alpa's column order.
    for suite in ("gpt.perf_test_auto", "moe.perf_test_auto", "wresnet.perf_test_auto"):
        tsv = [line.split("\t") for line in (run / f"{suite}.tsv").read_text().splitlines()]
        ours = [r for r in suites if r["suite"] == suite]
        assert len(tsv) == len(ours) == 2
        for fields, row in zip(tsv, ours, strict=True):
            assert fields[:5] == [row["type"], row["model_config"], str(row["microbatch"]), str(row["gpus"]),
                                  row["parallel_config"]]
            assert fields[7] == f"{row['params']:.3f}B"
            if row[FAILED_CASE]:
                assert (fields[5], fields[8]) == ("-1.000", "-1.00")
            else:
                assert float(fields[5]) == row["mean_time"] and float(fields[8]) == row["tflops"]
    # The profiling database: made once, named after the cluster's shape, linked under Alpa's name.
    assert (prof / "prof_database-local-1x2.pkl").exists()
    assert (prof / "prof_database.pkl").resolve() == (prof / "prof_database-local-1x2.pkl")
    assert "Save profiling database to prof_database-local-1x2.pkl" in the_log(run, "prof_database*.log")
    assert wait_gone(f"--gcs_server_port={port}") == [], "Ray outlived the run"


@pytest.mark.slow
def test_local_petals_swarm_with_real_hivemind(tmp_path: Path) -> None:
    recipe = local_copy("petals-swarm.toml", tmp_path, {})
    run = tmp_path / "run"
    finished, _events = run_engine(recipe, run)
    assert finished.counts.get("failed", 0) == 0
    rows = json.loads((run / "results.json").read_text())
    assert [(r["name"], r["seq_len"]) for r in rows] == [("100mbit", 128), ("100mbit", 512), ("1gbit", 128),
                                                         ("1gbit", 512)]
    for row in rows:
        assert (row["batch_size"], row["num_micro_batches"], row["num_processes"], row["max_tokens"]) == (1, 2, 6, 128)
        assert row["throughput"] > 0 and row["latency"] > 0
        assert row["throughput_per_server"] == pytest.approx(row["throughput"] / 2)  # 2 servers in the swarm
        assert row["rate"] == row["name"]
    assert "Found 2 server(s) for opt-30b in the swarm" in the_log(run, "client.name=1gbit*.log")
    fetched = (run / "fetched" / "1gbit" / "local" / "out_1gbit.tsv").read_text().splitlines()
    assert [line.split("\t")[3] for line in fetched] == ["128", "512"]
    j = Journal(run / "journal.sqlite", readonly=True)
    try:
        peers = {str(d["value"]) for _s, _t, kind, _id, d in j.events(limit=100_000)
                 if kind == "captured" and d["key"] == "swarm.initial_peers"}
    finally:
        j.close()
    # Any free port each trial (dht_port = 0), but one peer id: the identity file in the run directory kept it.
    assert len({p.rsplit("/p2p/", 1)[1] for p in peers}) == 1, peers
    for peer in peers:
        assert wait_gone(peer) == [], "swarm processes outlived the run"
    assert wait_gone(str(run / "swarm-dht.id")) == []
