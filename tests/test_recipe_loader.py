"""Loading recipes: a valid one gives the expected models, grids and metric names; every mistake is one line
naming the file, the line, the field and what to write instead."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from remote.recipe import HostSpec, MetricSpec, QueueStage, Recipe, RunStage
from remote.recipe_loader import LoadedRecipe, RecipeError, load_recipe, parse_recipe

QUICKSTART = r"""
name = "quickstart"
[variables]
batch_size = 8
[hosts.local]
gpus = 2
[[stage]]
kind = "queue"
name = "sweep"
placement = "md5"
key = "{beam_length}-{beam_width}"
grid = { beam_length = "2..5", beam_width = "1..4" }
command = "{python} gen.py --beam_width={beam_width} --beam_length={beam_length} --batch_size={batch_size} --use_gpu={gpu}"
done = "^Tokens/second"
retries = 1
halt = "3-failures"
timeout = "10m"
[metrics]
average_num_accepted_tokens = 'Average number of tokens per step:\s+([\d.]+)'
tokens_per_sec = '^Tokens/second\s+([\d.]+)'
[results]
columns = ["beam_width", "beam_length", "average_num_accepted_tokens", "tokens_per_sec"]
sort = ["beam_width", "beam_length"]
format = { average_num_accepted_tokens = "%f" }
[[plot]]
kind = "heatmap"
x = "beam_width"
y = "beam_length"
value = "tokens_per_sec"
"""  # noqa: E501

MARK = "# <-"


def toml_fields(model: type[BaseModel]) -> str:
    """A model's fields as the recipe spells them, in declaration order."""
    return ", ".join(info.alias or name for name, info in model.model_fields.items())


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error_of(tmp_path: Path, text: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    return info.value


def check_error(tmp_path: Path, text: str, field: str, *fragments: str) -> str:
    """Load a bad recipe; the line marked `# <-` (if any) must be the one reported, with the field and fragments."""
    body = textwrap.dedent(text).lstrip("\n")
    marked = [n for n, line in enumerate(body.splitlines(), 1) if line.rstrip().endswith(MARK)]
    path = tmp_path / "recipe.toml"
    error = error_of(tmp_path, text)
    message = str(error)
    assert "\n" not in message
    where = f"{path}:{marked[0]}" if marked else str(path)
    head = f"{where}: {field}: " if field else f"{where}: "
    assert message.startswith(head), message
    assert "; expected " in message or "; write " in message, message
    for fragment in fragments:
        assert fragment in message, message
    for leftover in ("Value error", "Input should", "pydantic", "Traceback", "[type="):
        assert leftover not in message, message
    assert error.line == (marked[0] if marked else None)
    assert error.field == field
    return message


# ---------------------------------------------------------------------------------------------------------------
# The valid recipe


def test_the_quickstart_recipe_loads(tmp_path: Path) -> None:
    path = write(tmp_path, QUICKSTART)
    loaded = load_recipe(path)
    assert isinstance(loaded, LoadedRecipe)
    assert loaded.path == path
    assert loaded.text == path.read_text()
    recipe = loaded.recipe
    assert recipe.name == "quickstart"
    assert recipe.variables == {"batch_size": 8}
    assert recipe.hosts["local"].gpus == 2
    stage = recipe.stage[0]
    assert isinstance(stage, QueueStage)
    assert (stage.placement, stage.retries, stage.halt, stage.timeout) == ("md5", 1, "3-failures", "10m")
    assert loaded.stage_names == ("sweep",)
    assert loaded.metric_names == ("average_num_accepted_tokens", "tokens_per_sec")
    grid = loaded.grids["sweep"]
    assert len(grid) == 16
    assert grid[:2] == [{"beam_length": 2, "beam_width": 1}, {"beam_length": 2, "beam_width": 2}]
    assert grid[-1] == {"beam_length": 5, "beam_width": 4}
    assert recipe.results.format == {"average_num_accepted_tokens": "%f"}
    assert recipe.plot[0].value == "tokens_per_sec"


def test_the_repository_quickstart_recipe_loads() -> None:
    loaded = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml")
    assert loaded.stage_names
    assert loaded.metric_names


def test_effective_names_run_stages_named_groups_and_captured_values(tmp_path: Path) -> None:
    loaded = load_recipe(write(tmp_path, r"""
        name = "two-stages"
        [[stage]]
        kind = "run"
        command = ["setup.sh", "--dir={recipe_dir}"]
        [[stage]]
        kind = "queue"
        command = "bench --seq={seq} --from={run.out} --run-dir={run_dir}"
        env = { TAG = "{seq}-{attempt}" }
        workdir = "{recipe_dir}/work"
        grid = { seq = [128, 256] }
        order = "longest-first"
        cost = "seq * 2"
        [metrics]
        timings = '(?P<prefill_ms>[\d.]+) ms / (?P<decode_ms>[\d.]+) ms'
        total = { json = "metrics.total", file = "out-{seq}.json", stage = "queue", type = "int" }
        [results]
        sort = ["-total", "seq"]
        """))
    assert loaded.stage_names == ("run", "queue")
    assert isinstance(loaded.recipe.stage[0], RunStage)
    assert loaded.grids == {"run": [{}], "queue": [{"seq": 128}, {"seq": 256}]}
    assert loaded.metric_names == ("prefill_ms", "decode_ms", "total")


def test_text_is_kept_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    raw = '\ufeffname = "crlf"\r\n[[stage]]\r\nkind = "run"\r\ncommand = "true"\r\n'
    path.write_bytes(raw.encode())
    loaded = load_recipe(path)
    assert loaded.text == raw
    assert loaded.recipe.name == "crlf"


def test_parse_recipe_names_the_given_path() -> None:
    with pytest.raises(RecipeError, match=r"^somewhere/r\.toml:1: name: "):
        parse_recipe('name = "a b"\n[[stage]]\nkind = "run"\ncommand = "x"\n', Path("somewhere/r.toml"))


# ---------------------------------------------------------------------------------------------------------------
# Files that cannot be read


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nope.toml")
    assert str(info.value) == (
        f"{tmp_path / 'nope.toml'}: cannot read the recipe: No such file or directory; expected a readable TOML file"
    )


def test_a_directory(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"cannot read the recipe: Is a directory; expected a readable TOML file"):
        load_recipe(tmp_path)


def test_a_path_through_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecipeError, match=r"cannot read the recipe: Not a directory; expected a readable TOML file"):
        load_recipe(tmp_path / "file" / "recipe.toml")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_file_without_permission(tmp_path: Path) -> None:
    path = write(tmp_path, QUICKSTART)
    path.chmod(0)
    with pytest.raises(RecipeError, match=r"cannot read the recipe: Permission denied; expected a readable TOML file"):
        load_recipe(path)


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_bytes(b'name = "ok"\ndescription = "caf\xe9"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == (
        f"{path}:2: cannot read the recipe: byte 0xe9 is not UTF-8 text; expected a readable TOML file (UTF-8)"
    )


