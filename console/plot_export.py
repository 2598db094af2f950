"""The recipe's plots written into the run directory, so a finished run keeps them without the console.

`plots/<n>-<title>.txt` is a terminal rendering (a shaded heatmap table, or plotext lines and bars) that `cat` shows
over SSH; `plots/<n>-<title>.png` is the same plot drawn by matplotlib when it is installed
(`pip install 'benchfleet[plots]'`). ReDrafter's upstream README wanted exactly these: tokens/s and accepted tokens
over the (beam width, beam length) mesh. The data comes from results.json through the console's own plot data
functions, so the files show what the console shows.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from console.rundata import HeatmapData, Series, heatmap_data, plot_title, series_data, x_label
from remote.plan import safe_name
from remote.recipe import PlotSpec
from remote.rundir import write_private

SHADES = " ░▒▓█"
TEXT_MARKERS = ("•", "+", "x", "o", "*", "#", "@", "%")
"""Markers of the lines of a text plot with several series (one line alone is drawn in braille dots)."""


def heatmap_text(title: str, data: HeatmapData, spec: PlotSpec) -> str:
    """A heatmap as a table: one row per y value, one column per x value, each cell shaded and printed."""
    values = list(data.cells.values())
    low, high = (min(values), max(values)) if values else (0.0, 0.0)
    width = max([len(f"{v:.4g}") for v in values] + [len(str(x)) for x in data.xs] + [3]) + 2
    head = f"{spec.y} \\ {spec.x}"
    label_w = max([len(head)] + [len(str(y)) for y in data.ys])
    lines = [title, f"{head:<{label_w}} " + "".join(f"{x!s:>{width}}" for x in data.xs)]
    for y in data.ys:
        cells = []
        for x in data.xs:
            v = data.cells.get((x, y))
            if v is None:
                cells.append(f"{'-':>{width}}")
                continue
            level = 0 if high == low else round((v - low) / (high - low) * (len(SHADES) - 1))
            cells.append(f"{SHADES[level]}{v:>{width - 1}.4g}")
        lines.append(f"{y!s:<{label_w}} " + "".join(cells))
    lines.append(f"{spec.value}: min {low:.4g}, max {high:.4g} (shade {SHADES[1]}..{SHADES[-1]} low to high)")
    return "\n".join(lines) + "\n"


def series_text(title: str, series: Sequence[Series], spec: PlotSpec, *, width: int = 100, height: int = 25) -> str:
    """Lines or bars drawn by plotext, as text."""
    import plotext  # noqa: PLC0415 (loaded only when a run has plots to write)

    plotext.clear_figure()
    plotext.plotsize(width, height)
    plotext.theme("clear")
    plotext.title(title)
    plotext.xlabel(x_label(spec))
    plotext.ylabel(spec.y or spec.value or "")
    if spec.kind == "bar" and series:
        labels = [str(x) for x in series[0].xs]
        if len(series) == 1:
            plotext.bar(labels, list(series[0].ys))
        else:
            plotext.multiple_bar(labels, [list(s.ys) for s in series], labels=[s.name for s in series])
    else:
        for n, s in enumerate(series):
            numeric = all(isinstance(x, int | float) for x in s.xs)
            xs = list(s.xs) if numeric else list(range(len(s.xs)))
            # A text file has no colours: several lines get a character each so they stay apart.
            marker = "braille" if len(series) == 1 else TEXT_MARKERS[n % len(TEXT_MARKERS)]
            plotext.plot(xs, list(s.ys), label=s.name, marker=marker)
    text: str = plotext.uncolorize(plotext.build())
    plotext.clear_figure()
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def _png(path: Path, title: str, spec: PlotSpec, heat: HeatmapData | None, series: Sequence[Series]) -> bool:
    """Draw the PNG with matplotlib; False when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib  # noqa: PLC0415 (optional extra, loaded only to export)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 5.5))
    if heat is not None:
        grid = [[heat.cells.get((x, y), float("nan")) for x in heat.xs] for y in heat.ys]
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(heat.xs)), [str(x) for x in heat.xs])
        ax.set_yticks(range(len(heat.ys)), [str(y) for y in heat.ys])
        fig.colorbar(image, ax=ax, label=spec.value)
        if len(heat.xs) * len(heat.ys) <= 200:
            for i, y in enumerate(heat.ys):
                for j, x in enumerate(heat.xs):
                    v = heat.cells.get((x, y))
                    if v is not None:
                        ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="w", fontsize=7)
    elif spec.kind == "bar":
        labels = [str(x) for x in series[0].xs] if series else []
        step = 0.8 / max(1, len(series))
        for k, s in enumerate(series):
            ax.bar([i + k * step for i in range(len(s.ys))], list(s.ys), width=step, label=s.name)
        ax.set_xticks([i + 0.4 - step / 2 for i in range(len(labels))], labels)
    else:
        for s in series:
            xs: list[float] | list[str] = ([float(x) for x in s.xs if isinstance(x, int | float)]
                                           if all(isinstance(x, int | float) for x in s.xs) else [str(x) for x in s.xs])
            ax.plot(xs, list(s.ys), marker="o" if len(s.ys) <= 40 else None, label=s.name)
    ax.set_title(title)
    ax.set_xlabel(x_label(spec))
    ax.set_ylabel(spec.y or spec.value or "")
    if heat is None and len(series) > 1:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return True


def export_plots(run_dir: Path, plots: Sequence[PlotSpec], rows: Sequence[Mapping[str, object]]) -> list[Path]:
    """Write every plot as text (and PNG when matplotlib is there) into run_dir/plots; returns the files written."""
    if not plots or not rows:
        return []
    folder = run_dir / "plots"
    folder.mkdir(mode=0o700, exist_ok=True)
    written: list[Path] = []
    for n, spec in enumerate(plots, 1):
        title = plot_title(spec)
        stem = f"{n}-{safe_name(title)[:60]}"
        heat = heatmap_data(rows, spec) if spec.kind == "heatmap" else None
        series = series_data(rows, spec) if heat is None else []
        drawable = heat is not None or bool(series)
        if heat is not None:
            text = heatmap_text(title, heat, spec)
        elif series:
            text = series_text(title, series, spec)
        else:  # a monitor turned off, every value missing: say so instead of drawing an empty frame
            text = f"{title}\nno values of {spec.y or spec.value} in the results\n"
        txt = folder / f"{stem}.txt"
        write_private(txt, text)
        written.append(txt)
        png = folder / f"{stem}.png"
        if drawable and _png(png, title, spec, heat, series):
            written.append(png)
    return written
