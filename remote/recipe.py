"""The recipe model: the typed shape of a campaign file, validated with pydantic.

A recipe is TOML (see README.md "Recipes"); `remote.recipe_loader.load_recipe` parses and validates it and turns every
mistake into one `RecipeError` line. These models only describe the shape and the per-field rules; cross-field rules
(unknown placeholders, unknown hosts, duplicate stage names) live in the loader, where the file and line are known.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

Scalar = str | int | float | bool
MetricType = Literal["float", "int", "str", "list"]
"""How a metric's captured text is typed; `list` is a list of numbers."""
"""A variable or grid value as TOML gives it."""

GridAxis = str | list[Scalar]
"""One grid axis: a range string ("1..48", "2..16:2", "0.5..2.0:0.5") or an explicit list of values."""

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"
"""Names of recipes, hosts, stages, variables and metrics: usable in placeholders, file names and SQL."""

HALT_PATTERN = re.compile(r"^(never|first-failure|(?P<n>[1-9][0-9]*)-failures?)$")


def _compiled(value: str) -> str:
    """A regex that compiles (huge repeats and deep nesting raise OverflowError/RecursionError, not re.error)."""
    try:
        re.compile(value)
    except (re.error, OverflowError, RecursionError) as exc:
        raise ValueError(f"the regex does not compile: {exc}") from None
    return value


def _duration(value: float | str) -> float | str:
    parse_duration(value)
    return value


Regex = Annotated[str, AfterValidator(_compiled)]
"""A Python regex, checked when the recipe loads."""

Duration = Annotated[float | str, AfterValidator(_duration)]
"""Seconds, or "90s" / "30m" / "2h" / "1d", checked when the recipe loads."""


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
    type: MetricType = "float"
    """How the captured text is typed; a value that does not convert is recorded as missing, never guessed.
    `list` is a list of numbers: a JSON array (PACE's `time_per_tokens`), or captured text such as
    `[0.1, 0.2]`; it is drawn by a line plot (one line per row) and written to results.csv as JSON."""
    last: bool = True
    """With several matches, keep the last one (true) or the first one (false). Ignored with `each`."""
    types: dict[str, MetricType] = Field(default_factory=dict)
    """Per named group, a type overriding `type` (Alpa's result line: `model_config = "str"`, `gpus = "int"`,
    the rest floats), so one regex can read a whole line of mixed fields."""
    missing: list[str] = Field(default_factory=list)
    """Captured texts that mean "no value" (Alpa prints `-1.000` and `-1.00` for a failed case): such a value is
    recorded as missing, never as a number, and its row gets `failed_case = true`."""
    each: bool = False
    """Every match is its own result row (Alpa's one result line per case, the Petals TSV's rows), instead of one
    value per task. The task's other values are repeated on each of its rows. A match starts a new row when one of
    its values is already in the current row, so put first a metric on the line that opens each case."""
    expr: str | None = None
    """A derived value instead of a captured one: arithmetic (+ - * / // % **, min, max, abs) over other metrics,
    grid and trial values, variables and captures written as `stage.key` (`throughput / swarm.servers`),
    computed when the task's values are final; per row for `each` values. A missing input gives a missing value."""

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None and re.compile(_compiled(v)).groups == 0:
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
    timeout: Duration | None = None
    """Per-attempt time limit: seconds, or "90s", "30m", "2h". The process group is killed when it expires."""
    done: Regex | None = None
    """Regex a successful task must print (ReDrafter: "^Tokens/second"); exit 0 without it is a failure."""
    progress: Regex | None = None
    """Regex with two groups (done, total) for per-task progress; default: tqdm-like "k/N"."""
    isolate_gpu: bool = True
    """Set CUDA_VISIBLE_DEVICES to the task's slot. Turn off for programs that pick the device themselves."""
    preflight: bool = True
    """Before the campaign starts, check on each host that the program and working directory exist. Turn off
    for a program an earlier stage creates."""
    executor: Literal["slots", "ray"] = "slots"
    """slots: benchfleet's own per-GPU queues. ray: each task becomes a Ray task needing `gpus_per_task` GPUs on the
    cluster of an earlier ray stage (Ray picks node and GPU; output streams back into the task's log)."""
    cluster: str | None = None
    """With executor = "ray": the ray stage whose cluster runs the tasks (default: the last one before this)."""
    gpus_per_task: float = Field(default=1.0, gt=0)
    """With executor = "ray": GPUs each task asks Ray for (fractions share a GPU)."""

    @field_validator("halt")
    @classmethod
    def _halt_form(cls, v: str) -> str:
        if not HALT_PATTERN.match(v):
            raise ValueError('expected "never", "first-failure" or "N-failures" (e.g. "3-failures")')
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
    timeout: Duration | None = None
    """Time limit, as for queue stages."""
    done: Regex | None = None
    """Regex the run must print to count as successful."""
    retries: Annotated[int, Field(ge=0, le=100)] = 0
    """Extra attempts when it fails."""
    preflight: bool = True
    """Check the program and working directory on each host before the campaign starts."""


