"""`tunnelmesh keys`: the keys in ssh-agent, which can be a mesh identity (and why not),
and which one this node's config uses; and the agent key `init`/`join --agent` choose."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from tunnelmesh.config import ConfigError, load_config
from tunnelmesh.paths import Paths

from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError

# The identity modules (cryptography) where the commands run: every `tunnelmesh` start
# builds this parser (tests/unit/test_startup_imports.py).
if TYPE_CHECKING:
    from tunnelmesh.identity_agent import AgentKey


def add_parser(sub: Any) -> None:
    p = sub.add_parser("keys", help="list the keys in ssh-agent: which can be this node's identity, and which is")
    p.add_argument("--agent-socket", metavar="PATH",
                   help="the agent's socket (default: the config's [node] agent_socket, else $SSH_AUTH_SOCK)")
    p.add_argument("--json", action="store_true", help="the keys as JSON")
    p.set_defaults(func=cmd_keys)


def _configured(paths: Paths) -> tuple[str | None, str | None]:
    """(the config's agent identity "agent[:SHA256:...]" or None, its agent socket or None).
    A missing or broken config is not this command's business: said on stderr, then ignored."""
    if not paths.config.exists():
        return None, None
    try:
        config = load_config(paths.config, state_dir=paths.state_dir)
    except ConfigError as exc:
        print(f"tunnelmesh: (config not read: {exc})", file=sys.stderr)
        return None, None
    if config.identity != "agent" and not config.identity.startswith("agent:"):
        return None, None
    return config.identity, str(config.agent_socket) if config.agent_socket else None


def _in_use(keys: list[AgentKey], spec: str | None, socket: str) -> AgentKey | None:
    """The key the config's identity names, if this agent holds it."""
    from tunnelmesh.identity import IdentityError
    from tunnelmesh.identity_agent import resolve_agent_key

    if spec is None:
        return None
    try:
        return resolve_agent_key(keys, spec[len("agent:"):] or None, socket)
    except IdentityError:
        return None


def cmd_keys(args: argparse.Namespace, paths: Paths) -> int:
    import asyncio  # lazily: most commands, `up --detach` too, run no event loop

    from tunnelmesh.identity import IdentityError
    from tunnelmesh.identity_agent import agent_socket, list_agent_keys

    spec, configured_socket = _configured(paths)
    try:
        socket = agent_socket(args.agent_socket or configured_socket)
        keys = asyncio.run(list_agent_keys(socket))
    except IdentityError as exc:
        raise CliError(str(exc), EXIT_FAIL) from None
    used = _in_use(keys, spec, socket)
    if args.json:
        print(json.dumps({
            "socket": socket,
            "config_identity": spec,  # null: the config's identity is not an agent key (or no config)
            "keys": [{"type": k.key_type, "fingerprint": k.fingerprint, "comment": k.comment, "usable": k.usable,
                      "why_not": k.problem, "in_use": k is used} for k in keys],
        }, indent=2))
        return EXIT_OK
    print(f"ssh-agent at {socket}: {len(keys)} key{'s' if len(keys) != 1 else ''}")
    for k in keys:
        mark = "*" if k is used else " "
        verdict = "usable" if k.usable else f"not usable: {k.problem}"
        print(f"{mark} {k.key_type:<12} {k.fingerprint}  {k.comment or '(no comment)'}  {verdict}")
    if used is not None:
        print(f"* this node's identity ({paths.config}: identity = \"{spec}\")")
    elif spec is not None:
        print(f"this node's identity ({spec}) is not in this agent: ssh-add it")
    elif not keys:
        print("no keys: add one with ssh-add (an Ed25519 key: ssh-keygen -t ed25519)")
    return EXIT_OK


def agent_identity_spec(selector: str, socket: str | None) -> str:
    """`--agent [SELECTOR]` of init/join -> the config's "agent:SHA256:...": the key the
    selector (fingerprint, comment, public key or .pub file; "": the only usable key)
    names in the agent at `socket` (None: $SSH_AUTH_SOCK), pinned by fingerprint (a
    comment can change)."""
    import asyncio  # lazily: most commands, `up --detach` too, run no event loop

    from tunnelmesh.identity import IdentityError
    from tunnelmesh.identity_agent import agent_socket, list_agent_keys, resolve_agent_key

    try:
        path = agent_socket(socket)
        key = resolve_agent_key(asyncio.run(list_agent_keys(path)), selector or None, path)
    except IdentityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return f"agent:{key.fingerprint}"
