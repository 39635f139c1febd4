"""`down`, `status`, `peers`, `ping`, `events`, `id`, `show`, `version`, `ssh-bridge`:
the running daemon, reached through its control socket."""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

from tunnelmesh import __version__
from tunnelmesh.config import ConfigError, read_network_secret
from actors.messages import AgentStatus, FilterStatus, PeerStatus, to_json
from tunnelmesh import control_client
from tunnelmesh.control_client import request
from tunnelmesh.files import read_pid
from tunnelmesh.paths import Paths

from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError, _identity, _load
from .netcheck import nat_summary


# --- down -------------------------------------------------------------------------


def cmd_down(args: argparse.Namespace, paths: Paths) -> int:
    pid = read_pid(paths.pid_file)
    request(paths.control_socket, "down")
    deadline = time.monotonic() + 15
    while pid is not None and time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.05)
    else:
        if pid is not None:
            raise CliError(f"daemon (pid {pid}) did not stop within 15 s")
    print("tunnelmesh down")
    return EXIT_OK


# --- status / peers / ping ---------------------------------------------------------


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    status = control_client.status(paths.control_socket)
    if args.json:
        print(json.dumps(to_json(status), indent=2))
        return EXIT_OK
    node = status.node
    print(f"{node.name}  {node.mesh_ip}  {node.interface}  udp/{node.listen_port}  {node.fingerprint}  ({node.mode} mode)")
    if node.agent is not None:
        _print_agent(node.identity_source, node.agent)
    coordinator = node.coordinator
    if coordinator is not None:
        since = time.strftime("%H:%M:%S", time.localtime(coordinator.since))
        state = coordinator.state + (f" since {since}: {coordinator.error}" if coordinator.error else f" since {since}")
        if coordinator.state != "connected":
            state += " (running from the cached peer map)"
        print(f"network {coordinator.network}, coordinator {coordinator.url}: {state}; "
              f"peer map v{coordinator.version}, {coordinator.members} members")
        if len(coordinator.urls) > 1:  # [coordinator] urls: it fails over between them, best first
            print("coordinators in order of preference: "
                  + ", ".join(url + (" (in use)" if url == coordinator.url else "") for url in coordinator.urls))
        if coordinator.tls_fingerprint:  # what joining by URL needs: --tls-fingerprint
            print(f"coordinator TLS certificate {coordinator.tls_fingerprint} (pinned)")
        if coordinator.rejected:
            print("refused records: " + ", ".join(f"{k}={v}" for k, v in sorted(coordinator.rejected.items())))
    if node.serving_coordinator:
        print(f"serving the coordinator on {node.serving_coordinator}")
    transports = node.transports
    rungs = []
    if transports.ssh is not None:
        port = transports.ssh.port
        rungs.append(f"ssh on tcp/{port}" if port else "ssh (dial only)")
    for relay in ((transports.relay,) if transports.relay is not None else ()) + transports.node_relays:
        rungs.append(f"relay {relay.url}: {relay.state}" + (f" ({relay.error})" if relay.error else ""))
    if rungs:
        print("transports: udp/{}, {}".format(node.listen_port, ", ".join(rungs)))
    if transports.serving_relay is not None:
        print(f"serving a relay for members: {transports.serving_relay.connections} connected")
    if node.nat is not None:
        print(nat_summary(node.nat, node.port_mapping))
    if node.offloads:
        print(f"offloads: {node.offloads}")
    if status.filter is not None:
        _print_filter_status(status.filter)
    _print_peers(status.peers)
    if args.verbose:
        counters = {**status.drops, **({"events lost by slow subscribers": node.events_dropped}
                                       if node.events_dropped else {}),
                    **{f"messages dropped by {a.name}'s full mailbox": a.dropped for a in node.actors if a.dropped}}
        if counters:
            print("drops: " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    return EXIT_OK


def _print_agent(source: str, agent: AgentStatus) -> None:
    print(f"identity from {source}")
    if agent.state == "holds the key":
        print(f"ssh-agent at {agent.socket}: holds the key")
    else:  # sessions go on with the mesh key in memory; say what waits for the agent
        print(f"ssh-agent at {agent.socket}: {agent.state} (running sessions go on); needed back for: "
              f"{', '.join(agent.needed_for)}")


def _print_filter_status(f: FilterStatus) -> None:
    print(f"packet filter: {f.in_force}")
    if f.error:
        print(f"  network policy refused: {f.error}")
    for warning in f.warnings:
        print(f"  warning: {warning}")
    if f.enabled:
        dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(f.drops.items()))
        print(f"  {f.flows} flows tracked (at most {f.max_flows}); dropped: {dropped or 'none'}")


def cmd_peers(args: argparse.Namespace, paths: Paths) -> int:
    peers = control_client.peers(paths.control_socket).peers
    if args.json:
        print(json.dumps(to_json(peers), indent=2))
    else:
        _print_peers(peers)
    return EXIT_OK


