"""List metrics (`type = "list"`): PACE's time_per_tokens, cpu_usage and ram_usage, from JSON files, JSON log
lines and captured text; the recipe rules that keep them to line plots; results.csv/json; and the lines drawn
from them, one per row, by the console's plot data and the exported plots."""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from console.rundata import format_value, plot_title, series_data, x_label
from remote.extract import MetricError, MetricSet, typed
from remote.recipe import MetricSpec, PlotSpec, ResultsSpec
from remote.results import format_cell, write_results
from tests.conftest import cli, extractor
from tests.test_recipe_loader import STAGE, check_error

Writer = Callable[..., Path]
GOLDEN = Path(__file__).parent / "golden"


# -- typing and extraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[0.5, 2, 1e-3]", [0.5, 2.0, 0.001]),
        (" [] ", []),
        ("[0.1, true]", None),  # a bool is not a number
        ('[0.1, "2"]', None),
        ("[0.1, null]", None),  # one bad item makes the whole value missing, not a shorter list
        ("[NaN]", None),
        ("[[1, 2]]", None),
        ("0.5", None),
        ("(0.5, 1)", None),
    ],
)
def test_typed_list(text: str, expected: list[float] | None) -> None:
    assert typed(text, "list") == expected


def test_pace_lists_from_the_results_file() -> None:
    def spec(path: str, kind: str = "list") -> MetricSpec:
        return MetricSpec.model_validate({"file": "out.json", "json": f"benchmark_results.{path}", "type": kind})

    ex = extractor({
        "time_per_tokens": spec("0.metrics.time_per_tokens"),
        "cpu_usage": spec("0.system_metrics.cpu_usage"),
        "interval": spec("0.system_metrics.interval", "float"),
        "hf_cpu_usage": spec("1.system_metrics.cpu_usage"),  # hf's system_metrics is null: missing, no error
    })
    doc = json.loads((GOLDEN / "pace_results.json").read_text())
    ex.feed_file("out.json", (GOLDEN / "pace_results.json").read_bytes())
    pace = doc["benchmark_results"][0]
    assert ex.values == {
        "time_per_tokens": [float(v) for v in pace["metrics"]["time_per_tokens"]],
        "cpu_usage": [float(v) for v in pace["system_metrics"]["cpu_usage"]],
        "interval": float(pace["system_metrics"]["interval"]),
    }
    times = ex.values["time_per_tokens"]
    assert isinstance(times, list) and all(isinstance(v, float) for v in times)
    assert ex.conversion_errors == []


def test_lists_from_json_log_lines_and_captured_text() -> None:
    ex = extractor({
        "lat": MetricSpec(json_path="lat", type="list"),
        "tpt": MetricSpec(regex=r"^time per token: (\[.*\])$", type="list"),
    })
    ex.feed_lines(['{"lat": [3, 2.5]}', "time per token: [0.25, 0.5]", '{"lat": [1, 2, 3]}'])
    assert ex.values == {"lat": [1.0, 2.0, 3.0], "tpt": [0.25, 0.5]}  # the last match wins, as for numbers


def test_items_that_are_not_numbers_are_a_conversion_error_not_a_guess() -> None:
    ex = extractor({"lat": MetricSpec(json_path="lat", type="list"), "tps": MetricSpec(json_path="tps")})
    ex.feed_lines(['{"lat": [0.1, "fast"], "tps": [1, 2]}'])
    assert ex.values == {}
    assert ex.conversion_errors == [
        "lat: '[0.1, \"fast\"]' is not a list of numbers",
        'tps: \'[1, 2]\' is not a float; a list needs type = "list"',
    ]


def test_a_derived_value_is_never_a_list() -> None:
    with pytest.raises(MetricError, match=r'metrics.d: a derived value is a number; expected type = "float"'):
        MetricSet({"lat": MetricSpec(json_path="lat", type="list"), "d": MetricSpec(expr="2 * 3", type="list")})


# -- recipe rules --------------------------------------------------------------------------------------------

LIST = STAGE + '[metrics]\nlat = { json = "lat", type = "list" }\ntps = { json = "tps" }\niv = { json = "iv" }\n'


