"""What the console shows, read from a run directory into plain dataclasses; no Textual here.

The console that started a run and `benchfleet attach` read the same files, so both show the same thing: the
journal opened read-only (WAL: a reader never blocks the engine) and the log copies in logs/ tailed by byte
offset. Every buffer is bounded, so a console left open on a week-long campaign keeps a flat memory profile,
and a task printing faster than anyone can read is skipped over (and says so) instead of making the console
fall behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from remote.extract import LineSplitter
from remote.journal import Journal, TaskRow
from remote.plan import build_plan
from remote.recipe import PlotSpec, QueueStage
from remote.recipe_loader import LoadedRecipe, RecipeError, parse_recipe
from remote.results import finish_rows, select_columns, sort_rows
from remote.rundir import RunDir
from remote.slots import Slot

TAIL_START_BYTES = 64 * 1024
"""How much of an existing log is shown when the console starts following it (as `tail` on a big file)."""

READ_LIMIT_BYTES = 512 * 1024
"""Most bytes read from one log per refresh; beyond that the tailer skips ahead and says how much."""

SLOT_LINES = 2000
"""Log lines kept per slot for the log views; the complete output stays in logs/."""

MERGED_LINES = 5000
"""Lines kept for the merged (all slots) view."""

NOTES_KEPT = 50

_MEANINGFUL = re.compile(r"[A-Za-z0-9]")

SLOT_STATES = ("idle", "running", "pausing", "paused", "failed", "offline")
"""A slot's state: pausing = paused but still finishing its current task; failed = its last task failed."""


# -- log tailing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TailBatch:
    """Lines completed since the last poll, and the bytes skipped to keep up (0 normally)."""

    lines: list[str]
    skipped: int = 0


class LogTailer:
    """Follows one log file by byte offset, like `tail -F`: a replaced or truncated file is read afresh.

    The first poll starts `start_bytes` before the end (dropping the partial first line); later polls read at
    most `read_limit` bytes, skipping the excess when a task prints faster than the console can show.
    """

    def __init__(self, path: Path, *, start_bytes: int = TAIL_START_BYTES,
                 read_limit: int = READ_LIMIT_BYTES) -> None:
        self.path = path
        self._start_bytes = start_bytes
        self._read_limit = read_limit
        self._offset: int | None = None
        self._inode: int | None = None
        self._splitter = LineSplitter()
        self._drop_partial = False

    @property
    def offset(self) -> int:
        return self._offset or 0

    def poll(self) -> TailBatch:
        try:
            st = os.stat(self.path)
        except OSError:
            return TailBatch([])
        if self._offset is not None and (st.st_ino != self._inode or st.st_size < self._offset):
            # A new attempt replaced the file, or a resumed engine cut uncommitted bytes: read it afresh.
            self._offset = None
        if self._offset is None:
            self._inode = st.st_ino
            self._splitter = LineSplitter()
            self._drop_partial = st.st_size > self._start_bytes
            self._offset = max(0, st.st_size - self._start_bytes)
        skipped = 0
        pending = st.st_size - self._offset
        if pending > self._read_limit:
            skipped = pending - self._read_limit
            self._offset += skipped
            self._splitter = LineSplitter()
            self._drop_partial = True
        if pending <= 0:
            return TailBatch([], skipped)
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(min(self._read_limit, st.st_size - self._offset))
        except OSError:
            return TailBatch([], skipped)
        self._offset += len(data)
        if self._drop_partial:
            newline = data.find(b"\n")
            if newline < 0:
                return TailBatch([], skipped)
            data = data[newline + 1:]
            self._drop_partial = False
        return TailBatch(self._splitter.feed(data), skipped)

    def finish(self) -> list[str]:
        """The last line of a file that ended without a newline (call once its writer is done)."""
        return self._splitter.flush()


def read_log_tail(path: Path, max_lines: int, max_bytes: int = 4 * TAIL_START_BYTES) -> list[str]:
    """The last lines of a (finished) log file; [] when it does not exist."""
    tailer = LogTailer(path, start_bytes=max_bytes, read_limit=max_bytes)
    batch = tailer.poll()
    return [*batch.lines, *tailer.finish()][-max_lines:]


