"""Grid axes, their product in the order the seed scripts loop, and safe cost expressions."""

from __future__ import annotations

import itertools
import math
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from remote.grid import MAX_AXIS_VALUES, GridError, compile_cost, expand_grid, parse_axis
from remote.recipe import Scalar


@pytest.mark.parametrize(
    ("axis", "values"),
    [
        ("1..5", [1, 2, 3, 4, 5]),
        ("2..16:2", [2, 4, 6, 8, 10, 12, 14, 16]),
        ("2..15:4", [2, 6, 10, 14]),
        ("16..2:-2", [16, 14, 12, 10, 8, 6, 4, 2]),
        ("-2..2", [-2, -1, 0, 1, 2]),
        ("7..7", [7]),
        (" 1 .. 3 : 1 ", [1, 2, 3]),
        ("0.5..2.0:0.5", [0.5, 1.0, 1.5, 2.0]),
        ("0.1..0.5:0.1", [0.1, 0.2, 0.3, 0.4, 0.5]),
        ("1.0..0.0:-0.25", [1.0, 0.75, 0.5, 0.25, 0.0]),
        ("1..2:0.3", [1.0, 1.3, 1.6, 1.9]),
    ],
)
def test_ranges_are_inclusive_and_exact(axis: str, values: list[Scalar]) -> None:
    got = parse_axis(axis)
    assert got == values
    assert [type(v) for v in got] == [type(v) for v in values]  # "1..5" gives ints, "0.5..2.0:0.5" floats


def test_float_steps_do_not_accumulate_rounding_error() -> None:
    assert parse_axis("0.1..0.3:0.1")[2] == 0.3  # not 0.30000000000000004
    assert len(parse_axis("0..1:0.1")) == 11  # the end is reached despite binary floats


@pytest.mark.parametrize(
    ("axis", "problem", "expected"),
    [
        ("16..2", "counts down but its step is 1", '"16..2:-1"'),
        ("2..16:-2", "counts up but its step is -2", '"2..16:2"'),
        ("1..5:0", "step of 0", "a non-zero step"),
        ("llama", "'llama' is not a range", 'a range like "1..48" or "2..16:2", or a list of values'),
        ("1..", "is not a range", "a list of values"),
        ("1...3", "is not a range", "a list of values"),
        ("a..b", "is not a range", "a list of values"),
        ([], "the list is empty", "at least one value"),
        ([4, 8, 4], "value 4 appears twice (positions 0 and 2)", "distinct values"),
        (["x", "x"], "value 'x' appears twice", "distinct values"),
        ([1, [2]], "value 1 is a list", "no nested lists"),
        ([{"a": 1}], "value 0 is a table", "no nested lists"),
    ],
)
def test_bad_axes_say_what_is_wrong_and_expected(axis: object, problem: str, expected: str) -> None:
    with pytest.raises(GridError) as info:
        parse_axis(axis)  # type: ignore[arg-type]
    assert problem in info.value.problem
    assert expected in info.value.expected
    assert "; expected " in str(info.value)


def test_equal_values_of_different_types_are_distinct() -> None:
    # They render differently in a command ("1", "1.0", "True"), so they are different tasks.
    assert parse_axis([1, 1.0, True, "1"]) == [1, 1.0, True, "1"]


def test_huge_ranges_are_refused_before_being_built() -> None:
    with pytest.raises(GridError, match="values per axis"):
        parse_axis(f"1..{MAX_AXIS_VALUES * 1000}")


def test_redrafter_grid_loops_beam_length_outer_beam_width_inner() -> None:
    tasks = expand_grid({"beam_length": "2..16", "beam_width": "1..48"})
    assert len(tasks) == 15 * 48
    assert tasks[:3] == [
        {"beam_length": 2, "beam_width": 1},
        {"beam_length": 2, "beam_width": 2},
        {"beam_length": 2, "beam_width": 3},
    ]
    assert tasks[48] == {"beam_length": 3, "beam_width": 1}
    assert list(tasks[0]) == ["beam_length", "beam_width"]


def test_an_empty_grid_is_one_task() -> None:
    assert expand_grid({}) == [{}]


def test_expand_grid_names_the_bad_axis() -> None:
    with pytest.raises(GridError) as info:
        expand_grid({"beam_length": "2..16", "beam_width": "48..1"})
    assert info.value.axis == "beam_width"
    assert str(info.value).startswith("grid axis 'beam_width': range '48..1' counts down")


def test_a_grid_too_large_is_refused() -> None:
    with pytest.raises(GridError, match="more than"):
        expand_grid({"a": "1..1000", "b": "1..1000", "c": "1..10"})


axis_values = st.lists(st.integers(-50, 50), min_size=1, max_size=5, unique=True)


