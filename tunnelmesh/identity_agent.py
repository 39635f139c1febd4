"""Mesh identities of keys held by ssh-agent (the derivation is tunnelmesh.identity's).

The agent never hands out a private key, only signatures; Ed25519 and RSA signatures are
deterministic, so signing the key challenge through the agent gives the same mesh key as
the key file would. What lives here: the agent signer, listing the agent's keys (with why
a key cannot be an identity), choosing one (fingerprint, public key, .pub file or
comment), and the mesh key cache a daemon may keep for unattended boots.

`AgentUnavailable` is the one failure that can go away by itself (the agent is started,
the key is ssh-added): a daemon waits on it; every other IdentityError is final.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tunnelmesh.identity import (
    _HOW_TO_MAKE_ONE,
    _RSA,
    _SIG_ALG,
    _SSH_AGENT_RSA_SHA2_256,
    IdentityError,
    NodeIdentity,
    PublicIdentity,
    _check_key_type,
    _fingerprint_blob,
    _key_problem,
    _raw_signature,
    _split_key_text,
)

# asyncssh (~0.15 s of imports) only once an agent is asked: a key file's node never loads it.
if TYPE_CHECKING:
    import asyncssh

__all__ = [
    "AGENT_TIMEOUT",
    "AgentKey",
    "AgentUnavailable",
    "agent_socket",
    "cached_identity",
    "cache_record",
    "list_agent_keys",
    "load_identity_agent",
    "resolve_agent_key",
]

_START_ONE = "start one with `eval \"$(ssh-agent -s)\"` and add a key with ssh-add"

#: s any one exchange with the agent (connect and list, or connect and sign) may take.
#: ssh-agent serves one client at a time, so an agent busy with another (an `ssh-add -c`
#: confirmation left open) or wedged would otherwise stall its caller for good: a start,
#: a coordinator request, a login.
AGENT_TIMEOUT = 5.0

#: asyncssh's words for the agent's SSH_AGENT_FAILURE answer to a sign request (a refusal,
#: explained by _AgentSigner._explain_refusal); any other ValueError is a protocol violation.
_SIGN_REFUSED = "Unable to sign with requested key"


class AgentUnavailable(IdentityError):
    """The agent cannot be reached, does not answer, or does not hold the key (yet): may
    pass by itself."""


def _agent_failure(agent_path: str, exc: BaseException) -> AgentUnavailable:
    """What went wrong in an exchange with the agent, in words: no answer in time, no
    agent to connect to, or an answer that breaks the protocol."""
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
        return AgentUnavailable(
            f"the ssh-agent at {agent_path} did not answer within {AGENT_TIMEOUT:g} s (busy with another "
            "client, e.g. an open ssh-add -c confirmation, or hung)"
        )
    if isinstance(exc, OSError):
        return AgentUnavailable(
            f"cannot reach ssh-agent at {agent_path}: {exc.strerror or exc} (is the agent running? {_START_ONE})"
        )
    # asyncssh reports a broken answer (and a connection closed mid-answer) as ValueError.
    return AgentUnavailable(f"the ssh-agent at {agent_path} misbehaved: {exc or type(exc).__name__}")


# --- The agent's keys -------------------------------------------------------------------


def _printable(text: str) -> str:
    """A comment as it may be shown: the agent's owner wrote it, but a terminal must not
    take control characters from it."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


