"""The engine: runs a plan's stages over the hosts' slots, journals everything, and resumes after any crash.

Shape of a run:
  open transports -> discover slots -> plan -> journal the tasks -> reconcile attempts left by a previous engine
  -> for each stage: one worker per slot pulls tasks from the scheduler, launches them detached, waits while one
     monitor per host polls its running attempts and copies their output into logs/ -> results -> done.

Crash safety comes from ordering: an attempt is journalled before it is launched (so a crash mid-launch is found, not
repeated); output bytes are appended to logs/ before their offset is committed (so a resumed tail truncates the
copy back to the committed offset and continues: no line lost, none repeated); a task is marked done only after its
rc file was read. A resumed engine adopts attempts that are still running or finished while it was away.

This file is the core (setup, preflight, reconcile, trials, one attempt's launch/poll/finalize, viewers' requests,
results); each stage kind is a mixin in remote/stages/, one file per kind (see remote/stages/__init__.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remote.aio import cancel_and_wait, within
from remote.attempt import RESULT_FILE_LIMIT, Attempt, TrialFailed, exit_reason
from remote.events import (
    EngineNote,
    Event,
    LinesReceived,
    ResultsWritten,
    RunFinished,
    RunStarted,
    TaskExited,
    TaskProgressed,
    TaskStarted,
)
from remote.extract import MetricSet, TaskExtractor
from remote.journal import AttemptRow, Journal
from remote.plan import (
    Plan,
    StagePlan,
    TaskPlan,
    build_plan,
    effective_hosts,
    runtime_values,
)
from remote.recipe import (
    FetchStage,
    HostSpec,
    QueueStage,
    RunStage,
    ShapeStage,
    parse_duration,
)
from remote.recipe_loader import LoadedRecipe
from remote.results import select_columns, write_results
from remote.rundir import EngineLock, RunDir, write_private
from remote.scheduler import SlotQueues
from remote.slots import NVIDIA_SMI_QUERY, Slot, SlotError, declared_slots, parse_nvidia_smi
from remote.stages.fetch_stage import FetchStages
from remote.stages.queue_stage import QueueStages
from remote.stages.ray_stage import RayStages
from remote.stages.service_stage import ServiceStages
from remote.stages.shape_stage import ShapeStages
from remote.template import render
from remote.transport.base import ConnectionLost, Handle, HostError, LaunchSpec, ProcState, Transport
from remote.transport.local import LocalTransport, engine_python

READ_CHUNK = 1 << 20
"""Bytes read from a task's output per call; large enough that a fast printer never falls behind."""

FAST_POLL = 0.005
"""First poll delay after a launch or an exit; doubles up to EngineOptions.poll_interval while nothing changes."""


class EngineError(Exception):
    """The run cannot start or go on (a host is unreachable, a GPU query failed); one line saying what to do."""


@dataclass
class EngineOptions:
    """How the engine behaves; the defaults suit both the local host and SSH hosts."""

    poll_interval: float = 0.2
    """Seconds between polls of a host's running attempts."""
    kill_grace: float = 5.0
    """Seconds between TERM and KILL when stopping a task's process group."""
    results_interval: float = 2.0
    """Minimum seconds between rewrites of results.csv/json while tasks finish."""
    retry_failed: bool = False
    """On resume, run tasks that failed in the earlier run again (default: keep their failure)."""


def make_transport(host: str, spec: HostSpec, rd: RunDir, recipe_dir: Path) -> Transport:
    """The transport for one host entry."""
    if spec.ssh is None:
        workdir = spec.workdir or str(recipe_dir)
        return LocalTransport(host, rd.state_root(host), workdir, dict(spec.env))
    # Imported here: asyncssh and cryptography cost a third of a second that local-only runs need not pay.
    from remote.transport.ssh import CONNECT_TIMEOUT, KEEPALIVE_INTERVAL, OP_TIMEOUT, SSHTransport  # noqa: PLC0415

    try:
        tuning = ssh_tuning()
        return SSHTransport(host, spec.ssh, ssh_config=spec.ssh_config, workdir=spec.workdir, env=dict(spec.env),
                            keepalive_interval=tuning.get("keepalive_interval", KEEPALIVE_INTERVAL),
                            op_timeout=tuning.get("op_timeout", OP_TIMEOUT),
                            connect_timeout=tuning.get("connect_timeout", CONNECT_TIMEOUT))
    except HostError as exc:
        raise EngineError(str(exc)) from None


def ssh_tuning() -> dict[str, float]:
    """Keepalive and timeout overrides from the environment (tests and flaky links); defaults otherwise."""
    names = {"keepalive_interval": "BENCHFLEET_SSH_KEEPALIVE", "op_timeout": "BENCHFLEET_SSH_OP_TIMEOUT",
             "connect_timeout": "BENCHFLEET_SSH_CONNECT_TIMEOUT"}
    out: dict[str, float] = {}
    for key, env in names.items():
        value = os.environ.get(env)
        if value:
            try:
                out[key] = float(value)
            except ValueError:
                raise EngineError(f"{env}={value!r}: expected a number of seconds") from None
    return out


