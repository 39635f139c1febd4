"""Build a static TunnelMesh mesh inside a `tools.lab.Lab`, the way a user
would: `tunnelmesh init --static` on each node, `tunnelmesh id` pasted into
the others' configs as `[[peers]]`, then `tunnelmesh up --detach`.

Used by the demo, the end-to-end tests and the benchmarks.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.messages import Status, from_json
from tools.lab import Lab, Node, Switch, _replace_table, clean_environment
from tools.natlab import NatLab, Site, wait_listening

TUNNELMESH = [sys.executable, "-m", "tunnelmesh"]
MESH_PREFIX = "100.100.0."


@dataclass
class MeshNode:
    node: Node
    underlay: str
    mesh_ip: str
    identity: str = ""
    extra_peers: list[str] = field(default_factory=list)
    #: Merged over clean_environment() for every `tunnelmesh` run (so also the daemon
    #: `up` starts), e.g. {"HTTPS_PROXY": "http://192.0.2.9:8888"}.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.node.name

    def tm(self, *args: str, check: bool = True, timeout: float = 30) -> Any:
        """Run `tunnelmesh --state-dir <this node's> args...` inside the node."""
        return self.node.run(*TUNNELMESH, "--state-dir", str(self.node.state_dir), *args,
                             check=check, timeout=timeout, env={**clean_environment(), **self.env})

    def status(self) -> dict[str, Any]:
        """`status --json`, checked against the control schema (docs/control.md)."""
        status = json.loads(self.tm("status", "--json").stdout)
        from_json(Status, status)  # raises naming the field that does not fit
        return status  # type: ignore[no-any-return]

    def up(self) -> None:
        self.tm("up", "--detach", timeout=40)

    def down(self, check: bool = True) -> None:
        self.tm("down", check=check)

    @property
    def config_path(self) -> str:
        return f"{self.node.state_dir}/tunnelmesh.toml"

    def append_config(self, text: str) -> None:
        with open(self.config_path, "a") as f:
            f.write(text)

    @property
    def log_path(self) -> str:
        return f"{self.node.state_dir}/tunnelmesh.log"

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the daemon log (`<state_dir>/tunnelmesh.log`), for failure messages."""
        try:
            with open(self.log_path, errors="replace") as f:
                text = f.read()
        except OSError as exc:
            return f"(no log: {exc})"
        return text if len(text) <= chars else "...\n" + text[-chars:]

    def diagnostics(self) -> str:
        """`status --json` (or why it failed) and the daemon log tail, for failure messages.
        Never raises."""
        try:
            proc = self.tm("status", "--json", check=False, timeout=15)
            status = proc.stdout.strip() or f"(exit {proc.returncode}) {proc.stderr.strip()}"
        except Exception as exc:  # noqa: BLE001 - only for messages
            status = f"(status failed: {exc})"
        return (f"--- {self.name}: status --json ---\n{status[-4000:]}\n"
                f"--- {self.name}: {self.log_path} (tail) ---\n{self.log_tail()}")


def peer_block(name: str, *, identity: str | None = None, wireguard_public_key: str | None = None,
               mesh_ip: str, endpoint: str | None = None, persistent_keepalive: int = 0) -> str:
    lines = ["", "[[peers]]", f'name = "{name}"']
    if identity is not None:
        lines.append(f'identity = "{identity}"')
    if wireguard_public_key is not None:
        lines.append(f'wireguard_public_key = "{wireguard_public_key}"')
    lines.append(f'mesh_ip = "{mesh_ip}"')
    if endpoint is not None:
        lines.append(f'endpoint = "{endpoint}"')
    if persistent_keepalive:
        lines.append(f"persistent_keepalive = {persistent_keepalive}")
    return "\n".join(lines) + "\n"


