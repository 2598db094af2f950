"""Parameter grids: axes from ranges or lists, their cartesian product, and safe cost expressions.

A queue stage's tasks are the product of its grid axes, first axis outermost, so a recipe reproduces the loop
order of the shell scripts it replaces. Cost expressions order tasks for `longest-first` dispatch; they are parsed
with `ast` and evaluated by a small interpreter, never by `eval`.
"""

from __future__ import annotations

import ast
import itertools
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from decimal import Decimal

from remote.recipe import GridAxis, Scalar

MAX_AXIS_VALUES = 100_000
"""Most values one axis may have: a typo like "1..1000000000" is an error, not a frozen planner."""

MAX_GRID_TASKS = 100_000
"""Most tasks one grid may expand to."""

RANGE_EXAMPLE = 'a range like "1..48" or "2..16:2", or a list of values'

_NUMBER = r"[+-]?\d+(?:\.\d+)?"
_RANGE = re.compile(rf"^\s*(?P<start>{_NUMBER})\s*\.\.\s*(?P<end>{_NUMBER})\s*(?::\s*(?P<step>{_NUMBER})\s*)?$")


class GridError(ValueError):
    """A grid axis or cost expression the user wrote wrongly: `problem`, then what is `expected`."""

    def __init__(self, problem: str, expected: str, *, axis: str | None = None) -> None:
        self.problem = problem
        self.expected = expected
        self.axis = axis
        prefix = f"grid axis {axis!r}: " if axis is not None else ""
        super().__init__(f"{prefix}{problem}; expected {expected}")


def parse_axis(axis: GridAxis) -> list[Scalar]:
    """The values of one axis: an inclusive range string ("1..48", "2..16:2", "0.5..2.0:0.5") or a list."""
    if isinstance(axis, str):
        return _parse_range(axis)
    if isinstance(axis, list | tuple):
        return _check_list(axis)
    raise GridError(f"got {_describe(axis)}", RANGE_EXAMPLE)


def _parse_range(text: str) -> list[Scalar]:
    m = _RANGE.match(text)
    if m is None:
        raise GridError(f"{text!r} is not a range", RANGE_EXAMPLE)
    parts = [m["start"], m["end"], m["step"]]
    is_float = any(p is not None and "." in p for p in parts)
    # Decimal arithmetic keeps 0.1-steps exact (no 0.30000000000000004) and makes the end truly inclusive.
    start, end = Decimal(m["start"]), Decimal(m["end"])
    step = Decimal(m["step"]) if m["step"] is not None else Decimal(1)
    if step == 0:
        raise GridError(f"range {text!r} has a step of 0", "a non-zero step")
    if (end - start) * step < 0:
        direction = "down" if end < start else "up"
        sign = "-" if end < start else ""
        raise GridError(
            f"range {text!r} counts {direction} but its step is {_fmt(step)}",
            f'a step with that sign, e.g. "{m["start"]}..{m["end"]}:{sign}{_fmt(abs(step))}"',
        )
    count = int((end - start) / step) + 1
    if count > MAX_AXIS_VALUES:
        raise GridError(f"range {text!r} has {count} values", f"at most {MAX_AXIS_VALUES} values per axis")
    values = [start + i * step for i in range(count)]
    if is_float:
        return [float(v) for v in values]
    return [int(v) for v in values]


def _fmt(d: Decimal) -> str:
    return format(d.normalize(), "f") if d == d.to_integral_value() else str(d)


def _check_list(values: Sequence[object]) -> list[Scalar]:
    if not values:
        raise GridError("the list is empty", "at least one value")
    seen: dict[tuple[type, str], int] = {}
    out: list[Scalar] = []
    for i, v in enumerate(values):
        if not isinstance(v, str | int | float):
            raise GridError(f"value {i} is {_describe(v)}", "strings, numbers or booleans (no nested lists)")
        # 1 and 1.0 and true render differently in commands, so only same-type equal values are duplicates.
        key = (type(v), repr(v))
        if key in seen:
            raise GridError(f"value {v!r} appears twice (positions {seen[key]} and {i})", "distinct values")
        seen[key] = i
        out.append(v)
    return out


def _describe(v: object) -> str:
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list | tuple):
        return "a list"
    return repr(v)


