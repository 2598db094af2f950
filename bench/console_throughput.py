"""Log throughput the console sustains: slots printing as fast as they can, against `tail -F` of the logs.

Each round starts a headless engine on a grid of N printers (one per slot, each writing ~80-byte lines in
batches, as fast as Python can or at --rate lines/s), waits for their log copies in logs/, and follows them
for --seconds with one reader:

- console: the real app (`BenchfleetApp`, attached, headless at 200x50) on the merged logs view, in a child
  process;
- tail -F: `tail -n0 -F logs/*.log` into a pipe that this script drains.

Lag is how far the newest line a reader shows trails the newest line in the log files it follows (both carry
the printer's timestamp), sampled about three times a second. The engine's own copying into logs/ can trail
the printers by a growing margin at full speed; that "copy lag" is reported beside, and both readers see it
alike. The console skips ahead instead of falling behind, so its lag stays within its refresh interval and its
memory flat, while it shows only the newest lines of each refresh (nobody reads 10^5 lines a second; the files
keep them all).
Run:

    python bench/console_throughput.py [--slots 8] [--seconds 10] [--rate LINES_PER_S] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.dispatch_overhead import format_table, machine_description, print_machine  # noqa: E402

PRINTER = r'''
import sys, time
slot, seconds, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
end = time.time() + seconds
pad = "x" * 40
n = 0
write = sys.stdout.write
batch = 200 if rate <= 0 else max(1, int(rate / 20))
while True:
    now = time.time()
    if now > end:
        break
    write("".join(f"slot={slot} n={n + i} t={now:.6f} {pad}\n" for i in range(batch)))
    n += batch
    if rate > 0:
        sys.stdout.flush()
        time.sleep(max(0.0, batch / rate - (time.time() - now)))
sys.stdout.flush()
print(f"printed {n} lines")
'''

RECIPE = """
name = "throughput"
[hosts.local]
gpus = {slots}
[[stage]]
kind = "queue"
placement = "round-robin"
grid = {{ i = "1..{slots}" }}
command = "{{python}} {printer} {{gpu}} {seconds} {rate}"
"""

STAMP = re.compile(r" t=(\d+\.\d+)")

SAMPLE_EVERY = 0.37
"""Seconds between lag samples: not a multiple of the 0.5 s refresh, so samples fall at every phase."""


@dataclass
class Result:
    """One reader's figures for one round."""

    reader: str
    written_mib: float = 0.0
    """What the printers wrote while the reader followed (printed_window_s seconds)."""
    printed_window_s: float = 0.0
    shown_lines: int = 0
    lag_median_s: float | None = None
    lag_max_s: float | None = None
    copy_lag_median_s: float | None = None
    """How far the engine's copies in logs/ trailed the printers meanwhile (the same for any reader)."""
    cpu_s: float = 0.0
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_max_mib: float = 0.0
    lags: list[float] = field(default_factory=list)
    copy_lags: list[float] = field(default_factory=list)
    rss_samples: list[float] = field(default_factory=list)
    followed_mib: float = 0.0
    """How much the log copies grew while the reader followed them: what it had to keep up with."""
    window_s: float = 0.0


def logs_size(logs: Path) -> int:
    return sum(p.stat().st_size for p in logs.glob("*.log"))


def files_newest(logs: Path) -> float:
    """The newest printer timestamp at the end of any log file in `logs`."""
    newest = 0.0
    for path in logs.glob("*.log"):
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 4096))
                stamps = STAMP.findall(f.read().decode("utf-8", "replace"))
        except OSError:
            continue
        if stamps:
            newest = max(newest, float(stamps[-1]))
    return newest


def sample(result: Result, shown_newest: float, logs: Path) -> None:
    in_files = files_newest(logs)
    if shown_newest and in_files:
        result.lags.append(max(0.0, in_files - shown_newest))
        result.copy_lags.append(max(0.0, time.time() - in_files))


# -- the console side (child process) ------------------------------------------------------------------------


def console_role(run_dir: Path, seconds: float, out: Path) -> None:
    """Follow the run with the real app, merged logs view, and write lag/lines/CPU/memory to `out`."""
    from console.app import BenchfleetApp  # noqa: PLC0415 (only the child process needs Textual)
    from console.rundata import RunSnapshot  # noqa: PLC0415

    result = Result(reader="console (benchfleet attach, merged logs)")

    newest_shown = [0.0]

    class MeasuredApp(BenchfleetApp):
        def _apply(self, snapshot: RunSnapshot) -> None:
            super()._apply(snapshot)
            for _slot, line in snapshot.merged_lines:
                m = STAMP.search(line)
                if m:
                    newest_shown[0] = max(newest_shown[0], float(m.group(1)))
            result.shown_lines += len(snapshot.merged_lines)

    async def drive() -> None:
        app = MeasuredApp(run_dir)
        async with app.run_test(size=(200, 50)) as pilot:
            deadline = time.monotonic() + 10
            while app.run_screen is None and time.monotonic() < deadline:
                await pilot.pause(0.05)
            await pilot.press("2", "m")
            result.rss_start_mib = _rss_mib(os.getpid())
            size0, t0 = logs_size(run_dir / "logs"), time.monotonic()
            # Sampled on a clock of its own, as for tail: between refreshes the screen ages.
            while time.monotonic() - t0 < seconds:
                await asyncio.sleep(SAMPLE_EVERY)
                if newest_shown[0]:
                    sample(result, newest_shown[0], run_dir / "logs")
                rss = _rss_mib(os.getpid())
                result.rss_max_mib = max(result.rss_max_mib, rss)
                result.rss_end_mib = rss
                result.rss_samples.append(rss)
            result.followed_mib = (logs_size(run_dir / "logs") - size0) / (1 << 20)
            result.window_s = time.monotonic() - t0

    cpu0 = _cpu_self()
    asyncio.run(drive())
    result.cpu_s = _cpu_self() - cpu0
    out.write_text(json.dumps(asdict(result)))


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mib(pid: int, key: str = "VmRSS") -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


