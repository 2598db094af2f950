"""The headless printer: progress for `benchfleet --recipe`, on a terminal or into a log file.

On a terminal it redraws a small block (overall bar and one bar per GPU slot, with queued/running/done/failed counts
and an ETA) twice a second; otherwise it prints one plain progress line every few seconds, which reads well in
`engine.log`, CI logs and `nohup.out`. Warnings, failures and retries are printed as lines in both modes.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from console.rundata import format_duration
from remote.events import (
    EngineNote,
    Event,
    RunFinished,
    RunStarted,
    StageFinished,
    StageStarted,
    TaskExited,
    TaskProgressed,
    TaskStarted,
)


@dataclass
class _SlotView:
    done: int = 0
    failed: int = 0
    task: str | None = None
    progress: tuple[int, int] | None = None
    started: float | None = None


@dataclass
class _StageView:
    name: str
    total: int = 0
    done: int = 0
    failed: int = 0
    running: int = 0
    retrying: int = 0
    finished_this_run: int = 0
    started: float = field(default_factory=time.monotonic)


def bar(fraction: float, width: int) -> str:
    """A text progress bar using block characters."""
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    return "█" * filled + "░" * (width - filled)


class HeadlessPrinter:
    """Subscribes to engine events and renders progress to a stream."""

    def __init__(self, out: TextIO = sys.stdout, *, tty: bool | None = None, interval: float | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.interval = interval if interval is not None else (0.5 if self.tty else 5.0)
        self.slots: dict[str, _SlotView] = {}
        self.stage: _StageView | None = None
        self.run_dir = ""
        self.recipe = ""
        self._drawn_lines = 0
        self._dirty = True
        self._t0 = time.monotonic()
        self._last_plain = 0.0

    # -- events -------------------------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.run_dir, self.recipe = str(event.run_dir), event.recipe
            self.slots = {k: _SlotView() for k in event.slots}
            verb = "resuming" if event.resumed else "running"
            self._line(f"benchfleet: {verb} {event.recipe} in {event.run_dir} on {len(event.slots)} slot(s)")
        elif isinstance(event, StageStarted):
            self.stage = _StageView(name=event.stage, total=event.total, done=event.already_done)
            skipped = f" ({event.already_done} already done)" if event.already_done else ""
            self._line(f"stage {event.stage} ({event.kind}): {event.total} task(s){skipped}")
        elif isinstance(event, TaskStarted):
            view = self.slots.setdefault(event.slot, _SlotView())
            view.task, view.progress, view.started = event.label, None, time.monotonic()
            if self.stage is not None:
                self.stage.running += 1
                if event.attempt > 1 and self.stage.retrying > 0:
                    self.stage.retrying -= 1
        elif isinstance(event, TaskProgressed):
            self.slots.setdefault(event.slot, _SlotView()).progress = (event.done, event.total)
        elif isinstance(event, TaskExited):
            self._task_exited(event)
        elif isinstance(event, EngineNote):
            if event.level != "debug":
                self._line(f"{event.level}: {event.text}")
        elif isinstance(event, StageFinished):
            self.redraw(force=True)
            self._clear_block()
            counts = ", ".join(f"{n} {s}" for s, n in event.counts.items() if n)
            halted = " (halted)" if event.halted else ""
            self._line(f"stage {event.stage} finished{halted}: {counts or 'nothing to do'}")
            self.stage = None
        elif isinstance(event, RunFinished):
            self._clear_block()
        self._dirty = True

    def _task_exited(self, event: TaskExited) -> None:
        view = self.slots.setdefault(event.slot, _SlotView())
        view.task, view.progress = None, None
        stage = self.stage
        if stage is not None:
            stage.running = max(0, stage.running - 1)
        if event.state == "done":
            view.done += 1
            if stage is not None:
                stage.done += 1
                stage.finished_this_run += 1
        elif event.state == "failed":
            view.failed += 1
            if stage is not None:
                stage.failed += 1
                stage.finished_this_run += 1
            self._line(f"failed: {event.label} on {event.slot}: {event.reason}")
        elif event.state == "queued" and event.reason != "interrupted" and stage is not None:
            stage.retrying += 1

    # -- drawing ------------------------------------------------------------------------------------------------

    def eta(self) -> float | None:
        """Seconds left, from this run's completion rate; None until something finished."""
        st = self.stage
        if st is None or st.finished_this_run == 0:
            return None
        rate = st.finished_this_run / max(1e-6, time.monotonic() - st.started)
        left = st.total - st.done - st.failed
        return left / rate if rate > 0 else None

    def status_line(self) -> str:
        st = self.stage
        if st is None:
            return f"[{format_duration(time.monotonic() - self._t0)}] waiting"
        queued = max(0, st.total - st.done - st.failed - st.running)
        eta = self.eta()
        eta_text = f", ETA {format_duration(eta)}" if eta is not None else ""
        return (f"[{format_duration(time.monotonic() - self._t0)}] {st.name}: {st.done + st.failed}/{st.total} "
                f"finished; queued {queued}, running {st.running}, done {st.done}, failed {st.failed}"
                f"{f', retrying {st.retrying}' if st.retrying else ''}{eta_text}")

    def block(self) -> list[str]:
        """The lines of the terminal block."""
        st = self.stage
        if st is None:
            return []
        width = shutil.get_terminal_size((100, 24)).columns
        bar_w = max(10, min(30, width - 70))
        finished = st.done + st.failed
        lines = [f"{st.name:<12} {bar(finished / st.total if st.total else 1.0, bar_w)} {self.status_line()}"[:width]]
        for key, view in self.slots.items():
            if view.task is not None and view.progress is not None and view.progress[1] > 0:
                frac = view.progress[0] / view.progress[1]
                prog = f"{view.progress[0]}/{view.progress[1]}"
            else:
                frac, prog = (0.0, "") if view.task is None else (0.0, "…")
            elapsed = format_duration(time.monotonic() - view.started) if view.task and view.started else ""
            task = view.task or "idle"
            line = (f"  {key:<10} {bar(frac, bar_w)} done {view.done:>3} failed {view.failed:>2}  "
                    f"{task} {prog} {elapsed}")
            lines.append(line[:width])
        return lines

    def _clear_block(self) -> None:
        if self.tty and self._drawn_lines:
            self.out.write(f"\x1b[{self._drawn_lines}F\x1b[J")
            self._drawn_lines = 0

    def _line(self, text: str) -> None:
        """Print a message line; on a terminal, above the progress block."""
        self._clear_block()
        stamp = time.strftime("%H:%M:%S")
        self.out.write(f"{stamp} {text}\n")
        self.out.flush()
        self._dirty = True

    def redraw(self, *, force: bool = False) -> None:
        if self.tty:
            if not (self._dirty or force):
                return
            lines = self.block()
            self._clear_block()
            if lines:
                self.out.write("\n".join(lines) + "\n")
            self._drawn_lines = len(lines)
            self.out.flush()
            self._dirty = False
        else:
            now = time.monotonic()
            if self.stage is not None and (force or now - self._last_plain >= self.interval):
                self._last_plain = now
                self.out.write(self.status_line() + "\n")
                self.out.flush()

    async def ticker(self) -> None:
        """Redraw periodically until cancelled."""
        while True:
            self.redraw()
            await asyncio.sleep(self.interval if not self.tty else 0.5)
