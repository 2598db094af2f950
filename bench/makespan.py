"""Makespan of a heterogeneous grid under each placement policy, against the lower bound and GNU parallel.

A ReDrafter-like grid (width x length) whose task durations grow with the cost expression `width * length`, spread
over a few slots. The lower bound is max(longest task, total work / slots); the simulated column is what the
policy's schedule would take with zero dispatch cost, so measured - simulated is the tools' own overhead. Run:

    python bench/makespan.py [--width 8] [--length 5] [--slots 4] [--scale 1.0] [--repeat 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import heapq
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.dispatch_overhead import (
    FIFO_SCRIPT,
    BenchError,
    Row,
    fmt,
    format_table,
    gnu_parallel,
    machine_description,
    print_machine,
    run_engine_in_process,
    run_timed,
    write_json,
)
from remote.engine import EngineOptions
from remote.grid import compile_cost
from remote.placement import assign

COST = "width * length"
"""The cost expression: both the recipe's `cost` (for longest-first) and the source of each task's duration."""

UNIT = 0.025
"""Seconds per cost unit at --scale 1: the default 8 x 5 grid sleeps 0.025 .. 1.0 s per task."""


@dataclass(frozen=True)
class Policy:
    """One way of running the grid: a benchfleet placement and order, or another tool."""

    name: str
    tool: str
    """"benchfleet", "parallel" or "fifo"."""
    placement: str = "free-slot"
    order: str = "grid"


POLICIES = (
    Policy("benchfleet free-slot (grid order)", "benchfleet"),
    Policy("benchfleet free-slot, longest-first", "benchfleet", order="longest-first"),
    Policy("benchfleet md5", "benchfleet", placement="md5"),
    Policy("benchfleet round-robin", "benchfleet", placement="round-robin"),
    Policy("GNU parallel (grid order)", "parallel"),
    Policy("bash FIFOs (run.bash style, md5)", "fifo", placement="md5"),
)


@dataclass(frozen=True)
class Cell:
    """One grid cell: its values, its md5 key (as benchfleet and run.bash form it), and how long it sleeps."""

    width: int
    length: int
    seconds: float

    @property
    def key(self) -> str:
        return f"{self.width}-{self.length}"


def make_grid(width: int, length: int, scale: float) -> list[Cell]:
    """Cells in grid order (width outermost, as the recipe's first axis), durations from the cost expression."""
    cost = compile_cost(COST, ["width", "length"])
    return [Cell(w, ln, round(UNIT * scale * cost({"width": w, "length": ln}), 3))
            for w in range(1, width + 1) for ln in range(1, length + 1)]


def lower_bound(cells: Sequence[Cell], slots: int) -> float:
    """No schedule on `slots` slots can finish sooner than this."""
    longest = max(c.seconds for c in cells)
    return max(longest, sum(c.seconds for c in cells) / slots)


def simulate(cells: Sequence[Cell], slots: int, policy: Policy) -> float:
    """The policy's makespan with zero dispatch cost: pinned queues run back to back, free slots pull greedily."""
    order = list(cells)
    if policy.order == "longest-first":
        order.sort(key=lambda c: -c.seconds)  # stable, like the planner: equal costs keep grid order
    pins = assign(policy.placement, [c.key for c in order], slots)
    if policy.placement != "free-slot":
        loads = [0.0] * slots
        for cell, pin in zip(order, pins, strict=True):
            assert pin is not None
            loads[pin] += cell.seconds
        return max(loads)
    free = [(0.0, i) for i in range(slots)]
    for cell in order:
        at, slot = heapq.heappop(free)
        heapq.heappush(free, (at + cell.seconds, slot))
    return max(at for at, _ in free)


def sleeper_script(cells: Sequence[Cell]) -> str:
    """sh script `sleep_for.sh WIDTH LENGTH` sleeping the cell's duration; a `case` costs no extra process."""
    arms = "".join(f"{c.key}) exec sleep {c.seconds:.3f} ;;\n" for c in cells)
    return ('#!/bin/sh\n# sleep_for.sh WIDTH LENGTH: sleep as long as the cost expression says for this cell\n'
            f'case "$1-$2" in\n{arms}esac\necho "sleep_for.sh: no cell $1-$2" >&2\nexit 2\n')


def recipe_text(width: int, length: int, slots: int, policy: Policy) -> str:
    lines = [
        'name = "makespan"', "[hosts.local]", f"gpus = {slots}", "", "[[stage]]", 'kind = "queue"', 'name = "sleep"',
        f'grid = {{ width = "1..{width}", length = "1..{length}" }}',
        'command = ["sh", "{recipe_dir}/sleep_for.sh", "{width}", "{length}"]',
        f'placement = "{policy.placement}"',
    ]
    if policy.order != "grid":
        lines += [f'order = "{policy.order}"', f'cost = "{COST}"']
    return "\n".join(lines) + "\n"


@dataclass
class Measured:
    policy: Policy
    makespan: Row
    total: Row
    """benchfleet: the whole in-process run, start-up included; other tools: the same as makespan."""
    simulated: float


def measure(width: int, length: int, slots: int, scale: float, repeat: int, work: Path,
            options: EngineOptions | None = None) -> list[Measured]:
    cells = make_grid(width, length, scale)
    sleeper = work / "sleep_for.sh"
    sleeper.write_text(sleeper_script(cells))
    commands = work / "commands.txt"
    commands.write_text("".join(f"sh {shlex.quote(str(sleeper))} {c.width} {c.length}\n" for c in cells))
    tasks = work / "tasks.txt"
    tasks.write_text("".join(f"{c.key} sh {shlex.quote(str(sleeper))} {c.width} {c.length}\n" for c in cells))
    fifo_script = work / "fifo.bash"
    fifo_script.write_text(FIFO_SCRIPT)
    parallel = gnu_parallel()
    policies = [p for p in POLICIES if p.tool != "parallel" or parallel is not None]
    results = [Measured(p, Row(p.name), Row(p.name), simulate(cells, slots, p)) for p in policies]
    runs = 0
    for _ in range(repeat):
        for m in results:  # each round runs every policy once, so drift in machine load hits them alike
            runs += 1
            run_dir = work / f"run{runs}"
            if m.policy.tool == "benchfleet":
                recipe = work / f"recipe{runs}.toml"
                recipe.write_text(recipe_text(width, length, slots, m.policy))
                timing = run_engine_in_process(recipe, run_dir, options)
                m.makespan.add(timing.dispatch, timing.cpu)
                m.total.add(timing.total)
            elif m.policy.tool == "parallel":
                assert parallel is not None
                usage = run_timed([parallel, "--will-cite", f"-j{slots}"], cwd=work, stdin=commands)
                m.makespan.add_usage(usage)
                m.total.add(usage.wall)
            else:
                run_dir.mkdir()
                usage = run_timed(["bash", str(fifo_script), str(slots), str(tasks), str(run_dir)], cwd=work)
                m.makespan.add_usage(usage)
                m.total.add(usage.wall)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Makespan of a heterogeneous sleep grid under each placement policy, "
                                "against the lower bound, GNU parallel and run.bash-style FIFOs.")
    p.add_argument("--width", type=int, default=8, help="values of the outer grid axis, 1..N (default 8)")
    p.add_argument("--length", type=int, default=5, help="values of the inner grid axis, 1..N (default 5)")
    p.add_argument("--slots", type=int, default=4, help="slots, i.e. tasks at once (default 4)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every duration (default 1.0: 0.025 s per "
                   "cost unit; 0.1 makes a quick run)")
    p.add_argument("--repeat", type=int, default=3, help="rounds, each running every policy once (default 3)")
    p.add_argument("--poll-interval", type=float, metavar="SECONDS", help="the engine's poll_interval (default: "
                   f"the engine's own, {EngineOptions().poll_interval} s): how late, at most, it notices an exit")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    ns = p.parse_args(argv)
    if ns.width < 1 or ns.length < 1 or ns.slots < 1 or ns.repeat < 1:
        p.error("--width, --length, --slots and --repeat must be at least 1")
    if not 0 < ns.scale <= 100:
        p.error("--scale must be above 0 and at most 100")
    if ns.poll_interval is not None and not 0 < ns.poll_interval <= 10:
        p.error("--poll-interval must be above 0 and at most 10 seconds")
    options = EngineOptions() if ns.poll_interval is None else EngineOptions(poll_interval=ns.poll_interval)
    machine = machine_description()
    cells = make_grid(ns.width, ns.length, ns.scale)
    bound = lower_bound(cells, ns.slots)
    try:
        with tempfile.TemporaryDirectory(prefix="benchfleet-bench-") as tmp:
            results = measure(ns.width, ns.length, ns.slots, ns.scale, ns.repeat, Path(tmp), options)
    except BenchError as exc:
        print(f"makespan: {exc}", file=sys.stderr)
        return 1

    total_work = sum(c.seconds for c in cells)
    print(f"makespan: {len(cells)} tasks ({ns.width} x {ns.length} grid, sleep {min(c.seconds for c in cells):.3f}"
          f"..{max(c.seconds for c in cells):.3f} s, cost = {COST}) over {ns.slots} slots, {ns.repeat} rounds, "
          f"engine poll_interval {options.poll_interval} s")
    print(f"total work {total_work:.3f} s; lower bound max(longest, work / slots) = {bound:.3f} s")
    print_machine(machine)
    if gnu_parallel() is None:
        print("GNU parallel not found (or not GNU's): its row is left out; install it with `apt-get install parallel`")
    print()
    headers = ["policy", "median s", "min s", "vs bound", "simulated s", "sim vs bound", "overhead s",
               "incl. start-up s"]
    table = [[m.policy.name, fmt(m.makespan.median), fmt(m.makespan.min), fmt(m.makespan.median / bound, 2),
              fmt(m.simulated), fmt(m.simulated / bound, 2), fmt(m.makespan.median - m.simulated),
              fmt(m.total.median)] for m in results]
    print(format_table(headers, table))
    print("\nbenchfleet: in-process engine, first TaskStarted to RunFinished (start-up in the last column); other "
          "tools: whole command.\nsimulated = the same schedule with zero dispatch cost; overhead = median - "
          "simulated.")
    if ns.json is not None:
        write_json(ns.json, {
            "benchmark": "makespan", "machine": machine,
            "params": {"width": ns.width, "length": ns.length, "slots": ns.slots, "scale": ns.scale,
                       "repeat": ns.repeat, "cost": COST, "unit_s": UNIT, "poll_interval_s": options.poll_interval},
            "durations_s": [c.seconds for c in cells], "total_work_s": total_work, "lower_bound_s": bound,
            "rows": [{"name": m.policy.name, "placement": m.policy.placement, "order": m.policy.order,
                      "seconds": m.makespan.seconds, "median_s": m.makespan.median, "min_s": m.makespan.min,
                      "vs_bound": m.makespan.median / bound, "simulated_s": m.simulated,
                      "overhead_s": m.makespan.median - m.simulated, "total_s": m.total.seconds}
                     for m in results],
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
