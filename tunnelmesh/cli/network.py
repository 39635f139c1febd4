"""`init`, `join`, `invite`, `invites`, `pending`, `approve`, `revoke`, `rotate-secret`,
`coordinator`: making and running the network (tunnelmesh/network.py does the work)."""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from tunnelmesh.config import DEFAULT_COORDINATOR_PORT, ConfigError, load_config, read_network_secret, starter_config
from tunnelmesh.fields import shown
from tunnelmesh.paths import DEFAULT_HOST_KEY, Paths

from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError, _run




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
    agent_socket = _agent_socket(args)
    secret_path = paths.network_secret
    if args.secret_file:
        _import_secret(Path(args.secret_file), secret_path)
    elif not secret_path.exists():
        from tunnelmesh.config import write_network_secret

        write_network_secret(secret_path)
    name = args.name or _host_name()
    try:
        text = starter_config(name=name, identity=identity, mesh_ip=args.mesh_ip, listen_port=args.listen_port,
                              agent_socket=agent_socket)
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
    from tunnelmesh.membership import DEFAULT_CIDR
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
                                cidr=args.cidr or DEFAULT_CIDR, url=url, serve=serve, ca_file=ca_file, tls_fingerprint=pin,
                                agent_socket=_agent_socket(args)))
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
                       network_fingerprint=args.network, ca_file=ca_file, tls_fingerprint=_tls_fingerprint(args),
                       agent_socket=_agent_socket(args)))
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


#: The latest time shown as a date: the end of year 9999 (what strftime's %Y can show).
LAST_SHOWN_TIME = 253_402_300_799


def asked_at(requested: Any) -> str:
    """When a pending join asked, from the coordinator's `requested` (Unix seconds), as local
    time; "?" for anything that is not a sane Unix time (a string, a bool, a huge number):
    the coordinator's word must not crash the CLI or the TUI (tunnelmesh/tui/admin.py)."""
    if isinstance(requested, bool) or not isinstance(requested, int | float):
        return "?"
    if not 0 <= requested <= LAST_SHOWN_TIME:  # also NaN, which compares false
        return "?"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(requested))
    except (OverflowError, OSError, ValueError):  # the platform's own limits
        return "?"


