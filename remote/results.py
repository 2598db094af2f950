"""The results table: which columns, in what order, and how results.csv / results.json are written and read.

Rows are plain dicts (built-in columns, grid values, metric values); writing is atomic, so a viewer reading a live
run never sees half a file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from remote.recipe import Baseline, ResultsSpec

BUILTIN_COLUMNS = (
    "task", "stage", "trial", "label", "host", "gpu", "state", "rc", "attempts", "duration", "started", "ended",
)
"""Columns every row can have besides grid axes and metrics."""

DEFAULT_TRAILING_COLUMNS = ("stage", "state", "host", "gpu", "duration")
"""Built-ins shown after the grid axes and metrics when a recipe declares no columns."""

FAILED_CASE = "failed_case"
"""Column of recipes whose metrics have `missing` markers, listed after the metrics: true when a captured value was
a marker (Alpa's -1.000), so a failed case reads as failed whatever the exit code; false when such a metric matched
with real values; empty when it never matched."""
VERDICT = "verdict"
"""Column set when [results.baseline] is given: "ok", "regressed by N%", "improved by N%", "failed", "missing"."""
RESERVED_COLUMNS = (FAILED_CASE, VERDICT)
"""Columns benchfleet fills itself: no metric may be named like them."""
MATCH_ROWS = "@rows"
"""Key of a task's per-match rows (metrics with `each`) among its values; never a column (no metric name can
start with "@"). `finish_rows` turns each entry into a row of its own."""


class ResultsError(ValueError):
    """A results file that cannot be read; the message names the file."""


def select_columns(spec: ResultsSpec, grid_axes: Sequence[str], metric_names: Sequence[str]) -> list[str]:
    """The declared columns, or else grid axes, metrics, the verdict (with a baseline), then stage, state, host,
    gpu, duration (no repeats)."""
    if spec.columns:
        return list(spec.columns)
    verdict = [VERDICT] if spec.baseline else []
    return list(dict.fromkeys([*grid_axes, *metric_names, *verdict, *DEFAULT_TRAILING_COLUMNS]))


def finish_rows(rows: Sequence[Mapping[str, object]], spec: ResultsSpec) -> list[dict[str, object]]:
    """Rows as the results table shows them: a task with per-match rows (`each` metrics) becomes one row per
    match, carrying the task's other values; then each row gets its verdict against `spec.baseline`. The
    input rows are not changed."""
    out: list[dict[str, object]] = []
    for row in rows:
        base = {k: v for k, v in row.items() if k != MATCH_ROWS}
        matches = row.get(MATCH_ROWS)
        if isinstance(matches, list) and matches:
            for match in matches:
                if isinstance(match, dict):
                    expanded = {**base, **match}
                    if base.get(FAILED_CASE) is True:  # a marker outside the rows fails every row of the task
                        expanded[FAILED_CASE] = True
                    out.append(expanded)
        else:
            out.append(base)
    if spec.baseline:
        for row in out:
            row[VERDICT] = verdict(row, spec.baseline)
    return out


def verdict(row: Mapping[str, object], baseline: Mapping[str, Baseline]) -> str | None:
    """How `row` compares with the expectations that apply to it (by their `where`). None when none apply or
    the task is not finished; "failed" for a failed or cancelled task or a failed case. One expectation gives
    "ok", "regressed by 12%", "improved by 12%" or "missing"; several give "ok" when all are, else each part
    prefixed by its metric ("mean_time regressed by 12%; tflops ok")."""
    applicable = {name: b for name, b in baseline.items() if _matches(row, b.where)}
    state = row.get("state")
    if not applicable:
        return None
    if state in ("failed", "cancelled") or row.get(FAILED_CASE) is True:
        return "failed"
    if state not in (None, "done"):
        return None
    parts = [(name, _judge(row.get(name), b)) for name, b in applicable.items()]
    if len(parts) == 1:
        return parts[0][1]
    if all(text == "ok" for _, text in parts):
        return "ok"
    return "; ".join(f"{name} {text}" for name, text in parts)


def _matches(row: Mapping[str, object], where: Mapping[str, object]) -> bool:
    return all(_same(row.get(column), wanted) for column, wanted in where.items())


def _same(value: object, wanted: object) -> bool:
    """Numbers compare as numbers (8 == 8.0), booleans as booleans, anything else as text."""
    if value is None:
        return False
    if isinstance(value, bool) or isinstance(wanted, bool):
        return value is wanted
    a, b = _as_number(value), _as_number(wanted)
    if a is not None and b is not None:
        return a == b
    return str(value) == str(wanted)


def _judge(value: object, expected: Baseline) -> str:
    number = _as_number(value)
    if number is None or isinstance(value, bool):
        return "missing"
    change = (number - expected.value) / abs(expected.value)
    worse = change > expected.tolerance if expected.better == "lower" else change < -expected.tolerance
    better = change < -expected.tolerance if expected.better == "lower" else change > expected.tolerance
    if worse:
        return f"regressed by {_percent(change)}"
    if better:
        return f"improved by {_percent(change)}"
    return "ok"


def _percent(change: float) -> str:
    """12.06% -> "12%", 5.34% -> "5.3%": whole percents once the change is large enough to read so."""
    p = abs(change) * 100
    return f"{p:.0f}%" if p >= 10 else f"{p:.1f}%"


def _as_number(value: object) -> int | float | None:
    """The number a cell holds (bools count as 0/1), or None for text, missing values and NaN."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    return None


