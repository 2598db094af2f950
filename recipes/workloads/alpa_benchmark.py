"""A CPU stand-in for Alpa's benchmark/alpa/benchmark.py: tiny matmul "cases" as Ray tasks, Alpa's output format.

It connects to the running Ray cluster (RAY_ADDRESS, as `ray.init(address="auto")` does), and for each case of the
suite starts dp x op x pp Ray tasks that each declare one GPU and time a few numpy matmuls. It prints what Alpa
prints per case (`Working on case: BenchmarkCase(...)`, ` - Compile (driver): X s`, `Iteration i ...`,
` - Benchmark: X s`), then Alpa's result line, fields joined by two spaces, and appends the same values,
tab-separated and without a header, to `<exp-name>.tsv`. `--fail-case SUITE#N` makes case N of that suite fail the
way Alpa reports one: an error line, then the result line with `Mean Time (s): -1.000` and `TFLOPs: -1.00`.
Nothing here is Alpa: the model configs only name the matmul sizes, and the numbers are the CPU's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

GB = 1 << 30
SIZES = {"gpt": (64, 256), "moe": (32, 320), "wresnet": (16, 384)}
"""Per model type: (batch size, hidden size) of the cases."""


@dataclass(frozen=True)
class Case:
    """One benchmark case, printed like Alpa's BenchmarkCase."""

    model_type: str
    batch_size: int
    hidden: int
    num_layers: int
    num_micro_batches: int
    dp: int
    op: int
    pp: int

    @property
    def gpus(self) -> int:
        return self.dp * self.op * self.pp

    @property
    def model_config(self) -> str:
        if self.model_type == "wresnet":
            return (f"WResNetModelConfig(image_size=32, num_layers={self.num_layers}, num_channels={self.hidden}, "
                    "width_factor=1, dtype=float32)")
        name = "GPTModelConfig" if self.model_type == "gpt" else "MoEModelConfig"
        return (f"{name}(seq_len=64, hidden_size={self.hidden}, num_layers={self.num_layers}, num_heads=2, "
                "vocab_size=512)")

    @property
    def parallel_config(self) -> str:
        return (f"UniformParallelArgs(prefer_reduce_scatter=True, use_remat=True, dp={self.dp}, op={self.op}, "
                f"pp={self.pp}, force_batch_dim_mapping=True)")

    def __str__(self) -> str:
        return (f"BenchmarkCase(batch_size={self.batch_size}, model_config={self.model_config}, "
                f"num_micro_batches={self.num_micro_batches}, parallel_mode='uniform', "
                f"parallel_args={self.parallel_config})")


