"""The engine: runs a plan's stages over the hosts' slots, journals everything, and resumes after any crash.

Shape of a run:
  open transports -> discover slots -> plan -> journal the tasks -> reconcile attempts left by a previous engine
  -> for each stage: one worker per slot pulls tasks from the scheduler, launches them detached, waits while one
     monitor per host polls its running attempts and copies their output into logs/ -> results -> done.

Crash safety comes from ordering: an attempt is journalled before it is launched (so a crash mid-launch is found, not
repeated); output bytes are appended to logs/ before their offset is committed (so a resumed tail truncates the
copy back to the committed offset and continues: no line lost, none repeated); a task is marked done only after its
rc file was read. A resumed engine adopts attempts that are still running or finished while it was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import os
import re
import shlex
import signal
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from remote.aio import cancel_and_wait, within
from remote.events import (
    EngineNote,
    Event,
    LinesReceived,
    ResultsWritten,
    RunFinished,
    RunStarted,
    StageFinished,
    StageStarted,
    TaskExited,
    TaskProgressed,
    TaskStarted,
)
from remote.extract import LineSplitter, MetricSet, TaskExtractor
from remote.journal import AttemptRow, Journal
from remote.plan import (
    Plan,
    ServiceRole,
    StagePlan,
    TaskPlan,
    build_plan,
    effective_hosts,
    ray_cluster_of,
    runtime_values,
    safe_name,
)
from remote.recipe import (
    FetchStage,
    HostSpec,
    PipelineStage,
    QueueStage,
    RayStage,
    RunStage,
    ShapeStage,
    SwarmStage,
    halt_threshold,
    parse_duration,
)
from remote.recipe_loader import LoadedRecipe, stage_name
from remote.results import select_columns, write_results
from remote.rundir import EngineLock, RunDir, write_private
from remote.scheduler import SlotQueues
from remote.slots import NVIDIA_SMI_QUERY, Slot, SlotError, declared_slots, parse_nvidia_smi
from remote.template import render
from remote.transport.base import ConnectionLost, Handle, HostError, LaunchSpec, ProcState, Transport
from remote.transport.local import LocalTransport, engine_python

READ_CHUNK = 1 << 20
"""Bytes read from a task's output per call; large enough that a fast printer never falls behind."""

RESULT_FILE_LIMIT = 64 << 20

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


