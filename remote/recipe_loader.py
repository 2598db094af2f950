"""Load a recipe file: TOML, then the pydantic models, then the rules that span fields.

Every mistake a user can make becomes one `RecipeError` line, `<file>:<line>: <field path>: <what is wrong>;
expected <what is expected>`, never a traceback. tomllib reports no positions for keys, so a small locator scans
the text to map field paths (`stage[1].grid.beam_width`) back to lines.
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import json
import re
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from remote.extract import ExprError, compile_expr
from remote.grid import GridError, compile_cost, expand_grid, parse_axis
from remote.recipe import (
    NAME_PATTERN,
    FetchStage,
    MetricSpec,
    PlotSpec,
    QueueStage,
    Recipe,
    Scalar,
    ServiceStage,
    ShapeStage,
    StageSpec,
    SwarmStage,
    parse_duration,
)
from remote.results import BUILTIN_COLUMNS, FAILED_CASE, RESERVED_COLUMNS, VERDICT
from remote.template import PLAN_BUILTINS, RUNTIME_PLACEHOLDERS, TemplateError, placeholders, render, split_command

Key = str | int
FieldPath = tuple[Key, ...]

BUILTIN_PLACEHOLDERS: frozenset[str] = RUNTIME_PLACEHOLDERS | PLAN_BUILTINS

_NAME = re.compile(NAME_PATTERN)
_NAME_RULE = "letters, digits, '_' and '-', starting with a letter or '_'"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class RecipeProblem:
    """One mistake in a recipe: where it is and what to write instead."""

    field: str
    """The field path, e.g. `stage[1].grid.beam_width`; empty for the file as a whole."""
    message: str
    """`<what is wrong>; expected <what is expected>`."""
    line: int | None
    """1-based line in the file, when one can be found."""


class RecipeError(Exception):
    """A recipe that cannot be used; `str()` is one line naming the file, line, field and the fix."""

    def __init__(self, file: Path | str, problems: Sequence[RecipeProblem]) -> None:
        ordered = sorted(problems, key=lambda p: (p.line is None, p.line or 0))  # stable: discovery order per line
        self.file = str(file)
        self.problems: tuple[RecipeProblem, ...] = tuple(ordered)
        first = self.problems[0]
        self.line = first.line
        self.field = first.field
        where = self.file if first.line is None else f"{self.file}:{first.line}"
        what = f"{first.field}: {first.message}" if first.field else first.message
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        # A value quoted into a message may hold a newline; the report must stay one line.
        super().__init__(f"{where}: {what}{more}".replace("\r", "\\r").replace("\n", "\\n"))


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe with what the planner needs precomputed."""

    recipe: Recipe
    path: Path
    text: str
    """The exact file text, copied into the run directory."""
    metric_names: tuple[str, ...]
    """Every metric a task can produce: table keys, or the group names of regexes with named groups."""
    stage_names: tuple[str, ...]
    """Effective stage names (`name`, else the kind), in order."""
    grids: dict[str, list[dict[str, Scalar]]]
    """Expanded grid per stage name; run stages have one empty point."""
    trials: tuple[dict[str, Scalar], ...] = ({},)
    """Trial values (matrix product or [[trial]] tables); one empty trial without a matrix."""


def load_recipe(path: Path) -> LoadedRecipe:
    """Read and validate a recipe file; raises RecipeError for anything wrong with it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RecipeError(path, [RecipeProblem("", f"cannot read the recipe: {reason}; expected a readable TOML file",
                                               None)]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        message = (
            f"cannot read the recipe: byte 0x{data[exc.start]:02x} is not UTF-8 text; "
            "expected a readable TOML file (UTF-8)"
        )
        raise RecipeError(path, [RecipeProblem("", message, line)]) from None
    return parse_recipe(text, path)


def parse_recipe(text: str, path: Path) -> LoadedRecipe:
    """Validate recipe text read from `path` (named in errors); raises RecipeError."""
    body = text[1:] if text.startswith("\ufeff") else text  # tomllib rejects a byte-order mark
    try:
        data = tomllib.loads(body)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(path, [_toml_problem(str(exc), body)]) from None
    except RecursionError:
        raise RecipeError(path, [RecipeProblem("", "the TOML is nested too deeply; expected a flatter file",
                                               None)]) from None
    locator = _Locator(body)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(path, _pydantic_problems(exc, data, locator)) from None
    checker = _Checker(recipe, data, locator)
    checker.run()
    if checker.problems:
        raise RecipeError(path, checker.problems)
    return LoadedRecipe(
        recipe=recipe,
        path=path,
        text=text,
        metric_names=tuple(checker.metric_names),
        stage_names=tuple(checker.stage_names),
        grids=checker.grids,
        trials=tuple(checker.trials),
    )


STAGE_EXTRAS: dict[str, frozenset[str]] = {
    "pipeline": frozenset({"layer_begin", "layer_end", "port", "url", "next_url", "rank", "num_rounds"}),
    "swarm": frozenset({"dht_port", "identity"}),
}
"""Placeholders a stage kind adds for its own commands (a pipeline worker's slice and ring, the swarm's DHT)."""


def trial_name(values: Mapping[str, Scalar]) -> str:
    """A trial's label: its `name` key, or its values joined ("setup=10ms-1gbit,model=opt"); "" without a matrix."""
    if "name" in values:
        return str(values["name"])
    return ",".join(f"{k}={v}" for k, v in values.items())


def stage_name(stage: StageSpec) -> str:
    """A stage's effective name: its `name`, else its kind."""
    return stage.name if stage.name is not None else stage.kind


# ---------------------------------------------------------------------------------------------------------------
# Messages


def format_path(path: FieldPath) -> str:
    """`('stage', 1, 'grid', 'beam_width')` as `stage[1].grid.beam_width`; odd keys are quoted."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            out += f".{key}" if out else key
    return out


def _show(value: object, limit: int = 60) -> str:
    """A value as the user wrote it in TOML, shortened."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        return "a table"
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(v, limit) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suggest(word: str, choices: Iterable[str], wrap: str = "'{}'") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {wrap.format(close[0])}?)" if close else ""


