"""`tunnelmesh`: the command line, in the style of `tailscale` and `wg`.

Commands reach a running daemon only through its control socket; `up` is the
one place that starts the daemon assembly from `actors/`.

Exit codes: 0 success, 1 runtime failure (daemon not running, peer did not
answer), 2 bad usage or configuration (the message names the file and line).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tunnelmesh import __version__
from tunnelmesh.config import ConfigError, load_config, read_network_secret, starter_config
from tunnelmesh.control_client import ControlError, NotRunning, events, request
from tunnelmesh.paths import DEFAULT_HOST_KEY, Paths, resolve_paths

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


# --- init -------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, paths: Paths) -> int:
    if not args.static:
        raise CliError(
            "this version runs static meshes only: use `tunnelmesh init --static` and list peers in the config",
            EXIT_USAGE,
        )
    if paths.config.exists():
        raise CliError(f"{paths.config} already exists; edit it, or remove it to start over", EXIT_USAGE)
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths.config.parent.mkdir(parents=True, exist_ok=True)
    identity = _choose_identity(args, paths)
    secret_path = paths.network_secret
    if args.secret_file:
        _import_secret(Path(args.secret_file), secret_path)
    elif not secret_path.exists():
        from tunnelmesh.config import write_network_secret

        write_network_secret(secret_path)
    name = args.name or socket.gethostname().split(".")[0].lower()
    try:
        text = starter_config(name=name, identity=identity, mesh_ip=args.mesh_ip, listen_port=args.listen_port)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    fd = os.open(paths.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    print(f"wrote {paths.config}")
    print(f"network secret: {secret_path} (copy it, mode 0600, to every node of this mesh, or pass --secret-file to their init)")
    print("next: add [[peers]] from `tunnelmesh id` of each node, then `tunnelmesh up`")
    return EXIT_OK


def _choose_identity(args: argparse.Namespace, paths: Paths) -> str:
    if args.agent is not None:
        return "agent" if args.agent == "" else f"agent:{args.agent}"
    if args.key:
        return str(Path(args.key).resolve())
    if args.new_key:
        return str(_new_key(paths.dedicated_key))
    if Path(DEFAULT_HOST_KEY).exists():
        return DEFAULT_HOST_KEY
    raise CliError(
        f"no SSH host key at {DEFAULT_HOST_KEY} to take this node's identity from; use --new-key to make a "
        f"dedicated Ed25519 key in {paths.state_dir}, or --key PATH / --agent to use an existing key",
        EXIT_USAGE,
    )


def _new_key(path: Path) -> Path:
    import asyncssh

    if path.exists():
        return path
    key = asyncssh.generate_private_key("ssh-ed25519", comment=f"tunnelmesh@{socket.gethostname()}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key("openssh"))
    Path(f"{path}.pub").write_bytes(key.export_public_key("openssh"))
    print(f"made a dedicated Ed25519 identity key: {path}")
    return path


def _import_secret(source: Path, target: Path) -> None:
    try:
        read_network_secret(source)  # checks format and permissions
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    data = source.read_bytes()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# --- up / down --------------------------------------------------------------------


def cmd_up(args: argparse.Namespace, paths: Paths) -> int:
    if os.geteuid() != 0:
        raise CliError("tunnelmesh up needs root (or CAP_NET_ADMIN) to create the TUN device; try sudo", EXIT_FAIL)
    if args.detach:
        return _up_detached(args, paths)
    from actors.daemon import StartupError, configure_logging, run_daemon

    configure_logging(args.log_level)
    try:
        return asyncio.run(run_daemon(paths))
    except StartupError as exc:
        raise CliError(str(exc), EXIT_USAGE if "config" in str(exc) or ".toml" in str(exc) else EXIT_FAIL) from None
    except KeyboardInterrupt:
        return EXIT_OK


def _up_detached(args: argparse.Namespace, paths: Paths) -> int:
    # Checked here, not only in the child: otherwise the running daemon would answer
    # the readiness check below and this would report success while the child exits.
    try:
        request(paths.control_socket, "ping_daemon", timeout=2)
    except NotRunning:
        pass
    except ControlError:
        raise CliError(f"tunnelmesh is already running with state dir {paths.state_dir} (its control socket "
                       f"does not answer); stop it with `tunnelmesh down`", EXIT_FAIL) from None
    else:
        raise CliError(f"tunnelmesh is already running with state dir {paths.state_dir}; stop it with `tunnelmesh down`",
                       EXIT_FAIL)
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = paths.log_file
    argv = [sys.executable, "-m", "tunnelmesh", "--state-dir", str(paths.state_dir), "--config", str(paths.config),
            "up", "--log-level", args.log_level]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise CliError("tunnelmesh failed to start:\n  " + "\n  ".join(tail), EXIT_FAIL)
        try:
            request(paths.control_socket, "ping_daemon", timeout=1)
            print(f"tunnelmesh up (pid {process.pid}, log {log_path})")
            return EXIT_OK
        except ControlError:
            time.sleep(0.1)
    raise CliError(f"tunnelmesh did not come up within 30 s; see {log_path}", EXIT_FAIL)


def cmd_down(args: argparse.Namespace, paths: Paths) -> int:
    pid = _read_pid(paths)
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


def _read_pid(paths: Paths) -> int | None:
    try:
        return int(paths.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


# --- status / peers / ping ---------------------------------------------------------


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    status = request(paths.control_socket, "status")
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    node = status["node"]
    print(f"{node['name']}  {node['mesh_ip']}  {node['interface']}  udp/{node['listen_port']}  {node['fingerprint']}  ({node['mode']} mode)")
    _print_peers(status["peers"])
    drops = status.get("drops") or {}
    if drops and args.verbose:
        print("drops: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    return EXIT_OK


def cmd_peers(args: argparse.Namespace, paths: Paths) -> int:
    status = request(paths.control_socket, "peers")
    if args.json:
        print(json.dumps(status["peers"], indent=2))
    else:
        _print_peers(status["peers"])
    return EXIT_OK


def _print_peers(peers: list[dict[str, Any]]) -> None:
    if not peers:
        print("no peers configured")
        return
    rows = []
    for p in peers:
        ago = p.get("last_handshake_ago")
        handshake = f"handshake {_ago(ago)}" if ago is not None else "no handshake yet"
        path = f"{p['transport']} {p['endpoint']}" if p.get("endpoint") else "no endpoint (waits to be contacted)"
        why = f"  ({p['why_not_better']})" if p.get("why_not_better") else ""
        rows.append((p["mesh_ip"], p["name"], p["state"], path, handshake,
                     f"rx {_size(p['rx_bytes'])} tx {_size(p['tx_bytes'])}{why}"))
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
        result = request(paths.control_socket, "ping", timeout=args.timeout + 10, peer=args.peer, wait=args.timeout)
        if result["ok"]:
            print(f"pong from {result['peer']} via {result['path']} in {result['rtt_ms']:.2f} ms")
        else:
            failures += 1
            print(f"{result['error']} (path: {result['path']})")
    return EXIT_OK if failures < args.count else EXIT_FAIL


# --- id / show ----------------------------------------------------------------------


def _load(paths: Paths) -> Any:
    try:
        return load_config(paths.config, state_dir=paths.state_dir)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _identity(config: Any) -> Any:
    from tunnelmesh.identity import IdentityError, load_identity

    try:
        return asyncio.run(load_identity(config.identity, passphrase_file=config.passphrase_file))
    except IdentityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def cmd_id(args: argparse.Namespace, paths: Paths) -> int:
    identity = _identity(_load(paths))
    print(identity.public.to_line())
    return EXIT_OK


def cmd_show(args: argparse.Namespace, paths: Paths) -> int:
    if not args.wg:
        raise CliError("say what to show: `tunnelmesh show --wg` prints what a plain WireGuard peer needs", EXIT_USAGE)
    config = _load(paths)
    identity = _identity(config)
    endpoint = args.endpoint or "<this node's address>"
    lines = [
        f"# {config.name}: add this to a plain WireGuard peer's config (wg setconf / wg-quick)",
        "[Peer]",
        f"PublicKey = {base64.b64encode(identity.public.wg_public_key).decode()}",
    ]
    if args.show_secrets:
        from tunnelmesh.wireguard import derive_psk

        try:
            psk = derive_psk(read_network_secret(config.network_secret_file))
        except ConfigError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        lines.append(f"PresharedKey = {base64.b64encode(psk).decode()}")
    else:
        lines.append("# PresharedKey = (hidden: add --show-secrets; the peer needs it to connect)")
    lines += [f"Endpoint = {endpoint}:{config.listen_port}", f"AllowedIPs = {config.mesh_ip}/32"]
    print("\n".join(lines))
    return EXIT_OK


def cmd_events(args: argparse.Namespace, paths: Paths) -> int:
    try:
        for event in events(paths.control_socket):
            print(json.dumps(event), flush=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_version(args: argparse.Namespace, paths: Paths) -> int:
    print(f"tunnelmesh {__version__}")
    return EXIT_OK


# --- parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnelmesh",
        description="Self-hosted mesh VPN: WireGuard protocol, identities from your SSH keys.",
        epilog="Several nodes on one machine: give each its own --state-dir (or TUNNELMESH_STATE_DIR).",
    )
    parser.add_argument("--state-dir", help="state directory (default /var/lib/tunnelmesh, env TUNNELMESH_STATE_DIR)")
    parser.add_argument("--config", help="config file (default /etc/tunnelmesh/tunnelmesh.toml, or <state-dir>/tunnelmesh.toml when --state-dir is given)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("init", help="create this node's config, network secret and (optionally) key")
    p.add_argument("--static", action="store_true", help="a static mesh: peers are listed in the config")
    p.add_argument("--name", help="this node's name (default: host name)")
    p.add_argument("--mesh-ip", required=True, help="this node's IPv4 address inside the mesh, e.g. 100.100.0.1")
    p.add_argument("--listen-port", type=int, default=51820, help="UDP port (default 51820)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--key", help="SSH private key file to take the identity from (Ed25519 or RSA)")
    who.add_argument("--agent", nargs="?", const="", metavar="FINGERPRINT", help="use a key held by ssh-agent")
    who.add_argument("--new-key", action="store_true", help="make a dedicated Ed25519 key in the state directory")
    p.add_argument("--secret-file", help="use this existing network secret (copy it from the first node)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("up", help="start the daemon (foreground unless --detach)")
    p.add_argument("--detach", action="store_true", help="run in the background; log to <state-dir>/tunnelmesh.log")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the daemon; removes its interface and routes")
    p.set_defaults(func=cmd_down)

    for name, func, text in (("status", cmd_status, "this node and its peers"), ("peers", cmd_peers, "one line per peer")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("-v", "--verbose", action="store_true", help="also show drop counters")
        p.set_defaults(func=func)

    p = sub.add_parser("ping", help="ping a peer through the tunnel; says which path answered")
    p.add_argument("peer", help="peer name or mesh IP")
    p.add_argument("-c", "--count", type=int, default=3)
    p.add_argument("-i", "--interval", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reply")
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser("id", help="print this node's identity line, to paste into peers' configs")
    p.set_defaults(func=cmd_id)

    p = sub.add_parser("show", help="print what a plain WireGuard peer needs to join (--wg)")
    p.add_argument("--wg", action="store_true", help="WireGuard [Peer] section for this node")
    p.add_argument("--endpoint", help="the address plain peers reach this node at")
    p.add_argument("--show-secrets", action="store_true", help="include the pre-shared key")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("events", help="stream daemon events as JSON lines")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    paths = resolve_paths(args.state_dir, args.config)
    try:
        return args.func(args, paths)
    except CliError as exc:
        print(f"tunnelmesh: {exc}", file=sys.stderr)
        return exc.code
    except ControlError as exc:
        print(f"tunnelmesh: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except ConfigError as exc:
        print(f"tunnelmesh: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
