"""NAT routers of every common kind in a `tools.lab.Lab`, and a real STUN server (coturn).

A `NatLab` owns one outside switch ("the internet", 192.0.2.0/24) and any number of
sites: a router namespace between the outside switch and its own inside switch (a /29 of
198.51.100.0/24 or 203.0.113.0/24), with one or more nodes behind it. Each router's NAT
is nftables rules (`inet lab_nat` table) chosen by its NAT type:

``none``
    Plain routing, no NAT, no filter: the inside subnet is public (every host on the
    outside switch gets a route to it via the router).
``full-cone``
    Endpoint-independent mapping and filtering (Linux has no built-in full cone). Outbound
    UDP is `snat` to the router's address, keeping the source port (netfilter keeps it
    whenever the tuple is free); every UDP source port the inside node sends from is put
    in the dynamic set ``@mapped`` (refreshed by each packet, expiring after the
    stream timeout) and new inbound UDP to one of those ports, from anyone, is `dnat`-ed to
    the inside node. TCP and other protocols are masqueraded.
``address-restricted``
    Endpoint-independent mapping (as full-cone) and address-dependent filtering: each
    outbound UDP packet puts (destination address . source port) in ``@contacted``, and
    new inbound UDP from any port of such an address to that port is `dnat`-ed in.
``port-restricted``
    Plain `masquerade` (conntrack keeps the source port when free: endpoint-independent
    mapping; only replies to a flow come in: address-and-port-dependent filtering).
``symmetric``
    `masquerade random,fully-random`: every new flow (new destination address or port)
    gets a random port of the whole range (1024-65535), unrelated to the ports STUN
    servers saw; address-and-port-dependent filtering. A peer reaches such a mapping only
    by sweeping the range (tunnelmesh/punch.py).
``udp-blocked``
    All forwarded UDP from inside is dropped; TCP (and ICMP) masqueraded.
``tcp-web-only``
    Only TCP to ports 80 and 443 goes out (masqueraded); everything else is dropped.

Every NATing router drops new inbound connections that its rules do not forward, and drops
UDP addressed to itself from outside: it runs no UDP service, and a packet it accepted
itself would leave a conntrack entry holding a port that the inside node's own flow
then could not have (the race the issue describes). A drop in the filter hook comes
before conntrack confirms the entry, so nothing is held.

Conntrack timeouts are short (per-netns sysctls, `set_conntrack_timeouts`), so mappings
expire during tests; `flush_conntrack` drops every mapping at once (`conntrack -F`, plus
the full-cone / address-restricted sets).
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from itertools import chain

from tools.lab import Lab, LabError, Node, Switch, _replace_table, find_tool

__all__ = [
    "BEHAVIOUR",
    "NAT_TYPES",
    "NatLab",
    "NatDiscovery",
    "Site",
    "flush_conntrack",
    "natdiscovery",
    "set_conntrack_timeouts",
    "start_coturn",
    "wait_listening",
]

NAT_TYPES = ("none", "full-cone", "address-restricted", "port-restricted", "symmetric", "udp-blocked", "tcp-web-only")
#: What a STUN client inside sees of each type (RFC 4787 mapping, RFC 5780 filtering, in
#: tunnelmesh/nat/report.py's names): coturn's natdiscovery agrees (tests/e2e/test_natlab.py).
#: "unknown": no UDP answer at all.
BEHAVIOUR = {
    "none": ("none", "endpoint-independent"),
    "full-cone": ("endpoint-independent", "endpoint-independent"),
    "address-restricted": ("endpoint-independent", "address-dependent"),
    "port-restricted": ("endpoint-independent", "address-and-port-dependent"),
    "symmetric": ("address-and-port-dependent", "address-and-port-dependent"),
    "udp-blocked": ("unknown", "unknown"),
    "tcp-web-only": ("unknown", "unknown"),
}
OUTSIDE_SUBNET = "192.0.2.0/24"
INSIDE_POOLS = ("198.51.100.0/24", "203.0.113.0/24")
INSIDE_PREFIX = 29  # router + a node + room to roam back: 6 hosts; 64 sites in all
UDP_TIMEOUT = 30  # s: conntrack's unreplied-UDP timeout in routers (Linux default 30)
UDP_STREAM_TIMEOUT = 60  # s: a UDP flow seen both ways (Linux default 120)
STUN_PORT = 3478
TABLE = "lab_nat"


@dataclass
class Site:
    """A router of one NAT type with its own inside switch."""

    name: str
    nat_type: str
    router: Node
    inside: Switch
    public: str  # the router's address on the outside switch
    udp_timeout: int = UDP_TIMEOUT
    stream_timeout: int = UDP_STREAM_TIMEOUT  # also how long full-cone / address-restricted sets hold an entry
    nodes: list[Node] = field(default_factory=list)


def _rules(nat_type: str, outside_if: str, inside_if: str, router_ip: str, inside_node: str,
           stream_timeout: int) -> list[str]:
    """The body of the `inet lab_nat` table for one NAT type (see the module docstring)."""
    out, inside = f'"{outside_if}"', f'"{inside_if}"'
    sets: list[str] = []
    dnat: list[str] = []  # prerouting: new inbound flows that come in
    learn: list[str] = []  # forward, outbound: what opens the way in
    snat = [f"    oifname {out} masquerade"]
    egress: list[str] = []  # forward, outbound: what may leave
    if nat_type in ("full-cone", "address-restricted"):
        # snat to the one outside address keeps the source port whenever the tuple is free.
        snat = [f"    oifname {out} meta l4proto udp snat ip to {router_ip}", *snat]
    if nat_type == "full-cone":
        sets = ["  set mapped {", "    type inet_service; flags timeout, dynamic;",
                f"    timeout {stream_timeout}s;", "  }"]
        learn = [f"    iifname {inside} meta nfproto ipv4 update @mapped {{ udp sport }}"]
        dnat = [f"    iifname {out} meta nfproto ipv4 udp dport @mapped dnat ip to {inside_node}"]
    elif nat_type == "address-restricted":
        sets = ["  set contacted {", "    type ipv4_addr . inet_service; flags timeout, dynamic;",
                f"    timeout {stream_timeout}s;", "  }"]
        learn = [f"    iifname {inside} meta nfproto ipv4 update @contacted {{ ip daddr . udp sport }}"]
        dnat = [f"    iifname {out} meta nfproto ipv4 ip saddr . udp dport @contacted dnat ip to {inside_node}"]
    elif nat_type == "symmetric":
        snat = [f"    oifname {out} meta l4proto {{ tcp, udp }} masquerade random,fully-random", *snat]
    elif nat_type == "udp-blocked":
        egress = [f"    iifname {inside} meta l4proto udp drop"]
    elif nat_type == "tcp-web-only":
        egress = [f"    iifname {inside} tcp dport {{ 80, 443 }} accept", f"    iifname {inside} drop"]
    elif nat_type != "port-restricted":
        raise ValueError(f"no NAT rules for {nat_type!r}")
    return [
        *sets,
        "  chain prerouting {", "    type nat hook prerouting priority dstnat; policy accept;", *dnat, "  }",
        "  chain postrouting {", "    type nat hook postrouting priority srcnat; policy accept;", *snat, "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        *egress,
        *learn,  # before the established accept: every packet out keeps the entry alive
        "    ct state established,related accept",
        f"    iifname {out} ct status dnat accept",
        f"    iifname {out} drop",
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        "    ct state established,related accept",
        f"    iifname {out} meta l4proto udp drop",
        "  }",
    ]


class NatLab:
    """An outside switch, public hosts on it, and sites (NAT routers with nodes behind).
    Its methods may be called from several threads (they take turns: the lab's address
    and port allocation is not thread-safe)."""

    def __init__(self, lab: Lab, outside_subnet: str = OUTSIDE_SUBNET, switch_name: str = "wan"):
        self.lab = lab
        self.outside = lab.add_switch(switch_name, outside_subnet)
        self.sites: dict[str, Site] = {}
        self._outside_hosts: list[Node] = []  # everyone on the outside switch: needs routes to public sites
        self._subnets = chain.from_iterable(
            ipaddress.ip_network(pool).subnets(new_prefix=INSIDE_PREFIX) for pool in INSIDE_POOLS)
        self._lock = threading.RLock()

    def add_public(self, name: str, addresses: int = 1) -> Node:
        """A host on the outside switch with `addresses` addresses on its one interface
        (coturn and the coordinator's reflection service need two)."""
        with self._lock:
            return self._add_public(name, addresses)

    def _add_public(self, name: str, addresses: int) -> Node:
        node = self.lab.add_node(name)
        self.lab.connect(node, self.outside)
        for _ in range(addresses - 1):
            extra = str(self.outside._allocate(None))
            node.run("ip", "addr", "add", f"{extra}/{self.outside.subnet.prefixlen}", "dev", node.interfaces[0])
            node.addresses.append(extra)
        self._add_outside_host(node)
        return node

    def add_site(self, name: str, nat_type: str, *, udp_timeout: int = UDP_TIMEOUT,
                 stream_timeout: int = UDP_STREAM_TIMEOUT) -> Site:
        """A router `name` of `nat_type` with a fresh inside switch `{name}-in`; add nodes
        behind it with `add_inside_node` (the NAT rules name the first one)."""
        if nat_type not in NAT_TYPES:
            raise ValueError(f"NAT type must be one of {NAT_TYPES}, not {nat_type!r}")
        with self._lock:
            return self._add_site(name, nat_type, udp_timeout, stream_timeout)

    def _add_site(self, name: str, nat_type: str, udp_timeout: int, stream_timeout: int) -> Site:
        subnet = next(self._subnets, None)
        if subnet is None:
            raise LabError("no inside subnet left for another site")
        inside = self.lab.add_switch(f"{name}-in", str(subnet))
        router = self.lab.add_router(name, self.outside, inside, nat=None)
        site = Site(name, nat_type, router, inside, router.addresses[0], udp_timeout, stream_timeout)
        self.sites[name] = site
        self._add_outside_host(router)
        if nat_type == "none":
            for host in self._outside_hosts:
                if host is not router:
                    host.run("ip", "route", "replace", str(subnet), "via", site.public)
        return site

    def add_inside_node(self, site: Site, name: str) -> Node:
        """A node behind `site`'s router (default route via it)."""
        with self._lock:
            node = self.lab.add_node(name)
            self._attach(node, site)
            return node

    def move(self, node: Node, site: Site) -> str:
        """Roam `node` to `site`: its old underlay link goes away (with its address and
        routes), a new one comes up behind the other router; returns the new address."""
        with self._lock:
            return self._move(node, site)

    def _move(self, node: Node, site: Site) -> str:
        old = next(s for s in self.sites.values() if node in s.nodes)
        index = next(i for i, (switch, _, _) in enumerate(node.links) if switch is old.inside)
        switch, _, ifname = node.links.pop(index)
        node.run("ip", "link", "del", ifname)
        switch._used.discard(ipaddress.ip_address(node.addresses.pop(index)))
        node.interfaces.remove(ifname)
        old.nodes.remove(node)
        if old.nodes and old.nat_type in ("full-cone", "address-restricted"):
            self._apply_rules(old)  # its dnat named the node that left
        return self._attach(node, site)

    def _attach(self, node: Node, site: Site) -> str:
        address = self.lab.connect(node, site.inside)
        site.nodes.append(node)
        if len(site.nodes) == 1 and site.nat_type != "none":
            self._apply_rules(site)
        return address

    def _apply_rules(self, site: Site) -> None:
        outside_if = next(ifn for sw, _, ifn in site.router.links if sw is self.outside)
        inside_if = next(ifn for sw, _, ifn in site.router.links if sw is site.inside)
        body = _rules(site.nat_type, outside_if, inside_if, site.public, site.nodes[0].addresses[0],
                      site.stream_timeout)
        site.router.nft(_replace_table("inet", TABLE, body))
        set_conntrack_timeouts(site.router, site.udp_timeout, site.stream_timeout)

    def _add_outside_host(self, node: Node) -> None:
        self._outside_hosts.append(node)
        for site in self.sites.values():
            if site.nat_type == "none" and site.router is not node:
                node.run("ip", "route", "replace", str(site.inside.subnet), "via", site.public)


def set_conntrack_timeouts(router: Node, udp: int = UDP_TIMEOUT, stream: int = UDP_STREAM_TIMEOUT) -> None:
    """Set the router namespace's conntrack UDP timeouts (seconds): `udp` for flows seen
    one way, `stream` for flows seen both ways (how long an idle mapping lives)."""
    router.run("sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={udp}",
               f"net.netfilter.nf_conntrack_udp_timeout_stream={stream}")


def flush_conntrack(router: Node) -> None:
    """Forget every mapping of the router at once, as a NAT reboot or expiry would."""
    if find_tool("conntrack") is None:
        raise LabError("`conntrack` not found; run tools/setup.sh (package conntrack)")
    tables = router.run("nft", "list", "sets", "inet", check=False).stdout
    script = "".join(f"flush set inet {TABLE} {name}\n" for name in ("mapped", "contacted")
                     if re.search(rf"\bset {name}\b", tables))
    if script:
        router.nft(script)
    router.run("conntrack", "-F")


# --------------------------------------------------------------------------- coturn


def start_coturn(node: Node, primary: str, alternate: str, port: int = STUN_PORT,
                 timeout: float = 15.0) -> subprocess.Popen:
    """Run coturn's `turnserver` as a plain STUN server (RFC 5780 behaviour discovery on
    `primary` and `alternate`, ports `port` and `port`+1) in `node`; returns once both
    addresses' UDP listeners are open. The lab stops it at cleanup."""
    binary = find_tool("turnserver")
    if binary is None:
        raise LabError("`turnserver` not found; run tools/setup.sh (package coturn)")
    conf = f"{node.state_dir}/turnserver.conf"
    with open(conf, "w") as f:
        f.write("")  # no config of the host's (/etc/turnserver.conf) must apply
    proc = node.popen(
        binary, "-c", conf, "--stun-only", "--no-cli", "--no-tls", "--no-dtls", "--no-auth",
        "--listening-ip", primary, "--listening-ip", alternate, "--listening-port", str(port),
        "--alt-listening-port", str(port + 1), "--log-file", "stdout", "--simple-log",
        "--pidfile", f"{node.state_dir}/turnserver.pid", "--no-software-attribute",
        log_name="turnserver")
    # coturn logs no line for its UDP listeners: wait until the kernel shows all four.
    wait_listening(node, proc, {f"{address}:{p}" for address in (primary, alternate) for p in (port, port + 1)},
                   "udp", timeout)
    return proc


def wait_listening(node: Node, proc: subprocess.Popen, wanted: set[str], proto: str, timeout: float) -> None:
    """Wait until `proc` (in `node`) listens on every "ip:port" of `wanted` ("tcp" or
    "udp", as `ss` shows them); LabError naming what is missing if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        shown = node.run("ss", "-Hln", "--udp" if proto == "udp" else "--tcp").stdout.splitlines()
        listening = {fields[3] for fields in map(str.split, shown) if len(fields) > 3}
        if wanted <= listening:
            return
        if proc.poll() is not None or time.monotonic() >= deadline:
            raise LabError(f"{node.name}: not listening on {proto} {sorted(wanted - listening)} (exit "
                           f"{proc.poll()}); log:\n{node.log(getattr(proc, 'log_name', ''))[-3000:]}")
        time.sleep(0.05)


@dataclass(frozen=True)
class NatDiscovery:
    """coturn's verdict (RFC 5780 names, as tunnelmesh/nat/report.py spells them;
    "unknown" when coturn could not tell, e.g. no answer at all)."""

    mapping: str  # "none", "endpoint-independent", "address-dependent", "address-and-port-dependent", "unknown"
    filtering: str  # the same names but "none" (behind no NAT coturn sees the host's own filtering)
    output: str  # what turnutils_natdiscovery printed


def _behaviour(text: str, kind: str) -> str:
    """What coturn's summary line "NAT with <behaviour> <kind>!" says, in report.py's names."""
    found = re.findall(rf"NAT with ([A-Za-z ]+?) {kind}!", text)
    return found[-1].lower().replace(" ", "-") if found else "unknown"


def natdiscovery(node: Node, server: str, port: int = STUN_PORT, timeout: float = 60) -> NatDiscovery:
    """Run `turnutils_natdiscovery -m -f` (RFC 5780 mapping and filtering discovery)
    from `node` against a coturn at `server`; returns its verdict."""
    binary = find_tool("turnutils_natdiscovery")
    if binary is None:
        raise LabError("`turnutils_natdiscovery` not found; run tools/setup.sh (package coturn)")
    # With the local address given (-L), coturn can tell that the reflexive one is ours.
    proc = node.run(binary, "-m", "-f", "-L", node.addresses[0], "-p", str(port), server, check=False, timeout=timeout)
    text = proc.stdout + proc.stderr
    mapping = "none" if "No NAT!" in text else _behaviour(text, "Mapping")
    return NatDiscovery(mapping, _behaviour(text, "Filtering"), text)