def _toml_problem(message: str, text: str) -> RecipeProblem:
    """tomllib's "Invalid value (at line 3, column 9)" as a located problem with what to write instead."""
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if m is not None:
        what, line, where = message[: m.start()], int(m[1]), f" at column {m[2]}"
    else:
        what = re.sub(r"\s*\(at end of document\)$", "", message)
        line, where = text.count("\n") + (0 if text.endswith("\n") else 1), " at the end of the file"
    twice = re.match(r"Cannot declare \((.*)\) twice", what)
    duplicate = re.match(r"Duplicate inline table key '(.*)'", what)
    if what.startswith("Expected "):
        result = f"TOML syntax error{where}; expected {what.removeprefix('Expected ')}"
    elif what.startswith("Cannot overwrite a value"):
        result = f"a key is set twice{where}; expected each key once per table"
    elif twice is not None:
        table = ".".join(re.findall(r"'([^']*)'", twice[1]))
        result = f"table [{table}] is declared twice; expected each [table] once ([[name]] for repeated blocks)"
    elif duplicate is not None:
        result = f"key '{duplicate[1]}' appears twice in an inline table; expected each key once"
    else:
        result = (
            f"TOML syntax error{where}: {what[:1].lower()}{what[1:]}; "
            "expected valid TOML: key = value, [table] headers, [[stage]] blocks, quoted strings"
        )
    return RecipeProblem("", result, max(line, 1))


# What a field should hold, by schema pattern ("stage[].grid.*"): the "expected ..." half of most messages.
_EXPECT: dict[str, str] = {
    "name": f"a name of {_NAME_RULE}",
    "description": "a string",
    "variables": "a table of values, e.g. [variables] then batch_size = 8",
    "variables.*": "a string, number or boolean",
    "hosts": "a table per host, e.g. [hosts.gpu-a]",
    "hosts.*": 'a [hosts.NAME] table, e.g. ssh = "gpu-a" and gpus = 8',
    "hosts.*.ssh": 'an alias from ~/.ssh/config or "user@host:port"',
    "hosts.*.gpus": 'a GPU count (e.g. 8), "auto", or a list of GPU indices (e.g. [0, 1])',
    "hosts.*.gpus[]": "a GPU index (an integer >= 0)",
    "hosts.*.workdir": "a directory path",
    "hosts.*.env": 'a table of environment variables, e.g. env = { HF_HOME = "/data/hf" }',
    "hosts.*.env.*": "a string",
    "stage": 'at least one [[stage]] block with kind = "queue" or "run"',
    "stage[]": 'a [[stage]] table with kind = "queue" or "run"',
    "stage[].name": f"a stage name of {_NAME_RULE}",
    "stage[].hosts": 'a list of host names, e.g. ["gpu-a"]',
    "stage[].hosts[]": "a host name",
    "stage[].command": "a command string or a list of arguments",
    "stage[].command[]": "a string argument",
    "stage[].env": 'a table of environment variables, e.g. env = { OMP_NUM_THREADS = "4" }',
    "stage[].env.*": "a string",
    "stage[].workdir": "a directory path",
    "stage[].grid": 'a table of axes, e.g. grid = { beam_width = "1..48", beam_length = [2, 4] }',
    "stage[].grid.*": 'a range like "1..48" or "2..16:2", or a list of values',
    "stage[].grid.*[]": "a string, number or boolean",
    "stage[].key": 'a template like "{beam_length}-{beam_width}"',
    "stage[].cost": 'an arithmetic expression over grid axes, e.g. "beam_width * beam_length"',
    "stage[].retries": "an integer from 0 to 100",
    "stage[].halt": '"never", "first-failure" or "N-failures" (e.g. "3-failures")',
    "stage[].timeout": 'seconds, or a duration like "90s", "30m", "2h"',
    "stage[].done": "a regular expression",
    "stage[].progress": r"a regular expression with two groups (done, total), e.g. '(\d+)/(\d+)'",
    "stage[].isolate_gpu": "true or false",
    "metrics": r"a table of metrics, e.g. [metrics] then tokens_per_sec = '^Tokens/second\s+([\d.]+)'",
    "metrics.*": "a regex string, or a table with regex, json, file, stage, type, last",
    "metrics.*.regex": r"a regex with a capture group around the value, e.g. 'tokens/s:\s+([\d.]+)'",
    "metrics.*.json": 'a dotted key path like "metrics.total_tps"',
    "metrics.*.file": "a file path (placeholders allowed)",
    "metrics.*.stage": "a stage name",
    "metrics.*.last": "true or false",
    "results": "a [results] table with columns, sort, format",
    "results.columns": "a list of column names",
    "results.columns[]": "a column name",
    "results.sort": 'a list of column names, "-name" for descending',
    "results.sort[]": 'a column name, "-name" for descending',
    "results.format": 'a table of printf formats, e.g. format = { tokens_per_sec = "%.2f" }',
    "results.format.*": 'a printf format like "%f"',
    "plot": "[[plot]] blocks",
    "plot[]": "a [[plot]] table with kind, x, y, value, group, title, step, xlabel",
    "plot[].kind": '"heatmap", "line" or "bar"',
    "plot[].title": "a string",
    "plot[].x": "a column name",
    "plot[].y": "a column name",
    "plot[].value": "a column name",
    "plot[].group": "a column name",
    "plot[].step": "a positive number or a numeric column (the x distance between a list's items)",
    "plot[].xlabel": "a string",
}

_TYPE_EXPECT: dict[str, str] = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


# ---------------------------------------------------------------------------------------------------------------
# Walking the models' annotations, to name fields and models at a path


def _flatten(tp: Any) -> list[Any]:
    """The alternatives of a type: unions and Annotated unwrapped."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _flatten(get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        return [alt for arg in get_args(tp) for alt in _flatten(arg)]
    return [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _field_names(model: type[BaseModel]) -> list[str]:
    """A model's fields by their TOML names (`json`, not `json_path`)."""
    return [info.alias or name for name, info in model.model_fields.items()]


def _field_type(model: type[BaseModel], key: str) -> Any:
    for name, info in model.model_fields.items():
        if key in (info.alias, name):
            return info.annotation
    return None


def _descend(data: object, key: Key) -> object:
    if isinstance(data, dict) and isinstance(key, str):
        return data.get(key)
    if isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data):
        return data[key]
    return None


def _pick_model(candidates: list[Any], data: object) -> type[BaseModel] | None:
    """The model among a union's alternatives that `data` is meant for (by its `kind`, for stages)."""
    models: list[type[BaseModel]] = [tp for tp in candidates if _is_model(tp)]
    if len(models) > 1 and isinstance(data, dict):
        for model in models:
            kind = _field_type(model, "kind")
            if get_origin(kind) is Literal and data.get("kind") in get_args(kind):
                return model
    return models[0] if models else None