@given(st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), axis_values, max_size=4))
def test_expand_grid_is_the_lexicographic_product(grid: dict[str, list[int]]) -> None:
    tasks = expand_grid(dict(grid))  # type: ignore[arg-type]
    assert len(tasks) == math.prod(len(v) for v in grid.values())
    names = list(grid)
    positions = [tuple(grid[n].index(int(t[n])) for n in names) for t in tasks]
    assert positions == sorted(positions)  # first axis outermost, each axis in its written order
    assert len(set(positions)) == len(positions)
    assert all(list(t) == names for t in tasks)


@given(st.integers(-100, 100), st.integers(-100, 100), st.integers(1, 30))
def test_integer_ranges_match_python_range(start: int, end: int, size: int) -> None:
    step = size if end >= start else -size
    assert parse_axis(f"{start}..{end}:{step}") == list(range(start, end + (1 if step > 0 else -1), step))
    if end != start:
        with pytest.raises(GridError):
            parse_axis(f"{start}..{end}:{-step}")


@given(st.integers(-1000, 1000), st.integers(0, 1000), st.integers(1, 100), st.sampled_from([1, 2, 3]))
def test_float_ranges_hit_decimal_values_exactly(start: int, span: int, step: int, places: int) -> None:
    scale = Decimal(10) ** -places
    a, b, s = Decimal(start) * scale, Decimal(start + span) * scale, Decimal(step) * scale
    text = f"{a:.{places}f}..{b:.{places}f}:{s:.{places}f}"
    values = parse_axis(text)
    assert values == [float(a + i * s) for i in range(span // step + 1)]
    floats = [v for v in values if isinstance(v, float)]
    assert floats == values
    assert floats[-1] <= float(b)
    assert float(b) - floats[-1] < float(s)


def test_cost_is_arithmetic_over_grid_values() -> None:
    cost = compile_cost("beam_width * beam_length + max(1, beam_width) ** 2 - abs(-3) // 2 % 5", ["beam_width",
                                                                                                 "beam_length"])
    assert cost({"beam_width": 3, "beam_length": 4}) == 12 + 9 - 1
    assert compile_cost("-(a / 4)", ["a"])({"a": 2}) == -0.5
    assert compile_cost("min(a, 2, 3)", ["a"])({"a": 7}) == 2.0


@pytest.mark.parametrize(
    ("expr", "offending"),
    [
        ("__import__('os').system('true')", "__import__('os').system('true')"),
        ("open('/etc/passwd')", "open('/etc/passwd')"),
        ("a.real", "a.real"),
        ("a if a else 1", "a if a else 1"),
        ("a < 3", "a < 3"),
        ("a and 1", "a and 1"),
        ("[a][0]", "[a][0]"),
        ("(lambda: 1)()", "(lambda: 1)()"),
        ("'x' * a", "'x'"),
        ("True + a", "True"),
        ("1j * a", "1j"),
        ("min(*a)", "min(*a)"),
        ("max(a=1, b=2)", "max(a=1, b=2)"),
        ("~a", "~a"),
        ("a << 2", "a << 2"),
    ],
)
def test_cost_rejects_anything_but_arithmetic(expr: str, offending: str) -> None:
    with pytest.raises(GridError) as info:
        compile_cost(expr, ["a"])
    assert repr(offending) in str(info.value) or offending in str(info.value)
    assert "; expected " in str(info.value)


def test_cost_errors_name_the_problem() -> None:
    with pytest.raises(GridError, match=r"unknown name 'bw' in the cost; expected a grid axis, one of: a, b"):
        compile_cost("bw * 2", ["b", "a"])
    with pytest.raises(GridError, match="does not parse"):
        compile_cost("a *", ["a"])
    with pytest.raises(GridError, match="at least two arguments"):
        compile_cost("min(a)", ["a"])
    with pytest.raises(GridError, match="exactly one argument"):
        compile_cost("abs(a, a)", ["a"])


def test_cost_evaluation_errors_are_grid_errors() -> None:
    with pytest.raises(GridError, match="divides by zero"):
        compile_cost("1 / a", ["a"])({"a": 0})
    with pytest.raises(GridError, match="not a number"):
        compile_cost("a * 2", ["a"])({"a": "llama"})
    with pytest.raises(GridError, match="not a real number"):
        compile_cost("a ** 0.5", ["a"])({"a": -4})
    with pytest.raises(GridError, match="overflows"):
        compile_cost("10 ** a", ["a"])({"a": 10**6})  # floats: fails at once instead of building a huge integer


def test_cost_orders_tasks_longest_first() -> None:
    tasks = expand_grid({"w": "1..3", "l": [1, 10]})
    cost = compile_cost("w * l", ["w", "l"])
    ordered = sorted(tasks, key=cost, reverse=True)
    assert ordered[0] == {"w": 3, "l": 10}
    assert [cost(t) for t in ordered] == sorted((w * ln for w, ln in itertools.product([1, 2, 3], [1, 10])),
                                                reverse=True)