class ReadySpec(_Strict):
    """When a service counts as ready: a log line, a listening TCP port, or a command that succeeds on its host."""

    log: Regex | None = None
    """Regex its output must match (Petals servers: "Started")."""
    port: int | str | None = None
    """TCP port that must be listening on the service's host (placeholders allowed: "{port}")."""
    command: str | list[str] | None = None
    """A command run on the service's host until it exits 0."""
    timeout: Duration = "300s"
    """How long to wait before the trial fails with what is missing."""


class ServiceStage(_Strict):
    """A long-running command on some hosts, ready by a rule, with values captured for later stages; torn down in
    reverse order when the trial ends (success, failure, Ctrl-C), and never left running after a crash + resume."""

    kind: Literal["service"]
    name: str | None = None
    """Stage name (default: its kind); captured values are `{NAME.KEY}` in later stages."""
    hosts: list[str] | None = None
    """Hosts to start it on, one instance each (default: the first host)."""
    command: str | list[str]
    """The program and arguments, split like a shell would but never run by one."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment for each instance."""
    workdir: str | None = None
    """Working directory (default: the host's)."""
    ready: ReadySpec | None = None
    """Readiness rule; without one the service is ready once it has started."""
    capture: dict[str, str] = Field(default_factory=dict)
    """Values pulled from its output (regex, one group) for later stages: capture = { initial_peers = '--initial_peers
    (\\S+)' } gives {NAME.initial_peers}. Taken from the first instance that prints them."""
    stop: str | list[str] | None = None
    """A command run on each host after the instance's process group is killed (e.g. "ray stop --force")."""
    preflight: bool = True
    """Check the program and working directory on each host before the campaign starts."""


class RayStage(_Strict):
    """A Ray cluster (Alpa seed): `ray start --head` on the head, workers joining it, ready when `ray status` shows
    every node and GPU; `ray stop` on teardown. Exposes {NAME.address}, {NAME.hosts}, {NAME.gpus_per_host},
    {NAME.gpus}."""

    kind: Literal["ray"]
    name: str | None = None
    """Stage name (default "ray")."""
    head: str | None = None
    """Head host (default: the first of `hosts`)."""
    hosts: list[str] | None = None
    """Hosts in the cluster, head included (default: every host)."""
    port: int = 6379
    """GCS port on the head."""
    ray: str = "ray"
    """The ray program (a path, or a name on PATH)."""
    gpus_per_host: int | None = None
    """GPUs each node declares to Ray (default: the host's GPU slots)."""
    cpus_per_host: int | None = None
    """CPUs each node declares (default: Ray's own count)."""
    timeout: Duration = "300s"
    """How long the cluster may take to show every node."""
    preflight: bool = True
    """Check that `ray` is on PATH on every host first."""


