"""`tunnelmesh`: the command line, in the style of `tailscale` and `wg`.

Commands reach a running daemon only through its control socket; `up` is the
one place that starts the daemon assembly from `actors/`.

Exit codes: 0 success, 1 runtime failure (daemon not running, peer did not
answer), 2 bad usage or configuration (the message names the file and line).

This module is the parser and `main`; the commands are in network.py (making and
running the network), policy.py (the network policy and the packet filter), up.py
(starting the daemon) and daemon.py (the running daemon), what they share in
common.py. A command's module is imported when it runs (`_command`).
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import sys
from collections.abc import Callable

from tunnelmesh.config import DEFAULT_COORDINATOR_PORT, ConfigError
from tunnelmesh.paths import Paths, resolve_paths

from .common import _WRITES_STATE, EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError, _check_state_dir
from .keys import add_parser as _add_keys_parser
from .netcheck import add_parser as _add_netcheck_parser
from .tui import add_parser as _add_tui_parser

Command = Callable[[argparse.Namespace, Paths], int]


def _command(module: str, name: str) -> Command:
    """`tunnelmesh.cli.<module>.<name>`, imported when the command runs: each command pays
    for its own imports only, and `up --detach` starts the daemon after ~30 ms, not ~100
    (the daemon's connect time counts from there)."""

    def run(args: argparse.Namespace, paths: Paths) -> int:
        command: Command = getattr(importlib.import_module(f"tunnelmesh.cli.{module}"), name)
        return command(args, paths)

    run.__name__ = run.__qualname__ = name
    return run

#: tunnelmesh.membership.DEFAULT_CIDR as `init --help` shows it: membership is ~0.1 s of
#: imports that every command (`up` above all) would pay for; `init` takes the real one
#: (tests/unit/test_startup_imports.py checks that the two agree).
DEFAULT_CIDR_SHOWN = "100.64.0.0/10"

__all__ = ["EXIT_FAIL", "EXIT_OK", "EXIT_USAGE", "CliError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnelmesh",
        description="Self-hosted mesh VPN: WireGuard protocol, identities from your SSH keys.",
        epilog="Several nodes on one machine: give each its own --state-dir (or TUNNELMESH_STATE_DIR).",
    )
    parser.add_argument("--state-dir", help="state directory (default /var/lib/tunnelmesh, env TUNNELMESH_STATE_DIR)")
    parser.add_argument("--config", help="config file (default /etc/tunnelmesh/tunnelmesh.toml, or <state-dir>/tunnelmesh.toml when --state-dir is given)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "init", help="make a new network (this node is its admin and runs the coordinator), or a static node",
        description="Make a new network: an admin key (kept here, 0600), a network secret, this node as the first "
                    "member, and a config that runs the embedded coordinator. With --static: a node of a static "
                    "mesh whose peers are listed in its config.",
    )
    p.add_argument("--name", help="this node's name (default: host name)")
    p.add_argument("--listen-port", type=int, default=51820, help="UDP port (default 51820)")
    _identity_options(p)
    p.add_argument("--cidr", help=f"the network's IPv4 range (default {DEFAULT_CIDR_SHOWN})")
    p.add_argument("--url", help=f"the URL other machines reach the coordinator at, put in invites (default "
                                 f"https://<this host's address>:{DEFAULT_COORDINATOR_PORT}: the embedded coordinator "
                                 "serves TLS with a certificate made now, pinned in every invite; http:// for plain "
                                 "HTTP behind a TLS-terminating proxy)")
    p.add_argument("--listen", help="where the embedded coordinator listens (default 0.0.0.0:<port of --url>)")
    p.add_argument("--external-coordinator", action="store_true",
                   help="the coordinator at --url is a standalone `tunnelmesh coordinator`: give it the network now "
                        "instead of embedding one")
    p.add_argument("--static", action="store_true", help="a static mesh: peers are listed in the config")
    p.add_argument("--mesh-ip", help="(--static) this node's IPv4 address inside the mesh, e.g. 100.100.0.1")
    p.add_argument("--secret-file", help="(--static) use this existing network secret (copy it from the first node)")
    p.add_argument("--ca-file", metavar="PATH", help="a private CA (PEM) for the coordinator's https:// certificate: "
                                                     "used now and written into the config as [coordinator] ca_file")
    p.add_argument("--tls-fingerprint", metavar="sha256:HEX",
                   help="(--external-coordinator) the standalone coordinator's own certificate, which it logs at "
                        "start: pinned in the config and in every invite")
    p.set_defaults(func=_command("network", "cmd_init"))

    p = sub.add_parser("join", help="join a network with a token from `tunnelmesh invite` (or ask for approval)",
                       description="Join a network. With a token: admitted at once. With the coordinator's URL "
                                   "instead: waits until the admin runs `tunnelmesh approve NAME`.")
    p.add_argument("token", help="the token `tunnelmesh invite` printed, or the coordinator URL (needs --name)")
    p.add_argument("--name", help="this node's name (default: the invite's name, else the host name)")
    p.add_argument("--listen-port", type=int, default=51820, help="UDP port (default 51820)")
    p.add_argument("--wait", type=_duration, default=600, help="without a token: how long to wait for approval (default 10m)")
    p.add_argument("--network", metavar="SHA256:...",
                   help="without a token: the network's fingerprint (the admin's `tunnelmesh status` shows it)")
    p.add_argument("--ca-file", metavar="PATH", help="a private CA (PEM) for the coordinator's https:// certificate: "
                                                     "used now and written into the config as [coordinator] ca_file")
    p.add_argument("--tls-fingerprint", metavar="sha256:HEX",
                   help="without a token: the coordinator's own certificate, pinned (the admin's `tunnelmesh status` "
                        "shows it; a token carries it)")
    _identity_options(p)
    p.set_defaults(func=_command("network", "cmd_join"))

    p = sub.add_parser("invite", help="(admin) print a one-line join token")
    p.add_argument("--expires", type=_duration, default=3600, help="valid for this long: 30m, 1h, 7d (default 1h)")
    p.add_argument("--reusable", action="store_true", help="any number of machines may join with it until it expires")
    p.add_argument("--name", help="the joining node must take this name")
    p.add_argument("--revoke", metavar="ID", help="revoke the invite with this id (from `tunnelmesh invites`) "
                                                  "instead of making one: no further join with it is admitted")
    p.set_defaults(func=_command("network", "cmd_invite"))

    p = sub.add_parser("invites", help="(admin) list the invites made on this machine and whom they admitted")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_command("network", "cmd_invites"))

    p = sub.add_parser("pending", help="(admin) list joins waiting for approval")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_command("network", "cmd_pending"))

    p = sub.add_parser("approve", help="(admin) admit a pending join by name and key fingerprint")
    p.add_argument("name")
    p.add_argument("--fingerprint", required=True, metavar="SHA256:...",
                   help="the joiner's SSH key fingerprint, as its `tunnelmesh join` printed it (checked)")
    p.set_defaults(func=_command("network", "cmd_approve"))

    p = sub.add_parser("revoke", help="(admin) remove a member: every node refuses it within seconds")
    p.add_argument("peer", help="member name, mesh IP or SSH key fingerprint")
    p.set_defaults(func=_command("network", "cmd_revoke"))

    p = sub.add_parser("wg-export", help="(admin) admit a plain WireGuard device (a phone): its wg-quick config and QR",
                       description="Admit a plain WireGuard device with its own key, served over UDP by one node "
                                   "(docs/exports.md); `tunnelmesh revoke NAME` removes it like any member.")
    p.add_argument("name", help="the device's name in the network")
    p.add_argument("--via", metavar="NODE", help="the member that serves it (default: this node)")
    p.add_argument("--endpoint", metavar="HOST:PORT", help="where the device reaches that node (default: the first "
                                                           "address it registered with the coordinator)")
    p.add_argument("--public-key", metavar="KEY", help="the device's own public key (`wg pubkey`): its private key "
                                                       "never leaves it (default: make a key pair here)")
    p.add_argument("--out", metavar="FILE", help="write the config to FILE (0600) instead of printing it")
    p.add_argument("--no-qr", action="store_true", help="no QR code")
    p.add_argument("--json", action="store_true", help="the device's entry and config as JSON (keys included)")
    p.set_defaults(func=_command("wg_export", "cmd_wg_export"))

    p = sub.add_parser("rotate-secret", help="(admin) give every current member a new network secret")
    p.set_defaults(func=_command("network", "cmd_rotate_secret"))

    p = sub.add_parser(
        "policy", help="the network policy: which members may open connections to which (docs/filter.md)",
        description="The network policy is a TOML file of allow-rules (docs/filter.md) that the admin signs and "
                    "the coordinator hands every node; each node verifies it and refuses an older one. Traffic into a "
                    "node that no rule allows is dropped, except replies to its own connections and `tunnelmesh "
                    "ping`.",
    )
    policy_sub = p.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    q = policy_sub.add_parser(
        "show", help="the policy in force as this node verified it: version, issue time, text (any member)",
        description="Print the network policy this node verified and keeps (no daemon or coordinator needed): its "
                    "version, when the admin issued it, and its text. A network made before the packet filter has "
                    "none until the admin sets one: then every member reaches every port, as before.")
    q.add_argument("--json", action="store_true", help="machine-readable output (null when none is set)")
    q.set_defaults(func=_command("policy", "cmd_policy_show"))
    q = policy_sub.add_parser(
        "set", help="(admin) check FILE, sign it as the next version and send it to the coordinator",
        description="Check FILE first: an invalid policy is refused with its line and the reason, and the policy in "
                    "force stays. Then sign it with the admin key as version = the current one + 1 and hand it to "
                    "the coordinator, which passes it to every node within seconds.")
    q.add_argument("file", help="the policy, a TOML file (see docs/filter.md; `policy show` prints the current one)")
    q.set_defaults(func=_command("policy", "cmd_policy_set"))
    q = policy_sub.add_parser(
        "edit", help="(admin) edit the current policy in $EDITOR, then check, sign and send it as `set` does",
        description="Open a copy of the current policy (the starter policy if none is set) in $VISUAL or $EDITOR "
                    "(default vi). An invalid edit is refused with its line and the reason, nothing is sent, and you "
                    "may edit it again; an unchanged file sends nothing. A policy changed meanwhile by another "
                    "`set` is not overwritten.")
    q.set_defaults(func=_command("policy", "cmd_policy_edit"))

    p = sub.add_parser(
        "coordinator", help="run a standalone coordinator (no admin key, no tunnel), or migrate its database",
        description="Serve a network's coordinator on its own. `tunnelmesh coordinator migrate --from OLD --to NEW` "
                    "instead copies a coordinator's database to another (e.g. its SQLite file to PostgreSQL, to run "
                    "several coordinators), every record and signature as stored, and checks the copy.")
    p.add_argument("action", nargs="?", choices=["migrate"], help="migrate: copy --from's database into --to's")
    p.add_argument("--from", dest="source", metavar="DB", help="(migrate) the database to copy: a SQLite file or a "
                   "PostgreSQL connection string; stop the coordinator using it first")
    p.add_argument("--to", dest="target", metavar="DB", help="(migrate) the empty database to copy into")
    p.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_COORDINATOR_PORT}", help="IPv4:port to serve on")
    p.add_argument("--db", help="its database: a SQLite file (made if missing, mode 0600), or a "
                   "PostgreSQL connection string postgresql://USER@HOST/DB that several coordinators share (see "
                   "docs/coordinator.md, 'Running several coordinators'); its password from --db-password-file or "
                   "PGPASSWORD, not the command line")
    p.add_argument("--db-password-file", metavar="FILE", help="PostgreSQL's password, the file's first line "
                   "(keep it mode 0600); default: PGPASSWORD, or ~/.pgpass")
    p.add_argument("--admin", metavar="FINGERPRINT", help="accept only the network of this admin key")
    p.add_argument("--trusted-proxy", metavar="IP", action="append", default=[], type=_ip_address,
                   help="a reverse proxy in front of the coordinator (e.g. TLS termination) whose "
                        "X-Forwarded-For says where members really connect from; repeatable")
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (default: one it makes on first "
                                                     "start next to --db, <db name>-tls.pem; its fingerprint is logged)")
    p.add_argument("--tls-key", metavar="PEM", help="the key of --tls-cert")
    p.add_argument("--plain-http", action="store_true",
                   help="serve plain HTTP, behind a reverse proxy that terminates TLS")
    p.add_argument("--metrics", metavar="ADDR", help="serve Prometheus metrics at http://ADDR/metrics (IPv4:port or "
                                                     "[IPv6]:port; no authentication: keep it on loopback or firewalled)")
    p.add_argument("--cluster-url", metavar="URL", help="(PostgreSQL) where the other coordinators reach this one, "
                   "http(s)://host:port, to forward relay frames between members connected to different "
                   "coordinators; give https:// (links to and from it are then checked against the certificate "
                   "it serves) or keep plain links on a private network (default: from --listen, unless that is "
                   "every interface, loopback or port 0: then it must be given, else this coordinator's members "
                   "cannot be reached through the others' relays, as its log says)")
    stun = p.add_mutually_exclusive_group()
    stun.add_argument("--stun", metavar="IP:PORT", help="answer STUN Binding requests (nodes learn their reflexive "
                                                       "address) on this UDP address (default: --listen's, over UDP)")
    stun.add_argument("--no-stun", action="store_true", help="no STUN reflection service")
    p.add_argument("--stun-alternate", metavar="IP:PORT", help="the STUN service's second socket, for RFC 5780 "
                   "change requests (default: --stun's address, port + 1; another IP lets nodes test address filtering)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_command("network", "cmd_coordinator"))

    p = sub.add_parser("up", help="start the daemon (foreground unless --detach)")
    p.add_argument("--detach", action="store_true", help="run in the background; log to <state-dir>/tunnelmesh.log")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_command("up", "cmd_up"))

    p = sub.add_parser("down", help="stop the daemon; removes its interface and routes")
    p.set_defaults(func=_command("daemon", "cmd_down"))

    for name, func, text in (("status", _command("daemon", "cmd_status"), "this node and its peers"),
                             ("peers", _command("daemon", "cmd_peers"), "one line per peer")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("-v", "--verbose", action="store_true", help="also show drop counters")
        p.set_defaults(func=func)

    p = sub.add_parser("ping", help="ping a peer through the tunnel; says which path answered")
    p.add_argument("peer", help="peer name or mesh IP")
    p.add_argument("-c", "--count", type=int, default=3)
    p.add_argument("-i", "--interval", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reply")
    p.add_argument("--json", action="store_true", help="one JSON object (the control API's PingResult) per reply")
    p.set_defaults(func=_command("daemon", "cmd_ping"))

    p = sub.add_parser("filter", help="the packet filter in force: rules per peer, or would a flow pass")
    filter_sub = p.add_subparsers(dest="filter_command", metavar="COMMAND", required=True)
    q = filter_sub.add_parser("show", help="the rules in force and what each peer may open on this node")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=_command("policy", "cmd_filter_show"))
    q = filter_sub.add_parser("test", help="would a new flow from PEER pass, and by which rule (exit 1: denied)")
    q.add_argument("peer", help="peer name or mesh address")
    q.add_argument("proto", choices=["tcp", "udp", "icmp", "icmpv6"])
    q.add_argument("port", nargs="?", type=int, help="destination port (tcp and udp)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=_command("policy", "cmd_filter_test"))

    p = sub.add_parser("id", help="print this node's identity line, to paste into peers' configs")
    p.add_argument("--json", action="store_true", help="the identity's parts as JSON (line, fingerprint, keys)")
    p.set_defaults(func=_command("daemon", "cmd_id"))

    p = sub.add_parser("show", help="print what a plain WireGuard peer needs to join (--wg)")
    p.add_argument("--wg", action="store_true", help="WireGuard [Peer] section for this node")
    p.add_argument("--endpoint", help="the address plain peers reach this node at")
    p.add_argument("--show-secrets", action="store_true", help="include the pre-shared key")
    p.add_argument("--json", action="store_true", help="the [Peer] fields as JSON")
    p.set_defaults(func=_command("daemon", "cmd_show"))

    p = sub.add_parser("events", help="stream daemon events as JSON lines")
    p.set_defaults(func=_command("daemon", "cmd_events"))

    p = sub.add_parser(
        "ssh-bridge", help="the SSH rung through this machine's sshd: set up its account, or run as its forced command",
        description="With --setup (root): make the system account whose authorized_keys the daemon keeps, one "
                    "forced-command line per member, and give it access to the bridge socket. With --peer: what "
                    "sshd runs for a member that logs in to that account; it pipes the session to the daemon.",
    )
    p.add_argument("--setup", action="store_true", help="make the bridge account (if missing) and print the config to add")
    p.add_argument("--user", default="tunnelmesh", help="(--setup) the account's name (default tunnelmesh)")
    p.add_argument("--peer", metavar="WG_KEY", help="(forced command) the WireGuard key of the member sshd authenticated")
    p.add_argument("--socket", help="(forced command) the daemon's bridge socket (default <state-dir>/bridge.sock)")
    p.set_defaults(func=_command("daemon", "cmd_ssh_bridge"))

    p = sub.add_parser(
        "ssh-config", help="write known_hosts and an ssh_config snippet: `ssh <peer>` with verified host keys",
        description="From the running daemon: each member's sshd host keys that its identity signed, into a "
                    "known_hosts file, and an ssh_config snippet with a Host block per member (its mesh address, "
                    "StrictHostKeyChecking yes). Prints the Include line to add to ~/.ssh/config (docs/exports.md).",
    )
    p.add_argument("--out", metavar="DIR", help="where to write them, a place every user's ssh can read (default: "
                                                "ssh/ beside the config, /etc/tunnelmesh/ssh; with --state-dir, in "
                                                "the state directory, which only root can read: give --out)")
    p.add_argument("--json", action="store_true", help="print what would be written, as JSON; write nothing")
    p.set_defaults(func=_command("ssh_config", "cmd_ssh_config"))

    _add_tui_parser(sub)
    _add_keys_parser(sub)
    _add_netcheck_parser(sub)

    p = sub.add_parser("version", help="print the version")
    p.add_argument("--json", action="store_true", help="the software's and the control API's versions as JSON")
    p.set_defaults(func=_command("daemon", "cmd_version"))
    return parser


def _ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _duration(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    if not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 1h, 7d")
    return int(number) * units[unit]


def _identity_options(p: argparse.ArgumentParser) -> None:
    who = p.add_mutually_exclusive_group()
    who.add_argument("--key", help="SSH private key file to take the identity from (Ed25519 or RSA)")
    who.add_argument("--agent", nargs="?", const="", metavar="FINGERPRINT|COMMENT",
                     help="use a key held by ssh-agent (see `tunnelmesh keys`), by fingerprint or comment")
    who.add_argument("--new-key", action="store_true", help="make a dedicated Ed25519 key in the state directory")
    p.add_argument("--agent-socket", metavar="PATH",
                   help="(--agent) the ssh-agent's socket (default $SSH_AUTH_SOCK, which sudo drops): used now and "
                        "written into the config as [node] agent_socket, so the daemon finds the agent")


# Commands that write into the state directory, often as root: it must be safe to write into.
# `up` checks in the daemon (and `up --detach` before it opens the log); `ssh-bridge --setup` in
# `setup_account`.


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    paths = resolve_paths(args.state_dir, args.config)
    try:
        if args.command in _WRITES_STATE:
            _check_state_dir(paths, create=False)  # a missing one is made 0700 by the command
        return args.func(args, paths)
    except CliError as exc:
        print(f"tunnelmesh: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"tunnelmesh: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        from tunnelmesh.control_client import ControlError  # lazily: `up --detach` must not wait for it

        if not isinstance(exc, ControlError):
            raise
        print(f"tunnelmesh: {exc}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
