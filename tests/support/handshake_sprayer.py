"""A hostile sender for tests/e2e/test_handshake_flood.py, run inside its own namespace:
sprays handshake initiations at a node's UDP port (a raw UDP socket, no scapy) -- junk,
initiations with a valid mac1, and once a cookie reply came, some with a valid mac2 --
at a fixed rate for a bounded time and count, and counts what comes back.

    python -m tests.support.handshake_sprayer --target 192.0.2.2:51820 --public-key <base64> \\
        --rate 4000 --seconds 12

Prints "sprayer: spraying" once the first datagram is out, then at the end one line
"sprayer: result {json}" with the figures (sent by kind, replies by type, the rate achieved).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import time

from tests.support.hostile_handshakes import HostileInitiations

MAX_SECONDS = 60.0
MAX_COUNT = 500_000
TICK = 0.005  # seconds between bursts: the rate is kept per burst, not per datagram
MAC2_EVERY = 10  # one initiation in this many carries the cookie's mac2 (once there is one)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the node's UDP port")
    parser.add_argument("--public-key", required=True, help="the node's WireGuard public key (base64)")
    parser.add_argument("--rate", type=int, default=4000, help="datagrams a second")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    target = (host, int(port))
    seconds = min(args.seconds, MAX_SECONDS)
    count = min(int(args.rate * seconds), MAX_COUNT)
    hostile = HostileInitiations(base64.b64decode(args.public_key), os.urandom)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sent = {"junk": 0, "mac1": 0, "mac2": 0, "send buffer full": 0}
    replies: dict[int, int] = {}

    def drain() -> None:
        for _ in range(10_000):
            try:
                reply = sock.recv(2048)
            except BlockingIOError:
                return
            replies[reply[0]] = replies.get(reply[0], 0) + 1
            if reply[0] == 3:
                hostile.take_reply(reply)

    start = time.monotonic()
    done = 0
    announced = False
    while done < count and time.monotonic() - start < seconds:
        due = min(count, int((time.monotonic() - start + TICK) * args.rate))
        while done < due:
            if done % 2:
                datagram, kind = hostile.junk(), "junk"
            elif hostile.cookie is not None and done % (2 * MAC2_EVERY) == 0:
                datagram, kind = hostile.initiation(with_mac2=True), "mac2"
            else:
                datagram, kind = hostile.initiation(), "mac1"
            try:
                sock.sendto(datagram, target)
                sent[kind] += 1
            except BlockingIOError:
                sent["send buffer full"] += 1
            done += 1
        if not announced:
            print("sprayer: spraying", flush=True)
            announced = True
        drain()
        time.sleep(max(0.0, start + (done / args.rate) - time.monotonic()))
    elapsed = time.monotonic() - start
    stop = time.monotonic() + 0.5  # the last answers
    while time.monotonic() < stop:
        drain()
        time.sleep(0.01)
    sock.close()
    sent_total = sent["junk"] + sent["mac1"] + sent["mac2"]
    result = {"seconds": round(elapsed, 2), "sent": sent, "per_second": round(sent_total / elapsed),
              "cookie_replies": replies.get(3, 0), "other_replies": {k: v for k, v in replies.items() if k != 3}}
    print("sprayer: result " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
