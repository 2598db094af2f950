"""Placement policies: which GPU slot's FIFO a task joins.

`free-slot` leaves tasks in one shared queue that every slot pulls from when it frees up (best makespan).
`md5` reproduces ReDrafter's run.bash exactly: `echo "$key" | md5sum | cut -c 1-8`, as hex, modulo the slot count
(note the newline `echo` adds). `round-robin` deals tasks to slots in dispatch order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def md5_slot_index(key: str, slot_count: int) -> int:
    """Slot index for `key` under the seed's rule (md5 of key + newline, first 8 hex digits, mod N)."""
    digest = hashlib.md5((key + "\n").encode()).hexdigest()
    return int(digest[:8], 16) % slot_count


def assign(policy: str, keys: Sequence[str], slot_count: int) -> list[int | None]:
    """Pinned slot index per task (in dispatch order), or None for every task under `free-slot`."""
    if slot_count <= 0:
        raise ValueError("placement needs at least one slot")
    if policy == "free-slot":
        return [None] * len(keys)
    if policy == "md5":
        return [md5_slot_index(k, slot_count) for k in keys]
    if policy == "round-robin":
        return [i % slot_count for i in range(len(keys))]
    raise ValueError(f"unknown placement policy {policy!r}")
