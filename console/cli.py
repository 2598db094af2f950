"""The `benchfleet` command: the console (`benchfleet RECIPE`, `benchfleet`, `attach RUN_DIR`), headless runs,
`check`, `trust` and `testbed`.

Exit status: 0 every task succeeded; 1 some task failed or a halt rule stopped the run; 2 the recipe (or the command
line) is wrong; 3 the run could not start or go on (a host, the run directory); 130 interrupted (Ctrl-C), resumable
with --resume. Every error a user can cause is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from console.headless import HeadlessPrinter
from console.plot_export import export_plots
from remote.engine import Engine, EngineError, EngineOptions, discover_slots, make_transport
from remote.journal import Journal
from remote.plan import Plan, build_plan, effective_hosts
from remote.recipe import QueueStage
from remote.recipe_loader import LoadedRecipe, RecipeError, load_recipe
from remote.results import read_results_json
from remote.rundir import RunDir, RunDirError, default_run_dir, prepare
from remote.slots import Slot, SlotError, declared_slots
from remote.testbed import TestbedError, testbed_down, testbed_up
from remote.transport.base import HostError

EXIT_OK, EXIT_FAILED, EXIT_RECIPE, EXIT_RUN, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `benchfleet` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "check":
            return cmd_check(args[1:])
        if args and args[0] == "testbed":
            return cmd_testbed(args[1:])
        if args and args[0] == "trust":
            return cmd_trust(args[1:])
        if args and args[0] == "attach":
            return cmd_attach(args[1:])
        if not args and _on_terminal():
            return _console_picker()
        return cmd_run(args)
    except KeyboardInterrupt:
        print("benchfleet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


def _fail(message: str, code: int) -> int:
    """Print each problem as one line (preflight may find several) and return the exit status."""
    for line in message.splitlines() or [message]:
        print(f"benchfleet: {line}", file=sys.stderr)
    return code


# -- headless run ---------------------------------------------------------------------------------------------------


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchfleet",
        description="Run a benchmark campaign described by a recipe: `benchfleet RECIPE` opens the console "
        "on it, `benchfleet` alone lists the recipes and runs to pick from. Subcommands: attach RUN_DIR, "
        "check RECIPE, trust HOST, testbed up|down.",
    )
    p.add_argument("recipe_pos", nargs="?", metavar="RECIPE", help="run RECIPE with the console open on it")
    p.add_argument("--recipe", type=Path, help="run RECIPE headless (no console)")
    p.add_argument("--run-dir", type=Path, help="run directory (default: runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir: finished tasks are kept, "
                   "running ones adopted, the rest run")
    p.add_argument("--retry-failed", action="store_true", help="with --resume, run failed tasks again too")
    p.add_argument("--detach", action="store_true", help="start the engine in the background and print the run "
                   "directory; it survives the terminal and the SSH session")
    p.add_argument("--engine-child", action="store_true", help=argparse.SUPPRESS)
    return p


def cmd_run(args: list[str]) -> int:
    p = _run_parser()
    ns = p.parse_args(args)
    recipe_path: Path | None = ns.recipe
    if ns.recipe_pos is not None:
        if recipe_path is not None:
            return _fail("give the recipe once: either RECIPE (console) or --recipe RECIPE (headless)", EXIT_RECIPE)
        return _console_run(Path(ns.recipe_pos), ns)
    if ns.resume and ns.run_dir is None:
        return _fail("--resume needs --run-dir DIR (the run to continue)", EXIT_RECIPE)
    if recipe_path is None:
        if ns.resume and ns.run_dir is not None:
            recipe_path = ns.run_dir / "recipe.toml"
        else:
            p.print_usage(sys.stderr)
            return _fail("no recipe given; use --recipe FILE (see `benchfleet --help`)", EXIT_RECIPE)
    try:
        loaded = load_recipe(recipe_path)
    except RecipeError as exc:
        return _fail(str(exc), EXIT_RECIPE)
    run_dir = ns.run_dir or default_run_dir(loaded.recipe.name)
    try:
        rd = prepare(run_dir, resume=ns.resume)
    except RunDirError as exc:
        return _fail(str(exc), EXIT_RUN)
    if ns.detach:
        return _detach(loaded, rd, ns)
    return asyncio.run(_run_headless(loaded, rd, resume=ns.resume,
                                     options=EngineOptions(retry_failed=ns.retry_failed),
                                     engine_child=ns.engine_child))


def _detach(loaded: LoadedRecipe, rd: RunDir, ns: argparse.Namespace) -> int:
    """Start the engine in its own session, logging into the run directory, and return at once."""
    argv = [sys.executable, "-m", "console.cli", "--recipe", str(loaded.path.resolve()),
            "--run-dir", str(rd.path.resolve()), "--engine-child"]
    if ns.resume:
        argv.append("--resume")
    if ns.retry_failed:
        argv.append("--retry-failed")
    fd = os.open(rd.engine_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True,
                                cwd=os.getcwd())
    finally:
        os.close(fd)
    print(f"benchfleet: engine started in the background (pid {proc.pid})")
    print(f"run directory: {rd.path}")
    print(f"follow it with: tail -f {rd.engine_log}")
    return EXIT_OK


async def _run_headless(loaded: LoadedRecipe, rd: RunDir, *, resume: bool, options: EngineOptions,
                        engine_child: bool) -> int:
    engine = Engine(loaded, rd, resume=resume, options=options)
    printer = HeadlessPrinter(sys.stdout)
    engine.subscribe(printer.on_event)
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_signal() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print("\nbenchfleet: stopping: killing running tasks (Ctrl-C again to stop waiting)", file=sys.stderr)
            engine.request_stop()
        else:
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    if engine_child:
        (rd.path / "engine.pid").write_text(f"{os.getpid()}\n")
    ticker = asyncio.create_task(printer.ticker())
    try:
        finished = await engine.run()
    except (EngineError, RunDirError) as exc:
        return _fail(str(exc), EXIT_RUN)
    finally:
        ticker.cancel()
        if engine_child:
            (rd.path / "engine.pid").unlink(missing_ok=True)
    print_summary(engine, finished.counts, finished.results_csv)
    _export_plots(rd, loaded)
    if finished.interrupted:
        print(f"interrupted; continue with: benchfleet --recipe {loaded.path} --run-dir {rd.path} --resume")
        return EXIT_INTERRUPTED
    if finished.counts.get("failed", 0) or finished.halted:
        return EXIT_FAILED
    return EXIT_OK


def print_summary(engine: Engine, counts: dict[str, int], results_csv: Path | None) -> None:
    """A table of task states per stage, then where the results are."""
    journal_counts = []
    if engine.plan is not None:
        j = Journal(engine.rd.journal, readonly=True)
        try:
            for stage in engine.plan.stages:
                journal_counts.append((stage.name, stage.kind, j.counts(stage.name)))
        finally:
            j.close()
    header = f"{'stage':<16} {'kind':<6} {'tasks':>6} {'done':>6} {'failed':>7} {'not run':>8}"
    print()
    print(header)
    print("-" * len(header))
    for name, kind, c in journal_counts:
        total = sum(c.values())
        not_run = c.get("queued", 0) + c.get("retrying", 0) + c.get("running", 0) + c.get("cancelled", 0)
        print(f"{name:<16} {kind:<6} {total:>6} {c.get('done', 0):>6} {c.get('failed', 0):>7} {not_run:>8}")
    if results_csv is not None:
        print(f"\nresults: {results_csv}")
    print(f"run directory: {engine.rd.path}")


# -- console -------------------------------------------------------------------------------------------------


def _on_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _console_run(recipe: Path, ns: argparse.Namespace) -> int:
    """`benchfleet RECIPE`: start the run and open the console on it (with --detach: start it in the
    background and attach, so quitting the console leaves it running)."""
    if not _on_terminal():
        return _fail(f"the console needs a terminal; run headless with `benchfleet --recipe {recipe}`",
                     EXIT_RECIPE)
    if ns.resume and ns.run_dir is None:
        return _fail("--resume needs --run-dir DIR (the run to continue)", EXIT_RECIPE)
    try:
        loaded = load_recipe(recipe)
    except RecipeError as exc:
        return _fail(str(exc), EXIT_RECIPE)
    try:
        # Absolute: tasks run in their own working directory, and their files must still land in the run.
        rd = prepare((ns.run_dir or default_run_dir(loaded.recipe.name)).resolve(), resume=ns.resume)
    except RunDirError as exc:
        return _fail(str(exc), EXIT_RUN)
    from console.app import BenchfleetApp  # noqa: PLC0415 (textual loads only for the console)

    if ns.detach:
        code = _detach(loaded, rd, ns)
        return code if code != EXIT_OK else BenchfleetApp(rd.path).run() or EXIT_OK
    engine = Engine(loaded, rd, resume=ns.resume, options=EngineOptions(retry_failed=ns.retry_failed))
    app = BenchfleetApp(rd.path, engine=engine)
    result = app.run()
    if app.engine_error is not None:
        return _fail(app.engine_error, EXIT_RUN)
    if app.engine_result is not None:
        print_summary(engine, app.engine_result.counts, app.engine_result.results_csv)
        _export_plots(engine.rd, engine.loaded)
        if app.engine_result.interrupted:
            print(f"interrupted; continue with: benchfleet {loaded.path} --run-dir {rd.path} --resume")
    return result if result is not None else EXIT_OK


def cmd_attach(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="benchfleet attach",
                                description="Open the console on a run directory: a run started with "
                                "--detach, or a finished one. Quitting never stops the run.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    ns = p.parse_args(args)
    run_dir: Path = ns.run_dir
    if not (run_dir / "journal.sqlite").is_file():
        return _fail(f"{run_dir}: no journal.sqlite here; expected a run directory "
                     "(runs/<recipe>-<timestamp>)", EXIT_RECIPE)
    if not _on_terminal():
        return _fail(f"the console needs a terminal; the run's results are in {run_dir / 'results.csv'}",
                     EXIT_RECIPE)
    from console.app import BenchfleetApp  # noqa: PLC0415 (textual loads only for the console)

    code = BenchfleetApp(run_dir).run()
    return code if code is not None else EXIT_OK


def _console_picker() -> int:
    """`benchfleet` alone: pick a recipe in ./recipes to run, or a run in ./runs to open."""
    from console.app import BenchfleetApp  # noqa: PLC0415 (textual loads only for the console)

    app = BenchfleetApp(None)
    code = app.run()
    if app.engine is not None and app.engine_result is not None:
        print_summary(app.engine, app.engine_result.counts, app.engine_result.results_csv)
        _export_plots(app.engine.rd, app.engine.loaded)
        if app.engine_result.interrupted:
            print(f"interrupted; continue with: {app.resume_command()}")
    if app.engine_error is not None:
        return _fail(app.engine_error, EXIT_RUN)
    return code if code is not None else EXIT_OK


def _export_plots(rd: RunDir, loaded: LoadedRecipe) -> None:
    """The recipe's plots as text (and PNG with matplotlib) in the run directory, from results.json."""
    if not loaded.recipe.plot or not rd.results_json.exists():
        return
    try:
        rows = read_results_json(rd.results_json)
    except (OSError, ValueError) as exc:
        print(f"benchfleet: plots not written: {exc}", file=sys.stderr)
        return
    written = export_plots(rd.path, loaded.recipe.plot, rows)
    if written:
        pngs = sum(1 for p in written if p.suffix == ".png")
        extra = "" if pngs else " (install matplotlib, `pip install 'benchfleet[plots]'`, for PNG files too)"
        print(f"plots: {rd.path / 'plots'} ({len(written) - pngs} text, {pngs} PNG){extra}")


