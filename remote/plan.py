"""The planner: a loaded recipe plus the hosts' GPU slots become trials of stages of concrete tasks.

Everything that does not depend on where a task runs is rendered here (variables, trial and grid values,
`{recipe_dir}`); `{gpu}`, `{host}`, the other runtime placeholders and values captured by services stay in the
templates until dispatch. That split is what makes task ids stable: an id hashes the stage, the rendered argv and
environment templates, the working directory and the values (trial values included), so `--resume` recognises a
finished cell even after the grid is reordered or extended, and the same client run under two network setups is two
tasks.

Service-like stages (service, ray, swarm, pipeline) become tasks too, each carrying a `ServiceRole`: how it counts as
ready, what it captures, how it is stopped. The engine launches and watches them like any task, but keeps them
running until the trial ends.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from remote.grid import compile_cost
from remote.placement import assign
from remote.recipe import (
    FetchStage,
    HostSpec,
    PipelineStage,
    QueueStage,
    RayStage,
    RunStage,
    Scalar,
    ServiceStage,
    ShapeStage,
    StageSpec,
    SwarmStage,
    parse_duration,
)
from remote.recipe_loader import LoadedRecipe, stage_name, trial_name
from remote.slots import Slot
from remote.template import RUNTIME_PLACEHOLDERS, render, render_argv

LOCAL_HOST = "local"
"""Name of the implicit host when a recipe declares none."""


@dataclass(frozen=True)
class ServiceRole:
    """What makes a task a service: readiness, captures, teardown. Groups start in order (ray: head, then workers)."""

    group: int = 0
    ready_log: str | None = None
    ready_port: str | None = None
    ready_command: tuple[str, ...] | None = None
    ready_timeout: float = 300.0
    capture: Mapping[str, str] = field(default_factory=dict)
    """Capture name (without the stage prefix) -> regex with one group."""
    stop: tuple[str, ...] | None = None
    """Run on the host after the process group is killed (ray stop --force)."""
    info: Mapping[str, object] = field(default_factory=dict)
    """What the planner decided for this instance (a pipeline worker's url, slice and port)."""
    isolate_gpu: bool = False
    """Set CUDA_VISIBLE_DEVICES to the instance's slot (pipeline workers, per-slot swarm servers), as queue tasks."""


@dataclass(frozen=True)
class TaskPlan:
    """One unit of work: a grid cell of a queue stage, one host's command of a run stage, or a service instance."""

    id: str
    stage: str
    index: int
    """Position in grid order (results keep it as a tiebreak); dispatch order is the order of StagePlan.tasks."""
    label: str
    log_name: str
    values: Mapping[str, Scalar]
    argv: tuple[str, ...]
    """Rendered except for runtime placeholders ({gpu}, {host}, ...) and captures, which are filled at dispatch."""
    env: Mapping[str, str]
    workdir: str | None
    cost: float
    pinned_slot: str | None
    """Slot key the task must run on (md5 and round-robin placement, run stages, services); None: any free slot."""
    service: ServiceRole | None = None


@dataclass(frozen=True)
class StagePlan:
    """A stage of one trial with its slots and tasks."""

    name: str
    kind: str
    spec: StageSpec
    slots: tuple[Slot, ...]
    tasks: tuple[TaskPlan, ...]
    trial: str = ""
    trial_values: Mapping[str, Scalar] = field(default_factory=dict)
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What a run will do."""

    loaded: LoadedRecipe
    hosts: Mapping[str, HostSpec]
    slots: tuple[Slot, ...]
    stages: tuple[StagePlan, ...]
    """Every trial's stages, trial after trial."""

    @property
    def recipe_dir(self) -> Path:
        return Path(self.loaded.path).resolve().parent

    def all_tasks(self) -> list[TaskPlan]:
        return [t for s in self.stages for t in s.tasks]

    def trials(self) -> list[tuple[str, list[StagePlan]]]:
        """Stages grouped by trial, in order."""
        out: list[tuple[str, list[StagePlan]]] = []
        for stage in self.stages:
            if not out or out[-1][0] != stage.trial:
                out.append((stage.trial, []))
            out[-1][1].append(stage)
        return out


def effective_hosts(loaded: LoadedRecipe) -> dict[str, HostSpec]:
    """The recipe's hosts, or this machine alone: with nvidia-smi its GPUs, without it one CPU slot."""
    if loaded.recipe.hosts:
        return dict(loaded.recipe.hosts)
    gpus: int | str = "auto" if shutil.which("nvidia-smi") else 1
    return {LOCAL_HOST: HostSpec.model_validate({"gpus": gpus})}


def ray_cluster_of(spec: QueueStage, earlier: Sequence[StageSpec], names: Sequence[str]) -> tuple[str, RayStage]:
    """The ray stage a queue stage with executor = "ray" submits to (named, or the last one before it)."""
    for name, stage in reversed(list(zip(names, earlier, strict=True))):
        if isinstance(stage, RayStage) and (spec.cluster is None or spec.cluster == name):
            return name, stage
    raise ValueError("no ray stage before this one")  # the loader refuses such recipes


def ray_slots(spec: QueueStage, earlier: Sequence[StageSpec], names: Sequence[str], hosts: Sequence[str],
              slots_by_host: Mapping[str, Sequence[Slot]]) -> tuple[Slot, ...]:
    """Dispatch slots for Ray-executed tasks: as many as the cluster's GPUs hold tasks at once, all driven from the
    head (the GPU index is only a counter: Ray picks the real node and GPU)."""
    _, ray = ray_cluster_of(spec, earlier, names)
    members = ray.hosts or list(hosts)
    head = ray.head or members[0]
    gpus = sum(ray.gpus_per_host if ray.gpus_per_host is not None else len(slots_by_host.get(h, ()))
               for h in members)
    count = max(1, int(gpus // spec.gpus_per_task))
    return tuple(Slot(host=head, gpu=i, name="ray") for i in range(count))


def default_hosts(spec: StageSpec, hosts: Sequence[str]) -> list[str]:
    """A stage's hosts when it names none: every host for queue/ray/pipeline/shape, the first one otherwise."""
    if spec.hosts:
        return list(spec.hosts)
    if isinstance(spec, QueueStage | RayStage | PipelineStage | ShapeStage):
        return list(hosts)
    if isinstance(spec, SwarmStage):
        coordinator = spec.coordinator or hosts[0]
        others = [h for h in hosts if h != coordinator]
        return others or [coordinator]
    return [hosts[0]]


def build_plan(loaded: LoadedRecipe, slots_by_host: Mapping[str, Sequence[Slot]],
               addresses: Mapping[str, str] | None = None) -> Plan:
    """Expand every trial's stages into tasks and place them on the slots.

    `addresses` are how hosts reach each other (pipeline URLs); default: 127.0.0.1 for every host.
    """
    hosts = effective_hosts(loaded)
    recipe = loaded.recipe
    all_slots = tuple(s for h in hosts for s in slots_by_host.get(h, ()))
    names = [stage_name(s) for s in recipe.stage]
    stages: list[StagePlan] = []
    for trial_values in loaded.trials:
        trial = trial_name(trial_values)
        base: dict[str, object] = {**recipe.variables, **trial_values,
                                   "recipe_dir": str(Path(loaded.path).resolve().parent)}
        for position, spec in enumerate(recipe.stage):
            name = names[position]
            # Dotted placeholders name values captured by earlier stages (and, for clusters, by their own first
            # instances); they are filled at dispatch too.
            keep = set(RUNTIME_PLACEHOLDERS) | set(names[: position + 1])
            stage_hosts = default_hosts(spec, list(hosts))
            slots = tuple(s for h in stage_hosts for s in slots_by_host.get(h, ()))
            if isinstance(spec, QueueStage) and spec.executor == "ray":
                slots = ray_slots(spec, recipe.stage[:position], names[:position], list(hosts), slots_by_host)
                stage_hosts = [slots[0].host]
            ctx = _Ctx(name=name, base=base, keep=keep, trial_values=trial_values, slots_by_host=slots_by_host,
                       addresses=addresses or {})
            tasks = _tasks_for(spec, ctx, stage_hosts, loaded.grids.get(name, [{}]), slots)
            stages.append(StagePlan(name=name, kind=spec.kind, spec=spec, slots=slots, tasks=tuple(tasks),
                                    trial=trial, trial_values=dict(trial_values), hosts=tuple(stage_hosts)))
    return Plan(loaded=loaded, hosts=hosts, slots=all_slots, stages=tuple(stages))


@dataclass(frozen=True)
class _Ctx:
    name: str
    base: Mapping[str, object]
    keep: set[str]
    trial_values: Mapping[str, Scalar]
    slots_by_host: Mapping[str, Sequence[Slot]]
    addresses: Mapping[str, str]

    def first_slot(self, host: str) -> Slot:
        slots = self.slots_by_host.get(host, ())
        return slots[0] if slots else Slot(host=host, gpu=0)


def _tasks_for(spec: StageSpec, ctx: _Ctx, stage_hosts: Sequence[str], grid: Sequence[Mapping[str, Scalar]],
               slots: Sequence[Slot]) -> list[TaskPlan]:
    if isinstance(spec, QueueStage):
        return _queue_tasks(spec, ctx, grid, slots)
    if isinstance(spec, RunStage):
        return [_one(ctx, i, host, spec.command, spec.env, spec.workdir) for i, host in enumerate(stage_hosts)]
    if isinstance(spec, ServiceStage):
        role = _service_role(spec)
        return [_one(ctx, i, host, spec.command, spec.env, spec.workdir, role=role)
                for i, host in enumerate(stage_hosts)]
    if isinstance(spec, RayStage):
        return _ray_tasks(spec, ctx, stage_hosts)
    if isinstance(spec, SwarmStage):
        return _swarm_tasks(spec, ctx, stage_hosts)
    if isinstance(spec, PipelineStage):
        return _pipeline_tasks(spec, ctx, slots)
    if isinstance(spec, FetchStage):
        # Not launched: one row per host carries the metrics of the files fetched from it.
        return [_task(ctx, i, {}, (), {}, None, 1.0, ctx.first_slot(h).key, host=h) for i, h in enumerate(stage_hosts)]
    return []  # shape: applied by the engine, nothing to launch


def _queue_tasks(spec: QueueStage, ctx: _Ctx, grid: Sequence[Mapping[str, Scalar]],
                 slots: Sequence[Slot]) -> list[TaskPlan]:
    cost_of = compile_cost(spec.cost, list(spec.grid)) if spec.cost else None
    tasks: list[TaskPlan] = []
    for index, values in enumerate(grid):
        scope = {**ctx.base, **values}
        argv = tuple(render_argv(spec.command, scope, keep=ctx.keep, final=False))
        env = {k: render(v, scope, keep=ctx.keep, final=False) for k, v in spec.env.items()}
        workdir = render(spec.workdir, scope, keep=ctx.keep, final=False) if spec.workdir else None
        cost = float(cost_of(values)) if cost_of else 1.0
        tasks.append(_task(ctx, index, values, argv, env, workdir, cost, None))
    if spec.order == "longest-first":
        tasks.sort(key=lambda t: -t.cost)  # stable: equal costs keep grid order
    if slots:
        keys = [render(spec.key, {**ctx.base, **t.values}) if spec.key
                else "-".join(str(t.values[a]) for a in spec.grid) for t in tasks]
        pins = assign(spec.placement, keys, len(slots))
        tasks = [replace(t, pinned_slot=slots[p].key if p is not None else None)
                 for t, p in zip(tasks, pins, strict=True)]
    return tasks


def _one(ctx: _Ctx, index: int, host: str, command: str | list[str], env: Mapping[str, str], workdir: str | None,
         *, role: ServiceRole | None = None, extra: Mapping[str, object] | None = None,
         slot: Slot | None = None) -> TaskPlan:
    """One command on one host (run stages and service instances)."""
    scope = {**ctx.base, **(extra or {})}
    argv = tuple(render_argv(command, scope, keep=ctx.keep, final=False))
    rendered_env = {k: render(v, scope, keep=ctx.keep, final=False) for k, v in env.items()}
    rendered_workdir = render(workdir, scope, keep=ctx.keep, final=False) if workdir else None
    pin = (slot or ctx.first_slot(host)).key
    label_host = host if slot is None else slot.key
    return _task(ctx, index, {}, argv, rendered_env, rendered_workdir, 1.0, pin, host=label_host, role=role)


def _service_role(spec: ServiceStage, group: int = 0) -> ServiceRole:
    ready = spec.ready
    command = None
    if ready is not None and ready.command is not None:
        command = tuple(shlex.split(ready.command) if isinstance(ready.command, str) else ready.command)
    stop = None
    if spec.stop is not None:
        stop = tuple(shlex.split(spec.stop) if isinstance(spec.stop, str) else spec.stop)
    return ServiceRole(
        group=group,
        ready_log=ready.log if ready else None,
        ready_port=str(ready.port) if ready and ready.port is not None else None,
        ready_command=command,
        ready_timeout=parse_duration(ready.timeout) if ready else 300.0,
        capture=dict(spec.capture),
        stop=stop,
    )


RAY_ADDRESS = r"--address='([^']+)'"
"""`ray start --head` prints its join hint as `ray start --address='10.0.0.5:6379'`."""


def _ray_tasks(spec: RayStage, ctx: _Ctx, stage_hosts: Sequence[str]) -> list[TaskPlan]:
    head = spec.head or stage_hosts[0]
    timeout = parse_duration(spec.timeout)
    stop = (spec.ray, "stop", "--force")

    def resources(host: str) -> list[str]:
        gpus = spec.gpus_per_host if spec.gpus_per_host is not None else len(ctx.slots_by_host.get(host, ()))
        out = [f"--num-gpus={gpus}"]
        if spec.cpus_per_host is not None:
            out.append(f"--num-cpus={spec.cpus_per_host}")
        return out

    head_argv = [spec.ray, "start", "--head", f"--port={spec.port}", *resources(head), "--block",
                 "--disable-usage-stats"]
    tasks = [_one(ctx, 0, head, head_argv, {}, None,
                  role=ServiceRole(group=0, ready_log=RAY_ADDRESS, ready_timeout=timeout,
                                   capture={"address": RAY_ADDRESS}, stop=stop))]
    for i, host in enumerate(h for h in stage_hosts if h != head):
        argv = [spec.ray, "start", f"--address={{{ctx.name}.address}}", *resources(host), "--block",
                "--disable-usage-stats"]
        tasks.append(_one(ctx, i + 1, host, argv, {}, None,
                          role=ServiceRole(group=1, ready_log=r"Ray runtime started", ready_timeout=timeout,
                                           stop=stop)))
    return tasks


INITIAL_PEERS = r"--initial_peers\s+(.+?)\s*$"
"""hivemind-dht: `Running a DHT instance. To connect other peers to this one, use --initial_peers ADDR [ADDR...]`."""
VISIBLE_PEERS = r"Full list of visible multiaddresses:\s+(.+?)\s*$"
"""hivemind-dht's next line: every address it listens on. The line above names one IP only, and on hosts
without a global address that is 127.0.0.1, which other hosts cannot use: the engine picks one from both."""


def _swarm_tasks(spec: SwarmStage, ctx: _Ctx, server_hosts: Sequence[str]) -> list[TaskPlan]:
    coordinator = spec.coordinator or next(iter(ctx.slots_by_host), server_hosts[0])
    timeout = parse_duration(spec.timeout)
    # {identity} is itself a template (it may use {run_dir} or {host}): splice it in at the template level.
    if isinstance(spec.dht_command, str):
        dht_command: str | list[str] = spec.dht_command.replace("{identity}", spec.identity)
    else:
        dht_command = [a.replace("{identity}", spec.identity) for a in spec.dht_command]
    dht = _one(ctx, 0, coordinator, dht_command, spec.env, None, extra={"dht_port": spec.dht_port},
               role=ServiceRole(group=0, ready_log=INITIAL_PEERS, ready_timeout=timeout,
                                capture={"all_peers": INITIAL_PEERS, "visible_peers": VISIBLE_PEERS}))
    tasks = [dht]
    if spec.servers is None:
        return tasks
    index = 1
    for host in server_hosts:
        slots = list(ctx.slots_by_host.get(host, ())) if spec.per_slot else [ctx.first_slot(host)]
        for slot in slots:
            tasks.append(_one(ctx, index, host, spec.servers, spec.env, None, slot=slot,
                              role=ServiceRole(group=1, ready_log=spec.server_ready, ready_timeout=timeout,
                                               isolate_gpu=spec.per_slot)))
            index += 1
    return tasks


def _pipeline_tasks(spec: PipelineStage, ctx: _Ctx, slots: Sequence[Slot]) -> list[TaskPlan]:
    from remote.stages.pipeline import plan_pipeline  # noqa: PLC0415

    addresses = {s.host: ctx.addresses.get(s.host, "127.0.0.1") for s in slots}
    workers = plan_pipeline(slots, num_layers=spec.layers, workers=spec.workers, base_port=spec.base_port,
                            host_addresses=addresses)
    timeout = parse_duration(spec.timeout)
    tasks = []
    for w in workers:
        role = ServiceRole(group=0, ready_port=str(w.port), ready_timeout=timeout, info=w.values(), isolate_gpu=True)
        tasks.append(_one(ctx, w.rank, w.slot.host, spec.command, spec.env, spec.workdir, role=role,
                          extra=w.values(), slot=w.slot))
    return tasks


def _task(ctx: _Ctx, index: int, values: Mapping[str, Scalar], argv: Sequence[str], env: Mapping[str, str],
          workdir: str | None, cost: float, pin: str | None, *, host: str | None = None,
          role: ServiceRole | None = None) -> TaskPlan:
    all_values = {**ctx.trial_values, **values}
    content: dict[str, object] = {"stage": ctx.name, "argv": list(argv), "env": dict(env), "workdir": workdir,
                                  "values": dict(all_values)}
    if host is not None:
        content["host"] = host  # a run stage's identical command on two hosts is two tasks
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    task_id = digest[:16]
    label = " ".join(f"{k}={v}" for k, v in all_values.items())
    if host is not None:
        label = f"{label} {ctx.name}@{host}".strip()
    label = label or ctx.name
    log_parts = [ctx.name, *(f"{k}={v}" for k, v in all_values.items())] + ([host] if host else [])
    return TaskPlan(id=task_id, stage=ctx.name, index=index, label=label,
                    log_name=f"{safe_name('.'.join(log_parts))}-{task_id[:8]}", values=dict(all_values),
                    argv=tuple(argv), env=dict(env), workdir=workdir, cost=cost, pinned_slot=pin, service=role)


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def safe_name(text: str) -> str:
    """A file name that says which cell a log belongs to, with nothing a shell or a filesystem would trip on."""
    return _UNSAFE.sub("_", text)[:120]


def runtime_values(slot: Slot, *, attempt: int, task_id: str, run_dir: Path, python: str) -> dict[str, object]:
    """The placeholders filled when a task is dispatched to a slot."""
    return {"gpu": slot.gpu, "host": slot.host, "slot": slot.key, "attempt": attempt, "task_id": task_id,
            "run_dir": str(run_dir), "python": python}
