"""The SSH rung through the machine's own sshd: a forced command bridges to the daemon.

Where only port 22 is reachable, a dialler logs in to sshd as a dedicated account
(``tunnelmesh ssh-bridge --setup`` makes it). That account's authorized_keys, which
the daemon rewrites whenever membership changes (`write_authorized_keys`), hold one
line per current member::

    restrict,command="/usr/bin/tunnelmesh ssh-bridge --peer <wg key b64>" <ssh key> tunnelmesh:<name>

sshd picks the line by the key the dialler authenticated with, so ``--peer`` names
the peer sshd authenticated: the daemon can trust it. ``restrict`` turns off pty,
agent, X11 and port forwarding; whatever the client asks to run, sshd runs the
forced command.

The command (`run_bridge`) connects to the daemon's bridge socket, sends one line::

    tunnelmesh-bridge 1 <wg key b64>\\n

and then copies bytes both ways (the frames of `links.framing`, untouched) until
either side closes. The daemon (`BridgeServer`) accepts a connection only from root
or the bridge account (SO_PEERCRED), only a well-formed header within a few seconds,
and only a current member's key; the stream then becomes an `SshLink` exactly like
an SSH channel, tie-break included.

The socket (0660, group of the bridge account) lives in the state directory; setup
gives the bridge account's group search access (0710) to that directory so it can
reach the socket and nothing else there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import grp
import logging
import os
import pwd
import re
import shlex
import shutil
import socket
import stat
import struct
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh

from tunnelmesh.files import FileError, check_state_dir, open_dir, write_atomic_at
from tunnelmesh.identity import IdentityError, fingerprint_of
from tunnelmesh.links import LinkError

if TYPE_CHECKING:
    from tunnelmesh.links.ssh import SshLink, SshRung

__all__ = [
    "BridgeError",
    "BridgeServer",
    "DEFAULT_USER",
    "HEADER_VERSION",
    "SYSTEM_HOST_KEY",
    "read_system_host_key",
    "run_bridge",
    "setup_account",
    "write_authorized_keys",
]

log = logging.getLogger("tunnelmesh.ssh")

DEFAULT_USER = "tunnelmesh"
HEADER_VERSION = 1
SYSTEM_HOST_KEY = Path("/etc/ssh/ssh_host_ed25519_key.pub")
SHADOW = Path("/etc/shadow")
BRIDGE_SHELL = "/bin/sh"  # sshd runs the forced command with the account's shell
HEADER_TIMEOUT = 5.0  # seconds for the bridge command to send its header line
_HEADER = re.compile(rb"tunnelmesh-bridge 1 ([A-Za-z0-9+/]{43}=)\n")
_MAX_HEADER = len(b"tunnelmesh-bridge 1 ") + 44 + 1  # the whole line, with a 32-byte key in base64
_CHUNK = 64 * 1024  # bytes copied at a time by the bridge command, each way
# What may appear in the forced command without quoting: sshd hands it to `sh -c`.
_SHELL_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class BridgeError(Exception):
    """Setup or use of the bridge failed; the text says what to do."""


# --- The forced command -------------------------------------------------------------------


def _peer_key(text: str) -> bytes:
    try:
        raw = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeError, ValueError):
        raw = b""
    if len(raw) != 32 or base64.b64encode(raw).decode("ascii") != text:
        raise BridgeError(f"--peer must be a WireGuard public key in base64, not {text[:60]!r}")
    return raw


def run_bridge(peer: str, socket_path: Path) -> int:
    """Pipe stdin/stdout (the SSH session sshd gave the forced command) to the daemon's
    bridge socket until either side closes. BridgeError if the daemon cannot be reached."""
    _peer_key(peer)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(socket_path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise BridgeError(f"the tunnelmesh daemon is not running (nothing listens on {socket_path})") from None
    except OSError as exc:
        sock.close()
        raise BridgeError(
            f"cannot reach the daemon at {socket_path}: {exc.strerror} "
            "(was `tunnelmesh ssh-bridge --setup` run for this account?)"
        ) from None
    with sock:
        sock.sendall(f"tunnelmesh-bridge {HEADER_VERSION} {peer}\n".encode("ascii"))
        done = threading.Event()
        # One blocking thread per direction: at most one chunk in flight each way.
        for pump in (_stdin_to_socket, _socket_to_stdout):
            threading.Thread(target=pump, args=(sock, done), daemon=True).start()
        done.wait()
    return 0


def _stdin_to_socket(sock: socket.socket, done: threading.Event) -> None:
    try:
        while chunk := os.read(0, _CHUNK):
            sock.sendall(chunk)
    except OSError:
        pass
    finally:
        done.set()


def _socket_to_stdout(sock: socket.socket, done: threading.Event) -> None:
    try:
        while chunk := sock.recv(_CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(1, view) :]
    except OSError:
        pass
    finally:
        done.set()


# --- The daemon side ------------------------------------------------------------------------


class _BridgeConnection(asyncio.Protocol):
    """One `tunnelmesh ssh-bridge` process: a header line, then frames."""

    def __init__(self, server: BridgeServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._header = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self.link: SshLink | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        uid = _peer_uid(transport)
        if uid is None or uid not in self._server.allowed_uids:
            self._refuse("connection from another user", f"uid {uid}")
            return
        self._timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self._refuse, "slow header", f"uid {uid}")

    def data_received(self, data: bytes) -> None:
        if self.link is not None:
            self.link.feed(data)
            return
        if self._transport is None or self._transport.is_closing():
            return
        end = data.find(b"\n")
        take = len(data) if end < 0 else end + 1
        if len(self._header) + take > _MAX_HEADER:
            self._refuse("bad header", "")
            return
        self._header += data[:take]
        if end < 0:
            return
        match = _HEADER.fullmatch(self._header)
        if match is None:
            self._refuse("bad header", "")
            return
        peer = base64.b64decode(match.group(1))
        if not self._server.rung.directory.is_member(peer):
            self._refuse("key of no current member", match.group(1).decode("ascii"))
            return
        if self._timer is not None:
            self._timer.cancel()
        self.link = self._server.rung.adopt_stream(peer, "ssh-bridge (local sshd)", dialler=peer, stream=self._transport)
        if take < len(data):
            self.link.feed(memoryview(data)[take:])

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.link is not None:
            self.link.lost("the bridge command exited" if exc is None else f"bridge connection lost: {exc}")

    def _refuse(self, cause: str, key: str) -> None:
        self._server.rung.refused(f"bridge {cause}", key, f"refused bridge connection: {cause} {key}".rstrip())
        if self._transport is not None:
            self._transport.close()


def _peer_uid(transport: asyncio.Transport) -> int | None:
    sock = transport.get_extra_info("socket")
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError):
        return None
    return uid


class BridgeServer:
    """The daemon's end of the bridge: a Unix socket for `tunnelmesh ssh-bridge`."""

    def __init__(self, rung: SshRung, path: Path, allowed_uids: set[int]) -> None:
        self.rung = rung
        self.path = path
        self.allowed_uids = {0} | allowed_uids
        self._server: asyncio.AbstractServer | None = None

    async def start(self, group: int | None = None) -> None:
        """Listen (0660, in `group` if given); a stale socket from a crashed daemon is
        replaced, anything else at the path is left alone and refused."""
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                lambda: _BridgeConnection(self), str(self.path)
            )
            os.chmod(self.path, 0o660)  # connections are checked by uid as well
            if group is not None:
                os.chown(self.path, -1, group)
        except OSError as exc:
            self.close()
            raise LinkError(f"cannot listen on the SSH bridge socket {self.path}: {exc.strerror or exc}") from None
        log.info("ssh: bridge socket %s ready", self.path)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            self.path.unlink(missing_ok=True)


