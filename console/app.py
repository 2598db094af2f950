"""The benchfleet console: a Textual app over one run directory, optionally driving the engine itself.

The app gets its backend through its constructor (a run directory, and the Engine when the console starts
the run), so tests hand it a real engine on a temporary run directory. It reads state only from the run
directory, in a thread worker twice a second (sooner when the engine reports an event), so a run it started
and a run it attached to look the same. Actions are requests written to the journal; the engine acts on them
and records an outcome.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console
from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen

from console.rundata import RunReader, RunSnapshot, read_log_tail
from console.screens.dialogs import ConfirmScreen
from console.screens.picker import PickerScreen
from console.screens.run import RunScreen
from remote.engine import Engine, EngineError, EngineOptions
from remote.events import Event, RunFinished, RunStarted, StageFinished, StageStarted, TaskExited, TaskStarted
from remote.journal import REQUEST_KINDS, Journal
from remote.recipe_loader import LoadedRecipe, RecipeError, load_recipe
from remote.rundir import RunDir, RunDirError, default_run_dir, prepare

EXIT_OK, EXIT_FAILED, EXIT_RUN, EXIT_INTERRUPTED = 0, 1, 3, 130

KICK_EVENTS = (RunStarted, StageStarted, TaskStarted, TaskExited, StageFinished, RunFinished)
"""Engine events that trigger a refresh at once instead of at the next tick."""

TASK_LOG_LINES = 5000


def sixteen_colours() -> bool:
    """Whether the terminal shows only the 16 ANSI colours (Textual's TEXTUAL_COLOR_SYSTEM, else Rich's guess
    from TERM/COLORTERM)."""
    forced = os.environ.get("TEXTUAL_COLOR_SYSTEM", "auto")
    if forced != "auto":
        return forced in ("standard", "windows")
    return Console(force_terminal=True).color_system in ("standard", "windows")


class BenchfleetApp(App[int]):
    """The console. `run_dir` None opens the picker; with `engine`, this console runs (and owns) the run."""

    CSS_PATH = Path(__file__).parent / "app.tcss"  # absolute: subclasses (tests, benchmarks) live elsewhere
    TITLE = "benchfleet"
    ENABLE_COMMAND_PALETTE = True

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit", tooltip="Quit (asks before stopping a run this console started)"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, run_dir: Path | None = None, *, engine: Engine | None = None,
                 recipes_dir: Path = Path("recipes"), runs_dir: Path = Path("runs"),
                 engine_options: EngineOptions | None = None, refresh_interval: float = 0.5,
                 clock: Callable[[], float] = time.time, ansi: bool | None = None) -> None:
        if ansi is None:
            ansi = sixteen_colours()
        super().__init__(ansi_color=ansi)
        if ansi:
            # The terminal's own palette: on 16 colours a truecolor theme degrades into clashing approximations.
            self.theme = "ansi-dark"
        self.recipes_dir = recipes_dir
        self.runs_dir = runs_dir
        self.engine_options = engine_options
        self.refresh_interval = refresh_interval
        self.clock = clock
        self._initial = (run_dir, engine)
        self.reader: RunReader | None = None
        self.engine: Engine | None = None
        self.engine_done = False
        self.engine_result: RunFinished | None = None
        self.engine_error: str | None = None
        self.stopping = False
        self.snapshot: RunSnapshot | None = None
        self.snapshots = 0
        """Snapshots drawn so far (tests wait on it)."""
        self._refreshing = False
        self._refresh_again = False
        self._kick_pending = False
        self._exit_after_engine = False

    # -- properties the screens use --------------------------------------------------------------------------

    @property
    def owns_engine(self) -> bool:
        return self.engine is not None

    @property
    def engine_running(self) -> bool:
        return self.engine is not None and not self.engine_done

    @property
    def run_dir(self) -> Path:
        return self.reader.run_dir if self.reader is not None else Path(".")

    def reader_lines(self, slot: str) -> tuple[list[str], int]:
        return self.reader.slot_lines(slot) if self.reader is not None else ([], 0)

    def reader_merged(self) -> tuple[list[tuple[str, str]], int]:
        return self.reader.merged_lines() if self.reader is not None else ([], 0)

    @property
    def run_screen(self) -> RunScreen | None:
        for screen in self.screen_stack:
            if isinstance(screen, RunScreen):
                return screen
        return None

    # -- start -----------------------------------------------------------------------------------------------

    def on_mount(self) -> None:
        run_dir, engine = self._initial
        if run_dir is None:
            self.push_screen(PickerScreen())
        else:
            self.open_run(run_dir, engine)

    def open_run(self, run_dir: Path, engine: Engine | None) -> None:
        """Show a run; with `engine`, also run it in this app's event loop."""
        self.reader = RunReader(run_dir, clock=self.clock)
        self.engine = engine
        self.title = f"benchfleet · {run_dir.name}"
        screen = RunScreen()
        if isinstance(self.screen, PickerScreen):
            self.switch_screen(screen)
        else:
            self.push_screen(screen)
        self.set_interval(self.refresh_interval, self.request_refresh, name="refresh")
        if engine is not None:
            engine.subscribe(self._on_engine_event)
            self.run_worker(self._drive_engine(engine), group="engine", exit_on_error=False,
                            description="Running the engine")
        self.request_refresh()

    def start_recipe(self, path: str) -> None:
        """From the picker: load the recipe and start a new run of it."""
        self._prepare_run(Path(path))

    def attach(self, path: str) -> None:
        """From the picker: open an existing run directory."""
        self.open_run(Path(path), None)

    @work(thread=True, exclusive=True, group="prepare", exit_on_error=False, description="Preparing the run")
    def _prepare_run(self, recipe: Path) -> None:
        try:
            loaded = load_recipe(recipe)
            rd = prepare(default_run_dir(loaded.recipe.name, self.runs_dir).resolve(), resume=False)
        except (RecipeError, RunDirError) as exc:
            self.call_from_thread(self.notify, str(exc), title="Cannot start", severity="error", timeout=10)
            return
        self.call_from_thread(self._start_prepared, loaded, rd)

    def _start_prepared(self, loaded: LoadedRecipe, rd: RunDir) -> None:
        self.open_run(rd.path, Engine(loaded, rd, resume=False, options=self.engine_options))

    async def _drive_engine(self, engine: Engine) -> None:
        try:
            self.engine_result = await engine.run()
        except (EngineError, RunDirError) as exc:
            self.engine_error = str(exc)
            self.notify(str(exc), title="The run could not start", severity="error", timeout=30)
        except asyncio.CancelledError:
            raise
        finally:
            self.engine_done = True
            self.stopping = False
            self.request_refresh()
            self.refresh_bindings()
        if self._exit_after_engine:
            self.exit(self.exit_code())
        elif self.engine_result is not None:
            counts = self.engine_result.counts
            verb = "stopped" if self.engine_result.interrupted else "finished"
            self.notify(f"{counts.get('done', 0)} done, {counts.get('failed', 0)} failed; q quits",
                        title=f"Run {verb}", timeout=10)

    def exit_code(self) -> int:
        """As the headless command: 0 all done, 1 failures or a halt, 3 could not start, 130 interrupted."""
        if self.engine is None:
            return EXIT_OK
        if self.engine_error is not None:
            return EXIT_RUN
        result = self.engine_result
        if result is None or result.interrupted:
            return EXIT_INTERRUPTED
        if result.counts.get("failed", 0) or result.halted:
            return EXIT_FAILED
        return EXIT_OK

    # -- refresh ---------------------------------------------------------------------------------------------

    def _on_engine_event(self, event: Event) -> None:
        """Called by the engine on this loop: never block, just bring the next refresh forward."""
        if isinstance(event, KICK_EVENTS) and not self._kick_pending:
            self._kick_pending = True
            self.set_timer(0.05, self._kicked)

    def _kicked(self) -> None:
        self._kick_pending = False
        self.request_refresh()

    def request_refresh(self) -> None:
        """Take a snapshot in a worker thread, unless one is being taken (then one more follows it)."""
        if self.reader is None:
            return
        if self._refreshing:
            self._refresh_again = True
            return
        self._refreshing = True
        self._refresh_worker(self.reader)

    @work(thread=True, exclusive=True, group="refresh", exit_on_error=False, description="Reading the run")
    def _refresh_worker(self, reader: RunReader) -> None:
        try:
            snapshot = reader.snapshot()
        except Exception as exc:
            self.call_from_thread(self._refresh_failed, exc)
            raise
        self.call_from_thread(self._apply, snapshot)

    def _refresh_failed(self, exc: BaseException) -> None:
        self._refreshing = False
        self.notify(f"reading {self.run_dir} failed: {exc}", severity="error", timeout=10)

    def _apply(self, snapshot: RunSnapshot) -> None:
        self._refreshing = False
        self.snapshot = snapshot
        screen = self.run_screen
        if screen is not None and screen.is_mounted:
            screen.apply(snapshot)
        self.snapshots += 1
        if self._refresh_again:
            self._refresh_again = False
            self.request_refresh()

    @work(thread=True, group="task-log", exit_on_error=False, description="Reading a task's log")
    def load_task_log(self, task_id: str, path: str) -> None:
        lines = read_log_tail(Path(path), TASK_LOG_LINES) if path else []
        if not lines:
            lines = [f"(no output in {path})" if path else "(no log file)"]
        self.call_from_thread(self._task_log_loaded, task_id, lines)

    def _task_log_loaded(self, task_id: str, lines: list[str]) -> None:
        screen = self.run_screen
        if screen is not None:
            screen.show_task_lines(task_id, lines)

    # -- requests --------------------------------------------------------------------------------------------

    def send_request(self, kind: str, target: str | None, what: str) -> None:
        """Record a request for the engine in the journal (in a worker: the journal may be busy a moment)."""
        if kind not in REQUEST_KINDS:
            raise ValueError(f"unknown request kind {kind!r}")
        self._write_request(kind, target, what)

    @work(thread=True, group="request", exit_on_error=False, description="Sending a request")
    def _write_request(self, kind: str, target: str | None, what: str) -> None:
        if self.reader is None:
            return
        path = self.reader.rd.journal
        try:
            journal = Journal(path)
            try:
                journal.add_request(kind, target, source="console")
            finally:
                journal.close()
        except Exception as exc:  # sqlite3.Error or OSError: shown, never a traceback
            self.call_from_thread(self.notify, f"{path}: could not record the request ({exc})",
                                  severity="error")
            return
        snap = self.snapshot
        if self.engine_running or (snap is not None and snap.state == "running"):
            self.call_from_thread(self.notify, f"requested: {what}", timeout=3)
        else:
            self.call_from_thread(self.notify, f"requested: {what}. No engine runs this run now; it applies "
                                  "when the run is resumed (benchfleet --recipe … --run-dir … --resume)",
                                  severity="warning", timeout=8)
        self.call_from_thread(self.request_refresh)

    def stop_run(self) -> None:
        """Ask the engine to stop: a journal request (any engine), and directly when this console owns it."""
        self.send_request("stop", None, "stop the run")
        if self.engine is not None and not self.engine_done:
            self.stopping = True
            self.engine.request_stop()
            self.request_refresh()

    # -- quitting --------------------------------------------------------------------------------------------

    async def action_quit(self) -> None:
        """Leave. A run this console started is stopped first, after asking; an attached run keeps running."""
        if not self.engine_running:
            self.exit(self.exit_code())
            return
        if self.stopping:
            self.notify("still stopping the run (killing its tasks); q again leaves at once and the tasks "
                        "left running are adopted by --resume", severity="warning")
            self._exit_after_engine = True
            if self._quit_pressed_while_stopping():
                self.exit(EXIT_INTERRUPTED)
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._exit_after_engine = True
                self.stop_run()

        self.push_screen(ConfirmScreen(
            "Stop the run and quit?",
            "This console started the run, so quitting stops it: running tasks are killed (TERM, then KILL). "
            f"Finished cells are kept; continue with:\n{self.resume_command()}",
            yes="Stop and quit", no="Keep running"), answered)

    def resume_command(self) -> str:
        """How to continue this run: with the original recipe, whose folder fills {recipe_dir} (task ids hash
        it, so the copy in the run directory would not match the finished cells)."""
        recipe = self.engine.loaded.path if self.engine is not None else self.run_dir / "recipe.toml"
        return f"benchfleet {recipe} --run-dir {self.run_dir} --resume"

    def _quit_pressed_while_stopping(self) -> bool:
        now = time.monotonic()
        again = getattr(self, "_last_quit", 0.0)
        self._last_quit = now
        return now - again < 3.0

    # -- command palette -------------------------------------------------------------------------------------

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if not isinstance(screen, RunScreen):
            return
        commands = [
            ("Fleet view", "One row per GPU slot (key 1)", "view('fleet')"),
            ("Logs view", "The selected slot's live log (key 2, or l / Enter on a slot)", "view('logs')"),
            ("Results view", "The results table, sortable (key 3)", "view('results')"),
            ("Plots view", "The recipe's plots (key 4)", "view('plots')"),
            ("Merged logs", "All slots interleaved, a coloured source prefix on each line (key m in Logs)",
             "toggle_merged"),
            ("Cancel task", "Cancel the selected slot's running task (key c)", "cancel"),
            ("Retry failed tasks", "Run the failed tasks again (key r)", "retry_failed"),
            ("Pause/resume slot", "Pause or resume the selected slot (key p)", "pause_slot"),
            ("Pause/resume queue", "Pause or resume the whole queue (key P)", "pause_queue"),
            ("Stop the run", "Kill the running tasks and stop; resumable (key S)", "stop_run"),
            ("Show run directory", "Show and copy the run directory's path (key d)", "run_dir"),
            ("Show log file", "Show and copy the full log file's path (key o in Logs)", "log_path"),
        ]
        for title, help_text, action in commands:
            yield SystemCommand(title, help_text, _screen_action(screen, action))


def _screen_action(screen: Screen[Any], action: str) -> Callable[[], object]:
    async def run() -> None:
        await screen.run_action(action)

    return run

