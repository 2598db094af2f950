"""Per-task dispatch overhead of benchfleet's local transport, against GNU parallel and run.bash-style FIFOs.

A grid of no-op tasks (`true`) over a few slots: the makespan is almost all dispatch cost (launch, notice the exit,
journal it), so makespan / tasks is the price each task pays for being run by the tool. Run on demand:

    python bench/dispatch_overhead.py [--tasks 200] [--slots 4] [--repeat 5] [--json PATH]

The helpers below (timed commands, the FIFO script, tables, machine description) are shared with makespan.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from remote.engine import Engine, EngineError, EngineOptions
from remote.events import Event, RunFinished, TaskStarted
from remote.recipe_loader import RecipeError, load_recipe
from remote.rundir import prepare

REPO = Path(__file__).resolve().parent.parent

TIME = "/usr/bin/time"
"""GNU time, for the peak RSS of a command; without it the RSS column stays empty."""

FIFO_SCRIPT = r"""#!/usr/bin/env bash
# Minimal form of ReDrafter's recurrent_drafting/benchmark/perf_wrt_candidates/run.bash: one FIFO per GPU slot,
# each task placed by md5(key) mod slots, one `while read -r task; do eval "$task"; done < fifo &` loop per slot,
# output of each task merged and appended to its slot's log with tee.
# usage: bash fifo.bash SLOTS TASK_FILE WORK_DIR   (TASK_FILE lines: KEY COMMAND...)
set -e
set -o pipefail
slots=$1; task_file=$2; work=$3

function run_on_gpu() {
    local gpu_id=$1
    shift
    "$@" 2>&1 | tee --append "$work/gpu-$gpu_id.log"
}

for ((gpu_id = 0; gpu_id < slots; gpu_id++)); do
    rm -f "$work/gpu-$gpu_id.queue" "$work/gpu-$gpu_id.log"
    mkfifo "$work/gpu-$gpu_id.queue"
done

for ((gpu_id = 0; gpu_id < slots; gpu_id++)); do
    while read -r task; do
        eval "$task"
    done < "$work/gpu-$gpu_id.queue" &
done

# run.bash starts one background `echo ... >> fifo &` per task; one writer per FIFO held open here feeds the same
# loops without its race (a reader that sees end-of-file before a late writer opened the FIFO drops that task).
declare -a queue
for ((gpu_id = 0; gpu_id < slots; gpu_id++)); do
    exec {fd}>"$work/gpu-$gpu_id.queue"
    queue[gpu_id]=$fd
