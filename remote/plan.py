"""The planner: a loaded recipe plus the hosts' GPU slots become stages of concrete tasks.

Everything that does not depend on where a task runs is rendered here (variables, grid values, `{recipe_dir}`);
`{gpu}`, `{host}` and the other runtime placeholders stay in the templates until dispatch. That split is what makes
task ids stable: an id hashes the stage, the rendered argv and environment templates, the working directory and the
grid values, so `--resume` recognises a finished cell even after the grid is reordered or extended.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from remote.grid import compile_cost
from remote.placement import assign
from remote.recipe import HostSpec, QueueStage, RunStage, Scalar
from remote.recipe_loader import LoadedRecipe
from remote.slots import Slot
from remote.template import RUNTIME_PLACEHOLDERS, render, render_argv

LOCAL_HOST = "local"
"""Name of the implicit host when a recipe declares none."""


@dataclass(frozen=True)
class TaskPlan:
    """One unit of work: a grid cell of a queue stage, or one host's command of a run stage."""

    id: str
    stage: str
    index: int
    """Position in grid order (results keep it as a tiebreak); dispatch order is the order of StagePlan.tasks."""
    label: str
    log_name: str
    values: Mapping[str, Scalar]
    argv: tuple[str, ...]
    """Rendered except for runtime placeholders ({gpu}, {host}, ...), which are filled at dispatch."""
    env: Mapping[str, str]
    workdir: str | None
    cost: float
    pinned_slot: str | None
    """Slot key the task must run on (md5 and round-robin placement, run stages); None: any free slot."""


@dataclass(frozen=True)
class StagePlan:
    """A stage with its slots and tasks."""

    name: str
    kind: str
    spec: QueueStage | RunStage
    slots: tuple[Slot, ...]
    tasks: tuple[TaskPlan, ...]


@dataclass(frozen=True)
class Plan:
    """What a run will do."""

    loaded: LoadedRecipe
    hosts: Mapping[str, HostSpec]
    slots: tuple[Slot, ...]
    stages: tuple[StagePlan, ...]

    @property
    def recipe_dir(self) -> Path:
        return Path(self.loaded.path).resolve().parent

    def all_tasks(self) -> list[TaskPlan]:
        return [t for s in self.stages for t in s.tasks]


def effective_hosts(loaded: LoadedRecipe) -> dict[str, HostSpec]:
    """The recipe's hosts, or this machine alone: with nvidia-smi its GPUs, without it one CPU slot."""
    if loaded.recipe.hosts:
        return dict(loaded.recipe.hosts)
    gpus: int | str = "auto" if shutil.which("nvidia-smi") else 1
    return {LOCAL_HOST: HostSpec.model_validate({"gpus": gpus})}


def stage_name(spec: QueueStage | RunStage) -> str:
    return spec.name or spec.kind


def build_plan(loaded: LoadedRecipe, slots_by_host: Mapping[str, Sequence[Slot]]) -> Plan:
    """Expand every stage into tasks and place them on the slots."""
    hosts = effective_hosts(loaded)
    recipe = loaded.recipe
    all_slots = tuple(s for h in hosts for s in slots_by_host.get(h, ()))
    stage_names = [stage_name(s) for s in recipe.stage]
    base_values: dict[str, object] = {**recipe.variables, "recipe_dir": str(loaded.path.resolve().parent)}
    stages: list[StagePlan] = []
    for position, spec in enumerate(recipe.stage):
        name = stage_name(spec)
        # Dotted placeholders name values captured by earlier stages; they are filled at dispatch too.
        keep = RUNTIME_PLACEHOLDERS | set(stage_names[:position])
        stage_hosts = spec.hosts or (list(hosts) if isinstance(spec, QueueStage) else [next(iter(hosts))])
        slots = tuple(s for h in stage_hosts for s in slots_by_host.get(h, ()))
        if isinstance(spec, QueueStage):
            tasks = _queue_tasks(name, spec, loaded.grids.get(name, [{}]), base_values, keep, slots)
        else:
            tasks = _run_tasks(name, spec, stage_hosts, slots_by_host, base_values, keep)
        stages.append(StagePlan(name=name, kind=spec.kind, spec=spec, slots=slots, tasks=tuple(tasks)))
    return Plan(loaded=loaded, hosts=hosts, slots=all_slots, stages=tuple(stages))


