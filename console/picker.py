"""What `benchfleet` alone offers: the recipes in ./recipes and the recent runs in ./runs (no Textual).

Reading is cheap and forgiving: a recipe that does not validate is listed with its one-line error (so the
person sees why it cannot start), and a run directory whose journal cannot be read is listed as such.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from remote.journal import JOURNAL_NAME
from remote.recipe_loader import RecipeError, load_recipe

RUNS_LISTED = 30
"""Most recent run directories listed."""


@dataclass(frozen=True)
class RecipeEntry:
    """A recipe file: its name and description, or the error that keeps it from running."""

    path: Path
    name: str
    description: str
    error: str | None


@dataclass(frozen=True)
class RunEntry:
    """A run directory: its recipe, state and task counts."""

    path: Path
    recipe: str
    state: str
    done: int
    failed: int
    total: int
    modified: float


def find_recipes(folder: Path) -> list[RecipeEntry]:
    """Recipe files (*.toml) directly in `folder`, by name."""
    if not folder.is_dir():
        return []
    entries: list[RecipeEntry] = []
    for path in sorted(folder.glob("*.toml")):
        try:
            loaded = load_recipe(path)
        except RecipeError as exc:
            entries.append(RecipeEntry(path=path, name=path.stem, description="", error=str(exc)))
            continue
        first = loaded.recipe.description.strip().splitlines()
        entries.append(RecipeEntry(path=path, name=loaded.recipe.name, description=first[0] if first else "",
                                   error=None))
    return entries


def find_runs(folder: Path, limit: int = RUNS_LISTED) -> list[RunEntry]:
    """Run directories (holding a journal) directly in `folder`, newest first."""
    if not folder.is_dir():
        return []
    found: list[tuple[float, Path]] = []
    for child in folder.iterdir():
        journal = child / JOURNAL_NAME
        with contextlib.suppress(OSError):
            if child.is_dir() and journal.exists():
                newest = max(journal.stat().st_mtime, _mtime(child / f"{JOURNAL_NAME}-wal"))
                found.append((newest, child))
    found.sort(reverse=True)
    return [_run_entry(path, mtime) for mtime, path in found[:limit]]


def _mtime(path: Path) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _run_entry(path: Path, mtime: float) -> RunEntry:
    uri = f"file:{path / JOURNAL_NAME}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=2.0)) as db:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            counts = dict(db.execute("SELECT state, COUNT(*) FROM tasks WHERE in_plan=1 GROUP BY state")
                          .fetchall())
    except sqlite3.Error:
        return RunEntry(path=path, recipe=path.name, state="unreadable", done=0, failed=0, total=0,
                        modified=mtime)
    return RunEntry(path=path, recipe=str(meta.get("recipe", path.name)),
                    state=str(meta.get("state", "starting")), done=int(counts.get("done", 0)),
                    failed=int(counts.get("failed", 0)), total=sum(int(n) for n in counts.values()),
                    modified=mtime)