class SwarmStage(_Strict):
    """A hivemind swarm (Petals seed): `hivemind-dht` on a coordinator with an identity file (stable peer id), its
    --initial_peers address captured, servers started on other hosts with it, each ready by a log line. Exposes
    {NAME.initial_peers} and {NAME.servers}."""

    kind: Literal["swarm"]
    name: str | None = None
    """Stage name (default "swarm")."""
    coordinator: str | None = None
    """Host running the DHT (default: the first host)."""
    dht_port: int = 31337
    """TCP port of the DHT."""
    dht_command: str | list[str] = "hivemind-dht --host_maddrs /ip4/0.0.0.0/tcp/{dht_port} --identity_path {identity}"
    """How to start the DHT; {dht_port} and {identity} are filled in."""
    identity: str = "benchfleet-swarm-{dht_port}.id"
    """Identity file of the DHT peer on the coordinator (relative to its working directory): the peer id stays the
    same across restarts and runs."""
    servers: str | list[str] | None = None
    """Server command per host (or per slot with `per_slot`), with {NAME.initial_peers}; none: a DHT alone."""
    hosts: list[str] | None = None
    """Hosts running servers (default: every host but the coordinator; all hosts if there is only one)."""
    per_slot: bool = False
    """One server per GPU slot instead of one per host."""
    server_ready: Regex = "Started"
    """Regex a server prints when it serves (Petals: "Started")."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment for the DHT and the servers."""
    timeout: Duration = "300s"
    """How long the DHT and every server may take to be ready."""
    preflight: bool = True
    """Check the programs on the hosts first."""


class PipelineStage(_Strict):
    """Pipeline workers (DeServe seed): the model's layers split into contiguous slices over workers on GPU slots,
    ports assigned, each worker given the next one's URL (the last points back to the first), ready when their ports
    listen. Exposes {NAME.first_url}, {NAME.urls}, {NAME.workers}."""

    kind: Literal["pipeline"]
    name: str | None = None
    """Stage name (default "pipeline")."""
    hosts: list[str] | None = None
    """Hosts whose GPU slots run workers (default: every host)."""
    workers: int | None = None
    """Number of workers (default: one per slot)."""
    layers: int = Field(ge=1)
    """Transformer layers of the model (llama-3-70b: 80; llama-3-8b: 32)."""
    base_port: int = 8080
    """Port of the first worker on each host; the next ones count up."""
    command: str | list[str]
    """Worker command with {layer_begin}, {layer_end}, {port}, {url}, {next_url}, {rank}, {num_rounds}."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment for each worker."""
    workdir: str | None = None
    """Working directory (default: the host's)."""
    timeout: Duration = "600s"
    """How long the workers may take to listen."""
    preflight: bool = True
    """Check the worker program on the hosts first."""


class ShapeStage(_Strict):
    """tc network shaping (Petals seed) as a transaction: a revert armed on the host before applying, confirmed
    over a fresh command, reverted on every exit path; refused (never mislabelled) where the kernel lacks netem."""

    kind: Literal["shape"]
    name: str | None = None
    """Stage name (default "shape"); {NAME.label} describes what was applied."""
    hosts: list[str] | None = None
    """Hosts to shape (default: every host)."""
    interface: str
    """Network interface on those hosts (e.g. "eth0")."""
    delay: str | None = None
    """One-way delay ("10ms"); needs netem."""
    rate: str | None = None
    """Rate limit ("1gbit", "100mbit"); tbf when no delay is asked."""
    limit: int | str | None = None
    """Queue limit (packets for netem, bytes for tbf); delay, rate and limit may use trial placeholders ({rate})."""
    qdisc: Literal["auto", "netem", "tbf"] = "auto"
    """Which qdisc: auto picks netem for a delay, tbf for a rate alone."""
    revert_after: Duration = "6h"
    """Deadline of the armed revert: the host unshapes itself then if benchfleet never comes back."""
    allow_control_interface: bool = False
    """Allow shaping the interface the SSH control connection uses (the armed revert still protects the host)."""
    preflight: bool = True
    """Unused for shaping (tc is probed when the stage starts); kept for symmetry."""