def build_static_mesh(lab: Lab, names: list[str], *, switch: Switch | None = None, start: bool = True,
                      identity_args: dict[str, list[str]] | None = None,
                      env: dict[str, str] | None = None) -> dict[str, MeshNode]:
    """N nodes on one switch, each listing all others as peers; started unless start=False.
    `identity_args`: a node's identity options for `init` (default --new-key); `env`: every
    node's MeshNode.env."""
    switch = switch or lab.add_switch("sw")
    mesh: dict[str, MeshNode] = {}
    for i, name in enumerate(names, 1):
        node = lab.add_node(name)
        mesh[name] = MeshNode(node, lab.connect(node, switch), f"{MESH_PREFIX}{i}", env=dict(env or {}))
    first = next(iter(mesh.values()))
    for member in mesh.values():
        args = ["init", "--static", "--name", member.name, "--mesh-ip", member.mesh_ip,
                *(identity_args or {}).get(member.name, ["--new-key"])]
        if member is not first:
            args += ["--secret-file", f"{first.node.state_dir}/network.secret"]
        member.tm(*args)
        member.identity = member.tm("id").stdout.strip()
    for member in mesh.values():
        for other in mesh.values():
            if other is not member:
                member.append_config(peer_block(other.name, identity=other.identity, mesh_ip=other.mesh_ip,
                                                endpoint=f"{other.underlay}:51820"))
    if start:
        for member in mesh.values():
            member.up()
    return mesh


COORDINATOR_PORT = 7400
#: The network policy `build_network` sets unless told otherwise: every member may open
#: anything on every other (the packet filter still runs: stateful, anti-spoofing), so
#: that tests and benchmarks of the transports are not tests of the starter policy.
OPEN_POLICY = '''[[allow]]
from = "*"
proto = "any"
'''


def build_network(lab: Lab, names: list[str], *, switch: Switch | None = None, start: bool = True,
                  coordinator: Node | None = None, policy: str | None = OPEN_POLICY,
                  identity_args: dict[str, list[str]] | None = None, placed: dict[str, Node] | None = None,
                  coordinator_port: int = COORDINATOR_PORT) -> dict[str, MeshNode]:
    """The way a user builds a network: `init` on the first node (admin, embedded
    coordinator unless `coordinator` -- a node already running `tunnelmesh coordinator`
    on `coordinator_port` -- is given), then `invite` there and `join <token>` on each of
    the others. Nodes are started (`up`) as they join unless start=False (the admin node
    still is if it embeds the coordinator or anyone joins: its daemon countersigns
    joins). Mesh IPs are read back from the nodes (the coordinator assigns them). `policy`: the network policy
    the admin sets (`policy set`) before anyone joins; None keeps init's starter policy.
    `identity_args`: a node's identity options for `init` or `join` (default --new-key).
    `placed`: nodes already made and wired (behind NAT routers, say: build_nat_network),
    by name; their first address is their underlay; the others are made on `switch`.
    `coordinator_port`: where the coordinator listens (embedded or standalone).

    Over the coordinator's own TLS, as by default: the embedded coordinator's certificate
    is made at `init` and pinned through the invite tokens; a standalone one's (made on
    its first start next to its database, `<state dir>/coordinator.db`) is given to
    `init --tls-fingerprint`."""
    placed = placed or {}
    if switch is None and set(names) - set(placed):
        switch = lab.add_switch("sw")
    mesh: dict[str, MeshNode] = {}
    for name in names:
        if name in placed:
            mesh[name] = MeshNode(placed[name], placed[name].addresses[0], "")
        else:
            node = lab.add_node(name)
            mesh[name] = MeshNode(node, lab.connect(node, switch), "")  # type: ignore[arg-type]
    admin = next(iter(mesh.values()))
    identity = {name: (identity_args or {}).get(name, ["--new-key"]) for name in names}
    if coordinator is None:
        url = f"https://{admin.underlay}:{coordinator_port}"
        admin.tm("init", "--name", admin.name, *identity[admin.name], "--url", url)
    else:
        url = f"https://{coordinator.addresses[0]}:{coordinator_port}"
        admin.tm("init", "--name", admin.name, *identity[admin.name], "--url", url, "--external-coordinator",
                 "--tls-fingerprint", standalone_fingerprint(coordinator))
    if start or coordinator is None or len(mesh) > 1:  # the others' joins wait for the admin's daemon
        admin.up()
    if policy is not None:
        with open(f"{admin.node.state_dir}/network-policy.toml", "w") as f:
            f.write(policy)
        admin.tm("policy", "set", f"{admin.node.state_dir}/network-policy.toml")
    for member in mesh.values():
        if member is not admin:
            token = admin.tm("invite").stdout.strip()
            member.tm("join", token, "--name", member.name, *identity[member.name])
            if start:
                member.up()
    for member in mesh.values():
        with open(f"{member.node.state_dir}/network.json") as f:
            member.mesh_ip = json.load(f)["member"]["body"]["ipv4"]
    return mesh


