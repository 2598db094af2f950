"""The recipe's plots written into the run directory after a headless run: text for terminals, PNG with matplotlib."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from tests.conftest import cli

Writer = Callable[..., Path]


def test_headless_run_writes_heatmap_and_bar_plots(write_recipe: Writer, tmp_path: Path) -> None:
    recipe = write_recipe("""
        name = "plots"
        [hosts.here]
        gpus = 2
        [[stage]]
        kind = "queue"
        grid = { beam_length = "2..3", beam_width = "1..3" }
        command = "sh -c 'echo Tokens/second $(({beam_width} * 100 + {beam_length}))'"
        [metrics]
        tokens_per_sec = '^Tokens/second\\s+([\\d.]+)'
        [[plot]]
        kind = "heatmap"
        title = "tokens/s over beam width x beam length"
        x = "beam_width"
        y = "beam_length"
        value = "tokens_per_sec"
        [[plot]]
        kind = "bar"
        x = "beam_width"
        y = "tokens_per_sec"
        group = "beam_length"
    """)
    run = tmp_path / "run"
    result = cli("--recipe", str(recipe), "--run-dir", str(run))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"plots: {run / 'plots'}" in result.stdout
    heat = (run / "plots" / "1-tokens_s_over_beam_width_x_beam_length.txt").read_text()
    lines = heat.splitlines()
    assert lines[0] == "tokens/s over beam width x beam length"
    # One row per beam_length, one column per beam_width, every cell's value printed.
    row2 = next(line for line in lines if line.startswith("2 "))
    row3 = next(line for line in lines if line.startswith("3 "))
    assert [v.strip("░▒▓█") for v in row2.split()[1:]] == ["102", "202", "302"]
    assert [v.strip("░▒▓█") for v in row3.split()[1:]] == ["103", "203", "303"]
    assert "min 102, max 303" in heat
    bar = next((run / "plots").glob("2-*.txt")).read_text()
    assert "tokens_per_sec" in bar
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    if importlib.util.find_spec("matplotlib") is not None:
        assert len(pngs) == 2
        assert (run / "plots" / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert pngs == [] and "install matplotlib" in result.stdout