class FetchStage(_Strict):
    """Copy files the previous stages wrote on the hosts into the run directory (fetched/<trial>/<host>/), and
    extract the metrics that name this stage from them."""

    kind: Literal["fetch"]
    name: str | None = None
    """Stage name (default "fetch"); metrics with stage = NAME and file = ... read the fetched copies."""
    hosts: list[str] | None = None
    """Hosts to fetch from (default: the first host)."""
    files: list[str] = Field(min_length=1)
    """Paths on the host (relative to its working directory; placeholders allowed)."""
    required: bool = True
    """A missing file fails the trial (otherwise it is noted and skipped)."""
    preflight: bool = True
    """Unused for fetching; kept for symmetry."""


StageSpec = Annotated[QueueStage | RunStage | ServiceStage | RayStage | SwarmStage | PipelineStage | ShapeStage
                      | FetchStage, Field(discriminator="kind")]


class Baseline(_Strict):
    """The expected value of one metric and how far it may move before the verdict calls it a regression."""

    value: float
    """The expected value (Alpa's gpt.perf_test_manual on AWS p3.16: mean_time = 2.454)."""
    tolerance: float = Field(default=0.05, ge=0)
    """Allowed relative change (0.10 = 10%) either way before the verdict says "regressed" or "improved"."""
    better: Literal["lower", "higher"] = "lower"
    """Which direction is an improvement: "lower" for times, "higher" for throughput and TFLOPs."""
    where: dict[str, Scalar] = Field(default_factory=dict)
    """Rows the expectation applies to, by column value (`{ suite = "gpt.perf_test_manual" }`); default: all."""


class ResultsSpec(_Strict):
    """The results table written to results.csv / results.json."""

    columns: list[str] = Field(default_factory=list)
    """Column names: grid axes, metrics, or the built-ins task, stage, host, gpu, state, rc, attempts, duration."""
    sort: list[str] = Field(default_factory=list)
    """Sort keys, numeric where the values are numbers; prefix "-" for descending."""
    format: dict[str, str] = Field(default_factory=dict)
    """printf-style formats per column in results.csv (ReDrafter's make_csv.awk prints "%f" for accepted tokens)."""
    baseline: dict[str, Baseline] = Field(default_factory=dict)
    """Expected values per metric (`mean_time = { value = 2.454, tolerance = 0.10, better = "lower" }`): each row
    they apply to gets a `verdict` column, "ok", "regressed by 12%", "improved by 12%", "failed" or "missing";
    with several metrics, each part names its metric."""


class PlotSpec(_Strict):
    """A plot drawn in the console and exported with the results."""

    kind: Literal["heatmap", "line", "bar"]
    title: str | None = None
    """Title shown above the plot (default: derived from the axes)."""
    x: str | None = None
    """Column on the x axis. Left out for a line of a list metric (`type = "list"`): each row is then a line
    over its items' positions (1, 2, ...), or over time with `step`."""
    y: str | None = None
    """Column on the y axis (heatmap: the second grid axis; line/bar: the value)."""
    value: str | None = None
    """Heatmap cell value column."""
    group: str | None = None
    """Column splitting line/bar series (one series per distinct value); for a list metric, the column naming
    each row's line (default: the trial, else the task label)."""
    step: Annotated[float, Field(gt=0)] | str | None = None
    """For a line of a list metric: the x distance between items, a number or a numeric column (PACE's
    sampling `interval`), so the line runs over 0, step, 2*step... instead of positions 1, 2, ..."""
    xlabel: str | None = None
    """Label of the x axis (default: the x column; for a list metric "item", or "item x STEP" with a step)."""


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
    matrix: dict[str, GridAxis] = Field(default_factory=dict)
    """Trial axes: the whole stage sequence runs once per combination (e.g. the Petals seed's network setups); their
    values are placeholders everywhere and columns in the results."""
    trial: list[dict[str, Scalar]] = Field(default_factory=list)
    """Explicit trials instead of (not with) a matrix: one table per trial, its keys placeholders (`name` names it)."""
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