# ---------------------------------------------------------------------------------------------------------------
# TOML syntax


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('name = "t"\n[[stage]  # <-\n', ["TOML syntax error at column 8", "expected ']]'"]),
        ('name = "t"\nkind = queue  # <-\n', ["TOML syntax error at column 8", "expected valid TOML"]),
        ('name = "t"\nname = "u"  # <-\n', ["a key is set twice", "expected each key once"]),
        ('[results]\n[results]  # <-\n', ["table [results] is declared twice", "[[name]] for repeated blocks"]),
        ('grid = { a = 1, a = 2 }  # <-\n', ["key 'a' appears twice in an inline table"]),
    ],
)
def test_toml_syntax_errors_use_tomllib_line(tmp_path: Path, text: str, fragments: list[str]) -> None:
    check_error(tmp_path, text, "", *fragments)


def test_toml_error_at_the_end_of_the_file(tmp_path: Path) -> None:
    message = check_error(tmp_path, 'name = "t"\ncolumns = [1,  # <-\n', "", "at the end of the file")
    assert "expected valid TOML" in message


# ---------------------------------------------------------------------------------------------------------------
# Shape errors from the models, in plain words

STAGE = """
name = "t"
[[stage]]
kind = "queue"
command = "run {a}"
grid = { a = "1..3" }
"""


