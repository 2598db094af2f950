"""Metrics, completion and progress pulled out of a task's output, line by line and from its result files.

The engine feeds raw bytes through `LineSplitter`, the lines through one `TaskExtractor` per task, and, after the
task ends, the result files named by `TaskExtractor.file_metrics()` through `feed_file`. Nothing here does I/O.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from remote.recipe import MetricSpec, Recipe, Scalar

MAX_LINE_CHARS = 1 << 20
"""A line longer than this is cut into pieces, so output without line ends cannot grow a buffer without bound."""

MAX_CONVERSION_ERRORS = 20
"""Conversion errors kept per task: enough to explain a wrong regex, bounded for a task that repeats one."""

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_LINE_TOKEN = re.compile(r"[^\r\n]+|\r\n|\r|\n")

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")

DEFAULT_PROGRESS = re.compile(r"(?<![\w./])(\d+)/(\d+)(?![\w./])")
"""tqdm-like `k/N`: "Benchmarking: 3/10", "| 3/10 [00:01<00:02]". Digits glued to letters, dots or slashes are not
progress, so dates ("2024/01/02"), paths ("runs/3/10"), decimals ("12.5/100.0", Ray's "0.0/32.0 GPU") and names
("x1/2") never match. A match also needs 0 <= k <= N and N > 0."""


class MetricError(ValueError):
    """A metric table that cannot work (no regex or json, clashing names); the message is one line for the user."""


def _strip_ansi(line: str) -> str:
    return _ANSI.sub("", line) if "\x1b" in line else line


class LineSplitter:
    """Turns a byte stream into lines: `\\n`, `\\r\\n` and a bare `\\r` (tqdm redraws) each end a line.

    UTF-8 split across chunks decodes correctly and a `\\r\\n` split across chunks is one line end. ANSI colour
    codes are stripped. A blank line ended by `\\n` is returned as ""; the empty pieces between repeated `\\r` are
    not, since they carry nothing.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf: list[str] = []
        self._buf_len = 0
        # After a bare \r: "text" when it ended a non-empty line (a following \n only completes that \r\n),
        # "empty" when nothing preceded it (a following \n then ends a blank \r\n line), None otherwise.
        self._after_cr: str | None = None

    def feed(self, data: bytes) -> list[str]:
        """The lines completed by this chunk, in order."""
        out: list[str] = []
        for m in _LINE_TOKEN.finditer(self._decoder.decode(data)):
            piece = m.group()
            if piece == "\r":
                if self._buf_len and self._emit(out, bare_cr=True):
                    self._after_cr = "text"
                elif self._after_cr is None:
                    self._after_cr = "empty"
            elif piece in ("\n", "\r\n"):
                if self._buf_len:
                    self._emit(out, bare_cr=False)
                elif self._after_cr != "text":
                    out.append("")
                self._after_cr = None
            else:
                self._after_cr = None
                self._buf.append(piece)
                self._buf_len += len(piece)
                while self._buf_len >= MAX_LINE_CHARS:
                    text = "".join(self._buf)
                    out.append(_strip_ansi(text[:MAX_LINE_CHARS]))
                    rest = text[MAX_LINE_CHARS:]
                    self._buf = [rest] if rest else []
                    self._buf_len = len(rest)
        return out

    def flush(self) -> list[str]:
        """At end of stream: the trailing line that had no line end (if any)."""
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._buf.append(tail)
            self._buf_len += len(tail)
        out: list[str] = []
        if self._buf_len:
            self._emit(out, bare_cr=True)
        self._after_cr = None
        return out

    def _emit(self, out: list[str], *, bare_cr: bool) -> bool:
        """Append the buffered line to `out` (unless empty and ended by a bare \\r); True when appended."""
        line = _strip_ansi("".join(self._buf))
        self._buf = []
        self._buf_len = 0
        # A piece that was only colour codes is as empty as the ones between repeated \r.
        if line or not bare_cr:
            out.append(line)
            return True
        return False


def typed(text: str, kind: str) -> Scalar | None:
    """`text` as the metric type `kind` ("int", "float", "str"), or None when it does not read as one.

    Strict on purpose: "2.649B" is not a float and "8.0" not an int, and nan/inf are refused, so a wrong regex
    shows up as a missing value instead of a guessed one.
    """
    if kind == "str":
        return text
    stripped = text.strip()
    if kind == "int":
        return int(stripped) if _INT.fullmatch(stripped) else None
    if kind == "float":
        if not _FLOAT.fullmatch(stripped):
            return None
        value = float(stripped)
        return value if math.isfinite(value) else None
    raise ValueError(f"unknown metric type {kind!r}; expected int, float or str")


def _typed_json(value: object, kind: str) -> Scalar | None:
    """A JSON value as the metric type: numbers stay numbers, strings are read like log text."""
    if isinstance(value, str):
        return typed(value, kind)
    if kind == "str":
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if kind == "int":
        return value if isinstance(value, int) else None
    return float(value) if math.isfinite(value) else None


def _lookup(doc: object, path: tuple[str, ...]) -> tuple[bool, object]:
    """Follow a dotted key path (list items by index, negative from the end); (False, None) when a step is
    absent. A null on the way (PACE's `system_metrics: null`) gives (True, None): the program says "no value"."""
    current = doc
    for part in path:
        if current is None:
            return True, None
        if isinstance(current, dict):
            if part not in current:
                return False, None
            current = current[part]
        elif isinstance(current, list):
            if not _INT.fullmatch(part):
                return False, None
            index = int(part)
            if not -len(current) <= index < len(current):
                return False, None
            current = current[index]
        else:
            return False, None
    return True, current


@dataclass(frozen=True, slots=True)
class Metric:
    """One `[metrics]` entry, compiled: the values it yields and where they come from."""

    key: str
    """The entry's name in the recipe's metrics table."""
    spec: MetricSpec
    regex: re.Pattern[str] | None
    names: tuple[str, ...]
    """Values it yields: the named groups of its regex, else the key itself."""
    groups: tuple[str | int, ...]
    """The regex group holding each of `names`."""
    json_path: tuple[str, ...] | None

    @property
    def kind(self) -> str:
        return self.spec.type


def _compile(key: str, spec: MetricSpec) -> Metric:
    where = f"metrics.{key}"
    if spec.regex is None and spec.json_path is None:
        raise MetricError(f"{where}: needs `regex` (with a capture group) or `json` (a key path such as a.b.0)")
    if spec.file is not None and spec.json_path is not None and spec.regex is not None:
        raise MetricError(f"{where}: `json` with `file` reads the whole file as JSON; drop `regex`")
    path: tuple[str, ...] | None = None
    if spec.json_path is not None:
        path = tuple(spec.json_path.split("."))
        if not all(path):
            raise MetricError(f"{where}: json path {spec.json_path!r} has an empty step; write it like a.b.0.c")
    regex = re.compile(spec.regex) if spec.regex is not None else None
    if regex is not None and regex.groups == 0:
        raise MetricError(f"{where}: the regex needs a capture group around the value")
    if regex is not None and path is None and regex.groupindex:
        names = tuple(regex.groupindex)
        groups: tuple[str | int, ...] = names
    else:
        # One value: the first group of the regex (or the JSON text it captures), or the JSON path's value.
        names = (key,)
        groups = (1,)
    return Metric(key=key, spec=spec, regex=regex, names=names, groups=groups, json_path=path)


class MetricSet:
    """The recipe's metrics, compiled once and shared by every task's extractor."""

    def __init__(self, metrics: Mapping[str, str | MetricSpec]) -> None:
        self._metrics: list[Metric] = []
        seen: dict[str, str] = {}
        for key, raw in metrics.items():
            spec = MetricSpec(regex=raw) if isinstance(raw, str) else raw
            metric = _compile(key, spec)
            for name in metric.names:
                if name in seen:
                    raise MetricError(
                        f"metrics.{key}: value {name!r} is also produced by metrics.{seen[name]}; rename one"
                    )
                seen[name] = key
            self._metrics.append(metric)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> MetricSet:
        """Compile `recipe.metrics`; raises MetricError (one line) for a table that cannot work."""
        return cls(recipe.metrics)

    def metric_names(self) -> list[str]:
        """Every value name, in recipe order (named groups in pattern order)."""
        return [name for m in self._metrics for name in m.names]

    def for_stage(self, stage: str) -> list[Metric]:
        """The metrics that apply to tasks of `stage` (those without `stage`, and those naming it)."""
        return [m for m in self._metrics if m.spec.stage is None or m.spec.stage == stage]


class TaskExtractor:
    """Follows one task's output: its metric values, whether the done line appeared, and its progress."""

    def __init__(self, metrics: MetricSet, stage: str, *, done: str | None, progress: str | None) -> None:
        applicable = metrics.for_stage(stage)
        self._line_metrics = [m for m in applicable if m.spec.file is None]
        self._file_metrics = [m for m in applicable if m.spec.file is not None]
        self._done = re.compile(done) if done is not None else None
        self._progress = re.compile(progress) if progress is not None else DEFAULT_PROGRESS
        if self._progress.groups < 2:
            raise MetricError(f"{stage}.progress: the regex needs two groups, (done) and (total)")
        self._progress_groups: tuple[str | int, str | int] = (
            ("done", "total") if {"done", "total"} <= set(self._progress.groupindex) else (1, 2)
        )
        self.values: dict[str, Scalar] = {}
        self.conversion_errors: list[str] = []
        self.done_seen = False
        self.progress: tuple[int, int] | None = None
        self.last_line = ""
        self.lines_seen = 0
        self._settled: set[str] = set()  # names whose first match is final (last = false)

    def feed_lines(self, lines: Iterable[str]) -> bool:
        """Apply each line; True when a metric value, the progress or the done flag changed."""
        changed = False
        for line in lines:
            self.lines_seen += 1
            if line.strip():
                self.last_line = line
            if self._done is not None and not self.done_seen and self._done.search(line):
                self.done_seen = True
                changed = True
            seen = self._match_progress(line)
            if seen is not None and seen != self.progress:
                self.progress = seen
                changed = True
            doc: object = None
            parsed = False
            for metric in self._line_metrics:
                if metric.json_path is None:
                    changed |= self._apply_regex(metric, line)
                elif metric.regex is not None:
                    m = metric.regex.search(line)
                    if m is not None and m.group(1) is not None:
                        ok, value = self._parse_json(m.group(1))
                        if ok:
                            changed |= self._apply_json(metric, value, required=False)
                else:
                    if not parsed:  # parse a line once however many JSON metrics read it
                        parsed = True
                        doc = self._json_object(line)
                    if doc is not None:
                        changed |= self._apply_json(metric, doc, required=False)
        return changed

    def file_metrics(self) -> list[tuple[str, str]]:
        """(path template, names of the values read from it), one per result file, for the engine to fetch."""
        by_file: dict[str, list[str]] = {}
        for metric in self._file_metrics:
            assert metric.spec.file is not None
            by_file.setdefault(metric.spec.file, []).extend(metric.names)
        return [(path, ", ".join(names)) for path, names in by_file.items()]

    def feed_file(self, path_template: str, content: bytes) -> None:
        """Apply every metric of the result file `path_template` to its `content`; bad content is an error entry."""
        metrics = [m for m in self._file_metrics if m.spec.file == path_template]
        if not metrics:
            return
        text = content.decode("utf-8-sig", errors="replace")
        if any(m.json_path is not None for m in metrics):
            try:
                doc = json.loads(text)
            except ValueError as exc:
                self._error(f"{path_template}: not valid JSON ({exc})")
                doc = None
            else:
                for metric in metrics:
                    if metric.json_path is not None:
                        self._apply_json(metric, doc, required=True, where=path_template)
        regex_metrics = [m for m in metrics if m.json_path is None]
        if regex_metrics:
            for line in text.splitlines():
                for metric in regex_metrics:
                    self._apply_regex(metric, line)

    def _match_progress(self, line: str) -> tuple[int, int] | None:
        found: tuple[int, int] | None = None
        done_group, total_group = self._progress_groups
        for m in self._progress.finditer(line):
            done_text, total_text = m.group(done_group), m.group(total_group)
            if done_text is None or total_text is None:
                continue
            done, total = typed(done_text, "int"), typed(total_text, "int")
            if isinstance(done, int) and isinstance(total, int) and 0 <= done <= total and total > 0:
                found = (done, total)
        return found

    def _apply_regex(self, metric: Metric, line: str) -> bool:
        assert metric.regex is not None
        m = metric.regex.search(line)
        if m is None:
            return False
        changed = False
        for name, group in zip(metric.names, metric.groups, strict=True):
            text = m.group(group)
            if text is not None:
                changed |= self._record(metric, name, text, typed(text, metric.kind))
        return changed

    def _apply_json(self, metric: Metric, doc: object, *, required: bool, where: str = "") -> bool:
        assert metric.json_path is not None
        found, value = _lookup(doc, metric.json_path)
        if not found:
            if required:
                self._error(f"{where}: no value at {metric.spec.json_path!r} (metrics.{metric.key})")
            return False
        if value is None:  # JSON null: the program says there is no value, which is not a conversion error
            return False
        name = metric.names[0]
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return self._record(metric, name, shown, _typed_json(value, metric.kind))

    def _record(self, metric: Metric, name: str, text: str, value: Scalar | None) -> bool:
        """Keep `value` under `name` by the metric's first/last rule; a failed conversion leaves it missing."""
        if not metric.spec.last:
            if name in self._settled:
                return False
            self._settled.add(name)
        if value is None:
            self._error(f"{name}: {text[:80]!r} is not {'an' if metric.kind == 'int' else 'a'} {metric.kind}")
            return self.values.pop(name, None) is not None
        old = self.values.get(name)
        if old is not None and old == value and type(old) is type(value):
            return False
        self.values[name] = value
        return True

    def _error(self, message: str) -> None:
        if len(self.conversion_errors) < MAX_CONVERSION_ERRORS:
            self.conversion_errors.append(message)

    @staticmethod
    def _json_object(line: str) -> object:
        stripped = line.strip()
        if not stripped.startswith("{"):
            return None
        ok, doc = TaskExtractor._parse_json(stripped)
        return doc if ok and isinstance(doc, dict) else None

    @staticmethod
    def _parse_json(text: str) -> tuple[bool, object]:
        try:
            return True, json.loads(text)
        except ValueError:
            return False, None
