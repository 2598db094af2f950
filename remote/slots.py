"""GPU slots: one per GPU of each host, declared in the recipe or discovered with nvidia-smi."""

from __future__ import annotations

from dataclasses import dataclass

NVIDIA_SMI_QUERY = ("nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader")
"""The one query used for discovery; its CSV is stable across driver versions."""


class SlotError(Exception):
    """A host's GPUs could not be determined; the message names the host and what to do."""


@dataclass(frozen=True)
class Slot:
    """One GPU of one host: the unit a queue stage schedules on."""

    host: str
    gpu: int
    name: str = ""
    """GPU model as nvidia-smi reports it; empty when declared by count."""
    memory_mib: int | None = None

    @property
    def key(self) -> str:
        """Stable identifier used in the journal, events and logs."""
        return f"{self.host}:{self.gpu}"


def parse_nvidia_smi(host: str, text: str) -> list[Slot]:
    """Slots from `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader` output."""
    slots: list[Slot] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0].isdigit():
            raise SlotError(
                f"host {host}: unexpected nvidia-smi output {line!r}; "
                'expected "index, name, memory MiB" lines (or declare gpus = N in the recipe)'
            )
        memory = parts[-1].removesuffix("MiB").strip()
        slots.append(
            Slot(host=host, gpu=int(parts[0]), name=", ".join(parts[1:-1]),
                 memory_mib=int(memory) if memory.isdigit() else None)
        )
    if not slots:
        raise SlotError(f"host {host}: nvidia-smi reports no GPUs; check the driver or declare gpus = N")
    return slots


def declared_slots(host: str, gpus: int | list[int]) -> list[Slot]:
    """Slots for `gpus = N` (0..N-1) or `gpus = [i, j, ...]`."""
    indices = range(gpus) if isinstance(gpus, int) else gpus
    return [Slot(host=host, gpu=i) for i in indices]