def _schema_at(path: FieldPath, data: object) -> tuple[str, type[BaseModel] | None]:
    """The path's schema pattern (`stage[].grid.*`) and the model of the table it points to, if it is one."""
    candidates: list[Any] = [Recipe]
    pattern = ""
    current = data
    for part in path:
        following: list[Any] = []
        step = str(part)
        for tp in candidates:
            if _is_model(tp) and isinstance(part, str):
                annotation = _field_type(tp, part)
                if annotation is not None:
                    following.extend(_flatten(annotation))
            elif get_origin(tp) is list and isinstance(part, int):
                following.extend(_flatten(get_args(tp)[0]))
                step = "[]"
            elif get_origin(tp) is dict and isinstance(part, str):
                following.extend(_flatten(get_args(tp)[1]))
                step = "*"
        if step == "[]" or isinstance(part, int):
            pattern += "[]"
        else:
            pattern += f".{step}" if pattern else step
        candidates = following
        current = _descend(current, part)
    return pattern, _pick_model(candidates, current)


def _stage_kinds() -> list[str]:
    kinds: list[str] = []
    for model in _flatten(StageSpec):
        kinds.extend(str(k) for k in get_args(_field_type(model, "kind")))
    return kinds


# ---------------------------------------------------------------------------------------------------------------
# Pydantic errors into plain words


@dataclass
class _RawError:
    path: FieldPath
    type: str
    message: str
    union_branch: bool
    """The error is one alternative of a union failing as a whole (pydantic reports one per alternative)."""


def _strip_loc(loc: tuple[int | str, ...], data: object, error_type: str) -> tuple[FieldPath, bool]:
    """Pydantic's location without its union tags ('str', 'list[int]', the stage kind), and whether it ended
    on one: walks the input data, so every kept part is a key or index the user wrote."""
    path: list[Key] = []
    current = data
    ended_on_tag = False
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if (isinstance(current, dict) and isinstance(part, str) and part in current) or (
            isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        ):
            path.append(part)
            current = _descend(current, part)
            ended_on_tag = False
        elif last and error_type == "missing":
            path.append(part)
        else:
            ended_on_tag = True
    return tuple(path), ended_on_tag


def _pydantic_problems(exc: ValidationError, data: object, locator: _Locator) -> list[RecipeProblem]:
    raw: list[_RawError] = []
    for err in exc.errors(include_url=False):
        path, branch = _strip_loc(err["loc"], data, err["type"])
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path = (*path, "kind")  # the discriminator: point at the kind line, or the block when it is missing
        message = _error_message(err, path, data)
        raw.append(_RawError(path, err["type"], message, branch))
    # A union reports every alternative; when the value went into one alternative and failed deeper inside it,
    # only that deeper error matters. Alternatives failing side by side merge into one "expected ..." line.
    kept = [
        e for e in raw
        if not (e.union_branch and any(o.path[: len(e.path)] == e.path and len(o.path) > len(e.path) for o in raw))
    ]  # fmt: skip
    merged: dict[FieldPath, list[_RawError]] = {}
    for e in kept:
        merged.setdefault(e.path, []).append(e)
    problems: list[RecipeProblem] = []
    for path, group in merged.items():
        if len(group) > 1 and all(e.union_branch for e in group):
            problems.append(_union_problem(path, group, data, locator))
        else:
            problems.extend(RecipeProblem(format_path(path), e.message, locator.line_of(path)) for e in group)
    return problems


def _union_problem(path: FieldPath, group: list[_RawError], data: object, locator: _Locator) -> RecipeProblem:
    pattern, _ = _schema_at(path, data)
    expected = _EXPECT.get(pattern)
    if expected is None:
        alternatives = list(dict.fromkeys(_TYPE_EXPECT.get(e.type, "a valid value") for e in group))
        expected = " or ".join(alternatives)
    got = _show(_value_at(data, path))
    return RecipeProblem(format_path(path), f"got {got}; expected {expected}", locator.line_of(path))


def _value_at(data: object, path: FieldPath) -> object:
    for part in path:
        data = _descend(data, part)
    return data


def _error_message(err: Any, path: FieldPath, data: object) -> str:
    kind: str = err["type"]
    msg: str = err["msg"]
    ctx: dict[str, Any] = err.get("ctx") or {}
    value = err["input"]
    pattern, _ = _schema_at(path, data)
    expected = _EXPECT.get(pattern)
    if kind == "extra_forbidden":
        _, model = _schema_at(path[:-1], data)
        fields = _field_names(model) if model is not None else []
        unknown = str(path[-1])
        return f"unknown field '{unknown}'{_suggest(unknown, fields)}; expected one of: {', '.join(fields)}"
    if kind == "missing":
        return f"missing field '{path[-1]}'; expected {expected or 'a value'}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        kinds = _stage_kinds()
        if kind == "union_tag_not_found":
            return f"missing field 'kind'; expected one of: {', '.join(kinds)}"
        tag = str(ctx.get("tag", ""))
        return f"unknown stage kind '{tag}'{_suggest(tag, kinds)}; expected one of: {', '.join(kinds)}"
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = _suggest(value, options) if isinstance(value, str) else ""
        return f"got {_show(value)}{hint}; expected one of: {', '.join(options)}"
    if kind in ("value_error", "assertion_error"):
        text = str(ctx["error"]) if "error" in ctx else re.sub(r"^(Value|Assertion) error, ", "", msg)
        if text.startswith("expected"):
            return f"got {_show(value)}; {text}"
        if "; expected" in text:
            return text
        return f"{text}; expected {expected or 'a valid value'}"
    if kind == "string_pattern_mismatch":
        rule = _NAME_RULE if ctx.get("pattern") == NAME_PATTERN else f"text matching {ctx.get('pattern')}"
        return f"got {_show(value)}; expected {rule}"
    if kind == "too_short":
        at_least = f"at least {ctx.get('min_length')} item(s)"
        return f"got {_show(value)}; expected {expected or at_least}"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return f"got {_show(value)}; expected {expected or msg.removeprefix('Input should be ')}"
    if kind in _TYPE_EXPECT:
        return f"got {_show(value)}; expected {expected or _TYPE_EXPECT[kind]}"
    if msg.startswith("Input should be "):
        return f"got {_show(value)}; expected {msg.removeprefix('Input should be ')}"
    return f"{msg[:1].lower()}{msg[1:]}; expected {expected or 'a valid value'}"


# ---------------------------------------------------------------------------------------------------------------
# Rules across fields


