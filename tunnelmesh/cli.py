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
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from tunnelmesh import __version__
from tunnelmesh.config import DEFAULT_COORDINATOR_PORT, ConfigError, load_config, read_network_secret, starter_config
from tunnelmesh.membership import DEFAULT_CIDR
from actors.messages import FilterStatus, PeerStatus, to_json
from tunnelmesh import control_client
from tunnelmesh.control_client import ControlError, NotRunning, request
from tunnelmesh.paths import DEFAULT_HOST_KEY, Paths, resolve_paths

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


# --- init -------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, paths: Paths) -> int:
    if not args.static:
        return _init_network(args, paths)
    if args.mesh_ip is None:
        raise CliError("a static mesh needs --mesh-ip (this node's address inside the mesh)", EXIT_USAGE)
    for option, value in (("--ca-file", args.ca_file), ("--tls-fingerprint", args.tls_fingerprint)):
        if value is not None:
            raise CliError(f"{option} is for a network with a coordinator, not --static", EXIT_USAGE)
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
    name = args.name or _host_name()
    try:
        text = starter_config(name=name, identity=identity, mesh_ip=args.mesh_ip, listen_port=args.listen_port)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    from tunnelmesh.files import FileError, write_atomic

    try:
        write_atomic(paths.config, text.encode(), 0o644, replace=False)
    except FileError as exc:
        raise CliError(str(exc), EXIT_FAIL) from None
    print(f"wrote {paths.config}")
    print(f"network secret: {secret_path} (copy it, mode 0600, to every node of this mesh, or pass --secret-file to their init)")
    print("next: add [[peers]] from `tunnelmesh id` of each node, then `tunnelmesh up`")
    return EXIT_OK


