"""The journal: one SQLite file (WAL) per run holding tasks, attempts, events, metrics and log offsets.

It is the run's memory: `--resume` and every viewer read it. Writes happen in short transactions from the engine's
single thread; readers (the console, `attach`) open it read-only and never block the engine, thanks to WAL.
Task rows are keyed by the task's content hash, so a resumed run matches finished cells whatever the grid order.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

JOURNAL_NAME = "journal.sqlite"
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks(
    id TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    idx INTEGER NOT NULL,
    label TEXT NOT NULL,
    log_name TEXT NOT NULL,
    values_json TEXT NOT NULL,
    argv_json TEXT NOT NULL,
    env_json TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    rc INTEGER,
    reason TEXT,
    host TEXT,
    gpu INTEGER,
    started REAL,
    ended REAL,
    progress_done INTEGER,
    progress_total INTEGER,
    last_line TEXT,
    in_plan INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS attempts(
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    host TEXT NOT NULL,
    gpu INTEGER NOT NULL,
    name TEXT NOT NULL,
    task_dir TEXT,
    pid INTEGER,
    pid_start INTEGER,
    state TEXT NOT NULL,
    rc INTEGER,
    reason TEXT,
    started REAL NOT NULL,
    ended REAL,
    out_offset INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(task_id, attempt)
);
CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    task_id TEXT,
    data TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS metrics(
    task_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY(task_id, name)
);
CREATE TABLE IF NOT EXISTS requests(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    target TEXT,
    data TEXT NOT NULL DEFAULT '{}',
    handled REAL,
    outcome TEXT
);
CREATE TABLE IF NOT EXISTS gpu_samples(
    host TEXT NOT NULL,
    gpu INTEGER NOT NULL,
    ts REAL NOT NULL,
    util REAL,
    mem_used REAL,
    mem_total REAL
);
CREATE INDEX IF NOT EXISTS gpu_samples_slot ON gpu_samples(host, gpu, ts);
CREATE INDEX IF NOT EXISTS tasks_stage ON tasks(stage, state);
CREATE INDEX IF NOT EXISTS attempts_state ON attempts(state);
"""

TASK_STATES = ("queued", "running", "done", "failed", "cancelled")
"""Task states; a queued task with attempts > 0 is waiting for a retry."""

REQUEST_KINDS = ("cancel", "retry-failed", "pause", "resume", "stop")
"""What a viewer may ask the engine (requests table): cancel TASK_ID; retry-failed [STAGE]; pause [SLOT] and
resume [SLOT] (no target: the whole queue); stop. The engine records an outcome line for each."""

GPU_SAMPLES_KEPT = 120
"""Samples kept per GPU (at one per 5 s: ten minutes of sparkline); older ones are deleted as new ones arrive."""


@dataclass(frozen=True)
class TaskRow:
    """A task as the journal holds it."""

    id: str
    stage: str
    idx: int
    label: str
    log_name: str
    values: dict[str, object]
    state: str
    attempts: int
    rc: int | None
    reason: str | None
    host: str | None
    gpu: int | None
    started: float | None
    ended: float | None
    progress_done: int | None
    progress_total: int | None
    last_line: str | None


@dataclass(frozen=True)
class AttemptRow:
    """One launch of a task."""

    task_id: str
    attempt: int
    host: str
    gpu: int
    name: str
    task_dir: str | None
    pid: int | None
    pid_start: int | None
    state: str
    rc: int | None
    started: float
    ended: float | None
    out_offset: int