def expand_grid(grid: Mapping[str, GridAxis]) -> list[dict[str, Scalar]]:
    """Every combination of the axes' values, first axis outermost; an empty grid is one task with no values."""
    names = list(grid)
    axes: list[list[Scalar]] = []
    total = 1
    for name in names:
        try:
            values = parse_axis(grid[name])
        except GridError as exc:
            raise GridError(exc.problem, exc.expected, axis=name) from None
        axes.append(values)
        total *= len(values)
        if total > MAX_GRID_TASKS:
            raise GridError(
                f"the grid has more than {MAX_GRID_TASKS} tasks", "fewer or shorter axes", axis=name
            )
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes)]


_FUNCTIONS: dict[str, Callable[..., float]] = {"min": min, "max": max, "abs": abs}
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a**b,
}
COST_EXPECTED = "numbers, grid axes, + - * / // % **, parentheses, min(), max() and abs()"


def compile_cost(expr: str, names: Collection[str]) -> Callable[[Mapping[str, Scalar]], float]:
    """A function of one task's grid values from an arithmetic expression like "beam_width * beam_length"."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        reason = exc.msg if isinstance(exc, SyntaxError) else type(exc).__name__
        raise GridError(f"the cost {expr!r} does not parse ({reason})", COST_EXPECTED) from None
    known = frozenset(names)
    try:
        _check_node(tree.body, expr.strip(), known)
    except RecursionError:
        raise GridError(f"the cost {expr!r} is nested too deeply", COST_EXPECTED) from None
    body = tree.body

    def cost(values: Mapping[str, Scalar]) -> float:
        try:
            result = _evaluate(body, values)
        except ZeroDivisionError:
            raise GridError(f"the cost {expr!r} divides by zero for {dict(values)}", "a non-zero divisor") from None
        except OverflowError:
            raise GridError(f"the cost {expr!r} overflows for {dict(values)}", "a smaller result") from None
        if math.isnan(result):
            raise GridError(f"the cost {expr!r} is not a number for {dict(values)}", "a comparable cost") from None
        return result

    return cost


def _check_node(node: ast.expr, source: str, names: frozenset[str]) -> None:
    """Reject every construct except plain arithmetic, naming the offending part of the expression."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise GridError(f"{_segment(source, node)!r} is not a number", COST_EXPECTED)
    elif isinstance(node, ast.Name):
        if node.id not in names:
            choices = ", ".join(sorted(names)) or "(this stage has no grid axes)"
            raise GridError(f"unknown name {node.id!r} in the cost", f"a grid axis, one of: {choices}")
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check_node(node.left, source, names)
        _check_node(node.right, source, names)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        _check_node(node.operand, source, names)
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
        and not any(isinstance(a, ast.Starred) for a in node.args)
    ):
        wanted = 1 if node.func.id == "abs" else 2
        if (node.func.id == "abs" and len(node.args) != 1) or len(node.args) < wanted:
            what = "exactly one argument" if node.func.id == "abs" else "at least two arguments"
            raise GridError(f"{_segment(source, node)!r} has the wrong number of arguments", what)
        for arg in node.args:
            _check_node(arg, source, names)
    else:
        raise GridError(f"{_segment(source, node)!r} is not allowed in a cost", COST_EXPECTED)


def _segment(source: str, node: ast.expr) -> str:
    return ast.get_source_segment(source, node) or type(node).__name__


def _evaluate(node: ast.expr, values: Mapping[str, Scalar]) -> float:
    """Interpret a checked expression in floats, so `**` cannot build giant integers."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.Name):
        value = values.get(node.id)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise GridError(
                f"grid axis {node.id!r} has the value {value!r}, which is not a number", "numeric axes in a cost"
            )
        return float(value)
    if isinstance(node, ast.BinOp):
        result = _BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
        if not isinstance(result, float):  # a negative base to a fractional power gives a complex number
            raise GridError(f"the cost part {ast.unparse(node)!r} is not a real number", "a real-valued cost")
        return result
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, values)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return float(_FUNCTIONS[node.func.id](*(_evaluate(a, values) for a in node.args)))
    raise AssertionError(f"unchecked cost node {ast.dump(node)}")  # _check_node admits nothing else

