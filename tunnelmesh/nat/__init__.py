"""NAT traversal (docs/nat.md): what a node learns about the NATs in front of it and
the addresses (candidates) at which peers may reach its WireGuard UDP port.

- report.py      the shared vocabulary: a candidate and its kind, the prober's report
- stun.py        STUN Binding (RFC 8489/5780) over aioice's codec: requests, answers
- classify.py    sans-IO: mapping and filtering behaviour from the prober's observations
- candidates.py  the candidate record a member signs and the peer map carries
- portmap/       asking the home router for a mapping: UPnP IGD, NAT-PMP, PCP
"""