# -- check ------------------------------------------------------------------------------------------------------


def cmd_check(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="benchfleet check",
                                description="Validate a recipe and print its plan: tasks per stage and their slots.")
    p.add_argument("recipe", type=Path)
    p.add_argument("--assume-gpus", type=int, metavar="N",
                   help='treat hosts with gpus = "auto" as having N GPUs instead of asking nvidia-smi')
    p.add_argument("--all", action="store_true", help="list every task, not just the first few per slot")
    ns = p.parse_args(args)
    try:
        loaded = load_recipe(ns.recipe)
    except RecipeError as exc:
        return _fail(str(exc), EXIT_RECIPE)
    try:
        plan = asyncio.run(_plan_for_check(loaded, ns.assume_gpus))
    except (SlotError, HostError, EngineError) as exc:
        return _fail(str(exc), EXIT_RUN)
    print_plan(plan, show_all=ns.all)
    return EXIT_OK


async def _plan_for_check(loaded: LoadedRecipe, assume_gpus: int | None) -> Plan:
    hosts = effective_hosts(loaded)
    slots: dict[str, list[Slot]] = {}
    for name, spec in hosts.items():
        if spec.gpus == "auto" and assume_gpus is not None:
            slots[name] = declared_slots(name, assume_gpus)
        elif spec.gpus == "auto":
            if spec.ssh is not None:
                raise SlotError(f'host {name}: gpus = "auto" is discovered when the run starts; '
                                "pass --assume-gpus N to preview the placement")
            with tempfile.TemporaryDirectory() as tmp:
                transport = make_transport(name, spec, RunDir(Path(tmp)), loaded.path.resolve().parent)
                slots[name] = await discover_slots(name, spec, transport)
        else:
            slots[name] = declared_slots(name, spec.gpus)
    return build_plan(loaded, slots)