def suite_cases(suite: str, gpus: int) -> list[Case] | None:
    """The cases of `suite` for a cluster of `gpus` GPUs, or None when the suite has none (as in Alpa)."""
    model_type, _, kind = suite.partition(".")
    if model_type not in SIZES or kind not in ("perf_test_auto", "perf_test_manual"):
        raise SystemExit(f"unknown suite {suite!r}; expected gpt|moe|wresnet .perf_test_auto or gpt.perf_test_manual")
    if gpus < 1 or gpus & (gpus - 1):
        return None  # like Alpa's suites, only powers of two have cases
    batch, hidden = SIZES[model_type]
    if kind == "perf_test_manual":
        return [Case(model_type, batch, hidden, 2, 2, gpus, 1, 1)]
    return [Case(model_type, batch, hidden, 2, 2, gpus, 1, 1),
            Case(model_type, batch, hidden * 2, 4, 4, max(gpus // 2, 1), min(gpus, 2), 1)]


def _matmuls(rows: int, hidden: int, layers: int) -> float:
    """On a Ray worker: one training step's worth of matmuls; returns the seconds it took."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, hidden), dtype=np.float32)
    w = rng.standard_normal((hidden, hidden), dtype=np.float32) / np.sqrt(hidden)
    start = time.perf_counter()
    for _ in range(layers * 3):  # forward, and two matmuls of the backward pass per layer
        x = np.tanh(x @ w)
    return time.perf_counter() - start


def write_tsv(heads: Sequence[str], values: Sequence[object], filename: str) -> None:
    """Alpa's alpa.util.write_tsv: append the values tab-separated, print `Head: value` joined by two spaces."""
    texts = [str(v) for v in values]
    with open(filename, "a", encoding="utf-8") as out:
        out.write("\t".join(texts) + "\n")
    print("".join(f"{h}: {v}  " for h, v in zip(heads, texts, strict=True)), flush=True)


def run_case(case: Case, niter: int, fail: bool) -> tuple[float, list[float], float, float]:
    """(parameter count, iteration latencies, TFLOPs, peak memory in bytes); -1 values for a failed case."""
    rows = case.batch_size * case.num_micro_batches  # the matmul height: the case's whole batch
    params = float(case.num_layers * case.hidden * case.hidden)
    t0 = time.perf_counter()
    time.sleep(0.01)
    print(f" - Prepare input: {time.perf_counter() - t0:.2f} s", flush=True)
    print(f" - Create train state: {0.01:.2f} s", flush=True)
    # max_calls=0: Ray would otherwise start a fresh worker process for every GPU task (its default is 1 call).
    remote: Any = ray.remote(num_gpus=1, max_retries=0, max_calls=0)(_matmuls)
    t0 = time.perf_counter()
    ray.get([remote.remote(8, 8, 1) for _ in range(case.gpus)])  # the first call stands in for compilation
    print(f" - Compile (driver): {time.perf_counter() - t0:.2f} s", flush=True)
    if fail:
        print("RuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 24.00GiB. "
              "(simulated by --fail-case)", flush=True)
        return params, [-1.0], -1.0, -1.0 * GB
    print(f" - Compile (worker): {0.01:.2f} s", flush=True)
    latencies = []
    start = time.perf_counter()
    for i in range(niter):
        print(f"Iteration {i} ...", flush=True)
        t = time.perf_counter()
        ray.get([remote.remote(rows, case.hidden, case.num_layers) for _ in range(case.gpus)])
        latencies.append(time.perf_counter() - t)
    print(f" - Benchmark: {time.perf_counter() - start:.2f} s", flush=True)
    flops = 2.0 * 3 * case.num_layers * rows * case.hidden * case.hidden * case.gpus
    tflops = flops / float(np.mean(latencies)) / 1e12
    peak_mem = float(4 * (case.hidden * case.hidden + rows * case.hidden) * case.num_micro_batches)
    return params, latencies, tflops, peak_mem


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="CPU stand-in for Alpa's benchmark.py (benchfleet rehearsal): tiny matmul cases as Ray tasks "
                    "needing one GPU each, printed and appended to <exp-name>.tsv in Alpa's formats. Not Alpa.")
    p.add_argument("--suite", required=True,
                   help="gpt.perf_test_auto, moe.perf_test_auto, wresnet.perf_test_auto or gpt.perf_test_manual")
    p.add_argument("--niter", type=int, default=3, help="the number of benchmark iterations")
    p.add_argument("--num-hosts", type=int, default=None)
    p.add_argument("--num-devices-per-host", type=int, default=None)
    p.add_argument("--exp-name", default="default", help="results are appended to <exp-name>.tsv")
    p.add_argument("--fail-case", default="", metavar="SUITE#N",
                   help="make case N (1-based) of SUITE fail as Alpa reports one (-1.000); other suites ignore it")
    p.add_argument("--disable-tqdm", action="store_true", help="accepted for compatibility; nothing to disable")
    a = p.parse_args(argv)
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False, logging_level=logging.INFO)
    if a.num_hosts is None or a.num_devices_per_host is None:
        everything: Any = ray  # ray.nodes() is untyped
        nodes = [n for n in everything.nodes() if n["Alive"]]
        a.num_hosts = len(nodes)
        a.num_devices_per_host = int(nodes[0]["Resources"].get("GPU", 0)) if nodes else 0
    num_gpus = a.num_hosts * a.num_devices_per_host
    cases = suite_cases(a.suite, num_gpus)
    if cases is None:
        print(f"No benchmark suite for #gpu={num_gpus}", flush=True)
        return 0
    fail_suite, _, fail_index = a.fail_case.partition("#")
    heads = ["Type", "Model Config", "#Microbatch", "#GPU", "Parallel Config", "Mean Time (s)", "Std Time (s)",
             "#Params (Billion)", "TFLOPs", "Peak Mem (GB)", "Metadata"]
    for index, case in enumerate(cases, start=1):
        print(f"Working on case: {case}", flush=True)
        fail = fail_suite == a.suite and fail_index == str(index)
        params, latencies, tflops, peak_mem = run_case(case, a.niter, fail)
        metadata = {"compilation_times": "None", "compute_cost_file_name": "None",
                    "forward_stage_layer_ids": "None", "submesh_shapes": "None", "logical_mesh_shapes": "None",
                    "autosharding_option_dicts": "None"}
        std = "-1.000" if fail else f"{np.std(latencies):.3f}"  # a failed case prints -1 for both times
        values = [case.model_type, case.model_config, case.num_micro_batches, num_gpus, case.parallel_config,
                  f"{np.mean(latencies):.3f}", std, f"{params / 1e9:.3f}B", f"{tflops:.2f}",
                  f"{peak_mem / GB:.3f}", metadata]
        write_tsv(heads, values, f"{a.exp_name}.tsv")
        time.sleep(0.1)  # as Alpa, for ctrl+c to work
    return 0


if __name__ == "__main__":
    sys.exit(main())