@pytest.mark.parametrize(
    ("text", "field", "fragments"),
    [
        pytest.param(STAGE + 'placment = "md5"  # <-\n', "stage[0].placment",
                     ["unknown field 'placment' (did you mean 'placement'?)",
                      f"expected one of: {toml_fields(QueueStage)}"],
                     id="unknown-stage-field"),
        pytest.param('name = "t"\n[hostz.a]  # <-\n' + STAGE.replace('name = "t"', ""), "hostz",
                     ["unknown field 'hostz' (did you mean 'hosts'?)",
                      f"expected one of: {toml_fields(Recipe)}"],
                     id="unknown-top-level-table"),
        pytest.param(STAGE + '[metrics]\ntps = { reegex = "(x)" }  # <-\n', "metrics.tps.reegex",
                     ["did you mean 'regex'?", "expected one of: regex, json, file",
                      f"expected one of: {toml_fields(MetricSpec)}"],
                     id="unknown-metric-field-lists-toml-names"),
        pytest.param('name = "t"\n[hosts.a]\nssh = "a"\ngpu = 8  # <-\n' + STAGE.replace('name = "t"', ""),
                     "hosts.a.gpu", ["did you mean 'gpus'?", f"expected one of: {toml_fields(HostSpec)}"],
                     id="unknown-host-field"),
        pytest.param('name = "t"\n[[stage]]  # <-\nkind = "run"\n', "stage[0].command",
                     ["missing field 'command'", "expected a command string or a list of arguments"],
                     id="missing-field"),
        pytest.param('name = "t"\n[[plot]]\nkind = "line"\nx = "a"\n[[plot]]  # <-\nx = "b"\n', "plot[1].kind",
                     ["missing field 'kind'", 'expected "heatmap", "line" or "bar"'], id="missing-field-second-block"),
        pytest.param('name = "t"\ndescription = "no stages"\n', "stage",
                     ["missing field 'stage'", 'expected at least one [[stage]] block with kind = "queue" or "run"'],
                     id="missing-stages"),
        pytest.param('name = "t"\nstage = []  # <-\n', "stage", ["got []", "expected at least one [[stage]]"],
                     id="empty-stages"),
        pytest.param('name = "t"\n[[stage]]\nkind = "sweep"  # <-\ncommand = "x"\n', "stage[0].kind",
                     ["unknown stage kind 'sweep'", "expected one of: queue, run"], id="unknown-stage-kind"),
        pytest.param('name = "t"\n[[stage]]  # <-\ncommand = "x"\n', "stage[0].kind",
                     ["missing field 'kind'", "expected one of: queue, run"], id="missing-stage-kind"),
        pytest.param('name = "t"\n[[stage]]\nkind = "run"\ncommand = 5  # <-\n', "stage[0].command",
                     ["got 5", "expected a command string or a list of arguments"], id="wrong-type-union"),
        pytest.param('name = "t"\n[[stage]]\nkind = "run"\ncommand = [\n  "a",\n  3,  # <-\n]\n',
                     "stage[0].command[1]", ["got 3", "expected a string argument"], id="wrong-type-in-list"),
        pytest.param('name = "t"\nhosts = 5  # <-\n' + STAGE.replace('name = "t"', ""), "hosts",
                     ["got 5", "expected a table per host, e.g. [hosts.gpu-a]"], id="wrong-type-table"),
        pytest.param('name = "t"\n[variables]\nlayers = [1, 2]  # <-\n' + STAGE.replace('name = "t"', ""),
                     "variables.layers", ["got [1, 2]", "expected a string, number or boolean"],
                     id="wrong-type-variable"),
        pytest.param('name = "t"\n[hosts.gpu-a]\ngpus = "many"  # <-\n' + STAGE.replace('name = "t"', ""),
                     "hosts.gpu-a.gpus", ['got "many"', 'expected a GPU count (e.g. 8), "auto", or a list'],
                     id="wrong-type-gpus"),
        pytest.param(STAGE + "retries = true  # <-\n", "stage[0].retries",
                     ["got true", "expected an integer from 0 to 100"], id="bool-for-an-integer"),
        pytest.param(STAGE + "isolate_gpu = 1  # <-\n", "stage[0].isolate_gpu",
                     ["got 1", "expected true or false"], id="integer-for-a-bool"),
        pytest.param(STAGE + "retries = 101  # <-\n", "stage[0].retries",
                     ["got 101", "expected an integer from 0 to 100"], id="out-of-bounds"),
        pytest.param(STAGE + 'placement = "md4"  # <-\n', "stage[0].placement",
                     ['got "md4" (did you mean \'md5\'?)', "expected one of: free-slot, md5, round-robin"],
                     id="bad-literal"),
        pytest.param(STAGE + '[[plot]]\nkind = "pie"  # <-\nx = "a"\n', "plot[0].kind",
                     ['got "pie"', "expected one of: heatmap, line, bar"], id="bad-plot-kind"),
        pytest.param('name = "my recipe"  # <-\n' + STAGE.replace('name = "t"', ""), "name",
                     ['got "my recipe"', "expected letters, digits, '_' and '-'"], id="bad-recipe-name"),
        pytest.param(STAGE + 'halt = "sometimes"  # <-\n', "stage[0].halt",
                     ['got "sometimes"', 'expected "never", "first-failure" or "N-failures"'], id="bad-halt"),
        pytest.param(STAGE + 'timeout = "5 minutes"  # <-\n', "stage[0].timeout",
                     ['got "5 minutes"', 'expected seconds or a duration like "90s"'], id="bad-timeout"),
        pytest.param(STAGE + "timeout = -3  # <-\n", "stage[0].timeout",
                     ["got -3", "expected a positive duration"], id="negative-timeout"),
        pytest.param(STAGE + '[metrics.tps]\nregex = "Tokens/second"  # <-\n', "metrics.tps.regex",
                     ["the regex needs a capture group", r"expected a regex with a capture group"],
                     id="metric-regex-without-group"),
        pytest.param(STAGE + 'done = "(unclosed"  # <-\n', "stage[0].done",
                     ["the regex does not compile: missing )", "expected a regular expression"],
                     id="regex-does-not-compile"),
        pytest.param('name = "t"\n[hosts.a]\ngpus = 0  # <-\n' + STAGE.replace('name = "t"', ""), "hosts.a.gpus",
                     ["got 0", 'expected a GPU count from 1 to 1024, or "auto"'], id="gpus-out-of-range"),
        pytest.param('name = "t"\n[hosts.a]\ngpus = [0, 0]  # <-\n' + STAGE.replace('name = "t"', ""),
                     "hosts.a.gpus", ["expected distinct GPU indices >= 0"], id="gpus-repeated"),
        pytest.param('name = "t"\n[hosts.a]\ngpus = [0, "one"]  # <-\n' + STAGE.replace('name = "t"', ""),
                     "hosts.a.gpus[1]", ['got "one"', "expected a GPU index"], id="gpus-list-element"),
        pytest.param(STAGE.replace('grid = { a = "1..3" }', "grid = { a = 5 }  # <-"), "stage[0].grid.a",
                     ["got 5", 'expected a range like "1..48" or "2..16:2", or a list of values'],
                     id="grid-axis-wrong-type"),
        pytest.param(STAGE.replace('grid = { a = "1..3" }', "grid = { a = [[1], 2] }  # <-"), "stage[0].grid.a[0]",
                     ["got [1]", "expected a string, number or boolean"], id="grid-axis-nested-list"),
    ],
)
def test_model_errors(tmp_path: Path, text: str, field: str, fragments: list[str]) -> None:
    check_error(tmp_path, text, field, *fragments)


