"""Live logs: one slot's (or one task's) output, or all slots merged with a coloured source prefix.

Lines arrive in batches (one per refresh) and are written with `Log.write_lines`, never one widget update per
line. Both the widget and the raw buffer used for filtering are bounded; the full output is always in the log
file, whose path the title shows.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Sequence
from typing import ClassVar

from rich.highlighter import Highlighter
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import Input, Log, Static

LOG_LINES = 5000
"""Lines a log view keeps (the file keeps everything)."""

SOURCE_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_cyan", "bright_magenta",
                  "bright_green", "bright_yellow", "bright_blue")
"""Prefix colours of the merged view, in slot order; ANSI names so they stay distinct in 16 colours."""

SEPARATOR = " │ "

_ERROR_WORDS = re.compile(r"\b(error|exception|traceback|failed|fatal|killed)\b", re.IGNORECASE)


class LogHighlighter(Highlighter):
    """Colours the merged view's source prefix, task headers, skip notices, error words and search matches."""

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}
        self.search: re.Pattern[str] | None = None

    def highlight(self, text: Text) -> None:
        plain = text.plain
        start = 0
        sep = plain.find(SEPARATOR)
        if self.sources and sep > 0:
            source = plain[:sep].strip()
            text.stylize(f"bold {self.sources.get(source, 'white')}", 0, sep)
            text.stylize("bright_black", sep, sep + len(SEPARATOR))
            start = sep + len(SEPARATOR)
        body = plain[start:]
        if body.startswith("── "):
            text.stylize("bold", start)
        elif body.startswith("… skipped"):
            text.stylize("yellow", start)
        else:
            for m in _ERROR_WORDS.finditer(plain, start):
                text.stylize("bold red", m.start(), m.end())
        if self.search is not None:
            for m in self.search.finditer(plain, start):
                if m.end() > m.start():
                    text.stylize("bold black on yellow", m.start(), m.end())


class SourceLog(Log):
    """A Log with the highlighter above."""

    def __init__(self, *, max_lines: int, id: str | None = None) -> None:
        super().__init__(highlight=True, max_lines=max_lines, id=id)
        self.log_highlighter = LogHighlighter()
        self.highlighter = self.log_highlighter

    def restyle(self) -> None:
        """Forget rendered lines after the search term or the sources changed."""
        self._render_line_cache.clear()
        self.refresh()


def compile_search(term: str) -> re.Pattern[str] | None:
    """A case-insensitive pattern for `term`: a regex when it compiles, else the literal text."""
    if not term:
        return None
    try:
        return re.compile(term, re.IGNORECASE)
    except re.error:
        return re.compile(re.escape(term), re.IGNORECASE)