# --- Setup: the account, its authorized_keys, sshd's host key ------------------------------


def setup_account(user: str = DEFAULT_USER, state_dir: Path | None = None) -> pwd.struct_passwd:
    """Make the bridge's system account if missing (home /var/lib/<user>, /bin/sh so
    sshd can run the forced command, no password), its ~/.ssh (0700), and give its
    group search access to `state_dir` so it reaches the bridge socket. Needs root.

    An existing account is used only if it could be one this made: no password that
    works and /bin/sh as its shell; anything else is someone's login (`_refuse_account`).
    Nothing here follows a symlink: root changes modes and owners only through
    descriptors opened O_NOFOLLOW."""
    if os.geteuid() != 0:
        raise BridgeError("setting up the SSH bridge account needs root; try sudo")
    if re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user) is None:
        raise BridgeError(f"{user!r} is not a valid account name")
    if state_dir is not None:
        try:
            check_state_dir(state_dir)  # before root hands its group access to it
        except FileError as exc:
            raise BridgeError(str(exc)) from None
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        _run(["useradd", "--system", "--create-home", "--home-dir", f"/var/lib/{user}", "--shell", BRIDGE_SHELL,
              "--comment", "TunnelMesh SSH bridge", "--user-group", user])
        # "*" instead of useradd's locked "!": no password works either way, but sshd
        # without PAM refuses every login, keys included, to a locked account.
        _run(["usermod", "--password", "*", user])
        account = pwd.getpwnam(user)
    else:
        _refuse_account(account, _password_field(account))
    os.close(_ssh_dir(account, create=True))
    if state_dir is not None:
        try:
            fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise BridgeError(f"cannot open the state directory {state_dir}: {exc.strerror} (it must be a real "
                              "directory, not a symlink)") from None
        try:
            os.fchown(fd, 0, account.pw_gid)
            os.fchmod(fd, 0o710)  # search only: the files inside keep their own modes
        finally:
            os.close(fd)
    return account