def standalone_fingerprint(coordinator: Node, db: str = "coordinator.db") -> str:
    """The pin of the certificate a standalone coordinator made next to `db` in its state dir."""
    from pathlib import Path

    from tunnelmesh.coordinator.standalone import standalone_tls_files
    from tunnelmesh.tls import certificate_fingerprint

    cert, _ = standalone_tls_files(Path(coordinator.state_dir) / db)
    return certificate_fingerprint(cert)


def wait_for_handshakes(mesh: dict[str, MeshNode], timeout: float = 20.0) -> None:
    """Until every node knows every other node and reports its session up (raises with the last status)."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        pending = []
        for member in mesh.values():
            last[member.name] = member.status()
            peers = last[member.name]["peers"]
            pending += [f"{member.name}->{p['name']}" for p in peers if p["state"] != "up"]
            known = {p["name"] for p in peers}
            pending += [f"{member.name}->{other} (unknown yet)" for other in mesh if other != member.name and other not in known]
        if not pending:
            return
        # Sessions come up on first traffic: nudge them with an in-tunnel ping.
        for member in mesh.values():
            for peer in last[member.name]["peers"]:
                if peer["state"] != "up":
                    member.tm("ping", peer["name"], "-c", "1", "--timeout", "1", check=False)
    raise TimeoutError(f"sessions not up within {timeout:g} s: {pending}; last status: {json.dumps(last)[:2000]}")


def diagnostics(mesh: dict[str, MeshNode]) -> str:
    """Every node's `status --json` and daemon log tail, for failure messages."""
    return "\n".join(member.diagnostics() for member in mesh.values())


SSH_PORT = 2222  # the daemon's SSH rung (config default)


def block_path(member: MeshNode, other: MeshNode, *, udp: bool = False, tcp: bool = False) -> None:
    """Inside `member`'s namespace, drop UDP and/or TCP to and from `other`'s underlay
    address (both directions, so the pair is cut whichever side dials); replaces the
    previous rules for that pair, and udp=tcp=False removes them. Other traffic --
    the coordinator and its relay -- is untouched."""
    rules = [f"    ip daddr {other.underlay} meta l4proto {proto} drop" for proto, on in (("udp", udp), ("tcp", tcp)) if on]
    rules_in = [r.replace("daddr", "saddr") for r in rules]
    table = f"tm_block_{other.name}".replace("-", "_")
    body = [
        "  chain out {", "    type filter hook output priority 0; policy accept;", *rules, "  }",
        "  chain in {", "    type filter hook input priority 0; policy accept;", *rules_in, "  }",
    ] if rules else []
    member.node.nft(_replace_table("inet", table, body))


def rung_of(member: MeshNode, peer: str) -> str | None:
    """The rung `member`'s session with `peer` sends on (from `status --json`)."""
    for p in member.status()["peers"]:
        if p["name"] == peer:
            return p["path"]["rung"] if p["path"] is not None else None
    return None


# --------------------------------------------------------------------------- behind NAT routers

WEB_PORT = 443  # the standalone coordinator's port in NAT networks: a tcp-web-only node reaches it


def start_coordinator(node: Node, port: int = COORDINATOR_PORT, timeout: float = 30) -> subprocess.Popen:
    """`tunnelmesh coordinator` in `node` on its first address and `port` (its own TLS,
    database `<state dir>/coordinator.db`), its STUN reflection service on the same
    address and port over UDP with the alternate socket on the node's second address, if
    it has one, port + 1 (so that nodes can test address-dependent filtering). Returns
    once it listens on TCP and UDP; the lab stops it."""
    listen = f"{node.addresses[0]}:{port}"
    alternate = ["--stun-alternate", f"{node.addresses[1]}:{port + 1}"] if len(node.addresses) > 1 else []
    proc = node.popen(*TUNNELMESH, "coordinator", "--listen", listen, "--db", f"{node.state_dir}/coordinator.db",
                      "--stun", listen, *alternate, log_name="coordinator")
    wait_listening(node, proc, {listen}, "tcp", timeout)
    wait_listening(node, proc, {listen}, "udp", timeout)
    return proc