def _init_network(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.network import create_network

    if args.mesh_ip is not None:
        raise CliError("--mesh-ip is for --static; with a coordinator, addresses come from --cidr", EXIT_USAGE)
    url = (args.url or _default_url()).rstrip("/")
    ca_file = _ca_file(args)
    pin = _tls_fingerprint(args)
    if pin is not None and not args.external_coordinator:
        raise CliError("--tls-fingerprint is for --external-coordinator: the embedded coordinator's certificate "
                       "is made here, and pinned without it", EXIT_USAGE)
    serve = None
    if not args.external_coordinator:
        port = urllib.parse.urlsplit(url).port or DEFAULT_COORDINATOR_PORT
        serve = args.listen or f"0.0.0.0:{port}"
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = _choose_identity(args, paths)
    name = args.name or _host_name()
    state = _run(create_network(paths, name=name, identity_spec=identity, listen_port=args.listen_port,
                                cidr=args.cidr, url=url, serve=serve, ca_file=ca_file, tls_fingerprint=pin))
    _ssh_host_key(paths)
    network = state.network
    print(f"made network {network.network}: {network.cidr4} and {network.ula6}")
    print(f"this node: {state.member.name} {state.member.ipv4} {state.member.ipv6} (admin key {paths.admin_key}, keep it safe)")
    print(f"coordinator: {url}" + (f" (embedded, listening on {serve})" if serve else " (standalone)"))
    pinned = _pinned(paths)
    if pinned is not None:
        print(f"coordinator TLS certificate {pinned}: pinned in this node's config and in every invite")
    if url.lower().startswith("http://"):
        print(f"warning: {url} is plain HTTP: coordinator traffic (joins, the peer map, admin requests) goes in "
              "clear unless a TLS-terminating proxy fronts it; leave out --url's http:// for the coordinator's own "
              "TLS", file=sys.stderr)
    from tunnelmesh.filter import OPEN_PORT_HINT

    print(f"network policy v1 (the starter policy): `tunnelmesh policy show`\n{OPEN_PORT_HINT}")
    print("next: `tunnelmesh up`, then `tunnelmesh invite` for each machine that joins")
    return EXIT_OK


def _tls_fingerprint(args: argparse.Namespace) -> str | None:
    """--tls-fingerprint in its one spelling (sha256:<64 hex digits>)."""
    if args.tls_fingerprint is None:
        return None
    from tunnelmesh.tls import parse_pin

    try:
        return parse_pin(args.tls_fingerprint)
    except ValueError as exc:
        raise CliError(f"--tls-fingerprint: {exc}", EXIT_USAGE) from None


def _pinned(paths: Paths) -> str | None:
    """The coordinator certificate this node's config pins, if any."""
    try:
        coordinator = load_config(paths.config, state_dir=paths.state_dir).coordinator
    except ConfigError:
        return None
    return coordinator.tls_fingerprint if coordinator is not None else None


def _ca_file(args: argparse.Namespace) -> str | None:
    """--ca-file as an absolute path (it goes into the config), checked to hold a PEM certificate."""
    if args.ca_file is None:
        return None
    from tunnelmesh.links import LinkError
    from tunnelmesh.links.proxy import ssl_context

    path = str(Path(args.ca_file).expanduser().resolve())
    try:
        ssl_context(path)
    except LinkError as exc:
        raise CliError(f"--ca-file: {exc}", EXIT_USAGE) from None
    return path


def _ssh_host_key(paths: Paths) -> None:
    """The SSH rung's host key, made once (0600); the daemon attests it with the identity."""
    from tunnelmesh.links import LinkError
    from tunnelmesh.links.ssh import load_or_create_host_key

    try:
        load_or_create_host_key(paths.ssh_host_key)
    except LinkError as exc:
        raise CliError(str(exc), EXIT_FAIL) from None


def _default_url() -> str:
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = "127.0.0.1"
    if address.startswith("127."):
        raise CliError("cannot tell which address other machines reach this one at: give --url "
                       f"https://<address>:{DEFAULT_COORDINATOR_PORT}", EXIT_USAGE)
    return f"https://{address}:{DEFAULT_COORDINATOR_PORT}"


def _host_name() -> str:
    return socket.gethostname().split(".")[0].lower()


def _run(coro: Any) -> Any:
    """Run a network operation; its refusals become CLI errors with their message."""
    from tunnelmesh.coordinator.client import CoordinatorError
    from tunnelmesh.membership import MembershipError
    from tunnelmesh.netstate import StateError
    from tunnelmesh.network import NetworkError

    try:
        return asyncio.run(coro)
    except (NetworkError, MembershipError, StateError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except CoordinatorError as exc:
        raise CliError(str(exc), EXIT_FAIL) from None


# --- join and admin -------------------------------------------------------------------------


def cmd_join(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.network import join

    ca_file = _ca_file(args)
    identity = _choose_identity(args, paths)

    def waiting(pending: dict[str, Any]) -> None:
        if pending.get("countersign"):
            print("waiting for the admin's machine to countersign the join (its daemon does it when it runs)",
                  flush=True)
            return
        print(f"waiting for the admin to run `tunnelmesh approve {pending.get('name')} --fingerprint "
              f"{pending.get('fingerprint')}` "
              "(nothing is reserved until then)", flush=True)

    joined = _run(join(paths, token_or_url=args.token, name=args.name, identity_spec=identity,
                       listen_port=args.listen_port, wait=args.wait, on_pending=waiting,
                       network_fingerprint=args.network, ca_file=ca_file, tls_fingerprint=_tls_fingerprint(args)))
    member = joined.state.member
    _ssh_host_key(paths)
    print(f"joined network {joined.state.network.network} as {member.name}: {member.ipv4} {member.ipv6} "
          f"in {joined.seconds:.2f} s")
    print("next: `tunnelmesh up`")
    return EXIT_OK


def cmd_invite(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.admission import invite_id
    from tunnelmesh.membership import Token
    from tunnelmesh.network import NetworkError, make_token, revoke_invite

    try:
        if args.revoke is not None:
            record = revoke_invite(paths, args.revoke)
            print(f"invite {record.id} revoked: no further join with it is countersigned")
            return EXIT_OK
        token = make_token(paths, expires_in=args.expires, reusable=args.reusable, name=args.name)
    except NetworkError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    print(token)  # alone on stdout, for scripts
    invite = invite_id(base64.b64decode(Token.parse(token).grant["body"]["invite_key"]))
    print(f"invite {invite}; revoke it with `tunnelmesh invite --revoke {invite}`", file=sys.stderr)
    return EXIT_OK


def cmd_invites(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.network import NetworkError, invites

    try:
        records = invites(paths)
    except NetworkError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if args.json:
        print(json.dumps([{"id": r.id, "name": r.grant.name, "created": r.grant.created, "expires": r.grant.expires,
                           "uses": r.grant.uses, "used_by": r.used_by, "revoked_at": r.revoked_at}
                          for r in records], indent=2))
        return EXIT_OK
    if not records:
        print("no invites made on this machine")
    now = time.time()
    for r in records:
        if r.revoked_at is not None:
            state = "revoked"
        elif r.grant.expires < now:
            state = "expired"
        elif r.uses_left() == 0:
            state = "used up"
        else:
            state = "valid"
        uses = "reusable" if r.grant.uses == 0 else f"{len(r.used_by)}/{r.grant.uses} used"
        expires = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.grant.expires))
        print(f"{r.id}  {state:8}  {uses:12}  expires {expires}  name {r.grant.name or '(any)'}  "
              f"admitted {len(r.used_by)}")
    return EXIT_OK


def cmd_pending(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.network import pending

    waiting = _run(pending(paths))
    if args.json:
        print(json.dumps(waiting, indent=2))
    elif not waiting:
        print("no joins waiting for approval")
    for p in waiting if not args.json else ():
        asked = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.get("requested", 0)))
        if p.get("kind") == "invite":
            print(f"{p.get('name')}  {p.get('fingerprint')}  has an invite (the admin daemon countersigns it)  "
                  f"asked {asked}")
        else:
            print(f"{p.get('name')}  {p.get('fingerprint')}  would get {p.get('ipv4')}  asked {asked}")
    return EXIT_OK


def cmd_approve(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.network import approve

    member = _run(approve(paths, args.name, args.fingerprint))
    print(f"approved {member.name} ({member.identity.fingerprint}) as {member.ipv4}")
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.network import revoke

    revocation = _run(revoke(paths, args.peer))
    print(f"revoked {revocation.name}: every node drops it within seconds, and it stops")
    print("it still knows the network secret: run `tunnelmesh rotate-secret` to replace it")
    return EXIT_OK


def cmd_rotate_secret(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.network import rotate_secret

    epoch, members = _run(rotate_secret(paths))
    print(f"network secret epoch {epoch} sealed to {members} members; nodes switch as they receive it")
    return EXIT_OK


# --- the network policy ----------------------------------------------------------------------


def cmd_policy_show(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.network import kept_policy

    state, record = _run_local(kept_policy, paths)
    if args.json:
        shown = None if record is None else {"network": record.network, "version": record.version,
                                             "issued": record.issued, "text": record.text}
        print(json.dumps(shown, indent=2))
        return EXIT_OK
    if record is None:
        print(f"network {state.network.network}: no network policy set (a network made before the packet filter): "
              "every member reaches every port of every other member, as before, unless a node's own [filter] "
              "rules say otherwise; the admin sets one with `tunnelmesh policy set FILE`")
        return EXIT_OK
    issued = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(record.issued))
    print(f"# network policy v{record.version}, issued {issued}, signed by the admin key of network {record.network} "
          "(verified by this node)")
    print(record.text, end="" if record.text.endswith("\n") else "\n")
    return EXIT_OK


def cmd_policy_set(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.network import read_policy_file, set_policy

    path = Path(args.file)
    text = _run_local(read_policy_file, path)
    return _policy_sent(*_run(set_policy(paths, text, path)))


def cmd_policy_edit(args: argparse.Namespace, paths: Paths) -> int:
    import shlex
    import tempfile

    from tunnelmesh.filter import STARTER_POLICY
    from tunnelmesh.network import NetworkError, check_policy, policy_for_edit, set_policy

    current = _run(policy_for_edit(paths))
    base = current.text if current is not None else STARTER_POLICY
    editor = shlex.split(os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi")
    fd, name = tempfile.mkstemp(prefix="tunnelmesh-policy-", suffix=".toml")
    draft = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write(base)
    while True:
        if subprocess.run([*editor, str(draft)], check=False).returncode != 0:
            raise CliError(f"the editor ({' '.join(editor)}) failed: nothing was sent; your edit is in {draft}")
        text = draft.read_text(errors="replace")
        if text == base:
            draft.unlink()
            print("no change: nothing was sent")
            return EXIT_OK
        try:
            check_policy(text, draft)
            break
        except NetworkError as exc:
            print(f"tunnelmesh: {exc}", file=sys.stderr)
        if not _ask("edit it again? [Y/n] "):
            raise CliError(f"nothing was sent; your edit is in {draft}", EXIT_USAGE)
    sent = _run(set_policy(paths, text, draft, based_on=current.version if current is not None else 0))
    draft.unlink()
    return _policy_sent(*sent)


def _ask(question: str) -> bool:
    """A yes (the default) from the terminal; no without one (stdin closed or not a terminal)."""
    if not sys.stdin.isatty():
        return False
    try:
        return input(question).strip().lower() in ("", "y", "yes")
    except EOFError:
        return False


def _policy_sent(record: Any, sent: str) -> int:
    if sent == "unchanged":
        print(f"network policy v{record.version} already has this text: nothing was sent")
    elif sent == "re-sent":
        print(f"network policy v{record.version} already has this text, but the coordinator held an older version "
              f"or none (restored from an older backup?): v{record.version} was sent to it again")
    else:
        print(f"network policy v{record.version} set: every node takes it within seconds "
              "(`tunnelmesh policy show` on a node shows what it verified)")
    return EXIT_OK


def _run_local(function: Any, *args: Any) -> Any:
    """A local network operation; its refusal becomes a CLI error with its message."""
    from tunnelmesh.network import NetworkError

    try:
        return function(*args)
    except NetworkError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def cmd_coordinator(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.coordinator.service import run_standalone
    from tunnelmesh.coordinator.store import StoreError
    from tunnelmesh.tls import TlsError

    if (args.tls_cert is None) != (args.tls_key is None):
        raise CliError("--tls-cert and --tls-key go together (the certificate and its key)", EXIT_USAGE)
    if args.plain_http and args.tls_cert is not None:
        raise CliError("--plain-http serves no TLS: drop --tls-cert/--tls-key, or --plain-http", EXIT_USAGE)

    from actors.daemon import configure_logging

    configure_logging(args.log_level)
    try:
        asyncio.run(run_standalone(args.listen, Path(args.db), args.admin, frozenset(args.trusted_proxy),
                                   tls_cert=Path(args.tls_cert) if args.tls_cert else None,
                                   tls_key=Path(args.tls_key) if args.tls_key else None, plain_http=args.plain_http))
    except (StoreError, TlsError) as exc:
        raise CliError(str(exc), EXIT_FAIL) from None
    except OSError as exc:
        raise CliError(f"cannot listen on {args.listen}: {exc.strerror or exc}", EXIT_FAIL) from None
    except KeyboardInterrupt:
        pass
    return EXIT_OK


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


def _choose_identity(args: argparse.Namespace, paths: Paths) -> str:
    if args.agent is not None:
        return "agent" if args.agent == "" else f"agent:{args.agent}"
    if args.key:
        return str(Path(args.key).resolve())
    if args.new_key:
        paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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
    from tunnelmesh.files import FileError, write_atomic, write_secret

    key = asyncssh.generate_private_key("ssh-ed25519", comment=f"tunnelmesh@{socket.gethostname()}")
    try:
        write_secret(path, key.export_private_key("openssh"), replace=False)
        write_atomic(Path(f"{path}.pub"), key.export_public_key("openssh"), 0o644)
    except FileError as exc:
        raise CliError(str(exc), EXIT_FAIL) from None
    print(f"made a dedicated Ed25519 identity key: {path}")
    return path


def _import_secret(source: Path, target: Path) -> None:
    try:
        read_network_secret(source)  # checks format and permissions
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    from tunnelmesh.files import FileError, write_secret

    try:
        write_secret(target, source.read_bytes())
    except (FileError, OSError) as exc:
        raise CliError(f"cannot copy the network secret {source} to {target}: {exc}", EXIT_FAIL) from None


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
    _check_state_dir(paths)
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
        except ControlError:
            time.sleep(0.1)
            continue
        print(f"tunnelmesh up (pid {process.pid}, log {log_path})")
        filter_status = control_client.status(paths.control_socket).filter
        if filter_status is not None:  # what a network from before the filter most needs to hear
            print(f"packet filter: {filter_status.in_force}")
        return EXIT_OK
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
    status = control_client.status(paths.control_socket)
    if args.json:
        print(json.dumps(to_json(status), indent=2))
        return EXIT_OK
    node = status.node
    print(f"{node.name}  {node.mesh_ip}  {node.interface}  udp/{node.listen_port}  {node.fingerprint}  ({node.mode} mode)")
    coordinator = node.coordinator
    if coordinator is not None:
        since = time.strftime("%H:%M:%S", time.localtime(coordinator.since))
        state = coordinator.state + (f" since {since}: {coordinator.error}" if coordinator.error else f" since {since}")
        if coordinator.state != "connected":
            state += " (running from the cached peer map)"
        print(f"network {coordinator.network}, coordinator {coordinator.url}: {state}; "
              f"peer map v{coordinator.version}, {coordinator.members} members")
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
        rows.append((p.mesh_ip, p.name, p.state, path, handshake, f"rx {_size(p.rx_bytes)} tx {_size(p.tx_bytes)}{why}"))
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
        path = result.path.endpoint if result.path is not None else "none"
        if result.ok:
            answered = f", answer came on {result.answered_on}" if result.answered_on and result.path is not None \
                and result.answered_on != result.path.rung else ""
            print(f"pong from {result.peer} via {path} in {result.rtt_ms:.2f} ms{answered}")
        else:
            failures += 1
            print(f"{result.error} (path: {path})")
    return EXIT_OK if failures < args.count else EXIT_FAIL


# --- filter ---------------------------------------------------------------------------


def cmd_filter_show(args: argparse.Namespace, paths: Paths) -> int:
    rules = control_client.filter_show(paths.control_socket)
    if args.json:
        print(json.dumps(to_json(rules), indent=2))
        return EXIT_OK
    print(f"packet filter: {rules.in_force}")
    if not rules.enabled:
        return EXIT_OK
    print("rules, in evaluation order (new flows admitted):" if rules.rules else "no rules: only replies come in")
    for rule in rules.rules:
        print(f"  {rule.rule}  ({rule.hits})")
    for peer in rules.peers:
        print(f"{peer.peer} may open here:")
        for o in peer.origins:
            if o.spoofed:
                print(f"  from {o.origin}: nothing (another member's address: dropped as spoofed)")
                continue
            opens = [f"tcp {o.tcp}" if o.tcp else "", f"udp {o.udp}" if o.udp else "", "icmp echo" if o.icmp else "",
                     "icmpv6 echo" if o.icmpv6 else ""]
            print(f"  from {o.origin}: {', '.join(x for x in opens if x) or 'nothing (replies only)'}")
    return EXIT_OK


def cmd_filter_test(args: argparse.Namespace, paths: Paths) -> int:
    if args.proto in ("tcp", "udp") and args.port is None:
        raise CliError(f"a port is needed for {args.proto}: tunnelmesh filter test {args.peer} {args.proto} PORT",
                       EXIT_USAGE)
    verdict = control_client.filter_test(paths.control_socket, args.peer, args.proto, args.port)
    if args.json:
        print(json.dumps(to_json(verdict), indent=2))
    else:
        what = f"{verdict.proto}/{verdict.port}" if verdict.proto in ("tcp", "udp") else f"{verdict.proto} echo"
        print(f"{what} from {verdict.peer}: {'allowed' if verdict.allowed else 'denied'}: {verdict.reason}")
    return EXIT_OK if verdict.allowed else EXIT_FAIL


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
    mesh_ip = config.mesh_ip
    if mesh_ip is None:  # with a coordinator: the address it assigned at join
        from tunnelmesh.netstate import NetworkState, StateError

        try:
            mesh_ip = NetworkState.load(paths.network_state).member.ipv4
        except StateError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
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

    p = sub.add_parser(
        "init", help="make a new network (this node is its admin and runs the coordinator), or a static node",
        description="Make a new network: an admin key (kept here, 0600), a network secret, this node as the first "
                    "member, and a config that runs the embedded coordinator. With --static: a node of a static "
                    "mesh whose peers are listed in its config.",
    )
    p.add_argument("--name", help="this node's name (default: host name)")
    p.add_argument("--listen-port", type=int, default=51820, help="UDP port (default 51820)")
    _identity_options(p)
    p.add_argument("--cidr", default=DEFAULT_CIDR, help=f"the network's IPv4 range (default {DEFAULT_CIDR})")
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
    p.set_defaults(func=cmd_init)

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
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("invite", help="(admin) print a one-line join token")
    p.add_argument("--expires", type=_duration, default=3600, help="valid for this long: 30m, 1h, 7d (default 1h)")
    p.add_argument("--reusable", action="store_true", help="any number of machines may join with it until it expires")
    p.add_argument("--name", help="the joining node must take this name")
    p.add_argument("--revoke", metavar="ID", help="revoke the invite with this id (from `tunnelmesh invites`) "
                                                  "instead of making one: no further join with it is admitted")
    p.set_defaults(func=cmd_invite)

    p = sub.add_parser("invites", help="(admin) list the invites made on this machine and whom they admitted")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_invites)

    p = sub.add_parser("pending", help="(admin) list joins waiting for approval")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_pending)

    p = sub.add_parser("approve", help="(admin) admit a pending join by name and key fingerprint")
    p.add_argument("name")
    p.add_argument("--fingerprint", required=True, metavar="SHA256:...",
                   help="the joiner's SSH key fingerprint, as its `tunnelmesh join` printed it (checked)")
    p.set_defaults(func=cmd_approve)

    p = sub.add_parser("revoke", help="(admin) remove a member: every node refuses it within seconds")
    p.add_argument("peer", help="member name, mesh IP or SSH key fingerprint")
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser("rotate-secret", help="(admin) give every current member a new network secret")
    p.set_defaults(func=cmd_rotate_secret)

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
    q.set_defaults(func=cmd_policy_show)
    q = policy_sub.add_parser(
        "set", help="(admin) check FILE, sign it as the next version and send it to the coordinator",
        description="Check FILE first: an invalid policy is refused with its line and the reason, and the policy in "
                    "force stays. Then sign it with the admin key as version = the current one + 1 and hand it to "
                    "the coordinator, which passes it to every node within seconds.")
    q.add_argument("file", help="the policy, a TOML file (see docs/filter.md; `policy show` prints the current one)")
    q.set_defaults(func=cmd_policy_set)
    q = policy_sub.add_parser(
        "edit", help="(admin) edit the current policy in $EDITOR, then check, sign and send it as `set` does",
        description="Open a copy of the current policy (the starter policy if none is set) in $VISUAL or $EDITOR "
                    "(default vi). An invalid edit is refused with its line and the reason, nothing is sent, and you "
                    "may edit it again; an unchanged file sends nothing. A policy changed meanwhile by another "
                    "`set` is not overwritten.")
    q.set_defaults(func=cmd_policy_edit)

    p = sub.add_parser("coordinator", help="run a standalone coordinator (no admin key, no tunnel)")
    p.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_COORDINATOR_PORT}", help="IPv4:port to serve on")
    p.add_argument("--db", required=True, help="its SQLite file (made if missing, mode 0600)")
    p.add_argument("--admin", metavar="FINGERPRINT", help="accept only the network of this admin key")
    p.add_argument("--trusted-proxy", metavar="IP", action="append", default=[], type=_ip_address,
                   help="a reverse proxy in front of the coordinator (e.g. TLS termination) whose "
                        "X-Forwarded-For says where members really connect from; repeatable")
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (default: one it makes on first "
                                                     "start next to --db, <db name>-tls.pem; its fingerprint is logged)")
    p.add_argument("--tls-key", metavar="PEM", help="the key of --tls-cert")
    p.add_argument("--plain-http", action="store_true",
                   help="serve plain HTTP, behind a reverse proxy that terminates TLS")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_coordinator)

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

    p = sub.add_parser("filter", help="the packet filter in force: rules per peer, or would a flow pass")
    filter_sub = p.add_subparsers(dest="filter_command", metavar="COMMAND", required=True)
    q = filter_sub.add_parser("show", help="the rules in force and what each peer may open on this node")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_filter_show)
    q = filter_sub.add_parser("test", help="would a new flow from PEER pass, and by which rule (exit 1: denied)")
    q.add_argument("peer", help="peer name or mesh address")
    q.add_argument("proto", choices=["tcp", "udp", "icmp", "icmpv6"])
    q.add_argument("port", nargs="?", type=int, help="destination port (tcp and udp)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_filter_test)

    p = sub.add_parser("id", help="print this node's identity line, to paste into peers' configs")
    p.set_defaults(func=cmd_id)

    p = sub.add_parser("show", help="print what a plain WireGuard peer needs to join (--wg)")
    p.add_argument("--wg", action="store_true", help="WireGuard [Peer] section for this node")
    p.add_argument("--endpoint", help="the address plain peers reach this node at")
    p.add_argument("--show-secrets", action="store_true", help="include the pre-shared key")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("events", help="stream daemon events as JSON lines")
    p.set_defaults(func=cmd_events)

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
    p.set_defaults(func=cmd_ssh_bridge)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
    return parser


def _identity_options(p: argparse.ArgumentParser) -> None:
    who = p.add_mutually_exclusive_group()
    who.add_argument("--key", help="SSH private key file to take the identity from (Ed25519 or RSA)")
    who.add_argument("--agent", nargs="?", const="", metavar="FINGERPRINT", help="use a key held by ssh-agent")
    who.add_argument("--new-key", action="store_true", help="make a dedicated Ed25519 key in the state directory")


# Commands that write into the state directory, often as root: it must be safe to write into.
# `up` checks in the daemon (and `up --detach` before it opens the log); `ssh-bridge --setup` in
# `setup_account`.
_WRITES_STATE = frozenset({"init", "join", "invite", "invites", "approve", "revoke", "rotate-secret"})


def _check_state_dir(paths: Paths, *, create: bool = True) -> None:
    from tunnelmesh.files import FileError, check_state_dir

    try:
        check_state_dir(paths.state_dir, create=create)
    except FileError as exc:
        raise CliError(str(exc), EXIT_FAIL) from None


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
    except ControlError as exc:
        print(f"tunnelmesh: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except ConfigError as exc:
        print(f"tunnelmesh: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