def _password_field(account: pwd.struct_passwd, shadow: Path | None = None) -> str:
    """The account's password hash field: from /etc/shadow, else from passwd itself."""
    shadow = SHADOW if shadow is None else shadow
    try:
        with open(shadow, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) > 1 and fields[0] == account.pw_name:
                    return fields[1]
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise BridgeError(f"cannot read {shadow} to check account {account.pw_name}: {exc.strerror}") from None
    return "*" if account.pw_passwd == "x" else account.pw_passwd  # "x": shadowed, but no shadow line


def _refuse_account(account: pwd.struct_passwd, password: str) -> None:
    """Refuse an existing account that is someone's login rather than the bridge's: one
    with a password that works (empty counts: it may log in without one) or a shell other
    than the /bin/sh setup gives. Its authorized_keys would be replaced by forced commands
    and root would hand it the state directory's group."""
    user = account.pw_name
    if not password.startswith(("!", "*")):
        raise BridgeError(
            f"account {user} already exists and has a password that works, so it is not a bridge account "
            f"(that has none): choose another name with --user (setup makes the account), or, if {user} exists "
            f"only for the bridge, lock it with `usermod --password '*' {user}` and run setup again"
        )
    if account.pw_shell != BRIDGE_SHELL:
        raise BridgeError(
            f"account {user} already exists with the shell {account.pw_shell or '(none)'}, so it is not a bridge "
            f"account (that has {BRIDGE_SHELL}, only to run sshd's forced command): choose another name with "
            f"--user (setup makes the account), or, if {user} exists only for the bridge, remove it "
            f"(`userdel {user}`) and run setup again"
        )