def print_plan(plan: Plan, *, show_all: bool) -> None:
    recipe = plan.loaded.recipe
    total = len(plan.all_tasks())
    print(f"recipe {recipe.name} ({plan.loaded.path}): {len(plan.stages)} stage(s), {total} task(s), "
          f"{len(plan.slots)} slot(s)")
    if recipe.description:
        print(f"  {recipe.description.strip()}")
    print("hosts:")
    for name, spec in plan.hosts.items():
        where = f"ssh {spec.ssh}" if spec.ssh else "this machine"
        host_slots = [s for s in plan.slots if s.host == name]
        gpu_names = sorted({s.name for s in host_slots if s.name})
        detail = f" ({', '.join(gpu_names)})" if gpu_names else ""
        print(f"  {name:<12} {where:<24} {len(host_slots)} GPU slot(s){detail}")
    for stage in plan.stages:
        extra = ""
        if isinstance(stage.spec, QueueStage):
            extra = f", placement {stage.spec.placement}, order {stage.spec.order}"
        print(f"stage {stage.name} ({stage.kind}{extra}): {len(stage.tasks)} task(s) over {len(stage.slots)} slot(s)")
        pinned: dict[str, list[str]] = {s.key: [] for s in stage.slots}
        free: list[str] = []
        for task in stage.tasks:
            if task.pinned_slot is None:
                free.append(task.label)
            else:
                pinned.setdefault(task.pinned_slot, []).append(task.label)
        if free:
            print(f"  free-slot: {len(free)} task(s) go to whichever slot frees first, in this order:")
            _print_labels(free, show_all, indent="    ")
        for key, labels in pinned.items():
            if labels or not free:
                print(f"  {key:<12} {len(labels)} task(s)")
                _print_labels(labels, show_all, indent="    ")