def format_bytes(n: float) -> str:
    """1.5 KiB, 12.0 MiB: sizes in skip notices."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# -- snapshot dataclasses ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotView:
    """One GPU slot as the fleet view shows it."""

    key: str
    host: str
    gpu: int
    gpu_name: str
    state: str
    """One of SLOT_STATES."""
    paused: bool
    """This slot was paused on its own (a paused queue shows in RunSnapshot.queue_paused)."""
    task_id: str | None
    """The task running on the slot, or else the last one that ran there (its log stays visible)."""
    task_label: str
    values: Mapping[str, object]
    """The task's grid values (the label spells them out)."""
    stage: str | None
    attempt: int
    running: bool
    elapsed: float | None
    """Seconds the running task has run; the last task's duration when idle."""
    queued: int
    """Tasks waiting for this slot (pinned ones), or the stage's shared queue under free-slot placement."""
    shared_queue: bool
    done: int
    failed: int
    last_line: str
    log_path: Path | None
    util: tuple[float | None, ...] = ()
    """GPU utilisation % samples, oldest first; empty when the host reports none."""
    mem: tuple[float | None, ...] = ()
    """GPU memory used (MiB) samples, oldest first."""
    mem_total: float | None = None


@dataclass(frozen=True)
class StageView:
    """A stage with its task counts and state (waiting, running, done, failed, stopped)."""

    name: str
    kind: str
    total: int
    counts: Mapping[str, int]
    state: str


@dataclass(frozen=True)
class Note:
    """A message the engine left for a person (warnings, retries, halts)."""

    ts: float
    level: str
    text: str


@dataclass(frozen=True)
class RequestOutcome:
    """What the engine did with a request from a viewer."""

    seq: int
    kind: str
    target: str | None
    outcome: str


@dataclass(frozen=True)
class RunSnapshot:
    """Everything the console draws, taken at one moment."""

    run_dir: Path
    taken: float
    available: bool
    """False until the engine created the journal (or when it cannot be read); `problem` says why."""
    problem: str = ""
    recipe: str = ""
    description: str = ""
    state: str = "starting"
    """starting, running, finished, interrupted, halted, or stopped (journal says running, no engine is)."""
    engine_alive: bool | None = None
    engine_pid: int | None = None
    counts: Mapping[str, int] = field(default_factory=dict)
    total: int = 0
    elapsed: float | None = None
    eta: float | None = None
    slots: tuple[SlotView, ...] = ()
    stages: tuple[StageView, ...] = ()
    queue_paused: bool = False
    hosts_offline: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    results: tuple[Mapping[str, object], ...] = ()
    """Finished tasks as result rows (sorted as the recipe says), each with hidden "task" and "log" keys."""
    plots: tuple[PlotSpec, ...] = ()
    axes: Mapping[str, tuple[object, ...]] = field(default_factory=dict)
    """Every value of each grid axis (from the recipe): a heatmap shows the whole grid while it fills in."""
    notes: tuple[Note, ...] = ()
    """Notes new since the previous snapshot."""
    last_note: Note | None = None
    outcomes: tuple[RequestOutcome, ...] = ()
    """Request outcomes new since the previous snapshot."""
    pending_requests: int = 0
    log_lines: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """New log lines per slot since the previous snapshot (headers mark a new task)."""
    log_seq: Mapping[str, int] = field(default_factory=dict)
    """Lines ever kept per slot, counting this batch: a view filled from `RunReader.slot_lines` in the
    meantime appends only the part of the batch it has not seen (see `unseen`)."""
    merged_lines: tuple[tuple[str, str], ...] = ()
    """The same lines as (slot, line), for the merged view."""
    merged_seq: int = 0
    results_csv: Path | None = None


# -- engine liveness -----------------------------------------------------------------------------------------


def engine_holder(run_dir: Path, proc_locks: Path = Path("/proc/locks")) -> tuple[bool | None, int | None]:
    """(alive, pid) of the engine holding the run's engine.lock, read from /proc/locks without taking it.

    Taking the lock to test it could make a starting engine fail; reading the kernel's lock table cannot.
    alive is None where /proc/locks cannot be read.
    """
    lock = run_dir / "engine.lock"
    try:
        st = os.stat(lock)
    except OSError:
        return False, None
    try:
        table = proc_locks.read_text()
    except OSError:
        return None, None
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    for line in table.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (blocked waiters carry a "->" column).
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        dev = parts[5].split(":")
        if len(dev) != 3:
            continue
        try:
            if int(dev[2]) == st.st_ino and int(dev[0], 16) == major and int(dev[1], 16) == minor:
                return True, int(parts[4])
        except ValueError:
            continue
    return False, None


# -- the reader ----------------------------------------------------------------------------------------------


@dataclass
class _Follower:
    """The log a slot's view follows: the task running there, or the last one that did."""

    task_id: str
    attempt: int
    tailer: LogTailer
    last_line: str = ""


