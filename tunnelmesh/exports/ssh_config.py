"""`tunnelmesh ssh-config`: a known_hosts file and an ssh_config snippet, so that
`ssh <peer>` reaches each member's sshd over the mesh with its verified host keys and
never asks "are you sure you want to continue connecting?".

The input is the running daemon's `ssh_hosts` reply (actors/messages.SshHosts): for each
other member, the sshd host keys its own identity signed in its newest SSH endpoint
record (tunnelmesh/links/attest.py; the daemon refuses a forged, altered or replayed
one), in a member entry the admin signed. Nothing here trusts the coordinator, and a
member with no such key gets no Host block, only a comment saying why.

For each member with keys, the snippet has::

    Host beta beta.tunnelmesh
        HostName <its mesh IPv4>
        HostKeyAlias beta.<network tag>.tunnelmesh
        UserKnownHostsFile <out>/known_hosts
        GlobalKnownHostsFile none
        StrictHostKeyChecking yes
        CheckHostIP no
        UpdateHostKeys no

and known_hosts has `beta.<network tag>.tunnelmesh <key>` per key, where the tag is the
first 8 hex digits of the network's id (its admin key's fingerprint). The alias (not the
mesh address) names the keys, so a mesh address that passes to another member after a
revocation never carries the old member's keys, nor does a member of the same name in
another network; StrictHostKeyChecking yes makes a key that is not
there a refusal, never a prompt. The values are checked again here (names, addresses,
keys in canonical form, identity fingerprints) before anything is written: a line break in a key must not
become an ssh_config directive.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import stat
from dataclasses import dataclass
from pathlib import Path

from actors.messages import SshHost, SshHosts
from tunnelmesh import files
from tunnelmesh.fields import is_name
from tunnelmesh.links.attest import AttestationError, check_host_key

__all__ = ["KNOWN_HOSTS", "SSH_CONFIG", "ExportError", "SshExport", "closed_to_others", "include_line", "network_tag",
           "render", "write_export"]

KNOWN_HOSTS = "known_hosts"
SSH_CONFIG = "ssh_config"


class ExportError(Exception):
    """The files cannot be written, or the output directory cannot be named in ssh_config."""


@dataclass(frozen=True)
class SshExport:
    """What `write_export` writes: both files' text, and who is in them and who is not."""

    known_hosts: str
    ssh_config: str
    hosts: tuple[str, ...]  # members with a Host block, by name
    left_out: dict[str, str]  # member name -> why it has no Host block


def _quoted(path: Path) -> str:
    """`path` as an ssh_config argument: quoted (spaces), '%' doubled (ssh expands %-tokens)."""
    text = str(path)
    if '"' in text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ExportError(f"{text}: ssh_config cannot name a path with quotes or control characters; choose another --out")
    return '"' + text.replace("%", "%%") + '"'