def _print_labels(labels: list[str], show_all: bool, *, indent: str) -> None:
    limit = len(labels) if show_all else 4
    for label in labels[:limit]:
        print(f"{indent}{label}")
    if len(labels) > limit:
        print(f"{indent}... {len(labels) - limit} more (--all lists every task)")


# -- trust ------------------------------------------------------------------------------------------------------


def cmd_trust(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="benchfleet trust",
                                description="Show the SSH host key a host presents and record it in benchfleet's "
                                "known_hosts after you confirm. Host keys are always verified; this is how a new "
                                "host becomes known.")
    p.add_argument("target", help="an ssh_config alias or user@host:port, as in a recipe's `ssh`")
    p.add_argument("--ssh-config", help="an extra ssh_config file (as a recipe's `ssh_config`)")
    p.add_argument("--yes", action="store_true", help="record without asking (only after checking the fingerprint "
                   "some other way)")
    ns = p.parse_args(args)
    from remote.trust import fetch_host_key, record  # noqa: PLC0415 (asyncssh loads only when needed)

    try:
        presented = asyncio.run(fetch_host_key(ns.target, ns.ssh_config))
    except HostError as exc:
        return _fail(str(exc), EXIT_RUN)
    where = presented.patterns()
    print(f"{where} presents {presented.key.get_algorithm()} key {presented.fingerprint}")
    if presented.already_trusted:
        print("already trusted; nothing to do")
        return EXIT_OK
    if presented.known_elsewhere:
        print("WARNING: a known_hosts file lists a DIFFERENT key for this host: it was reinstalled, or someone is "
              "in the middle. Record it only if you know why it changed.")
    if not ns.yes:
        if not sys.stdin.isatty():
            return _fail("not recording without confirmation; rerun on a terminal, or pass --yes after checking "
                         "the fingerprint with the host's administrator", EXIT_RECIPE)
        answer = input(f"Record this key for {where}? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("not recorded")
            return EXIT_FAILED
    path = record(presented)
    print(f"recorded in {path}")
    return EXIT_OK


# -- testbed ----------------------------------------------------------------------------------------------------


def cmd_testbed(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="benchfleet testbed",
                                description="Local SSH test hosts (network namespaces + OpenSSH sshd) with a fake "
                                "nvidia-smi, to rehearse recipes before booking GPUs.")
    sub = p.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start N test hosts")
    up.add_argument("n", type=int)
    up.add_argument("--gpus", type=int, default=4, help="GPUs each fake nvidia-smi reports (default 4)")
    up.add_argument("--dir", type=Path, default=Path(".benchfleet/testbed"))
    up.add_argument("--loopback", action="store_true", help="sshd on loopback ports instead of namespaces")
    down = sub.add_parser("down", help="stop the test hosts and remove everything testbed up created")
    down.add_argument("--dir", type=Path, default=Path(".benchfleet/testbed"))
    ns = p.parse_args(args)
    try:
        if ns.action == "up":
            if not 1 <= ns.n <= 32:
                return _fail("testbed up: expected between 1 and 32 hosts", EXIT_RECIPE)
            tb = testbed_up(ns.dir, ns.n, ns.gpus, mode="loopback" if ns.loopback else "auto")
            print(tb.instructions())
        else:
            removed = testbed_down(ns.dir)
            print(f"testbed down: removed {len(removed)} item(s)" if removed else "testbed down: nothing to remove")
    except TestbedError as exc:
        return _fail(str(exc), EXIT_RUN)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
