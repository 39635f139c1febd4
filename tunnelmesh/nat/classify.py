"""What a NAT does, from what STUN servers saw (RFC 5780's tests, sans-IO).

The NAT prober (actors/nat_prober.py) asks each server at its primary address, then
the filtering tests (a Binding request with CHANGE-REQUEST: does an answer from another
port, or another address and port, come back through the NAT?), then the mapping tests
(the same request to the server's other address and port: is our outside address the
same whatever we send to?). This module plans the destinations and decides from the
answers; the prober does the sending.

What the servers allow bounds what can be told:

- mapping: two destinations on different IP addresses that see the same outside
  address make it endpoint-independent; two ports of one IP that see different ones
  make it address-and-port-dependent; if it differs only between IPs, it is
  address-dependent when some IP's two ports agree. With one server IP only (the
  coordinator's reflection service on two ports), an address-dependent mapping cannot
  be told from an endpoint-independent one: agreeing ports are reported as
  endpoint-independent (address-dependent NATs are rare). Different outside addresses
  towards different IPs with no IP asked on two ports are reported as
  address-and-port-dependent, the case punching must assume.
- filtering: an answer to "change IP and port" makes it endpoint-independent; else an
  answer to "change port" address-dependent; no answer to "change port"
  address-and-port-dependent. Without a server that has a second IP (coturn, or another
  configured), an answered "change port" is reported as address-dependent: a full cone
  shows as address-dependent there.

The filtering tests must come before anything is sent to the server's other address:
that send itself would open the NAT's filter for the answer (see `FILTER_MEMORY`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

from .report import (
    ADDRESS_AND_PORT_DEPENDENT, ADDRESS_DEPENDENT, ENDPOINT_INDEPENDENT, NONE, UNKNOWN, Address,
)

#: Seconds after a packet to a server's other address during which the filtering tests
#: are not run again (the NAT may still hold the opening that packet made: Linux's
#: UDP conntrack keeps an answered flow 120 s, nf_conntrack_udp_timeout_stream).
FILTER_MEMORY = 180.0


@dataclass(frozen=True, slots=True)
class Binding:
    """One Binding request's outcome: where it went, and where the server saw us from
    (None: no answer)."""

    destination: Address
    mapped: Address | None


@dataclass(frozen=True, slots=True)
class Observations:
    """Everything one check learnt. A filtering test's value is whether its answer came
    (None: not asked, or the server does not change addresses)."""

    bindings: tuple[Binding, ...]
    #: The node's own addresses with its UDP port: a mapped address among them is no NAT.
    local: frozenset[Address] = frozenset()
    change_port: bool | None = None  # "change port" answered
    change_address: bool | None = None  # "change IP and port" answered


def mapping_destinations(primary: Address, other: Address | None) -> tuple[Address, ...]:
    """Where to send the mapping tests besides `primary`, given the server's OTHER-ADDRESS:
    RFC 5780's tests II (other IP, primary port) and III (other IP, other port); with one
    IP (other differs by port only) the two are one."""
    if other is None or other == primary:
        return ()
    if other[0] != primary[0] and other[1] != primary[1]:
        return ((other[0], primary[1]), other)
    return (other,)


def can_change_port(primary: Address, other: Address | None) -> bool:
    return other is not None and other[1] != primary[1]


def can_change_address(primary: Address, other: Address | None) -> bool:
    return other is not None and other[0] != primary[0] and other[1] != primary[1]


def classify(observations: Observations) -> tuple[str, str]:
    """(mapping, filtering) behaviour names of tunnelmesh.nat.report."""
    return classify_mapping(observations.bindings, observations.local), classify_filtering(
        observations.change_port, observations.change_address)


def classify_mapping(bindings: Iterable[Binding], local: Collection[Address] = ()) -> str:
    answered = [binding for binding in bindings if binding.mapped is not None]
    if not answered:
        return UNKNOWN
    # A server that sees one of our own addresses is reached without a NAT in between.
    # Others may be behind one (another interface's route): they are judged alone.
    behind_nat = [binding for binding in answered if binding.mapped not in local]
    if not behind_nat:
        return NONE
    # One outside address per destination (a later answer from the same one agrees, or
    # the mapping changed in between: the first is taken).
    seen: dict[Address, Address] = {}
    for binding in behind_nat:
        seen.setdefault(binding.destination, binding.mapped)  # type: ignore[arg-type]
    same_ip_pairs = [(a, b) for a, b in combinations(seen, 2) if a[0] == b[0]]
    other_ip_pairs = [(a, b) for a, b in combinations(seen, 2) if a[0] != b[0]]
    if any(seen[a] != seen[b] for a, b in same_ip_pairs):
        return ADDRESS_AND_PORT_DEPENDENT
    if any(seen[a] != seen[b] for a, b in other_ip_pairs):
        return ADDRESS_DEPENDENT if same_ip_pairs else ADDRESS_AND_PORT_DEPENDENT
    return ENDPOINT_INDEPENDENT if same_ip_pairs or other_ip_pairs else UNKNOWN


def classify_filtering(change_port: bool | None, change_address: bool | None) -> str:
    if change_address:
        return ENDPOINT_INDEPENDENT
    if change_port:
        return ADDRESS_DEPENDENT
    if change_port is False:
        return ADDRESS_AND_PORT_DEPENDENT
    return UNKNOWN


def reflexive_addresses(bindings: Sequence[Binding]) -> tuple[Address, ...]:
    """Every distinct outside address seen, in the order the servers were asked."""
    return tuple(dict.fromkeys(binding.mapped for binding in bindings if binding.mapped is not None))
