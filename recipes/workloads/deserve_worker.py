"""A stand-in for DeServe's `python3 -m deserve_worker.worker_api` (benchfleet's, not upstream's).

It takes the same flags, prints upstream's `Serve from X to Y` and `Maximum number of layers served: N`,
then a `YYYY-mm-dd HH:MM:SS: Total batch size: N; Avg stage time: X.XXms; ...` line every --report-interval
seconds. It listens on --port (stdlib http.server): GET /info answers its flags as JSON; POST /forward takes a
batch of tasks, does a little arithmetic per layer it serves, and passes the batch to --next-worker-url, or,
when it holds the output layer, reports one token per task to the controller (POST /update_tasks) and sends
unfinished tasks round the ring again for their next token. Like upstream it prints no ready line: it is ready
when the port accepts connections.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import queue
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL_LAYERS = {"llama-3-70b": 80, "llama-3-8b": 32}
VOCAB = 128_256
STOP_TOKEN = 128_009
"""Upstream's end-of-turn token; the stand-in emits it as each task's last token."""


def layer_names(model: str) -> list[str]:
    """Upstream's slice list: embedding, each transformer layer, norm, output."""
    prefix = f"{model}-instruct-slice"
    count = MODEL_LAYERS[model]
    return [f"{prefix}/tok_embeddings", *(f"{prefix}/layers.{i}" for i in range(count)), f"{prefix}/norm",
            f"{prefix}/output"]


def name_to_id(name: str, max_layer: int) -> int:
    """Upstream's `convert_name_to_id`: `emb` 0, layer n at n + 1, `output` past the end (exclusive)."""
    if name == "emb":
        return 0
    if name.isdigit():
        return int(name) + 1
    if name == "norm":
        return max_layer - 1
    if name == "output":
        return max_layer
    raise ValueError(f"invalid layer name {name!r}; expected emb, output or a layer number")


def _post_json(url: str, path: str, payload: object, timeout: float = 10.0) -> None:
    """POST JSON to `url` + `path`; raises OSError (or http.client errors) when the peer is unreachable."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "localhost", parts.port or 80, timeout=timeout)
    try:
        body = json.dumps(payload).encode()
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        conn.getresponse().read()
    finally:
        conn.close()


class Stage:
    """The worker's serving loop: batches queued tasks, runs its layers over them, sends them on."""

    def __init__(self, args: argparse.Namespace, begin: int, end: int, max_layer: int) -> None:
        self.args = args
        self.begin, self.end = begin, end
        self.is_last = end >= max_layer
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lock = threading.Lock()
        self.stage_times: list[float] = []
        self.post_times: list[float] = []
        self.tasks_seen: set[str] = set()

    def run(self) -> None:
        while True:
            batch = [self.inbox.get()]
            while len(batch) < self.args.batch_size:
                try:
                    batch.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            started = time.perf_counter()
            for task in batch:
                token = int(task.get("token", task.get("input_len", 0)))
                # a stand-in for the forward pass: cheap and deterministic
                for layer in range(self.begin, self.end):
                    token = (token * 1_103_515_245 + layer + 12_345) % VOCAB
                task["token"] = token
            stage_ms = (time.perf_counter() - started) * 1000
            with self.lock:
                self.stage_times.append(stage_ms)
                self.tasks_seen.update(str(t["task_id"]) for t in batch)
            self._send(batch)

    def _send(self, batch: list[dict[str, Any]]) -> None:
        started = time.perf_counter()
        if self.args.simulated_latency > 0:
            time.sleep(self.args.simulated_latency)
        onward = batch
        try:
            if self.is_last:
                reports = []
                onward = []
                for task in batch:
                    task["step"] = int(task.get("step", 0)) + 1
                    finished = task["step"] >= int(task["max_tokens"])
                    reports.append({"task_id": task["task_id"], "output_token": STOP_TOKEN if finished
                                    else task["token"], "finished": finished})
                    if not finished:
                        onward.append(task)
                _post_json(self.args.controller_url, "/update_tasks", reports)
            if onward:
                _post_json(self.args.next_worker_url, "/forward", {"tasks": onward})
        except (OSError, http.client.HTTPException) as exc:
            print(f"worker on port {self.args.port}: could not send a batch of {len(batch)} ({exc})",
                  file=sys.stderr, flush=True)
        with self.lock:
            self.post_times.append((time.perf_counter() - started) * 1000)

    def report_forever(self) -> None:
        """Upstream's periodic status line; the numbers cover the interval since the previous line."""
        while True:
            time.sleep(self.args.report_interval)
            with self.lock:
                stages, posts, seen = self.stage_times, self.post_times, self.tasks_seen
                self.stage_times, self.post_times, self.tasks_seen = [], [], set()
            avg_stage = sum(stages) / len(stages) if stages else 0.0
            avg_post = sum(posts) / len(posts) if posts else 0.0
            now = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            print(f"{now}: Total batch size: {len(seen)}; Avg stage time: {avg_stage:.2f}ms; "
                  f"Avg post time: {avg_post:.2f}ms; Stages: {len(stages)}", flush=True)