@dataclass(frozen=True, slots=True)
class AgentKey:
    """One key the agent holds, and whether it can be a mesh identity."""

    key_type: str
    fingerprint: str
    comment: str
    problem: str | None  # why it cannot be an identity; None: usable
    blob: bytes = field(repr=False)

    @property
    def usable(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        return f"{self.key_type} {self.fingerprint} {self.comment or '(no comment)'}"


def _problem(key_type: str, blob: bytes) -> str | None:
    try:
        return _key_problem(key_type, blob)
    except IdentityError as exc:  # a malformed RSA blob
        return str(exc)


async def list_agent_keys(agent_path: str) -> list[AgentKey]:
    """Every key the agent holds, certificates included, in the agent's order.
    AgentUnavailable when the agent cannot be reached, does not answer within
    AGENT_TIMEOUT or breaks the protocol."""
    import asyncssh

    try:
        async with asyncio.timeout(AGENT_TIMEOUT), asyncssh.connect_agent(agent_path) as agent:
            keys = await agent.get_keys()
    except (OSError, ValueError, EOFError) as exc:
        raise _agent_failure(agent_path, exc) from None
    listed = []
    for key in keys:
        blob = bytes(key.public_data)
        key_type = key.algorithm.decode("ascii", errors="replace")
        comment = _printable(key.get_comment(errors="replace") or "")
        listed.append(AgentKey(key_type, _fingerprint_blob(blob), comment, _problem(key_type, blob), blob))
    return listed


def agent_socket(configured: str | os.PathLike[str] | None = None) -> str:
    """The agent socket to use: the configured one, else $SSH_AUTH_SOCK."""
    path = os.fspath(configured) if configured else os.environ.get("SSH_AUTH_SOCK") or ""
    if not path:
        raise IdentityError(
            "no ssh-agent: SSH_AUTH_SOCK is not set and no agent socket is given: pass --agent-socket PATH to "
            "`keys`, `init` or `join` (sudo drops SSH_AUTH_SOCK: `sudo tunnelmesh init ... --agent-socket "
            "\"$SSH_AUTH_SOCK\"`), set [node] agent_socket in the config for the daemon and the other "
            f"commands, or {_START_ONE}"
        )
    return path


def _selector_blob(selector: str) -> bytes | None:
    """The key blob a public key line or a public key file names; None if `selector` is
    neither (then it may be a comment). It is a file only if it reads as a path -- ends in
    .pub or holds a path separator -- so a comment that happens to name a file in the
    current directory (`--agent ec`) stays a comment."""
    try:
        return _split_key_text(selector, allow_comment=True)[1]
    except IdentityError:
        pass
    if not (selector.endswith(".pub") or os.sep in selector):
        return None
    try:
        with open(selector, encoding="utf-8") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip() and not ln.startswith("#")]
    except OSError as exc:
        raise IdentityError(f"cannot read public key file {selector}: {exc.strerror or exc}") from None
    except UnicodeError:
        raise IdentityError(f"cannot read public key file {selector}: not text") from None
    try:
        return _split_key_text(lines[0] if lines else "", allow_comment=True)[1]
    except IdentityError:
        raise IdentityError(f"no public key in {selector}") from None


def _listing(keys: list[AgentKey]) -> str:
    return "; ".join(k.describe() + ("" if k.usable else f" (unusable: {k.problem})") for k in keys) or "no keys"


def resolve_agent_key(keys: list[AgentKey], selector: str | None, agent_path: str) -> AgentKey:
    """The key `selector` names among the agent's `keys`: a fingerprint "SHA256:...", a
    public key line, a .pub file or a key comment (e.g. alice@laptop); None: the only
    usable key. AgentUnavailable if it is not there (yet); IdentityError if it is
    ambiguous or cannot be an identity."""
    if selector is None:
        usable = [k for k in keys if k.usable]
        if not usable:
            raise AgentUnavailable(
                f"the ssh-agent at {agent_path} holds no Ed25519 or RSA key usable as a mesh identity "
                f"({_listing(keys)}). "
                f"{_HOW_TO_MAKE_ONE}, then ssh-add it"
            )
        if len(usable) > 1:
            raise IdentityError(
                f"the ssh-agent at {agent_path} holds several usable keys ({_listing(usable)}): "
                "choose one by fingerprint or comment"
            )
        return usable[0]
    if selector.startswith("SHA256:"):
        found, shown = [k for k in keys if k.fingerprint == selector], f"key {selector}"
    else:
        blob = _selector_blob(selector)
        if blob is not None:
            found, shown = [k for k in keys if k.blob == blob], f"key {_fingerprint_blob(blob)}"
        else:
            found, shown = [k for k in keys if k.comment == selector], f"a key with comment {_printable(selector)!r}"
    if not found:
        raise AgentUnavailable(
            f"{shown} is not in the ssh-agent at {agent_path} (expired with ssh-add -t, removed, or never "
            f"added: ssh-add it); it holds: {_listing(keys)}"
        )
    if len(found) > 1:
        raise IdentityError(
            f"{shown} is ambiguous in the ssh-agent at {agent_path}: {_listing(found)}; "
            "choose one by fingerprint"
        )
    key = found[0]
    try:
        _check_key_type(key.key_type, key.blob)
    except IdentityError as exc:
        raise IdentityError(f"agent key {key.fingerprint}: {exc}") from None
    return key


# --- The signer -------------------------------------------------------------------------


