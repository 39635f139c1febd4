"""The vocabulary every NAT traversal piece shares: a candidate address and its kind,
and what the NAT prober found (its `NatReport`, read by the coordinator client to
register candidates, by sessions to choose how to punch, by `status` and `netcheck`).

Behaviour names follow RFC 4787 (mapping) and RFC 5780 (filtering):

- mapping: how the NAT picks the outside address of one inside address:port.
  "endpoint-independent": the same for every destination (cone NATs: punchable);
  "address-dependent" / "address-and-port-dependent": a new one per destination
  (a "symmetric" NAT: the reflexive port a STUN server saw is not the one a peer will
  see); "none": no NAT (the reflexive address is one of the node's own).
- filtering: which outside senders may reach a mapping. "endpoint-independent" (full
  cone), "address-dependent" (address-restricted), "address-and-port-dependent"
  (port-restricted and symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass

Address = tuple[str, int]

# Candidate kinds, in the order a peer tries them: a shared LAN first, then what the
# router promised (port mapping), what the operator configured, what STUN saw.
LOCAL, MAPPED, CONFIGURED, REFLEXIVE = "local", "mapped", "configured", "reflexive"
KINDS = (LOCAL, MAPPED, CONFIGURED, REFLEXIVE)

NONE = "none"
ENDPOINT_INDEPENDENT = "endpoint-independent"
ADDRESS_DEPENDENT = "address-dependent"
ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
UNKNOWN = "unknown"
BEHAVIOURS = (NONE, ENDPOINT_INDEPENDENT, ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT, UNKNOWN)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One address at which a node's WireGuard UDP port may be reached, and how it was learnt."""

    host: str
    port: int
    kind: str  # one of KINDS

    @property
    def address(self) -> Address:
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class ServerResult:
    """One STUN server the prober asked."""

    server: str  # "host:port" as asked
    reflexive: Address | None  # where it saw us; None: no answer
    rtt_ms: float | None
    error: str | None = None  # why there is no answer ("timed out after 3 tries", ...)


@dataclass(frozen=True, slots=True)
class NatReport:
    """What the NAT prober last found. `hard` is the case punching needs port spraying for."""

    checked_at: float | None = None  # Unix time of the last completed check; None: never
    mapping: str = UNKNOWN
    filtering: str = UNKNOWN
    reflexive: tuple[Address, ...] = ()  # every distinct reflexive address seen, first server first
    servers: tuple[ServerResult, ...] = ()
    error: str | None = None  # why the last check could not classify (no server answered, ...)

    @property
    def udp_works(self) -> bool:
        """Some STUN server answered over UDP from the WireGuard port."""
        return any(result.reflexive is not None for result in self.servers)

    @property
    def hard(self) -> bool:
        """Whether the mapping depends on the destination: peers cannot use our reflexive
        port, and punching needs the other side to spray ports near it."""
        return self.mapping in (ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT)


@dataclass(frozen=True, slots=True)
class PeerNat:
    """What a peer said of its NAT in its signed candidate record: how to punch towards it.
    `reflexive` is where STUN servers saw it; behind a hard NAT the peer's mapping towards
    us is another port of the same address, so the easy side sprays ports near these."""

    mapping: str = UNKNOWN
    filtering: str = UNKNOWN
    reflexive: tuple[Address, ...] = ()

    @property
    def hard(self) -> bool:
        return self.mapping in (ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT)