def make_handler(args: argparse.Namespace, stage: Stage) -> type[BaseHTTPRequestHandler]:
    info = {
        "model": args.model, "num_rounds": args.num_rounds, "layer_begin": args.layer_begin,
        "layer_end": args.layer_end, "batch_size": args.batch_size, "port": args.port,
        "controller_url": args.controller_url, "next_worker_url": args.next_worker_url,
        "simulated_latency": args.simulated_latency,
    }

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, payload: object) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/info":
                self._reply(200, info)
            else:
                self._reply(404, {"error": f"no such path {self.path}"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.path != "/forward":
                self._reply(404, {"error": f"no such path {self.path}"})
                return
            try:
                tasks = json.loads(body)["tasks"]
                valid = all(isinstance(t, dict) and "task_id" in t and int(t["max_tokens"]) > 0
                            for t in tasks)
            except (ValueError, KeyError, TypeError):
                valid = False
            if not valid:
                self._reply(400, {"error": 'expected {"tasks": [{"task_id": ..., "max_tokens": N}, ...]}'})
                return
            for task in tasks:
                stage.inbox.put(task)
            self._reply(200, {"queued": len(tasks)})  # reply at once: the ring must not nest requests

        def log_message(self, format: str, *args: Any) -> None:
            pass  # upstream runs uvicorn at log_level=warning: no per-request lines

    return Handler


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(MODEL_LAYERS))
    p.add_argument("--num-rounds", type=int, required=True)
    p.add_argument("--layer-begin", required=True)
    p.add_argument("--layer-end", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--num-main-pages", type=int, default=0)
    p.add_argument("--num-swap-pages", type=int, default=0)
    p.add_argument("--controller-url", required=True)
    p.add_argument("--next-worker-url", required=True)
    p.add_argument("--simulated-latency", type=float, default=0.0)
    p.add_argument("--prefill-first-aggregate", action="store_true")
    p.add_argument("--enable-chunk-prefill", action="store_true")
    p.add_argument("--buddy-height", type=int, default=16)
    p.add_argument("--report-interval", type=float, default=5.0,
                   help="seconds between status lines (upstream: 5; the stand-in's own flag)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (upstream: 0.0.0.0)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    layers = layer_names(args.model)
    try:
        begin, end = name_to_id(args.layer_begin, len(layers)), name_to_id(args.layer_end, len(layers))
    except ValueError as exc:
        print(f"deserve_worker: {exc}", file=sys.stderr)
        return 2
    if not 0 <= begin < end <= len(layers):
        print(f"deserve_worker: --layer-begin={args.layer_begin} --layer-end={args.layer_end} is an empty "
              "slice; begin must come before end", file=sys.stderr)
        return 2
    print(f"Serve from {layers[begin]} to {layers[end - 1]}")
    print(f"Simulated latency: {args.simulated_latency * 1000}ms")
    print("Maximum number of layers served:", MODEL_LAYERS[args.model] + 3)
    sys.stdout.flush()
    stage = Stage(args, begin, end, len(layers))
    try:
        server = ThreadingHTTPServer((args.host, args.port), make_handler(args, stage))
    except OSError as exc:
        print(f"deserve_worker: cannot listen on port {args.port} ({exc.strerror}); pick a free port",
              file=sys.stderr)
        return 1
    threading.Thread(target=stage.run, daemon=True).start()
    threading.Thread(target=stage.report_forever, daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
