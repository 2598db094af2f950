"""The scheduler's bookkeeping: FIFO per slot, retries at the back of the queue, halt thresholds, pause."""

from __future__ import annotations

from remote.plan import TaskPlan
from remote.scheduler import SlotQueues


def make_tasks(n: int, pins: list[str | None] | None = None) -> list[TaskPlan]:
    pins = pins or [None] * n
    return [TaskPlan(id=f"t{i}", stage="s", index=i, label=f"i={i}", log_name=f"s-{i}", values={"i": i},
                     argv=("true",), env={}, workdir=None, cost=1.0, pinned_slot=pins[i]) for i in range(n)]


def test_pinned_tasks_wait_for_their_own_slot() -> None:
    tasks = make_tasks(4, ["h:0", "h:1", "h:0", "h:1"])
    q = SlotQueues(["h:0", "h:1"], tasks, retries=0, halt_after=None)
    assert q.depth("h:0") == 2 and q.depth("h:1") == 2
    first, second = q.next_for("h:0"), q.next_for("h:0")
    assert first is not None and second is not None
    assert [first.id, second.id] == ["t0", "t2"]
    assert q.next_for("h:0") is None
    t1 = q.next_for("h:1")
    assert t1 is not None and t1.id == "t1"


def test_failed_task_is_retried_at_the_back_and_the_queue_moves_on() -> None:
    tasks = make_tasks(3, ["h:0"] * 3)
    q = SlotQueues(["h:0"], tasks, retries=1, halt_after=None)
    t0 = q.next_for("h:0")
    assert t0 is not None
    q.started(t0)
    assert q.finished(t0, ok=False).state == "queued"
    ids = []
    while (t := q.next_for("h:0")) is not None:
        ids.append(t.id)
        q.started(t)
        q.finished(t, ok=t.id != "t0")
    assert ids == ["t1", "t2", "t0"]
    assert q.failures == 1


def test_halt_threshold_counts_final_failures_only() -> None:
    tasks = make_tasks(5)
    q = SlotQueues(["h:0"], tasks, retries=1, halt_after=2)
    seen = []
    while (t := q.next_for("h:0")) is not None:
        seen.append(t.id)
        q.started(t)
        q.finished(t, ok=False)
    # First attempts all fail and go to the back; t0's and t1's second failures are final -> halted at 2.
    assert seen == ["t0", "t1", "t2", "t3", "t4", "t0", "t1"]
    assert q.halted and q.failures == 2
    assert q.next_for("h:0") is None


def test_pause_holds_a_slot_without_losing_tasks() -> None:
    q = SlotQueues(["h:0", "h:1"], make_tasks(2), retries=0, halt_after=None)
    q.pause("h:0")
    assert q.next_for("h:0") is None
    q.resume("h:0")
    t = q.next_for("h:0")
    assert t is not None and t.id == "t0"