# ---------------------------------------------------------------------------------------------------------------
# Rules across fields

RUN = 'name = "t"\n[[stage]]\nkind = "run"\ncommand = "true"\n'


@pytest.mark.parametrize(
    ("text", "field", "fragments"),
    [
        pytest.param(RUN + '[[stage]]\nkind = "queue"\nname = "run"  # <-\ncommand = "x"\n', "stage[1].name",
                     ["duplicate stage name 'run' (stage[0] at line 2 has it too)", "expected a unique name"],
                     id="duplicate-stage-name"),
        pytest.param(RUN + '[[stage]]  # <-\nkind = "run"\ncommand = "x"\n', "stage[1]",
                     ["duplicate stage name 'run'", "set name ="], id="duplicate-effective-name"),
        pytest.param('name = "t"\n[hosts.gpu-a]\n[[stage]]\nkind = "run"\ncommand = "x"\nhosts = ["gpu-b"]  # <-\n',
                     "stage[0].hosts[0]", ["unknown host 'gpu-b' (did you mean 'gpu-a'?)", "expected one of: gpu-a"],
                     id="unknown-host"),
        pytest.param(RUN + 'hosts = ["gpu-a"]  # <-\n', "stage[0].hosts[0]",
                     ["unknown host 'gpu-a'", "expected one of: local (no [hosts] table"],
                     id="unknown-host-without-hosts-table"),
        pytest.param(RUN + "hosts = []  # <-\n", "stage[0].hosts", ["the list is empty", "expected host names"],
                     id="empty-hosts"),
        pytest.param(RUN + '[metrics]\ntps = { regex = "(x)", stage = "rnu" }  # <-\n', "metrics.tps.stage",
                     ["unknown stage 'rnu' (did you mean 'run'?)", "expected one of: run"], id="unknown-metric-stage"),
        pytest.param(STAGE.replace('"1..3" }', '"16..2" }  # <-'), "stage[0].grid.a",
                     ["range '16..2' counts down but its step is 1", 'e.g. "16..2:-1"'], id="grid-descending"),
        pytest.param(STAGE.replace('"1..3" }', '"2..16:0" }  # <-'), "stage[0].grid.a",
                     ["step of 0", "expected a non-zero step"], id="grid-zero-step"),
        pytest.param(STAGE.replace('"1..3" }', '"llama" }  # <-'), "stage[0].grid.a",
                     ["'llama' is not a range", 'expected a range like "1..48" or "2..16:2", or a list of values'],
                     id="grid-not-a-range"),
        pytest.param(STAGE.replace('"1..3" }', "[] }  # <-"), "stage[0].grid.a",
                     ["the list is empty", "expected at least one value"], id="grid-empty-list"),
        pytest.param(STAGE.replace('grid = { a = "1..3" }', '[stage.grid]\nb = "1..2"\na = [4, 8, 4]  # <-'),
                     "stage[0].grid.a", ["value 4 appears twice", "expected distinct values"], id="grid-duplicate"),
        pytest.param('name = "t"\n[variables]\na = 1\n' + STAGE.replace('name = "t"', "").replace(
                     '"1..3" }', '"1..3" }  # <-'), "stage[0].grid.a",
                     ["grid axis 'a' has the same name as a variable", "expected distinct names"],
                     id="grid-axis-is-a-variable"),
        pytest.param(STAGE.replace('grid = { a = "1..3" }', 'grid = { gpu = "0..1" }  # <-').replace("{a}", "{gpu}"),
                     "stage[0].grid.gpu", ["the name of a built-in placeholder", "expected another name"],
                     id="grid-axis-is-a-builtin"),
        pytest.param(STAGE + 'cost = "a * bw"  # <-\n', "stage[0].cost",
                     ["unknown name 'bw' in the cost", "expected a grid axis, one of: a"], id="cost-unknown-name"),
        pytest.param(STAGE + "cost = \"__import__('os').system('x')\"  # <-\n", "stage[0].cost",
                     ["is not allowed in a cost", "expected numbers, grid axes"], id="cost-not-arithmetic"),
        pytest.param(STAGE.replace('"1..3"', '"0..3"') + 'cost = "10 / a"  # <-\n', "stage[0].cost",
                     ["divides by zero for {'a': 0}", "expected a non-zero divisor"], id="cost-divides-by-zero"),
        pytest.param(STAGE.replace('"1..3"', '["x", "y"]') + 'cost = "a * 2"  # <-\n', "stage[0].cost",
                     ["which is not a number", "expected numeric axes"], id="cost-on-text-axis"),
        pytest.param(STAGE + 'order = "longest-first"  # <-\n', "stage[0].order",
                     ["needs a cost", 'expected cost = "<expression over grid axes>"'], id="longest-first-no-cost"),
        pytest.param(STAGE + 'key = "{a}"  # <-\n', "stage[0].key",
                     ['key is only used by placement = "md5"', 'expected placement = "md5", or no key'],
                     id="key-without-md5"),
        pytest.param(STAGE + 'placement = "md5"\nkey = "{a}-{gpu}"  # <-\n', "stage[0].key",
                     ["{gpu} is only known when a task is dispatched", "expected one of: a, recipe_dir"],
                     id="key-with-runtime-placeholder"),
        pytest.param(STAGE.replace('"run {a}"', '"run --bw={bw}"  # <-'), "stage[0].command",
                     ["unknown placeholder {bw}",
                      "expected one of: a, attempt, gpu, host, python, recipe_dir, run_dir, slot, task_id "
                      "(variables, grid axes, built-ins)"], id="unknown-placeholder-command"),
        pytest.param(STAGE.replace('"run {a}"', '["run", "--x={a}", "--y={b}"]  # <-'), "stage[0].command[2]",
                     ["unknown placeholder {b}"], id="unknown-placeholder-argument"),
        pytest.param(STAGE + 'env = { TAG = "{tga}" }  # <-\n', "stage[0].env.TAG",
                     ["unknown placeholder {tga}", "(variables, grid axes, built-ins)"], id="unknown-placeholder-env"),
        pytest.param(STAGE + 'workdir = "{recipedir}/x"  # <-\n', "stage[0].workdir",
                     ["unknown placeholder {recipedir} (did you mean {recipe_dir}?)"],
                     id="unknown-placeholder-workdir"),
        pytest.param(STAGE + '[metrics]\nt = { json = "t", file = "out-{b}.json" }  # <-\n', "metrics.t.file",
                     ["unknown placeholder {b}", "expected one of: a,"], id="unknown-placeholder-metric-file"),
        pytest.param(RUN + '[[stage]]\nkind = "queue"\ncommand = "x {a}"\ngrid = { a = [1] }\n'
                     '[metrics]\nt = { json = "t", file = "out-{a}.json" }  # <-\n', "metrics.t.file",
                     ["unknown placeholder {a}"], id="metric-file-axis-missing-from-a-stage"),
        pytest.param(STAGE.replace('"run {a}"', '"run {later.peers}"  # <-') + RUN.replace('name = "t"', "")
                     .replace('kind = "run"', 'kind = "run"\nname = "later"'), "stage[0].command",
                     ["{later.peers} names stage 'later', which does not run before this one",
                      "expected a value captured by an earlier stage"], id="captured-value-from-a-later-stage"),
        pytest.param(STAGE.replace('"run {a}"', '"run {a} { x }"  # <-'), "stage[0].command",
                     ["'{ x }' at column 9 is not a placeholder"], id="bad-braces"),
        pytest.param(STAGE.replace('"run {a}"', '"run {a} {"  # <-'), "stage[0].command",
                     ["unbalanced '{' at column 9; write '{{' for a literal brace"], id="unbalanced-brace"),
        pytest.param(STAGE.replace('"run {a}"', "\"run '{a}\"  # <-"), "stage[0].command",
                     ["does not split into arguments (No closing quotation)", "expected balanced quotes"],
                     id="unclosed-quote"),
        pytest.param(STAGE.replace('"run {a}"', '"   "  # <-'), "stage[0].command",
                     ["the command is empty", "expected a program and its arguments"], id="empty-command"),
        pytest.param(STAGE + '[results]\ncolumns = ["a", "tps"]  # <-\n', "results.columns[1]",
                     ["unknown column 'tps'", "expected a grid axis, a metric or a built-in: a, task, stage"],
                     id="unknown-column"),
        pytest.param(STAGE + '[results]\ncolumns = [\n  "a",\n  "a",  # <-\n]\n', "results.columns[1]",
                     ["column 'a' is listed twice", "expected each column once"], id="duplicate-column"),
        pytest.param(STAGE + '[results]\ncolumns = ["a", "rc"]\nsort = ["-rc", "-duration"]  # <-\n',
                     "results.sort[1]", ["unknown sort key '-duration'", "expected one of the columns", ": a, rc"],
                     id="sort-key-not-a-column"),
        pytest.param(STAGE + '[results]\nsort = ["-tokens"]  # <-\n', "results.sort[0]",
                     ["unknown sort key '-tokens'", "expected a known column"], id="sort-key-unknown"),
        pytest.param(STAGE + '[results]\ncolumns = ["a"]\nformat = { rc = "%d" }  # <-\n', "results.format.rc",
                     ["unknown column 'rc'", "expected one of the columns: a"], id="format-key-not-a-column"),
        pytest.param(STAGE + '[results.format]\na = "%f and %f"  # <-\n', "results.format.a",
                     ["is not a printf format for one value", 'expected e.g. "%f"'], id="bad-format"),
        pytest.param(STAGE + '[[plot]]\nkind = "heatmap"\nx = "a"\ny = "b"  # <-\nvalue = "a"\n', "plot[0].y",
                     ["unknown column 'b'", "expected a known column: a,"], id="plot-unknown-column"),
        pytest.param(STAGE + '[[plot]]  # <-\nkind = "heatmap"\nx = "a"\ny = "a"\n', "plot[0].value",
                     ["a heatmap plot needs x, y and value", 'expected value = "<column>"'],
                     id="heatmap-without-value"),
        pytest.param('name = "t"\n[variables]\n"batch size" = 8  # <-\n' + STAGE.replace('name = "t"', ""),
                     'variables."batch size"', ["cannot be a placeholder", "expected letters, digits"],
                     id="bad-variable-name"),
        pytest.param('name = "t"\n[variables]\ngpu = 1  # <-\n' + STAGE.replace('name = "t"', ""),
                     "variables.gpu", ["the name of a built-in placeholder"], id="variable-is-a-builtin"),
        pytest.param('name = "t"\n[hosts."gpu.a"]  # <-\n' + STAGE.replace('name = "t"', ""), 'hosts."gpu.a"',
                     ["the host name 'gpu.a' is not usable", "expected letters, digits"], id="bad-host-name"),
        pytest.param(RUN.replace('kind = "run"', 'kind = "run"\nname = "setup step"  # <-'), "stage[0].name",
                     ["the stage name 'setup step' is not usable"], id="bad-stage-name"),
        pytest.param(STAGE + "[metrics]\n\"tokens/s\" = '([\\d.]+)'  # <-\n", 'metrics."tokens/s"',
                     ["the metric name 'tokens/s' is not usable"], id="bad-metric-name"),
        pytest.param(STAGE + "[metrics]\ntps = 'Tokens/second'  # <-\n", "metrics.tps",
                     ["the regex needs a capture group", "expected a regex with a capture group"],
                     id="string-metric-without-group"),
        pytest.param(STAGE + "[metrics]\ntps = 'a{4294967296}(x)'  # <-\n", "metrics.tps",
                     ["the regex does not compile"], id="string-metric-does-not-compile"),
        pytest.param(STAGE + "[metrics]\nx = '(?P<tps>\\d+)'\ntps = '(\\d+)'  # <-\n", "metrics.tps",
                     ["metric 'tps' is produced twice (by metrics.x too)", "expected distinct names"],
                     id="metric-produced-twice"),
        pytest.param(STAGE + "[metrics]\na = '(\\d+)'  # <-\n", "metrics.a",
                     ["metric 'a' has the name of a grid axis"], id="metric-named-like-an-axis"),
        pytest.param(STAGE + '[metrics]\nx = { file = "x.json" }  # <-\n', "metrics.x",
                     ["neither regex nor json"], id="metric-without-regex-or-json"),
        pytest.param(STAGE + '[metrics]\nx = { regex = "(x)", json = "x" }  # <-\n', "metrics.x",
                     ["both regex and json", "expected only one of them"], id="metric-with-both"),
        pytest.param(STAGE + "progress = '(\\d+)'  # <-\n", "stage[0].progress",
                     ["needs two groups", "expected a regular expression with two groups"], id="progress-one-group"),
    ],
)
def test_cross_field_errors(tmp_path: Path, text: str, field: str, fragments: list[str]) -> None:
    check_error(tmp_path, text, field, *fragments)


