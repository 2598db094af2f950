"""The scheduler: one FIFO queue per GPU slot, fed by a placement policy, with retries and halt rules.

Pure bookkeeping, no I/O: the engine asks `next_for(slot)` whenever a slot is free and reports each attempt's outcome
with `finished(...)`. Tasks pinned to a slot (md5, round-robin, run stages) wait in that slot's FIFO; unpinned tasks
(free-slot) wait in one shared FIFO that every slot pulls from, which is exactly "whichever slot frees first".
A failed task never blocks its queue: it is retried at the back of its queue, or given up, and the queue moves on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from remote.plan import TaskPlan


@dataclass(frozen=True)
class Outcome:
    """What the engine should record for a finished attempt."""

    state: str
    """done, failed (no attempts left), or queued (it will be retried)."""
    halted_now: bool
    """This failure crossed the halt threshold: no new task will be dispatched."""


class SlotQueues:
    """Per-slot FIFOs for one stage."""

    def __init__(self, slot_keys: Sequence[str], tasks: Iterable[TaskPlan], *, retries: int,
                 halt_after: int | None) -> None:
        self._slots = list(slot_keys)
        self._pinned: dict[str, deque[TaskPlan]] = {k: deque() for k in self._slots}
        self._shared: deque[TaskPlan] = deque()
        self._retries = retries
        self._halt_after = halt_after
        self._attempts: dict[str, int] = {}
        self.failures = 0
        self.halted = False
        self._paused: set[str] = set()
        for task in tasks:
            self._enqueue(task)

    def _enqueue(self, task: TaskPlan) -> None:
        if task.pinned_slot is not None and task.pinned_slot in self._pinned:
            self._pinned[task.pinned_slot].append(task)
        else:
            self._shared.append(task)

    def set_attempts(self, task_id: str, attempts: int) -> None:
        """Attempts already used by a task (after a resume), so retries are counted across engine restarts."""
        self._attempts[task_id] = attempts

    def attempts(self, task_id: str) -> int:
        return self._attempts.get(task_id, 0)

    def next_for(self, slot: str) -> TaskPlan | None:
        """The next task for a free slot: its own FIFO first, then the shared one; None when nothing is left."""
        if self.halted or slot in self._paused:
            return None
        own = self._pinned.get(slot)
        if own:
            return own.popleft()
        if self._shared:
            return self._shared.popleft()
        return None

    def started(self, task: TaskPlan) -> int:
        """Count an attempt; returns its number (1-based)."""
        n = self._attempts.get(task.id, 0) + 1
        self._attempts[task.id] = n
        return n

    def finished(self, task: TaskPlan, ok: bool, *, retry_allowed: bool = True) -> Outcome:
        """Record an attempt's outcome; a retryable failure goes to the back of the task's queue."""
        if ok:
            return Outcome(state="done", halted_now=False)
        if retry_allowed and self._attempts.get(task.id, 0) <= self._retries and not self.halted:
            self._enqueue(task)
            return Outcome(state="queued", halted_now=False)
        self.failures += 1
        halted_now = False
        if self._halt_after is not None and self.failures >= self._halt_after and not self.halted:
            self.halted = True
            halted_now = True
        return Outcome(state="failed", halted_now=halted_now)

    def add(self, task: TaskPlan) -> None:
        """Queue a task again (a retry someone asked for); it gets a fresh retry budget."""
        self._attempts[task.id] = 0
        self._enqueue(task)

    def remove(self, task_id: str) -> TaskPlan | None:
        """Take a waiting task out of its queue (cancelled); None when it is not waiting."""
        for q in (self._shared, *self._pinned.values()):
            for task in q:
                if task.id == task_id:
                    q.remove(task)
                    return task
        return None

    def unhalt(self) -> None:
        """Forget the failures that triggered the halt rule (a person asked to retry them)."""
        self.halted = False
        self.failures = 0

    def pause(self, slot: str) -> None:
        self._paused.add(slot)

    def resume(self, slot: str) -> None:
        self._paused.discard(slot)

    def paused(self) -> list[str]:
        return sorted(self._paused)

    def depth(self, slot: str) -> int:
        """Tasks waiting in the slot's own FIFO (shared tasks are counted by `shared_depth`)."""
        return len(self._pinned.get(slot, ()))

    @property
    def shared_depth(self) -> int:
        return len(self._shared)

    def pending(self) -> list[TaskPlan]:
        """Every task still waiting, in queue order."""
        out = list(self._shared)
        for q in self._pinned.values():
            out.extend(q)
        return out

    def drain(self) -> list[TaskPlan]:
        """Remove and return every waiting task (halt or stop)."""
        out = self.pending()
        self._shared.clear()
        for q in self._pinned.values():
            q.clear()
        return out
