"""ReDrafter parity: our results.csv equals what upstream's make_csv.awk + sort make of the same task logs."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from remote.extract import LineSplitter, MetricSet, TaskExtractor
from remote.recipe import MetricSpec, QueueStage, Recipe, ResultsSpec
from remote.results import select_columns, write_results

# make_csv.awk as the ReDrafter seed describes it (gawk only: gensub), written here from that description;
# test_recipe_redrafter_deserve runs it on a real run's logs too.
MAKE_CSV_AWK = r"""
BEGIN { print "beam_width, beam_length, average_num_accepted_tokens, tokens_per_sec" }
/Title: beamwidth/ {
  printf "%d, %d, ", gensub(/.*beamwidth([0-9]+)_beamlen([0-9]+).*/, "\\1", 1), \
                     gensub(/.*beamwidth([0-9]+)_beamlen([0-9]+).*/, "\\2", 1)
}
/Average number of tokens per step:/ { printf "%f, ", gensub(/.*: +/, "", 1) }
/Tokens\/second/ { printf "%s\n", gensub(/^Tokens\/second +/, "", 1) }
"""

# (beam_width, beam_length, accepted tokens as tabulate prints them, tokens/s as printed)
TASKS = [
    (1, 2, "1", "48.409"),
    (4, 3, "1", "103.2"),
    (2, 2, "1.25", "61.7"),
    (16, 2, "2.3333", "98.05"),
    (3, 10, "1.8", "77"),
    (48, 16, "3.0625", "120.44"),
    (10, 4, "2.1", "88.321"),
    (1, 16, "1", "40.12"),
    (2, 15, "1.5", "55.5"),
    (12, 2, "1.75", "90.003"),
    (5, 5, "2.3333", "100"),
    (3, 2, "1.125", "66.6"),
]
GPUS = 4


def table(width: int, length: int, accepted: str, tps: str) -> str:
    """The tabulate output of recurrent_drafting.cmd.generate: right-aligned values, 39-wide labels."""
    values = [
        ("Average number of tokens per step:", accepted),
        ("Average draft head acceptance rate (%):", f"{(float(accepted) - 1) / length * 100:.4g}"),
        ("generate_candidates:", "0.011"),
        ("verify_candidates:", "0.0062"),
        ("accept_candidate_tokens:", "0.0034"),
        ("Tokens/second", tps),
    ]
    cells = max(len(v) for _, v in values)
    rows = [f"{label:<39}  {value:>{cells}}" for label, value in values]
    rule = "-" * 39 + "  " + "-" * cells
    return "\n".join(
        [f"Title: beamwidth{width}_beamlen{length}", rule, *rows[:2], rule, "Wall time (seconds) per step", "",
         *rows[2:5], rule, rows[5], rule, ""]
    )  # fmt: skip


def task_log(i: int, width: int, length: int, accepted: str, tps: str) -> bytes:
    """One task's merged stdout/stderr; every other task has tqdm `\\r` redraws on their own `\\n`-ended line."""
    text = f"INFO:recurrent_drafting:beam_width={width} beam_length={length} max_num_prompts=32 batch_size=8\n"
    if i % 2 == 0:
        text += "".join(f"\r{25 * k:3d}%|{'█' * (k * 10 // 4):<10}| {k}/4 [00:0{k}<00:0{4 - k}]" for k in range(5))
        text += "\n"
    return (text + table(width, length, accepted, tps)).encode()


def gpu_of(width: int, length: int) -> int:
    """run.bash placement: md5 of "L-W" and a newline, first 8 hex digits, modulo the GPU count."""
    return int(hashlib.md5(f"{length}-{width}\n".encode()).hexdigest()[:8], 16) % GPUS


def stripped_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split(",")] for line in text.splitlines()]


def test_results_csv_equals_make_csv_awk_sorted(tmp_path: Path) -> None:
    gawk = shutil.which("gawk")
    if gawk is None:
        pytest.fail("gawk is not installed; the parity test needs it (apt-get install gawk), as upstream does")

    logs = [task_log(i, *task) for i, task in enumerate(TASKS)]

    # Upstream: one log per GPU, tasks appended in queue order, then awk | sort.
    gpu_logs = [bytearray() for _ in range(GPUS)]
    for (width, length, _, _), log in zip(TASKS, logs, strict=True):
        g = gpu_of(width, length)
        gpu_logs[g] += f"On GPU {g}, beam_length: {length}, beam_width {width}\n".encode() + log
    paths = []
    for g, content in enumerate(gpu_logs):
        path = tmp_path / f"bs-8-np-32-beam-48-len-16-gpu-{g}.log"
        path.write_bytes(bytes(content) + f"done on GPU_{g}\n".encode())
        paths.append(str(path))
    assert sum(1 for c in gpu_logs if c.count(b"Title:") > 1) >= 2, "want several tasks per GPU log"
    (tmp_path / "make_csv.awk").write_text(MAKE_CSV_AWK)
    awk = subprocess.run([gawk, "-f", str(tmp_path / "make_csv.awk"), *paths], capture_output=True, check=True)
    sort = subprocess.run(
        ["sort", "-t,", "-k1,1n", "-k2,2n"], input=awk.stdout, capture_output=True, check=True, env={"LC_ALL": "C"}
    )
    expected = stripped_rows(sort.stdout.decode())
    assert len(expected) == len(TASKS) + 1
    assert ["4", "3", "1.000000", "103.2"] in expected
    assert ["16", "2", "2.333300", "98.05"] in expected

    # Ours: the recipe's metrics over each task's own log, in a scrambled finishing order, fed in odd chunks.
    recipe = Recipe(
        name="redrafter",
        stage=[QueueStage(kind="queue", command="true", done="^Tokens/second")],
        metrics={
            "beam": MetricSpec(regex=r"Title: beamwidth(?P<beam_width>\d+)_beamlen(?P<beam_length>\d+)", type="int"),
            "average_num_accepted_tokens": MetricSpec(regex=r"Average number of tokens per step: +(\S+)"),
            "tokens_per_sec": MetricSpec(regex=r"^Tokens/second +(.*)", type="str"),
        },
        results=ResultsSpec(
            columns=["beam_width", "beam_length", "average_num_accepted_tokens", "tokens_per_sec"],
            sort=["beam_width", "beam_length"],
            format={"average_num_accepted_tokens": "%f"},
        ),
    )
    metrics = MetricSet.from_recipe(recipe)
    order = list(range(len(logs)))
    random.Random(7).shuffle(order)
    rows: list[dict[str, object]] = []
    for i in order:
        splitter = LineSplitter()
        ex = TaskExtractor(metrics, "queue", done="^Tokens/second", progress=None)
        chunk = (1, 7, 64, 4096)[i % 4]
        for start in range(0, len(logs[i]), chunk):
            ex.feed_lines(splitter.feed(logs[i][start : start + chunk]))
        ex.feed_lines(splitter.flush())
        assert ex.done_seen and ex.conversion_errors == []
        rows.append({"task": f"t{i}", "state": "done", **ex.values})
    columns = select_columns(recipe.results, [], metrics.metric_names())
    csv_path, _ = write_results(tmp_path, rows, columns, recipe.results)

    assert stripped_rows(csv_path.read_text()) == expected