@pytest.mark.parametrize(
    ("text", "field", "fragments"),
    [
        pytest.param(LIST + '[[plot]]\nkind = "bar"\nx = "a"\ny = "lat"  # <-\n', "plot[0].y",
                     ["'lat' is a list metric", 'expected kind = "line" with y = \'lat\''], id="bar-of-a-list"),
        pytest.param(LIST + '[[plot]]\nkind = "heatmap"\nx = "a"\ny = "a"\nvalue = "lat"  # <-\n',
                     "plot[0].value", ["'lat' is a list metric"], id="heatmap-of-a-list"),
        pytest.param(LIST + '[[plot]]\nkind = "line"\nx = "a"\ny = "tps"\ngroup = "lat"  # <-\n', "plot[0].group",
                     ["'lat' is a list metric", "expected a column with one value per row"], id="group-by-a-list"),
        pytest.param(LIST + '[[plot]]\nkind = "line"\ny = "lat"\nx = "a"  # <-\n', "plot[0].x",
                     ["its line runs over the items' positions", "expected no x"], id="list-line-with-x"),
        pytest.param(LIST + '[[plot]]\nkind = "line"\nx = "a"\ny = "tps"\nstep = 0.5  # <-\n', "plot[0].step",
                     ["step spaces the items of a list metric", "expected it only on a line"],
                     id="step-on-a-line-of-numbers"),
        pytest.param(LIST + '[[plot]]\nkind = "line"\ny = "lat"\nstep = "intv"  # <-\n', "plot[0].step",
                     ["unknown column 'intv'", "did you mean 'iv'"], id="step-column-unknown"),
        pytest.param(LIST + '[[plot]]\nkind = "line"\ny = "lat"\nstep = "lat"  # <-\n', "plot[0].step",
                     ["'lat' is a list metric"], id="step-column-is-a-list"),
        pytest.param(LIST + '[[plot]]  # <-\nkind = "line"\ny = "tps"\n', "plot[0].x",
                     ["missing field 'x': a line plot needs x and y", 'expected x = "<column>"'],
                     id="line-of-numbers-without-x"),
        pytest.param(LIST + '[results]\nsort = ["-lat"]  # <-\n', "results.sort[0]",
                     ["'lat' is a list metric and has no order"], id="sort-by-a-list"),
        pytest.param(LIST + '[results.baseline]\nlat = { value = 1.0 }  # <-\n', "results.baseline.lat",
                     ["'lat' is a list metric", "expected a metric with one number per row"],
                     id="baseline-of-a-list"),
        pytest.param(LIST + 'd = { expr = "lat * 2" }  # <-\n', "metrics.d.expr",
                     ["'lat' is a list metric", "not a number"], id="expr-reads-a-list"),
        pytest.param(LIST + 'd = { expr = "tps * 2", type = "list" }  # <-\n', "metrics.d.type",
                     ["a derived value (expr) is a number"], id="expr-typed-as-list"),
        pytest.param(LIST + 'x = { json = "x", type = "lists" }  # <-\n', "metrics.x.type",
                     ["got \"lists\" (did you mean 'list'?)", "expected one of: float, int, str, list"],
                     id="unknown-type"),
        pytest.param(LIST + '[[plot]]\nkind = "line"\ny = "lat"\nstep = 0  # <-\n', "plot[0].step",
                     ["got 0", "a positive number or a numeric column"], id="step-zero"),
    ],
)
def test_list_metric_rules(tmp_path: Path, text: str, field: str, fragments: list[str]) -> None:
    check_error(tmp_path, text, field, *fragments)


# -- results -------------------------------------------------------------------------------------------------


def test_results_keep_lists_as_json(tmp_path: Path) -> None:
    assert format_cell([0.5, 1.0], None) == "[0.5, 1.0]"
    assert format_cell([0.5, float("nan")], "%.2f") == "[0.5, null]"  # a printf format is for numbers
    rows: list[dict[str, object]] = [{"a": 1, "lat": [0.5, 0.25]}, {"a": 2, "lat": None}]
    csv_path, json_path = write_results(tmp_path, rows, ["a", "lat"], ResultsSpec())
    assert list(csv.reader(csv_path.open())) == [["a", "lat"], ["1", "[0.5, 0.25]"], ["2", ""]]
    assert json.loads(json_path.read_text()) == [{"a": 1, "lat": [0.5, 0.25]}, {"a": 2, "lat": None}]
    assert format_value([0.5, 0.25, 0.75]) == "[3] mean 0.5"
    assert format_value([]) == "[0]"


# -- plot data -----------------------------------------------------------------------------------------------