class RunReader:
    """Reads a run directory into RunSnapshots. `snapshot()` does the I/O (call it from a worker thread); the
    line accessors only copy bounded buffers and are cheap enough for the UI thread."""

    def __init__(self, run_dir: Path, *, clock: Callable[[], float] = time.time,
                 slot_lines: int = SLOT_LINES, merged_lines: int = MERGED_LINES,
                 read_limit: int = READ_LIMIT_BYTES) -> None:
        self.rd = RunDir(run_dir)
        self.clock = clock
        self.read_limit = read_limit
        self._lock = threading.Lock()
        self._lines_lock = threading.Lock()
        self._slot_lines: dict[str, deque[str]] = {}
        self._slot_lines_max = slot_lines
        self._merged: deque[tuple[str, str]] = deque(maxlen=merged_lines)
        self._slot_seq: dict[str, int] = {}
        self._merged_seq = 0
        self._followers: dict[str, _Follower] = {}
        self._recipe: LoadedRecipe | None = None
        self._recipe_mtime: float | None = None
        self._pins: dict[tuple[str, int], str | None] = {}
        self._pins_for: tuple[str, ...] = ()
        self._event_seq = 0
        self._notes: deque[Note] = deque(maxlen=NOTES_KEPT)
        self._engine_started: float | None = None
        self._engine_stopped: float | None = None
        self._request_floor: int | None = None
        self._reported: set[int] = set()

    @property
    def run_dir(self) -> Path:
        return self.rd.path

    # -- cheap accessors for the UI thread -------------------------------------------------------------------

    def slot_lines(self, slot: str) -> tuple[list[str], int]:
        """The kept log lines of a slot, oldest first, and their sequence number (see RunSnapshot.log_seq)."""
        with self._lines_lock:
            return list(self._slot_lines.get(slot, ())), self._slot_seq.get(slot, 0)

    def merged_lines(self) -> tuple[list[tuple[str, str]], int]:
        with self._lines_lock:
            return list(self._merged), self._merged_seq

    def recent_notes(self) -> list[Note]:
        with self._lines_lock:
            return list(self._notes)

    # -- the snapshot ----------------------------------------------------------------------------------------

    def snapshot(self) -> RunSnapshot:
        """Read the run directory now (blocking I/O: journal queries and log reads)."""
        with self._lock:
            now = self.clock()
            if not self.rd.journal.exists():
                return RunSnapshot(run_dir=self.rd.path, taken=now, available=False,
                                   problem="waiting for the engine to create the journal")
            try:
                journal = Journal(self.rd.journal, readonly=True)
            except sqlite3.Error as exc:
                return RunSnapshot(run_dir=self.rd.path, taken=now, available=False,
                                   problem=f"{self.rd.journal}: cannot open the journal ({exc})")
            try:
                return self._read(journal, now)
            except sqlite3.Error as exc:
                return RunSnapshot(run_dir=self.rd.path, taken=now, available=False,
                                   problem=f"{self.rd.journal}: cannot read the journal ({exc})")
            finally:
                journal.close()

    def _read(self, journal: Journal, now: float) -> RunSnapshot:
        loaded = self._load_recipe(journal)
        slot_keys: list[str] = _json_list(journal.meta("slots"))
        names = _json_dict(journal.meta("slot_names"))
        paused_slots = set(_json_list(journal.meta("paused_slots")))
        queue_paused = journal.meta("queue_paused") == "1"
        offline = tuple(_json_list(journal.meta("hosts_offline")))
        tasks = journal.tasks()
        counts = journal.counts()
        notes = self._read_events(journal)
        outcomes, pending = self._read_requests()
        alive, pid = engine_holder(self.rd.path)
        meta_state = journal.meta("state") or "starting"
        # A journal left saying "running" by an engine that died (SIGKILL, reboot) is a stopped run.
        state = "stopped" if meta_state == "running" and alive is False else meta_state

        if loaded is not None:
            stage_names = list(loaded.stage_names)
            specs = zip(loaded.stage_names, loaded.recipe.stage, strict=True)
            kinds = {name: spec.kind for name, spec in specs}
        else:
            stage_names, kinds = list(dict.fromkeys(t.stage for t in tasks)), {}
        stages = tuple(self._stage_view(journal, name, kinds.get(name, ""), alive) for name in stage_names)
        active = next((s.name for s in stages if s.state == "running"), None)
        if active is None:
            active = next((s.name for s in stages if s.state == "waiting"), None)

        pins = self._slot_pins(loaded, slot_keys, names)
        slots = self._slot_views(journal, tasks, slot_keys, names, paused_slots, queue_paused, offline, pins,
                                 active, now)
        log_lines, merged, log_seq, merged_seq = self._follow_logs(tasks, slots)
        slots = tuple(self._with_last_line(s) for s in slots)

        columns, results = self._results(loaded, tasks, journal)
        running = [s for s in slots if s.running]
        elapsed = None
        created = _float(journal.meta("created"))
        if created is not None:
            end = now if state == "running" else (self._engine_stopped or now)
            elapsed = max(0.0, end - created)
        usable = sum(1 for s in slots if s.state not in ("paused", "offline"))
        eta = _eta(tasks, counts, running, max(1, usable))
        return RunSnapshot(
            run_dir=self.rd.path, taken=now, available=True,
            recipe=(loaded.recipe.name if loaded else journal.meta("recipe") or self.rd.path.name),
            description=(loaded.recipe.description.strip() if loaded else ""),
            state=state, engine_alive=alive, engine_pid=pid,
            counts=counts, total=sum(counts.values()), elapsed=elapsed,
            eta=eta if state == "running" else None,
            slots=slots, stages=stages, queue_paused=queue_paused, hosts_offline=offline,
            columns=columns, results=results,
            plots=tuple(loaded.recipe.plot) if loaded else (),
            axes=_grid_axes(loaded),
            notes=notes, last_note=self._notes[-1] if self._notes else None,
            outcomes=outcomes, pending_requests=pending,
            log_lines=log_lines, log_seq=log_seq, merged_lines=merged, merged_seq=merged_seq,
            results_csv=self.rd.results_csv if self.rd.results_csv.exists() else None,
        )

    # -- pieces ----------------------------------------------------------------------------------------------

    def _load_recipe(self, journal: Journal) -> LoadedRecipe | None:
        """The recipe that ran (the copy in the run directory), reparsed only when it changes."""
        path = self.rd.recipe_copy
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return self._recipe
        if self._recipe is not None and mtime == self._recipe_mtime:
            return self._recipe
        # {recipe_dir} renders as the original recipe's folder, as it did for the engine.
        original = journal.meta("recipe_path")
        try:
            self._recipe = parse_recipe(path.read_text(), Path(original) if original else path)
        except (RecipeError, OSError, UnicodeDecodeError):
            self._recipe = None
        self._recipe_mtime = mtime
        return self._recipe

    def _slot_pins(self, loaded: LoadedRecipe | None, slot_keys: Sequence[str],
                   names: Mapping[str, object]) -> dict[tuple[str, int], str | None]:
        """(stage, grid index) -> pinned slot key, from the placement policy (None: any free slot)."""
        if loaded is None or tuple(slot_keys) == self._pins_for:
            return self._pins
        by_host: dict[str, list[Slot]] = {}
        for key in slot_keys:
            host, _, gpu = key.rpartition(":")
            if gpu.isdigit():
                slot = Slot(host=host, gpu=int(gpu), name=str(names.get(key, "")))
                by_host.setdefault(host, []).append(slot)
        try:
            plan = build_plan(loaded, by_host)
        except (ValueError, KeyError, RecipeError):
            return self._pins
        self._pins = {(t.stage, t.index): t.pinned_slot for t in plan.all_tasks()}
        self._pins_for = tuple(slot_keys)
        return self._pins

    def _stage_view(self, journal: Journal, name: str, kind: str, alive: bool | None) -> StageView:
        c = journal.counts(name)
        total = sum(c.values())
        waiting = c.get("queued", 0) + c.get("retrying", 0)
        if c.get("running", 0):
            state = "running"
        elif total and c.get("done", 0) == total:
            state = "done"
        elif waiting and waiting < total:
            state = "running" if alive else "stopped"
        elif waiting:
            state = "waiting"
        elif c.get("failed", 0):
            state = "failed"
        else:
            state = "done" if total else "waiting"
        return StageView(name=name, kind=kind, total=total, counts=c, state=state)

    def _slot_views(self, journal: Journal, tasks: Sequence[TaskRow], slot_keys: Sequence[str],
                    names: Mapping[str, object], paused_slots: set[str], queue_paused: bool,
                    offline: Sequence[str], pins: Mapping[tuple[str, int], str | None],
                    active_stage: str | None, now: float) -> tuple[SlotView, ...]:
        by_slot: dict[str, list[TaskRow]] = {}
        for t in tasks:
            if t.host is not None and t.gpu is not None:
                by_slot.setdefault(f"{t.host}:{t.gpu}", []).append(t)
        waiting = [t for t in tasks if t.state == "queued"]
        shared = sum(1 for t in waiting if pins.get((t.stage, t.idx)) is None
                     and (active_stage is None or t.stage == active_stage))
        pinned_counts: dict[str, int] = {}
        for t in waiting:
            pin = pins.get((t.stage, t.idx))
            if pin is not None:
                pinned_counts[pin] = pinned_counts.get(pin, 0) + 1
        samples = self._gpu_samples(slot_keys)
        views: list[SlotView] = []
        for key in slot_keys:
            host, _, gpu_text = key.rpartition(":")
            mine = by_slot.get(key, [])
            running = next((t for t in mine if t.state == "running"), None)
            last = running or max(mine, key=lambda t: t.started or 0.0, default=None)
            paused = key in paused_slots
            if host in offline:
                state = "offline"
            elif running is not None:
                state = "pausing" if paused or queue_paused else "running"
            elif paused or queue_paused:
                state = "paused"
            elif last is not None and last.state == "failed":
                state = "failed"
            else:
                state = "idle"
            elapsed = None
            if last is not None and last.started is not None:
                end = now if running is not None else (last.ended or last.started)
                elapsed = max(0.0, end - last.started)
            pinned = pinned_counts.get(key, 0)
            last_line = ""
            if last is not None:
                last_line = last.last_line or (last.reason or "" if last.state != "running" else "")
                if last.state == "failed" and last.reason:
                    last_line = f"{last.reason}: {last.last_line}" if last.last_line else last.reason
            util, mem, total = samples.get(key, ((), (), None))
            views.append(SlotView(
                key=key, host=host, gpu=int(gpu_text) if gpu_text.isdigit() else 0,
                gpu_name=str(names.get(key, "") or ""), state=state, paused=paused,
                task_id=last.id if last else None, task_label=last.label if last else "",
                values=dict(last.values) if last else {},
                stage=last.stage if last else None, attempt=last.attempts if last else 0,
                running=running is not None, elapsed=elapsed,
                queued=pinned if pinned else shared, shared_queue=not pinned and shared > 0,
                done=sum(1 for t in mine if t.state == "done"),
                failed=sum(1 for t in mine if t.state == "failed"),
                last_line=last_line, log_path=self.rd.log_path(last.log_name) if last else None,
                util=util, mem=mem, mem_total=total,
            ))
        return tuple(views)

    def _with_last_line(self, slot: SlotView) -> SlotView:
        """The slot with the last line its log follower read (fresher than the journal's)."""
        follower = self._followers.get(slot.key)
        if follower is None or follower.task_id != slot.task_id or not follower.last_line:
            return slot
        if not slot.running and slot.state == "failed" and slot.last_line:
            return slot  # a failed slot shows why (the reason), not the task's last words
        return replace(slot, last_line=follower.last_line)

    def _gpu_samples(self, slot_keys: Sequence[str]
                     ) -> dict[str, tuple[tuple[float | None, ...], tuple[float | None, ...], float | None]]:
        """Utilisation and memory series per slot (the journal's gpu_samples; empty for hosts without any)."""
        out: dict[str, tuple[tuple[float | None, ...], tuple[float | None, ...], float | None]] = {}
        with contextlib.closing(_ro_connect(self.rd.journal)) as db:
            try:
                rows = db.execute("SELECT host, gpu, util, mem_used, mem_total FROM gpu_samples "
                                  "ORDER BY host, gpu, ts").fetchall()
            except sqlite3.OperationalError:
                return out  # an older journal without the table
        series: dict[str, tuple[list[float | None], list[float | None], list[float]]] = {}
        for host, gpu, util, used, total in rows:
            u, m, t = series.setdefault(f"{host}:{gpu}", ([], [], []))
            u.append(util)
            m.append(used)
            if total is not None:
                t.append(float(total))
        for key in slot_keys:
            if key in series:
                u, m, t = series[key]
                out[key] = (tuple(u), tuple(m), max(t) if t else None)
        return out

    def _read_events(self, journal: Journal) -> tuple[Note, ...]:
        new: list[Note] = []
        while True:
            batch = journal.events(after=self._event_seq, limit=1000)
            for seq, ts, kind, _task, data in batch:
                self._event_seq = seq
                if kind == "note":
                    note = Note(ts=ts, level=str(data.get("level", "info")), text=str(data.get("text", "")))
                    new.append(note)
                elif kind == "engine-started":
                    self._engine_started, self._engine_stopped = ts, None
                elif kind == "engine-stopped":
                    self._engine_stopped = ts
            if len(batch) < 1000:
                break
        with self._lines_lock:
            self._notes.extend(new)
        return tuple(new[-NOTES_KEPT:])

    def _read_requests(self) -> tuple[tuple[RequestOutcome, ...], int]:
        """Outcomes of requests made since this reader opened the run, and how many wait unhandled."""
        with contextlib.closing(_ro_connect(self.rd.journal)) as db:
            try:
                if self._request_floor is None:
                    row = db.execute("SELECT COALESCE(MAX(seq), 0) FROM requests").fetchone()
                    self._request_floor = int(row[0])
                rows = db.execute("SELECT seq, kind, target, outcome, handled FROM requests WHERE seq > ? "
                                  "ORDER BY seq", (self._request_floor,)).fetchall()
                pending = int(db.execute("SELECT COUNT(*) FROM requests WHERE handled IS NULL").fetchone()[0])
            except sqlite3.OperationalError:
                return (), 0
        outcomes: list[RequestOutcome] = []
        for seq, kind, target, outcome, handled in rows:
            if handled is not None and seq not in self._reported:
                self._reported.add(seq)
                outcomes.append(RequestOutcome(seq=int(seq), kind=str(kind), target=target,
                                               outcome=str(outcome or "")))
        # Move the floor past every handled request so the set stays small.
        handled_seqs = sorted(int(r[0]) for r in rows if r[4] is not None)
        for seq in handled_seqs:
            if seq == self._request_floor + 1:
                self._request_floor = seq
                self._reported.discard(seq)
            else:
                break
        return tuple(outcomes), pending

    def _follow_logs(self, tasks: Sequence[TaskRow], slots: Sequence[SlotView]
                     ) -> tuple[dict[str, tuple[str, ...]], tuple[tuple[str, str], ...], dict[str, int], int]:
        by_id = {t.id: t for t in tasks}
        new: dict[str, tuple[str, ...]] = {}
        merged: list[tuple[str, str]] = []
        for slot in slots:
            lines: list[str] = []
            follower = self._followers.get(slot.key)
            if slot.task_id is None or slot.log_path is None:
                continue
            if follower is None or follower.task_id != slot.task_id or follower.attempt != slot.attempt:
                if follower is not None:
                    lines.extend(follower.tailer.poll().lines)
                    lines.extend(follower.tailer.finish())
                follower = _Follower(task_id=slot.task_id, attempt=slot.attempt,
                                     tailer=LogTailer(slot.log_path, read_limit=self.read_limit))
                self._followers[slot.key] = follower
                attempt = f" · attempt {slot.attempt}" if slot.attempt > 1 else ""
                lines.append(f"── {slot.task_label or slot.stage or slot.task_id}{attempt} ──")
            batch = follower.tailer.poll()
            if batch.skipped:
                lines.append(f"… skipped {format_bytes(batch.skipped)} to keep up; the whole output is in "
                             f"{slot.log_path}")
            lines.extend(batch.lines)
            task = by_id.get(slot.task_id)
            if task is not None and task.state != "running":
                lines.extend(follower.tailer.finish())
            for line in reversed(lines):
                # The last line that says something: not blank, not a rule of dashes, not one of our markers.
                if _MEANINGFUL.search(line) and not line.startswith(("── ", "… skipped")):
                    follower.last_line = line.strip()
                    break
            if lines:
                new[slot.key] = tuple(lines)
                merged.extend((slot.key, line) for line in lines[-self._slot_lines_max:])
        merged = merged[-(self._merged.maxlen or MERGED_LINES):]
        with self._lines_lock:
            for key, lines_ in new.items():
                buf = self._slot_lines.setdefault(key, deque(maxlen=self._slot_lines_max))
                buf.extend(lines_)
                self._slot_seq[key] = self._slot_seq.get(key, 0) + len(lines_)
            self._merged.extend(merged)
            self._merged_seq += len(merged)
            seqs = dict(self._slot_seq)
            merged_seq = self._merged_seq
        return new, tuple(merged), seqs, merged_seq

    def _results(self, loaded: LoadedRecipe | None, tasks: Sequence[TaskRow], journal: Journal
                 ) -> tuple[tuple[str, ...], tuple[Mapping[str, object], ...]]:
        """Rows of finished tasks, with the recipe's columns (plus state) in the recipe's sort order."""
        metrics = journal.metrics()
        queue_stages = {name for name, spec in zip(loaded.stage_names, loaded.recipe.stage, strict=True)
                        if isinstance(spec, QueueStage)} if loaded is not None else {t.stage for t in tasks}
        rows: list[dict[str, object]] = []
        axes: list[str] = []
        for t in tasks:
            m = metrics.get(t.id, {})
            if t.stage not in queue_stages and not m:
                continue
            for axis in t.values:
                if axis not in axes:
                    axes.append(axis)
            if t.state not in ("done", "failed", "cancelled"):
                continue
            row: dict[str, object] = {
                "task": t.id, "stage": t.stage, "label": t.label, "host": t.host, "gpu": t.gpu,
                "state": t.state, "rc": t.rc, "attempts": t.attempts,
                "duration": round(t.ended - t.started, 3) if t.ended and t.started else None,
                "started": t.started, "ended": t.ended, "log": str(self.rd.log_path(t.log_name)),
                "reason": t.reason,
            }
            row.update(t.values)
            row.update(m)
            rows.append(row)
        if loaded is not None:
            columns = select_columns(loaded.recipe.results, axes, list(loaded.metric_names))
            # The same expansion and verdicts as results.csv: one row per case (Alpa), a verdict per baseline.
            rows = sort_rows(finish_rows(rows, loaded.recipe.results), loaded.recipe.results.sort)
        else:
            columns = [*axes, *sorted({k for m in metrics.values() for k in m}), "state"]
        if "state" not in columns:
            columns.append("state")
        return tuple(columns), tuple(rows)


