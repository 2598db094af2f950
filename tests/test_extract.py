"""Extraction: lines from byte streams, typed metrics, done/progress, and the upstream formats in tests/golden."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from remote.extract import LineSplitter, MetricError, MetricSet, TaskExtractor, typed
from remote.recipe import MetricSpec, QueueStage, Recipe

GOLDEN = Path(__file__).parent / "golden"


def split_all(data: bytes, chunk: int | None = None) -> list[str]:
    """Every line of `data`, fed whole or in chunks of `chunk` bytes."""
    splitter = LineSplitter()
    lines: list[str] = []
    step = chunk or max(len(data), 1)
    for i in range(0, len(data), step):
        lines += splitter.feed(data[i : i + step])
    return lines + splitter.flush()


def make_recipe(metrics: dict[str, str | MetricSpec]) -> Recipe:
    stage = QueueStage(kind="queue", command="true")
    return Recipe(name="t", stage=[stage], metrics=metrics)


def extract(
    metrics: dict[str, str | MetricSpec],
    data: bytes,
    *,
    stage: str = "queue",
    done: str | None = None,
    progress: str | None = None,
) -> TaskExtractor:
    ex = TaskExtractor(MetricSet.from_recipe(make_recipe(metrics)), stage, done=done, progress=progress)
    ex.feed_lines(split_all(data))
    return ex


# ---- LineSplitter ---------------------------------------------------------------------------------------


def test_tqdm_bar_then_result_on_same_stream_gives_a_clean_line() -> None:
    data = b"\r 30%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88   | 3/10\r100%|##########| 10/10\rTokens/second 48.4\n"
    lines = split_all(data)
    assert lines[-1] == "Tokens/second 48.4"
    assert lines[:2] == [" 30%|███   | 3/10", "100%|##########| 10/10"]


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"first\r") == ["first"]
    assert splitter.feed(b"\nsecond\r\n") == ["second"]
    assert splitter.flush() == []


def test_blank_crlf_line_split_across_chunks_is_kept() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"a\n\r") == ["a"]
    assert splitter.feed(b"\nb\n") == ["", "b"]


def test_utf8_split_byte_by_byte_decodes() -> None:
    text = "Warming up: 100%|██████████| 1/1 — naïve ✓\n"
    assert split_all(text.encode(), chunk=1) == [text.rstrip("\n")]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert split_all(b"ok \xff\xfe bytes\n") == ["ok \ufffd\ufffd bytes"]


def test_ansi_colour_codes_are_stripped() -> None:
    data = b"\x1b[32mINFO\x1b[0m Running a DHT instance \x1b[1;31m--initial_peers\x1b[0m /ip4/1.2.3.4\n"
    assert split_all(data) == ["INFO Running a DHT instance --initial_peers /ip4/1.2.3.4"]


def test_blank_lines_kept_for_newline_but_not_for_repeated_cr() -> None:
    assert split_all(b"a\n\nb\r\r\rc\r\n\r\nd") == ["a", "", "b", "c", "", "d"]


def test_flush_returns_trailing_partial_line_once() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"done on GPU_3") == []
    assert splitter.flush() == ["done on GPU_3"]
    assert splitter.flush() == []


def test_flush_completes_a_utf8_sequence_cut_at_end_of_stream() -> None:
    splitter = LineSplitter()
    assert splitter.feed("x█".encode()[:-1]) == []
    assert splitter.flush() == ["x\ufffd"]


@given(
    st.lists(st.sampled_from([b"a", b"\xc3\xa9", b"\xe2\x96\x88", b"\r", b"\n", b"\r\n", b"\x1b[31m", b" 3/10"])),
    st.integers(min_value=1, max_value=7),
)
def test_chunking_never_changes_the_lines(parts: list[bytes], chunk: int) -> None:
    data = b"".join(parts)
    assert split_all(data, chunk=chunk) == split_all(data)


# ---- typed -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("8", "int", 8),
        (" -3 ", "int", -3),
        ("8.0", "int", None),
        ("1_000", "int", None),
        ("48.409", "float", 48.409),
        ("1e-3", "float", 0.001),
        ("-1.000", "float", -1.0),
        ("1", "float", 1.0),
        (".5", "float", 0.5),
        ("2.649B", "float", None),
        ("nan", "float", None),
        ("inf", "float", None),
        ("", "float", None),
        ("48.409 ", "str", "48.409 "),
    ],
)
def test_typed(text: str, kind: str, expected: object) -> None:
    value = typed(text, kind)
    assert value == expected
    assert type(value) is type(expected)


# ---- MetricSet ---------------------------------------------------------------------------------------------


def test_metric_names_from_named_groups_single_group_and_shorthand() -> None:
    ms = MetricSet.from_recipe(
        make_recipe(
            {
                "beam": MetricSpec(regex=r"beamwidth(?P<beam_width>\d+)_beamlen(?P<beam_length>\d+)", type="int"),
                "tokens_per_sec": r"^Tokens/second\s+(\S+)",
                "total_tps": MetricSpec.model_validate({"json": "metrics.total_tps", "file": "out.json"}),
            }
        )
    )
    assert ms.metric_names() == ["beam_width", "beam_length", "tokens_per_sec", "total_tps"]


def test_for_stage_restricts_stage_bound_metrics() -> None:
    ms = MetricSet(
        {
            "everywhere": r"x=(\d+)",
            "client_only": MetricSpec(regex=r"tput=(\S+)", stage="client"),
        }
    )
    assert [m.key for m in ms.for_stage("client")] == ["everywhere", "client_only"]
    assert [m.key for m in ms.for_stage("servers")] == ["everywhere"]


def test_metric_without_regex_or_json_is_one_line_error() -> None:
    with pytest.raises(MetricError, match=r"^metrics\.tput: needs `regex`"):
        MetricSet({"tput": MetricSpec(file="out.tsv")})


def test_two_metrics_yielding_one_name_is_an_error() -> None:
    with pytest.raises(MetricError, match=r"also produced by metrics\.a"):
        MetricSet({"a": r"(?P<x>\d+)", "x": r"x=(\d+)"})


def test_progress_regex_needs_two_groups() -> None:
    with pytest.raises(MetricError, match="two groups"):
        TaskExtractor(MetricSet({}), "queue", done=None, progress=r"step (\d+)")


# ---- TaskExtractor: lines ----------------------------------------------------------------------------------


def test_anchored_regex_applies_per_line_and_last_match_wins() -> None:
    ex = extract({"tps": r"^Tokens/second\s+(\S+)"}, b"x Tokens/second 1\nTokens/second 2.5\nTokens/second 3\n")
    assert ex.values == {"tps": 3.0}


def test_last_false_keeps_first_match() -> None:
    ex = extract({"tps": MetricSpec(regex=r"^tps (\S+)", last=False)}, b"tps 1\ntps 2\n")
    assert ex.values == {"tps": 1.0}


def test_text_that_does_not_convert_is_missing_and_reported() -> None:
    ex = extract({"tflops": r"TFLOPs: (\S+)"}, b"TFLOPs: 37.16\nTFLOPs: n/a\n")
    assert "tflops" not in ex.values
    assert ex.conversion_errors == ["tflops: 'n/a' is not a float"]


def test_feed_lines_reports_only_visible_changes() -> None:
    ex = TaskExtractor(MetricSet({"tps": r"tps (\S+)"}), "queue", done="^finished", progress=None)
    assert ex.feed_lines(["tps 1"]) is True
    assert ex.feed_lines(["tps 1", "noise"]) is False
    assert ex.feed_lines(["step 1/4"]) is True
    assert ex.feed_lines(["step 1/4"]) is False
    assert ex.feed_lines(["finished"]) is True
    assert ex.done_seen
    assert ex.feed_lines(["finished"]) is False
    assert ex.lines_seen == 7
    assert ex.last_line == "finished"


def test_done_regex_must_match_for_done_seen() -> None:
    ex = extract({}, b"Tokens per second 3\n  Tokens/second 3\n", done="^Tokens/second")
    assert not ex.done_seen
    assert ex.last_line == "  Tokens/second 3"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Benchmarking: 3/10", (3, 10)),
        (" 30%|███   | 3/10 [00:01<00:02, 2.1it/s]", (3, 10)),
        ("Warming up: 1/2", (1, 2)),
        ("Epoch 1/3: 7/10 [00:01<00:02]", (7, 10)),
        ("2024/01/02 started", None),
        ("reading runs/3/10/log", None),
        ("a/b and c/d", None),
        ("loss 12.5/100.0", None),
        (" 0.0/32.0 GPU", None),
        ("x1/2 vs 1/2x", None),
        ("ratio 5/3", None),
        ("0/0", None),
        ("22-Nov-26 16:03:05.304 I benchmark_llm_offline.py:383 pace-llm-benchmark: Running", None),
    ],
)
def test_default_progress(line: str, expected: tuple[int, int] | None) -> None:
    ex = TaskExtractor(MetricSet({}), "queue", done=None, progress=None)
    ex.feed_lines([line])
    assert ex.progress == expected


def test_custom_progress_regex_with_named_or_plain_groups() -> None:
    named = TaskExtractor(MetricSet({}), "q", done=None, progress=r"of (?P<total>\d+), at (?P<done>\d+)")
    named.feed_lines(["of 9, at 4"])
    assert named.progress == (4, 9)
    plain = TaskExtractor(MetricSet({}), "q", done=None, progress=r"case (\d+) of (\d+)")
    plain.feed_lines(["Benchmarking: 3/10", "case 2 of 5"])
    assert plain.progress == (2, 5)


def test_json_log_lines_with_list_index_path() -> None:
    data = b'noise\n{"items": [{"x": 1}, {"x": 2.5}]}\n{"other": 1}\n'
    ex = extract({"x": MetricSpec.model_validate({"json": "items.1.x"})}, data)
    assert ex.values == {"x": 2.5}


def test_json_with_regex_reads_json_after_a_log_prefix() -> None:
    spec = MetricSpec.model_validate({"regex": r"result: (\{.*\})", "json": "tps", "type": "int"})
    ex = extract({"tps": spec}, b'12:00 INFO result: {"tps": 7}\n')
    assert ex.values == {"tps": 7}


def test_metrics_of_another_stage_are_not_applied() -> None:
    ex = extract({"tps": MetricSpec(regex=r"tps (\S+)", stage="client")}, b"tps 3\n", stage="servers")
    assert ex.values == {}


# ---- golden samples --------------------------------------------------------------------------------------


def test_redrafter_task_log() -> None:
    ex = extract(
        {
            "beam": MetricSpec(regex=r"Title: beamwidth(?P<beam_width>\d+)_beamlen(?P<beam_length>\d+)", type="int"),
            "average_num_accepted_tokens": r"Average number of tokens per step: +(\S+)",
            "acceptance_rate": r"Average draft head acceptance rate \(%\): +(\S+)",
            "verify_seconds": r"^verify_candidates: +(\S+)",
            "tokens_per_sec": MetricSpec(regex=r"^Tokens/second +(.*)", type="str"),
        },
        (GOLDEN / "redrafter_task.log").read_bytes(),
        done="^Tokens/second",
    )
    assert ex.values == {
        "beam_width": 4,
        "beam_length": 3,
        "average_num_accepted_tokens": 1.0,
        "acceptance_rate": 0.0,
        "verify_seconds": 0.0062,
        "tokens_per_sec": "48.409",
    }
    assert ex.done_seen
    assert ex.progress == (4, 4)
    assert ex.last_line == "---------------------------------------  ------"
    assert ex.conversion_errors == []


ALPA_RESULT = (
    r"#Microbatch: (?P<num_micro_batches>\d+)  #GPU: (?P<num_gpus>\d+)  .*"
    r"Mean Time \(s\): (?P<mean_time>\S+)  Std Time \(s\): (?P<std_time>\S+)  "
    r"#Params \(Billion\): (?P<params_billion>[\d.]+)B  TFLOPs: (?P<tflops>\S+)  Peak Mem \(GB\): (?P<peak_mem>\S+)"
)


def test_alpa_result_lines_last_case_failed() -> None:
    data = (GOLDEN / "alpa_cases.log").read_bytes()
    ex = extract({"alpa": ALPA_RESULT}, data)
    assert ex.values == {
        "num_micro_batches": 1.0,
        "num_gpus": 8.0,
        "mean_time": -1.0,
        "std_time": -1.0,
        "params_billion": 6.658,
        "tflops": -1.0,
        "peak_mem": -1.0,
    }
    assert ex.conversion_errors == []


def test_alpa_first_case_and_params_with_unit_suffix() -> None:
    data = (GOLDEN / "alpa_cases.log").read_bytes()
    first = extract({"alpa": MetricSpec(regex=ALPA_RESULT, last=False)}, data)
    assert (first.values["mean_time"], first.values["tflops"], first.values["peak_mem"]) == (2.454, 37.16, 8.745)
    with_unit = extract({"params": r"#Params \(Billion\): (\S+)"}, data)
    assert "params" not in with_unit.values
    assert with_unit.conversion_errors[-1] == "params: '6.658B' is not a float"


def test_petals_tsv_file_metric() -> None:
    regex = (
        r"^(?P<batch_size>\d+)\t(?P<num_micro_batches>\d+)\t(?P<num_processes>\d+)\t(?P<seq_len>\d+)\t"
        r"(?P<max_tokens>\d+)\t(?P<throughput>[^\t]+)\t(?P<latency>[^\t]+)$"
    )
    ms = MetricSet({"petals": MetricSpec(regex=regex, file="{out}.tsv")})
    ex = TaskExtractor(ms, "client", done=None, progress=None)
    ex.feed_lines(["1\t2\t6\t999\t1\t1.0\t1.0"])  # a file metric never reads the log
    assert ex.values == {}
    assert ex.file_metrics() == [
        ("{out}.tsv", "batch_size, num_micro_batches, num_processes, seq_len, max_tokens, throughput, latency")
    ]
    ex.feed_file("{out}.tsv", (GOLDEN / "petals_out.tsv").read_bytes())
    assert ex.values == {
        "batch_size": 1.0,
        "num_micro_batches": 2.0,
        "num_processes": 6.0,
        "seq_len": 512.0,
        "max_tokens": 128.0,
        "throughput": 14.07,
        "latency": 0.4264,
    }


def pace_extractor() -> TaskExtractor:
    def spec(path: str, kind: str = "float") -> MetricSpec:
        return MetricSpec.model_validate({"json": path, "file": "results/out.json", "type": kind})

    ms = MetricSet(
        {
            "framework": spec("benchmark_results.0.framework", "str"),
            "total_tps": spec("benchmark_results.0.metrics.total_tps"),
            "output_tps": spec("benchmark_results.0.metrics.output_tps"),
            "total_tokens": spec("benchmark_results.0.metrics.total_tokens", "int"),
            "peak_ram": spec("benchmark_results.0.system_metrics.peak_ram_usage"),
            "hf_tps": spec("benchmark_results.1.metrics.total_tps"),
            "hf_peak_ram": spec("benchmark_results.1.system_metrics.peak_ram_usage"),
            "last_token_time": spec("benchmark_results.-1.metrics.time_per_tokens.-1"),
        }
    )
    return TaskExtractor(ms, "run", done=None, progress=None)


def test_pace_results_json_paths() -> None:
    ex = pace_extractor()
    assert [path for path, _ in ex.file_metrics()] == ["results/out.json"]
    ex.feed_file("results/out.json", (GOLDEN / "pace_results.json").read_bytes())
    assert ex.values == {
        "framework": "pace",
        "total_tps": 314.03,
        "output_tps": 34.89,
        "total_tokens": 576,
        "peak_ram": 2110.0,
        "hf_tps": 188.75,
        "last_token_time": 0.042,
    }
    assert ex.conversion_errors == []  # hf's system_metrics is null: missing, not an error


def test_bad_result_file_records_an_error_without_raising() -> None:
    ex = pace_extractor()
    ex.feed_file("results/out.json", b'{"benchmark_results": [')
    assert ex.values == {}
    assert ex.conversion_errors[0].startswith("results/out.json: not valid JSON")
    ex2 = pace_extractor()
    ex2.feed_file("results/out.json", b'{"benchmark_results": []}')
    assert "results/out.json: no value at 'benchmark_results.0.metrics.total_tps' (metrics.total_tps)" in (
        ex2.conversion_errors
    )


def test_pace_run_log_progress_and_done() -> None:
    ex = extract({}, (GOLDEN / "pace_run.log").read_bytes(), done=r"Results saved to: \S+")
    assert ex.done_seen
    assert ex.progress == (3, 3)
    assert ex.last_line.endswith("Results saved to: ./benchmark_results/facebook_opt-125m_20261122_160323.json")


def test_pace_progress_follows_the_bar() -> None:
    ex = TaskExtractor(MetricSet({}), "run", done=None, progress=None)
    seen = []
    for line in split_all((GOLDEN / "pace_run.log").read_bytes()):
        if ex.feed_lines([line]):
            seen.append(ex.progress)
    assert seen[:6] == [(0, 1), (1, 1), (0, 3), (1, 3), (2, 3), (3, 3)]


def test_deserve_final_json_line() -> None:
    ex = extract(
        {
            "input_tput": MetricSpec.model_validate({"json": "real_input_throughput"}),
            "output_tput": MetricSpec.model_validate({"json": "real_output_throughput"}),
            "time_used": MetricSpec.model_validate({"json": "time_used"}),
            "finished": MetricSpec.model_validate({"json": "requests_finished_total", "type": "int"}),
            "standard": MetricSpec.model_validate({"json": "standard_output_throughput"}),
            "stage_ms": r"Avg stage time: ([\d.]+)ms",
        },
        (GOLDEN / "deserve_client.log").read_bytes(),
    )
    assert ex.values == {
        "input_tput": 10516.33,
        "output_tput": 5258.17,
        "time_used": 24.93,
        "finished": 512,
        "standard": -1.0,
        "stage_ms": 34.87,
    }
