"""A test workload: numbered lines at a steady pace, then ReDrafter's result table with values derived from W and L.

Deterministic output makes "same results on every transport" and "no line lost or repeated" checkable; a marks file
records each start so tests count executions by side effect, not by the journal.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--beam_width", type=int, required=True)
    p.add_argument("--beam_length", type=int, required=True)
    p.add_argument("--lines", type=int, default=3)
    p.add_argument("--interval", type=float, default=0.0)
    p.add_argument("--marks", default="")
    p.add_argument("--fail", action="store_true")
    a = p.parse_args()
    if a.marks:
        with open(a.marks, "a") as f:
            f.write(f"start {a.beam_width}-{a.beam_length}\n")
    for i in range(1, a.lines + 1):
        print(f"line {i}", flush=True)
        if a.interval:
            time.sleep(a.interval)
    accepted = 1 + (a.beam_width * a.beam_length % 7) / 4
    tps = 10 * a.beam_width + a.beam_length + 0.125
    print(f"Title: beamwidth{a.beam_width}_beamlen{a.beam_length}")
    print("---------------------------------------  ------")
    print(f"Average number of tokens per step:       {accepted:g}")
    print("---------------------------------------  ------")
    print(f"Tokens/second                            {tps:g}")
    sys.stdout.flush()
    return 1 if a.fail else 0


if __name__ == "__main__":
    sys.exit(main())