def unseen(batch: Sequence[str], batch_seq: int, seen_seq: int) -> list[str]:
    """The tail of `batch` (ending at sequence number `batch_seq`) that a view at `seen_seq` has not shown."""
    fresh = batch_seq - seen_seq
    if fresh <= 0:
        return []
    return list(batch[-fresh:]) if fresh < len(batch) else list(batch)


# -- plot data (pure) ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeatmapData:
    """A value per (x, y) cell of a 2-D grid; axes in first-seen (grid) order, sorted when numeric."""

    xs: tuple[object, ...]
    ys: tuple[object, ...]
    cells: Mapping[tuple[object, object], float]

    @property
    def bounds(self) -> tuple[float, float] | None:
        return (min(self.cells.values()), max(self.cells.values())) if self.cells else None


@dataclass(frozen=True)
class Series:
    """One line or bar series."""

    name: str
    xs: tuple[object, ...]
    ys: tuple[float, ...]


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _axis(values: Sequence[object]) -> tuple[object, ...]:
    unique = list(dict.fromkeys(values))
    if all(_number(v) is not None for v in unique):
        unique.sort(key=lambda v: _number(v) or 0.0)
    return tuple(unique)


def heatmap_data(rows: Sequence[Mapping[str, object]], spec: PlotSpec,
                 axes: Mapping[str, Sequence[object]] | None = None) -> HeatmapData:
    """Cells of a heatmap plot from result rows (rows without a numeric value are left out); `axes` (all
    values of each grid axis) adds the cells no result covers yet."""
    value_col = spec.value or ""
    x_col, y_col = spec.x or "", spec.y or ""
    cells: dict[tuple[object, object], float] = {}
    xs: list[object] = []
    ys: list[object] = []
    for row in rows:
        x, y, v = row.get(x_col), row.get(y_col), _number(row.get(value_col))
        if x is None or y is None:
            continue
        xs.append(x)
        ys.append(y)
        if v is not None:
            cells[(x, y)] = v
    if axes:
        xs.extend(axes.get(x_col, ()))
        ys.extend(axes.get(y_col, ()))
    return HeatmapData(xs=_axis(xs), ys=_axis(ys), cells=cells)


