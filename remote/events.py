"""Plain dataclass events the engine emits; front ends (headless printer, Textual console) subscribe to them.

Past-tense names: each event reports something that already happened and is already in the journal, so a viewer
that misses events can always rebuild its state from the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RunStarted:
    """The engine opened its run directory and knows the plan."""

    run_dir: Path
    recipe: str
    resumed: bool
    slots: tuple[str, ...]
    """Slot keys ("host:gpu") in display order."""


@dataclass(frozen=True)
class StageStarted:
    """A stage began; `total` tasks belong to it, `already_done` of them finished in an earlier run."""

    stage: str
    kind: str
    total: int
    already_done: int


@dataclass(frozen=True)
class TaskStarted:
    """An attempt of a task was launched (or adopted after a restart) on a slot."""

    task_id: str
    stage: str
    label: str
    slot: str
    attempt: int
    adopted: bool = False


@dataclass(frozen=True)
class LinesReceived:
    """New complete output lines of a running task, batched."""

    task_id: str
    slot: str
    lines: tuple[str, ...]


@dataclass(frozen=True)
class TaskProgressed:
    """A task printed a progress count (tqdm's k/N)."""

    task_id: str
    slot: str
    done: int
    total: int


@dataclass(frozen=True)
class TaskExited:
    """An attempt ended. `state` is the task's new state: done, failed, or queued (a retry is coming)."""

    task_id: str
    stage: str
    label: str
    slot: str
    attempt: int
    rc: int | None
    state: str
    reason: str
    duration: float
    metrics: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class StageFinished:
    """A stage ended; counts by final task state."""

    stage: str
    counts: dict[str, int]
    halted: bool


@dataclass(frozen=True)
class ResultsWritten:
    """results.csv / results.json were rewritten."""

    csv: Path
    json: Path
    rows: int


@dataclass(frozen=True)
class EngineNote:
    """Something a person should read: a warning, a retry, a halt, an interruption."""

    level: str
    text: str


@dataclass(frozen=True)
class RunFinished:
    """The engine stopped: every stage ran, a halt rule fired, or it was interrupted."""

    counts: dict[str, int]
    interrupted: bool
    halted: bool
    results_csv: Path | None


Event = (
    RunStarted
    | StageStarted
    | TaskStarted
    | LinesReceived
    | TaskProgressed
    | TaskExited
    | StageFinished
    | ResultsWritten
    | EngineNote
    | RunFinished
)