# -- the tail side -------------------------------------------------------------------------------------------


def tail_round(logs: list[Path], seconds: float) -> Result:
    result = Result(reader="tail -n0 -F logs/*.log (into a pipe)")
    proc = subprocess.Popen(["tail", "-n0", "-F", *map(str, logs)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    newest = [0.0]
    stop = threading.Event()

    def drain() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            result.shown_lines += 1
            m = STAMP.search(raw.decode("utf-8", "replace"))
            if m:
                newest[0] = max(newest[0], float(m.group(1)))
            if stop.is_set():
                break

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    time.sleep(0.2)
    result.rss_start_mib = _rss_mib(proc.pid)
    size0, t0 = logs_size(logs[0].parent), time.monotonic()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(SAMPLE_EVERY)
        if newest[0]:
            sample(result, newest[0], logs[0].parent)
        rss = _rss_mib(proc.pid)
        result.rss_max_mib = max(result.rss_max_mib, rss)
        result.rss_end_mib = rss
        result.rss_samples.append(rss)
    result.cpu_s = _cpu_of(proc.pid)
    result.followed_mib = (logs_size(logs[0].parent) - size0) / (1 << 20)
    result.window_s = time.monotonic() - t0
    stop.set()
    proc.terminate()
    proc.wait(timeout=10)
    return result


# -- one round -----------------------------------------------------------------------------------------------


def run_round(reader: str, slots: int, seconds: float, rate: float, work: Path) -> Result:
    """Start the engine on the printers, follow their logs with `reader`, return its figures."""
    printer = work / "printer.py"
    printer.write_text(PRINTER)
    recipe = work / f"throughput-{reader}.toml"
    recipe.write_text(RECIPE.format(slots=slots, printer=printer, seconds=seconds + 60, rate=rate))
    run_dir = work / f"run-{reader}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    engine = subprocess.Popen([sys.executable, "-m", "console.cli", "--recipe", str(recipe), "--run-dir",
                               str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        logs: list[Path] = []
        while len(logs) < slots:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(logs)} of {slots} printers started within 60 s")
            time.sleep(0.05)
            logs = sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").is_dir() else []
        outputs = run_dir / "state" / "local"
        printed0, t0 = _outputs_size(outputs), time.monotonic()
        if reader == "tail":
            result = tail_round(logs, seconds)
        else:
            out = work / "console.json"
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--role", "console", "--run-dir",
                            str(run_dir), "--seconds", str(seconds), "--out", str(out)], check=True, env=env,
                           timeout=seconds + 120)
            result = Result(**json.loads(out.read_text()))
        result.written_mib = (_outputs_size(outputs) - printed0) / (1 << 20)
        result.printed_window_s = time.monotonic() - t0
    finally:
        # Stop the run as Ctrl-C would (its printers are killed); the engine would copy gigabytes otherwise.
        engine.send_signal(signal.SIGINT)
        try:
            engine.wait(timeout=60)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait(timeout=30)
    # Lag while the printers ran: drop the samples after they stopped (the newest line then only ages).
    active = result.lags[: max(1, int(len(result.lags) * 0.9))]
    if active:
        result.lag_median_s = statistics.median(active)
        result.lag_max_s = max(active)
    if result.copy_lags:
        result.copy_lag_median_s = statistics.median(result.copy_lags)
    return result


def _outputs_size(folder: Path) -> int:
    """Bytes the printers wrote so far (their output files in the local host's task directories)."""
    return sum(p.stat().st_size for p in folder.glob("*/out"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0, help="how long each reader follows (default 10)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="lines per second per slot (default 0: as fast as the printer can)")
    p.add_argument("--json", type=Path, help="write the figures and the machine here")
    p.add_argument("--role", choices=["console"], help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.role == "console":
        console_role(ns.run_dir, ns.seconds, ns.out)
        return 0
    machine = machine_description()
    print_machine(machine)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bf-console-bench-", ignore_cleanup_errors=True) as tmp:
        for reader in ("console", "tail"):
            results.append(run_round(reader, ns.slots, ns.seconds, ns.rate, Path(tmp)))
    headers = ["reader", "printed MiB/s", "followed MiB/s", "shown lines/s", "lag median s", "lag max s",
               "copy lag s", "CPU s", "RSS start MiB", "RSS mid MiB", "RSS end MiB", "RSS max MiB"]
    rows = [[r.reader, f"{r.written_mib / max(r.printed_window_s, 1e-9):.1f}",
             f"{r.followed_mib / max(r.window_s, 1e-9):.1f}",
             f"{r.shown_lines / max(r.window_s, 1e-9):,.0f}", _fmt(r.lag_median_s), _fmt(r.lag_max_s),
             _fmt(r.copy_lag_median_s), f"{r.cpu_s:.2f}", f"{r.rss_start_mib:.1f}",
             f"{r.rss_samples[len(r.rss_samples) // 2] if r.rss_samples else 0.0:.1f}",
             f"{r.rss_end_mib:.1f}",
             f"{r.rss_max_mib:.1f}"] for r in results]
    speed = f"{ns.rate:,.0f} lines/s each" if ns.rate > 0 else "as fast as they can"
    print(f"\n{ns.slots} slots printing {speed} for {ns.seconds:.0f} s, each round\n")
    print(format_table(headers, rows))
    if ns.json:
        payload = {"machine": machine, "slots": ns.slots, "seconds": ns.seconds, "rate": ns.rate,
                   "results": [asdict(r) for r in results]}
        ns.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
