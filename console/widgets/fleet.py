"""The fleet view: one swimlane per GPU slot across all hosts.

Each slot shows its host, GPU, state, current task with its grid values, elapsed time, queue depth, GPU
utilisation and memory sparklines and the task's last log line. Wide terminals get one line per slot; narrow
ones (80 columns) two, with the last log line on the second, so nothing important is cut.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from rich.text import Span, Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from console.rundata import SlotView, format_duration, sparkline

WIDE = 120
"""Columns from which each slot takes one line."""

STATES = {
    "running": ("▶", "running", "green"),
    "pausing": ("‖", "pausing", "yellow"),
    "paused": ("‖", "paused", "yellow"),
    "failed": ("✗", "failed", "red"),
    "idle": ("·", "idle", "bright_black"),
    "offline": ("⊘", "offline", "magenta"),
}


@dataclass(frozen=True)
class FleetLayout:
    """Column widths for one terminal width (0 hides a column)."""

    width: int
    wide: bool
    host: int
    gpu: int
    name: int
    state: int
    task: int
    time: int
    queue: int
    done: int
    spark: int
    metric: int
    last: int


def fleet_layout(width: int, slots: Sequence[SlotView]) -> FleetLayout:
    """Fit the columns to `width`: fixed columns first, the task column takes what is left (and the last log
    line, when wide)."""
    host = min(14, max([4, *(len(s.host) for s in slots)]))
    gpu = max([3, *(len(str(s.gpu)) for s in slots)])
    wide = width >= WIDE
    names = [short_gpu_name(s.gpu_name) for s in slots if s.gpu_name]
    name = min(16, max(len(n) for n in names)) if wide and names else 0
    state, time_w, queue = 9, 7, 5
    done = 9 if wide else 0
    spark = 10 if wide else 5
    metric = spark + 5
    fixed = (host + gpu + (name + 1 if name else 0) + state + time_w + queue + (done + 1 if done else 0)
             + 2 * metric)
    gaps = 7
    rest = max(8, width - fixed - gaps)
    if wide:
        task = min(36, max(16, rest // 3))
        last = max(0, rest - task - 1)
    else:
        task, last = rest, 0
    return FleetLayout(width=width, wide=wide, host=host, gpu=gpu, name=name, state=state, task=task,
                       time=time_w, queue=queue, done=done, spark=spark, metric=metric, last=last)


def short_gpu_name(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "H100 80GB HBM3": the vendor adds nothing in a column of GPUs."""
    for prefix in ("NVIDIA ", "Tesla ", "GeForce "):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def abbreviate(name: str) -> str:
    """beam_width -> bw, max-tokens -> mt, batch -> batch: grid axis names short enough for a column."""
    words = [w for w in name.replace("-", "_").split("_") if w]
    return "".join(w[0] for w in words) if len(words) > 1 else name


def task_text(label: str, values: Mapping[str, object], width: int) -> str:
    """The task's grid values in `width` columns: in full, else with short axis names, else values alone."""
    if len(label) <= width or not values:
        return label
    short = [abbreviate(k) for k in values]
    if len(set(short)) == len(short):
        text = " ".join(f"{k}={v}" for k, v in zip(short, values.values(), strict=True))
        if len(text) <= width:
            return text
    return " ".join(str(v) for v in values.values())


def _cell(text: str, width: int, style: str = "", *, right: bool = False) -> Text:
    if len(text) > width:
        text = text[: max(0, width - 1)] + "…" if width > 1 else text[:width]
    padded = text.rjust(width) if right else text.ljust(width)
    return Text(padded, style)


def header_line(layout: FleetLayout) -> Text:
    """The column titles, aligned with the rows."""
    parts = [_cell("HOST", layout.host), _cell("GPU", layout.gpu, right=True)]
    if layout.name:
        parts.append(_cell("MODEL", layout.name))
    parts += [_cell("STATE", layout.state), _cell("TASK", layout.task),
              _cell("TIME", layout.time, right=True), _cell("QUEUE", layout.queue, right=True)]
    if layout.done:
        parts.append(_cell("DONE/FAIL", layout.done, right=True))
    parts += [_cell("GPU UTIL", layout.metric), _cell("GPU MEM", layout.metric)]
    if layout.last:
        parts.append(_cell("LAST LINE", layout.last))
    line = Text(" ").join(parts)
    line.stylize("bold")
    return line


def _metric(values: Sequence[float | None], layout: FleetLayout, *, hi: float | None, unit: str) -> Text:
    numbers = [v for v in values if v is not None]
    if not numbers:
        return _cell("n/a", layout.metric, "bright_black")
    last = numbers[-1]
    if unit == "%":
        label = f"{last:.0f}%"
    else:
        gib = last / 1024
        label = f"{gib:.0f}G" if gib >= 10 else f"{gib:.1f}G"
    text = Text(sparkline(values, layout.spark, 0.0, hi), "cyan")
    text.append(label.rjust(layout.metric - layout.spark), "bold")
    return text


