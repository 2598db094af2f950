"""The three lines above every view: what runs and where, overall progress with an ETA, and the stages."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from console.rundata import RunSnapshot, format_duration

VIEWS = (("fleet", "Fleet"), ("logs", "Logs"), ("results", "Results"), ("plots", "Plots"))
"""View ids and titles, in key order (1..4)."""

STATE_STYLES = {
    "running": "bold green", "finished": "bold", "interrupted": "bold yellow", "halted": "bold red",
    "stopped": "bold yellow", "starting": "dim", "stopping": "bold yellow",
}

STAGE_GLYPHS = {"done": ("✓", "green"), "running": ("▶", "bold green"), "failed": ("✗", "red"),
                "waiting": ("·", "dim"), "stopped": ("‖", "yellow")}


def progress_bar(fraction: float, width: int, failed_fraction: float = 0.0) -> Text:
    """A bar in block characters: done in green, failed in red, the rest dim."""
    width = max(0, width)
    fraction = min(1.0, max(0.0, fraction))
    failed_fraction = min(fraction, max(0.0, failed_fraction))
    filled = round(fraction * width)
    failed = min(filled, round(failed_fraction * width)) if failed_fraction else 0
    bar = Text()
    bar.append("█" * (filled - failed), "green")
    bar.append("█" * failed, "red")
    bar.append("░" * (width - filled), "bright_black")
    return bar


class RunHeader(Widget):
    """Title line with the view tabs, the progress line, and the stages line."""

    DEFAULT_CSS = """
    RunHeader { height: 3; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.snapshot: RunSnapshot | None = None
        self.view = "fleet"
        self.stopping = False
        self.owned = False

    def show(self, snapshot: RunSnapshot) -> None:
        self.snapshot = snapshot
        self.refresh()

    def set_view(self, view: str) -> None:
        self.view = view
        self.refresh()

    def render(self) -> Text:
        width = max(20, self.size.width)
        snap = self.snapshot
        lines = [self._title(snap, width), self._progress(snap, width), self._stages(snap, width)]
        return Text("\n").join(lines)

    # -- lines -----------------------------------------------------------------------------------------------

    def _tabs(self) -> Text:
        tabs = Text()
        for n, (view, title) in enumerate(VIEWS, 1):
            click = Style(meta={"@click": f"screen.view('{view}')"})
            if view == self.view:
                tabs.append(f" {n} {title} ", Style(reverse=True, bold=True) + click)
            else:
                tabs.append(" ")
                tabs.append(str(n), Style(bold=True, color="cyan") + click)
                tabs.append(f" {title} ", click)
        return tabs

    def _title(self, snap: RunSnapshot | None, width: int) -> Text:
        tabs = self._tabs()
        line = Text(" benchfleet ", "bold reverse")
        if snap is None:
            line.append("  reading the run directory…", "dim")
        else:
            line.append(" ")
            line.append(snap.recipe or snap.run_dir.name, "bold")
            state = "stopping" if self.stopping and snap.state == "running" else snap.state
            line.append("  ● ", STATE_STYLES.get(state, "bold"))
            line.append(state, STATE_STYLES.get(state, "bold"))
            if snap.elapsed is not None:
                line.append(f" {format_duration(snap.elapsed)}", "bold")
            if snap.state == "running" and not self.owned and width >= 100:
                line.append(" attached", "dim")
            where = snap.run_dir.name
            if width - line.cell_len - tabs.cell_len - 3 >= len(where):
                line.append("  ")
                line.append(where, "dim")
        pad = width - line.cell_len - tabs.cell_len
        if pad < 1:
            line.truncate(max(0, width - tabs.cell_len - 1), overflow="ellipsis")
            pad = width - line.cell_len - tabs.cell_len
        line.append(" " * max(1, pad))
        line.append_text(tabs)
        line.truncate(width)
        return line

    def _progress(self, snap: RunSnapshot | None, width: int) -> Text:
        if snap is None or not snap.available:
            return Text(f" {snap.problem if snap else ''}", "dim")
        c = snap.counts
        total = snap.total
        finished = c.get("done", 0) + c.get("failed", 0) + c.get("cancelled", 0)
        counts = Text()
        counts.append(f" {finished}/{total} ", "bold")
        parts = [("running", "green"), ("done", "green"), ("failed", "red"), ("retrying", "yellow"),
                 ("cancelled", "magenta"), ("queued", "cyan")]
        for name, style in parts:
            n = c.get(name, 0)
            if not n and name in ("retrying", "cancelled"):
                continue  # rare states take room only when they happen
            counts.append(f" {n}", f"bold {style}" if n else "dim")
            counts.append(f" {name}", style if n else "dim")
        if snap.eta is not None:
            counts.append("  ETA ", "dim")
            counts.append(format_duration(snap.eta), "bold")
        bar_width = width - counts.cell_len - 2
        line = Text(" ")
        if bar_width >= 8:
            line.append_text(progress_bar(finished / total if total else 0.0, min(bar_width, 60),
                                          c.get("failed", 0) / total if total else 0.0))
        line.append_text(counts)
        line.truncate(width)
        return line

    def _stages(self, snap: RunSnapshot | None, width: int) -> Text:
        line = Text(" ")
        if snap is None or not snap.available:
            return line
        for stage in snap.stages:
            glyph, style = STAGE_GLYPHS.get(stage.state, ("·", "dim"))
            line.append(glyph, style)
            line.append(f" {stage.name}", "bold" if stage.state == "running" else "")
            finished = stage.counts.get("done", 0) + stage.counts.get("failed", 0)
            if stage.state != "done" and stage.total > 1:
                line.append(f" {finished}/{stage.total}", "dim")
            line.append("  ")
        if snap.queue_paused:
            line.append(" ‖ queue paused ", "bold black on yellow")
            line.append(" ")
        for host in snap.hosts_offline:
            line.append(f" ⊘ {host} offline ", "bold white on magenta")
            line.append(" ")
        if snap.pending_requests and snap.state != "running":
            line.append(f"{snap.pending_requests} request(s) wait for an engine (--resume)  ", "yellow")
        elif snap.pending_requests:
            line.append(f"{snap.pending_requests} request(s) pending  ", "dim")
        note = snap.last_note
        # Info notes narrate a live run ("trial hf: starting"); once it ended only warnings and errors still matter.
        stale = snap.state != "running" and note is not None and note.level == "info"
        if note is not None and not stale and line.cell_len < width - 10:
            style = {"error": "red", "warning": "yellow"}.get(note.level, "dim")
            line.append(note.text, style)
        line.truncate(width, overflow="ellipsis")
        return line