class _Checker:
    """The rules pydantic cannot see: names, references between tables, grids, costs, placeholders, columns."""

    def __init__(self, recipe: Recipe, data: dict[str, Any], locator: _Locator) -> None:
        self.recipe = recipe
        self.data = data
        self.locator = locator
        self.problems: list[RecipeProblem] = []
        self.stage_names = [stage_name(s) for s in recipe.stage]
        self.grids: dict[str, list[dict[str, Scalar]]] = {}
        self.axes: list[list[str]] = [list(s.grid) if isinstance(s, QueueStage) else [] for s in recipe.stage]
        self.metric_names: list[str] = []
        self.list_metrics: set[str] = set()
        """Values of `type = "list"`: lists of numbers, drawn only as lines over their items."""
        self.trial_axes: set[str] = set(recipe.matrix) | {k for t in recipe.trial for k in t}
        self.trials: list[dict[str, Scalar]] = [{}]

    def problem(self, path: FieldPath, message: str) -> None:
        self.problems.append(RecipeProblem(format_path(path), message, self.locator.line_of(path)))

    def run(self) -> None:
        self._coerced_values(self.recipe, self.data, ())
        self._names()
        self._trials()
        for i, stage in enumerate(self.recipe.stage):
            self._stage(i, stage)
        self._metrics()
        self._results_and_plots()

    def _coerced_values(self, model: BaseModel, raw: Mapping[str, Any], path: FieldPath) -> None:
        """pydantic turns `retries = true` into 1 and `isolate_gpu = 1` into true; a recipe must say what it means."""
        for name, info in type(model).model_fields.items():
            key = info.alias or name
            if key in raw:
                self._compare(raw[key], getattr(model, name), (*path, key))

    def _compare(self, raw: Any, value: Any, path: FieldPath) -> None:
        if isinstance(value, BaseModel) and isinstance(raw, dict):
            self._coerced_values(value, raw, path)
        elif isinstance(value, list) and isinstance(raw, list):
            for i, (r, v) in enumerate(zip(raw, value, strict=False)):
                self._compare(r, v, (*path, i))
        elif isinstance(value, dict) and isinstance(raw, dict):
            for k, v in value.items():
                if k in raw:
                    self._compare(raw[k], v, (*path, k))
        elif isinstance(raw, bool) != isinstance(value, bool):
            pattern, _ = _schema_at(path, self.data)
            expected = _EXPECT.get(pattern) or ("true or false" if isinstance(value, bool) else "a number")
            self.problem(path, f"got {_show(raw)}; expected {expected}")

    def _names(self) -> None:
        recipe = self.recipe
        for var in recipe.variables:
            if not _NAME.match(var):
                self.problem(("variables", var), f"the name '{var}' cannot be a placeholder; expected {_NAME_RULE}")
            elif var in BUILTIN_PLACEHOLDERS:
                self.problem(
                    ("variables", var),
                    f"variable '{var}' has the name of a built-in placeholder; expected another name "
                    f"(built-ins: {', '.join(sorted(BUILTIN_PLACEHOLDERS))})",
                )
        for host in recipe.hosts:
            if not _NAME.match(host):
                self.problem(("hosts", host), f"the host name '{host}' is not usable; expected {_NAME_RULE}")
        first_index: dict[str, int] = {}
        for i, stage in enumerate(recipe.stage):
            name = self.stage_names[i]
            path: FieldPath = ("stage", i, "name") if stage.name is not None else ("stage", i)
            if not _NAME.match(name):
                self.problem(path, f"the stage name '{name}' is not usable; expected {_NAME_RULE}")
            elif name in first_index:
                j = first_index[name]
                other_line = self.locator.line_of(("stage", j))
                at = f" at line {other_line}" if other_line else ""
                self.problem(
                    path,
                    f"duplicate stage name '{name}' (stage[{j}]{at} has it too); "
                    'expected a unique name per stage: set name = "..." on one of them',
                )
            else:
                first_index[name] = i

    def _trials(self) -> None:
        """The matrix (axes, cartesian product) or the explicit [[trial]] tables; their keys are placeholders."""
        recipe = self.recipe
        if recipe.matrix and recipe.trial:
            self.problem(("matrix",), "give either [matrix] axes or [[trial]] tables, not both; expected one of them")
            return
        for name in sorted(self.trial_axes):
            if name == "name" and recipe.trial:
                continue
            if not _NAME.match(name):
                self.problem(("matrix", name), f"the name '{name}' cannot be a placeholder; expected {_NAME_RULE}")
            elif name in recipe.variables or name in BUILTIN_PLACEHOLDERS:
                self.problem(("matrix", name), f"trial key '{name}' has the name of a variable or a built-in; "
                             "expected a distinct name")
        if recipe.matrix:
            for axis, spec in recipe.matrix.items():
                try:
                    parse_axis(spec)
                except GridError as exc:
                    self.problem(("matrix", axis), f"{exc.problem}; expected {exc.expected}")
                    return
            self.trials = expand_grid(recipe.matrix)
        elif recipe.trial:
            seen: set[str] = set()
            keys = set(recipe.trial[0])
            for j, trial in enumerate(recipe.trial):
                if set(trial) != keys:
                    self.problem(("trial", j), f"trial keys {sorted(trial)} differ from the first trial's "
                                 f"{sorted(keys)}; expected the same keys in every trial")
                label = trial_name(trial)
                if label in seen:
                    self.problem(("trial", j), f"duplicate trial '{label}'; expected distinct trials")
                seen.add(label)
            self.trials = [dict(t) for t in recipe.trial]

    # -- stages --------------------------------------------------------------------------------------------------

    def _stage(self, i: int, stage: StageSpec) -> None:
        base: FieldPath = ("stage", i)
        self._stage_hosts(base, stage)
        points: list[dict[str, Scalar]] = [{}]
        if isinstance(stage, QueueStage):
            points = self._grid(base, stage)
            self._queue_rules(base, stage, points)
            self._ray_executor(i, base, stage)
        self.grids.setdefault(self.stage_names[i], points)
        known = self._known_placeholders(i) | STAGE_EXTRAS.get(stage.kind, frozenset())
        for host_field in ("head", "coordinator"):
            host = getattr(stage, host_field, None)
            if host is not None:
                self._host_name((*base, host_field), host)
        if isinstance(stage, SwarmStage):
            self._command(base, stage.dht_command, i, known, field="dht_command")
            self._template((*base, "identity"), stage.identity, i, known)
            if stage.servers is not None:
                # Servers use the swarm's own DHT address: this stage's name counts as "earlier" for them.
                self._command(base, stage.servers, i + 1, known, field="servers")
        if isinstance(stage, ShapeStage):
            self._shape_values(base, stage)
        if isinstance(stage, FetchStage):
            for j, path in enumerate(stage.files):
                self._template((*base, "files", j), path, i, known)
        command = getattr(stage, "command", None)
        if command is not None:
            self._command(base, command, i, known)
        for key, value in getattr(stage, "env", {}).items():
            self._template((*base, "env", key), value, i, known)
        workdir = getattr(stage, "workdir", None)
        if workdir is not None:
            self._template((*base, "workdir"), workdir, i, known)
        if isinstance(stage, ServiceStage):
            if stage.stop is not None:
                self._command(base, stage.stop, i, known, field="stop")
            for key, regex in stage.capture.items():
                self._capture((*base, "capture", key), key, regex)
            if stage.ready is not None:
                rules = [r for r in (stage.ready.log, stage.ready.port, stage.ready.command) if r is not None]
                if len(rules) != 1:
                    self.problem((*base, "ready"), "give exactly one readiness rule; expected ready = { log = "
                                 "'REGEX' }, { port = N } or { command = \"...\" } (with an optional timeout)")
        if isinstance(stage, QueueStage) and stage.key is not None:
            # md5 placement hashes the key when the plan is made: no runtime or captured values exist yet.
            plan_time = set(self.recipe.variables) | set(self.axes[i]) | PLAN_BUILTINS
            self._template((*base, "key"), stage.key, 0, plan_time)

    def _shape_values(self, base: FieldPath, stage: ShapeStage) -> None:
        """tc values are checked here, not when a host is already half-way through a trial."""
        from remote.stages.shape import check_interface, normalise_delay, normalise_rate  # noqa: PLC0415

        def whole_number(text: str) -> str:
            if not text.strip().isdigit():
                raise ValueError(f"limit {text!r} is not a whole number (packets for netem, bytes for tbf)")
            return text

        checks: list[tuple[str, str | int | None, Callable[[str], str]]] = [
            ("interface", stage.interface, check_interface), ("rate", stage.rate, normalise_rate),
            ("delay", stage.delay, normalise_delay), ("limit", stage.limit, whole_number)]
        known = set(self.recipe.variables) | self.trial_axes
        for field_name, value, check in checks:
            if value is None:
                continue
            path = (*base, field_name)
            if field_name != "interface" and not self._template(path, str(value), 0, known):
                continue
            for trial in self.trials:  # trial values fill the placeholders: check every trial's value
                text = render(str(value), {**self.recipe.variables, **trial}) if field_name != "interface" else value
                try:
                    check(str(text))
                except ValueError as exc:
                    where = f" (trial {trial_name(trial)})" if trial else ""
                    self.problem(path, f"{exc}{where}")
                    break
        if stage.delay is None and stage.rate is None:
            self.problem(base, "a shape stage needs a delay or a rate; expected delay = \"10ms\" and/or "
                         "rate = \"100mbit\"")
        try:
            parse_duration(stage.revert_after)
        except ValueError as exc:
            self.problem((*base, "revert_after"), str(exc))

    def _capture(self, path: FieldPath, key: str, regex: str) -> None:
        if not _NAME.match(key):
            self.problem(path, f"the capture name '{key}' cannot be a placeholder; expected {_NAME_RULE}")
            return
        try:
            compiled = re.compile(regex)
        except (re.error, OverflowError, RecursionError) as exc:
            self.problem(path, f"the regex does not compile: {exc}; expected a Python regex with one group")
            return
        if compiled.groups < 1:
            self.problem(path, "the regex has no group; expected one capture group around the value")

    def _host_name(self, path: FieldPath, host: str) -> None:
        known = list(self.recipe.hosts) or ["local"]
        if host not in known:
            self.problem(path, f"unknown host '{host}'{_suggest(host, known)}; expected one of: {', '.join(known)}")

    def _stage_hosts(self, base: FieldPath, stage: StageSpec) -> None:
        if stage.hosts is None:
            return
        known = list(self.recipe.hosts) or ["local"]
        note = "" if self.recipe.hosts else " (no [hosts] table: this machine alone)"
        if not stage.hosts:
            self.problem((*base, "hosts"), f"the list is empty; expected host names from: {', '.join(known)}{note}")
        for j, host in enumerate(stage.hosts):
            if host not in known:
                self.problem(
                    (*base, "hosts", j),
                    f"unknown host '{host}'{_suggest(host, known)}; expected one of: {', '.join(known)}{note}",
                )

    def _grid(self, base: FieldPath, stage: QueueStage) -> list[dict[str, Scalar]]:
        variables = self.recipe.variables
        axes_ok = True
        for axis, spec in stage.grid.items():
            path = (*base, "grid", axis)
            if not _NAME.match(axis):
                self.problem(path, f"the axis name '{axis}' cannot be a placeholder; expected {_NAME_RULE}")
                axes_ok = False
            elif axis in variables:
                self.problem(
                    path,
                    f"grid axis '{axis}' has the same name as a variable; expected distinct names "
                    "(rename the axis or the variable)",
                )
            elif axis in BUILTIN_PLACEHOLDERS:
                self.problem(
                    path,
                    f"grid axis '{axis}' has the name of a built-in placeholder; expected another name "
                    f"(built-ins: {', '.join(sorted(BUILTIN_PLACEHOLDERS))})",
                )
            try:
                parse_axis(spec)
            except GridError as exc:
                self.problem(path, f"{exc.problem}; expected {exc.expected}")
                axes_ok = False
        if not axes_ok:
            return [{}]
        try:
            return expand_grid(stage.grid)
        except GridError as exc:
            self.problem((*base, "grid"), f"{exc.problem}; expected {exc.expected}")
            return [{}]

    def _ray_executor(self, i: int, base: FieldPath, stage: QueueStage) -> None:
        """executor = "ray" needs a Ray cluster started by an earlier stage, and lets Ray place the tasks."""
        earlier = [(self.stage_names[j], s) for j, s in enumerate(self.recipe.stage[:i]) if s.kind == "ray"]
        if stage.executor != "ray":
            if stage.cluster is not None:
                self.problem((*base, "cluster"), 'cluster is only used with executor = "ray"; expected no cluster, '
                             'or executor = "ray"')
            return
        if not earlier:
            self.problem((*base, "executor"), 'executor = "ray" needs a kind = "ray" stage before this one; '
                         "expected a ray stage earlier in the recipe")
            return
        names = [n for n, _ in earlier]
        if stage.cluster is not None and stage.cluster not in names:
            self.problem((*base, "cluster"), f"'{stage.cluster}' is not a ray stage before this one; expected one "
                         f"of: {', '.join(names)}")
        if stage.placement != "free-slot":
            self.problem((*base, "placement"), f'placement = "{stage.placement}" means nothing when Ray places the '
                         'tasks; expected placement = "free-slot" (the default) with executor = "ray"')

    def _queue_rules(self, base: FieldPath, stage: QueueStage, points: list[dict[str, Scalar]]) -> None:
        if stage.cost is not None:
            try:
                cost = compile_cost(stage.cost, list(stage.grid))
                for point in points:  # every task's cost must be a number, so dispatch order never fails later
                    cost(point)
            except GridError as exc:
                self.problem((*base, "cost"), f"{exc.problem}; expected {exc.expected}")
        elif stage.order == "longest-first":
            self.problem(
                (*base, "order"),
                'order = "longest-first" needs a cost to sort by; expected cost = "<expression over grid axes>", '
                'e.g. cost = "beam_width * beam_length"',
            )
        if stage.key is not None and stage.placement != "md5":
            self.problem(
                (*base, "key"),
                f'key is only used by placement = "md5" (this stage uses "{stage.placement}"); '
                'expected placement = "md5", or no key',
            )
        if stage.progress is not None and re.compile(stage.progress).groups < 2:
            self.problem((*base, "progress"), f"the regex needs two groups; expected {_EXPECT['stage[].progress']}")

    def _known_placeholders(self, index: int) -> set[str]:
        return set(self.recipe.variables) | set(self.axes[index]) | BUILTIN_PLACEHOLDERS | self.trial_axes

    def _command(self, base: FieldPath, command: str | list[str], index: int, known: set[str], *,
                 field: str = "command") -> None:
        path = (*base, field)
        if isinstance(command, str):
            if not self._template(path, command, index, known, report_unknown=False):
                return
            try:
                args = split_command(command)
            except TemplateError as exc:
                self.problem(path, str(exc))
                return
            if not args:
                self.problem(path, "the command is empty; expected a program and its arguments")
            for arg in args:
                if not self._template(path, arg, index, known):
                    return
            return
        if not command:
            self.problem(path, "the command is empty; expected a program and its arguments")
        for j, arg in enumerate(command):
            self._template((*path, j), arg, index, known)

    def _template(
        self, path: FieldPath, text: str, index: int | None, known: set[str], *, report_unknown: bool = True
    ) -> bool:
        """Check one template's syntax and names; `index` is the stage using it (None: any stage's values)."""
        try:
            names = placeholders(text)
        except TemplateError as exc:
            self.problem(path, str(exc))
            return False
        if not report_unknown:
            return True
        earlier = self.stage_names if index is None else self.stage_names[:index]
        for name in names:
            head, dot, _ = name.partition(".")
            if dot:
                if head in earlier:
                    continue
                if head in self.stage_names:
                    self.problem(
                        path,
                        f"placeholder {{{name}}} names stage '{head}', which does not run before this one; "
                        "expected a value captured by an earlier stage",
                    )
                    return False
            elif name in known:
                continue
            elif name in RUNTIME_PLACEHOLDERS:
                self.problem(
                    path,
                    f"placeholder {{{name}}} is only known when a task is dispatched, too late for this field; "
                    f"expected one of: {', '.join(sorted(known))}",
                )
                return False
            choices = sorted(known)
            hint = _suggest(name, choices, "{{{}}}")
            stages = f"; or {{stage.value}} of an earlier stage: {', '.join(earlier)}" if earlier else ""
            self.problem(
                path,
                f"unknown placeholder {{{name}}}{hint}; expected one of: {', '.join(choices)} "
                f"(variables, grid axes, built-ins){stages}",
            )
            return False
        return True

    # -- metrics, results, plots ---------------------------------------------------------------------------------

    def _metrics(self) -> None:
        producer: dict[str, str] = {}
        axes = {a for stage_axes in self.axes for a in stage_axes}
        for key, spec in self.recipe.metrics.items():
            path: FieldPath = ("metrics", key)
            if not _NAME.match(key):
                self.problem(path, f"the metric name '{key}' is not usable; expected {_NAME_RULE}")
            regex = spec if isinstance(spec, str) else spec.regex
            regex_path = path if isinstance(spec, str) else (*path, "regex")
            names = [key]
            if isinstance(spec, MetricSpec) and spec.expr is not None and (regex is not None or spec.json_path):
                regex = None  # reported by _metric_spec; the value is the derived one
            if regex is not None:
                try:
                    compiled = re.compile(regex)
                except (re.error, OverflowError, RecursionError) as exc:
                    self.problem(regex_path, f"the regex does not compile: {exc}; expected a Python regular expression")
                    continue
                if compiled.groups == 0:
                    self.problem(
                        regex_path,
                        f"the regex needs a capture group (or named groups) around the value; "
                        f"expected {_EXPECT['metrics.*.regex']}",
                    )
                    continue
                names = list(compiled.groupindex) or [key]
            if isinstance(spec, MetricSpec):
                self._metric_spec(path, spec)
            for name in names:
                if name in producer:
                    self.problem(
                        path,
                        f"metric '{name}' is produced twice (by metrics.{producer[name]} too); expected distinct names",
                    )
                elif name in axes or name in BUILTIN_COLUMNS or name in RESERVED_COLUMNS:
                    what = ("a grid axis" if name in axes else "a built-in column" if name in BUILTIN_COLUMNS
                            else "a column benchfleet fills itself")
                    self.problem(
                        path, f"metric '{name}' has the name of {what}; expected a name distinct from the columns"
                    )
                else:
                    producer[name] = key
                    self.metric_names.append(name)
                    if isinstance(spec, MetricSpec) and spec.types.get(name, spec.type) == "list":
                        self.list_metrics.add(name)
        derived = [k for k, spec in self.recipe.metrics.items() if isinstance(spec, MetricSpec) and spec.expr]
        for key in derived:
            spec = self.recipe.metrics[key]
            assert isinstance(spec, MetricSpec) and spec.expr is not None
            self._expr(("metrics", key, "expr"), key, spec, producer, derived)
        if any(isinstance(spec, MetricSpec) and spec.missing for spec in self.recipe.metrics.values()):
            self.metric_names.append(FAILED_CASE)

    def _expr(self, path: FieldPath, key: str, spec: MetricSpec, producer: Mapping[str, str],
              derived: Sequence[str]) -> None:
        """A derived value reads metrics (derived ones defined before it), grid and trial values, variables,
        and captures of stages that run before its own (`stage.key`)."""
        assert spec.expr is not None
        try:
            formula = compile_expr(spec.expr)
        except ExprError as exc:
            self.problem(path, str(exc))
            return
        axes = {a for stage_axes in self.axes for a in stage_axes}
        usable = [n for n in producer if n != key and (n not in derived or derived.index(n) < derived.index(key))]
        plain = set(usable) | axes | self.trial_axes | set(self.recipe.variables)
        index = self.stage_names.index(spec.stage) if spec.stage in self.stage_names else None
        earlier = self.stage_names if index is None else self.stage_names[:index]
        for name in formula.names:
            head, dot, _ = name.partition(".")
            if name == key:
                self.problem(path, f"{spec.expr!r} reads its own value; expected other metrics")
            elif name in self.list_metrics:
                self.problem(path, f"'{name}' is a list metric (type = \"list\"), not a number; expected "
                             "metrics with one number each")
            elif name in derived and derived.index(name) > derived.index(key):
                self.problem(path, f"'{name}' is a derived value defined after '{key}'; expected derived "
                             "values in the order they use each other")
            elif dot and head not in earlier:
                where = f"stage '{head}' does not run before stage '{spec.stage}'" if head in self.stage_names \
                    else f"no stage is named '{head}'"
                self.problem(path, f"'{name}' reads a capture, but {where}; expected a capture of an earlier "
                             f"stage ({', '.join(f'{s}.KEY' for s in earlier) or 'none'})")
            elif not dot and name not in plain:
                choices = sorted(plain)
                self.problem(path, f"unknown name '{name}'{_suggest(name, choices)} in {spec.expr!r}; expected a "
                             f"metric, grid or trial value, variable, or stage.key capture: {', '.join(choices)}")
            else:
                continue
            return

    def _metric_spec(self, path: FieldPath, spec: MetricSpec) -> None:
        if spec.expr is not None:
            if spec.regex is not None or spec.json_path is not None or spec.file is not None:
                self.problem((*path, "expr"), "a derived value (expr) reads no output; expected no regex, json or "
                             "file next to expr")
            for name in ("missing", "types", "each"):
                if name in spec.model_fields_set:
                    self.problem((*path, name), f"{name} describes captured text and a derived value (expr) has "
                                 "none; expected it only on regex or json metrics")
            if spec.type in ("str", "list"):
                self.problem((*path, "type"), 'a derived value (expr) is a number; expected type = "float" or "int"')
        elif spec.regex is None and spec.json_path is None:
            self.problem(
                path, "the metric has neither regex nor json; expected regex = '...(value)...', json = \"key\" "
                "or expr = \"a / b\""
            )
        elif spec.regex is not None and spec.json_path is not None:
            self.problem(path, "the metric has both regex and json; expected only one of them")
        if spec.types:
            groups = list(re.compile(spec.regex).groupindex) if spec.regex is not None and spec.json_path is None \
                else []
            for name in spec.types:
                if name not in groups:
                    expected = f"one of the regex's named groups: {', '.join(groups)}" if groups else \
                        "a regex with named groups (?P<name>...) to type"
                    self.problem((*path, "types", name), f"'{name}' is not a named group of this metric; "
                                 f"expected {expected}")
        if spec.each and "last" in spec.model_fields_set:
            self.problem((*path, "last"), "each = true keeps every match as a row; expected no `last` with it")
        index: int | None = None
        if spec.stage is not None:
            if spec.stage not in self.stage_names:
                known = self.stage_names
                self.problem(
                    (*path, "stage"),
                    f"unknown stage '{spec.stage}'{_suggest(spec.stage, known)}; expected one of: {', '.join(known)}",
                )
                return
            index = self.stage_names.index(spec.stage)
        if spec.file is not None:
            if index is not None:
                names = self._known_placeholders(index)
            else:  # the metric applies to every task, so only axes common to every stage can fill the file name
                common = set.intersection(*(set(a) for a in self.axes)) if self.axes else set()
                names = set(self.recipe.variables) | common | BUILTIN_PLACEHOLDERS
            self._template((*path, "file"), spec.file, index, names)

    def _results_and_plots(self) -> None:
        results = self.recipe.results
        axes = list(dict.fromkeys([*sorted(self.trial_axes), *(a for stage_axes in self.axes for a in stage_axes)]))
        verdict = [VERDICT] if results.baseline else []
        known = [*axes, *self.metric_names, *verdict, *(c for c in BUILTIN_COLUMNS if c not in axes)]
        self._baseline(known)
        seen: set[str] = set()
        for j, column in enumerate(results.columns):
            path: FieldPath = ("results", "columns", j)
            if column not in known:
                self.problem(
                    path,
                    f"unknown column '{column}'{_suggest(column, known)}; expected a grid axis, a metric or a "
                    f"built-in: {', '.join(known)}",
                )
            elif column in seen:
                self.problem(path, f"column '{column}' is listed twice; expected each column once")
            seen.add(column)
        columns = list(results.columns) or known
        listing = ", ".join(columns)
        which = "one of the columns" if results.columns else "a known column"
        for j, key in enumerate(results.sort):
            column = key.removeprefix("-")
            if column not in columns:
                self.problem(
                    ("results", "sort", j),
                    f"unknown sort key '{key}'{_suggest(column, columns)}; expected {which} "
                    f'("-name" for descending): {listing}',
                )
            elif column in self.list_metrics:
                self.problem(("results", "sort", j), f"'{column}' is a list metric and has no order; expected a "
                             "column of numbers or text")
        for column, fmt in results.format.items():
            path = ("results", "format", column)
            if column not in columns:
                self.problem(path, f"unknown column '{column}'{_suggest(column, columns)}; expected {which}: {listing}")
                continue
            try:
                fmt % 1
            except (TypeError, ValueError):
                self.problem(
                    path, f'{_show(fmt)} is not a printf format for one value; expected e.g. "%f", "%.3f" or "%s"'
                )
        for i, plot in enumerate(self.recipe.plot):
            self._plot(i, plot, columns, f"{which}: {listing}")

    def _plot(self, i: int, plot: PlotSpec, columns: Sequence[str], expected: str) -> None:
        """Known columns; a list metric only as the y of a line, which then has no x (its items' positions are)."""
        step = plot.step if isinstance(plot.step, str) else None
        for field in ("x", "y", "value", "group", "step"):
            column = getattr(plot, field) if field != "step" else step
            if column is None:
                continue
            if column not in columns:
                self.problem(("plot", i, field), f"unknown column '{column}'{_suggest(column, columns)}; "
                             f"expected {expected}")
            elif column in self.list_metrics and not (field == "y" and plot.kind == "line"):
                hint = f'kind = "line" with y = \'{column}\'' if field in ("y", "value") else \
                    "a column with one value per row"
                self.problem(("plot", i, field), f"'{column}' is a list metric (type = \"list\"), which only "
                             f"a line draws, one line per row; expected {hint}")
                return
        listed = plot.kind == "line" and plot.y in self.list_metrics
        needed = ("x", "y", "value") if plot.kind == "heatmap" else ("x", "y")
        for field in needed:
            if getattr(plot, field) is None and not (listed and field == "x"):
                self.problem(("plot", i, field), f"missing field '{field}': a {plot.kind} plot needs "
                             f"{', '.join(needed[:-1])} and {needed[-1]}; expected {field} = \"<column>\"")
                return
        if listed and plot.x is not None:
            self.problem(("plot", i, "x"), f"'{plot.y}' is a list metric: its line runs over the items' positions; "
                         "expected no x (step = a number or column spaces the items, e.g. a sampling interval)")
        elif not listed and plot.step is not None:
            self.problem(("plot", i, "step"), "step spaces the items of a list metric; expected it only on a line "
                         "whose y is a list metric (type = \"list\")")

    def _baseline(self, known: Sequence[str]) -> None:
        """Each expectation names a metric, a non-zero value (changes are relative to it) and known columns."""
        for name, expected in self.recipe.results.baseline.items():
            path: FieldPath = ("results", "baseline", name)
            if name not in self.metric_names or name == FAILED_CASE:
                metrics = [m for m in self.metric_names if m != FAILED_CASE]
                self.problem(path, f"unknown metric '{name}'{_suggest(name, metrics)}; expected one of the "
                             f"metrics: {', '.join(metrics) or '(none: add a [metrics] table)'}")
            elif name in self.list_metrics:
                self.problem(path, f"'{name}' is a list metric (type = \"list\"); expected a metric with one "
                             "number per row")
            if expected.value == 0:
                self.problem((*path, "value"), "an expected value of 0 has no relative change; expected a "
                             "non-zero value")
            for column in expected.where:
                if column not in known:
                    self.problem((*path, "where", column), f"unknown column '{column}'{_suggest(column, known)}; "
                                 f"expected a grid axis, trial key, metric or built-in: {', '.join(known)}")


