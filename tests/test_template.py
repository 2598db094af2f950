"""Placeholders in commands: syntax, rendering in two phases, and values that can never become shell syntax."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from remote.template import (
    RUNTIME_PLACEHOLDERS,
    TemplateError,
    UnknownPlaceholder,
    placeholders,
    render,
    render_argv,
)


def test_placeholders_in_order_of_first_appearance() -> None:
    text = "{python} gen.py --bw={beam_width} --bl={beam_length} --gpu={gpu} --again={beam_width} {dht.initial_peers}"
    assert placeholders(text) == ["python", "beam_width", "beam_length", "gpu", "dht.initial_peers"]


def test_doubled_braces_are_literal() -> None:
    assert placeholders("awk '{{print $1}}' {file}") == ["file"]
    assert render("awk '{{print $1}}' {file}", {"file": "x.log"}) == "awk '{print $1}' x.log"
    assert render("{{{a}}}", {"a": 1}) == "{1}"  # as str.format: literal brace, placeholder, literal brace


def test_names_allow_dashes_and_dotted_stage_values() -> None:
    assert placeholders("{my-var} {_x1} {stage-1.peer_id}") == ["my-var", "_x1", "stage-1.peer_id"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("echo {", "unbalanced '{' at column 6; write '{{' for a literal brace"),
        ("echo }", "unbalanced '}' at column 6; write '}}' for a literal brace"),
        ("a {b", "unbalanced '{' at column 3"),
        ("a { x } b", "'{ x }' at column 3 is not a placeholder"),
        ("{0}", "'{0}' at column 1 is not a placeholder"),
        ("x{}", "'{}' at column 2 is not a placeholder"),
        ("{a.}", "'{a.}' at column 1 is not a placeholder"),
        ("{.a}", "'{.a}' at column 1 is not a placeholder"),
        ("{a b}", "'{a b}' at column 1"),
        ("{a {b}", "unbalanced '{' at column 1"),
    ],
)
def test_bad_braces_name_the_column(text: str, message: str) -> None:
    with pytest.raises(TemplateError) as info:
        placeholders(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_render_substitutes_str_of_values() -> None:
    assert render("--bw={w} --lr={lr} --fp16={f}", {"w": 4, "lr": 0.5, "f": True}) == "--bw=4 --lr=0.5 --fp16=True"


def test_dotted_names_read_flat_or_nested_values() -> None:
    assert render("{dht.peers}", {"dht.peers": "/ip4/1"}) == "/ip4/1"
    assert render("{dht.peers}", {"dht": {"peers": "/ip4/2"}}) == "/ip4/2"


def test_unknown_placeholder_carries_its_name() -> None:
    with pytest.raises(UnknownPlaceholder) as info:
        render("--bw={bw}", {"beam_width": 1})
    assert info.value.name == "bw"
    assert isinstance(info.value, TemplateError)
    with pytest.raises(UnknownPlaceholder) as dotted:
        render("{dht.peers}", {"dht": {"other": 1}})
    assert dotted.value.name == "dht.peers"


def test_kept_names_stay_for_dispatch_time() -> None:
    text = "{python} run.py --bw={w} --gpu={gpu} --peers={dht.peers}"
    partial = render(text, {"w": 3}, keep=RUNTIME_PLACEHOLDERS | {"dht"}, final=False)
    assert partial == "{python} run.py --bw=3 --gpu={gpu} --peers={dht.peers}"
    final = render(partial, {"python": "python3", "gpu": 1, "dht.peers": "p"})
    assert final == "python3 run.py --bw=3 --gpu=1 --peers=p"


def test_non_final_render_keeps_literal_braces_escaped() -> None:
    partial = render("awk '{{print}}' {f} {gpu}", {"f": "a{b}"}, keep={"gpu"}, final=False)
    assert partial == "awk '{{print}}' a{{b}} {gpu}"
    assert render(partial, {"gpu": 0}) == "awk '{print}' a{b} 0"


def test_values_with_shell_syntax_stay_one_literal_argument() -> None:
    evil = "x'; rm -rf / #\" $(reboot) `id`\nnext line"
    argv = render_argv("{python} gen.py --label={label} --n={n}", {"python": "python3", "label": evil, "n": 2})
    assert argv == ["python3", "gen.py", f"--label={evil}", "--n=2"]


def test_commands_split_like_a_shell_before_rendering() -> None:
    argv = render_argv("""run --msg="hello {who}" '{{literal}}' plain""", {"who": "a b"})
    assert argv == ["run", "--msg=hello a b", "{literal}", "plain"]
    assert render_argv(["run", "--x={v}", "{v}"], {"v": "1 2"}) == ["run", "--x=1 2", "1 2"]


def test_an_empty_value_is_still_one_argument() -> None:
    assert render_argv("prog {v} end", {"v": ""}) == ["prog", "", "end"]


def test_an_unclosed_quote_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match=r"does not split into arguments.*expected balanced quotes"):
        render_argv("run 'oops {x}", {"x": 1})


@given(st.text())
def test_any_value_is_exactly_one_identical_argument(value: str) -> None:
    assert render_argv("prog --opt={v} {v} tail", {"v": value}) == ["prog", f"--opt={value}", value, "tail"]
    assert render_argv(["{v}"], {"v": value}) == [value]


names = st.sampled_from(["a", "b", "gpu", "dht.peers", "x-y"])
pieces = st.lists(st.one_of(names.map(lambda n: "{" + n + "}"), st.sampled_from(["{{", "}}", " ", "--f=", "z"])))


@given(pieces, st.dictionaries(names, st.text(), min_size=5, max_size=5), st.sets(names))
def test_two_phase_render_equals_one_render(parts: list[str], values: dict[str, str], later: set[str]) -> None:
    text = "".join(parts)
    first = {k: v for k, v in values.items() if k not in later}
    second = {k: v for k, v in values.items() if k in later}
    partial = render(text, first, keep=later, final=False)
    assert render(partial, second) == render(text, values)
