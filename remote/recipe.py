"""The recipe model: the typed shape of a campaign file, validated with pydantic.

A recipe is TOML (see README.md "Recipes"); `remote.recipe_loader.load_recipe` parses and validates it and turns every
mistake into one `RecipeError` line. These models only describe the shape and the per-field rules; cross-field rules
(unknown placeholders, unknown hosts, duplicate stage names) live in the loader, where the file and line are known.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Scalar = str | int | float | bool
"""A variable or grid value as TOML gives it."""

GridAxis = str | list[Scalar]
"""One grid axis: a range string ("1..48", "2..16:2", "0.5..2.0:0.5") or an explicit list of values."""

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"
"""Names of recipes, hosts, stages, variables and metrics: usable in placeholders, file names and SQL."""

HALT_PATTERN = re.compile(r"^(never|first-failure|(?P<n>[1-9][0-9]*)-failures?)$")


class _Strict(BaseModel):
    """Every recipe table rejects unknown keys, so a typo is an error and never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class HostSpec(_Strict):
    """One machine: the local one (no `ssh`) or one reached by SSH."""

    ssh: str | None = None
    """An alias from ~/.ssh/config, or `user@host:port`. Absent: this machine, through the local transport."""
    ssh_config: str | None = None
    """An extra ssh_config file read before ~/.ssh/config (`benchfleet testbed up` writes one for its hosts)."""
    gpus: int | Literal["auto"] | list[int] = "auto"
    """GPU slots: a count (slots 0..N-1), an explicit list of GPU indices, or "auto" to ask nvidia-smi."""
    workdir: str | None = None
    """Working directory of the commands on this host; default: the recipe's folder (local) or the login home."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment for every process on this host (PATH additions, conda prefixes)."""

    @field_validator("gpus")
    @classmethod
    def _gpus_sane(cls, v: int | str | list[int]) -> int | str | list[int]:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError("expected a GPU count from 1 to 1024, or \"auto\"")
        if isinstance(v, list):
            if not v:
                raise ValueError("expected at least one GPU index")
            if len(set(v)) != len(v) or min(v) < 0:
                raise ValueError("expected distinct GPU indices >= 0")
        return v


class MetricSpec(_Strict):
    """How to pull one value (or several, with named groups) out of a task's output."""

    regex: str | None = None
    """A regex applied to each log line; one capture group gives this metric, named groups give one metric each."""
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    json_path: str | None = Field(default=None, alias="json")
    """(`json` in the recipe) A dotted key path read from JSON-object log lines (`metrics.total_tps`,
    `items.0.x`), or from `file`."""
    file: str | None = None
    """A result file the task writes (relative to its working directory; placeholders allowed), parsed as JSON
    when `json` is set, else scanned line by line with `regex`."""
    stage: str | None = None
    """Restrict the metric to one stage's tasks (default: every task)."""
    type: Literal["float", "int", "str"] = "float"
    """How the captured text is typed; a value that does not convert is recorded as missing, never guessed."""
    last: bool = True
    """With several matches, keep the last one (true) or the first one (false)."""

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                compiled = re.compile(v)
            except (re.error, OverflowError, RecursionError) as exc:  # huge repeats and deep nesting raise these
                raise ValueError(f"the regex does not compile: {exc}") from None
            if compiled.groups == 0:
                raise ValueError("the regex needs a capture group (or named groups) around the value")
        return v


class QueueStage(_Strict):
    """A grid of tasks spread over GPU slots, one FIFO queue per slot."""

    kind: Literal["queue"]
    name: str | None = None
    """Stage name (default: its kind); unique in the recipe; names the tasks and their logs."""
    hosts: list[str] | None = None
    """Hosts whose slots run this stage (default: every host)."""
    command: str | list[str]
    """The program and arguments. A string is split like a shell would (quotes respected) but never run by a
    shell: `{placeholders}` are filled inside each argument, so grid values can never inject shell syntax."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment for each task; values may use placeholders."""
    workdir: str | None = None
    """Working directory for the tasks (default: the host's)."""
    grid: dict[str, GridAxis] = Field(default_factory=dict)
    """Parameter axes; the tasks are their cartesian product, first axis outermost."""
    placement: Literal["free-slot", "md5", "round-robin"] = "free-slot"
    """free-slot: the next task goes to whichever slot frees first. md5: the ReDrafter run.bash rule (first 8 hex
    digits of md5 of `key` plus newline, modulo the slot count). round-robin: task i to slot i mod N."""
    key: str | None = None
    """Template hashed by md5 placement (default: the grid values joined by "-", in grid order)."""
    order: Literal["grid", "longest-first"] = "grid"
    """Dispatch order: grid order, or by decreasing `cost`."""
    cost: str | None = None
    """Arithmetic expression over grid values estimating a task's run time (for longest-first), e.g.
    "beam_width * beam_length"."""
    retries: Annotated[int, Field(ge=0, le=100)] = 0
    """Extra attempts for a failed task; it goes back to the end of the queue."""
    halt: str = "never"
    """never | first-failure | N-failures: stop dispatching new tasks after that many failed tasks."""
    timeout: float | str | None = None
    """Per-attempt time limit: seconds, or "90s", "30m", "2h". The process group is killed when it expires."""
    done: str | None = None
    """Regex a successful task must print (ReDrafter: "^Tokens/second"); exit 0 without it is a failure."""
    progress: str | None = None
    """Regex with two groups (done, total) for per-task progress; default: tqdm-like "k/N"."""
    isolate_gpu: bool = True
    """Set CUDA_VISIBLE_DEVICES to the task's slot. Turn off for programs that pick the device themselves."""
    preflight: bool = True
    """Before the campaign starts, check on each host that the program and working directory exist. Turn off
    for a program an earlier stage creates."""

    @field_validator("halt")
    @classmethod
    def _halt_form(cls, v: str) -> str:
        if not HALT_PATTERN.match(v):
            raise ValueError('expected "never", "first-failure" or "N-failures" (e.g. "3-failures")')
        return v

    @field_validator("done", "progress")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except (re.error, OverflowError, RecursionError) as exc:  # huge repeats and deep nesting raise these
                raise ValueError(f"the regex does not compile: {exc}") from None
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout_form(cls, v: float | str | None) -> float | str | None:
        if v is not None:
            parse_duration(v)
        return v