def test_earlier_stage_values_and_builtins_are_known(tmp_path: Path) -> None:
    loaded = load_recipe(write(tmp_path, """
        name = "t"
        [variables]
        model = "llama"
        [[stage]]
        kind = "run"
        name = "dht"
        command = "start-dht --dir={recipe_dir}"
        [[stage]]
        kind = "queue"
        command = "{python} serve.py --peers={dht.initial_peers} --model={model} --gpu={gpu} --host={host} {{x}}"
        env = { RUN = "{run_dir}/{task_id}-{attempt}-{slot}" }
        grid = { n = "1..2" }
        """))
    assert loaded.stage_names == ("dht", "queue")


# ---------------------------------------------------------------------------------------------------------------
# Several errors, and lines in awkward layouts


def test_several_errors_report_the_first_by_line_and_count_the_rest(tmp_path: Path) -> None:
    message = check_error(tmp_path, """
        name = "t"
        [[stage]]
        kind = "queue"
        command = "x {a}"
        halt = "often"  # <-
        grid = { a = "1..3" }
        timeout = "soon"
        retries = -1
        """, "stage[0].halt", 'got "often"')
    assert message.endswith(" (and 2 more)")
    error = error_of(tmp_path, """
        name = "t"
        [[stage]]
        kind = "queue"
        command = "x {a}"
        halt = "often"
        grid = { a = "1..3" }
        timeout = "soon"
        """)
    assert [p.field for p in error.problems] == ["stage[0].halt", "stage[0].timeout"]
    assert [p.line for p in error.problems] == [5, 7]


