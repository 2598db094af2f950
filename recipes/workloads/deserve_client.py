"""A stand-in for DeServe's `python3 -m src.benchmark.deserve` (benchfleet's, not upstream's).

Like upstream it is also the controller: it listens on --controller-port for the last worker's POST
/update_tasks, keeps --batch-size requests in flight into --first-worker-url (POST /forward), and prints
nothing but one JSON line at the end with upstream's keys (real_input_throughput, real_output_throughput,
time_used, requests_finished_total, standard_* = totals / --time-limit, so negative when there is no time
limit, ...). Only `fixedN:input:variation` workloads exist here; every task produces exactly --max-tokens
tokens (plus or minus --variance).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import queue
import random
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ClientError(Exception):
    """Something the user can fix; main prints it as one line."""


@dataclass
class Request:
    id: int
    input_len: int
    max_tokens: int


@dataclass
class Rater:
    """Upstream's Rater, reduced: token and completion counts per second since the first request went out."""

    workload: list[Request]
    time_limit: int
    warmup: int
    trace: bool
    time_first_get: float | None = None
    time_last_post: float | None = None
    input_total: int = 0
    output_total: int = 0
    finished_total: int = 0
    input_history: dict[int, int] = field(default_factory=dict)
    output_history: dict[int, int] = field(default_factory=dict)
    finished_history: dict[int, int] = field(default_factory=dict)
    responses: dict[int, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self) -> None:
        if self.time_first_get is None:
            self.time_first_get = time.time()

    def post(self, request_id: int, token: int, finished: bool) -> bool:
        """Record one token; False once the time limit has passed (upstream's RaterTimeLimitExceeded)."""
        now = time.time()
        first = self.time_first_get if self.time_first_get is not None else now
        if self.time_limit > 0 and now - first > self.time_limit:
            return False
        second = int(now - first)
        with self.lock:
            self.time_last_post = now
            if request_id not in self.responses:  # upstream counts the prompt's tokens + 1 on first reply
                tokens = self.workload[request_id].input_len + 1
                self.input_total += tokens
                self.input_history[second] = self.input_history.get(second, 0) + tokens
            self.responses.setdefault(request_id, []).append(token)
            self.output_total += 1
            self.output_history[second] = self.output_history.get(second, 0) + 1
            self.finished_history.setdefault(second, 0)
            if finished:
                self.finished_total += 1
                self.finished_history[second] += 1
        return True

    def dump(self) -> dict[str, Any]:
        """Upstream's result keys and meanings."""
        time_used = real_in = real_out = None
        warm_in = warm_out = 0.0
        in_prefix, out_prefix = {0: 0}, {0: 0}
        if self.time_first_get is not None and self.time_last_post is not None:
            time_used = self.time_last_post - self.time_first_get
            whole = math.ceil(time_used)
            if time_used > 0:
                real_in, real_out = self.input_total / time_used, self.output_total / time_used
            for i in range(1, whole):
                in_prefix[i] = in_prefix[i - 1] + self.input_history.get(i, 0)
                out_prefix[i] = out_prefix[i - 1] + self.output_history.get(i, 0)
            for i in range(self.warmup, whole):
                warm_in += self.input_history.get(i, 0)
                warm_out += self.output_history.get(i, 0)
            if time_used > self.warmup:
                warm_in /= time_used - self.warmup
                warm_out /= time_used - self.warmup
        result: dict[str, Any] = {
            "time_limit": self.time_limit,
            "time_warmup": self.warmup,
            "time_first_get": self.time_first_get,
            "time_last_post": self.time_last_post,
            "time_used": time_used,
            "real_input_throughput": real_in,
            "real_output_throughput": real_out,
            "standard_input_throughput": self.input_total / self.time_limit,
            "standard_output_throughput": self.output_total / self.time_limit,
            "warmup_input_throughput": warm_in,
            "warmup_output_throughput": warm_out,
            "input_throughput_total": self.input_total,
            "input_throughput_history": self.input_history,
            "input_throughput_prefix_sum": in_prefix,
            "output_throughput_total": self.output_total,
            "output_throughput_history": self.output_history,
            "output_throughput_prefix_sum": out_prefix,
            "requests_finished_total": self.finished_total,
            "requests_finished_history": self.finished_history,
        }
        if self.trace:
            result["trace"] = [
                {"request": f"<{r.input_len} tokens>", "response": " ".join(map(str, self.responses[r.id]))}
                for r in self.workload if r.id in self.responses
            ]
        return result


