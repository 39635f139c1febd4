"""A long, paced TCP stream whose integrity can be checked at both ends.

    python -m tools.stream serve HOST PORT RESULT   # accept one connection, read to EOF
    python -m tools.stream send HOST PORT RESULT --rate KB_PER_S --stop-file FILE --max-seconds N

The sender writes a deterministic byte sequence (SHA-256 counter mode) at a
steady rate until the stop file appears (or max-seconds pass), then closes;
each side writes {"bytes", "sha256", "error"} as JSON to RESULT. A reset or
any socket error ends the stream with the error recorded: the e2e tests use
this to show that a path change under an open connection loses nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import time

CHUNK = 4096


def _block(index: int) -> bytes:
    return b"".join(hashlib.sha256(f"{index}:{i}".encode()).digest() for i in range(CHUNK // 32))


def serve(host: str, port: int, result: str) -> None:
    digest, total, error = hashlib.sha256(), 0, None
    with socket.create_server((host, port)) as server:
        server.settimeout(120)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(120)
            try:
                while data := conn.recv(65536):
                    digest.update(data)
                    total += len(data)
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
    _write(result, total, digest.hexdigest(), error)


def send(host: str, port: int, result: str, rate_kb: float, stop_file: str, max_seconds: float) -> None:
    digest, total, error = hashlib.sha256(), 0, None
    start = time.monotonic()
    interval = CHUNK / (rate_kb * 1024)
    try:
        with socket.create_connection((host, port), timeout=30) as conn:
            conn.settimeout(60)
            index = 0
            while not os.path.exists(stop_file) and time.monotonic() - start < max_seconds:
                block = _block(index)
                conn.sendall(block)
                digest.update(block)
                total += len(block)
                index += 1
                delay = start + index * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(60)
            conn.recv(1)  # wait for the server's close: everything was read
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    _write(result, total, digest.hexdigest(), error)


def _write(path: str, total: int, sha256: str, error: str | None) -> None:
    with open(path, "w") as f:
        json.dump({"bytes": total, "sha256": sha256, "error": error}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=("serve", "send"))
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("result")
    parser.add_argument("--rate", type=float, default=64.0, help="KiB per second (send)")
    parser.add_argument("--stop-file", default="/nonexistent", help="stop sending when this file exists")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args()
    if args.role == "serve":
        serve(args.host, args.port, args.result)
    else:
        send(args.host, args.port, args.result, args.rate, args.stop_file, args.max_seconds)


if __name__ == "__main__":
    main()
