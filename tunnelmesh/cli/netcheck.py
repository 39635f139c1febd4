"""`tunnelmesh netcheck`: the NAT this node is behind and what it can reach (docs/nat.md).

It asks the running daemon (control command `netcheck`): the check must leave from the
daemon's own WireGuard UDP port, which only the daemon holds, to say where peers'
packets will be seen. Without a daemon it says so and how to start one. The NAT lines
(`nat_lines`) are shared with `tunnelmesh status`.
"""

from __future__ import annotations

import argparse
import json

from typing import TYPE_CHECKING

from tunnelmesh.nat.report import ADDRESS_AND_PORT_DEPENDENT, ADDRESS_DEPENDENT, ENDPOINT_INDEPENDENT, NONE, Candidate, NatReport
from tunnelmesh.paths import Paths

from .common import EXIT_FAIL, EXIT_OK, CliError

# The control client where the command runs: every `tunnelmesh` start builds this parser.
if TYPE_CHECKING:
    from actors.messages import Netcheck, Reach

DESCRIPTION = (
    "Runs a fresh NAT check in the running daemon, from its WireGuard UDP port: STUN Binding requests to the "
    "coordinator's reflection service and the [nat] stun_servers tell the reflexive address and the NAT's mapping "
    "and filtering (RFC 4787/5780 names); TCP connects tell whether the coordinator, each relay and a few members' "
    "SSH endpoints are reachable, and how fast. Also the port mapping the router granted, if any. "
    "Exit status 1 when no STUN server answered over UDP. The same NAT facts are in `tunnelmesh status`."
)

#: What each mapping behaviour means for direct paths, for people.
MAPPING_WORDS = {
    NONE: "no NAT",
    ENDPOINT_INDEPENDENT: "easy NAT: peers can punch to the reflexive address",
    ADDRESS_DEPENDENT: "hard NAT: a new port per destination; punching needs port spraying",
    ADDRESS_AND_PORT_DEPENDENT: "hard NAT: a new port per destination; punching needs port spraying",
}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("netcheck", help="NAT type, reflexive address, UDP/SSH/relay reachability and latency",
                       description=DESCRIPTION)
    p.add_argument("--json", action="store_true", help="the report as JSON (docs/control.md, `netcheck`)")
    p.set_defaults(func=cmd_netcheck)


def cmd_netcheck(args: argparse.Namespace, paths: Paths) -> int:
    from actors.messages import to_json
    from tunnelmesh import control_client
    from tunnelmesh.control_client import NotRunning

    try:
        result = control_client.netcheck(paths.control_socket)
    except NotRunning:
        raise CliError(f"netcheck runs in the daemon (it probes from the daemon's WireGuard port), and none runs "
                       f"at {paths.control_socket}: start it with `tunnelmesh up`") from None
    if args.json:
        print(json.dumps(to_json(result), indent=2))
    else:
        print("\n".join(report_lines(result)))
    return EXIT_OK if result.udp else EXIT_FAIL


def report_lines(result: Netcheck) -> list[str]:
    lines = ["Report:", f"  * UDP: {'yes' if result.udp else 'no (no STUN server answered from the WireGuard port)'}"]
    lines += [f"  * {line}" for line in nat_lines(result.nat, result.port_mapping, result.port_mapping_error)]
    if result.nat.servers:
        lines.append("  * STUN servers:")
        for server in result.nat.servers:
            if server.reflexive is not None:
                lines.append(f"      - {server.server}: saw {_address(server.reflexive)} in {server.rtt_ms:g} ms")
            else:
                lines.append(f"      - {server.server}: {server.error or 'no answer'}")
    if result.coordinator is not None:
        lines.append(f"  * Coordinator (TCP): {_reach(result.coordinator)}")
    for title, reaches in (("Relays (TCP)", result.relays), ("SSH endpoints of members (TCP)", result.ssh)):
        if reaches:
            lines.append(f"  * {title}:")
            lines += [f"      - {reach.what} at {reach.target}: {_reach(reach)}" for reach in reaches]
    return lines


def nat_lines(report: NatReport, port_mapping: Candidate | None, port_mapping_error: str | None = None) -> list[str]:
    """The NAT facts, one per line (netcheck's report and `status`); `port_mapping_error`:
    why there is no port mapping."""
    if report.checked_at is None:
        return ["NAT: not checked yet"]
    lines = []
    if report.error:
        lines.append(f"NAT: {report.error}")
    if report.reflexive:
        lines.append("Reflexive address: " + ", ".join(_address(address) for address in report.reflexive))
    if report.udp_works:
        words = MAPPING_WORDS.get(report.mapping, "not enough servers answered to tell")
        lines.append(f"Mapping: {report.mapping} ({words})")
        lines.append(f"Filtering: {report.filtering}")
    none = f"none ({port_mapping_error})" if port_mapping_error else "none"
    lines.append("Port mapping: " + (_address(port_mapping.address) if port_mapping is not None else none))
    return lines


def nat_summary(report: NatReport, port_mapping: Candidate | None) -> str:
    """The NAT facts on one line, for `status`."""
    if report.checked_at is None:
        return "nat: not checked yet"
    if not report.udp_works:
        what = report.error or "no STUN answer"
    else:
        what = f"{report.mapping} mapping, {report.filtering} filtering"
    seen = ", ".join(_address(address) for address in report.reflexive) or "nowhere"
    mapped = _address(port_mapping.address) if port_mapping is not None else "none"
    return f"nat: {what}; seen as {seen}; port mapping {mapped}"


def _reach(reach: Reach) -> str:
    return f"{reach.latency_ms:g} ms" if reach.latency_ms is not None else f"unreachable ({reach.error})"


def _address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
