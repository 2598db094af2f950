"""Plan a DeServe-style pipeline: the model slice each GPU slot serves, its port, and the ring of URLs.

Slice convention, as `deserve_worker.worker_api` reads `--layer-begin`/`--layer-end`: the model is the
embedding, transformer layers 0..L-1, then the head (final norm and output projection). `begin` is inclusive
and `end` exclusive; a number n names transformer layer n, `emb` (only as a begin) the embedding and `output`
(only as an end) "through the head". So for L = 80 and two workers the slices are `emb`..`40` (embedding +
layers 0-39) and `40`..`output` (layers 40-79 + head), the seed's example. Planning counts L + 2 units
(embedding, each layer, head), so at most L + 2 workers: the first may hold only the embedding (`emb`..`0`),
the last only the head (`L`..`output`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise

from remote.slots import Slot

EMB = "emb"
OUTPUT = "output"
MAX_PORT = 65535


class PipelineError(ValueError):
    """A pipeline that cannot be planned; the one-line message says which setting to change."""


@dataclass(frozen=True)
class WorkerPlan:
    """One pipeline worker: its slot, model slice, listening port and URLs (its own and the next worker's)."""

    rank: int
    slot: Slot
    layer_begin: str
    layer_end: str
    port: int
    url: str
    next_url: str
    num_rounds: int
    """Workers in the pipeline (upstream's `--num-rounds`)."""

    def values(self) -> dict[str, object]:
        """Placeholder values for rendering this worker's command template."""
        return {
            "rank": self.rank,
            "layer_begin": self.layer_begin,
            "layer_end": self.layer_end,
            "port": self.port,
            "url": self.url,
            "next_url": self.next_url,
            "num_rounds": self.num_rounds,
            "gpu": self.slot.gpu,
            "host": self.slot.host,
        }


def unit_index(name: str, num_layers: int) -> int:
    """Position of a slice bound in unit space: `emb` 0, layer n at n + 1, `output` L + 2 (past the head)."""
    if name == EMB:
        return 0
    if name == OUTPUT:
        return num_layers + 2
    if name.isdigit() and int(name) <= num_layers:
        return int(name) + 1
    raise PipelineError(
        f"pipeline: layer bound {name!r} is not emb, output or a layer number 0..{num_layers}"
    )


def _bound_name(unit: int, num_layers: int) -> str:
    """The worker flag value for a boundary in unit space (inverse of `unit_index`)."""
    if unit == 0:
        return EMB
    if unit == num_layers + 2:
        return OUTPUT
    return str(unit - 1)


def _ends_first(workers: int) -> list[int]:
    """Worker indices from the outside in (0, N-1, 1, N-2, ...): who gets a leftover unit first.

    The end workers also carry the embedding and the head, so giving them the spare units reproduces
    upstream's own example split (emb..10, 10..20, ..., 70..output for 80 layers over 8 workers).
    """
    order: list[int] = []
    lo, hi = 0, workers - 1
    while lo <= hi:
        order.append(lo)
        if hi != lo:
            order.append(hi)
        lo, hi = lo + 1, hi - 1
    return order


def _unit_counts(units: int, weights: Sequence[Fraction]) -> list[int]:
    """Units per worker proportional to weights (largest remainder), each at least one, summing to `units`."""
    total = sum(weights)
    quotas = [units * w / total for w in weights]
    counts = [max(1, math.floor(q)) for q in quotas]
    priority = {worker: i for i, worker in enumerate(_ends_first(len(weights)))}
    # Largest fractional remainder first; ties (always, without weights) go to the end workers.
    by_remainder = sorted(range(len(weights)),
                          key=lambda i: (-(quotas[i] - math.floor(quotas[i])), priority[i]))
    i = 0
    while sum(counts) < units:
        counts[by_remainder[i % len(by_remainder)]] += 1
        i += 1
    while sum(counts) > units:  # minimum-one bumps overshot: take back from the most over-served worker
        worst = max((j for j in range(len(counts)) if counts[j] > 1),
                    key=lambda j: (counts[j] - quotas[j], -j))
        counts[worst] -= 1
    return counts


def split_layers(
    num_layers: int, workers: int, *, weights: Sequence[float] | None = None
) -> list[tuple[str, str]]:
    """Contiguous (layer_begin, layer_end) flag pairs covering embedding, all layers and head, one per worker.

    Without weights the slices' unit counts differ by at most one; with weights (say, relative GPU speed or
    memory) they are proportional to them.
    """
    if num_layers < 1:
        raise PipelineError(f"pipeline: num_layers must be at least 1 (got {num_layers})")
    if workers < 1:
        raise PipelineError(f"pipeline: workers must be at least 1 (got {workers})")
    units = num_layers + 2
    if workers > units:
        raise PipelineError(
            f"pipeline: {workers} workers cannot split {num_layers} layers; at most {units} "
            "(one each for the embedding, every layer and the output head)"
        )
    if weights is None:
        fractions = [Fraction(1)] * workers
    else:
        if len(weights) != workers:
            raise PipelineError(
                f"pipeline: {len(weights)} weights given for {workers} workers; give one per worker"
            )
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise PipelineError(f"pipeline: weights must be positive numbers (got {list(weights)})")
        fractions = [Fraction(w) for w in weights]
    bounds = [0]
    for count in _unit_counts(units, fractions):
        bounds.append(bounds[-1] + count)
    return [(_bound_name(a, num_layers), _bound_name(b, num_layers)) for a, b in pairwise(bounds)]


def plan_pipeline(
    slots: Sequence[Slot],
    *,
    num_layers: int,
    workers: int | None = None,
    base_port: int = 8080,
    host_addresses: Mapping[str, str],
    scheme: str = "http",
    weights: Sequence[float] | None = None,
) -> list[WorkerPlan]:
    """One worker per slot, in slot order, on the first `workers` slots; the last one's next URL is the first.

    Ports count up from `base_port` per host, so workers sharing a host never collide; `host_addresses` maps
    each slot's host to the address the other workers reach it at.
    """
    count = len(slots) if workers is None else workers
    if count < 1:
        raise PipelineError(f"pipeline: workers must be at least 1 (got {count})")
    if count > len(slots):
        raise PipelineError(
            f"pipeline: {count} workers need {count} GPU slots but only {len(slots)} are available; "
            "lower workers or add GPUs"
        )
    slices = split_layers(num_layers, count, weights=weights)
    used = slots[:count]
    per_host: dict[str, int] = {}
    ports: list[int] = []
    urls: list[str] = []
    for slot in used:
        address = host_addresses.get(slot.host)
        if not address:
            raise PipelineError(
                f"pipeline: no address for host {slot.host}; give one the other workers can reach"
            )
        port = base_port + per_host.get(slot.host, 0)
        per_host[slot.host] = per_host.get(slot.host, 0) + 1
        if not 1 <= port <= MAX_PORT:
            raise PipelineError(
                f"pipeline: port {port} for host {slot.host} is out of range; lower base_port"
            )
        host = f"[{address}]" if ":" in address else address  # IPv6 literals need brackets in a URL
        ports.append(port)
        urls.append(f"{scheme}://{host}:{port}")
    return [
        WorkerPlan(rank=i, slot=slot, layer_begin=begin, layer_end=end, port=ports[i], url=urls[i],
                   next_url=urls[(i + 1) % count], num_rounds=count)
        for i, (slot, (begin, end)) in enumerate(zip(used, slices, strict=True))
    ]