# ---------------------------------------------------------------------------------------------------------------
# Lines of fields: tomllib keeps no positions, so scan the (already valid) TOML text for keys and headers.


class _Locator:
    """Maps field paths to the 1-based line where the key, array element or table header is written."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]
        self._i = 0
        self._aot: dict[FieldPath, int] = {}
        self.lines: dict[FieldPath, int] = {}
        # tomllib accepted the text, so a failure here only loses the lines past a construct this scan misreads.
        with contextlib.suppress(IndexError, ValueError, RecursionError, tomllib.TOMLDecodeError):
            self._document()

    def line_of(self, path: FieldPath) -> int | None:
        """The line of the path, else of its nearest ancestor that is written in the file."""
        for n in range(len(path), 0, -1):
            line = self.lines.get(path[:n])
            if line is not None:
                return line
        return None

    def _line_at(self, index: int) -> int:
        return bisect.bisect_left(self._newlines, index) + 1

    def _record(self, path: FieldPath, line: int, *, explicit: bool) -> None:
        for n in range(1, len(path)):
            self.lines.setdefault(path[:n], line)
        if explicit:
            self.lines[path] = line
        else:
            self.lines.setdefault(path, line)

    def _skip_blank(self, newlines: bool) -> None:
        text, n = self._text, len(self._text)
        while self._i < n:
            c = text[self._i]
            if c in " \t" or (newlines and c in "\r\n"):
                self._i += 1
            elif c == "#":
                end = text.find("\n", self._i)
                self._i = n if end == -1 else end
            else:
                return

    def _expect(self, token: str) -> None:
        if not self._text.startswith(token, self._i):
            raise ValueError(f"expected {token!r} at {self._i}")
        self._i += len(token)

    def _document(self) -> None:
        text, n = self._text, len(self._text)
        table: FieldPath = ()
        while True:
            self._skip_blank(newlines=True)
            if self._i >= n:
                return
            start = self._i
            line = self._line_at(start)
            if text.startswith("[[", start):
                self._i += 2
                table = self._resolve(self._key(), array=True)
                self._skip_blank(newlines=False)
                self._expect("]]")
                self._record(table, line, explicit=True)
            elif text[start] == "[":
                self._i += 1
                table = self._resolve(self._key(), array=False)
                self._skip_blank(newlines=False)
                self._expect("]")
                self._record(table, line, explicit=True)
            else:
                path = (*table, *self._key())
                self._record(path, line, explicit=False)
                self._skip_blank(newlines=False)
                self._expect("=")
                self._skip_blank(newlines=False)
                self._value(path)
            if self._i <= start:
                raise ValueError("no progress")

    def _resolve(self, keys: list[str], *, array: bool) -> FieldPath:
        """A header's path, with the current index of every array of tables it passes through."""
        resolved: list[Key] = []
        for k, key in enumerate(keys):
            resolved.append(key)
            prefix = tuple(resolved)
            if array and k == len(keys) - 1:
                count = self._aot.get(prefix, 0)
                self._aot[prefix] = count + 1
                resolved.append(count)
            elif prefix in self._aot:
                resolved.append(self._aot[prefix] - 1)
        return tuple(resolved)

    def _key(self) -> list[str]:
        text = self._text
        keys: list[str] = []
        while True:
            self._skip_blank(newlines=False)
            c = text[self._i]
            if c in "\"'":
                start = self._i
                self._string()
                keys.append(tomllib.loads(f"k = {text[start : self._i]}")["k"])
            else:
                m = _BARE_KEY.match(text, self._i)
                if m is None:
                    raise ValueError(f"no key at {self._i}")
                keys.append(m.group())
                self._i = m.end()
            self._skip_blank(newlines=False)
            if text.startswith(".", self._i):
                self._i += 1
                continue
            return keys

    def _string(self) -> None:
        text = self._text
        quote = text[self._i]
        if text.startswith(quote * 3, self._i):
            j = self._i + 3
            while not text.startswith(quote * 3, j):
                j += 2 if quote == '"' and text[j] == "\\" else 1
                if j >= len(text):
                    raise ValueError("unterminated string")
            run = 3
            while run < 5 and j + run < len(text) and text[j + run] == quote:
                run += 1  # up to two quotes just before the closing delimiter belong to the string
            self._i = j + run
            return
        j = self._i + 1
        while text[j] != quote:
            j += 2 if quote == '"' and text[j] == "\\" else 1
        self._i = j + 1

    def _value(self, path: FieldPath) -> None:
        text = self._text
        c = text[self._i]
        if c in "\"'":
            self._string()
        elif c == "[":
            self._array(path)
        elif c == "{":
            self._inline_table(path)
        else:
            while self._i < len(text) and text[self._i] not in ",]}#\n":
                self._i += 1

    def _array(self, path: FieldPath) -> None:
        self._expect("[")
        index = 0
        while True:
            self._skip_blank(newlines=True)
            if self._text[self._i] == "]":
                self._i += 1
                return
            element = (*path, index)
            self._record(element, self._line_at(self._i), explicit=False)
            self._value(element)
            index += 1
            self._skip_blank(newlines=True)
            if self._text[self._i] == ",":
                self._i += 1

    def _inline_table(self, path: FieldPath) -> None:
        self._expect("{")
        while True:
            self._skip_blank(newlines=True)
            if self._text[self._i] == "}":
                self._i += 1
                return
            line = self._line_at(self._i)
            key_path = (*path, *self._key())
            self._record(key_path, line, explicit=False)
            self._expect("=")
            self._skip_blank(newlines=False)
            self._value(key_path)
            self._skip_blank(newlines=True)
            if self._text[self._i] == ",":
                self._i += 1
