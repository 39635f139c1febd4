"""Asking the home router for a UDP mapping of the WireGuard port (docs/nat.md, "Port
mapping"): PCP (RFC 6887), NAT-PMP (RFC 6886), UPnP IGD (async-upnp-client), tried in
that order. The PortMapper actor (actors/port_mapper.py) keeps the mapping alive.

- natpmp.py, pcp.py  sans-IO codecs (no maintained library speaks them)
- upnp.py            the gateway's InternetGatewayDevice over async-upnp-client
- client.py          one exchange per protocol, bounded; PCP, then NAT-PMP, then UPnP
"""
