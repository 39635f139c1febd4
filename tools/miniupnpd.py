"""A real miniupnpd (Debian's, nftables backend) on a `tools.natlab` site's router: the
home router that answers PCP, NAT-PMP and UPnP IGD port-mapping requests.

- Its config file lives in the router's state dir (never /etc/miniupnpd): ext_ifname the
  outside interface, listening_ip the inside one, secure_mode (a client maps only to
  itself), allow rules for the inside subnet only, short lifetimes.
- Its nftables tables are made here (`inet miniupnpd`: a forward chain and the nat
  prerouting/postrouting chains it fills), not by Debian's nft_init.sh (which writes a
  fixed /tmp path).
- miniupnpd refuses to map when the outside address is private or reserved, and the lab's
  documentation ranges are reserved; with `ext_perform_stun` it instead asks a STUN server
  (the lab's coturn, RFC 5780) whether it is reachable 1:1 from outside, and then maps.
  That check needs the STUN server's answers from its other address to reach the router,
  which the site's NAT rules drop (they drop UDP to the router from outside): start
  miniupnpd before the site's first inside node, while the router has no rules yet.
- The router counts the SSDP searches that reach it (table `inet ssdp_seen`): to the
  multicast group, and unicast to itself (`ssdp_searches`).
- Ready when it logs that it listens for NAT-PMP/PCP (and UPnP's HTTP port); the lab
  stops it with its other processes.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import time
import uuid
from dataclasses import dataclass

from tools.lab import LabError, _replace_table, find_tool
from tools.natlab import STUN_PORT, Site

TABLE = "miniupnpd"
SSDP_TABLE = "ssdp_seen"
READY = r"Listening for NAT-PMP/PCP traffic on port 5351"
UPNP_READY = r"HTTP listening on port \d+"
FORWARDING = r"Port forwarding is now enabled"


@dataclass
class Miniupnpd:
    site: Site
    process: subprocess.Popen
    config_path: str
    log_name: str

    def log(self) -> str:
        return self.site.router.log(self.log_name)

    def ruleset(self) -> str:
        """Its nftables table as `nft list` shows it (the mappings are its rules)."""
        return self.site.router.run("nft", "list", "table", "inet", TABLE).stdout

    def ssdp_searches(self) -> dict[str, int]:
        """SSDP datagrams (UDP to port 1900) that reached the router so far: "multicast"
        (to 239.255.255.250) and "unicast" (to one of its own addresses)."""
        listed = self.site.router.run("nft", "list", "counters", "table", "inet", SSDP_TABLE).stdout
        return {name: int(packets) for name, packets in re.findall(r"counter (\w+) \{\s*packets (\d+)", listed)}


def start_miniupnpd(site: Site, stun_host: str, *, natpmp: bool = True, upnp: bool = True,
                    min_lifetime: int = 10, max_lifetime: int = 3600, timeout: float = 30.0) -> Miniupnpd:
    """Start miniupnpd on `site`'s router (NAT-PMP and PCP with `natpmp`, UPnP IGD with
    `upnp`); `stun_host` is a coturn on the outside switch (natlab.start_coturn). PCP
    lifetimes are clamped to [min_lifetime, max_lifetime] seconds. Returns when it is
    ready; LabError if it exits or does not get ready within `timeout` seconds."""
    binary = find_tool("miniupnpd")
    if binary is None:
        raise LabError("`miniupnpd` not found; run tools/setup.sh (packages miniupnpd, miniupnpd-nftables)")
    if site.nodes:
        raise LabError(f"start miniupnpd on {site.name} before its first inside node (see tools/miniupnpd.py)")
    router = site.router
    outside_if = next(ifn for sw, _, ifn in router.links if sw is not site.inside)
    inside_if = next(ifn for sw, _, ifn in router.links if sw is site.inside)
    router.nft(_replace_table("inet", TABLE, [
        "  chain forward {", "    type filter hook forward priority filter - 1; policy accept;",
        "    jump miniupnpd", "  }",
        "  chain miniupnpd {", "  }",
        "  chain prerouting {", "    type nat hook prerouting priority dstnat - 1; policy accept;",
        "    jump prerouting_miniupnpd", "  }",
        "  chain postrouting {", "    type nat hook postrouting priority srcnat - 1; policy accept;",
        "    jump postrouting_miniupnpd", "  }",
        "  chain prerouting_miniupnpd {", "  }",
        "  chain postrouting_miniupnpd {", "  }",
    ]))
    router.nft(_replace_table("inet", SSDP_TABLE, [
        "  counter multicast {", "  }", "  counter unicast {", "  }",
        "  chain prerouting {", "    type filter hook prerouting priority raw; policy accept;",
        "    fib saddr type local return",  # its own NOTIFYs, looped back
        "    ip daddr 239.255.255.250 udp dport 1900 counter name multicast",
        "    fib daddr type local udp dport 1900 counter name unicast", "  }",
    ]))
    yes = {True: "yes", False: "no"}
    config = "\n".join([
        f"ext_ifname={outside_if}",
        f"listening_ip={inside_if}",
        "http_port=0",
        f"enable_natpmp={yes[natpmp]}",
        f"enable_upnp={yes[upnp]}",
        "secure_mode=yes",
        "system_uptime=yes",
        f"min_lifetime={min_lifetime}",
        f"max_lifetime={max_lifetime}",
        "ext_perform_stun=yes",
        f"ext_stun_host={stun_host}",
        f"ext_stun_port={STUN_PORT}",
        f"uuid={uuid.uuid4()}",
        f"upnp_table_name={TABLE}",
        f"upnp_nat_table_name={TABLE}",
        f"allow 1024-65535 {site.inside.subnet} 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
        "",
    ])
    config_path = f"{router.state_dir}/miniupnpd.conf"
    with open(config_path, "w") as f:
        f.write(config)
    log_name = f"miniupnpd-{secrets.token_hex(3)}"
    # -d: stay in the foreground, log to stderr (the lab's log file); -f: only our config;
    # -P: its own pid file (the default /var/run/miniupnpd.pid would stop a second one).
    process = router.popen(binary, "-d", "-f", config_path, "-P", f"{router.state_dir}/miniupnpd.pid",
                           log_name=log_name)
    daemon = Miniupnpd(site, process, config_path, log_name)
    ready = [FORWARDING, *([READY] if natpmp else []), *([UPNP_READY] if upnp else [])]
    deadline = time.monotonic() + timeout
    while not all(re.search(pattern, daemon.log()) for pattern in ready):
        if process.poll() is not None or time.monotonic() >= deadline:
            raise LabError(f"miniupnpd on {router.name} not ready (exit {process.poll()}); its log:\n"
                           f"{daemon.log()[-3000:]}")
        time.sleep(0.1)
    return daemon
