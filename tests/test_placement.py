"""Placement policies, and md5 placement checked against the seed's own bash pipeline."""

from __future__ import annotations

import subprocess

from hypothesis import given
from hypothesis import strategies as st

from remote.placement import assign, md5_slot_index
from remote.scheduler import SlotQueues
from tests.test_scheduler import make_tasks


def test_md5_matches_run_bash_for_the_whole_seed_grid() -> None:
    """For every (beam_length, beam_width) of run.bash, our slot equals the bash pipeline's gpu_id over 8 GPUs."""
    script = (
        'for beam_length in $(seq 2 16); do for beam_width in $(seq 1 48); do '
        'hash=$(echo "$beam_length-$beam_width" | md5sum | cut -c 1-8); '
        'echo "$beam_length $beam_width $((16#$hash % 8))"; done; done'
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 15 * 48
    for length, width, gpu in rows:
        assert md5_slot_index(f"{length}-{width}", 8) == int(gpu), (length, width)


@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=30), st.integers(1, 16))
def test_policies_place_every_task_on_an_existing_slot(keys: list[str], n: int) -> None:
    for policy in ("md5", "round-robin"):
        pins = assign(policy, keys, n)
        assert all(p is not None and 0 <= p < n for p in pins)
    assert assign("free-slot", keys, n) == [None] * len(keys)
    assert assign("round-robin", keys, n) == [i % n for i in range(len(keys))]


def test_free_slot_tasks_go_to_whichever_slot_asks_first() -> None:
    tasks = make_tasks(5)
    q = SlotQueues(["h:0", "h:1"], tasks, retries=0, halt_after=None)
    order = [q.next_for(s) for s in ("h:1", "h:1", "h:0", "h:1", "h:0", "h:0")]
    assert [t.id if t else None for t in order] == ["t0", "t1", "t2", "t3", "t4", None]