class _AgentSigner:
    """A key held by ssh-agent; one short connection per signature, so an identity is
    not tied to one event loop and a restarted agent is picked up."""

    __slots__ = ("agent_path", "key_type", "blob", "source")

    def __init__(self, agent_path: str, key_type: str, blob: bytes) -> None:
        self.agent_path = agent_path
        self.key_type = key_type
        self.blob = blob
        self.source = f"ssh-agent at {agent_path}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key_type} from {self.source}>"

    async def sign(self, data: bytes) -> bytes:
        # The agent's low-level sign with explicit flags: SSHAgentKeyPair.set_sig_algorithm
        # ORs flags into the key pair, so it could end up asking for something else.
        import asyncssh

        flags = _SSH_AGENT_RSA_SHA2_256 if self.key_type == _RSA else 0
        sig: bytes | None = None
        try:
            async with asyncio.timeout(AGENT_TIMEOUT), asyncssh.connect_agent(self.agent_path) as agent:
                sig = await agent.sign(self.blob, data, flags)
        except (OSError, ValueError, EOFError) as exc:
            if str(exc) != _SIGN_REFUSED:
                raise _agent_failure(self.agent_path, exc) from None
        if sig is None:  # refused: explained outside the handler, so asyncssh's error is not chained
            await self._explain_refusal()
            raise AssertionError("unreachable: _explain_refusal always raises")
        try:
            _raw_signature(sig, self.key_type)
        except IdentityError as exc:
            raise IdentityError(f"ssh-agent at {self.agent_path} misbehaved: {exc}") from None
        return bytes(sig)

    async def _explain_refusal(self) -> None:
        """The agent says only "failure"; find out which failure it was."""
        fingerprint = _fingerprint_blob(self.blob)
        keys = await list_agent_keys(self.agent_path)  # raises if the agent is gone
        if self.blob not in (k.blob for k in keys):
            raise AgentUnavailable(
                f"key {fingerprint} is no longer in the ssh-agent at {self.agent_path} "
                "(it expired -- added with ssh-add -t -- or was removed); add it again "
                "with ssh-add"
            ) from None
        raise IdentityError(
            f"ssh-agent at {self.agent_path} refused to sign with key {fingerprint}: "
            "keys added with ssh-add -c need a confirmation that was denied or had no "
            "askpass program to ask with; add the key again without -c"
        ) from None

    @asynccontextmanager
    async def client_keys(self) -> AsyncIterator[list[asyncssh.SSHKey | asyncssh.SSHKeyPair]]:
        import asyncssh

        path, fingerprint = self.agent_path, _fingerprint_blob(self.blob)
        agent: asyncssh.SSHAgentClient | None = None
        try:
            async with asyncio.timeout(AGENT_TIMEOUT):
                agent = await asyncssh.connect_agent(path)
                keys = [k for k in await agent.get_keys() if bytes(k.public_data) == self.blob]
        except (OSError, ValueError, EOFError) as exc:
            if agent is not None:
                agent.close()
            raise AgentUnavailable(f"{_agent_failure(path, exc)} (asked for key {fingerprint} to log in)") from None
        try:
            if not keys:
                raise AgentUnavailable(f"key {fingerprint} is no longer in the ssh-agent at {path}; add it again with ssh-add")
            yield list(keys)
        finally:
            agent.close()
            await agent.wait_closed()


# --- Loading ----------------------------------------------------------------------------


async def load_identity_agent(
    selector: str | None = None, *, agent_path: str | None = None
) -> NodeIdentity:
    """The identity of a key in ssh-agent (`agent_path`, else $SSH_AUTH_SOCK).

    `selector` is a fingerprint "SHA256:...", a public key line, a .pub file or a key's
    comment; None means the agent's only Ed25519/RSA key. Anyone who can use this agent
    socket (e.g. a host reached with agent forwarding) can derive the same mesh private key.
    """
    path = agent_socket(agent_path)
    key = resolve_agent_key(await list_agent_keys(path), selector, path)
    return await NodeIdentity._derive(_AgentSigner(path, key.key_type, key.blob))


# --- The mesh key cache -----------------------------------------------------------------


def cache_record(identity: NodeIdentity) -> bytes:
    """What the cache file holds: the identity line and the derived mesh private key.
    A secret: written only with tunnelmesh.files.write_secret (0600)."""
    return json.dumps({
        "identity": identity.public.to_line(),
        "mesh_key": base64.b64encode(identity.static_private).decode("ascii"),
    }).encode() + b"\n"


def cached_identity(record: bytes, agent_path: str, fingerprint: str | None, origin: str) -> NodeIdentity:
    """The identity in a cache record, checked: the SSH key attests its X25519 key, the
    private key is that key's, and it is the key the config names (`fingerprint`; None:
    any). Signing still goes to the agent at `agent_path`, and fails until it is back."""
    try:
        data = json.loads(record)
        public = PublicIdentity.from_line(data["identity"])  # verifies the attestation
        static_private = binascii.a2b_base64(data["mesh_key"].encode("ascii"), strict_mode=True)
        derived = X25519PrivateKey.from_private_bytes(static_private).public_key().public_bytes_raw()
    except IdentityError as exc:
        raise IdentityError(f"the mesh key cache is not usable: {exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, UnicodeError):
        raise IdentityError("the mesh key cache is not usable: malformed") from None
    if derived != public.wg_public_key:
        raise IdentityError("the mesh key cache is not usable: its private key is not its identity's")
    if fingerprint is not None and public.fingerprint != fingerprint:
        raise IdentityError(f"the mesh key cache holds {public.fingerprint}, not the configured {fingerprint}")
    key_type, blob = _split_key_text(public.ssh_public_key, allow_comment=False)
    assert key_type in _SIG_ALG  # from_line checked it
    return NodeIdentity(public, static_private, _AgentSigner(agent_path, key_type, blob), origin=origin)