def test_lines_survive_multiline_strings_and_arrays(tmp_path: Path) -> None:
    check_error(tmp_path, '''
        name = "t"
        description = """
        [[stage]]
        kind = "fake"
        [hosts.x]
        """
        [[stage]]
        kind = "run"
        command = [
          "a",
          "[b]",
        ]
        env = { A = "{", B = "x" }  # <-
        ''', "stage[0].env.A", "unbalanced '{' at column 1")


def test_lines_of_the_nth_stage_block_and_its_subtables(tmp_path: Path) -> None:
    check_error(tmp_path, """
        name = "t"
        [[stage]]
        kind = "run"
        name = "setup"
        command = "true"

        [[stage]]
        kind = "queue"
        command = "x {a} {b}"
        [stage.grid]
        a = "1..3"
        b = "9..1"  # <-
        [metrics]
        """, "stage[1].grid.b", "counts down")


def test_lines_of_quoted_and_dotted_keys(tmp_path: Path) -> None:
    check_error(tmp_path, """
        name = "t"
        [hosts."gpu-a"]
        ssh = "gpu-a"
        [hosts.'gpu-b']
        ssh = "gpu-b"
        gpus = "lots"  # <-
        [[stage]]
        kind = "run"
        command = "true"
        """, "hosts.gpu-b.gpus", 'got "lots"')
    check_error(tmp_path, """
        name = "t"
        hosts.a.ssh = "a"
        hosts.b.gpus = 0  # <-
        [[stage]]
        kind = "run"
        command = "true"
        """, "hosts.b.gpus", "got 0")