def _print_peers(peers: tuple[PeerStatus, ...]) -> None:
    if not peers:
        print("no peers yet")
        return
    rows = []
    for p in peers:
        ago = p.last_handshake_ago
        handshake = f"handshake {_ago(ago)}" if ago is not None else "no handshake yet"
        path = p.path.endpoint if p.path is not None else "no endpoint (waits to be contacted)"
        why = f"  (not better: {p.why_not_better})" if p.why_not_better else ""
        rtt = f"rtt {p.rtt_ms:.1f} ms  " if p.rtt_ms is not None else ""
        rows.append((p.mesh_ip, p.name, p.state, path, handshake,
                     f"{rtt}rx {_size(p.rx_bytes)} tx {_size(p.tx_bytes)}{why}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5])


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def cmd_ping(args: argparse.Namespace, paths: Paths) -> int:
    failures = 0
    for i in range(args.count):
        if i:
            time.sleep(args.interval)
        result = control_client.ping(paths.control_socket, args.peer, args.timeout)
        failures += not result.ok
        if args.json:
            print(json.dumps(to_json(result)), flush=True)
            continue
        path = result.path.endpoint if result.path is not None else "none"
        if result.ok:
            answered = f", answer came on {result.answered_on}" if result.answered_on and result.path is not None \
                and result.answered_on != result.path.rung else ""
            print(f"pong from {result.peer} via {path} in {result.rtt_ms:.2f} ms{answered}")
        else:
            print(f"{result.error} (path: {path})")
    return EXIT_OK if failures < args.count else EXIT_FAIL


# --- id / show ----------------------------------------------------------------------


def cmd_id(args: argparse.Namespace, paths: Paths) -> int:
    public = _identity(_load(paths)).public
    if args.json:
        print(json.dumps({"identity": public.to_line(), "fingerprint": public.fingerprint,
                          "ssh_public_key": public.ssh_public_key,
                          "wireguard_public_key": base64.b64encode(public.wg_public_key).decode()}, indent=2))
    else:
        print(public.to_line())
    return EXIT_OK


def cmd_show(args: argparse.Namespace, paths: Paths) -> int:
    if not args.wg:
        raise CliError("say what to show: `tunnelmesh show --wg` prints what a plain WireGuard peer needs", EXIT_USAGE)
    config = _load(paths)
    identity = _identity(config)
    endpoint = args.endpoint or "<this node's address>"
    public_key = base64.b64encode(identity.public.wg_public_key).decode()
    lines = [
        f"# {config.name}: add this to a plain WireGuard peer's config (wg setconf / wg-quick)",
        "[Peer]",
        f"PublicKey = {public_key}",
    ]
    psk: str | None = None
    if args.show_secrets:
        from tunnelmesh.wireguard import derive_psk

        try:
            derived = derive_psk(read_network_secret(config.network_secret_file))
        except ConfigError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        psk = base64.b64encode(derived).decode()
        lines.append(f"PresharedKey = {psk}")
    else:
        lines.append("# PresharedKey = (hidden: add --show-secrets; the peer needs it to connect)")
    mesh_ip = config.mesh_ip
    if mesh_ip is None:  # with a coordinator: the address it assigned at join
        from tunnelmesh.netstate import NetworkState, StateError

        try:
            mesh_ip = NetworkState.load(paths.network_state).member.ipv4
        except StateError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    if args.json:  # the preshared key only with --show-secrets, as in the text form
        print(json.dumps({"name": config.name, "public_key": public_key, "preshared_key": psk,
                          "endpoint": f"{endpoint}:{config.listen_port}" if args.endpoint else None,
                          "listen_port": config.listen_port, "allowed_ips": [f"{mesh_ip}/32"]}, indent=2))
        return EXIT_OK
    lines += [f"Endpoint = {endpoint}:{config.listen_port}", f"AllowedIPs = {mesh_ip}/32"]
    print("\n".join(lines))
    return EXIT_OK


def cmd_events(args: argparse.Namespace, paths: Paths) -> int:
    try:
        for event in control_client.events(paths.control_socket):
            print(json.dumps(to_json(event)), flush=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_version(args: argparse.Namespace, paths: Paths) -> int:
    if args.json:
        from actors.messages import CONTROL_VERSION

        print(json.dumps({"version": __version__, "control_version": CONTROL_VERSION}))
        return EXIT_OK
    print(f"tunnelmesh {__version__}")
    return EXIT_OK


# --- ssh-bridge -----------------------------------------------------------------------


def cmd_ssh_bridge(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.links.bridge import BridgeError, main_setup, run_bridge

    try:
        if args.setup:
            print(main_setup(args.user, paths.state_dir))
            return EXIT_OK
        if args.peer is None:
            raise CliError("say what to do: --peer KEY (as sshd's forced command) or --setup", EXIT_USAGE)
        return run_bridge(args.peer, Path(args.socket) if args.socket else paths.bridge_socket)
    except BridgeError as exc:
        raise CliError(str(exc), EXIT_FAIL) from None