def create_private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 unless it exists (SQLite gives its -wal/-shm files the same mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class Journal:
    """Read/write access to a run's journal; one instance per engine."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        else:
            create_private_file(path)
            self._db = sqlite3.connect(path, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('schema', ?)", (SCHEMA_VERSION,))
            self._db.commit()
        self._db.row_factory = sqlite3.Row
        self._depth = 0

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes so that a crash leaves either all of them or none."""
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._db.rollback()
            raise
        self._depth -= 1
        if self._depth == 0:
            self._db.commit()

    def _write(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        cur = self._db.execute(sql, params)
        if self._depth == 0:
            self._db.commit()
        return cur

    # -- meta ---------------------------------------------------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (key, value))

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    # -- tasks --------------------------------------------------------------------------------------------------

    def upsert_task(self, *, task_id: str, stage: str, idx: int, label: str, log_name: str,
                    values: Mapping[str, object], argv: Sequence[str], env: Mapping[str, str]) -> None:
        """Record a planned task; an existing row (from an earlier run) keeps its state and history."""
        self._write(
            "INSERT INTO tasks(id, stage, idx, label, log_name, values_json, argv_json, env_json) "
            "VALUES(?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET idx=excluded.idx, in_plan=1",
            (task_id, stage, idx, label, log_name, json.dumps(dict(values)), json.dumps(list(argv)),
             json.dumps(dict(env))),
        )

    def mark_plan(self, task_ids: Sequence[str]) -> None:
        """Flag the tasks of the current plan; rows from an earlier, larger plan stay but are not shown as pending."""
        with self.transaction():
            self._db.execute("UPDATE tasks SET in_plan=0")
            self._db.executemany("UPDATE tasks SET in_plan=1 WHERE id=?", [(t,) for t in task_ids])

    def task(self, task_id: str) -> TaskRow | None:
        row = self._db.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
        return None if row is None else _task_row(row)

    def tasks(self, stage: str | None = None, *, in_plan_only: bool = True) -> list[TaskRow]:
        sql = "SELECT * FROM tasks WHERE 1=1"
        params: list[object] = []
        if in_plan_only:
            sql += " AND in_plan=1"
        if stage is not None:
            sql += " AND stage=?"
            params.append(stage)
        sql += " ORDER BY stage, idx"
        return [_task_row(r) for r in self._db.execute(sql, params)]

    def set_task_state(self, task_id: str, state: str, **fields: object) -> None:
        allowed = {"attempts", "rc", "reason", "host", "gpu", "started", "ended", "progress_done", "progress_total",
                   "last_line"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown task fields {sorted(unknown)}")
        cols = ", ".join(f"{k}=?" for k in fields)
        sql = f"UPDATE tasks SET state=?{', ' + cols if cols else ''} WHERE id=?"  # noqa: S608 (names checked above)
        self._write(sql, (state, *fields.values(), task_id))

    def set_progress(self, task_id: str, done: int | None, total: int | None, last_line: str | None) -> None:
        self._write("UPDATE tasks SET progress_done=?, progress_total=?, last_line=? WHERE id=?",
                    (done, total, last_line, task_id))

    def counts(self, stage: str | None = None) -> dict[str, int]:
        """Tasks per state (retrying = queued after a failed attempt), for the current plan."""
        sql = ("SELECT CASE WHEN state='queued' AND attempts>0 THEN 'retrying' ELSE state END AS s, COUNT(*) AS n "
               "FROM tasks WHERE in_plan=1")
        params: list[object] = []
        if stage is not None:
            sql += " AND stage=?"
            params.append(stage)
        sql += " GROUP BY s"
        out = dict.fromkeys((*TASK_STATES, "retrying"), 0)
        for row in self._db.execute(sql, params):
            out[str(row["s"])] = int(row["n"])
        return out

    # -- attempts -----------------------------------------------------------------------------------------------

    def begin_attempt(self, *, task_id: str, attempt: int, host: str, gpu: int, name: str) -> None:
        """Record an attempt BEFORE launching it, so a crash mid-launch is found and never launched twice."""
        now = time.time()
        with self.transaction():
            self._db.execute(
                "INSERT INTO attempts(task_id, attempt, host, gpu, name, state, started) "
                "VALUES(?, ?, ?, ?, ?, 'launching', ?)",
                (task_id, attempt, host, gpu, name, now),
            )
            self._db.execute(
                "UPDATE tasks SET state='running', attempts=?, host=?, gpu=?, started=?, ended=NULL, rc=NULL, "
                "reason=NULL, progress_done=NULL, progress_total=NULL, last_line=NULL WHERE id=?",
                (attempt, host, gpu, now, task_id),
            )

    def next_attempt(self, task_id: str) -> int:
        """The next attempt number (attempts are never renumbered: interrupted ones keep theirs)."""
        row = self._db.execute("SELECT MAX(attempt) AS n FROM attempts WHERE task_id=?", (task_id,)).fetchone()
        return int(row["n"] or 0) + 1

    def attempt_launched(self, task_id: str, attempt: int, task_dir: str, pid: int, pid_start: int) -> None:
        self._write("UPDATE attempts SET state='running', task_dir=?, pid=?, pid_start=? WHERE task_id=? AND attempt=?",
                    (task_dir, pid, pid_start, task_id, attempt))

    def set_offset(self, task_id: str, attempt: int, offset: int) -> None:
        self._write("UPDATE attempts SET out_offset=? WHERE task_id=? AND attempt=?", (offset, task_id, attempt))

    def end_attempt(self, task_id: str, attempt: int, state: str, rc: int | None, reason: str) -> None:
        self._write("UPDATE attempts SET state=?, rc=?, reason=?, ended=? WHERE task_id=? AND attempt=?",
                    (state, rc, reason, time.time(), task_id, attempt))

    def open_attempts(self) -> list[AttemptRow]:
        """Attempts that were launching or running when the engine last stopped (to reattach or reconcile)."""
        rows = self._db.execute(
            "SELECT * FROM attempts WHERE state IN ('launching', 'running') ORDER BY started")
        return [_attempt_row(r) for r in rows]

    def attempts(self, task_id: str) -> list[AttemptRow]:
        rows = self._db.execute("SELECT * FROM attempts WHERE task_id=? ORDER BY attempt", (task_id,))
        return [_attempt_row(r) for r in rows]

    # -- metrics and events -------------------------------------------------------------------------------------

    def set_metrics(self, task_id: str, values: Mapping[str, object]) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM metrics WHERE task_id=?", (task_id,))
            self._db.executemany("INSERT INTO metrics(task_id, name, value) VALUES(?, ?, ?)",
                                 [(task_id, k, json.dumps(v)) for k, v in values.items()])

    def metrics(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        for row in self._db.execute("SELECT task_id, name, value FROM metrics"):
            out.setdefault(str(row["task_id"]), {})[str(row["name"])] = json.loads(row["value"])
        return out

    def event(self, kind: str, task_id: str | None = None, **data: object) -> None:
        self._write("INSERT INTO events(ts, kind, task_id, data) VALUES(?, ?, ?, ?)",
                    (time.time(), kind, task_id, json.dumps(data, default=str)))

    def events(self, after: int = 0, limit: int = 1000) -> list[tuple[int, float, str, str | None, dict[str, object]]]:
        rows = self._db.execute("SELECT * FROM events WHERE seq>? ORDER BY seq LIMIT ?", (after, limit))
        return [(int(r["seq"]), float(r["ts"]), str(r["kind"]), r["task_id"], json.loads(r["data"])) for r in rows]

    # -- GPU samples --------------------------------------------------------------------------------------------

    def add_gpu_samples(self, host: str,
                        samples: Sequence[tuple[int, float | None, float | None, float | None]]) -> None:
        """Record (gpu, util %, MiB used, MiB total) samples taken now, keeping the last GPU_SAMPLES_KEPT per GPU."""
        now = time.time()
        with self.transaction():
            self._db.executemany(
                "INSERT INTO gpu_samples(host, gpu, ts, util, mem_used, mem_total) VALUES(?, ?, ?, ?, ?, ?)",
                [(host, gpu, now, util, used, total) for gpu, util, used, total in samples])
            for gpu, *_ in samples:
                self._db.execute(
                    "DELETE FROM gpu_samples WHERE host=? AND gpu=? AND ts < (SELECT MIN(ts) FROM (SELECT ts FROM "
                    "gpu_samples WHERE host=? AND gpu=? ORDER BY ts DESC LIMIT ?))",
                    (host, gpu, host, gpu, GPU_SAMPLES_KEPT))

    def gpu_samples(self, host: str, gpu: int, limit: int = GPU_SAMPLES_KEPT) -> list[tuple[float, float | None,
                                                                                           float | None]]:
        """(ts, util %, MiB used) oldest first."""
        rows = self._db.execute("SELECT ts, util, mem_used FROM gpu_samples WHERE host=? AND gpu=? ORDER BY ts DESC "
                                "LIMIT ?", (host, gpu, limit)).fetchall()
        return [(float(r["ts"]), r["util"], r["mem_used"]) for r in reversed(rows)]

    # -- requests from viewers ----------------------------------------------------------------------------------

    def add_request(self, kind: str, target: str | None = None, **data: object) -> int:
        cur = self._write("INSERT INTO requests(ts, kind, target, data) VALUES(?, ?, ?, ?)",
                          (time.time(), kind, target, json.dumps(data)))
        return int(cur.lastrowid or 0)

    def pending_requests(self) -> list[tuple[int, str, str | None, dict[str, object]]]:
        rows = self._db.execute("SELECT * FROM requests WHERE handled IS NULL ORDER BY seq")
        return [(int(r["seq"]), str(r["kind"]), r["target"], json.loads(r["data"])) for r in rows]

    def handle_request(self, seq: int, outcome: str) -> None:
        self._write("UPDATE requests SET handled=?, outcome=? WHERE seq=?", (time.time(), outcome, seq))


def _task_row(r: sqlite3.Row) -> TaskRow:
    return TaskRow(
        id=r["id"], stage=r["stage"], idx=r["idx"], label=r["label"], log_name=r["log_name"],
        values=json.loads(r["values_json"]), state=r["state"], attempts=r["attempts"], rc=r["rc"],
        reason=r["reason"], host=r["host"], gpu=r["gpu"], started=r["started"], ended=r["ended"],
        progress_done=r["progress_done"], progress_total=r["progress_total"], last_line=r["last_line"],
    )


def _attempt_row(r: sqlite3.Row) -> AttemptRow:
    return AttemptRow(
        task_id=r["task_id"], attempt=r["attempt"], host=r["host"], gpu=r["gpu"], name=r["name"],
        task_dir=r["task_dir"], pid=r["pid"], pid_start=r["pid_start"], state=r["state"], rc=r["rc"],
        started=r["started"], ended=r["ended"], out_offset=r["out_offset"],
    )
