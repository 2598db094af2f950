"""The results table: column choice, sort order, cell formats, and the files written for viewers."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest

from remote.recipe import ResultsSpec
from remote.results import (
    ResultsError,
    format_cell,
    read_results_json,
    select_columns,
    sort_rows,
    write_results,
)


def test_declared_columns_win() -> None:
    spec = ResultsSpec(columns=["tokens_per_sec", "beam_width", "host"])
    assert select_columns(spec, ["beam_width", "beam_length"], ["tokens_per_sec"]) == [
        "tokens_per_sec",
        "beam_width",
        "host",
    ]


def test_default_columns_are_axes_metrics_then_builtins() -> None:
    assert select_columns(ResultsSpec(), ["beam_width", "beam_length"], ["acc", "tps"]) == [
        "beam_width",
        "beam_length",
        "acc",
        "tps",
        "stage",
        "state",
        "host",
        "gpu",
        "duration",
    ]


def test_default_columns_do_not_repeat_a_name() -> None:
    assert select_columns(ResultsSpec(), ["n"], ["n", "tps"])[:2] == ["n", "tps"]


def col(rows: list[dict[str, object]], name: str) -> list[object]:
    return [r.get(name) for r in rows]


def test_sort_numbers_numerically_ints_and_floats_together() -> None:
    rows: list[dict[str, object]] = [{"v": 10}, {"v": 9.5}, {"v": 2}, {"v": 100}, {"v": -1.0}]
    assert col(sort_rows(rows, ["v"]), "v") == [-1.0, 2, 9.5, 10, 100]
    assert col(sort_rows(rows, ["-v"]), "v") == [100, 10, 9.5, 2, -1.0]


def test_missing_values_last_in_both_directions() -> None:
    rows: list[dict[str, object]] = [{"v": None}, {"v": 3}, {}, {"v": 1}, {"v": float("nan")}]
    asc = sort_rows(rows, ["v"])
    desc = sort_rows(rows, ["-v"])
    assert col(asc, "v")[:2] == [1, 3]
    assert col(desc, "v")[:2] == [3, 1]
    assert asc[2:] == [rows[0], rows[2], rows[4]]
    assert desc[2:] == [rows[0], rows[2], rows[4]]


def test_strings_lexical_and_numbers_before_strings() -> None:
    rows: list[dict[str, object]] = [{"v": "b"}, {"v": 2}, {"v": "B"}, {"v": None}, {"v": "a"}, {"v": 1.5}]
    assert col(sort_rows(rows, ["v"]), "v") == [1.5, 2, "B", "a", "b", None]
    assert col(sort_rows(rows, ["-v"]), "v") == [2, 1.5, "b", "a", "B", None]


def test_multi_key_sort_is_stable() -> None:
    rows: list[dict[str, object]] = [
        {"w": 2, "l": 3, "id": "a"},
        {"w": 1, "l": 3, "id": "b"},
        {"w": 2, "l": 2, "id": "c"},
        {"w": 1, "l": 3, "id": "d"},
        {"w": 10, "l": 2, "id": "e"},
    ]
    assert col(sort_rows(rows, ["w", "l"]), "id") == ["b", "d", "c", "a", "e"]
    assert col(sort_rows(rows, ["-l", "w"]), "id") == ["b", "d", "a", "c", "e"]
    assert col(sort_rows(rows, []), "id") == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize(
    ("value", "fmt", "expected"),
    [
        (None, "%f", ""),
        (1.0, "%f", "1.000000"),
        (2.3333, "%.3f", "2.333"),
        (8, "%d", "8"),
        (8, "%f", "8.000000"),
        ("48.409", "%s", "48.409"),
        ("48.409", "%f", "48.409"),
        (1.0, None, "1.0"),
        (48.409, None, "48.409"),
        (3, None, "3"),
        (True, None, "true"),
        (False, "%d", "false"),
        (5, "%s %s", "5"),
        (5, "no placeholder", "5"),
    ],
)
def test_format_cell(value: object, fmt: str | None, expected: str) -> None:
    assert format_cell(value, fmt) == expected


ROWS: list[dict[str, object]] = [
    {"task": "t2", "w": 2, "l": 3, "acc": 2.5, "tps": "103.2", "host": "gpu-a"},
    {"task": "t1", "w": 1, "l": 2, "acc": 1.0, "tps": "48.409", "host": "gpu-a"},
    {"task": "t3", "w": 1, "l": 3, "acc": None, "tps": None, "host": "gpu-b"},
]
SPEC = ResultsSpec(sort=["w", "l"], format={"acc": "%f"})


def test_write_results_csv_and_json(tmp_path: Path) -> None:
    csv_path, json_path = write_results(tmp_path, ROWS, ["w", "l", "acc", "tps", "state"], SPEC)
    assert (csv_path, json_path) == (tmp_path / "results.csv", tmp_path / "results.json")
    assert csv_path.read_text() == "w,l,acc,tps,state\n1,2,1.000000,48.409,\n1,3,,,\n2,3,2.500000,103.2,\n"
    assert json.loads(json_path.read_text()) == [
        {"w": 1, "l": 2, "acc": 1.0, "tps": "48.409", "state": None},
        {"w": 1, "l": 3, "acc": None, "tps": None, "state": None},
        {"w": 2, "l": 3, "acc": 2.5, "tps": "103.2", "state": None},
    ]
    assert read_results_json(json_path)[0] == {"w": 1, "l": 2, "acc": 1.0, "tps": "48.409", "state": None}
    for path in (csv_path, json_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]


def test_csv_quotes_cells_with_commas_so_columns_stay_aligned(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [{"label": 'a, "b"', "n": 1}]
    csv_path, _ = write_results(tmp_path, rows, ["label", "n"], ResultsSpec())
    with csv_path.open(newline="") as f:
        assert list(csv.reader(f)) == [["label", "n"], ['a, "b"', "1"]]


def test_rewrite_replaces_the_file_and_keeps_0600(tmp_path: Path) -> None:
    write_results(tmp_path, ROWS, ["w"], SPEC)
    os.chmod(tmp_path / "results.csv", 0o644)
    old_inode = (tmp_path / "results.csv").stat().st_ino
    write_results(tmp_path, ROWS[:1], ["w"], SPEC)
    assert (tmp_path / "results.csv").read_text() == "w\n2\n"
    assert (tmp_path / "results.csv").stat().st_ino != old_inode  # renamed over, never truncated in place
    assert stat.S_IMODE((tmp_path / "results.csv").stat().st_mode) == 0o600


def test_non_finite_floats_become_null_in_json(tmp_path: Path) -> None:
    _, json_path = write_results(tmp_path, [{"v": float("inf")}], ["v"], ResultsSpec())
    assert json.loads(json_path.read_text()) == [{"v": None}]


def test_write_into_missing_folder_fails_without_leaving_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_results(tmp_path / "gone", ROWS, ["w"], SPEC)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"[{", b'{"w": 1}', b"[1, 2]", b"\xff"])
def test_read_results_json_rejects_other_files_in_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "results.json"
    path.write_bytes(content)
    with pytest.raises(ResultsError, match=r"results\.json: ") as info:
        read_results_json(path)
    assert "\n" not in str(info.value)


def test_read_results_json_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_results_json(tmp_path / "results.json")