def sort_rows(rows: list[dict[str, object]], keys: Sequence[str]) -> list[dict[str, object]]:
    """Rows sorted by `keys` ("-col" descends), stably.

    Numbers compare numerically (ints and floats together), text lexically, and within one column numbers come
    before text; missing values (None, absent, NaN) always come last, whichever the direction.
    """
    ordered = list(rows)
    # Stable sorts from the last key to the first give the multi-key order.
    for key in reversed(keys):
        descending = key.startswith("-")
        column = key[1:] if descending else key
        numbers: list[tuple[int | float, dict[str, object]]] = []
        texts: list[tuple[str, dict[str, object]]] = []
        missing: list[dict[str, object]] = []
        for row in ordered:
            value = row.get(column)
            number = _as_number(value)
            if number is not None:
                numbers.append((number, row))
            elif isinstance(value, str):
                texts.append((value, row))
            elif value is None or isinstance(value, float):
                missing.append(row)
            else:
                texts.append((str(value), row))
        # sort(reverse=True) keeps equal items in their original order, so descending stays stable too.
        numbers.sort(key=lambda item: item[0], reverse=descending)
        texts.sort(key=lambda item: item[0], reverse=descending)
        ordered = [row for _, row in numbers] + [row for _, row in texts] + missing
    return ordered


def format_cell(value: object, fmt: str | None) -> str:
    """One CSV cell: "" for None, "true"/"false" for bools, a list metric as its JSON array ("[0.1, 0.2]"),
    `fmt % value` when a printf format is given and takes the value, else the typed value's str() (so 48.409
    stays "48.409" and 1.0 stays "1.0")."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps([_json_value(v) for v in value])
    if fmt is not None:
        try:
            return fmt % (value,)
        except (TypeError, ValueError, KeyError, OverflowError):
            pass  # a format that cannot take this value (text under "%f") falls back to the plain value
    return str(value)


def _json_value(value: object) -> object:
    """A cell as JSON: scalars as they are, lists item by item, non-finite floats as null, anything else as
    its text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return str(value)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder (fsync, then rename), mode 0600."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    # Make the rename itself durable, so a crash right after cannot bring back the old file.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_results(
    run_dir: Path, rows: Sequence[Mapping[str, object]], columns: Sequence[str], spec: ResultsSpec
) -> tuple[Path, Path]:
    """Expand per-match rows and add verdicts (`finish_rows`), sort by `spec.sort`, and write results.csv
    (formatted by `spec.format`) and results.json (typed)."""
    table = sort_rows([{c: row.get(c) for c in columns} for row in finish_rows(rows, spec)], spec.sort)

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for row in table:
        writer.writerow([format_cell(row[c], spec.format.get(c)) for c in columns])
    csv_path = run_dir / "results.csv"
    _write_atomic(csv_path, text.getvalue().encode("utf-8"))

    objects = [{c: _json_value(row[c]) for c in columns} for row in table]
    json_path = run_dir / "results.json"
    _write_atomic(json_path, (json.dumps(objects, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return csv_path, json_path


def read_results_json(path: Path | str) -> list[dict[str, object]]:
    """The rows of a results.json; raises ResultsError naming the file when it is not a list of objects.

    A missing file raises FileNotFoundError, which a viewer of a live run reads as "no results yet".
    """
    raw = Path(path).read_bytes()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ResultsError(f"{path}: not valid JSON ({exc}); damaged or not written by benchfleet") from None
    if not isinstance(doc, list) or not all(isinstance(item, dict) for item in doc):
        raise ResultsError(f"{path}: expected a list of row objects; damaged or not written by benchfleet")
    return [dict(item) for item in doc]
