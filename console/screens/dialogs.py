"""Small modal dialogs: a yes/no confirmation and a path to show and copy."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmScreen(ModalScreen[bool]):
    """Ask before doing something that cannot be undone; y/Enter confirms, n/Escape cancels."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical {
        width: 64; max-width: 95%; height: auto; border: thick $warning; background: $surface; padding: 0 1;
    }
    ConfirmScreen #question { text-style: bold; margin-bottom: 1; }
    ConfirmScreen Horizontal { height: auto; align: right middle; }
    ConfirmScreen Button { margin-left: 1; min-width: 10; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, detail: str = "", *, yes: str = "Yes", no: str = "No") -> None:
        super().__init__()
        self.question = question
        self.detail = detail
        self.yes, self.no = yes, no

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.question, id="question")
            if self.detail:
                yield Static(self.detail, id="detail")
            with Horizontal():
                yield Button(f"{self.no} [n]", id="no")
                yield Button(f"{self.yes} [y]", id="yes", variant="warning")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class PathScreen(ModalScreen[None]):
    """Show a path (run directory, log file) in full, and copy it to the clipboard with c (OSC 52)."""

    DEFAULT_CSS = """
    PathScreen { align: center middle; }
    PathScreen > Vertical {
        width: auto; min-width: 40; max-width: 95%; height: auto; border: thick $accent; background: $surface;
        padding: 0 1;
    }
    PathScreen #path { text-style: bold; margin: 1 0; }
    PathScreen #hint { color: $text-muted; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "copy", "Copy"),
        Binding("escape,q,enter", "close", "Close"),
    ]

    def __init__(self, title: str, path: str, hint: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.path = path
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(self.title_text, "bold"))
            yield Static(Text(self.path), id="path")
            hint = "c copy to the clipboard · Esc close"
            yield Static(f"{self.hint}\n{hint}" if self.hint else hint, id="hint")

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.path)
        self.app.notify(f"copied {self.path}", title="Clipboard", timeout=3)
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)
