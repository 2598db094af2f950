"""A test service: prints a banner with a token (to capture), listens on a TCP port, optionally dies after a delay."""

from __future__ import annotations

import argparse
import socket
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", default="tok-123")
    p.add_argument("--die-after", type=float, default=0.0)
    p.add_argument("--delay", type=float, default=0.0, help="wait before listening")
    a = p.parse_args()
    time.sleep(a.delay)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", a.port))
    server.listen()
    print(f"serving; connect with --peer tcp://127.0.0.1:{a.port}/{a.token}", flush=True)
    server.settimeout(0.2)
    started = time.monotonic()
    while not a.die_after or time.monotonic() - started < a.die_after:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.sendall(f"{a.token}\n".encode())
        conn.close()
    print("dying on purpose", flush=True)
    return 3


if __name__ == "__main__":
    sys.exit(main())