@dataclass
class _Attempt:
    """A launched (or adopted) attempt being watched."""

    task: TaskPlan
    stage: StagePlan
    slot: Slot
    number: int
    handle: Handle
    transport: Transport
    log: BinaryIO
    extractor: TaskExtractor
    offset: int = 0
    splitter: LineSplitter = field(default_factory=LineSplitter)
    started: float = field(default_factory=time.time)
    timed_out: bool = False
    interrupted: bool = False
    cancelled: bool = False
    aborted: str | None = None
    """Killed because its trial failed (a service died); recorded as a failure that is not retried."""
    progress: tuple[int, int] | None = None
    finished: asyncio.Future[ProcState] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Services: set when the readiness log line was seen."""
    ready_pattern: re.Pattern[str] | None = None
    capture_patterns: dict[str, re.Pattern[str]] = field(default_factory=dict)
    captured: dict[str, str] = field(default_factory=dict)
    stopping: bool = False
    """Services: being torn down on purpose, so its exit is not a failure."""


class _TrialFailed(Exception):
    """A trial cannot go on (a service never became ready, or died); one line with the service, host, last lines."""


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


class Engine:
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
        self._running: dict[str, _Attempt] = {}
        self._adopted: dict[str, _Attempt] = {}
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
        self._pending_teardown: list[_Attempt] = []

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

    async def _revert_stale_shaping(self, run_id: str) -> None:
        """Undo shaping a crashed engine left on any host (the armed guards would, but only at their deadline)."""
        if not any(isinstance(s.spec, ShapeStage) for s in self.plan.stages) if self.plan else True:
            return
        from remote.stages import shape  # noqa: PLC0415

        for host, transport in self._transports.items():
            try:
                reverted = await shape.revert_stale(transport, host, shape_state_id(run_id, host))
            except (shape.ShapeError, HostError) as exc:
                self._note("error", f"{exc}; the armed revert on the host will undo it at its deadline")
                continue
            for what in reverted:
                self._note("info", f"host {host}: reverted shaping left by the previous engine ({what})")

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

    # -- trials and services ------------------------------------------------------------------------------------

    async def _run_trial(self, trial: str, stages: Sequence[StagePlan]) -> None:
        """One pass over the stages with one trial's values; services and shaping are torn down however it ends."""
        assert self.journal is not None
        self._capture_values = {}
        self._trial_failure = None
        services: list[_Attempt] = []
        watchers: list[asyncio.Task[None]] = []
        if trial:
            self.journal.event("trial-started", trial=trial)
            self._note("info", f"trial {trial}: starting")
        try:
            for stage in stages:
                if self._stopping or self._halted or self._trial_failure is not None:
                    break
                if isinstance(stage.spec, QueueStage | RunStage):
                    failed = await self._run_stage(stage)
                    if failed and isinstance(stage.spec, RunStage):
                        raise _TrialFailed(f"stage {stage.name} failed; later stages of this trial were not started")
                elif isinstance(stage.spec, ShapeStage):
                    await self._apply_shape(stage)
                elif isinstance(stage.spec, FetchStage):
                    await self._fetch(stage)
                else:
                    started = await self._start_services(stage)
                    services.extend(started)
                    watchers.extend(asyncio.create_task(self._watch_service(a)) for a in started)
            if self._trial_failure is not None:
                raise _TrialFailed(self._trial_failure)
        except _TrialFailed as exc:
            label = f"trial {trial}: " if trial else ""
            self._failed_trials.append(trial)
            self.journal.event("trial-failed", trial=trial, reason=str(exc))
            self._note("error", f"{label}{exc}")
        finally:
            for w in watchers:
                w.cancel()
            await self._teardown(services)

    async def _start_services(self, stage: StagePlan) -> list[_Attempt]:
        """Launch a service-like stage group by group, wait until each instance is ready, publish its captures."""
        assert self.journal is not None and self.plan is not None
        started: list[_Attempt] = []
        self.journal.event("stage-started", stage=stage.name, pending=len(stage.tasks), adopted=0)
        self._emit(StageStarted(stage=stage.name, kind=stage.kind, total=len(stage.tasks), already_done=0))
        slots = {s.key: s for s in self.plan.slots}
        groups = sorted({t.service.group for t in stage.tasks if t.service is not None})
        try:
            for group in groups:
                members = [t for t in stage.tasks if t.service is not None and t.service.group == group]
                batch: list[_Attempt] = []
                for task in members:
                    if self._stopping:
                        raise _TrialFailed("stopped while starting services")
                    slot = slots.get(task.pinned_slot or "") or self._slot_of_host(task)
                    number = self.journal.next_attempt(task.id)
                    attempt = await self._launch(stage, task, slot, number)
                    if attempt is None:
                        raise _TrialFailed("stopped while starting services")
                    role = task.service
                    assert role is not None
                    attempt.ready_pattern = re.compile(role.ready_log) if role.ready_log else None
                    attempt.capture_patterns = {k: re.compile(v) for k, v in role.capture.items()}
                    batch.append(attempt)
                    started.append(attempt)
                await asyncio.gather(*(self._until_ready(stage, a) for a in batch))
                self._publish_captures(stage, batch)
            await self._cluster_checks(stage, started)
        except BaseException:
            # Whatever failed, what did start must still be torn down by the trial.
            self._pending_teardown = started
            raise
        names = ", ".join(f"{{{k}}}" for k in sorted(self._capture_values) if k.startswith(stage.name + "."))
        self._note("info", f"stage {stage.name}: {len(started)} instance(s) ready" + (f"; {names}" if names else ""))
        self.journal.event("stage-finished", stage=stage.name, counts={"running": len(started)}, halted=False)
        return started

    def _slot_of_host(self, task: TaskPlan) -> Slot:
        """The slot a service instance was pinned to when discovery no longer lists it (GPUs changed)."""
        host, _, gpu = (task.pinned_slot or "local:0").rpartition(":")
        return Slot(host=host, gpu=int(gpu) if gpu.isdigit() else 0)

    async def _until_ready(self, stage: StagePlan, attempt: _Attempt) -> None:
        """Wait for the instance's readiness rule, or fail the trial with what is missing and its last lines."""
        role = attempt.task.service
        assert role is not None
        deadline = time.monotonic() + role.ready_timeout
        what = f"service {stage.name} on {attempt.slot.host}"
        while True:
            if attempt.finished.done():
                state = attempt.finished.result()
                raise _TrialFailed(f"{what} exited before it was ready (exit {state.rc}); "
                                   f"last lines: {self._last_lines(attempt)}")
            if await self._is_ready(attempt, role):
                self._journal_ready(stage, attempt)
                return
            if time.monotonic() > deadline:
                rule = (f"a line matching {role.ready_log!r}" if role.ready_log else
                        f"port {role.ready_port} listening" if role.ready_port else
                        f"{shlex.join(role.ready_command or ())} to succeed")
                raise _TrialFailed(f"{what} was not ready after {role.ready_timeout:.0f}s (waiting for {rule}); "
                                   f"last lines: {self._last_lines(attempt)}")
            if self._stopping:
                raise _TrialFailed("stopped while waiting for services")
            with contextlib.suppress(TimeoutError):
                await within(0.25, attempt.ready.wait())

    def _journal_ready(self, stage: StagePlan, attempt: _Attempt) -> None:
        if self.journal is not None:
            self.journal.event("service-ready", attempt.task.id, stage=stage.name, host=attempt.slot.host,
                               captured=attempt.captured)

    async def _is_ready(self, attempt: _Attempt, role: ServiceRole) -> bool:
        if role.ready_log is not None:
            needed = set(role.capture)
            return attempt.ready.is_set() and needed <= set(attempt.captured)
        if role.ready_port is not None:
            port = render(role.ready_port, self._captures())
            script = ("p=$(printf '%04X' " + shlex.quote(port) + "); "
                      "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v p=\":$p\" "
                      "'$2 ~ p\"$\" && $4 == \"0A\" {f=1} END {exit !f}'")
            result = await attempt.transport.run(["sh", "-c", script], timeout=10.0)
            return result.rc == 0
        if role.ready_command is not None:
            result = await attempt.transport.run([render(a, self._captures()) for a in role.ready_command],
                                                 timeout=30.0)
            return result.rc == 0
        return True

    def _publish_captures(self, stage: StagePlan, batch: Sequence[_Attempt]) -> None:
        """First instance that captured a value wins; the swarm's address list is narrowed to one usable peer."""
        for attempt in batch:
            for key, value in attempt.captured.items():
                self._capture_values.setdefault(f"{stage.name}.{key}", value)
        if isinstance(stage.spec, SwarmStage):
            peers = [*str(self._capture_values.get(f"{stage.name}.all_peers", "")).split(),
                     *str(self._capture_values.get(f"{stage.name}.visible_peers", "")).split()]
            self._capture_values[f"{stage.name}.initial_peers"] = choose_initial_peer(peers)
        if self.journal is not None:
            for key, captured in self._capture_values.items():
                if key.startswith(stage.name + "."):
                    self.journal.event("captured", key=key, value=str(captured))

    async def _cluster_checks(self, stage: StagePlan, started: Sequence[_Attempt]) -> None:
        """Stage kinds whose readiness is more than their instances' (a Ray cluster seeing every node and GPU)."""
        spec = stage.spec
        if isinstance(spec, SwarmStage):
            servers = sum(1 for a in started if a.task.service is not None and a.task.service.group == 1)
            self._capture_values[f"{stage.name}.servers"] = servers
        elif isinstance(spec, PipelineStage):
            ordered = sorted(started, key=lambda a: a.task.index)
            urls = [str(a.task.service.info.get("url", "")) for a in ordered if a.task.service is not None]
            self._capture_values[f"{stage.name}.first_url"] = urls[0] if urls else ""
            self._capture_values[f"{stage.name}.urls"] = ",".join(urls)
            self._capture_values[f"{stage.name}.workers"] = len(urls)
        elif isinstance(spec, RayStage):
            await self._wait_ray(stage, spec, started)

    async def _wait_ray(self, stage: StagePlan, spec: RayStage, started: Sequence[_Attempt]) -> None:
        assert self.plan is not None
        head = started[0]
        address = str(self._capture_values.get(f"{stage.name}.address", ""))
        hosts = [a.slot.host for a in started]
        per_host = [spec.gpus_per_host if spec.gpus_per_host is not None
                    else sum(1 for s in self.plan.slots if s.host == h) for h in hosts]
        want_gpus = float(sum(per_host))
        deadline = time.monotonic() + parse_duration(spec.timeout)
        status = ""
        while True:
            result = await head.transport.run([spec.ray, "status", f"--address={address}"], timeout=60.0)
            status = result.stdout
            nodes, gpus = parse_ray_status(status)
            if result.rc == 0 and nodes >= len(hosts) and gpus >= want_gpus:
                break
            if time.monotonic() > deadline:
                raise _TrialFailed(f"ray cluster at {address} shows {nodes}/{len(hosts)} node(s) and "
                                   f"{gpus:g}/{want_gpus:g} GPU(s) after {parse_duration(spec.timeout):.0f}s; "
                                   f"check the workers' logs ({', '.join(hosts[1:]) or 'none'})")
            for a in started:
                if a.finished.done():
                    raise _TrialFailed(f"ray on {a.slot.host} exited while the cluster formed; last lines: "
                                       f"{self._last_lines(a)}")
            await asyncio.sleep(1.0)
        self._capture_values[f"{stage.name}.hosts"] = len(hosts)
        self._capture_values[f"{stage.name}.gpus_per_host"] = per_host[0] if per_host else 0
        self._capture_values[f"{stage.name}.gpus"] = int(want_gpus)
        if self.journal is not None:
            self.journal.event("ray-status", stage=stage.name, status=status[-4000:])

    async def _watch_service(self, attempt: _Attempt) -> None:
        """A service that dies while the trial runs fails the trial: its later stages are stopped."""
        state = await asyncio.shield(attempt.finished)
        if attempt.stopping or self._trial_failure is not None:
            return
        reason = (f"service {attempt.stage.name} on {attempt.slot.host} exited (exit {state.rc}) while the trial "
                  f"ran; last lines: {self._last_lines(attempt)}")
        self._abort_trial(reason)

    def _abort_trial(self, reason: str) -> None:
        """Stop the trial's running tasks (recorded as failed with the reason), and let the trial tear down."""
        self._trial_failure = reason
        for attempt in list(self._running.values()):
            if attempt.task.service is None and not attempt.finished.done():
                attempt.aborted = reason
                asyncio.get_running_loop().create_task(attempt.transport.kill(attempt.handle, self.options.kill_grace))
        self._signal_change()

    async def _teardown(self, services: Sequence[_Attempt]) -> None:
        """Stop services in reverse order (kill the group, then the stop command), then revert shaping."""
        assert self.journal is not None
        pending = list(services) + [a for a in self._pending_teardown if a not in services]
        self._pending_teardown = []
        stopped_hosts: set[tuple[str, tuple[str, ...]]] = set()
        # Those that ended before the teardown died; one stop may end the others (`ray stop` ends all of Ray).
        died = {id(a) for a in pending if a.finished.done() and not a.stopping}
        for attempt in pending:
            attempt.stopping = True
        for attempt in reversed(pending):
            # Kill the group even when its leader already exited (a service that died): its children may live on
            # (hivemind-dht's p2pd); killing an empty group does nothing.
            await attempt.transport.kill(attempt.handle, self.options.kill_grace)
            if not attempt.finished.done():
                with contextlib.suppress(TimeoutError):
                    await within(self.options.kill_grace + 30, asyncio.shield(attempt.finished))
            role = attempt.task.service
            if role is not None and role.stop and (attempt.slot.host, role.stop) not in stopped_hosts:
                stopped_hosts.add((attempt.slot.host, role.stop))
                await attempt.transport.run(list(role.stop), timeout=120.0)
            self._running.pop(attempt.task.id, None)
            if not attempt.log.closed:
                attempt.log.close()
            if id(attempt) in died:  # the console and results show a failed service, not a stopped one
                rc = attempt.finished.result().rc
                reason = f"the service exited ({_exit_reason(rc)}) while its trial ran"
                self.journal.end_attempt(attempt.task.id, attempt.number, "failed", rc, reason)
                self.journal.set_task_state(attempt.task.id, "failed", rc=rc, ended=time.time(), reason=reason)
                continue
            self.journal.end_attempt(attempt.task.id, attempt.number, "stopped", None, "torn down")
            self.journal.set_task_state(attempt.task.id, "stopped", ended=time.time(), reason="torn down")
        if self._shaped:
            from remote.stages import shape  # noqa: PLC0415 (only runs that shape need tc's module)
        for transport, applied in reversed(self._shaped):
            try:
                await shape.revert(transport, applied)
                self._note("info", f"host {applied.host}: shaping on {applied.interface} reverted")
            except (shape.ShapeError, HostError) as exc:
                self._note("error", f"{exc}; the armed revert on the host will undo it at its deadline")
        self._shaped = []

    def _last_lines(self, attempt: _Attempt, n: int = 3) -> str:
        """The last lines of an attempt's log copy, joined for a one-line message."""
        try:
            with open(self.rd.log_path(attempt.task.log_name), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no output)"
        lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
        return " | ".join(lines[-n:]) if lines else "(no output)"

    async def _apply_shape(self, stage: StagePlan) -> None:
        """tc shaping on each host as a transaction (probe, arm a revert, apply, confirm); see remote/stages/shape."""
        from remote.stages import shape  # noqa: PLC0415

        spec = stage.spec
        assert isinstance(spec, ShapeStage) and self.journal is not None
        run_id = self.journal.meta("run_id") or self.rd.path.name
        scope = {**self.loaded.recipe.variables, **stage.trial_values}

        def filled(value: str | int | None) -> str | None:
            return None if value is None else render(str(value), scope)

        limit = filled(spec.limit)
        try:
            request = shape.ShapeRequest(interface=spec.interface, delay=filled(spec.delay), rate=filled(spec.rate),
                                         limit=int(limit) if limit is not None else None,
                                         qdisc=spec.qdisc, revert_after=parse_duration(spec.revert_after))
        except ValueError as exc:
            raise _TrialFailed(f"stage {stage.name}: {exc}; expected a delay like 10ms, a rate like 100mbit and an "
                               "integer limit") from None
        labels = []
        for host in stage.hosts:
            transport = self._transports[host]
            try:
                await shape.probe(transport, host, request, allow_control_interface=spec.allow_control_interface)
                applied = await shape.apply(transport, host, request, run_id=shape_state_id(run_id, host),
                                            allow_control_interface=spec.allow_control_interface)
                self._shaped.append((transport, applied))
                await shape.confirm(transport, applied)
            except (shape.ShapeError, HostError) as exc:
                raise _TrialFailed(str(exc)) from None
            labels.append(applied.description)
            self.journal.event("shaped", host=host, interface=spec.interface, qdisc=applied.description)
        self._capture_values[f"{stage.name}.label"] = labels[0] if labels else ""
        self._note("info", f"stage {stage.name}: {', '.join(sorted(set(labels)))} on {', '.join(stage.hosts)}")

    async def _fetch(self, stage: StagePlan) -> None:
        """Copy files from the hosts into fetched/<trial>/<host>/ and extract the metrics that name this stage."""
        spec = stage.spec
        assert isinstance(spec, FetchStage) and self.journal is not None and self.plan is not None
        folder = self.rd.path / "fetched" / (safe_name(stage.trial) or "_")
        for task in stage.tasks:
            host = (task.pinned_slot or "").rsplit(":", 1)[0]
            transport = self._transports[host]
            slot = next((s for s in self.plan.slots if s.key == task.pinned_slot), Slot(host=host, gpu=0))
            values = {**runtime_values(slot, attempt=1, task_id=task.id, run_dir=self.rd.path.resolve(),
                                       python=self._python_for(host)),
                      **self.loaded.recipe.variables, **stage.trial_values, **self._captures(),
                      "recipe_dir": str(self.plan.recipe_dir)}
            workdir = self.plan.hosts[host].workdir or transport.default_workdir()
            extractor = TaskExtractor(self._metrics, stage.name, done=None, progress=None)
            fetched: dict[str, bytes] = {}
            for template in spec.files:
                path = render(template, values)
                data = await transport.read_file(path, workdir, RESULT_FILE_LIMIT)
                if data is None:
                    if spec.required:
                        raise _TrialFailed(f"host {host}: stage {stage.name}: {path} does not exist (in {workdir}); "
                                           "check that the previous stage wrote it")
                    self._note("warning", f"host {host}: {path} does not exist; skipped")
                    continue
                target = folder / host / Path(path).name
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                write_private(target, data)
                fetched[path] = data
            for path_template, _what in extractor.file_metrics():
                path = render(path_template, values)
                data = fetched.get(path)
                if data is None:
                    data = await transport.read_file(path, workdir, RESULT_FILE_LIMIT)
                if data is not None:
                    extractor.feed_file(path_template, data)
            final = extractor.finish({**values, **task.values})
            with self.journal.transaction():
                self.journal.set_metrics(task.id, final)
                self.journal.set_task_state(task.id, "done", host=host, gpu=slot.gpu, started=time.time(),
                                            ended=time.time(), reason=f"fetched {len(fetched)} file(s)")
            self.journal.event("fetched", task.id, host=host, files=sorted(fetched))
        self._write_results(force=True)

    # -- stages -------------------------------------------------------------------------------------------------

    async def _run_stage(self, stage: StagePlan) -> bool:
        """Run one stage to completion; True when some task failed."""
        assert self.journal is not None
        rows = {r.id: r for r in self.journal.tasks(stage.name)}
        adopted = {tid: a for tid, a in self._adopted.items() if a.stage is stage}
        pending: list[TaskPlan] = []
        done_before = 0
        for task in stage.tasks:
            row = rows.get(task.id)
            if task.id in adopted:
                continue
            if row is not None and row.state == "done":
                done_before += 1
                continue
            if row is not None and row.state == "failed" and not self.options.retry_failed:
                continue
            pending.append(task)
        spec = stage.spec
        retries = getattr(spec, "retries", 0)
        halt_after = halt_threshold(spec.halt) if isinstance(spec, QueueStage) else 1
        queues = self._queues = SlotQueues([s.key for s in stage.slots], pending, retries=retries,
                                           halt_after=halt_after)
        self._stage = stage
        for key in self._paused_slots:
            queues.pause(key)
        for task in pending:
            row = rows.get(task.id)
            if row is not None:
                queues.set_attempts(task.id, self._counted_attempts(task.id))
                if row.state == "failed":
                    self.journal.set_task_state(task.id, "queued")
        for tid in adopted:
            queues.set_attempts(tid, self._counted_attempts(tid))
        self.journal.event("stage-started", stage=stage.name, pending=len(pending), adopted=len(adopted))
        self._emit(StageStarted(stage=stage.name, kind=stage.kind, total=len(stage.tasks), already_done=done_before))
        if not stage.slots:
            raise EngineError(f"stage {stage.name}: no GPU slots on its hosts; declare gpus = N on them")
        workers = [asyncio.create_task(self._slot_worker(stage, slot, queues), name=f"slot-{slot.key}")
                   for slot in stage.slots]
        # Adopted attempts whose slot is not in this stage (the inventory changed) are still seen through.
        orphans = [asyncio.create_task(self._finish_adopted(a, queues)) for a in adopted.values()
                   if a.slot.key not in {s.key for s in stage.slots}]
        await asyncio.gather(*workers, *orphans)
        self._stage = None
        halted = queues.halted
        if halted:
            self._halted = True
            left = queues.drain()
            if left:
                rule = spec.halt if isinstance(spec, QueueStage) else "first-failure"
                self._note("warning", f"stage {stage.name}: halted by its halt rule ({rule}); "
                                      f"{len(left)} task(s) were not started")
        counts = self.journal.counts(stage.name)
        self.journal.event("stage-finished", stage=stage.name, counts=counts, halted=halted)
        self._emit(StageFinished(stage=stage.name, counts=counts, halted=halted))
        self._write_results(force=True)
        return counts.get("failed", 0) > 0

    def _counted_attempts(self, task_id: str) -> int:
        """Attempts that count against `retries`: interrupted ones (Ctrl-C, engine stop) do not."""
        assert self.journal is not None
        return sum(1 for a in self.journal.attempts(task_id) if a.state in ("done", "failed", "lost", "timeout"))

    async def _slot_worker(self, stage: StagePlan, slot: Slot, queues: SlotQueues) -> None:
        """One slot's FIFO: run its tasks one at a time; a failure never stops the queue."""
        adopted = [a for a in self._adopted.values() if a.stage is stage and a.slot.key == slot.key]
        for attempt in adopted:
            await self._finish_adopted(attempt, queues)
        while not self._stopping and self._trial_failure is None:
            task = queues.next_for(slot.key)
            if task is None:
                if self._stage_idle(stage, queues):
                    return
                await self._wait_change()  # paused, or waiting for retries other slots may produce
                continue
            # Busy from the moment the task leaves its queue: while it launches it is neither waiting nor running,
            # and a worker looking then must not conclude the stage is over.
            self._busy.add(slot.key)
            try:
                await self._run_one(stage, task, slot, queues)
            finally:
                self._busy.discard(slot.key)
                self._signal_change()

    async def _run_one(self, stage: StagePlan, task: TaskPlan, slot: Slot, queues: SlotQueues) -> None:
        queues.started(task)
        assert self.journal is not None
        number = self.journal.next_attempt(task.id)
        try:
            launched = await self._launch(stage, task, slot, number)
        except HostError as exc:
            self._note("error", str(exc))
            self.journal.end_attempt(task.id, number, "failed", None, str(exc))
            outcome = queues.finished(task, ok=False)
            self.journal.set_task_state(task.id, outcome.state, reason=str(exc), ended=time.time())
            self._emit(TaskExited(task_id=task.id, stage=task.stage, label=task.label, slot=slot.key,
                                  attempt=number, rc=None, state=outcome.state, reason=str(exc), duration=0.0))
            return
        if launched is None:
            return  # stopping while the host was unreachable; the journal knows the launch may be pending
        await self._await_attempt(launched, queues)

    def _stage_idle(self, stage: StagePlan, queues: SlotQueues) -> bool:
        """Nothing left to start (or halted), no slot busy with one of its tasks: its workers may finish."""
        running = any(a.stage is stage for a in (*self._running.values(), *self._adopted.values()))
        return not running and not self._busy and (queues.halted or not queues.pending())

    def _signal_change(self) -> None:
        """Wake slot workers waiting for work (a task ended, a retry was queued, a slot resumed, a stop)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self) -> None:
        with contextlib.suppress(TimeoutError):
            await within(1.0, self._changed.wait())

    async def _finish_adopted(self, attempt: _Attempt, queues: SlotQueues) -> None:
        self._running[attempt.task.id] = attempt
        self._adopted.pop(attempt.task.id, None)
        await self._await_attempt(attempt, queues)

    # -- one attempt --------------------------------------------------------------------------------------------

    async def _launch(self, stage: StagePlan, task: TaskPlan, slot: Slot, number: int) -> _Attempt | None:
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

    async def _through_ray(self, stage: StagePlan, spec: QueueStage, slot: Slot, argv: list[str],
                           env: Mapping[str, str]) -> list[str]:
        """Wrap a task's argv so it runs as a Ray task on the cluster of an earlier ray stage (see ray_task.py)."""
        assert self.plan is not None
        position = next(i for i, s in enumerate(self.loaded.recipe.stage) if s is spec)
        names = [stage_name(s) for s in self.loaded.recipe.stage]
        cluster, _ = ray_cluster_of(spec, self.loaded.recipe.stage[:position], names[:position])
        address = self._capture_values.get(f"{cluster}.address")
        if address is None:
            raise HostError(f"stage {stage.name}: the ray cluster of stage {cluster} is not running in this trial")
        script = self._ray_scripts.get(slot.host)
        if script is None:
            text = (Path(__file__).parent / "ray_task.py").read_text()
            script = self._ray_scripts[slot.host] = await self._transports[slot.host].put_file("bf-ray-task.py", text)
        python = self._python_for(slot.host)
        keys = ",".join(sorted({*env, *self._secrets(), "BENCHFLEET_TASK_ID", "BENCHFLEET_ATTEMPT"}))
        return [python, script, "--address", str(address), "--num-gpus", f"{spec.gpus_per_task:g}", "--env-keys",
                keys, "--", *argv]

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
                      transport: Transport, *, resume_offset: int | None) -> _Attempt:
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
            attempt = _Attempt(task=task, stage=stage, slot=slot, number=number, handle=handle,
                               transport=transport, log=log, extractor=extractor)
            return attempt
        # Reattach: the copy may hold bytes past the committed offset (crash between write and commit): cut them.
        with open(path, "ab") as f:
            size = f.tell()
            if size > resume_offset:
                f.truncate(resume_offset)
        offset = min(size, resume_offset)
        log = open(path, "ab")  # noqa: SIM115
        attempt = _Attempt(task=task, stage=stage, slot=slot, number=number, handle=handle, transport=transport,
                           log=log, extractor=extractor, offset=offset)
        with open(path, "rb") as f:
            attempt.extractor.feed_lines(attempt.splitter.feed(f.read(offset)))
        return attempt

    async def _await_attempt(self, attempt: _Attempt, queues: SlotQueues) -> None:
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

    async def _finalize(self, attempt: _Attempt, proc: ProcState, queues: SlotQueues) -> None:
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
            ok, reason, attempt_state = False, _exit_reason(rc), "failed"
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

    async def _pump(self, attempt: _Attempt, size: int) -> None:
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

    def _take_lines(self, attempt: _Attempt, lines: Sequence[str]) -> None:
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


