"""The network policy `tunnelmesh init` writes, and the hint it prints after it."""

from __future__ import annotations

STARTER_POLICY = '''\
# TunnelMesh network policy: which members may open connections to which.
#
# Everything not allowed here is denied. Replies to connections a node opened
# itself always pass (the filter is stateful), and `tunnelmesh ping` and the
# transport ladder's probes work whatever this file says. A node can accept more
# with [[filter.allow]] rules in its own config. Full reference: docs/filter.md.
#
# Groups and tags name sets of members; rules refer to them as "group:NAME" and
# "tag:NAME". A source (from) is a member's name, a group, a tag, an address or
# CIDR (a member's mesh address or the routes it advertises) or "*" (everyone).
# A target (to) is a member's name, a group, a tag or "*" (the default).
#
# [groups]
# admins = ["alice", "bob"]
#
# [tags]
# servers = ["db1", "web1"]

# Every member may ping every other member (ICMP and ICMPv6 echo).
[[allow]]
from = ["*"]
proto = ["icmp", "icmpv6"]

# To open a port, add a rule like this one (SSH from the admins to the servers),
# then run `tunnelmesh policy set FILE`:
#
# [[allow]]
# from = ["group:admins"]
# to = ["tag:servers"]
# proto = "tcp"
# ports = [22]          # or "8000-8100", or a list: [22, 443, "8000-8100"]
'''

OPEN_PORT_HINT = """\
The network policy allows ping between members and denies everything else.
To open a port, add an [[allow]] rule to the policy (for example
  [[allow]]
  from = ["*"]
  proto = "tcp"
  ports = [22]
) with `tunnelmesh policy edit`, or `tunnelmesh policy set FILE`."""
