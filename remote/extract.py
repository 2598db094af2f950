"""Metrics, completion and progress pulled out of a task's output, line by line and from its result files.

The engine feeds raw bytes through `LineSplitter`, the lines through one `TaskExtractor` per task, and, after the
task ends, the result files named by `TaskExtractor.file_metrics()` through `feed_file`. Nothing here does I/O.
"""

from __future__ import annotations

import ast
import codecs
import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from remote.recipe import MetricSpec, Recipe, Scalar
from remote.results import FAILED_CASE, MATCH_ROWS, RESERVED_COLUMNS

Value = Scalar | list[float]
"""A metric value: a scalar, or a list of numbers for `type = "list"`."""

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


class ExprError(ValueError):
    """A derived value's expression that does not parse, or cannot be computed from its inputs; one line."""


EXPR_EXPECTED = ("numbers, metric names, grid and trial values, variables, captures as stage.key, "
                 "+ - * / // % **, parentheses, min(), max() and abs()")

_BINARY: dict[type[ast.operator], Callable[[float, float], object]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_FUNCTIONS: dict[str, Callable[..., float]] = {"min": min, "max": max, "abs": abs}


def _dotted(node: ast.expr) -> str | None:
    """`swarm.servers` (an attribute chain on a plain name) as one dotted name; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head is not None else None
    return None


@dataclass(frozen=True)
class Formula:
    """A checked arithmetic expression over named values (a derived metric's `expr`), interpreted, never eval'd."""

    text: str
    names: tuple[str, ...]
    """The names it reads, in order of first use; captures as "stage.key"."""
    body: ast.expr = field(repr=False)

    def evaluate(self, values: Mapping[str, object]) -> float | None:
        """The value, or None when an input is absent or missing; ExprError when an input is not a number or
        the arithmetic fails (division by zero, overflow, a complex or non-finite result)."""
        inputs: dict[str, float] = {}
        for name in self.names:
            raw = values.get(name)
            if raw is None:
                return None
            number: object = typed(raw, "float") if isinstance(raw, str) else raw  # captures may be text ("8")
            if isinstance(number, list):
                raise ExprError(f"{name} is a list of {len(number)} numbers, not a number")
            if isinstance(number, bool) or not isinstance(number, int | float):
                raise ExprError(f"{name} = {raw!r} is not a number")
            inputs[name] = float(number)
        try:
            result = self._eval(self.body, inputs)
        except ZeroDivisionError:
            raise ExprError(f"{self.text!r} divides by zero ({_show_inputs(inputs)})") from None
        except OverflowError:
            raise ExprError(f"{self.text!r} overflows ({_show_inputs(inputs)})") from None
        if not math.isfinite(result):
            raise ExprError(f"{self.text!r} is not a finite number ({_show_inputs(inputs)})")
        return result

    def _eval(self, node: ast.expr, inputs: Mapping[str, float]) -> float:
        name = _dotted(node)
        if name is not None:
            return inputs[name]
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp):
            result = _BINARY[type(node.op)](self._eval(node.left, inputs), self._eval(node.right, inputs))
            if not isinstance(result, float):  # a negative base to a fractional power gives a complex number
                raise ExprError(f"{ast.unparse(node)!r} is not a real number ({_show_inputs(inputs)})")
            return result
        if isinstance(node, ast.UnaryOp):
            operand = self._eval(node.operand, inputs)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return float(_FUNCTIONS[node.func.id](*(self._eval(a, inputs) for a in node.args)))
        raise AssertionError(f"unchecked expression node {ast.dump(node)}")  # compile_expr admits nothing else


def _show_inputs(inputs: Mapping[str, float]) -> str:
    return ", ".join(f"{k} = {v:g}" for k, v in inputs.items())


def compile_expr(text: str) -> Formula:
    """Parse and check a derived value's expression; ExprError names the part that is not allowed."""
    source = text.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        reason = exc.msg if isinstance(exc, SyntaxError) else type(exc).__name__
        raise ExprError(f"{text!r} does not parse ({reason}); expected {EXPR_EXPECTED}") from None
    names: list[str] = []
    try:
        _check_expr(tree.body, source, names)
    except RecursionError:
        raise ExprError(f"{text!r} is nested too deeply; expected a flatter expression") from None
    return Formula(text=source, names=tuple(dict.fromkeys(names)), body=tree.body)


def _check_expr(node: ast.expr, source: str, names: list[str]) -> None:
    """Admit plain arithmetic only, collecting the names it reads."""
    name = _dotted(node)
    if name is not None:
        names.append(name)
    elif isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ExprError(f"{_segment(source, node)!r} is not a number; expected {EXPR_EXPECTED}")
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check_expr(node.left, source, names)
        _check_expr(node.right, source, names)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        _check_expr(node.operand, source, names)
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
          and not node.keywords and not any(isinstance(a, ast.Starred) for a in node.args)):
        if (node.func.id == "abs") != (len(node.args) == 1) or not node.args:
            what = "exactly one argument" if node.func.id == "abs" else "at least two arguments"
            raise ExprError(f"{_segment(source, node)!r} has the wrong number of arguments; expected {what}")
        for arg in node.args:
            _check_expr(arg, source, names)
    else:
        raise ExprError(f"{_segment(source, node)!r} is not allowed; expected {EXPR_EXPECTED}")


def _segment(source: str, node: ast.expr) -> str:
    return ast.get_source_segment(source, node) or type(node).__name__


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


def typed(text: str, kind: str) -> Value | None:
    """`text` as the metric type `kind` ("int", "float", "str", "list"), or None when it does not read as one.

    Strict on purpose: "2.649B" is not a float and "8.0" not an int, and nan/inf are refused, so a wrong regex
    shows up as a missing value instead of a guessed one. A list is a JSON array of finite numbers ("[0.1, 2]",
    which is also how Python prints a list of floats).
    """
    if kind == "str":
        return text
    stripped = text.strip()
    if kind == "list":
        try:
            doc = json.loads(stripped)
        except ValueError:
            return None
        return number_list(doc)
    if kind == "int":
        return int(stripped) if _INT.fullmatch(stripped) else None
    if kind == "float":
        if not _FLOAT.fullmatch(stripped):
            return None
        value = float(stripped)
        return value if math.isfinite(value) else None
    raise ValueError(f"unknown metric type {kind!r}; expected int, float, str or list")


def number_list(doc: object) -> list[float] | None:
    """A JSON array of finite numbers as floats; None for anything else (a bool, a string or null inside
    included), so one bad item makes the whole value missing rather than silently shorter."""
    if not isinstance(doc, list):
        return None
    out: list[float] = []
    for item in doc:
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            return None
        out.append(float(item))
    return out


def _typed_json(value: object, kind: str) -> Value | None:
    """A JSON value as the metric type: numbers stay numbers, arrays of numbers are lists, strings are read like
    log text."""
    if isinstance(value, str):
        return typed(value, kind)
    if kind == "list":
        return number_list(value)
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
    formula: Formula | None = None
    """A derived value's expression (`expr`); such a metric reads no output."""

    @property
    def kind(self) -> str:
        return self.spec.type

    def kind_of(self, name: str) -> str:
        """The type of one of `names`: its entry in `types`, else `type`."""
        return self.spec.types.get(name, self.spec.type)

    def is_missing(self, text: str) -> bool:
        """Whether the captured text is one of the `missing` markers (Alpa's "-1.000")."""
        return bool(self.spec.missing) and text.strip() in self.spec.missing


def _compile(key: str, spec: MetricSpec) -> Metric:
    where = f"metrics.{key}"
    if spec.expr is not None:
        return _compile_derived(key, spec)
    if spec.regex is None and spec.json_path is None:
        raise MetricError(f"{where}: needs `regex` (with a capture group), `json` (a key path such as a.b.0) "
                          "or `expr` (a derived value)")
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
    unknown = sorted(set(spec.types) - set(names))
    if unknown:
        which = f"the named groups {', '.join(names)}" if regex is not None and regex.groupindex else "named groups"
        raise MetricError(f"{where}.types: {', '.join(unknown)} is not a value of this metric; expected {which}")
    return Metric(key=key, spec=spec, regex=regex, names=names, groups=groups, json_path=path)


def _compile_derived(key: str, spec: MetricSpec) -> Metric:
    where = f"metrics.{key}"
    assert spec.expr is not None
    if spec.regex is not None or spec.json_path is not None or spec.file is not None:
        raise MetricError(f"{where}: `expr` computes the value from others; drop regex, json and file")
    if spec.missing or spec.types or spec.each:
        raise MetricError(f"{where}: missing, types and each describe captured text; a derived value has none")
    if spec.type in ("str", "list"):
        raise MetricError(f'{where}: a derived value is a number; expected type = "float" or "int"')
    try:
        formula = compile_expr(spec.expr)
    except ExprError as exc:
        raise MetricError(f"{where}.expr: {exc}") from None
    if key in formula.names:
        raise MetricError(f"{where}.expr: {spec.expr!r} reads its own value; expected other metrics")
    return Metric(key=key, spec=spec, regex=None, names=(key,), groups=(1,), json_path=None, formula=formula)


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
                if name in RESERVED_COLUMNS:
                    raise MetricError(f"metrics.{key}: {name!r} is a column benchfleet fills itself; rename it")
                seen[name] = key
            self._metrics.append(metric)
        derived = [m.key for m in self._metrics if m.formula is not None]
        for i, key in enumerate(derived):
            formula = next(m.formula for m in self._metrics if m.key == key)
            assert formula is not None
            later = [n for n in formula.names if n in derived[i + 1:]]
            if later:
                raise MetricError(f"metrics.{key}.expr: {later[0]!r} is a derived value defined after it; "
                                  "expected derived values in the order they use each other")

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> MetricSet:
        """Compile `recipe.metrics`; raises MetricError (one line) for a table that cannot work."""
        return cls(recipe.metrics)

    def metric_names(self) -> list[str]:
        """Every value name, in recipe order (named groups in pattern order), then `failed_case` when a metric
        has `missing` markers."""
        names = [name for m in self._metrics for name in m.names]
        return [*names, FAILED_CASE] if any(m.spec.missing for m in self._metrics) else names

    def for_stage(self, stage: str) -> list[Metric]:
        """The metrics that apply to tasks of `stage` (those without `stage`, and those naming it)."""
        return [m for m in self._metrics if m.spec.stage is None or m.spec.stage == stage]


class TaskExtractor:
    """Follows one task's output: its metric values, whether the done line appeared, and its progress.

    `values` holds one value per name; metrics with `each` add one row per match under MATCH_ROWS instead, which
    the results table expands. `finish` computes the derived values once the output and files are read.
    """

    def __init__(self, metrics: MetricSet, stage: str, *, done: str | None, progress: str | None) -> None:
        applicable = metrics.for_stage(stage)
        captured = [m for m in applicable if m.formula is None]
        self._line_metrics = [m for m in captured if m.spec.file is None]
        self._file_metrics = [m for m in captured if m.spec.file is not None]
        self._derived = [m for m in applicable if m.formula is not None]
        self._done = re.compile(done) if done is not None else None
        self._progress = re.compile(progress) if progress is not None else DEFAULT_PROGRESS
        if self._progress.groups < 2:
            raise MetricError(f"{stage}.progress: the regex needs two groups, (done) and (total)")
        self._progress_groups: tuple[str | int, str | int] = (
            ("done", "total") if {"done", "total"} <= set(self._progress.groupindex) else (1, 2)
        )
        self.values: dict[str, object] = {}
        self.rows: list[dict[str, Value | None]] = []
        """One dict per match of the `each` metrics (also under values[MATCH_ROWS] once there is one)."""
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

    def finish(self, context: Mapping[str, object] | None = None) -> dict[str, object]:
        """The task's final values, with the derived ones (`expr`) computed from its captured values and
        `context`: variables, trial and grid values, and captures keyed "stage.key" (`swarm.servers`). Rows of
        `each` metrics get their own derived values. Call after the last line and result file; idempotent."""
        scope: dict[str, object] = {**(context or {})}
        scope.update((k, v) for k, v in self.values.items() if k != MATCH_ROWS)
        for metric in self._derived:
            value = self._derive(metric, scope)
            scope[metric.key] = value
            if value is None:
                self.values.pop(metric.key, None)
            else:
                self.values[metric.key] = value
        for row in self.rows:
            row_scope = {**scope, **row}
            for metric in self._derived:
                row[metric.key] = row_scope[metric.key] = self._derive(metric, row_scope)
        return dict(self.values)

    def _derive(self, metric: Metric, scope: Mapping[str, object]) -> Scalar | None:
        assert metric.formula is not None
        try:
            result = metric.formula.evaluate(scope)
        except ExprError as exc:
            message = f"{metric.key}: {exc}"
            if message not in self.conversion_errors:  # every row of a task may repeat it
                self._error(message)
            return None
        if result is None or metric.kind != "int":
            return result
        if not result.is_integer():
            self._error(f"{metric.key}: {result:g} is not an int")
            return None
        return int(result)

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
        found: list[tuple[str, str, Value | None]] = []
        for name, group in zip(metric.names, metric.groups, strict=True):
            text = m.group(group)
            if text is not None:
                found.append((name, text, typed(text, metric.kind_of(name))))
        return self._take(metric, found)

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
        return self._take(metric, [(name, shown, _typed_json(value, metric.kind_of(name)))])

    def _take(self, metric: Metric, found: list[tuple[str, str, Value | None]]) -> bool:
        """Record one match's values: into the task's values, or into a row for `each` metrics."""
        if not found:
            return False
        if metric.spec.each:
            self._take_row(metric, found)
            return True
        changed = False
        for name, text, value in found:
            changed |= self._record(metric, name, text, value)
        return changed

    def _take_row(self, metric: Metric, found: list[tuple[str, str, Value | None]]) -> None:
        """A match continues the current row unless one of its values is already there: then it opens a row."""
        if not self.rows or any(name in self.rows[-1] for name, _, _ in found):
            self.rows.append({})
            self.values[MATCH_ROWS] = self.rows
        row = self.rows[-1]
        for name, text, value in found:
            if metric.spec.missing:
                row.setdefault(FAILED_CASE, False)  # the row's own status; the task's covers values outside rows
            if metric.is_missing(text):
                row[name] = None
                row[FAILED_CASE] = True
                continue
            if value is None:
                self._conversion_error(metric, name, text)
            row[name] = value

    def _record(self, metric: Metric, name: str, text: str, value: Value | None) -> bool:
        """Keep `value` under `name` by the metric's first/last rule; a failed conversion or a `missing`
        marker leaves it missing (the marker also sets failed_case)."""
        if not metric.spec.last:
            if name in self._settled:
                return False
            self._settled.add(name)
        if metric.spec.missing and FAILED_CASE not in self.values:
            self.values[FAILED_CASE] = False  # the metric matched: from now on, the case's status is known
        if metric.is_missing(text):
            was_failed = self.values[FAILED_CASE] is True
            self.values[FAILED_CASE] = True
            return (self.values.pop(name, None) is not None) or not was_failed
        if value is None:
            self._conversion_error(metric, name, text)
            return self.values.pop(name, None) is not None
        old = self.values.get(name)
        if old is not None and old == value and type(old) is type(value):
            return False
        self.values[name] = value
        return True

    def _conversion_error(self, metric: Metric, name: str, text: str) -> None:
        kind = metric.kind_of(name)
        if kind == "list":
            self._error(f"{name}: {text[:80]!r} is not a list of numbers")
            return
        hint = '; a list needs type = "list"' if text.lstrip().startswith("[") else ""
        self._error(f"{name}: {text[:80]!r} is not {'an' if kind == 'int' else 'a'} {kind}{hint}")

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