class LogPane(Vertical):
    """A titled log with follow on/off, search (/, n, N) and filter (&) when interactive."""

    DEFAULT_CSS = """
    LogPane { height: 1fr; }
    LogPane > .log-title { height: 1; background: $panel; }
    LogPane > SourceLog { height: 1fr; }
    LogPane > Input, LogPane > Input:focus { height: 1; border: none; padding: 0 1; display: none; }
    LogPane > Input.-open { display: block; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "toggle_follow", "Follow", tooltip="Follow new lines on/off"),
        Binding("slash", "open_find('search')", "Search", key_display="/"),
        Binding("ampersand", "open_find('filter')", "Filter", key_display="&"),
        Binding("n", "next_match(1)", "Next", show=False),
        Binding("N", "next_match(-1)", "Prev", show=False),
        Binding("escape", "clear_find", "Clear", show=False),
    ]

    def __init__(self, *, interactive: bool = True, max_lines: int = LOG_LINES,
                 id: str | None = None) -> None:
        super().__init__(id=id)
        self.interactive = interactive
        self.max_lines = max_lines
        self.source_title = ""
        self.path = ""
        self.follow = True
        self.search_term = ""
        self.filter_term = ""
        self._raw: deque[str] = deque(maxlen=max_lines)
        self._find_mode = "search"
        self._match_line: int | None = None

    def compose(self) -> ComposeResult:
        yield Static("", classes="log-title")
        yield SourceLog(max_lines=self.max_lines)
        if self.interactive:
            yield Input(placeholder="search (regex)", id="find")

    @property
    def log_widget(self) -> SourceLog:
        return self.query_one(SourceLog)

    @property
    def lines(self) -> list[str]:
        """The lines currently shown (after the filter)."""
        return list(self.log_widget.lines)

    # -- content ---------------------------------------------------------------------------------------------

    def set_source(self, title: str, path: str, lines: Iterable[str], *, sources: Sequence[str] = ()) -> None:
        """Show another source: its title, its file path and the lines kept so far."""
        self.source_title, self.path = title, path
        colours = {s: SOURCE_COLOURS[i % len(SOURCE_COLOURS)] for i, s in enumerate(sources)}
        self.log_widget.log_highlighter.sources = colours
        self._raw.clear()
        self.log_widget.clear()
        self._match_line = None
        self.append(lines)
        self._update_title()
        if self.follow:
            # After the new lines are laid out, so the end is really the end.
            self.call_after_refresh(self.log_widget.scroll_end, animate=False)

    def set_header(self, title: str, path: str) -> None:
        """Retitle without touching the lines (the slot moved on to its next task)."""
        if (title, path) != (self.source_title, self.path):
            self.source_title, self.path = title, path
            self._update_title()

    def append(self, lines: Iterable[str]) -> None:
        """Add a batch of lines (one widget update for the whole batch)."""
        batch = list(lines)[-self.max_lines:]
        if not batch:
            return
        self._raw.extend(batch)
        pattern = compile_search(self.filter_term)
        if pattern is not None:
            batch = [line for line in batch if pattern.search(line)]
        if batch:
            self.log_widget.write_lines(batch, scroll_end=self.follow)

    def _refill(self) -> None:
        pattern = compile_search(self.filter_term)
        lines = [line for line in self._raw if pattern is None or pattern.search(line)]
        self.log_widget.clear()
        self.log_widget.write_lines(lines, scroll_end=self.follow)

    def _update_title(self) -> None:
        title = Text(" ")
        title.append(self.source_title or "no log selected", "bold")
        if self.path:
            title.append(f"  {self.path}", "dim")
        flags = Text()
        if self.interactive:
            flags.append("  follow " + ("on" if self.follow else "off"), "green" if self.follow else "yellow")
        if self.filter_term:
            flags.append(f"  filter: {self.filter_term}", "bold magenta")
        if self.search_term:
            flags.append(f"  search: {self.search_term}", "bold yellow")
        width = self.size.width or 80
        if title.cell_len + flags.cell_len > width and self.path:
            # Keep the end of the path (the file name) visible.
            room = max(8, width - flags.cell_len - len(self.source_title) - 5)
            title = Text(" ")
            title.append(self.source_title or "no log selected", "bold")
            title.append("  …" + self.path[-room:], "dim")
        title.append_text(flags)
        title.truncate(width)
        self.query_one(".log-title", Static).update(title)

    def on_resize(self) -> None:
        self._update_title()

    # -- actions ---------------------------------------------------------------------------------------------

    def action_toggle_follow(self) -> None:
        self.set_follow(not self.follow)

    def set_follow(self, follow: bool) -> None:
        self.follow = follow
        self.log_widget.auto_scroll = follow
        if follow:
            self.log_widget.scroll_end(animate=False)
        self._update_title()

    def action_open_find(self, mode: str) -> None:
        if not self.interactive:
            return
        self._find_mode = mode
        find = self.query_one("#find", Input)
        find.placeholder = ("filter: show only lines matching (regex)" if mode == "filter"
                            else "search: highlight and jump (regex); n/N next/previous")
        find.value = self.filter_term if mode == "filter" else self.search_term
        find.add_class("-open")
        find.focus()

    @on(Input.Submitted, "#find")
    def _find_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        find = self.query_one("#find", Input)
        find.remove_class("-open")
        self.log_widget.focus()
        if self._find_mode == "filter":
            self.set_filter(event.value)
        else:
            self.set_search(event.value)

    def set_filter(self, term: str) -> None:
        self.filter_term = term
        self._refill()
        self._update_title()

    def set_search(self, term: str) -> None:
        self.search_term = term
        self.log_widget.log_highlighter.search = compile_search(term)
        self.log_widget.restyle()
        self._update_title()
        if term:
            self._match_line = None
            self.action_next_match(-1)

    def action_next_match(self, direction: int) -> None:
        """Jump to the next (1) or previous (-1) line matching the search; stops following."""
        pattern = compile_search(self.search_term)
        if pattern is None:
            return
        lines = self.log_widget.lines
        if not lines:
            return
        start = (len(lines) if direction < 0 else -1) if self._match_line is None else self._match_line
        y = start + direction
        while 0 <= y < len(lines):
            if pattern.search(lines[y]):
                self._match_line = y
                if self.follow:
                    self.set_follow(False)
                self.log_widget.scroll_to(y=max(0, y - self.log_widget.size.height // 2), animate=False)
                return
            y += direction
        self.app.bell()

    def action_clear_find(self) -> None:
        find = self.query_one("#find", Input) if self.interactive else None
        if find is not None and find.has_class("-open"):
            find.remove_class("-open")
            self.log_widget.focus()
            return
        if self.search_term or self.filter_term:
            self.search_term = ""
            self.log_widget.log_highlighter.search = None
            self.log_widget.restyle()
            if self.filter_term:
                self.set_filter("")
            self._update_title()
