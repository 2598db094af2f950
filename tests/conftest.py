"""Shared fixtures: write recipes into a temporary folder and run the real engine on them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from remote.engine import Engine, EngineOptions
from remote.events import Event, RunFinished
from remote.recipe_loader import load_recipe
from remote.rundir import prepare

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[[str], Path]:
    """Write a recipe (dedented) as tmp_path/recipe.toml and return its path."""

    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


def run_engine(recipe: Path, run_dir: Path, *, resume: bool = False,
               options: EngineOptions | None = None) -> tuple[RunFinished, list[Event]]:
    """Run the engine in-process to completion; returns the final event and every event seen."""
    events: list[Event] = []

    async def go() -> RunFinished:
        rd = prepare(run_dir, resume=resume)
        engine = Engine(load_recipe(recipe), rd, resume=resume,
                        options=options or EngineOptions(poll_interval=0.05, kill_grace=1.0))
        engine.subscribe(events.append)
        return await engine.run()

    return asyncio.run(go()), events


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real `benchfleet` entry point in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "console.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env, check=False)


def cli_popen(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "console.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env, start_new_session=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> int:
    """A base port with `count` consecutive free ports from it (pipelines count ports up per host)."""
    for _ in range(100):
        base = free_port()
        if base + count > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports")