@dataclass
class NatNetwork:
    mesh: dict[str, MeshNode]
    sites: dict[str, Site]  # each member's router, by member name
    coordinator: Node


def build_nat_network(nat: NatLab, types: dict[str, str], *, coordinator_name: str = "coord",
                      **options: Any) -> NatNetwork:
    """A network whose members each sit behind a router of their own (`types`: member
    name -> NAT type of tools.natlab; the router is `<name>-r`), with a standalone
    coordinator on the outside switch on TCP 443 (a tcp-web-only member reaches it) with
    two addresses (start_coordinator). `options` go to build_network (start, policy, ...)."""
    coordinator = nat.add_public(coordinator_name, addresses=2)
    start_coordinator(coordinator, WEB_PORT)
    sites = {name: nat.add_site(f"{name}-r", nat_type) for name, nat_type in types.items()}
    placed = {name: nat.add_inside_node(site, name) for name, site in sites.items()}
    mesh = build_network(nat.lab, list(types), coordinator=coordinator, coordinator_port=WEB_PORT,
                         placed=placed, **options)
    return NatNetwork(mesh, sites, coordinator)


# --------------------------------------------------------------------------- several coordinators, one database


@dataclass
class SharedCoordinator:
    """One of several `tunnelmesh coordinator`s of a network on one database (PostgreSQL),
    in a node of its own, serving the certificate they all share; killed and started
    again at the same URL (the lab stops it)."""

    node: Node
    db: str  # the connection string they share
    tls: tuple[str, str]  # the shared certificate and key files
    port: int = COORDINATOR_PORT
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://{self.node.addresses[0]}:{self.port}"

    def start(self, timeout: float = 30) -> None:
        """Start it (STUN on its own address and port over UDP); returns once it listens
        on TCP and UDP. Its log `<node>.coordinator.log` goes on across restarts."""
        listen = f"{self.node.addresses[0]}:{self.port}"
        self.process = self.node.popen(*TUNNELMESH, "coordinator", "--listen", listen, "--db", self.db,
                                       "--tls-cert", self.tls[0], "--tls-key", self.tls[1], log_name="coordinator")
        wait_listening(self.node, self.process, {listen}, "tcp", timeout)
        wait_listening(self.node, self.process, {listen}, "udp", timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to answer or close anything; its nodes see their connections reset."""
        assert self.process is not None, "not started"
        self.process.kill()
        self.process.wait(timeout=10)


def start_shared_coordinators(lab: Lab, names: list[str], db: str, *, switch: Switch,
                              port: int = COORDINATOR_PORT) -> list[SharedCoordinator]:
    """A node per name on `switch`, each running a coordinator on the database `db` (a
    PostgreSQL connection string: tools/pgserver.py), all with one certificate, made for
    the first one's address. It lies where a standalone coordinator keeps a certificate
    of its own (standalone_tls_files), so that `build_network(coordinator=<the first's
    node>)` pins it as it would a standalone one's."""
    from tunnelmesh.coordinator.standalone import standalone_tls_files
    from tunnelmesh.tls import write_certificate

    nodes = [lab.add_node(name) for name in names]
    for node in nodes:
        lab.connect(node, switch)
    cert, key = standalone_tls_files(Path(nodes[0].state_dir) / "coordinator.db")
    write_certificate(cert, key, nodes[0].addresses[0])
    coordinators = [SharedCoordinator(node, db, (str(cert), str(key)), port) for node in nodes]
    for coordinator in coordinators:
        coordinator.start()
    return coordinators


def use_coordinators(member: MeshNode, urls: list[str]) -> None:
    """Replace the `[coordinator] url` that init or join wrote in the node's config (or
    the `urls` written before) by `urls`, best first, as its user would edit it for a
    network of several coordinators (neither command writes `urls`). Read at the
    daemon's next start; by the admin commands at once."""
    with open(member.config_path) as f:
        text = f.read()
    listed = ", ".join(json.dumps(url) for url in urls)
    text, replaced = re.subn(r"^urls? = .*$", f"urls = [{listed}]", text, count=1, flags=re.MULTILINE)
    if replaced != 1:
        raise ValueError(f"{member.config_path}: no [coordinator] url or urls line to replace")
    with open(member.config_path, "w") as f:
        f.write(text)
