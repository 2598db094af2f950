"""The recipe's plots, drawn live with plotext as results arrive: heatmaps over a 2-D grid, lines and bars.

Heatmap cells are coloured in five bins of the 16-colour palette (blue, cyan, green, yellow, red: readable on
any terminal) with the value written in the cell when it fits; failed cells are marked. [ and ] go through the
plots; wide terminals show two side by side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Static
from textual_plotext import PlotextPlot

from console.rundata import HeatmapData, format_value, heatmap_data, plot_title, series_data, x_label
from remote.recipe import PlotSpec

BINS = ("blue", "cyan", "green", "orange", "red")
"""plotext colour names of the heatmap bins, cold to hot (ANSI 4, 6, 2, 3, 1)."""

BIN_STYLES = ("blue", "cyan", "green", "yellow", "red")
"""The same colours as Rich styles, for the legend."""

LINE_COLOURS = ("cyan", "orange", "green", "magenta", "blue", "red", "cyan+", "orange+")

WIDE = 160
"""Columns from which two plots are shown side by side."""


def bin_index(value: float, lo: float, hi: float) -> int:
    """Which of the five colour bins `value` falls in."""
    if hi <= lo:
        return len(BINS) // 2
    return min(len(BINS) - 1, int((value - lo) / (hi - lo) * len(BINS)))


def heatmap_legend(data: HeatmapData) -> Text:
    """"█ 52.4  █ 57.7 … █ 78.7": the lower edge of each bin."""
    legend = Text()
    bounds = data.bounds
    if bounds is None:
        return legend
    lo, hi = bounds
    step = (hi - lo) / len(BINS)
    for i, style in enumerate(BIN_STYLES):
        legend.append("█", style)
        legend.append(f"{format_value(lo + i * step)} ", "dim")
    legend.append(f"max {format_value(hi)}", "dim")
    return legend


def _position_axis(values: Sequence[object]) -> tuple[list[float], list[str]]:
    return [float(i) for i in range(len(values))], [format_value(v) for v in values]


def _numbers(values: Sequence[object]) -> list[float] | None:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return None
        out.append(float(v))
    return out


class ChartPlot(PlotextPlot):
    """One recipe plot; redrawn from its rows at each render, so cell labels fit the current size."""

    def __init__(self) -> None:
        super().__init__()
        self.spec: PlotSpec | None = None
        self.rows: Sequence[Mapping[str, object]] = ()
        self.axes: Mapping[str, Sequence[object]] = {}

    def set_data(self, spec: PlotSpec, rows: Sequence[Mapping[str, object]],
                 axes: Mapping[str, Sequence[object]]) -> None:
        self.spec, self.rows, self.axes = spec, rows, axes
        self.refresh()

    def render(self) -> Any:
        plt = self.plt
        plt.clear_figure()
        spec = self.spec
        if spec is not None:
            if spec.kind == "heatmap":
                self._heatmap(spec)
            else:
                self._series(spec)
        return super().render()

    def _heatmap(self, spec: PlotSpec) -> None:
        # textual-plotext's stubs disagree with plotext (rectangle takes lists, multiple_bar takes labels=).
        plt: Any = self.plt
        data = heatmap_data(self.rows, spec, self.axes)
        done = heatmap_data([r for r in self.rows if r.get("state") == "done"], spec)
        failed = {(r.get(spec.x or ""), r.get(spec.y or "")) for r in self.rows if r.get("state") == "failed"}
        plt.title(plot_title(spec))
        plt.xlabel(x_label(spec))
        plt.ylabel(spec.y or "")
        if not data.xs or not data.ys:
            plt.text("no results yet", 0, 0, alignment="center")
            plt.xlim(-1, 1)
            plt.ylim(-1, 1)
            return
        lo, hi = done.bounds or (0.0, 0.0)
        ylabel_width = max(len(format_value(y)) for y in data.ys)
        cell_w = (self.size.width - ylabel_width - 3) / len(data.xs)
        cell_h = (self.size.height - 5) / len(data.ys)
        for i, x in enumerate(data.xs):
            for j, y in enumerate(data.ys):
                value = done.cells.get((x, y))
                if value is None:
                    if (x, y) in failed:
                        plt.text("✗" if cell_w < 8 else "✗ failed", i, j, color="red", alignment="center")
                    continue
                colour = BINS[bin_index(value, lo, hi)]
                plt.rectangle([i - 0.5, i + 0.5], [j - 0.5, j + 0.5], marker="█", color=colour, fill=True)
                label = format_value(value)
                if cell_w >= len(label) + 1 and cell_h >= 1:
                    plt.text(label, i, j, color="black", background=colour, alignment="center")
        xt, xl = _position_axis(data.xs)
        yt, yl = _position_axis(data.ys)
        plt.xticks(xt, xl)
        plt.yticks(yt, yl)
        plt.xlim(-0.5, len(data.xs) - 0.5)
        plt.ylim(-0.5, len(data.ys) - 0.5)

    def _series(self, spec: PlotSpec) -> None:
        plt: Any = self.plt
        plt.title(plot_title(spec))
        plt.xlabel(x_label(spec))
        series = series_data([r for r in self.rows if r.get("state") == "done"], spec)
        if not series:
            plt.text("no results yet", 0, 0, alignment="center")
            plt.xlim(-1, 1)
            plt.ylim(-1, 1)
            return
        if spec.kind == "bar":
            labels = list(dict.fromkeys(format_value(x) for s in series for x in s.xs))
            by_label = [dict(zip((format_value(x) for x in s.xs), s.ys, strict=True)) for s in series]
            values = [[points.get(lab, 0.0) for lab in labels] for points in by_label]
            if len(series) == 1:
                plt.bar(labels, values[0], color=LINE_COLOURS[0])
            else:
                plt.multiple_bar(labels, values, labels=[s.name for s in series],
                                 color=list(LINE_COLOURS[: len(series)]))
            return
        for n, s in enumerate(series):
            numeric = _numbers(s.xs)
            xs = numeric if numeric is not None else _position_axis(s.xs)[0]
            plt.plot(xs, list(s.ys), label=s.name if len(series) > 1 else None,
                     color=LINE_COLOURS[n % len(LINE_COLOURS)], marker="braille")
            if numeric is None:
                plt.xticks(*_position_axis(s.xs))


class PlotsPane(Vertical):
    """The plots with a title line; [ and ] go through them."""

    DEFAULT_CSS = """
    PlotsPane > #plots-title { height: 1; background: $panel; }
    PlotsPane > #plots-row { height: 1fr; }
    PlotsPane ChartPlot { width: 1fr; height: 1fr; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("left_square_bracket", "cycle(-1)", "Prev plot", key_display="["),
        Binding("right_square_bracket", "cycle(1)", "Next plot", key_display="]"),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.plots: tuple[PlotSpec, ...] = ()
        self.rows: tuple[Mapping[str, object], ...] = ()
        self.axes: Mapping[str, Sequence[object]] = {}
        self.index = 0
        self.can_focus = True

    def compose(self) -> ComposeResult:
        yield Static("", id="plots-title")
        with Horizontal(id="plots-row"):
            yield ChartPlot()
            yield ChartPlot()

    def show(self, plots: Sequence[PlotSpec], rows: Sequence[Mapping[str, object]],
             axes: Mapping[str, Sequence[object]]) -> None:
        """Redraw when the results or the plots changed."""
        if tuple(plots) == self.plots and tuple(rows) == self.rows and axes == self.axes:
            return
        self.plots, self.rows, self.axes = tuple(plots), tuple(rows), axes
        self.index = min(self.index, max(0, len(self.plots) - 1))
        self._draw()

    def on_resize(self) -> None:
        self._draw()

    def _draw(self) -> None:
        charts = list(self.query(ChartPlot))
        if not charts:
            return
        two = (self.size.width or 80) >= WIDE and len(self.plots) > 1
        title = Text(" ")
        if not self.plots:
            title.append("this recipe declares no plots ([[plot]] in the recipe: heatmap, line, bar)", "dim")
            charts[0].display = False
            charts[1].display = False
        else:
            specs = [self.plots[self.index]]
            if two:
                specs.append(self.plots[(self.index + 1) % len(self.plots)])
            for chart, spec in zip(charts, [*specs, None], strict=False):
                chart.display = spec is not None
                if spec is not None:
                    chart.set_data(spec, self.rows, self.axes)
            title.append(f"plot {self.index + 1}/{len(self.plots)}", "bold")
            if len(self.plots) > 1:
                title.append("  [ ] more", "dim")
            done = [r for r in self.rows if r.get("state") == "done"]
            title.append(f"  {len(done)} result(s)  ", "dim")
            first = self.plots[self.index]
            if first.kind == "heatmap":
                title.append_text(heatmap_legend(heatmap_data(done, first)))
        title.truncate(self.size.width or 80)
        self.query_one("#plots-title", Static).update(title)

    def action_cycle(self, step: int) -> None:
        if self.plots:
            self.index = (self.index + step) % len(self.plots)
            self._draw()