def plot_title(spec: PlotSpec) -> str:
    """The recipe's title, or one derived from the axes."""
    if spec.title:
        return spec.title
    if spec.kind == "heatmap":
        return f"{spec.value} over {spec.x} x {spec.y}"
    return f"{spec.y or spec.value} by {x_label(spec)}" + (f" per {spec.group}" if spec.group else "")


def x_label(spec: PlotSpec) -> str:
    """The x axis's label: `xlabel`, else the x column; a list metric's line runs over "item" (times its step)."""
    if spec.xlabel:
        return spec.xlabel
    if spec.x is not None:
        return spec.x
    return "item" if spec.step is None else f"item x {spec.step}"


def series_data(rows: Sequence[Mapping[str, object]], spec: PlotSpec) -> list[Series]:
    """Line/bar series: y (or value) over x, one series per distinct `group` value. A line without x draws a
    list metric: one series per row, over its items (see `list_series`)."""
    if spec.x is None:
        return list_series(rows, spec)
    y_col = spec.y or spec.value or ""
    groups: dict[str, list[tuple[object, float]]] = {}
    for row in rows:
        x, y = row.get(spec.x), _number(row.get(y_col))
        if x is None or y is None:
            continue
        name = str(row.get(spec.group)) if spec.group else y_col
        groups.setdefault(name, []).append((x, y))
    out: list[Series] = []
    for name, points in groups.items():
        order = _axis([p[0] for p in points])
        last: dict[object, float] = {}
        for x, y in points:
            last[x] = y
        out.append(Series(name=name, xs=order, ys=tuple(last[x] for x in order)))
    return out


