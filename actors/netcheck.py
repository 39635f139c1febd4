"""The `netcheck` control command's work (docs/nat.md): a fresh NAT check by the prober
and, at the same time, TCP connects that say what this node can reach and how fast:
the coordinator, each relay, and a few members' SSH endpoints. A connect is opened and
closed at once (nothing is sent), bounded by CONNECT_TIMEOUT; the round trip of the
coordinator over UDP is in the report's STUN answers."""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tunnelmesh.clock import SYSTEM_CLOCK, Clock
from tunnelmesh.nat.report import Candidate

from .messages import Netcheck, Reach
from .nat_prober import CheckNat, NatProber

if TYPE_CHECKING:
    from tunnelmesh.membership import MapSnapshot

    from .links import PeerMapDirectory

CONNECT_TIMEOUT = 3.0
SSH_MEMBERS = 3  # members whose SSH endpoint is tried (by name): enough to tell "blocked" from "one is down"
CHECK_TIMEOUT = 60.0  # the prober's check, queued behind a running one, takes ~20 s at worst


async def netcheck(prober: NatProber, *, port_mapping: Candidate | None, coordinator_url: str | None,
                   relay_urls: Iterable[str], ssh: Iterable[tuple[str, str, int]],
                   clock: Clock = SYSTEM_CLOCK, port_mapping_error: str | None = None) -> Netcheck:
    """`ssh`: (member name, host, port) of the SSH endpoints to try; `port_mapping_error`:
    why there is no port mapping."""
    relays = [reach("relay", *url_address(url), clock) for url in relay_urls]
    coordinator = [reach("coordinator", *url_address(coordinator_url), clock)] if coordinator_url else []
    sshs = [reach(f"ssh to {name}", host, port, clock) for name, host, port in ssh]
    report, *reached = await asyncio.gather(prober.ask(CheckNat(), timeout=CHECK_TIMEOUT),
                                            *coordinator, *relays, *sshs)
    return Netcheck(nat=report, udp=report.udp_works, port_mapping=port_mapping,
                    coordinator=reached[0] if coordinator else None,
                    relays=tuple(reached[len(coordinator):len(coordinator) + len(relays)]),
                    ssh=tuple(reached[len(coordinator) + len(relays):]), port_mapping_error=port_mapping_error)


def ssh_endpoints(directory: PeerMapDirectory, snapshot: MapSnapshot, own_wg_key: bytes) -> list[tuple[str, str, int]]:
    """The first SSH target of up to SSH_MEMBERS other members that have one, by name."""
    found = []
    for wg_key, member in sorted(snapshot.members.items(), key=lambda item: item[1].name):
        targets = directory.targets(wg_key) if wg_key != own_wg_key else []
        if targets:
            found.append((member.name, targets[0].host, targets[0].port))
        if len(found) == SSH_MEMBERS:
            break
    return found


def url_address(url: str) -> tuple[str, int]:
    """(host, port) of an http(s)/ws(s) URL, with the scheme's default port."""
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme in ("https", "wss") else 80)


async def reach(what: str, host: str, port: int, clock: Clock = SYSTEM_CLOCK) -> Reach:
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    started = clock.monotonic()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return Reach(what, target, None, f"no answer within {CONNECT_TIMEOUT:g} s")
    except OSError as exc:
        return Reach(what, target, None, os.strerror(exc.errno) if exc.errno else str(exc))  # asyncio's text names no cause
    latency = (clock.monotonic() - started) * 1000
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return Reach(what, target, round(latency, 2))