def _queue_tasks(name: str, spec: QueueStage, grid: Sequence[Mapping[str, Scalar]], base: Mapping[str, object],
                 keep: frozenset[str] | set[str], slots: Sequence[Slot]) -> list[TaskPlan]:
    cost_of = compile_cost(spec.cost, list(spec.grid)) if spec.cost else None
    tasks: list[TaskPlan] = []
    for index, values in enumerate(grid):
        scope = {**base, **values}
        argv = tuple(render_argv(spec.command, scope, keep=keep, final=False))
        env = {k: render(v, scope, keep=keep, final=False) for k, v in spec.env.items()}
        workdir = render(spec.workdir, scope, keep=keep, final=False) if spec.workdir else None
        cost = float(cost_of(values)) if cost_of else 1.0
        tasks.append(_task(name, index, values, argv, env, workdir, cost, None))
    if spec.order == "longest-first":
        tasks.sort(key=lambda t: -t.cost)  # stable: equal costs keep grid order
    if slots:
        keys = [render(spec.key, {**base, **t.values}) if spec.key else "-".join(str(v) for v in t.values.values())
                for t in tasks]
        pins = assign(spec.placement, keys, len(slots))
        tasks = [replace(t, pinned_slot=slots[p].key if p is not None else None)
                 for t, p in zip(tasks, pins, strict=True)]
    return tasks


def _run_tasks(name: str, spec: RunStage, stage_hosts: Sequence[str], slots_by_host: Mapping[str, Sequence[Slot]],
               base: Mapping[str, object], keep: frozenset[str] | set[str]) -> list[TaskPlan]:
    tasks: list[TaskPlan] = []
    for index, host in enumerate(stage_hosts):
        scope = dict(base)
        argv = tuple(render_argv(spec.command, scope, keep=keep, final=False))
        env = {k: render(v, scope, keep=keep, final=False) for k, v in spec.env.items()}
        workdir = render(spec.workdir, scope, keep=keep, final=False) if spec.workdir else None
        host_slots = slots_by_host.get(host, ())
        pin = host_slots[0].key if host_slots else None
        tasks.append(_task(name, index, {}, argv, env, workdir, 1.0, pin, host=host))
    return tasks


def _task(stage: str, index: int, values: Mapping[str, Scalar], argv: tuple[str, ...], env: Mapping[str, str],
          workdir: str | None, cost: float, pin: str | None, host: str | None = None) -> TaskPlan:
    content = {"stage": stage, "argv": list(argv), "env": dict(env), "workdir": workdir, "values": dict(values)}
    if host is not None:
        content["host"] = host  # a run stage's identical command on two hosts is two tasks
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    task_id = digest[:16]
    label = " ".join(f"{k}={v}" for k, v in values.items()) or (f"{stage}@{host}" if host else stage)
    log_name = _safe_name(".".join([stage, *(f"{k}={v}" for k, v in values.items())] + ([host] if host else [])))
    return TaskPlan(id=task_id, stage=stage, index=index, label=label, log_name=f"{log_name}-{task_id[:8]}",
                    values=dict(values), argv=argv, env=dict(env), workdir=workdir, cost=cost, pinned_slot=pin)


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def _safe_name(text: str) -> str:
    """A file name that says which cell a log belongs to, with nothing a shell or a filesystem would trip on."""
    return _UNSAFE.sub("_", text)[:120]


def runtime_values(slot: Slot, *, attempt: int, task_id: str, run_dir: Path, python: str) -> dict[str, object]:
    """The placeholders filled when a task is dispatched to a slot."""
    return {"gpu": slot.gpu, "host": slot.host, "slot": slot.key, "attempt": attempt, "task_id": task_id,
            "run_dir": str(run_dir), "python": python}