def _ssh_dir(account: pwd.struct_passwd, *, create: bool) -> int:
    """An fd of the account's ~/.ssh, owned by it and 0700 (made if `create`): opened
    O_NOFOLLOW at each step root takes, so a symlink the account planted at ~/.ssh or
    ~/.ssh/authorized_keys is refused, never followed (it would hand root's chown or
    write to another file)."""
    home = Path(account.pw_dir)
    try:
        home_fd = open_dir(home, follow=False)
    except OSError as exc:
        raise BridgeError(f"cannot open {account.pw_name}'s home {home}: {exc.strerror} (it must be a real "
                          "directory, not a symlink)") from None
    try:
        if create:
            try:
                os.mkdir(".ssh", 0o700, dir_fd=home_fd)
            except FileExistsError:
                pass
        try:
            fd = open_dir(".ssh", follow=False, dir_fd=home_fd)
        except OSError as exc:
            what = "is a symlink" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else f"cannot be opened: {exc.strerror}"
            raise BridgeError(f"{home / '.ssh'} {what}; it must be the account's own directory: remove it if it is "
                              f"not, and run `tunnelmesh ssh-bridge --setup --user {account.pw_name}`") from None
    except OSError as exc:
        raise BridgeError(f"cannot make {home / '.ssh'}: {exc.strerror}") from None
    finally:
        os.close(home_fd)
    try:
        if create:
            os.fchown(fd, account.pw_uid, account.pw_gid)
            os.fchmod(fd, 0o700)
        st = os.fstat(fd)
        if st.st_uid != account.pw_uid or st.st_mode & 0o022:
            raise BridgeError(f"{home / '.ssh'} must belong to {account.pw_name} and be writable by it alone (0700); "
                              f"run `tunnelmesh ssh-bridge --setup --user {account.pw_name}`")
        try:
            keys = os.stat("authorized_keys", dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISREG(keys.st_mode):
                raise BridgeError(f"{home / '.ssh' / 'authorized_keys'} is not a regular file (a symlink?): "
                                  "remove it; the daemon writes that file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _run(argv: list[str]) -> None:
    tool = shutil.which(argv[0], path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if tool is None:
        raise BridgeError(f"{argv[0]} not found (install the passwd package)")
    done = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise BridgeError(f"`{shlex.join(argv)}` failed: {done.stderr.strip()[:300]}")


def write_authorized_keys(user: str, members: list[tuple[bytes, str, str]], tunnelmesh_command: str) -> None:
    """Atomically replace `user`'s authorized_keys (owned by it, 0600) with one forced
    command line per member: (wg_key, ssh_public_key "<type> <base64>", name).

    `tunnelmesh_command` is the absolute path of tunnelmesh, optionally followed by
    global options (e.g. ``/usr/bin/tunnelmesh --state-dir /var/lib/tunnelmesh``)."""
    words = tunnelmesh_command.split(" ")
    if not words[0].startswith("/") or not all(_SHELL_SAFE.fullmatch(w) for w in words):
        raise BridgeError(
            f"the tunnelmesh command {tunnelmesh_command[:200]!r} must be an absolute path and plain "
            "words (no quotes, no spaces inside a word)"
        )
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise BridgeError(f"no account {user!r}: run `tunnelmesh ssh-bridge --setup --user {user}`") from None
    lines = []
    for wg_key, ssh_key, name in members:
        try:
            fingerprint_of(ssh_key)
        except IdentityError as exc:
            raise BridgeError(f"member {name[:64]!r}: {exc}") from None
        if len(wg_key) != 32 or len(ssh_key.split()) != 2:
            raise BridgeError(f"member {name[:64]!r}: expected a 32-byte WireGuard key and '<type> <base64>'")
        peer = base64.b64encode(wg_key).decode("ascii")
        label = _NAME_UNSAFE.sub("_", name)[:64]
        lines.append(f'restrict,command="{tunnelmesh_command} ssh-bridge --peer {peer}" {ssh_key} tunnelmesh:{label}\n')
    text = "# Written by tunnelmesh: one line per current member. Edits are overwritten.\n" + "".join(lines)
    ssh_fd = _ssh_dir(account, create=False)
    try:
        write_atomic_at(ssh_fd, "authorized_keys", text.encode("ascii"), 0o600,
                        owner=(account.pw_uid, account.pw_gid), shown=Path(account.pw_dir) / ".ssh" / "authorized_keys")
    except FileError as exc:
        raise BridgeError(str(exc)) from None
    finally:
        os.close(ssh_fd)


def read_system_host_key(path: Path = SYSTEM_HOST_KEY) -> str:
    """sshd's Ed25519 host key, "<type> <base64>", for the attestation's bridge field."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise BridgeError(f"cannot read sshd's host key {path}: {reason} (create it with `ssh-keygen -A`)") from None
    fields = text.split()
    try:
        key = asyncssh.import_public_key(" ".join(fields[:2]))
    except Exception:
        key = None
    if key is None or key.algorithm != b"ssh-ed25519":
        raise BridgeError(f"{path} is not an Ed25519 SSH public key")
    return " ".join(fields[:2])


def main_setup(user: str, state_dir: Path) -> str:
    """`tunnelmesh ssh-bridge --setup`: the account, then what to put in the config."""
    account = setup_account(user, state_dir)
    return (
        f"bridge account {account.pw_name} ready (home {account.pw_dir}; the daemon writes its "
        f"authorized_keys)\n"
        f"state directory {state_dir}: mode 0710, group {grp.getgrgid(account.pw_gid).gr_name}, so the "
        "account reaches the bridge socket\n"
        "add to the node's config, then restart the daemon:\n"
        "  [transports]\n"
        f'  ssh_bridge_user = "{account.pw_name}"\n'
        "  ssh_bridge_port = 22   # the port sshd listens on"
    )