def test_a_list_line_is_one_series_per_row_over_positions() -> None:
    rows: list[dict[str, object]] = [
        {"trial": "pace", "label": "t1", "tpt": [0.5, 0.25, 0.25]},
        {"trial": "hf", "label": "t2", "tpt": [1.0, 0.5]},
        {"trial": "off", "label": "t3", "tpt": None},  # the monitor was off: no line, no error
        {"trial": "bad", "label": "t4", "tpt": "n/a"},
    ]
    spec = PlotSpec(kind="line", y="tpt")
    series = series_data(rows, spec)
    assert [(s.name, s.xs, s.ys) for s in series] == [
        ("pace", (1, 2, 3), (0.5, 0.25, 0.25)),
        ("hf", (1, 2), (1.0, 0.5)),
    ]
    assert x_label(spec) == "item" and plot_title(spec) == "tpt by item"


def test_step_spaces_items_by_a_number_or_by_each_rows_column() -> None:
    rows: list[dict[str, object]] = [
        {"framework": "pace", "host": "a", "cpu": [10.0, 20.0, 30.0], "interval": 0.5},
        {"framework": "pace", "host": "b", "cpu": [15.0, 25.0], "interval": 0.2},
        {"framework": "hf", "host": "a", "cpu": [5.0], "interval": None},  # no spacing known: no line
    ]
    by_column = series_data(rows, PlotSpec(kind="line", y="cpu", step="interval", group="framework",
                                           xlabel="seconds"))
    # Two pace rows: the host tells their lines apart.
    assert [(s.name, s.xs) for s in by_column] == [("pace @ a", (0.0, 0.5, 1.0)), ("pace @ b", (0.0, 0.2))]
    fixed = PlotSpec(kind="line", y="cpu", step=0.1, group="framework")
    assert [s.xs for s in series_data(rows, fixed)] == [(0.0, 0.1, 0.2), (0.0, 0.1), (0.0,)]
    assert x_label(fixed) == "item x 0.1"
    same: list[dict[str, object]] = [{"framework": "hf", "cpu": [1.0]}, {"framework": "hf", "cpu": [2.0]}]
    assert [s.name for s in series_data(same, fixed)] == ["hf #1", "hf #2"]


# -- end to end: engine, results files, exported plots -------------------------------------------------------


def test_headless_run_extracts_lists_and_draws_their_lines(write_recipe: Writer, tmp_path: Path) -> None:
    recipe = write_recipe(r"""
        name = "lists"
        [hosts.here]
        gpus = 2
        [[stage]]
        kind = "queue"
        grid = { a = [1, 2] }
        command = ["sh", "-c", 'printf "{{\"lat\": [%s, 0.5, 0.25], \"iv\": 0.5}}\n" "$1"', "sh", "{a}"]
        [metrics]
        lat = { json = "lat", type = "list" }
        iv = { json = "iv" }
        cpu = { json = "cpu", type = "list" }
        [results]
        columns = ["a", "lat", "iv", "cpu"]
        sort = ["a"]
        [[plot]]
        kind = "line"
        title = "latency per token"
        y = "lat"
        group = "a"
        xlabel = "token"
        [[plot]]
        kind = "line"
        title = "latency over time"
        y = "lat"
        step = "iv"
        group = "a"
        [[plot]]
        kind = "line"
        title = "cpu"
        y = "cpu"
    """)
    run = tmp_path / "run"
    result = cli("--recipe", str(recipe), "--run-dir", str(run))
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(csv.reader((run / "results.csv").open())) == [
        ["a", "lat", "iv", "cpu"], ["1", "[1.0, 0.5, 0.25]", "0.5", ""], ["2", "[2.0, 0.5, 0.25]", "0.5", ""],
    ]
    assert [r["lat"] for r in json.loads((run / "results.json").read_text())] == [[1.0, 0.5, 0.25],
                                                                                  [2.0, 0.5, 0.25]]
    plots = run / "plots"
    per_token = (plots / "1-latency_per_token.txt").read_text()
    lines = per_token.splitlines()
    assert lines[0].strip() == "latency per token"
    assert "• 1" in per_token and "+ 2" in per_token  # the legend: a marker per line, since text has no colour
    assert "\x1b" not in per_token
    assert "token" in lines[-1]
    over_time = (plots / "2-latency_over_time.txt").read_text()
    assert "item x iv" in over_time.splitlines()[-1]
    # x runs over 0, 0.5, 1.0 seconds: the axis ends at 1.0, where the positions would end at 3.
    assert "1.00" in over_time.splitlines()[-2] and "3.0" not in over_time.splitlines()[-2]
    assert (plots / "3-cpu.txt").read_text() == "cpu\nno values of cpu in the results\n"
    pngs = sorted(p.name for p in plots.glob("*.png"))
    if importlib.util.find_spec("matplotlib") is not None:
        assert pngs == ["1-latency_per_token.png", "2-latency_over_time.png"]  # nothing to draw for cpu