def parse_workload(spec: str, max_tokens: int, variance: int, seed: int) -> list[Request]:
    """`fixedN:input:variation`: N requests of input length input ± variation (upstream's StaticWorkload)."""
    if not spec.startswith("fixed"):
        raise ClientError(f"workload {spec!r} is not supported by this stand-in; use fixedN:input:variation")
    try:
        size, length, variation = (int(x) for x in spec[len("fixed"):].split(":"))
    except ValueError:
        raise ClientError(f"workload {spec!r} is not fixedN:input:variation (three integers)") from None
    if size < 1 or length < 1 or variation < 0:
        raise ClientError(f"workload {spec!r}: N and input must be at least 1 and variation at least 0")
    rng = random.Random(seed)
    return [Request(i, max(1, length + rng.randint(-variation, variation)),
                    max(1, max_tokens + rng.randint(-variance, variance))) for i in range(size)]


def post_json(url: str, path: str, payload: object, timeout: float = 10.0) -> None:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "localhost", parts.port or 80, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(payload).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise ClientError(f"{url}{path} answered HTTP {response.status}")
    finally:
        conn.close()


def serve_controller(
    host: str, port: int, rater: Rater, done: queue.Queue[int | None]
) -> ThreadingHTTPServer:
    """The controller endpoint the last worker reports tokens to; finished request ids go into `done`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != "/update_tasks":
                self.send_response(404)
                self.end_headers()
                return
            for item in json.loads(body):
                request_id = int(str(item["task_id"]).split("@")[0])
                finished = bool(item["finished"])
                if not rater.post(request_id, int(item["output_token"]), finished):
                    done.put(None)
                elif finished:
                    done.put(request_id)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise ClientError(f"cannot listen on controller port {port} ({exc.strerror}); "
                          "free it or pass --controller-port") from None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.time_limit > 0 and not 0 <= args.warmup < args.time_limit:
        raise ClientError(f"--warmup {args.warmup} must be below --time-limit {args.time_limit}")
    workload = parse_workload(args.workload, args.max_tokens, args.variance, args.seed)
    rater = Rater(workload, args.time_limit, args.warmup, args.trace)
    done: queue.Queue[int | None] = queue.Queue()
    server = serve_controller(args.controller_host, args.controller_port, rater, done)
    pending = list(reversed(workload))

    def send_next() -> None:
        request = pending.pop()
        rater.started()
        task = {"task_id": f"{request.id}@{uuid.uuid4()}", "input_len": request.input_len,
                "max_tokens": request.max_tokens}
        try:
            post_json(args.first_worker_url, "/forward", {"tasks": [task]})
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"cannot reach the first worker at {args.first_worker_url} ({exc}); "
                              "is it running, and is --first-worker-url right?") from None

    try:
        for _ in range(min(args.batch_size, len(pending))):
            send_next()
        deadline = time.monotonic() + args.time_limit if args.time_limit > 0 else math.inf
        while rater.finished_total < len(workload):
            wait = min(args.idle_timeout, max(0.0, deadline - time.monotonic()))
            try:
                finished = done.get(timeout=wait)
            except queue.Empty:
                if time.monotonic() >= deadline:
                    break
                raise ClientError(
                    f"no request finished for {args.idle_timeout:g} s; check that every worker runs and that "
                    f"the last one's --controller-url reaches port {args.controller_port}"
                ) from None
            if finished is None:
                break
            if pending:
                send_next()
    finally:
        server.shutdown()
        server.server_close()
    return rater.dump()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time-limit", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=150, help="requests kept in flight in the pipeline")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--workload", default="fixed8:16:0", help="fixedN:input:variation")
    p.add_argument("--first-worker-url", default="http://localhost:8080")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--trace", action="store_true")
    p.add_argument("--variance", type=int, default=0, help="variance of output tokens")
    p.add_argument("--controller-port", type=int, default=19000)
    p.add_argument("--controller-host", default="0.0.0.0", help="address to listen on (upstream: 0.0.0.0)")
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="give up after this many seconds with no request finished (the stand-in's own flag)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for workload variation (the stand-in's own flag)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch_size < 1 or args.max_tokens < 1:
        print("deserve_client: --batch-size and --max-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except ClientError as exc:
        print(f"deserve_client: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