def cmd_pending(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.network import pending

    waiting = _run(pending(paths))
    if args.json:
        print(json.dumps(waiting, indent=2))
    elif not waiting:
        print("no joins waiting for approval")
    for p in waiting if not args.json else ():
        asked = asked_at(p.get("requested"))
        name = _their_words(p.get("name"))
        if p.get("kind") == "invite":
            print(f"{name}  {p.get('fingerprint')}  has an invite (the admin daemon countersigns it)  asked {asked}")
        else:
            print(f"{name}  {p.get('fingerprint')}  would get {_their_words(p.get('ipv4'))}  asked {asked}")
    return EXIT_OK


def _their_words(value: Any) -> str:
    """The coordinator's text as a terminal may show it: printable, short, else quoted."""
    text = str(value)
    return text if text.isprintable() and len(text) <= 64 else shown(text)


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


def cmd_coordinator(args: argparse.Namespace, paths: Paths) -> int:
    import asyncio  # lazily: most commands, `up --detach` too, run no event loop

    from tunnelmesh.coordinator.cluster import ClusterSettingError
    from tunnelmesh.coordinator.reflection import StunSettingError
    from tunnelmesh.coordinator.standalone import TlsSettingError, run_standalone
    from tunnelmesh.coordinator.store import StoreError
    from tunnelmesh.fields import FieldError
    from tunnelmesh.metrics import MetricsError, parse_listen
    from tunnelmesh.tls import TlsError

    try:
        metrics = parse_listen(args.metrics) if args.metrics is not None else None
    except FieldError as exc:
        raise CliError(f"--metrics: {exc}", EXIT_USAGE) from None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CliError("--tls-cert and --tls-key go together (the certificate and its key)", EXIT_USAGE)
    if args.plain_http and args.tls_cert is not None:
        raise CliError("--plain-http serves no TLS: drop --tls-cert/--tls-key, or --plain-http", EXIT_USAGE)

    from actors.daemon import configure_logging

    if args.action == "migrate":
        return _migrate(args)
    if args.db is None:
        raise CliError("--db is required: the coordinator's SQLite file or PostgreSQL connection string", EXIT_USAGE)
    db, password = _database(args.db, args.db_password_file)
    configure_logging(args.log_level)
    try:
        asyncio.run(run_standalone(args.listen, db, args.admin, frozenset(args.trusted_proxy),
                                   tls_cert=Path(args.tls_cert) if args.tls_cert else None,
                                   tls_key=Path(args.tls_key) if args.tls_key else None, plain_http=args.plain_http,
                                   metrics=metrics, stun=(False if args.no_stun else args.stun, args.stun_alternate),
                                   db_password=password, cluster_url=args.cluster_url))
    except (TlsSettingError, ClusterSettingError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except StunSettingError as exc:
        raise CliError(f"--{exc.key.replace('_', '-')}: {exc.detail}", EXIT_USAGE) from None
    except (StoreError, TlsError, MetricsError) as exc:
        raise CliError(str(exc), EXIT_FAIL) from None
    except OSError as exc:
        raise CliError(f"cannot listen on {args.listen}: {exc.strerror or exc}", EXIT_FAIL) from None
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    """`tunnelmesh coordinator migrate --from DB --to DB`."""
    import asyncio

    from tunnelmesh.coordinator.store import StoreError, open_store
    from tunnelmesh.coordinator.store.copy import migrate

    if args.source is None or args.target is None:
        raise CliError("migrate needs --from DB and --to DB (a SQLite file or a postgresql:// connection string)",
                       EXIT_USAGE)
    if args.db is not None:
        raise CliError("migrate takes --from and --to, not --db", EXIT_USAGE)
    # --db-password-file is PostgreSQL's password: for whichever side is on PostgreSQL.
    source, source_password = _database(args.source, args.db_password_file if _postgres(args.source) else None)
    target, target_password = _database(args.target, args.db_password_file if _postgres(args.target) else None)
    if isinstance(source, Path) and not source.is_file():
        raise CliError(f"--from {source}: no such file (the coordinator's database, e.g. the --db it runs with)",
                       EXIT_USAGE)
    made: Path | None = None  # a --to file this command makes, removed again if the migration fails
    if isinstance(target, Path):
        if target.exists():
            raise CliError(f"--to {target} exists already: migrate into a new file", EXIT_USAGE)
        made = target

    async def run() -> str:
        old = await open_store(source, source_password)
        try:
            new = await open_store(target, target_password)
            try:
                done = await migrate(old, new)
            finally:
                await new.close()
        finally:
            await old.close()
        rows = ", ".join(f"{count} {table}" for table, count in done.rows.items())
        return f"migrated {old.where} to {new.where}: {rows} (map version {done.version}); checked row by row"

    try:
        print(asyncio.run(run()))
    except BaseException as exc:
        if made is not None:
            for leftover in (made, made.with_name(made.name + "-wal"), made.with_name(made.name + "-shm")):
                leftover.unlink(missing_ok=True)
        if isinstance(exc, StoreError):
            raise CliError(str(exc), EXIT_FAIL) from None
        raise
    print("now start the coordinators with --db on the new database (and keep the old one as a backup)")
    return EXIT_OK


def _postgres(db: str) -> bool:
    """Whether --db (or --from, --to) names a PostgreSQL database; a usage error for a
    string that looks meant as one but is not."""
    from tunnelmesh.coordinator.store import StoreError, is_postgres

    try:
        return is_postgres(db)
    except StoreError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _database(db: str, password_file: str | None) -> tuple[str | Path, str | None]:
    """--db as the store takes it (a path, or a PostgreSQL connection string) and the
    password from --db-password-file. A password written in the string is refused:
    the command line is readable by every user of the machine (ps)."""
    from tunnelmesh.coordinator.store import StoreError, read_password_file

    if not _postgres(db):
        if password_file is not None:
            raise CliError("--db-password-file goes with a PostgreSQL --db (postgresql://...), not a SQLite file",
                           EXIT_USAGE)
        return Path(db), None
    try:
        parts = urllib.parse.urlsplit(db)
        has_password = parts.password is not None or "password=" in parts.query.lower()
    except ValueError as exc:
        raise CliError(f"--db: not a PostgreSQL connection string ({exc}); e.g. "
                       "postgresql://tunnelmesh@db.example/tunnelmesh", EXIT_USAGE) from None
    if has_password:
        raise CliError("--db holds a password, which every user of this machine can read (ps): take it out and "
                       "give it with --db-password-file FILE or PGPASSWORD", EXIT_USAGE)
    if password_file is None:
        return db, None
    try:
        return db, read_password_file(password_file)
    except StoreError as exc:
        raise CliError(f"--db-password-file {exc}", EXIT_FAIL) from None


def _agent_socket(args: argparse.Namespace) -> str | None:
    """--agent-socket as an absolute path (it goes into the config), only with --agent. Not
    resolved: a symlink that follows the agent (a login's forwarded socket) stays one."""
    if args.agent_socket is None:
        return None
    if args.agent is None:
        raise CliError("--agent-socket goes with --agent (the identity is then a key in that ssh-agent)", EXIT_USAGE)
    return os.path.abspath(os.path.expanduser(args.agent_socket))


def _choose_identity(args: argparse.Namespace, paths: Paths) -> str:
    agent_socket = _agent_socket(args)  # checked first: --agent-socket without --agent is a mistake
    if args.agent is not None:
        from .keys import agent_identity_spec

        return agent_identity_spec(args.agent, agent_socket)
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
