"""The commented starter config `tunnelmesh init` and `join` write."""

from __future__ import annotations

import os
from pathlib import Path

from tunnelmesh.config.checker import parse_config
from tunnelmesh.config.model import DEFAULT_INTERFACE, DEFAULT_LISTEN_PORT, DEFAULT_MESH_PREFIX, DEFAULT_MTU, ConfigError


def _toml_string(value: str) -> str:
    out = ['"']
    for c in value:
        if c == '"':
            out.append('\\"')
        elif c == "\\":
            out.append("\\\\")
        elif c < " " or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def starter_config(
    *,
    name: str,
    identity: str,
    mesh_ip: str | None = None,
    listen_port: int = DEFAULT_LISTEN_PORT,
    coordinator_url: str | None = None,
    serve: str | None = None,
    ca_file: str | None = None,
    tls_fingerprint: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    agent_socket: str | None = None,
) -> str:
    """A commented starter config: static mode (``mesh_ip``, peers listed in the file) or,
    with ``coordinator_url``, a node whose peers and address come from a coordinator
    (``serve`` = run the embedded coordinator on that IPv4:port; ``ca_file`` = a private
    CA for the coordinator's TLS certificate; ``tls_fingerprint`` = the coordinator's own
    certificate, pinned; ``tls_cert``/``tls_key`` = what the embedded coordinator serves;
    ``agent_socket`` = an agent identity's ssh-agent socket).

    Raises ``ValueError`` if the values would not make a valid config."""
    if isinstance(listen_port, bool) or not isinstance(listen_port, int):
        raise ValueError("listen_port must be an integer")
    static = coordinator_url is None
    if static and (ca_file, tls_fingerprint, tls_cert, tls_key) != (None,) * 4:
        raise ValueError("ca_file and the tls_ keys are for a node with a coordinator")
    agent_line = "" if agent_socket is None else (
        f"agent_socket = {_toml_string(agent_socket)}  # the ssh-agent that holds it\n")
    mode = "static mode: peers are listed in this file" if static else "peers and address come from the coordinator"
    text = f"""\
# TunnelMesh node configuration ({mode}).
# Reference of every key: docs/config.md. Relative paths are relative to the
# directory of this file.

[node]
# This node's name: a DNS label (a-z, 0-9, '-'; 1 to 63 characters).
name = {_toml_string(name)}
# The SSH key that is this node's identity: a private key file, "agent", or
# "agent:SHA256:<fingerprint>" to pick one key of ssh-agent.
identity = {_toml_string(identity)}
{agent_line}# passphrase_file = "key.pass"          # for a passphrase-protected key file
# Shared by every node of the mesh: base64 of 32 bytes, mode 0600.
# Default: network.secret in the state directory.
# network_secret_file = "network.secret"
"""
    if static:
        text += f"""\
# This node's address inside the mesh, and the prefix routed into the tunnel.
mesh_ip = {_toml_string(mesh_ip or "")}
mesh_prefix = {DEFAULT_MESH_PREFIX}
"""
    text += f"""\
# UDP port for WireGuard (0 = random).
listen_port = {int(listen_port)}
interface = "{DEFAULT_INTERFACE}"
mtu = {DEFAULT_MTU}
"""
    if static:
        text += """
# One [[peers]] table per peer. A tunnelmesh peer is given by its identity line;
# a plain WireGuard peer (e.g. a phone) by its WireGuard public key instead.
#
# [[peers]]
# name = "beta"
# identity = "ssh-ed25519 AAAA... wg=... att=..."
# # wireguard_public_key = "base64 of 32 bytes"   # instead of identity
# mesh_ip = "100.100.0.2"
# endpoint = "192.0.2.2:51820"      # optional; without it, wait to be contacted
# persistent_keepalive = 25         # optional, seconds; 0 = off
# allowed_ips = ["10.1.0.0/24"]     # optional extra routes via this peer
"""
    else:
        text += f"""
[coordinator]
# How this node reaches the coordinator.
url = {_toml_string(coordinator_url or "")}
"""
        if serve is not None:
            text += f"""\
# Run the embedded coordinator here (this node made the network). Its state:
# coordinator.db in the state directory unless `db` says otherwise.
serve = {_toml_string(serve)}
"""
        if ca_file is not None:
            text += f"""\
# A private CA (PEM) trusted, besides the system's, for the coordinator's TLS.
ca_file = {_toml_string(ca_file)}
"""
        if tls_fingerprint is not None:
            text += f"""\
# The coordinator's own TLS certificate (SHA-256 of its DER form): the only one
# this node accepts for it and its relay.
tls_fingerprint = {_toml_string(tls_fingerprint)}
"""
        if tls_cert is not None and tls_key is not None:
            text += f"""\
# The embedded coordinator serves TLS with this certificate and key (made by init).
tls_cert = {_toml_string(tls_cert)}
tls_key = {_toml_string(tls_key)}
"""
    try:
        parse_config(text, path=Path("starter.toml"), state_dir=Path(os.getcwd()))
    except ConfigError as exc:
        raise ValueError(exc.message) from None
    return text