def test_lines_inside_an_array_of_inline_tables(tmp_path: Path) -> None:
    check_error(tmp_path, """
        name = "t"
        stage = [
          { kind = "run", command = "true" },
          { kind = "run", name = "b", command = "true" },
          { kind = "run", name = "c", command = "x", halt = 1 },  # <-
        ]
        """, "stage[2].halt", "unknown field 'halt'")


def test_missing_field_points_at_its_table_header(tmp_path: Path) -> None:
    check_error(tmp_path, """
        name = "t"
        [[stage]]
        kind = "run"
        command = "true"
        [results]
        columns = ["task", "rc"]
        [[plot]]
        kind = "bar"
        x = "task"
        y = "rc"
        [[plot]]  # <-
        kind = "bar"
        y = "rc"
        """, "plot[1].x", "missing field 'x'")


fillers = st.lists(st.sampled_from(["", "# [[stage]] in a comment", "  # indented comment"]), max_size=3)


@given(
    st.booleans(), st.lists(fillers, min_size=1, max_size=3), st.sampled_from(["inline", "subtable", "dotted"]),
    fillers,
)
def test_the_axis_line_is_found_whatever_the_layout(
    with_description: bool, before: list[list[str]], layout: str, between: list[str]
) -> None:
    lines = ['name = "t"']
    if with_description:
        lines += ['description = """', "[[stage]]", "[stage.grid]", 'b = "9..1"', '"""']
    for i, filler in enumerate(before[:-1]):
        lines += [*filler, "[[stage]]", 'kind = "run"', f'name = "s{i}"', 'command = ["x", "[y]",', '  "z"]']
    lines += before[-1] + ["[[stage]]", 'kind = "queue"', 'command = "x {a} {b}"'] + between
    if layout == "inline":
        lines += ['grid = { a = [1, 2], b = "9..1" }']
    elif layout == "subtable":
        lines += ["[stage.grid]", 'a = "1..2"', *between, 'b = "9..1"']
    else:
        lines += ['grid.a = "1..2"', *between, 'grid.b = "9..1"']
    expected_line = len(lines)
    lines += [*between, "[results]", 'columns = ["a"]']
    index = len(before) - 1
    with pytest.raises(RecipeError) as info:
        parse_recipe("\n".join(lines) + "\n", Path("r.toml"))
    assert str(info.value).startswith(f"r.toml:{expected_line}: stage[{index}].grid.b: range '9..1' counts down")
