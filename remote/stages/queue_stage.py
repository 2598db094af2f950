"""Queue and run stages: a grid of tasks over GPU slots, one FIFO per slot (a run stage is one task per host).

The order and placement of tasks is the scheduler's (remote/scheduler.py); this is the loop around it: one worker
per slot takes its next task, launches it through the engine, and waits for it, while adopted attempts of a resumed
run are seen through first. A failed task never stops its slot's queue; the stage's halt rule may stop them all.
"""

from __future__ import annotations

import asyncio
import time

from remote.attempt import Attempt
from remote.events import StageFinished, StageStarted, TaskExited
from remote.plan import StagePlan, TaskPlan
from remote.recipe import QueueStage, halt_threshold
from remote.scheduler import SlotQueues
from remote.slots import Slot
from remote.stages.context import EngineParts
from remote.transport.base import HostError


class QueueStages:
    """The engine's queue and run stages (a mixin of Engine)."""

    # Engine state these methods set (declared for mypy; the engine initialises it).
    _queues: SlotQueues | None
    _stage: StagePlan | None
    _halted: bool

    async def _run_stage(self: EngineParts, stage: StagePlan) -> bool:
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

    def _counted_attempts(self: EngineParts, task_id: str) -> int:
        """Attempts that count against `retries`: interrupted ones (Ctrl-C, engine stop) do not."""
        assert self.journal is not None
        return sum(1 for a in self.journal.attempts(task_id) if a.state in ("done", "failed", "lost", "timeout"))

    async def _slot_worker(self: EngineParts, stage: StagePlan, slot: Slot, queues: SlotQueues) -> None:
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

    async def _run_one(self: EngineParts, stage: StagePlan, task: TaskPlan, slot: Slot, queues: SlotQueues) -> None:
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

    def _stage_idle(self: EngineParts, stage: StagePlan, queues: SlotQueues) -> bool:
        """Nothing left to start (or halted), no slot busy with one of its tasks: its workers may finish."""
        running = any(a.stage is stage for a in (*self._running.values(), *self._adopted.values()))
        return not running and not self._busy and (queues.halted or not queues.pending())

    async def _finish_adopted(self: EngineParts, attempt: Attempt, queues: SlotQueues) -> None:
        self._running[attempt.task.id] = attempt
        self._adopted.pop(attempt.task.id, None)
        await self._await_attempt(attempt, queues)