def list_series(rows: Sequence[Mapping[str, object]], spec: PlotSpec) -> list[Series]:
    """One line per row holding a list in y (PACE's time_per_tokens, cpu_usage): item k (from 0) at x = k + 1,
    or at k * step with a `step` (a number, or the row's value of a column such as the sampling interval; a row
    without a numeric step has no line). Lines are named by `group`, else the trial, else the task label; rows
    sharing a name get their host, then a count, so no line hides another."""
    y_col = spec.y or ""
    lines: list[tuple[str, object, tuple[object, ...], tuple[float, ...]]] = []
    for row in rows:
        values = row.get(y_col)
        if not isinstance(values, list) or not values:
            continue
        ys = tuple(y for y in (_number(v) for v in values) if y is not None)
        if len(ys) != len(values):
            continue
        if spec.step is None:
            xs: tuple[object, ...] = tuple(range(1, len(ys) + 1))
        else:
            step = _number(row.get(spec.step)) if isinstance(spec.step, str) else spec.step
            if step is None or step <= 0:
                continue
            xs = tuple(round(k * step, 9) for k in range(len(ys)))
        name = str(row.get(spec.group) if spec.group else row.get("trial") or row.get("label") or y_col)
        lines.append((name, row.get("host"), xs, ys))
    shared = Counter(name for name, _, _, _ in lines)
    named = [f"{name} @ {host}" if shared[name] > 1 and host else name for name, host, _, _ in lines]
    totals, seen = Counter(named), Counter[str]()
    out: list[Series] = []
    for name, (_, _, xs, ys) in zip(named, lines, strict=True):
        seen[name] += 1
        out.append(Series(name=name if totals[name] == 1 else f"{name} #{seen[name]}", xs=xs, ys=ys))
    return out


