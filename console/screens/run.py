"""The run screen: the fleet (home), logs, results and plots views over one run, with k9s-like keys.

Every action is a request the engine reads from the journal (cancel, retry-failed, pause, resume, stop), so it
works the same on a run this console started and on one it attached to; the outcome comes back as a
notification.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar, cast

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import ContentSwitcher, Footer, Static

from console.rundata import RunSnapshot, SlotView, unseen
from console.screens.dialogs import ConfirmScreen, PathScreen
from console.widgets.fleet import FleetTable
from console.widgets.header import VIEWS, RunHeader
from console.widgets.logview import SEPARATOR, LogPane
from console.widgets.plots import PlotsPane
from console.widgets.results import ResultsTable

if TYPE_CHECKING:
    from console.app import BenchfleetApp

PREVIEW_LINES = 500
LOG_VIEWS = ("fleet", "logs")

FOOTER_ACTIONS = {
    "fleet": {"open_logs", "cancel", "retry_failed", "pause_slot", "pause_queue", "stop_run", "run_dir"},
    "logs": {"toggle_merged", "log_path", "cancel"},
    "results": {"retry_failed", "stop_run", "run_dir"},
    "plots": {"run_dir"},
}
"""Screen actions the footer lists in each view (80 columns hold about eight keys); the rest still work."""

SLOT_ACTIONS = {"cancel", "pause_slot"}
"""Actions on the selected slot: they work where a slot is selected (fleet and logs)."""

VIEW_ACTIONS = {"toggle_merged": "logs", "log_path": "logs", "cycle_slot": "logs", "open_logs": "fleet"}
"""Actions that only mean something in one view."""

QUIET_TWINS = {"c": "cancel", "r": "retry_failed", "p": "pause_slot", "P": "pause_queue", "S": "stop_run",
               "d": "run_dir"}
"""Keys bound twice: shown in the footer where FOOTER_ACTIONS says so, and silently everywhere else."""


class RunScreen(Screen[None]):
    """One run: header, the four views, and the footer with the keys."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("1", "view('fleet')", "Fleet", show=False),
        Binding("2", "view('logs')", "Logs", show=False),
        Binding("3", "view('results')", "Results", show=False),
        Binding("4", "view('plots')", "Plots", show=False),
        Binding("l", "open_logs", "Logs", tooltip="Show the selected slot's log"),
        Binding("m", "toggle_merged", "Merged", tooltip="All slots' logs interleaved, or one slot's"),
        Binding("left_square_bracket", "cycle_slot(-1)", "Prev slot", show=False, key_display="["),
        Binding("right_square_bracket", "cycle_slot(1)", "Next slot", show=False, key_display="]"),
        Binding("o", "log_path", "Log file", tooltip="Show (and copy) the full log file's path"),
        Binding("c", "cancel", "Cancel", tooltip="Cancel the selected slot's running task"),
        Binding("r", "retry_failed", "Retry", tooltip="Run the failed tasks again"),
        Binding("p", "pause_slot", "Pause", tooltip="Pause or resume the selected slot"),
        Binding("P", "pause_queue", "Pause all", key_display="P", tooltip="Pause or resume the whole queue"),
        Binding("S", "stop_run", "Stop", key_display="S", tooltip="Stop the run (asks first)"),
        Binding("d", "run_dir", "Dir", tooltip="Show (and copy) the run directory"),
        # The same keys, working in every view but kept off the footer where it has no room for them.
        *(Binding(key, f"quiet('{action}')", show=False) for key, action in QUIET_TWINS.items()),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.snapshot: RunSnapshot | None = None
        self.view = "fleet"
        self.selected_slot: str | None = None
        self.log_source: tuple[str, str | None] = ("slot", None)
        """("slot", key), ("merged", None) or ("task", task_id): what the logs view shows."""
        self._preview_slot: str | None = None
        self._preview_seq = 0
        self._logs_seq = 0
        """Sequence numbers of the lines the preview and the logs view show (batches are cut to the new)."""
        self._results_dirty = True
        self._plots_dirty = True

    @property
    def bf_app(self) -> BenchfleetApp:
        return cast("BenchfleetApp", self.app)

    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        with ContentSwitcher(initial="fleet", id="views"):
            with Vertical(id="fleet"):
                yield FleetTable(id="fleet-table")
                yield LogPane(interactive=False, max_lines=PREVIEW_LINES, id="preview")
            yield LogPane(id="logs")
            with Vertical(id="results"):
                yield Static("", id="results-title")
                yield ResultsTable(id="results-table")
            yield PlotsPane(id="plots")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#header", RunHeader).owned = self.bf_app.owns_engine
        self.query_one(FleetTable).option_list.focus()
        self.query_one("#preview", LogPane).set_source("no slot yet", "", [])
        self.query_one("#logs", LogPane).set_source("no slot yet", "", [])
        if self.bf_app.snapshot is not None:
            # A snapshot taken while this screen was being mounted would otherwise wait for the next tick.
            self.apply(self.bf_app.snapshot)

    # -- snapshots -------------------------------------------------------------------------------------------

    def apply(self, snap: RunSnapshot) -> None:
        """Draw a new snapshot: cheap widgets always, the results table and plots when visible."""
        first = self.snapshot is None or not self.snapshot.available
        self.snapshot = snap
        header = self.query_one("#header", RunHeader)
        header.stopping = self.bf_app.stopping
        header.show(snap)
        if not snap.available:
            return
        fleet = self.query_one(FleetTable)
        fleet.show(snap.slots)
        if first or self.selected_slot not in {s.key for s in snap.slots}:
            start = next((s for s in snap.slots if s.running), snap.slots[0] if snap.slots else None)
            if start is not None:
                self._select_slot(start.key)
        self._append_logs(snap)
        self._results_dirty = self._plots_dirty = True
        if self.view == "results":
            self._draw_results()
        elif self.view == "plots":
            self._draw_plots()
        for note in snap.notes:
            if note.level in ("warning", "error"):
                self.notify(note.text, title=note.level.capitalize(),
                            severity="error" if note.level == "error" else "warning", timeout=8)
        for outcome in snap.outcomes:
            what = f"{outcome.kind} {outcome.target}" if outcome.target else outcome.kind
            self.notify(outcome.outcome or "done", title=what, timeout=5)

    def _append_logs(self, snap: RunSnapshot) -> None:
        slot = self.slot_view(self.selected_slot)
        preview = self.query_one("#preview", LogPane)
        key_ = self._preview_slot
        if key_ is not None and key_ in snap.log_lines:
            preview.append(unseen(snap.log_lines[key_], snap.log_seq.get(key_, 0), self._preview_seq))
            self._preview_seq = max(self._preview_seq, snap.log_seq.get(key_, 0))
        if slot is not None and slot.key == self._preview_slot:
            preview.set_header(_slot_title(slot), str(slot.log_path or ""))
        logs = self.query_one("#logs", LogPane)
        kind, key = self.log_source
        if kind == "slot" and key is not None and key in snap.log_lines:
            logs.append(unseen(snap.log_lines[key], snap.log_seq.get(key, 0), self._logs_seq))
            self._logs_seq = max(self._logs_seq, snap.log_seq.get(key, 0))
        if kind == "slot" and key is not None:
            source = self.slot_view(key)
            if source is not None:
                logs.set_header(_slot_title(source), str(source.log_path or ""))
        elif kind == "merged":
            fresh = [f"{s}{SEPARATOR}{line}" for s, line in snap.merged_lines]
            logs.append(_align(unseen(fresh, snap.merged_seq, self._logs_seq), self._slot_width()))
            self._logs_seq = max(self._logs_seq, snap.merged_seq)

    def _draw_results(self) -> None:
        snap = self.snapshot
        if snap is None or not self._results_dirty:
            return
        self._results_dirty = False
        self.query_one(ResultsTable).show(snap.columns, snap.results)
        failed = sum(1 for r in snap.results if r.get("state") == "failed")
        title = Text(f" {len(snap.results)} finished", "bold")
        if failed:
            title.append(f", {failed} failed", "bold red")
        title.append("   ←/→ column · s sort · Enter log", "dim")
        if snap.results_csv is not None:
            title.append(f"   {snap.results_csv}", "dim")
        title.truncate(max(10, self.size.width), overflow="ellipsis")
        self.query_one("#results-title", Static).update(title)

    def _draw_plots(self) -> None:
        snap = self.snapshot
        if snap is None or not self._plots_dirty:
            return
        self._plots_dirty = False
        self.query_one(PlotsPane).show(snap.plots, snap.results, snap.axes)

    # -- selection -------------------------------------------------------------------------------------------

    def slot_view(self, key: str | None) -> SlotView | None:
        if key is None or self.snapshot is None:
            return None
        return next((s for s in self.snapshot.slots if s.key == key), None)

    def _slot_width(self) -> int:
        return max([4, *(len(s.key) for s in self.snapshot.slots)]) if self.snapshot else 8

    def _select_slot(self, key: str) -> None:
        self.selected_slot = key
        self.query_one(FleetTable).select(key)
        self._show_preview(key)
        if self.log_source[0] == "slot" and self.log_source[1] != key:
            self._show_slot_log(key)

    def _show_preview(self, key: str) -> None:
        if key == self._preview_slot:
            return
        self._preview_slot = key
        slot = self.slot_view(key)
        title = _slot_title(slot) if slot is not None else key
        lines, self._preview_seq = self.bf_app.reader_lines(key)
        self.query_one("#preview", LogPane).set_source(title, str(slot.log_path or "") if slot else "", lines)

    def _show_slot_log(self, key: str) -> None:
        self.log_source = ("slot", key)
        slot = self.slot_view(key)
        title = _slot_title(slot) if slot is not None else key
        lines, self._logs_seq = self.bf_app.reader_lines(key)
        self.query_one("#logs", LogPane).set_source(title, str(slot.log_path or "") if slot else "", lines)

    @on(FleetTable.SlotHighlighted)
    def _slot_highlighted(self, event: FleetTable.SlotHighlighted) -> None:
        if event.slot != self.selected_slot:
            self.selected_slot = event.slot
            self._show_preview(event.slot)
            if self.log_source[0] == "slot":
                self._show_slot_log(event.slot)

    @on(FleetTable.SlotChosen)
    def _slot_chosen(self, event: FleetTable.SlotChosen) -> None:
        self._select_slot(event.slot)
        self._show_slot_log(event.slot)
        self.action_view("logs")

    @on(ResultsTable.TaskChosen)
    def _task_chosen(self, event: ResultsTable.TaskChosen) -> None:
        running = next((s for s in (self.snapshot.slots if self.snapshot else ())
                        if s.task_id == event.task_id and s.running), None)
        if running is not None:
            self._select_slot(running.key)
            self._show_slot_log(running.key)
        else:
            self.log_source = ("task", event.task_id)
            self.query_one("#logs", LogPane).set_source(event.label, event.log, ["(reading…)"])
            self.bf_app.load_task_log(event.task_id, event.log)
        self.action_view("logs")

    def show_task_lines(self, task_id: str, lines: list[str]) -> None:
        """The lines of a finished task's log, read by a worker."""
        if self.log_source == ("task", task_id):
            pane = self.query_one("#logs", LogPane)
            pane.set_source(pane.source_title, pane.path, lines)

    # -- actions ---------------------------------------------------------------------------------------------

    def _enabled(self, action: str) -> bool:
        if action in VIEW_ACTIONS:
            return self.view == VIEW_ACTIONS[action]
        if action in SLOT_ACTIONS:
            return self.view in LOG_VIEWS
        return True

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "quiet":
            return self._enabled(str(parameters[0]))
        if not self._enabled(action):
            return False
        if action in QUIET_TWINS.values():
            # Off the footer here: this binding steps aside and its quiet twin runs the action.
            return action in FOOTER_ACTIONS.get(self.view, set())
        return True

    async def action_quiet(self, action: str) -> None:
        """Run a screen action from its footer-less binding."""
        await self.run_action(action)

    def action_view(self, view: str) -> None:
        if view not in {v for v, _ in VIEWS}:
            return
        self.view = view
        self.query_one("#views", ContentSwitcher).current = view
        self.query_one("#header", RunHeader).set_view(view)
        if view == "fleet":
            self.query_one(FleetTable).option_list.focus()
        elif view == "logs":
            self.query_one("#logs", LogPane).log_widget.focus()
        elif view == "results":
            self._draw_results()
            self.query_one(ResultsTable).focus()
        else:
            self._draw_plots()
            self.query_one(PlotsPane).focus()
        self.refresh_bindings()

    def action_open_logs(self) -> None:
        if self.selected_slot is not None:
            self._show_slot_log(self.selected_slot)
        self.action_view("logs")

    def action_toggle_merged(self) -> None:
        logs = self.query_one("#logs", LogPane)
        if self.log_source[0] == "merged":
            if self.selected_slot is not None:
                self._show_slot_log(self.selected_slot)
            return
        self.log_source = ("merged", None)
        keys = [s.key for s in self.snapshot.slots] if self.snapshot else []
        merged, self._logs_seq = self.bf_app.reader_merged()
        logs.set_source("all slots, merged", str(self.bf_app.run_dir / "logs"),
                        _align([f"{s}{SEPARATOR}{line}" for s, line in merged], self._slot_width()),
                        sources=keys)

    def action_cycle_slot(self, step: int) -> None:
        if self.snapshot is None or not self.snapshot.slots:
            return
        keys = [s.key for s in self.snapshot.slots]
        current = keys.index(self.selected_slot) if self.selected_slot in keys else 0
        key = keys[(current + step) % len(keys)]
        self._select_slot(key)
        self._show_slot_log(key)

    def action_log_path(self) -> None:
        path = self.query_one("#logs", LogPane).path
        if path:
            self.app.push_screen(PathScreen("Full log file", path,
                                            "less +F or tail -f it for the whole output"))

    def action_run_dir(self) -> None:
        self.app.push_screen(PathScreen("Run directory", str(self.bf_app.run_dir.resolve()),
                                        "journal.sqlite, logs/, results.csv, results.json, recipe.toml"))

    def _target_task(self) -> SlotView | None:
        in_logs = self.view == "logs" and self.log_source[0] == "slot"
        key = self.log_source[1] if in_logs else self.selected_slot
        return self.slot_view(key)

    def action_cancel(self) -> None:
        slot = self._target_task()
        if slot is None or not slot.running or slot.task_id is None:
            self.notify("the selected slot runs no task; select a running one (↑/↓)", severity="warning")
            return
        task_id, label = slot.task_id, slot.task_label or slot.task_id

        def answered(yes: bool | None) -> None:
            if yes:
                self.bf_app.send_request("cancel", task_id, f"cancel {label}")

        question = ConfirmScreen(f"Cancel {label} on {slot.key}?",
                                 "Its process group is killed; the task is marked cancelled and the slot "
                                 "moves on to its next task.", yes="Cancel task", no="Keep")
        self.app.push_screen(question, answered)

    def action_retry_failed(self) -> None:
        failed = self.snapshot.counts.get("failed", 0) if self.snapshot else 0
        if not failed:
            self.notify("no failed tasks to retry")
            return
        self.bf_app.send_request("retry-failed", None, f"retry {failed} failed task(s)")

    def action_pause_slot(self) -> None:
        slot = self._target_task()
        if slot is None:
            return
        if slot.paused:
            self.bf_app.send_request("resume", slot.key, f"resume {slot.key}")
        else:
            self.bf_app.send_request("pause", slot.key, f"pause {slot.key} (its running task finishes)")

    def action_pause_queue(self) -> None:
        if self.snapshot is not None and self.snapshot.queue_paused:
            self.bf_app.send_request("resume", None, "resume the queue")
        else:
            self.bf_app.send_request("pause", None, "pause the queue (running tasks finish)")

    def action_stop_run(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.bf_app.stop_run()

        question = ConfirmScreen("Stop the run?", "Running tasks are killed (TERM, then KILL); nothing new "
                                 "starts. Finished cells are kept: continue later with --resume.",
                                 yes="Stop run", no="Keep running")
        self.app.push_screen(question, answered)


def _slot_title(slot: SlotView) -> str:
    label = slot.task_label or slot.stage or ""
    return f"{slot.key} · {label}" if label else slot.key


def _align(lines: Iterable[str], width: int) -> list[str]:
    """Pad the merged view's source prefixes to one width, so the lines start in one column."""
    out = []
    for line in lines:
        source, sep, rest = line.partition(SEPARATOR)
        out.append(f"{source:<{width}}{sep}{rest}")
    return out
