"""A CPU stand-in for the Petals benchmark client `run_opt_requests.py`: joins the swarm's DHT, counts the servers
of the model, times a little generation-shaped work, and appends the seed's header-less TSV rows.

One row per prefix length (`--seq-lens`), columns as upstream: batch size, number of micro-batches, number of
processes, prefix length, output length (`--max-tokens`), total throughput (tokens/s over the whole swarm: this
client's rate times the servers it found, which is why the seed divides it by the number of servers), and the
average latency per token (s). Each generated token is one DHT lookup of the model's first block (a real round
trip through the swarm's network, so shaping shows) plus a small matmul sized by the prefix length. The processes
of `--num-processes` are recorded, not started.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import hivemind  # type: ignore[import-untyped]
import numpy as np

HIDDEN = 256


def dht_prefix(model: str) -> str:
    """As in petals_server.py: "facebook/opt-30b" -> "opt-30b"."""
    return model.rstrip("/").rsplit("/", 1)[-1]


def count_servers(dht: object, prefix: str) -> int:
    """Distinct peers announcing the model's first block."""
    found = dht.get(f"{prefix}.0", latest=True)  # type: ignore[attr-defined]
    if found is None or not isinstance(found.value, dict):
        return 0
    return len(found.value)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="CPU stand-in for Petals' run_opt_requests.py (benchfleet rehearsal): counts the swarm's "
                    "servers through its DHT, times DHT round trips and small matmuls per token, appends TSV rows "
                    "(batch, micro-batches, processes, seq_len, max_tokens, throughput, latency). Runs no model.")
    p.add_argument("--initial_peers", nargs="+", required=True, help="multiaddrs of the swarm's DHT")
    p.add_argument("--prefix", required=True, help="model name, e.g. facebook/opt-30b")
    p.add_argument("-b", "--batch-size", type=int, default=1)
    p.add_argument("--num-micro-batches", type=int, default=1)
    p.add_argument("--num-processes", type=int, default=1, help="recorded in the TSV; the stand-in runs one")
    p.add_argument("--output", required=True, help="TSV file the rows are appended to")
    p.add_argument("--seq-lens", default="128,512", help="prefix lengths, comma-separated (one row each)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prefix")
    p.add_argument("--min-servers", type=int, default=1, help="wait (up to --wait s) until this many are found")
    p.add_argument("--wait", type=float, default=60.0)
    a = p.parse_args(argv)
    seq_lens = [int(s) for s in a.seq_lens.split(",") if s.strip()]
    dht = hivemind.DHT(initial_peers=a.initial_peers, client_mode=True, start=True)
    prefix = dht_prefix(a.prefix)
    deadline = time.monotonic() + a.wait
    servers = count_servers(dht, prefix)
    while servers < a.min_servers and time.monotonic() < deadline:
        time.sleep(0.5)
        servers = count_servers(dht, prefix)
    print(f"Found {servers} server(s) for {prefix} in the swarm", flush=True)
    if servers < a.min_servers:
        print(f"Expected at least {a.min_servers} server(s); is the swarm up?", file=sys.stderr, flush=True)
        dht.shutdown()
        return 1
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32) / np.sqrt(HIDDEN)
    rows = a.batch_size * a.num_micro_batches
    for seq_len in seq_lens:
        state = rng.standard_normal((rows * max(seq_len // 64, 1), HIDDEN), dtype=np.float32)
        start = time.perf_counter()
        for _ in range(a.max_tokens):
            dht.get(f"{prefix}.0", latest=True)
            state = np.tanh(state @ weights)
        elapsed = time.perf_counter() - start
        throughput = rows * a.max_tokens / elapsed * servers
        latency = elapsed / a.max_tokens
        print(f"seq_len={seq_len}: {throughput:.2f} tokens/s over the swarm, {latency:.4f} s/token", flush=True)
        with open(a.output, "a", encoding="utf-8") as out:
            out.write(f"{a.batch_size}\t{a.num_micro_batches}\t{a.num_processes}\t{seq_len}\t{a.max_tokens}\t"
                      f"{throughput:.2f}\t{latency:.4f}\n")
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
