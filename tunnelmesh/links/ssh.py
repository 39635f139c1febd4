"""The SSH rung: WireGuard messages over an SSH connection between two members.

Theory of operation
===================

Each daemon may serve SSH on its own TCP port (`SshRung(port=...)`) with a per-node
Ed25519 host key made at init (`load_or_create_host_key`, 0600 in the state
directory). The node's identity attests that host key and port in the peer map
(`links.attest`): an ssh-agent key cannot serve as an asyncssh host key, so the
identity key itself is not used for this.

*Dialling*: the client logs in as user ``tunnelmesh`` with the node's identity key
(from a file, or through ssh-agent with that one key offered) and trusts exactly
one host key: the one the peer it dials attested. Never ``known_hosts=None``, never
"any member's key": a member cannot impersonate another member's endpoint.

*Serving*: public-key login only, and only for a key that belongs to a *current*
member (`SshDirectory.member_by_ssh_key`); the authenticated key decides which peer
the link is to. No shell, exec, pty, X11, agent or port forwarding: one session
per connection, and in it one subsystem, ``tunnelmesh``, in binary mode carrying
frames (`links.framing`: 2-byte big-endian length, then one WireGuard message).

*The bridge*: where only the machine's sshd on port 22 is reachable, a dialler
logs in to it as the bridge account, whose authorized_keys force
``tunnelmesh ssh-bridge --peer <wg key>``; that command pipes the session into this
daemon's bridge socket (`links.bridge`), where it becomes a link like any other.

*Before login*: a connection must log in within the login timeout (LOGIN_TIMEOUT unless
the rung is given another), and at most MAX_UNAUTHENTICATED connections may be waiting to
at once, MAX_UNAUTHENTICATED_PER_SOURCE of them from one address (an IPv6 /64); more are
dropped as they arrive and counted, so a flood of connections that never log in costs a
bounded amount, and one flooding address does not keep members from logging in.

*One connection per pair*: when two links to one peer are up (both sides dialled
at once), the one whose dialler has the smaller WireGuard public key stays; both
sides compute the same answer. Two links dialled by the same side: the newer one
stays (the older is a connection the peer has given up on).

*Sending*: `send` appends a frame to a pending buffer and flushes once per event
loop iteration, so a batch from the data path is one channel write. Over
SEND_BUFFER_LIMIT bytes queued (a peer that stops reading), messages are dropped
and counted, never queued without bound.

*Logging*: dial, accept and close are logged once each; refusals once per address
and cause per minute (a scanner making up keys cannot flood the log); never per
packet, never secrets.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import asyncssh

from tunnelmesh import files
from tunnelmesh.clock import SYSTEM_CLOCK, Clock
from tunnelmesh.identity import IdentityError, NodeIdentity
from tunnelmesh.links import Link, LinkError, LinkSink, RefusalLog
from tunnelmesh.links.attest import SshEndpoint
from tunnelmesh.links.framing import FrameDecoder, FramingError, OversizeFrame, encode_into
from tunnelmesh.ratelimit import source_key

__all__ = [
    "DIAL_TIMEOUT",
    "SEND_BUFFER_LIMIT",
    "SshDirectory",
    "SshLink",
    "SshRung",
    "SshTarget",
    "USERNAME",
    "endpoint_targets",
    "load_or_create_host_key",
]

log = logging.getLogger("tunnelmesh.ssh")

USERNAME = "tunnelmesh"  # the login name on a daemon's own SSH server
SUBSYSTEM = "tunnelmesh"
BRIDGE_COMMAND = "tunnelmesh"  # asked for on a bridge; sshd runs the forced command instead
DIAL_TIMEOUT = 5.0  # seconds per target: TCP, key exchange, login and channel open
LOGIN_TIMEOUT = 10.0  # an unauthenticated connection to our server is dropped after this
# Connections to our server not yet logged in, at once: more are dropped as they arrive (and
# counted), so a flood of connections that never log in costs a bounded amount; members
# already logged in are not affected.
MAX_UNAUTHENTICATED = 64
MAX_UNAUTHENTICATED_PER_SOURCE = 8
KEEPALIVE_INTERVAL = 15.0  # a silent dead peer is noticed within interval * (count + 1)
KEEPALIVE_COUNT = 3
SEND_BUFFER_LIMIT = 512 * 1024  # bytes queued on one link before messages are dropped
# AES-GCM first: with AES-NI it is the cheapest through `cryptography`.
CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"]
# Both ends: no ~/.ssh/config or GSS (the rung is configured here alone), our ciphers,
# no compression (WireGuard messages do not compress), keepalives to notice a dead peer.
_OPTIONS: dict[str, Any] = {
    "config": None,
    "gss_host": None,
    "encryption_algs": CIPHERS,
    "compression_algs": ["none"],
    "keepalive_interval": KEEPALIVE_INTERVAL,
    "keepalive_count_max": KEEPALIVE_COUNT,
}
_MAX_HOST_KEY_FILE = 64 * 1024
# Session channels one connection may open: one becomes the link; a few refused ones
# (a client trying exec first) are tolerated, more are a client to stop listening to.
_SESSIONS_PER_CONNECTION = 8


# --- Host key --------------------------------------------------------------------------


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """This node's SSH host key at `path`, made (Ed25519, 0600) if missing.

    Refuses, with what to do, a file others can read, one owned by another user, or
    one that is not an Ed25519 private key.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return _create_host_key(path)
    except OSError as exc:
        raise LinkError(f"cannot read SSH host key {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise LinkError(f"SSH host key {path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise LinkError(f"SSH host key {path} belongs to uid {info.st_uid}, not to this user; chown it")
        if info.st_mode & 0o077:
            raise LinkError(
                f"SSH host key {path} is open to others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run: chmod 600 {path}"
            )
        data = f.read(_MAX_HOST_KEY_FILE + 1)
    try:
        if len(data) > _MAX_HOST_KEY_FILE:
            raise ValueError
        key = asyncssh.import_private_key(data)
    except Exception:  # asyncssh/cryptography raise many types for a damaged file
        key = None
    if key is None or key.algorithm != b"ssh-ed25519":
        raise LinkError(
            f"SSH host key {path} is not an unencrypted Ed25519 private key; "
            "remove it and a new one is made at the next start (peers learn it from the peer map)"
        )
    return key


def _create_host_key(path: Path) -> asyncssh.SSHKey:
    key = asyncssh.generate_private_key("ssh-ed25519", comment="tunnelmesh ssh host key")
    try:  # the one writer: a random temp name, never a planted link, never half a key
        files.write_secret(path, key.export_private_key("openssh"))
    except files.FileError as exc:
        raise LinkError(f"cannot write SSH host key {path}: {exc.reason}") from None
    log.info("made SSH host key %s (%s)", path, key.get_fingerprint())
    return key


# --- Directory and targets -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SshTarget:
    """One way to reach a peer over SSH, with the host key it attested for it."""

    host: str
    port: int
    host_key: str  # "<type> <base64>"
    user: str
    kind: Literal["daemon", "bridge"]

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class SshDirectory(Protocol):
    """What the rung asks the membership about (the daemon implements it)."""

    def member_by_ssh_key(self, ssh_public_key: str) -> bytes | None:
        """The WireGuard key of the current member with this SSH identity key
        ("<type> <base64>"), or None."""

    def is_member(self, wg_key: bytes) -> bool:
        """Whether `wg_key` belongs to a current member (for the bridge, which learns
        the peer's WireGuard key from sshd's forced command)."""

    def targets(self, wg_key: bytes) -> list[SshTarget]:
        """Where to dial this peer, in order; empty if it attested none."""


def endpoint_targets(endpoint: SshEndpoint, host: str) -> list[SshTarget]:
    """The targets of a verified endpoint at `host`: the daemon's own server first
    (no forced command, no extra process), then the bridge through sshd."""
    targets = []
    if endpoint.port is not None and endpoint.host_key is not None:
        targets.append(SshTarget(host, endpoint.port, endpoint.host_key, USERNAME, "daemon"))
    if endpoint.bridge is not None:
        bridge = endpoint.bridge
        targets.append(SshTarget(host, bridge.port, bridge.host_key, bridge.user, "bridge"))
    return targets


def short_key(wg_key: bytes) -> str:
    """A peer's WireGuard key as logs and messages show it."""
    return base64.b64encode(wg_key).decode("ascii")[:10] + "…"


# --- Links -----------------------------------------------------------------------------------


class ByteStream(Protocol):
    """The write side of a link: an asyncssh channel (through `_ChannelStream`) or an
    asyncio transport (the bridge's Unix socket) both fit."""

    def write(self, data: bytearray) -> None: ...

    def get_write_buffer_size(self) -> int: ...

    def close(self) -> None: ...


class SshLink(Link):
    """One framed byte stream to one peer (over SSH, or sshd via the bridge)."""

    rung = "ssh"

    def __init__(self, owner: SshRung, peer_key: bytes, description: str, *, dialler: bytes, stream: ByteStream) -> None:
        super().__init__(peer_key, description)
        self.dialler = dialler  # WireGuard key of the side that dialled: the tie-break
        self.announced = False  # link_up was called, so link_down is owed
        self._owner = owner
        self._stream = stream
        self._loop = asyncio.get_running_loop()
        self._pending = bytearray()
        self._flush_scheduled = False
        self._decoder = FrameDecoder()

    def send(self, datagram: bytes | bytearray | memoryview) -> None:
        drops = self._owner.drops
        if self.closed:
            drops["ssh: link closed"] += 1
            return
        if self._stream.get_write_buffer_size() + len(self._pending) > SEND_BUFFER_LIMIT:
            drops["ssh: send buffer full"] += 1
            return
        try:
            encode_into(self._pending, datagram)
        except FramingError:
            drops["ssh: message too large to send"] += 1
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or not self._pending:
            return
        batch, self._pending = self._pending, bytearray()  # handed over, not copied
        try:
            self._stream.write(batch)
        except OSError:  # the channel closed under us; its connection_lost follows
            self.lost("connection closed while sending")

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the stream: deliver each complete message to the sink."""
        if self.closed:
            return
        sink = self._owner.sink
        try:
            for message in self._decoder.feed(data):
                sink.receive(self, message)
                if self.closed:  # the sink closed us (e.g. the peer was revoked)
                    return
        except OversizeFrame:
            self._owner.drops["ssh: oversize frame"] += 1
            self._end("peer sent an oversize frame")
        except FramingError:
            self._owner.drops["ssh: bad frame"] += 1
            self._end("peer sent a bad frame")

    def close(self) -> None:
        self._end("closed by this node")

    def lost(self, reason: str) -> None:
        """The stream ended (from the other side, or failed)."""
        self._end(reason)

    def _end(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._pending = bytearray()
        self._stream.close()
        self._owner._gone(self, reason)


class _ChannelStream:
    """An asyncssh channel as a ByteStream; closing it ends the whole connection,
    since a connection carries exactly one link."""

    __slots__ = ("_chan", "_conn")

    def __init__(self, chan: asyncssh.SSHChannel[bytes], conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection) -> None:
        self._chan = chan
        self._conn = conn

    def write(self, data: bytearray) -> None:
        self._chan.write(data)  # type: ignore[arg-type]  # bytes-like is fine in binary mode

    def get_write_buffer_size(self) -> int:
        return self._chan.get_write_buffer_size()

    def close(self) -> None:
        self._conn.close()


def _reason(exc: Exception | None) -> str:
    if exc is None:
        return "closed by the peer"
    if isinstance(exc, asyncssh.Error):  # the peer's text: bounded, printable only
        text = "".join(c for c in exc.reason[:120] if c.isprintable())
        return f"connection lost: {text}" if text else "connection lost"
    return f"connection lost: {type(exc).__name__}"


class _ClientSession(asyncssh.SSHClientSession[bytes]):
    """Reading is paused until the link is attached, so no frame arrives before the
    sink has heard of the link."""

    def __init__(self) -> None:
        self.link: SshLink | None = None
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:  # type: ignore[override]
        self._chan = chan
        chan.pause_reading()

    def attach(self, link: SshLink) -> None:
        self.link = link
        if self._chan is not None:
            self._chan.resume_reading()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype is None and self.link is not None:  # stderr of a bridge is not frames
            self.link.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link is not None:
            self.link.lost(_reason(exc))


class _ServerSession(asyncssh.SSHServerSession[bytes]):
    """The one session of an authenticated member: the tunnelmesh subsystem, nothing else.
    (pty requests never get here: the server is made with allow_pty=False.)"""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.link: SshLink | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:  # type: ignore[override]
        self._chan = chan

    def shell_requested(self) -> bool:
        return self._server.refuse("shell request")

    def exec_requested(self, command: str) -> bool:
        return self._server.refuse("exec request")

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == SUBSYSTEM or self._server.refuse("unknown subsystem")

    def session_started(self) -> None:
        assert self._chan is not None
        self.link = self._server.accepted(self._chan)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self.link is not None:
            self.link.feed(data)

    def eof_received(self) -> bool:
        return False  # half-close means close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link is not None:
            self.link.lost(_reason(exc))


class _Server(asyncssh.SSHServer):
    """One incoming connection: public-key login of a current member, then one session."""

    def __init__(self, owner: SshRung) -> None:
        self._owner = owner
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer: bytes | None = None
        self._key = "?"  # fingerprint of the last key offered, for refusal logs
        self._sessions_left = _SESSIONS_PER_CONNECTION
        self._linked = False
        self._signed = False  # whether the public-key request being validated carries a signature

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._owner._server_conns.add(conn)
        unauthenticated = self._owner._unauthenticated
        source = source_key(str((conn.get_extra_info("peername") or ("?",))[0]))
        from_source = sum(1 for other in unauthenticated.values() if other == source)
        if len(unauthenticated) >= self._owner.max_unauthenticated \
                or from_source >= self._owner.max_unauthenticated_per_source:
            self.refuse("too many connections not logged in",
                        f"a connection ({len(unauthenticated)} not logged in already, {from_source} from its address)")
            asyncio.get_running_loop().call_soon(conn.abort)  # once asyncssh is done setting it up
            return
        unauthenticated[conn] = source
        # asyncssh asks `validate_public_key` the same question for a key query (no
        # signature: answered PK_OK or failure) and for a signed login, before it checks the
        # signature. A PK_OK for members' keys only would tell anyone holding a public key
        # whether it is a member's; so the request is seen here first: every key query is
        # answered alike, and a signed login of a non-member fails after its signature was
        # checked, exactly as a bad signature does.
        checked = conn.validate_public_key

        async def validate(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
            self._signed = bool(msg)
            valid = await checked(username, key_data, msg, signature)
            return valid and (not msg or self._peer is not None)

        conn.validate_public_key = validate  # type: ignore[method-assign]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._owner._server_conns.discard(self._conn)
            self._owner._unauthenticated.pop(self._conn, None)

    def auth_completed(self) -> None:
        if self._conn is not None:
            self._owner._unauthenticated.pop(self._conn, None)

    def begin_auth(self, username: str) -> bool:
        return True  # every login must authenticate

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Called for the key query and again, with the signature checked after it, for
        # the login itself: the last call before auth_completed is the key that logged in.
        # Membership is decided on the signed login only (see connection_made): its answer
        # to a query would tell an outsider which keys are members'.
        self._key = key.get_fingerprint()
        self._peer = None
        if username != USERNAME:
            shown = username[:32].encode("ascii", "backslashreplace").decode()
            return self.refuse("login as another user", f"login as {shown!r} (only {USERNAME!r} is served)")
        if not self._signed:
            return True  # PK_OK for any well-formed key: the signed login decides
        self._peer = self._owner.directory.member_by_ssh_key(_public_text(key))
        if self._peer is None:
            self.refuse("key of no current member")
        return True  # the signature is checked whoever it is; connection_made's hook refuses then

    def session_requested(self) -> _ServerSession | bool:
        if self._peer is None or self._linked or not self._sessions_left:
            return self.refuse("second session")
        self._sessions_left -= 1
        return _ServerSession(self)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return self.refuse("port forwarding")

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return self.refuse("port forwarding")

    def unix_connection_requested(self, dest_path: str) -> bool:
        return self.refuse("port forwarding")

    def unix_server_requested(self, listen_path: str) -> bool:
        return self.refuse("port forwarding")

    def tun_requested(self, unit: int | None) -> bool:
        return self.refuse("tunnel forwarding")

    def tap_requested(self, unit: int | None) -> bool:
        return self.refuse("tunnel forwarding")

    def refuse(self, cause: str, detail: str | None = None) -> bool:
        """Count and log (once per address and cause a minute) a refusal; always False.
        `cause` is one of a fixed few (what is counted); `detail` says more in the log."""
        where = "?"
        if self._conn is not None:
            peername = self._conn.get_extra_info("peername") or ("?", 0)
            where = f"{peername[0]}:{peername[1]}"
        self._owner.refused(cause, where.rpartition(":")[0],
                            f"refused {detail or cause} from {where} (key {self._key})")
        return False

    def accepted(self, chan: asyncssh.SSHServerChannel[bytes]) -> SshLink:
        assert self._conn is not None and self._peer is not None
        self._linked = True
        host, port = (self._conn.get_extra_info("peername") or ("?", 0))[:2]
        return self._owner.adopt_stream(
            self._peer, f"ssh {host}:{port}", dialler=self._peer, stream=_ChannelStream(chan, self._conn)
        )


def _public_text(key: asyncssh.SSHKey) -> str:
    return " ".join(key.export_public_key("openssh").decode("ascii").split()[:2])


# --- The rung ---------------------------------------------------------------------------------


class SshRung:
    """The SSH rung of one node: its server, its dialled links, its bridge socket."""

    def __init__(
        self,
        *,
        identity: NodeIdentity,
        host_key: asyncssh.SSHKey | None,
        port: int | None,
        directory: SshDirectory,
        sink: LinkSink,
        listen_host: str = "0.0.0.0",
        clock: Clock = SYSTEM_CLOCK,
        login_timeout: float = LOGIN_TIMEOUT,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
        max_unauthenticated_per_source: int = MAX_UNAUTHENTICATED_PER_SOURCE,
    ) -> None:
        if port is not None and host_key is None:
            raise ValueError("serving SSH needs a host key")
        self.identity = identity
        self.login_timeout = login_timeout
        self.max_unauthenticated = max_unauthenticated
        self.max_unauthenticated_per_source = max_unauthenticated_per_source
        self.directory = directory
        self.sink = sink
        self.drops: collections.Counter[str] = collections.Counter()
        self._host_key = host_key
        self._port = port
        self._listen_host = listen_host
        self._own_key = identity.public.wg_public_key
        self._links: dict[bytes, SshLink] = {}
        self._dialling: dict[bytes, asyncio.Task[SshLink]] = {}  # owned: close() cancels and awaits them
        self._server: asyncssh.SSHAcceptor | None = None
        self._server_conns: set[asyncssh.SSHServerConnection] = set()
        # Of _server_conns, those not logged in yet, with their source (ratelimit.source_key).
        self._unauthenticated: dict[asyncssh.SSHServerConnection, str] = {}
        self._bridge: Any = None  # links.bridge.BridgeServer once start_bridge ran
        self._log_refusal = RefusalLog(log, clock)

    @property
    def port(self) -> int | None:
        """The port the server listens on (the real one when asked for port 0)."""
        if self._server is not None:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        if self._port is None:
            return
        try:
            self._server = await asyncssh.create_server(
                lambda: _Server(self),
                self._listen_host,
                self._port,
                server_host_keys=[self._host_key],
                password_auth=False,
                kbdint_auth=False,
                allow_pty=False,
                agent_forwarding=False,
                x11_forwarding=False,
                allow_scp=False,
                login_timeout=self.login_timeout,
                encoding=None,
                **_OPTIONS,
            )
        except OSError as exc:
            raise LinkError(
                f"cannot serve SSH on {self._listen_host}:{self._port}: {exc.strerror or exc}; "
                "choose another SSH port in the node's config, or stop what uses this one"
            ) from None
        log.info("serving SSH on %s:%d", self._listen_host, self.port)

    async def start_bridge(self, socket_path: Path, allowed_uids: set[int], group: int | None = None) -> None:
        """Listen on the bridge socket for `tunnelmesh ssh-bridge` (see links.bridge);
        connections from uids other than root and `allowed_uids` are refused."""
        from tunnelmesh.links.bridge import BridgeServer  # bridge.py builds on this module

        self._bridge = BridgeServer(self, socket_path, allowed_uids)
        await self._bridge.start(group)

    def link(self, wg_key: bytes) -> SshLink | None:
        found = self._links.get(wg_key)
        return found if found is not None and not found.closed else None

    async def dial(self, wg_key: bytes) -> SshLink:
        """A live link to the peer: the existing one, or one made by trying its targets
        in order. LinkError says why none worked."""
        live = self.link(wg_key)
        if live is not None:
            return live
        task = self._dialling.get(wg_key)
        if task is None:  # concurrent dials of one peer share one attempt
            task = asyncio.get_running_loop().create_task(self._dial(wg_key), name=f"ssh dial {short_key(wg_key)}")
            self._dialling[wg_key] = task
            task.add_done_callback(lambda _: self._dialling.pop(wg_key, None))
        return await asyncio.shield(task)

    async def _dial(self, wg_key: bytes) -> SshLink:
        targets = self.directory.targets(wg_key)
        if not targets:
            raise LinkError(f"peer {short_key(wg_key)} attested no SSH endpoint")
        reasons = []
        for target in targets:
            try:
                return await self._dial_target(wg_key, target)
            except LinkError as exc:
                reasons.append(str(exc))
        raise LinkError("; ".join(reasons))

    async def _dial_target(self, wg_key: bytes, target: SshTarget) -> SshLink:
        where = str(target)
        try:
            host_key = asyncssh.import_public_key(target.host_key)
        except Exception:
            raise LinkError(f"the host key attested for {where} is not an SSH public key") from None
        log.info("ssh: dialling %s at %s (%s)", short_key(wg_key), where, target.kind)
        conn: asyncssh.SSHClientConnection | None = None
        try:
            async with asyncio.timeout(DIAL_TIMEOUT):
                async with self.identity.ssh_client_keys() as keys:
                    conn = await asyncssh.connect(
                        target.host,
                        target.port,
                        username=target.user,
                        client_keys=keys,
                        known_hosts=([host_key], [], []),
                        agent_path=None,
                        preferred_auth="publickey",
                        x509_trusted_certs=None,
                        **_OPTIONS,
                    )
                if target.kind == "daemon":
                    chan, session = await conn.create_session(_ClientSession, subsystem=SUBSYSTEM, encoding=None)
                else:  # sshd runs the forced command whatever is asked; a subsystem it lacks would fail first
                    chan, session = await conn.create_session(_ClientSession, BRIDGE_COMMAND, encoding=None)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            error = self._dial_error(exc, wg_key, target) if isinstance(exc, Exception) else None
            if error is None:
                raise
            raise error from None
        kind = "ssh" if target.kind == "daemon" else "ssh-bridge"
        link = self.adopt_stream(wg_key, f"{kind} {where}", dialler=self._own_key, stream=_ChannelStream(chan, conn))
        session.attach(link)
        return link if not link.closed else self._kept(wg_key, where)

    def _kept(self, wg_key: bytes, where: str) -> SshLink:
        """The link that won the tie-break against the one just dialled."""
        kept = self.link(wg_key)
        if kept is None:
            raise LinkError(f"the link to {where} closed as soon as it opened")
        return kept

    def _dial_error(self, exc: Exception, wg_key: bytes, target: SshTarget) -> LinkError | None:
        """What a failed dial tells `status`; None for a bug (raised as it is)."""
        where = str(target)
        if isinstance(exc, TimeoutError):
            return LinkError(f"timed out after {DIAL_TIMEOUT:g} s connecting to {where}")
        if isinstance(exc, ConnectionRefusedError):
            return LinkError(f"connection refused on {where}")
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            message = f"host key of {where} is not the one {short_key(wg_key)} attested"
            self.refused("wrong host key", target.host, f"refused {where}: {message}")
            return LinkError(message)
        if isinstance(exc, asyncssh.PermissionDenied):
            return LinkError(f"{where} refused our key (does it know this node as a current member?)")
        if isinstance(exc, asyncssh.ChannelOpenError):
            return LinkError(f"{where} refused the tunnelmesh session")
        if isinstance(exc, asyncssh.Error):
            return LinkError(f"SSH with {where} failed: {_reason(exc).removeprefix('connection lost: ')}")
        if isinstance(exc, IdentityError):
            return LinkError(str(exc))
        if isinstance(exc, OSError):
            return LinkError(f"cannot connect to {where}: {exc.strerror or type(exc).__name__}")
        return None

    def adopt_stream(self, peer: bytes, description: str, *, dialler: bytes, stream: ByteStream) -> SshLink:
        """A new authenticated stream to `peer` becomes a link: announced to the sink,
        unless a link it loses the tie-break to is already up (then it is closed). A link
        it replaces is closed after the new one is announced, so that a session on the old
        one moves to the new one rather than taking its end for a failing rung."""
        link = SshLink(self, peer, description, dialler=dialler, stream=stream)
        current = self.link(peer)
        if current is not None:
            if current.dialler < dialler:
                log.info("ssh: %s loses to %s (one link per peer)", description, current.description)
                link.close()
                return link
            log.info("ssh: %s replaces %s (one link per peer)", description, current.description)
        self._links[peer] = link
        link.announced = True
        log.info("ssh: link up to %s via %s", short_key(peer), description)
        self.sink.link_up(link)
        if current is not None:
            current.close()
        return link

    def _gone(self, link: SshLink, reason: str) -> None:
        if self._links.get(link.peer_key) is link:
            del self._links[link.peer_key]
        if link.announced:
            log.info("ssh: link to %s via %s down: %s", short_key(link.peer_key), link.description, reason)
            self.sink.link_down(link, reason)

    def refused(self, cause: str, address: str, message: str) -> None:
        """Count a refusal; log it once per (address, cause) per minute."""
        self.drops[f"ssh: refused {cause.split(' (')[0]}"] += 1
        self._log_refusal(address, cause, f"ssh: {message}")

    async def close(self) -> None:
        dials = list(self._dialling.values())
        for task in dials:
            task.cancel()
        await asyncio.gather(*dials, return_exceptions=True)  # no dial outlives the rung
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
        for link in list(self._links.values()):
            link.close()
        for conn in list(self._server_conns):
            conn.close()
        self._server_conns.clear()
        self._unauthenticated.clear()

    def status(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "bridge": None if self._bridge is None else str(self._bridge.path),
            "links": len(self._links),
            "drops": dict(self.drops),
        }
