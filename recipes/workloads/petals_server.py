"""A CPU stand-in for `python -m petals.cli.run_server MODEL --initial_peers ADDR`: a hivemind DHT peer that joins
the swarm and announces the blocks it would serve, printing `Started` once it does.

It is a real hivemind peer (the `hivemind` package's DHT, as Petals servers run one), joined through
`--initial_peers`; it stores "online" under `<model>.<block>` with its peer id as the subkey, and renews that
every `--update-period` seconds, as Petals servers announce their blocks. It loads no model and serves no
inference; `run_opt_requests.py` (the client stand-in) counts the servers it finds under those keys.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import hivemind  # type: ignore[import-untyped]
from hivemind.utils import get_dht_time  # type: ignore[import-untyped]

SHUTDOWN_GRACE = 5.0
"""Seconds the DHT gets to shut down cleanly before its process is killed."""


def dht_prefix(model: str) -> str:
    """The DHT key prefix of a model: its name without the organisation ("facebook/opt-30b" -> "opt-30b")."""
    return model.rstrip("/").rsplit("/", 1)[-1]


def block_range(args: argparse.Namespace) -> range:
    """`--block_indices a:b`, else the first `--num_blocks` blocks."""
    if args.block_indices:
        start, _, end = args.block_indices.partition(":")
        return range(int(start), int(end))
    return range(args.num_blocks)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="CPU stand-in for petals.cli.run_server (benchfleet rehearsal): a hivemind DHT peer that "
                    "joins --initial_peers, announces blocks of MODEL and prints Started. Serves no model.")
    p.add_argument("model", help="model name, e.g. facebook/opt-30b (names the DHT keys)")
    p.add_argument("--initial_peers", nargs="+", required=True, help="multiaddrs of the swarm's DHT")
    p.add_argument("--num_blocks", type=int, default=4)
    p.add_argument("--block_indices", default="", help="a:b, instead of --num_blocks")
    p.add_argument("--host_maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"])
    p.add_argument("--update-period", type=float, default=5.0, help="seconds between announcements")
    a = p.parse_args(argv)
    if not block_range(a):
        p.error("no blocks to serve; expected --num_blocks N (N >= 1) or --block_indices a:b with a < b")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    dht = hivemind.DHT(initial_peers=a.initial_peers, host_maddrs=a.host_maddrs, start=True)
    peer = str(dht.peer_id)
    blocks = list(block_range(a))
    prefix = dht_prefix(a.model)
    print(f"Announced that blocks {blocks} are joining", flush=True)

    def announce() -> bool:
        expires = get_dht_time() + 3 * a.update_period
        return all(dht.store(f"{prefix}.{block}", "online", expires, subkey=peer) for block in blocks)

    if not announce():
        print("Could not announce the blocks to the DHT", file=sys.stderr, flush=True)
        leave(dht)
        return 1
    print(f"Started (peer {peer}, serving {prefix} blocks {blocks[0]}:{blocks[-1] + 1})", flush=True)
    while not stop.wait(a.update_period):
        announce()
    leave(dht)
    return 0


def leave(dht: Any) -> None:
    """Shut the DHT down, but never hang on it: a signal sent to the whole process group (`timeout`, a
    teardown) may have stopped its helper processes already, and then hivemind's shutdown can wait forever."""
    closer = threading.Thread(target=dht.shutdown, daemon=True)
    closer.start()
    closer.join(SHUTDOWN_GRACE)
    if closer.is_alive() or dht.is_alive():
        dht.kill()  # the DHT's own process (a multiprocessing.Process)
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