class RunStage(_Strict):
    """One command run once on each of some hosts (a setup step, a client, a suite on a cluster head)."""

    kind: Literal["run"]
    name: str | None = None
    """Stage name (default: its kind); unique in the recipe."""
    hosts: list[str] | None = None
    """Hosts to run on (default: the first host)."""
    command: str | list[str]
    """As for queue stages: split into arguments, never passed to a shell."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment for the process; values may use placeholders."""
    workdir: str | None = None
    """Working directory (default: the host's)."""
    timeout: float | str | None = None
    """Time limit, as for queue stages."""
    done: str | None = None
    """Regex the run must print to count as successful."""
    retries: Annotated[int, Field(ge=0, le=100)] = 0
    """Extra attempts when it fails."""
    preflight: bool = True
    """Check the program and working directory on each host before the campaign starts."""

    @field_validator("timeout")
    @classmethod
    def _timeout_form(cls, v: float | str | None) -> float | str | None:
        if v is not None:
            parse_duration(v)
        return v


StageSpec = Annotated[QueueStage | RunStage, Field(discriminator="kind")]


class ResultsSpec(_Strict):
    """The results table written to results.csv / results.json."""

    columns: list[str] = Field(default_factory=list)
    """Column names: grid axes, metrics, or the built-ins task, stage, host, gpu, state, rc, attempts, duration."""
    sort: list[str] = Field(default_factory=list)
    """Sort keys, numeric where the values are numbers; prefix "-" for descending."""
    format: dict[str, str] = Field(default_factory=dict)
    """printf-style formats per column in results.csv (ReDrafter's make_csv.awk prints "%f" for accepted tokens)."""


class PlotSpec(_Strict):
    """A plot drawn in the console and exported with the results."""

    kind: Literal["heatmap", "line", "bar"]
    title: str | None = None
    """Title shown above the plot (default: derived from the axes)."""
    x: str
    """Column on the x axis."""
    y: str | None = None
    """Column on the y axis (heatmap: the second grid axis; line/bar: the value)."""
    value: str | None = None
    """Heatmap cell value column."""
    group: str | None = None
    """Column splitting line/bar series (one series per distinct value)."""


class Recipe(_Strict):
    """A whole campaign."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    """Names the run directory (runs/<name>-<timestamp>)."""
    description: str = ""
    """One or two lines shown by `benchfleet check` and the console."""
    variables: dict[str, Scalar] = Field(default_factory=dict)
    """Values for `{name}` placeholders in commands, environments, keys and metric files."""
    hosts: dict[str, HostSpec] = Field(default_factory=dict)
    """The machines. None: this machine alone, as host "local"."""
    stage: list[StageSpec] = Field(min_length=1)
    """Stages, run in order."""
    metrics: dict[str, str | MetricSpec] = Field(default_factory=dict)
    """Values pulled from each task's output: a regex string, or a table (regex/json/file)."""
    results: ResultsSpec = Field(default_factory=ResultsSpec)
    """The results table."""
    plot: list[PlotSpec] = Field(default_factory=list)
    """Plots over the results."""
    secrets: list[str] = Field(default_factory=list)
    """Names of environment variables (tokens) passed from benchfleet's own environment to every task. Their values
    never enter the recipe, the journal, a log, or a command line: they travel in each task's 0600 env file."""


_DURATION = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>s|m|h|d)?\s*$")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: float | str) -> float:
    """Seconds from a number or "90s"/"30m"/"2h"/"1d"; raises ValueError with the expected form."""
    if isinstance(value, bool):
        raise ValueError('expected seconds or a duration like "90s", "30m", "2h"')
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError("expected a positive duration")
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise ValueError('expected seconds or a duration like "90s", "30m", "2h"')
    seconds = float(m["n"]) * _UNIT_SECONDS[m["unit"]]
    if seconds <= 0:
        raise ValueError("expected a positive duration")
    return seconds


def halt_threshold(halt: str) -> int | None:
    """Failures after which dispatch stops: None for "never", 1 for "first-failure", N for "N-failures"."""
    m = HALT_PATTERN.match(halt)
    if m is None or halt == "never":
        return None
    if halt == "first-failure":
        return 1
    return int(m["n"])
