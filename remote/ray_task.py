"""Run one command as a Ray task needing GPUs, streaming its output back: `executor = "ray"` for queue stages.

The engine copies this file to the Ray head host and launches it there under the usual task wrapper, one per queued
cell: `python3 bf-ray-task.py --address HEAD:PORT --num-gpus 1 --env-keys A,B -- PROGRAM ARG...`. Ray picks the node
and GPU (its worker sets CUDA_VISIBLE_DEVICES); the command's output comes back chunk by chunk through a streaming
generator and is printed here, so the wrapper's log, the journal offsets and extraction work as for any task. The
exit code is the command's. TERM or INT (a cancel, a timeout, Ctrl-C) cancels the Ray task with force, so nothing
keeps running on the cluster. Standard library and ray only: it runs with the host's Python, not benchfleet's.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any


def _run_command(argv: list[str], cwd: str, env: dict[str, str]) -> Iterator[bytes | int]:
    """On the Ray worker: run the command, yield its output in chunks, then its exit code."""
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    yield f"benchfleet: ray task on {socket.gethostname()} CUDA_VISIBLE_DEVICES={gpus}\n".encode()
    proc = subprocess.Popen(argv, cwd=cwd if os.path.isdir(cwd) else None, env={**os.environ, **env},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while chunk := os.read(fd, 65536):
        yield chunk
    yield proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True)
    p.add_argument("--num-gpus", type=float, default=1.0)
    p.add_argument("--env-keys", default="", help="comma-separated names of the task's own environment variables")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    a = p.parse_args()
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    if not argv:
        p.error("no command after --")
    import ray  # noqa: PLC0415 (the head's ray, imported only when this runs)

    ray.init(address=a.address, logging_level=logging.ERROR, log_to_driver=False, configure_logging=False)
    env = {k: os.environ[k] for k in a.env_keys.split(",") if k and k in os.environ}
    remote = ray.remote(num_gpus=a.num_gpus, num_returns="streaming", max_retries=0)(_run_command)
    refs: Any = remote.remote(argv, os.getcwd(), env)

    def cancel(signum: int, _frame: object) -> None:
        ray.cancel(refs, force=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, cancel)
    signal.signal(signal.SIGINT, cancel)
    rc = 1
    for ref in refs:
        item = ray.get(ref)
        if isinstance(item, bytes):
            sys.stdout.buffer.write(item)
            sys.stdout.buffer.flush()
        else:
            rc = int(item)
    return rc


if __name__ == "__main__":
    sys.exit(main())