done
while read -r key command; do
    hash=$(echo "$key" | md5sum | cut -c 1-8)
    gpu_id=$((16#$hash % slots))
    echo "run_on_gpu $gpu_id $command" >&"${queue[gpu_id]}"
done < "$task_file"
for fd in "${queue[@]}"; do
    exec {fd}>&-
done
wait
for ((gpu_id = 0; gpu_id < slots; gpu_id++)); do
    rm "$work/gpu-$gpu_id.queue"
done
"""


class BenchError(Exception):
    """A benchmark cannot run (a tool failed or is missing); one line saying what to do."""


@dataclass
class Row:
    """One measured quantity over the repeats: seconds per repeat, and the peak RSS where it was measured."""

    name: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    per_task: bool = True
    """Whether dividing by the task count means something (false for start-up figures)."""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def peak_rss_mib(self) -> float | None:
        return max(self.rss_kib) / 1024 if self.rss_kib else None

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu) if self.cpu else None

    def add(self, seconds: float, cpu: float | None = None, rss_kib: int | None = None) -> None:
        self.seconds.append(seconds)
        if cpu is not None:
            self.cpu.append(cpu)
        if rss_kib is not None:
            self.rss_kib.append(rss_kib)

    def add_usage(self, usage: Usage) -> None:
        self.add(usage.wall, usage.cpu, usage.rss_kib)


@dataclass
class Usage:
    """What one run of a command cost: wall seconds, CPU seconds of its whole tree, peak RSS in KiB."""

    wall: float
    cpu: float | None = None
    rss_kib: int | None = None


@dataclass
class EngineTiming:
    """One in-process engine run: run() call to return, start-up before the first task, first task to finish."""

    total: float
    startup: float
    dispatch: float
    cpu: float
    """CPU seconds of this process and of the task processes it reaped, during the run."""


def run_timed(argv: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None,
              stdin: Path | None = None) -> Usage:
    """Run a command to completion: its wall seconds, CPU seconds and peak RSS (largest process of its tree).

    The RSS comes from GNU time, which forks the command from its own small process: a child forked from this
    Python process would report this process's memory as its own (the peak survives fork and exec).
    """
    rss_file = cwd / ".peak-rss"
    timed = [TIME, "-f", "%M %U %S", "-o", str(rss_file), *argv] if os.access(TIME, os.X_OK) else list(argv)
    with open(stdin, "rb") if stdin is not None else open(os.devnull, "rb") as stdin_f:
        start = time.perf_counter()
        proc = subprocess.run(timed, cwd=cwd, env=env, stdin=stdin_f, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, check=False)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise BenchError(f"`{' '.join(argv)}` exited {proc.returncode}: {tail[-1] if tail else 'no output'}")
    usage = Usage(wall=wall)
    if rss_file.exists():
        lines = rss_file.read_text().strip().splitlines()
        rss_file.unlink()
        fields = lines[-1].split() if lines else []
        with contextlib.suppress(ValueError, IndexError):
            usage.rss_kib = int(fields[0])
            usage.cpu = float(fields[1]) + float(fields[2])
    return usage


def run_engine_in_process(recipe: Path, run_dir: Path, options: EngineOptions | None = None) -> EngineTiming:
    """Run the engine in this process with its default options, timing it from its own events."""
    first_start: list[float] = []
    finished: list[float] = []

    def on_event(event: Event) -> None:
        if isinstance(event, TaskStarted) and not first_start:
            first_start.append(time.perf_counter())
        elif isinstance(event, RunFinished):
            finished.append(time.perf_counter())

    async def go() -> RunFinished:
        engine = Engine(load_recipe(recipe), prepare(run_dir, resume=False), resume=False,
                        options=options or EngineOptions())
        engine.subscribe(on_event)
        return await engine.run()

    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    try:
        result = asyncio.run(go())
    except (EngineError, RecipeError) as exc:
        raise BenchError(f"the engine could not run {recipe}: {exc}") from None
    end = time.perf_counter()
    if result.counts.get("done", 0) == 0 or any(n for state, n in result.counts.items() if state != "done"):
        raise BenchError(f"the engine run in {run_dir} did not finish every task: {result.counts}")
    t_first = first_start[0] if first_start else end
    t_done = finished[0] if finished else end
    return EngineTiming(total=end - start, startup=t_first - start, dispatch=t_done - t_first,
                        cpu=_cpu_seconds() - cpu_before)


def _cpu_seconds() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def benchfleet_argv(*args: str) -> list[str]:
    """The `benchfleet` command, run by this interpreter (the installed script minus any pyenv shim)."""
    return [sys.executable, "-m", "console.cli", *args]


def benchfleet_env(work: Path) -> dict[str, str]:
    """Environment for `benchfleet` commands: bytecode cached under `work`, as an installed package would have it.

    (PYTHONDONTWRITEBYTECODE, set in some sandboxes, would make every start compile every module again.)
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONPYCACHEPREFIX": str(work / "pycache")}


def gnu_parallel() -> str | None:
    """Path of GNU parallel, or None when it is missing (or is moreutils' parallel, which differs)."""
    path = shutil.which("parallel")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if "GNU parallel" in out else None


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def machine_description() -> dict[str, str]:
    """What the figures were measured on, for the README and the JSON output."""
    cpu = "unknown"
    mem = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "parallel": tool_version(["parallel", "--version"]) if gnu_parallel() else "missing",
        "bash": tool_version(["bash", "--version"]),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                              strict=True)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_json(path: Path, payload: dict[str, object]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def print_machine(machine: dict[str, str]) -> None:
    print("; ".join(f"{k}: {v}" for k, v in machine.items()))


# -- this benchmark ----------------------------------------------------------------------------------------------


def noop_recipe(tasks: int, slots: int) -> str:
    return (f'name = "dispatch"\n[hosts.local]\ngpus = {slots}\n\n'
            f'[[stage]]\nkind = "queue"\nname = "noop"\ngrid = {{ i = "1..{tasks}" }}\ncommand = "true"\n')


def measure(tasks: int, slots: int, repeat: int, work: Path) -> list[Row]:
    """Every row, each tool measured once per round (rounds interleave the tools so drift hits them alike)."""
    recipe = work / "noop.toml"
    recipe.write_text(noop_recipe(tasks, slots))
    task_file = work / "tasks.txt"
    task_file.write_text("".join(f"{i} true\n" for i in range(1, tasks + 1)))
    fifo_script = work / "fifo.bash"
    fifo_script.write_text(FIFO_SCRIPT)
    parallel = gnu_parallel()

    command = Row("benchfleet --recipe (whole command)")
    engine_total = Row("engine in-process: run() to RunFinished")
    engine_dispatch = Row("engine in-process: first TaskStarted to RunFinished")
    engine_startup = Row("engine in-process: start-up, run() to first TaskStarted", per_task=False)
    cli_startup = Row("benchfleet --help (interpreter + imports)", per_task=False)
    par = Row(f"GNU parallel -j{slots}")
    fifo = Row("bash FIFOs (run.bash style, md5)")
    runs = 0

    def next_dir() -> Path:
        nonlocal runs
        runs += 1
        return work / f"run{runs}"

    for round_ in range(repeat + 1):
        keep = round_ > 0  # the first round fills caches (imports, page cache) and is not recorded
        usage = run_timed(benchfleet_argv("--recipe", str(recipe), "--run-dir", str(next_dir())), cwd=work,
                          env=benchfleet_env(work))
        timing = run_engine_in_process(recipe, next_dir())
        startup = run_timed(benchfleet_argv("--help"), cwd=work, env=benchfleet_env(work))
        fifo_dir = next_dir()
        fifo_dir.mkdir()
        fifo_usage = run_timed(["bash", str(fifo_script), str(slots), str(task_file), str(fifo_dir)], cwd=work)
        par_usage = None
        if parallel is not None:
            par_usage = run_timed(["bash", "-c", f"seq {tasks} | {parallel} --will-cite -j{slots} true"], cwd=work)
        if keep:
            command.add_usage(usage)
            engine_total.add(timing.total, timing.cpu)
            engine_dispatch.add(timing.dispatch)
            engine_startup.add(timing.startup)
            cli_startup.add_usage(startup)
            fifo.add_usage(fifo_usage)
            if par_usage is not None:
                par.add_usage(par_usage)
    rows = [command, engine_total, engine_dispatch, engine_startup, cli_startup]
    if parallel is not None:
        rows.append(par)
    rows.append(fifo)
    return rows


def ratio(row: Row, base: Row | None) -> float | None:
    if base is None or not base.seconds or not row.per_task:
        return None
    return row.median / base.median


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Per-task dispatch overhead: no-op tasks over local slots, benchfleet "
                                "against GNU parallel and run.bash-style FIFOs.")
    p.add_argument("--tasks", type=int, default=200, help="no-op tasks in the grid (default 200)")
    p.add_argument("--slots", type=int, default=4, help="slots, i.e. tasks at once (default 4)")
    p.add_argument("--repeat", type=int, default=5, help="measured rounds after one warm-up round (default 5)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    ns = p.parse_args(argv)
    if ns.tasks < 1 or ns.slots < 1 or ns.repeat < 1:
        p.error("--tasks, --slots and --repeat must be at least 1")
    machine = machine_description()
    try:
        with tempfile.TemporaryDirectory(prefix="benchfleet-bench-") as tmp:
            rows = measure(ns.tasks, ns.slots, ns.repeat, Path(tmp))
    except BenchError as exc:
        print(f"dispatch_overhead: {exc}", file=sys.stderr)
        return 1
    by_name = {r.name: r for r in rows}
    par = next((r for r in rows if r.name.startswith("GNU parallel")), None)
    fifo = by_name["bash FIFOs (run.bash style, md5)"]

    print(f"dispatch overhead: {ns.tasks} x `true` over {ns.slots} slots, {ns.repeat} rounds (+1 warm-up); "
          "seconds, median and min over the rounds")
    print_machine(machine)
    if par is None:
        print("GNU parallel not found (or not GNU's): its row is left out; install it with `apt-get install parallel`")
    print()
    headers = ["measurement", "median s", "min s", "ms/task", "CPU s", "peak RSS MiB", "vs parallel", "vs bash"]
    table = [[r.name, fmt(r.median), fmt(r.min), fmt(r.median / ns.tasks * 1000 if r.per_task else None, 2),
              fmt(r.cpu_median, 2), fmt(r.peak_rss_mib, 1), fmt(ratio(r, par), 2), fmt(ratio(r, fifo), 2)]
             for r in rows]
    print(format_table(headers, table))
    print("\nms/task = median wall seconds / tasks. CPU s = median user+system seconds of the tool and every "
          "task process.\nvs = ratio of wall-time medians (above 1: benchfleet slower).")
    if ns.json is not None:
        write_json(ns.json, {
            "benchmark": "dispatch_overhead", "machine": machine,
            "params": {"tasks": ns.tasks, "slots": ns.slots, "repeat": ns.repeat},
            "rows": [{"name": r.name, "seconds": r.seconds, "median_s": r.median, "min_s": r.min,
                      "ms_per_task": r.median / ns.tasks * 1000 if r.per_task else None,
                      "cpu_s": r.cpu, "cpu_median_s": r.cpu_median,
                      "peak_rss_mib": r.peak_rss_mib, "vs_parallel": ratio(r, par), "vs_bash": ratio(r, fifo)}
                     for r in rows],
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
