"""`benchfleet` with no arguments: pick a recipe to run, or a recent run to open."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, cast

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from console.picker import RecipeEntry, RunEntry, find_recipes, find_runs

if TYPE_CHECKING:
    from console.app import BenchfleetApp

RUN_STATE_STYLES = {"running": "green", "finished": "", "interrupted": "yellow", "halted": "red",
                    "unreadable": "red", "starting": "dim"}


def recipe_prompt(entry: RecipeEntry) -> Text:
    text = Text()
    text.append("▶ ", "green" if entry.error is None else "red")
    text.append(f"{entry.name:<24}", "bold")
    text.append(f" {entry.path}", "dim")
    if entry.error:
        text.append(f"\n  {entry.error}", "red")
    elif entry.description:
        text.append(f"\n  {entry.description}")
    return text


def run_prompt(entry: RunEntry, now: float) -> Text:
    text = Text()
    text.append("◆ ", "cyan")
    text.append(f"{entry.path.name:<36}", "bold")
    text.append(f" {entry.state:<11}", RUN_STATE_STYLES.get(entry.state, ""))
    text.append(f" {entry.done}/{entry.total} done", "")
    if entry.failed:
        text.append(f", {entry.failed} failed", "red")
    text.append(f"  {_ago(now - entry.modified)}", "dim")
    return text


def _ago(seconds: float) -> str:
    if seconds < 90:
        return "just now"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


class PickerScreen(Screen[None]):
    """Recipes of ./recipes (Enter runs one) and recent run directories of ./runs (Enter opens one)."""

    DEFAULT_CSS = """
    PickerScreen > #picker-title { height: 1; background: $panel; text-style: bold; padding: 0 1; }
    PickerScreen > OptionList { height: 1fr; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "choose", "Run / open", show=True, priority=True),
        Binding("q", "app.quit", "Quit"),
        Binding("f5", "reload", "Reload"),
    ]

    def compose(self) -> ComposeResult:
        yield Static("benchfleet · pick a recipe to run, or a run to open", id="picker-title")
        options = OptionList(id="picker")
        options.compact = True
        yield options
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()
        self.action_reload()

    @property
    def bf_app(self) -> BenchfleetApp:
        return cast("BenchfleetApp", self.app)

    def action_reload(self) -> None:
        reading = Option(Text("reading recipes and runs…", "dim"), disabled=True)
        self.query_one(OptionList).set_options([reading])
        self._scan()

    @work(thread=True, exclusive=True, group="picker", exit_on_error=False,
          description="Listing recipes and runs")
    def _scan(self) -> None:
        recipes = find_recipes(self.bf_app.recipes_dir)
        runs = find_runs(self.bf_app.runs_dir)
        self.app.call_from_thread(self._show, recipes, runs)

    def _show(self, recipes: list[RecipeEntry], runs: list[RunEntry]) -> None:
        now = self.bf_app.clock()
        options: list[Option | None] = []
        title = Text(f"recipes in {self.bf_app.recipes_dir}/", "bold underline")
        options.append(Option(title, disabled=True))
        if not recipes:
            options.append(Option(Text("  none: write one (see README) or run `benchfleet RECIPE`", "dim"),
                                  disabled=True))
        options += [Option(recipe_prompt(r), id=f"recipe:{r.path}", disabled=r.error is not None)
                    for r in recipes]
        options.append(None)
        options.append(Option(Text(f"recent runs in {self.bf_app.runs_dir}/", "bold underline"),
                              disabled=True))
        if not runs:
            options.append(Option(Text("  none yet", "dim"), disabled=True))
        options += [Option(run_prompt(r, now), id=f"run:{r.path}") for r in runs]
        ol = self.query_one(OptionList)
        ol.set_options(options)
        first = next((i for i, o in enumerate(ol.options) if not o.disabled), None)
        ol.highlighted = first

    def action_choose(self) -> None:
        ol = self.query_one(OptionList)
        if ol.highlighted is None:
            return
        option = ol.get_option_at_index(ol.highlighted)
        if option.disabled or option.id is None:
            return
        kind, _, path = option.id.partition(":")
        if kind == "recipe":
            self.bf_app.start_recipe(path)
        else:
            self.bf_app.attach(path)
