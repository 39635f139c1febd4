"""A STUN client for the reflection service's e2e tests, run inside a lab node with
`python -m tests.support.stun_flood`; it prints one JSON object.

- `ask HOST PORT`: one Binding request, then one with change-port and one with change-IP;
  what came back for each (or null after 3 s).
- `flood HOST PORT --sources CIDR --count N --rounds R`: from each of the first N addresses
  of CIDR (they must be this node's), R rounds of one Binding request, one oversized
  datagram and one of garbage, as fast as it can; then it reads answers until none came for
  a second (within 30 s). It reports the answers per source, the datagrams that were not an
  answer to one of its requests, and the monotonic times of its first send and last answer
  (the namespaces share the host's monotonic clock, so the service's window lies within).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import socket
import time
from itertools import islice

from tunnelmesh.nat.stun import StunError, binding_request, parse_binding_response

QUIET = 1.0
DEADLINE = 30.0


def ask(server: tuple[str, int]) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3.0)
    results: dict[str, object] = {}
    for name, change_ip, change_port in (("plain", False, False), ("change_port", False, True),
                                         ("change_ip", True, False)):
        transaction_id, request = binding_request(change_ip=change_ip, change_port=change_port)
        sock.sendto(request, server)
        try:
            data, source = sock.recvfrom(2048)
        except TimeoutError:
            results[name] = None
            continue
        answer = parse_binding_response(data)
        results[name] = {"source": list(source), "mapped": list(answer.mapped), "request_size": len(request),
                         "origin": answer.origin and list(answer.origin), "other": answer.other and list(answer.other),
                         "size": len(data), "ours": answer.transaction_id == transaction_id}
    results["local"] = list(sock.getsockname())
    return results


def flood(server: tuple[str, int], sources: list[str], rounds: int) -> dict[str, object]:
    selector = selectors.DefaultSelector()
    sockets = {}
    for address in sources:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind((address, 0))
        sockets[address] = sock
        selector.register(sock, selectors.EVENT_READ, address)
    ours: set[bytes] = set()
    answers = dict.fromkeys(sources, 0)
    unexpected = 0
    sent = 0
    last_answer = None

    def read(timeout: float) -> int:
        nonlocal unexpected, last_answer
        count = 0
        for key, _ in selector.select(timeout):
            while True:
                try:
                    data = key.fileobj.recv(2048)  # type: ignore[union-attr]
                except BlockingIOError:
                    break
                count += 1
                try:
                    answer = parse_binding_response(data)
                except StunError:
                    unexpected += 1
                    continue
                if answer.transaction_id in ours and answer.mapped[0] == key.data:
                    answers[key.data] += 1
                    last_answer = time.monotonic()
                else:
                    unexpected += 1
        return count

    first_send = time.monotonic()
    for _ in range(rounds):
        for address, sock in sockets.items():
            transaction_id, request = binding_request()
            ours.add(transaction_id)
            oversized = binding_request()[1] + bytes(1000)  # a transaction id not ours: no answer may count
            for datagram in (request, oversized, os.urandom(len(request))):
                try:
                    sock.sendto(datagram, server)
                    sent += 1
                except BlockingIOError:
                    pass
        read(0)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline and read(QUIET):
        pass
    return {"sent": sent, "requests": len(ours), "answers": answers, "unexpected": unexpected,
            "first_send": first_send, "last_answer": last_answer}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["ask", "flood"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--sources")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    server = (args.host, args.port)
    if args.mode == "ask":
        print(json.dumps(ask(server)))
    else:
        sources = [str(ip) for ip in islice(ipaddress.ip_network(args.sources).hosts(), args.count)]
        print(json.dumps(flood(server, sources, args.rounds)))


if __name__ == "__main__":
    main()