async def discover_slots(host: str, spec: HostSpec, transport: Transport) -> list[Slot]:
    """The host's slots: declared, or from nvidia-smi for gpus = "auto"."""
    if spec.gpus != "auto":
        return declared_slots(host, spec.gpus)
    result = await transport.run(NVIDIA_SMI_QUERY, timeout=30.0)
    if result.rc == 127:
        raise SlotError(f'host {host}: gpus = "auto" but nvidia-smi is not on PATH; install the NVIDIA driver '
                        "there, or declare gpus = N in the recipe")
    if result.rc != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise SlotError(f"host {host}: nvidia-smi failed (exit {result.rc}: {detail[-1] if detail else 'no output'}); "
                        "fix the driver or declare gpus = N")
    return parse_nvidia_smi(host, result.stdout)


class Engine(QueueStages, ServiceStages, RayStages, ShapeStages, FetchStages):
    """Runs one recipe in one run directory. Single-threaded asyncio; the journal is only touched from here."""

    def __init__(self, loaded: LoadedRecipe, rd: RunDir, *, resume: bool,
                 options: EngineOptions | None = None) -> None:
        self.loaded = loaded
        self.rd = rd
        self.resume = resume
        self.options = options or EngineOptions()
        self.plan: Plan | None = None
        self.journal: Journal | None = None
        self._listeners: list[Callable[[Event], None]] = []
        self._transports: dict[str, Transport] = {}
        self._running: dict[str, Attempt] = {}
        self._adopted: dict[str, Attempt] = {}
        self._stop = asyncio.Event()
        self._stopping = False
        self._halted = False
        self._metrics = MetricSet.from_recipe(loaded.recipe)
        self._last_results = 0.0
        self._queues: SlotQueues | None = None
        self._lock = EngineLock(rd)
        self._monitors: list[asyncio.Task[None]] = []
        self._kicks: dict[str, asyncio.Event] = {}
        self._offline: set[str] = set()
        self._changed = asyncio.Event()
        self._stage: StagePlan | None = None
        self._paused_slots: set[str] = set()
        self._busy: set[str] = set()
        self._ray_scripts: dict[str, str] = {}
        self._capture_values: dict[str, object] = {}
        self._trial_failure: str | None = None
        self._failed_trials: list[str] = []
        self._shaped: list[tuple[Transport, Any]] = []
        self._pending_teardown: list[Attempt] = []

    # -- public -------------------------------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Call `listener` with every event (from the engine's loop; it must not block)."""
        self._listeners.append(listener)

    def request_stop(self) -> None:
        """Stop cleanly: no new dispatch, running process groups killed, journal left resumable."""
        self._stopping = True
        self._stop.set()
        self._signal_change()

    async def run(self) -> RunFinished:
        """Run every stage; returns the final counts. Raises EngineError for problems a person must fix."""
        self._lock.acquire()
        try:
            return await self._run()
        finally:
            for m in self._monitors:
                await cancel_and_wait(m)
            for t in self._transports.values():
                await t.close()
            for a in [*self._running.values(), *self._adopted.values()]:
                a.log.close()
            if self.journal is not None:
                self.journal.close()
            self._lock.release()

    # -- setup --------------------------------------------------------------------------------------------------

    async def _run(self) -> RunFinished:
        journal = self.journal = Journal(self.rd.journal)
        if not self.resume:
            write_private(self.rd.recipe_copy, self.loaded.text)
            journal.set_meta("run_id", f"{self.rd.path.name}-{uuid.uuid4().hex[:8]}")
            journal.set_meta("recipe", self.loaded.recipe.name)
            journal.set_meta("recipe_path", str(self.loaded.path.resolve()))
            journal.set_meta("created", str(time.time()))
        elif self.loaded.text != self.rd.recipe_copy.read_text():
            # Keep the recipe of every run that touched this directory: results must stay explainable.
            stamp = time.strftime("%Y%m%d-%H%M%S")
            write_private(self.rd.path / f"recipe.{stamp}.toml", self.rd.recipe_copy.read_text())
            write_private(self.rd.recipe_copy, self.loaded.text)
            self._note("info", "the recipe changed since the last run; finished cells are kept, new ones will run")
        run_id = journal.meta("run_id") or self.rd.path.name
        journal.set_meta("state", "running")
        journal.event("engine-started", resumed=self.resume)

        hosts = effective_hosts(self.loaded)
        recipe_dir = self.loaded.path.resolve().parent
        slots_by_host: dict[str, list[Slot]] = {}
        for host, spec in hosts.items():
            transport = make_transport(host, spec, self.rd, recipe_dir)
            try:
                await transport.open(run_id)
                slots_by_host[host] = await discover_slots(host, spec, transport)
            except (HostError, SlotError) as exc:
                raise EngineError(str(exc)) from None
            self._transports[host] = transport
            if isinstance(transport, LocalTransport):
                transport.on_exit = self._kicks.setdefault(host, asyncio.Event()).set
        addresses = {h: str(getattr(t, "address", "127.0.0.1")) for h, t in self._transports.items()}
        plan = self.plan = build_plan(self.loaded, slots_by_host, addresses)
        with journal.transaction():
            for task in plan.all_tasks():
                journal.upsert_task(task_id=task.id, stage=task.stage, idx=task.index, label=task.label,
                                    log_name=task.log_name, values=task.values, argv=task.argv, env=task.env)
            journal.mark_plan([t.id for t in plan.all_tasks()])
            journal.set_meta("slots", json.dumps([s.key for s in plan.slots]))
            journal.set_meta("slot_names", json.dumps({s.key: s.name for s in plan.slots}))
        self._emit(RunStarted(run_dir=self.rd.path, recipe=self.loaded.recipe.name, resumed=self.resume,
                              slots=tuple(s.key for s in plan.slots)))
        for host in hosts:
            self._background(f"monitor-{host}", functools.partial(self._monitor, host))
            if hosts[host].gpus == "auto":
                self._background(f"gpus-{host}", functools.partial(self._sample_gpus, host))
        self._background("requests", self._serve_requests)
        journal.set_meta("engine_pid", str(os.getpid()))
        journal.set_meta("paused_slots", "[]")
        journal.set_meta("queue_paused", "0")
        journal.set_meta("hosts_offline", "[]")
        await self._preflight()
        if self.resume:
            await self._reconcile()

        for trial, stages in plan.trials():
            if self._stopping or self._halted:
                break
            await self._run_trial(trial, stages)
        self._write_results(force=True)
        counts = journal.counts()
        interrupted = self._stopping
        journal.set_meta("state", "interrupted" if interrupted else ("halted" if self._halted else "finished"))
        journal.event("engine-stopped", interrupted=interrupted, halted=self._halted, counts=counts)
        if self._failed_trials:
            counts = {**counts, "failed": max(counts.get("failed", 0), 1)}
        finished = RunFinished(counts=counts, interrupted=interrupted, halted=self._halted,
                               results_csv=self.rd.results_csv if self.rd.results_csv.exists() else None)
        self._emit(finished)
        return finished

    def _background(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a loop for the engine's lifetime; an unexpected error is reported and the loop restarted, because a
        dead monitor would leave every running task waiting forever."""

        async def supervised() -> None:
            while True:
                try:
                    await loop()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the loop must survive anything; the error is reported
                    self._note("error", f"internal error in {name}: {exc!r}; restarting it")
                    await asyncio.sleep(1.0)

        self._monitors.append(asyncio.create_task(supervised(), name=name))

    # -- preflight ---------------------------------------------------------------------------------------------

    async def _preflight(self) -> None:
        """Check every host's programs and working directories first: a campaign never starts half-way."""
        assert self.plan is not None
        problems: list[str] = [
            f"secret {name} is not set in benchfleet's environment; export it before starting the run"
            for name in self.loaded.recipe.secrets if name not in os.environ
        ]
        for stage in self.plan.stages:
            if not stage.spec.preflight or not stage.tasks:
                continue
            for host in dict.fromkeys(s.host for s in stage.slots):
                transport = self._transports[host]
                slot = next(s for s in stage.slots if s.host == host)
                programs: dict[str, None] = {}
                workdirs: dict[str, None] = {}
                for task in stage.tasks:
                    values = {**runtime_values(slot, attempt=1, task_id=task.id, run_dir=self.rd.path.resolve(),
                                               python=self._python_for(host))}
                    program = task.argv[0] if task.argv else ""
                    if program and "{" not in (rendered := _try_render(program, values)):
                        programs[rendered] = None
                    workdirs[self._workdir_for(task, host, values)] = None
                for workdir in workdirs:
                    try:
                        missing = await transport.check(workdir, list(programs))
                    except HostError as exc:
                        problems.append(str(exc))
                        break
                    problems.extend(f"host {host}: stage {stage.name}: {m}; install it there or fix the recipe "
                                    "(or set preflight = false if an earlier stage creates it)" for m in missing)
        if problems:
            unique = list(dict.fromkeys(problems))
            raise EngineError("\n".join(unique))

    def _secrets(self) -> dict[str, str]:
        """The recipe's secrets from the engine's environment (checked present by preflight)."""
        return {name: os.environ[name] for name in self.loaded.recipe.secrets if name in os.environ}

    def _python_for(self, host: str) -> str:
        assert self.plan is not None
        return engine_python() if self.plan.hosts[host].ssh is None else "python3"

    def _workdir_for(self, task: TaskPlan, host: str, values: Mapping[str, object]) -> str:
        assert self.plan is not None
        if task.workdir:
            return _try_render(task.workdir, values)
        return self.plan.hosts[host].workdir or self._transports[host].default_workdir()

    # -- reconcile ----------------------------------------------------------------------------------------------

    async def _reconcile(self) -> None:
        """Find attempts a previous engine left: adopt running tasks, collect finished ones, stop old services.

        Services are never adopted: their captured values and readiness belong to the engine that started them. A
        trial whose services were still up restarts them (stopped first, never duplicated), and tasks of that trial
        that were running against them are stopped too and run again; finished cells are kept.
        """
        assert self.journal is not None and self.plan is not None
        tasks = {t.id: t for t in self.plan.all_tasks()}
        stage_of = {t.id: s for s in self.plan.stages for t in s.tasks}
        slots = {s.key: s for s in self.plan.slots}
        run_id = self.journal.meta("run_id") or self.rd.path.name
        await self._revert_stale_shaping(run_id)
        restarted_trials: set[str] = set()
        for row in self.journal.open_attempts():
            task = tasks.get(row.task_id)
            transport = self._transports.get(row.host)
            if task is None or transport is None:
                self.journal.end_attempt(row.task_id, row.attempt, "orphaned", None,
                                         "its task or host is no longer in the recipe")
                continue
            handle = await self._find_handle(row, transport)
            if handle is None:
                # Journalled but never started: safe to launch again later.
                self.journal.end_attempt(row.task_id, row.attempt, "never-started", None,
                                         "the engine stopped before the process started")
                self.journal.set_task_state(task.id, "queued", attempts=row.attempt - 1)
                continue
            if task.service is not None:
                await transport.kill(handle, self.options.kill_grace)
                if task.service.stop:
                    await transport.run(list(task.service.stop), timeout=120.0)
                self.journal.end_attempt(task.id, row.attempt, "stopped", None, "stopped on resume")
                self.journal.set_task_state(task.id, "queued", reason="restarted on resume")
                restarted_trials.add(stage_of[task.id].trial)
                self._note("info", f"service {task.stage} on {row.host} from the previous engine stopped; it "
                                   "restarts with its trial")
                continue
            slot = slots.get(f"{row.host}:{row.gpu}", Slot(host=row.host, gpu=row.gpu))
            attempt = self._open_attempt(task, stage_of[task.id], slot, row.attempt, handle, transport,
                                         resume_offset=row.out_offset)
            self._adopted[task.id] = attempt
            self.journal.event("task-adopted", task.id, attempt=row.attempt, slot=slot.key)
            self._emit(TaskStarted(task_id=task.id, stage=task.stage, label=task.label, slot=slot.key,
                                   attempt=row.attempt, adopted=True))
        for task_id, attempt in list(self._adopted.items()):
            if attempt.stage.trial in restarted_trials:
                await attempt.transport.kill(attempt.handle, self.options.kill_grace)
                attempt.log.close()
                del self._adopted[task_id]
                self.journal.end_attempt(task_id, attempt.number, "interrupted", None, "its services restarted")
                self.journal.set_task_state(task_id, "queued", reason="its services restarted",
                                            attempts=self._counted_attempts(task_id))
        # Tasks marked running without an open attempt (a crash between two writes) go back to the queue.
        for row2 in self.journal.tasks():
            if row2.state == "running" and row2.id not in self._adopted:
                self.journal.set_task_state(row2.id, "queued")

    async def _find_handle(self, row: AttemptRow, transport: Transport) -> Handle | None:
        if row.state == "running" and row.pid is not None and row.task_dir is not None:
            return Handle(task_dir=row.task_dir, pid=row.pid, pid_start=row.pid_start or 0)
        handle = await transport.find(row.name)
        if handle is None:
            # The wrapper may be between exec and writing its pid file: look once more after a moment.
            await asyncio.sleep(1.0)
            handle = await transport.find(row.name)
        if handle is not None and self.journal is not None:
            self.journal.attempt_launched(row.task_id, row.attempt, handle.task_dir, handle.pid, handle.pid_start)
        return handle

    # -- trials -------------------------------------------------------------------------------------------------

    async def _run_trial(self, trial: str, stages: Sequence[StagePlan]) -> None:
        """One pass over the stages with one trial's values; services and shaping are torn down however it ends."""
        assert self.journal is not None
        self._capture_values = {}
        self._trial_failure = None
        services: list[Attempt] = []
        watchers: list[asyncio.Task[None]] = []
        if trial:
            self.journal.event("trial-started", trial=trial)
            self._note("info", f"trial {trial}: starting")
        try:
            for stage in stages:
                if self._stopping or self._halted or self._trial_failure is not None:
                    break
                if isinstance(stage.spec, QueueStage | RunStage):
                    if not stage.slots:
                        raise EngineError(f"stage {stage.name}: no GPU slots on its hosts; declare gpus = N on them")
                    failed = await self._run_stage(stage)
                    if failed and isinstance(stage.spec, RunStage):
                        raise TrialFailed(f"stage {stage.name} failed; later stages of this trial were not started")
                elif isinstance(stage.spec, ShapeStage):
                    await self._apply_shape(stage)
                elif isinstance(stage.spec, FetchStage):
                    await self._fetch(stage)
                else:
                    started = await self._start_services(stage)
                    services.extend(started)
                    watchers.extend(asyncio.create_task(self._watch_service(a)) for a in started)
            if self._trial_failure is not None:
                raise TrialFailed(self._trial_failure)
        except TrialFailed as exc:
            label = f"trial {trial}: " if trial else ""
            self._failed_trials.append(trial)
            self.journal.event("trial-failed", trial=trial, reason=str(exc))
            self._note("error", f"{label}{exc}")
        finally:
            for w in watchers:
                w.cancel()
            await self._teardown(services)

    def _signal_change(self) -> None:
        """Wake slot workers waiting for work (a task ended, a retry was queued, a slot resumed, a stop)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self) -> None:
        with contextlib.suppress(TimeoutError):
            await within(1.0, self._changed.wait())

    # -- one attempt --------------------------------------------------------------------------------------------

    async def _launch(self, stage: StagePlan, task: TaskPlan, slot: Slot, number: int) -> Attempt | None:
        assert self.journal is not None and self.plan is not None
        transport = self._transports[slot.host]
        values = {**runtime_values(slot, attempt=number, task_id=task.id, run_dir=self.rd.path.resolve(),
                                   python=self._python_for(slot.host)),
                  **self._captures()}
        argv = [render(a, values) for a in task.argv]
        env = {k: render(v, values) for k, v in task.env.items()}
        isolate = stage.spec.isolate_gpu if isinstance(stage.spec, QueueStage) else False
        isolate = isolate or (task.service is not None and task.service.isolate_gpu)
        if isinstance(stage.spec, QueueStage) and stage.spec.executor == "ray":
            argv = await self._through_ray(stage, stage.spec, slot, argv, env)
            isolate = False  # Ray sets CUDA_VISIBLE_DEVICES on the node it picks
        if isolate:
            env["CUDA_VISIBLE_DEVICES"] = str(slot.gpu)
        env.update({"BENCHFLEET_TASK_ID": task.id, "BENCHFLEET_ATTEMPT": str(number), "BENCHFLEET_SLOT": slot.key})
        env.update(self._secrets())
        workdir = self._workdir_for(task, slot.host, values)
        name = f"{task.id}.{number}"
        self.journal.begin_attempt(task_id=task.id, attempt=number, host=slot.host, gpu=slot.gpu, name=name)
        handle = await self._launch_idempotent(transport, LaunchSpec(name=name, argv=argv, env=env, workdir=workdir))
        if handle is None:
            return None
        self.journal.attempt_launched(task.id, number, handle.task_dir, handle.pid, handle.pid_start)
        self.journal.event("task-started", task.id, attempt=number, slot=slot.key, argv=argv)
        attempt = self._open_attempt(task, stage, slot, number, handle, transport, resume_offset=None)
        self._running[task.id] = attempt
        self._kicks.setdefault(slot.host, asyncio.Event()).set()
        self._emit(TaskStarted(task_id=task.id, stage=task.stage, label=task.label, slot=slot.key, attempt=number))
        return attempt

    async def _launch_idempotent(self, transport: Transport, spec: LaunchSpec) -> Handle | None:
        """Launch, riding out a lost connection: after a reconnect, look for the attempt before launching again,
        so a launch cut off half-way never starts the task twice. None when the engine is stopping."""
        delay = 0.5
        retrying = False
        while True:
            try:
                if retrying:
                    found = await transport.find(spec.name)
                    if found is not None:
                        self._host_online(transport.host)
                        return found
                handle = await transport.launch(spec)
                self._host_online(transport.host)
                return handle
            except ConnectionLost as exc:
                self._host_offline(transport.host, str(exc))
                retrying = True
                if await self._sleep_unless_stopping(delay):
                    return None
                delay = min(30.0, delay * 2)

    async def _sleep_unless_stopping(self, seconds: float) -> bool:
        """Sleep; True if a stop was requested meanwhile."""
        with contextlib.suppress(TimeoutError):
            await within(seconds, self._stop.wait())
        return self._stopping

    def _host_offline(self, host: str, why: str) -> None:
        if host not in self._offline:
            self._offline.add(host)
            if self.journal is not None:
                self.journal.event("host-offline", host=host, reason=why)
                self.journal.set_meta("hosts_offline", json.dumps(sorted(self._offline)))
            self._note("warning", f"{why}; its tasks keep running, benchfleet reconnects and resumes their logs")

    def _host_online(self, host: str) -> None:
        if host in self._offline:
            self._offline.discard(host)
            if self.journal is not None:
                self.journal.event("host-online", host=host)
                self.journal.set_meta("hosts_offline", json.dumps(sorted(self._offline)))
            self._note("info", f"host {host}: reconnected")

    def _open_attempt(self, task: TaskPlan, stage: StagePlan, slot: Slot, number: int, handle: Handle,
                      transport: Transport, *, resume_offset: int | None) -> Attempt:
        """Set up the local log copy and the extractor; on reattach, rebuild both from the committed offset."""
        spec = stage.spec
        extractor = TaskExtractor(self._metrics, stage.name, done=getattr(spec, "done", None),
                                  progress=spec.progress if isinstance(spec, QueueStage) else None)
        path = self.rd.log_path(task.log_name)
        if resume_offset is None:
            if path.exists():
                # An earlier attempt's log stays beside the new one.
                prev = self.rd.log_path(f"{task.log_name}.attempt{number - 1}")
                path.replace(prev)
            log = open(path, "ab")  # noqa: SIM115 (closed when the attempt ends)
            path.chmod(0o600)
            attempt = Attempt(task=task, stage=stage, slot=slot, number=number, handle=handle,
                               transport=transport, log=log, extractor=extractor)
            return attempt
        # Reattach: the copy may hold bytes past the committed offset (crash between write and commit): cut them.
        with open(path, "ab") as f:
            size = f.tell()
            if size > resume_offset:
                f.truncate(resume_offset)
        offset = min(size, resume_offset)
        log = open(path, "ab")  # noqa: SIM115
        attempt = Attempt(task=task, stage=stage, slot=slot, number=number, handle=handle, transport=transport,
                           log=log, extractor=extractor, offset=offset)
        with open(path, "rb") as f:
            attempt.extractor.feed_lines(attempt.splitter.feed(f.read(offset)))
        return attempt

    async def _await_attempt(self, attempt: Attempt, queues: SlotQueues) -> None:
        spec = attempt.stage.spec
        timeout_spec = getattr(spec, "timeout", None) if isinstance(spec, QueueStage | RunStage) else None
        timeout = parse_duration(timeout_spec) if timeout_spec is not None else None
        remaining = None if timeout is None else max(0.0, timeout - (time.time() - attempt.started))
        stop_wait: asyncio.Future[object] = asyncio.ensure_future(self._stop.wait())
        finished: asyncio.Future[object] = asyncio.ensure_future(asyncio.shield(attempt.finished))
        try:
            await asyncio.wait({finished, stop_wait}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            finished.cancel()
        if not attempt.finished.done():
            if self._stopping:
                attempt.interrupted = True
            else:
                attempt.timed_out = True
                self._note("warning", f"{attempt.task.label or attempt.task.stage}: timed out after "
                                      f"{timeout:.0f}s on {attempt.slot.key}; killing its process group")
            await attempt.transport.kill(attempt.handle, self.options.kill_grace if not self._stopping else 2.0)
        state = await attempt.finished
        await self._finalize(attempt, state, queues)

    async def _finalize(self, attempt: Attempt, proc: ProcState, queues: SlotQueues) -> None:
        assert self.journal is not None and self.plan is not None
        task = attempt.task
        spec = attempt.stage.spec
        lines = attempt.splitter.flush()
        if lines:
            self._take_lines(attempt, lines)
        attempt.log.close()
        self._running.pop(task.id, None)
        ex = attempt.extractor
        for path_template, _what in ex.file_metrics():
            values = {**runtime_values(attempt.slot, attempt=attempt.number, task_id=task.id,
                                       run_dir=self.rd.path.resolve(), python="python3"),
                      **self.loaded.recipe.variables, "recipe_dir": str(self.plan.recipe_dir), **task.values}
            path = render(path_template, values)
            data = await attempt.transport.read_file(path, attempt.transport.default_workdir(), RESULT_FILE_LIMIT)
            if data is not None:
                ex.feed_file(path_template, data)
        duration = time.time() - attempt.started
        rc = proc.rc
        self._signal_change()
        if attempt.cancelled:
            self.journal.end_attempt(task.id, attempt.number, "cancelled", rc, "cancelled by request")
            self.journal.set_task_state(task.id, "cancelled", rc=rc, reason="cancelled by request", ended=time.time())
            self._emit(TaskExited(task_id=task.id, stage=task.stage, label=task.label, slot=attempt.slot.key,
                                  attempt=attempt.number, rc=rc, state="cancelled", reason="cancelled by request",
                                  duration=duration))
            return
        if attempt.interrupted:
            self.journal.end_attempt(task.id, attempt.number, "interrupted", rc, "stopped by the user")
            # An interrupted attempt does not count: the task is plain queued again, not "retrying".
            self.journal.set_task_state(task.id, "queued", rc=None, reason="interrupted", ended=time.time(),
                                        attempts=self._counted_attempts(task.id))
            self._emit(TaskExited(task_id=task.id, stage=task.stage, label=task.label, slot=attempt.slot.key,
                                  attempt=attempt.number, rc=rc, state="queued", reason="interrupted",
                                  duration=duration))
            return
        if attempt.aborted is not None:
            outcome = queues.finished(task, ok=False, retry_allowed=False)
            with self.journal.transaction():
                self.journal.end_attempt(task.id, attempt.number, "failed", rc, attempt.aborted)
                self.journal.set_task_state(task.id, outcome.state, rc=rc, reason=attempt.aborted, ended=time.time())
            self._emit(TaskExited(task_id=task.id, stage=task.stage, label=task.label, slot=attempt.slot.key,
                                  attempt=attempt.number, rc=rc, state=outcome.state, reason=attempt.aborted,
                                  duration=duration))
            return
        timeout_spec = getattr(spec, "timeout", None)
        if attempt.timed_out:
            limit = parse_duration(timeout_spec) if timeout_spec is not None else duration
            ok, reason, attempt_state = False, f"timed out after {limit:.0f}s", "timeout"
        elif proc.status == "lost":
            ok, reason, attempt_state = False, "the process vanished without an exit code (host rebooted?)", "lost"
        elif rc != 0:
            ok, reason, attempt_state = False, exit_reason(rc), "failed"
        elif (done := getattr(spec, "done", None)) is not None and not ex.done_seen:
            ok, reason, attempt_state = False, f"exit 0 but no line matched done = {done!r}", "failed"
        else:
            ok, reason, attempt_state = True, "exit 0", "done"
        outcome = queues.finished(task, ok)
        metrics: dict[str, object] = ex.finish({**self.loaded.recipe.variables, **attempt.stage.trial_values,
                                                **task.values, **self._captures()})
        with self.journal.transaction():
            self.journal.end_attempt(task.id, attempt.number, attempt_state, rc, reason)
            self.journal.set_metrics(task.id, metrics)
            self.journal.set_task_state(task.id, outcome.state, rc=rc, reason=reason, ended=time.time(),
                                        last_line=ex.last_line)
            self.journal.event("task-exited", task.id, attempt=attempt.number, rc=rc, state=outcome.state,
                               reason=reason)
        self._emit(TaskExited(task_id=task.id, stage=task.stage, label=task.label, slot=attempt.slot.key,
                              attempt=attempt.number, rc=rc, state=outcome.state, reason=reason, duration=duration,
                              metrics=metrics))
        if outcome.state == "queued":
            self._note("info", f"{task.label or task.stage}: {reason}; retrying "
                               f"({queues.attempts(task.id)}/{getattr(spec, 'retries', 0) + 1} attempts used)")
        if outcome.halted_now:
            rule = spec.halt if isinstance(spec, QueueStage) else "first-failure"
            self._note("error", f"stage {task.stage}: halt rule {rule!r} reached "
                                "after this failure; no new tasks will start")
        self._write_results(force=False)

    # -- monitoring ---------------------------------------------------------------------------------------------

    async def _monitor(self, host: str) -> None:
        """Poll the host's running attempts, copy their output, and resolve the ones that ended.

        Polls start fast after a launch or an exit (short tasks are noticed within milliseconds) and back off to
        `poll_interval` while nothing changes, so long tasks cost a few polls a second.
        """
        transport = self._transports[host]
        kick = self._kicks.setdefault(host, asyncio.Event())
        delay = FAST_POLL
        while True:
            watched = [a for a in (*self._running.values(), *self._adopted.values())
                       if a.slot.host == host and not a.finished.done()]
            if watched:
                try:
                    states = await transport.poll([a.handle for a in watched])
                    for attempt, state in zip(watched, states, strict=True):
                        if state.out_size > attempt.offset:
                            await self._pump(attempt, state.out_size)
                        if state.status != "running":
                            attempt.finished.set_result(state)
                            delay = FAST_POLL
                    self._host_online(host)
                except ConnectionLost as exc:
                    self._host_offline(host, str(exc))
                    await asyncio.sleep(1.0)
                    continue
                except HostError as exc:
                    self._note("error", f"{exc}; retrying in 10s")
                    await asyncio.sleep(10.0)
                    continue
            kick.clear()
            with contextlib.suppress(TimeoutError):
                await within(delay, kick.wait())
                delay = FAST_POLL
            delay = min(self.options.poll_interval, delay * 2)

    async def _pump(self, attempt: Attempt, size: int) -> None:
        """Copy new output into logs/, commit the offset, and feed the lines to the extractor and listeners."""
        assert self.journal is not None
        while attempt.offset < size:
            data = await attempt.transport.read_output(attempt.handle, attempt.offset, READ_CHUNK)
            if not data:
                break
            attempt.log.write(data)
            attempt.log.flush()
            attempt.offset += len(data)
            self.journal.set_offset(attempt.task.id, attempt.number, attempt.offset)
            lines = attempt.splitter.feed(data)
            if lines:
                self._take_lines(attempt, lines)

    def _take_lines(self, attempt: Attempt, lines: Sequence[str]) -> None:
        assert self.journal is not None
        ex = attempt.extractor
        ex.feed_lines(lines)
        if attempt.capture_patterns or attempt.ready_pattern is not None:
            for line in lines:
                for key, pattern in attempt.capture_patterns.items():
                    if key not in attempt.captured and (m := pattern.search(line)):
                        attempt.captured[key] = m.group(1)
                if attempt.ready_pattern is not None and attempt.ready_pattern.search(line):
                    attempt.ready.set()
        self._emit(LinesReceived(task_id=attempt.task.id, slot=attempt.slot.key, lines=tuple(lines)))
        if ex.progress != attempt.progress and ex.progress is not None:
            attempt.progress = ex.progress
            self.journal.set_progress(attempt.task.id, ex.progress[0], ex.progress[1], ex.last_line)
            self._emit(TaskProgressed(task_id=attempt.task.id, slot=attempt.slot.key, done=ex.progress[0],
                                      total=ex.progress[1]))

    # -- requests from viewers and GPU samples -------------------------------------------------------------------

    async def _serve_requests(self) -> None:
        """Act on what viewers asked through the journal (console keys), and record each outcome."""
        assert self.journal is not None
        while True:
            for seq, kind, target, _data in self.journal.pending_requests():
                try:
                    outcome = await self._handle_request(kind, target)
                except HostError as exc:
                    outcome = f"failed: {exc}"
                self.journal.handle_request(seq, outcome)
                self.journal.event("request", request=kind, target=target, outcome=outcome)
                self._note("info", f"{kind} {target or ''}: {outcome}".replace("  ", " "))
            await asyncio.sleep(0.3)

    async def _handle_request(self, kind: str, target: str | None) -> str:
        assert self.journal is not None
        queues, stage = self._queues, self._stage
        if kind == "stop":
            self.request_stop()
            return "stopping: running tasks are killed, the run can be resumed"
        if kind in ("pause", "resume"):
            keys = [target] if target else [s.key for s in (self.plan.slots if self.plan else ())]
            for key in keys:
                if kind == "pause":
                    self._paused_slots.add(key)
                    if queues is not None:
                        queues.pause(key)
                else:
                    self._paused_slots.discard(key)
                    if queues is not None:
                        queues.resume(key)
            self.journal.set_meta("paused_slots", json.dumps(sorted(self._paused_slots)))
            all_keys = {s.key for s in (self.plan.slots if self.plan else ())}
            self.journal.set_meta("queue_paused", "1" if all_keys and all_keys <= self._paused_slots else "0")
            self._signal_change()
            what = f"slot {target}" if target else "the whole queue"
            return f"{what} {'paused: running tasks finish, no new ones start' if kind == 'pause' else 'resumed'}"
        if kind == "cancel":
            if target is None:
                return "refused: cancel needs a task id"
            attempt = self._running.get(target) or self._adopted.get(target)
            if attempt is not None:
                attempt.cancelled = True
                await attempt.transport.kill(attempt.handle, self.options.kill_grace)
                return f"cancelled {attempt.task.label or attempt.task.stage} (its process group was killed)"
            waiting = queues.remove(target) if queues is not None else None
            if waiting is not None:
                self.journal.set_task_state(target, "cancelled", reason="cancelled by request", ended=time.time())
                self._signal_change()
                return f"cancelled {waiting.label or waiting.stage} before it started"
            return "refused: that task is neither running nor waiting"
        if kind == "retry-failed":
            if stage is None or queues is None or (target and target != stage.name):
                return "refused: failed tasks can be retried while their stage runs (or with --resume --retry-failed)"
            failed = {r.id for r in self.journal.tasks(stage.name) if r.state == "failed"}
            tasks = [t for t in stage.tasks if t.id in failed]
            for task in tasks:
                queues.add(task)
                self.journal.set_task_state(task.id, "queued", reason="retry requested")
            if tasks:
                queues.unhalt()
                self._halted = False
            self._signal_change()
            return f"{len(tasks)} failed task(s) queued again"
        return f"refused: unknown request {kind!r}"

    async def _sample_gpus(self, host: str) -> None:
        """nvidia-smi every 5 s for the console's sparklines; failures only leave gaps."""
        assert self.journal is not None
        transport = self._transports[host]
        while True:
            try:
                result = await transport.run(GPU_SAMPLE_QUERY, timeout=10.0)
                if result.rc == 0:
                    self.journal.add_gpu_samples(host, parse_gpu_samples(result.stdout))
            except HostError:
                pass
            await asyncio.sleep(GPU_SAMPLE_INTERVAL)

    # -- results and events -------------------------------------------------------------------------------------

    def _captures(self) -> Mapping[str, object]:
        """Values captured by the trial's services so far ({dht.initial_peers}, {ray.address}, ...)."""
        return self._capture_values

    def _write_results(self, *, force: bool) -> None:
        assert self.journal is not None and self.plan is not None
        now = time.monotonic()
        if not force and now - self._last_results < self.options.results_interval:
            return
        self._last_results = now
        rows = results_rows(self.journal, self.plan)
        if not rows:
            return
        trial_axes = [k for values in self.loaded.trials for k in values]
        axes = [*trial_axes, *(a for s in self.plan.stages if isinstance(s.spec, QueueStage) for a in s.spec.grid)]
        columns = select_columns(self.loaded.recipe.results, list(dict.fromkeys(axes)), self._metrics.metric_names())
        csv_path, json_path = write_results(self.rd.path, rows, columns, self.loaded.recipe.results)
        self._emit(ResultsWritten(csv=csv_path, json=json_path, rows=len(rows)))

    def _note(self, level: str, text: str) -> None:
        if self.journal is not None:
            self.journal.event("note", level=level, text=text)
        self._emit(EngineNote(level=level, text=text))

    def _emit(self, event: Event) -> None:
        for listener in self._listeners:
            listener(event)


def results_rows(journal: Journal, plan: Plan) -> list[dict[str, object]]:
    """One row per task of the queue stages (and of run stages that produced metrics)."""
    metrics = journal.metrics()
    queue_stages = {s.name for s in plan.stages if isinstance(s.spec, QueueStage)}
    trial_of = {task.id: stage.trial for stage in plan.stages for task in stage.tasks}
    rows: list[dict[str, object]] = []
    for t in journal.tasks():
        m = metrics.get(t.id, {})
        if t.stage not in queue_stages and not m:
            continue
        row: dict[str, object] = {
            "task": t.id, "stage": t.stage, "trial": trial_of.get(t.id, ""), "label": t.label, "host": t.host,
            "gpu": t.gpu, "state": t.state,
            "rc": t.rc, "attempts": t.attempts,
            "duration": round(t.ended - t.started, 3) if t.ended and t.started else None,
            "started": t.started, "ended": t.ended,
        }
        row.update(t.values)
        row.update(m)
        rows.append(row)
    return rows


GPU_SAMPLE_QUERY = ("nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used,memory.total",
                    "--format=csv,noheader,nounits")
GPU_SAMPLE_INTERVAL = 5.0


def parse_gpu_samples(text: str) -> list[tuple[int, float | None, float | None, float | None]]:
    """(gpu, util %, MiB used, MiB total) per line; "[N/A]" fields become None."""
    out: list[tuple[int, float | None, float | None, float | None]] = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not parts[0].isdigit():
            continue
        nums: list[float | None] = []
        for p in parts[1:]:
            try:
                nums.append(float(p))
            except ValueError:
                nums.append(None)
        out.append((int(parts[0]), nums[0], nums[1], nums[2]))
    return out


def _try_render(text: str, values: Mapping[str, object]) -> str:
    """Render what can be rendered now; placeholders filled later (captures) stay as they are."""
    try:
        return render(text, values)
    except ValueError:
        return text