def choose_initial_peer(addresses: Sequence[str]) -> str:
    """hivemind-dht lists one multiaddr per interface: prefer one other hosts can reach (not loopback)."""
    for addr in addresses:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            try:
                if not ipaddress.ip_address(parts[2]).is_loopback:
                    return addr
            except ValueError:
                continue
    return addresses[0] if addresses else ""


_RAY_RESOURCE = re.compile(r"^\s*([\d.]+)/([\d.]+)\s+GPU\b", re.MULTILINE)
_RAY_NODE = re.compile(r"^\s*\d+\s+node_[0-9a-f]+", re.MULTILINE)


def parse_ray_status(text: str) -> tuple[int, float]:
    """(active nodes, total GPUs) from `ray status`: nodes under "Active:" (older Ray: "Healthy:"), and the
    resource line " 0.0/32.0 GPU"."""
    section = re.search(r"^(?:Active|Healthy):\s*$(.*?)^(?:Pending|Idle|Recent failures|Resources)", text,
                        re.MULTILINE | re.DOTALL)
    nodes = len(_RAY_NODE.findall(section.group(1))) if section else 0
    gpu = _RAY_RESOURCE.search(text)
    return nodes, float(gpu.group(2)) if gpu else 0.0


def shape_state_id(run_id: str, host: str) -> str:
    """Per host: hosts may share a home directory (NFS, the testbed), and each host's shaping state is its own."""
    return f"{run_id}.{host}"


def _try_render(text: str, values: Mapping[str, object]) -> str:
    """Render what can be rendered now; placeholders filled later (captures) stay as they are."""
    try:
        return render(text, values)
    except ValueError:
        return text


def _exit_reason(rc: int | None) -> str:
    if rc is None:
        return "no exit code"
    if rc == 127:
        return "exit 127: program not found (check the command and PATH on the host)"
    if rc == 126:
        return "exit 126: working directory missing or program not executable"
    if rc > 128:
        try:
            name = signal.Signals(rc - 128).name
        except ValueError:
            name = f"signal {rc - 128}"
        return f"exit {rc}: killed by {name}"
    return f"exit {rc}"