# -- small formatting helpers (pure) -------------------------------------------------------------------------

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], width: int, lo: float = 0.0, hi: float | None = None) -> str:
    """The last `width` values as block characters between lo and hi (default: the largest); gaps blank."""
    tail = list(values)[-width:] if width > 0 else []
    numbers = [v for v in tail if v is not None]
    top = hi if hi is not None else (max(numbers) if numbers else 1.0)
    span = max(1e-9, top - lo)
    out = []
    for v in tail:
        if v is None:
            out.append(" ")
        else:
            level = int((min(max(v, lo), top) - lo) / span * (len(SPARK) - 1) + 0.5)
            out.append(SPARK[level])
    return "".join(out).rjust(width)


def format_duration(seconds: float | None) -> str:
    """1h02m, 3m05s, 12s; "" for None."""
    if seconds is None:
        return ""
    s = int(max(0.0, seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_value(value: object) -> str:
    """A result cell for display: floats to 4 significant digits, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    if isinstance(value, list):
        numbers = [v for v in value if isinstance(v, int | float)]
        if len(numbers) == len(value) and numbers:
            return f"[{len(numbers)}] mean {format_value(sum(numbers) / len(numbers))}"
        return f"[{len(value)}]"
    return str(value)


# -- internals -----------------------------------------------------------------------------------------------


def _eta(tasks: Sequence[TaskRow], counts: Mapping[str, int], running: Sequence[SlotView], slots: int
         ) -> float | None:
    """Seconds left: the mean duration of finished tasks times the work left, spread over the usable slots."""
    durations = [t.ended - t.started for t in tasks
                 if t.state in ("done", "failed") and t.ended is not None and t.started is not None]
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    pending = counts.get("queued", 0) + counts.get("retrying", 0)
    in_flight = sum(max(0.0, mean - (s.elapsed or 0.0)) for s in running)
    if pending == 0 and not running:
        return 0.0
    return (pending * mean + in_flight) / slots


def _grid_axes(loaded: LoadedRecipe | None) -> dict[str, tuple[object, ...]]:
    axes: dict[str, dict[object, None]] = {}
    if loaded is None:
        return {}
    for points in loaded.grids.values():
        for point in points:
            for name, value in point.items():
                axes.setdefault(name, {})[value] = None
    return {name: tuple(values) for name, values in axes.items()}


def _ro_connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)


def _json_list(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _json_dict(text: str | None) -> dict[str, object]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return dict(value) if isinstance(value, dict) else {}


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None