def slot_prompt(slot: SlotView, layout: FleetLayout, *, show_host: bool) -> Text:
    """One slot as one (wide) or two (narrow) lines."""
    glyph, word, style = STATES.get(slot.state, ("?", slot.state, ""))
    parts = [_cell(slot.host if show_host else "", layout.host, "bold"),
             _cell(str(slot.gpu), layout.gpu, "bold", right=True)]
    if layout.name:
        parts.append(_cell(short_gpu_name(slot.gpu_name), layout.name, "dim"))
    parts.append(_cell(f"{glyph} {word}", layout.state, style))
    suffix = f" #{slot.attempt}" if slot.attempt > 1 else ""
    label = task_text(slot.task_label or (slot.task_id or ""), slot.values, layout.task - len(suffix))
    if label:
        label += suffix
    parts.append(_cell(label, layout.task, "" if slot.running else "bright_black"))
    parts.append(_cell(format_duration(slot.elapsed), layout.time, "" if slot.running else "bright_black",
                       right=True))
    queue = str(slot.queued) if slot.queued else "·"
    queue_style = "bright_black" if slot.shared_queue or not slot.queued else "bold"
    parts.append(_cell(queue, layout.queue, queue_style, right=True))
    if layout.done:
        done = Text()
        done.append(f"{slot.done}✓", "green" if slot.done else "bright_black")
        done.append(f" {slot.failed}✗", "red" if slot.failed else "bright_black")
        parts.append(Text(" " * max(0, layout.done - done.cell_len)) + done)
    parts.append(_metric(slot.util, layout, hi=100.0, unit="%"))
    parts.append(_metric(slot.mem, layout, hi=slot.mem_total, unit="G"))
    last_style = "red" if slot.state == "failed" else ("" if slot.running else "bright_black")
    if not slot.last_line:
        last_style = "bright_black italic"
        slot = replace(slot, last_line="(no output yet)" if slot.running else
                       ("" if slot.task_id else "nothing ran here yet"))
    if layout.last:
        parts.append(_cell(slot.last_line, layout.last, last_style))
        return Text(" ").join(parts)
    line = Text(" ").join(parts)
    second = Text("  ╰ ", "bright_black")
    second.append_text(_cell(slot.last_line, max(0, layout.width - 4), last_style))
    return Text("\n").join([line, second])


def undimmed(text: Text) -> Text:
    """`text` without its dim grey: the row under the cursor sits on a coloured bar where grey is unreadable."""
    out = text.copy()
    out.spans = [Span(sp.start, sp.end, str(sp.style).replace("bright_black", "").strip() or "none")
                 for sp in text.spans]
    out.style = str(text.style).replace("bright_black", "").strip() or ""
    return out


class FleetTable(Vertical):
    """Column titles over a keyboard-navigable list of slots; posts SlotHighlighted and SlotChosen."""

    DEFAULT_CSS = """
    FleetTable { height: auto; max-height: 70%; }
    FleetTable > #fleet-columns { height: 1; background: $panel; }
    FleetTable > OptionList { height: auto; max-height: 100%; }
    """

    class SlotHighlighted(Message):
        """The cursor moved to a slot."""

        def __init__(self, slot: str) -> None:
            super().__init__()
            self.slot = slot

    class SlotChosen(Message):
        """Enter was pressed on a slot."""

        def __init__(self, slot: str) -> None:
            super().__init__()
            self.slot = slot

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.slots: tuple[SlotView, ...] = ()
        self._prompts: dict[str, Text] = {}
        self._layout: FleetLayout | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="fleet-columns")
        option_list = OptionList(id="fleet-list")
        option_list.compact = True
        yield option_list

    @property
    def option_list(self) -> OptionList:
        return self.query_one("#fleet-list", OptionList)

    @property
    def selected(self) -> str | None:
        """The slot under the cursor."""
        ol = self.option_list
        if ol.highlighted is None or not self.slots:
            return None
        option = ol.get_option_at_index(ol.highlighted)
        return option.id

    def on_resize(self) -> None:
        self._layout = None
        self.show(self.slots)

    def show(self, slots: Sequence[SlotView]) -> None:
        """Redraw the slots; only changed rows are replaced, and the cursor stays on its slot."""
        # One column stays free for the list's scrollbar: rows never wrap when the fleet outgrows the screen.
        width = max(40, (self.size.width or 80) - 1)
        layout = fleet_layout(width, slots)
        relayout = layout != self._layout
        self._layout = layout
        ol = self.option_list
        keys = [s.key for s in slots]
        if relayout:
            self.query_one("#fleet-columns", Static).update(header_line(layout))
        prompts: dict[str, Text] = {}
        previous_host = None
        cursor = self.selected
        for slot in slots:
            prompt = slot_prompt(slot, layout, show_host=slot.host != previous_host)
            prompts[slot.key] = undimmed(prompt) if slot.key == cursor else prompt
            previous_host = slot.host
        if keys != [s.key for s in self.slots] or ol.option_count != len(keys):
            ol.set_options([Option(prompts[k], id=k) for k in keys])
            if keys:
                ol.highlighted = keys.index(cursor) if cursor in keys else 0
        else:
            for key, prompt in prompts.items():
                if relayout or self._prompts.get(key) != prompt:
                    ol.replace_option_prompt(key, prompt)
        self._prompts = prompts
        self.slots = tuple(slots)

    def select(self, slot: str) -> None:
        keys = [s.key for s in self.slots]
        if slot in keys:
            self.option_list.highlighted = keys.index(slot)

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        event.stop()
        self.show(self.slots)  # the cursor row is drawn without dim grey
        if event.option_id is not None:
            self.post_message(self.SlotHighlighted(event.option_id))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option_id is not None:
            self.post_message(self.SlotChosen(event.option_id))