def _sha256_digest(value: str) -> bytes | None:
    """The 32 bytes of an id or fingerprint "SHA256:<base64, unpadded>"; None if it is not one."""
    if not value.startswith("SHA256:"):
        return None
    try:
        digest = base64.b64decode(value.removeprefix("SHA256:") + "=", validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest if len(digest) == 32 and "=" not in value else None


def _checked(host: SshHost) -> tuple[str, tuple[str, ...]] | str:
    """The member's mesh address and host keys, each checked again; else why it is left out."""
    if host.why_none is not None or not host.host_keys:
        return host.why_none or "no verified sshd host keys"
    if _sha256_digest(host.fingerprint) is None:  # it goes into a known_hosts comment
        return f"its fingerprint {host.fingerprint!r} is not SHA256:<base64>"
    try:
        address = str(ipaddress.IPv4Address(host.mesh_ip))
    except ValueError:
        return f"its mesh address {host.mesh_ip!r} is not an IPv4 address"
    try:
        keys = tuple(check_host_key(key, "a host key") for key in host.host_keys)
    except AttestationError as exc:
        return str(exc)
    return address, keys


def network_tag(network: str) -> str:
    """The network's short name in host key aliases: 8 hex digits of its id, "SHA256:<base64>"."""
    digest = _sha256_digest(network)
    if digest is None:
        raise ExportError(f"the daemon named the network {network!r}, not an id SHA256:<base64>")
    return digest[:4].hex()


def render(hosts: SshHosts, out_dir: Path) -> SshExport:
    """Both files for the members in `hosts`, naming `out_dir`/known_hosts (absolute)."""
    tag = network_tag(hosts.network)
    known_hosts_file = _quoted(out_dir.absolute() / KNOWN_HOSTS)
    header = (f"# Written by `tunnelmesh ssh-config` for network {hosts.network}: sshd host keys the members'\n"
              "# identities signed (docs/exports.md). Rewritten whole on each run; do not edit.\n")
    known, config = [], []
    included, left_out = [], {}
    for host in hosts.hosts:
        if not is_name(host.name):
            continue  # cannot be named in either file (the daemon only has valid names)
        checked = _checked(host)
        if isinstance(checked, str):
            left_out[host.name] = checked
            continue
        address, keys = checked
        alias = f"{host.name}.{tag}.tunnelmesh"
        origin = "its identity is its host key" if host.identity_is_host_key else "attested by its identity"
        known.append(f"# {host.name} ({host.fingerprint}): {origin}\n")
        known.extend(f"{alias} {key}\n" for key in keys)
        config.append(
            f"\nHost {host.name} {host.name}.tunnelmesh\n"
            f"    HostName {address}\n"
            f"    HostKeyAlias {alias}\n"
            f"    UserKnownHostsFile {known_hosts_file}\n"
            "    GlobalKnownHostsFile none\n"
            "    StrictHostKeyChecking yes\n"
            "    CheckHostIP no\n"
            "    UpdateHostKeys no\n"
        )
        included.append(host.name)
    notes = header + "".join(f"# {name}: left out: {' '.join(why.split())}\n" for name, why in left_out.items())
    return SshExport(notes + "".join(known), notes + "".join(config), tuple(included), left_out)


def include_line(out_dir: Path) -> str:
    """The line a user adds to ~/.ssh/config (before any Host block) to use the snippet."""
    return f"Include {_quoted(out_dir.absolute() / SSH_CONFIG)}"


def closed_to_others(out_dir: Path) -> tuple[Path, int] | None:
    """The innermost of `out_dir` and its parents that other users cannot pass (no o+x), or
    a written file there they cannot read (no o+r), with its mode; None if they can reach
    both files. Their ssh reads the Include as themselves: in there, it works for root only."""
    for written in (out_dir / KNOWN_HOSTS, out_dir / SSH_CONFIG):
        try:
            mode = written.stat().st_mode
        except OSError:
            continue  # not written yet (--json): write_export makes it 0644
        if not mode & stat.S_IROTH:
            return written, stat.S_IMODE(mode)
    for directory in (out_dir, *out_dir.parents):
        try:
            mode = directory.stat().st_mode
        except OSError:
            continue  # not made yet: write_export makes it 0755
        if not mode & stat.S_IXOTH:
            return directory, stat.S_IMODE(mode)
    return None


def write_export(export: SshExport, out_dir: Path) -> None:
    """Both files into `out_dir` (made 0755 if missing), each replaced all at once, 0644:
    public keys and addresses only."""
    try:
        out_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        files.write_atomic(out_dir / KNOWN_HOSTS, export.known_hosts.encode("ascii"))
        files.write_atomic(out_dir / SSH_CONFIG, export.ssh_config.encode("ascii"))
    except OSError as exc:
        raise ExportError(f"cannot make {out_dir}: {exc.strerror}") from None
    except files.FileError as exc:
        raise ExportError(str(exc)) from None
