"""netcheck's pieces: the TCP reach measurement (loopback), URL addresses, and the report
and status line people read (tunnelmesh/cli/netcheck.py)."""

from __future__ import annotations

import asyncio
import socket

from actors.messages import Netcheck, Reach
from actors.netcheck import reach, url_address
from tunnelmesh.cli.netcheck import nat_summary, report_lines
from tunnelmesh.nat.report import MAPPED, Candidate, NatReport, ServerResult


def test_reach_a_listener_and_a_closed_port() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: a connect is refused
    try:
        port, closed_port = listener.getsockname()[1], closed.getsockname()[1]
        up, down = asyncio.run(_both(port, closed_port))
    finally:
        listener.close()
        closed.close()
    assert up == Reach("relay", f"127.0.0.1:{port}", up.latency_ms) and up.latency_ms is not None
    assert down.latency_ms is None and down.error == "Connection refused"


async def _both(port: int, closed_port: int) -> tuple[Reach, Reach]:
    return await reach("relay", "127.0.0.1", port), await reach("relay", "127.0.0.1", closed_port)


def test_url_address_takes_the_schemes_default_port() -> None:
    assert url_address("https://coord.example.org") == ("coord.example.org", 443)
    assert url_address("http://192.0.2.1") == ("192.0.2.1", 80)
    assert url_address("https://192.0.2.1:7400/prefix") == ("192.0.2.1", 7400)


REPORT = NatReport(checked_at=1.0, mapping="address-and-port-dependent", filtering="address-and-port-dependent",
                   reflexive=(("192.0.2.3", 20871), ("192.0.2.3", 21277)),
                   servers=(ServerResult("192.0.2.2:443", ("192.0.2.3", 20871), 0.41),
                            ServerResult("stun.example.org:3478", None, None, "no answer to 4 tries")))


def test_the_report_for_people() -> None:
    result = Netcheck(nat=REPORT, udp=True, port_mapping=Candidate("192.0.2.3", 51820, MAPPED),
                      coordinator=Reach("coordinator", "192.0.2.2:443", 0.37),
                      relays=(Reach("relay", "192.0.2.2:443", 0.29),),
                      ssh=(Reach("ssh to beta", "192.0.2.4:2222", None, "no answer within 3 s"),))
    assert report_lines(result) == [
        "Report:",
        "  * UDP: yes",
        "  * Reflexive address: 192.0.2.3:20871, 192.0.2.3:21277",
        "  * Mapping: address-and-port-dependent (hard NAT: a new port per destination; punching needs port spraying)",
        "  * Filtering: address-and-port-dependent",
        "  * Port mapping: 192.0.2.3:51820",
        "  * STUN servers:",
        "      - 192.0.2.2:443: saw 192.0.2.3:20871 in 0.41 ms",
        "      - stun.example.org:3478: no answer to 4 tries",
        "  * Coordinator (TCP): 0.37 ms",
        "  * Relays (TCP):",
        "      - relay at 192.0.2.2:443: 0.29 ms",
        "  * SSH endpoints of members (TCP):",
        "      - ssh to beta at 192.0.2.4:2222: unreachable (no answer within 3 s)",
    ]


def test_the_status_line() -> None:
    assert nat_summary(NatReport(), None) == "nat: not checked yet"
    assert nat_summary(REPORT, None) == ("nat: address-and-port-dependent mapping, address-and-port-dependent "
                                         "filtering; seen as 192.0.2.3:20871, 192.0.2.3:21277; port mapping none")
    blocked = NatReport(checked_at=1.0, error="no STUN server answered over UDP (UDP blocked, or the servers are down)")
    assert nat_summary(blocked, None) == ("nat: no STUN server answered over UDP (UDP blocked, or the servers are "
                                          "down); seen as nowhere; port mapping none")


def test_the_report_says_why_there_is_no_port_mapping() -> None:
    why = "pcp: no answer from 192.0.2.1:5351 after 4 tries; upnp: AddPortMapping: Received UPnP error 718"
    lines = report_lines(Netcheck(nat=REPORT, udp=True, port_mapping=None, coordinator=None, relays=(), ssh=(),
                                  port_mapping_error=why))
    assert f"  * Port mapping: none ({why})" in lines
    assert "  * Port mapping: none" in report_lines(Netcheck(nat=REPORT, udp=True, port_mapping=None,
                                                              coordinator=None, relays=(), ssh=()))
