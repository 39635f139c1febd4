"""Where a node keeps its files.

Everything a running node writes (control socket, pid file, log, network secret,
dedicated key) lives under one *state directory*, so several nodes can run on one
machine -- e.g. in network namespaces, which do not separate ``/run`` or ``/var`` --
by giving each its own ``--state-dir`` and nothing else. Nothing here defaults to a
machine-global path once a state directory has been given.

Precedence (each of the two settings on its own): explicit argument, then the
environment (``TUNNELMESH_STATE_DIR`` / ``TUNNELMESH_CONFIG``), then the defaults.
If no config is given (neither argument nor environment) but a state directory is
(argument or environment), the config is ``<state_dir>/tunnelmesh.toml``.
Empty strings count as "not given".
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = "/var/lib/tunnelmesh"
DEFAULT_CONFIG = "/etc/tunnelmesh/tunnelmesh.toml"
#: The SSH host key a node uses as its identity unless its config says otherwise.
DEFAULT_HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"

ENV_STATE_DIR = "TUNNELMESH_STATE_DIR"
ENV_CONFIG = "TUNNELMESH_CONFIG"

CONFIG_NAME = "tunnelmesh.toml"


@dataclass(frozen=True)
class Paths:
    """The files of one node. All derived paths are inside ``state_dir``."""

    state_dir: Path
    config: Path

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "tunnelmesh.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "tunnelmesh.log"

    @property
    def network_secret(self) -> Path:
        """Default location of the network secret (a config may point elsewhere)."""
        return self.state_dir / "network.secret"

    @property
    def network_state(self) -> Path:
        """The network this node joined: coordinator URL, pinned network record, own entry."""
        return self.state_dir / "network.json"

    @property
    def peer_map_cache(self) -> Path:
        """The last verified peer map, with every revocation seen (kept for good)."""
        return self.state_dir / "peermap.json"

    @property
    def revocations(self) -> Path:
        """Every revocation this node has seen, kept for good (beside the cache)."""
        return self.state_dir / "revocations.json"

    @property
    def admin_key(self) -> Path:
        """The network's admin key, on the machine that ran `tunnelmesh init` only."""
        return self.state_dir / "admin.key"

    @property
    def invites(self) -> Path:
        """The admin's invite ledger: every invite made here and whom it admitted (admin only)."""
        return self.state_dir / "invites.json"

    @property
    def dedicated_key(self) -> Path:
        """A key generated for this node when it does not use an existing SSH key."""
        return self.state_dir / "identity_ed25519"

    @property
    def bridge_socket(self) -> Path:
        """Where `tunnelmesh ssh-bridge` (sshd's forced command) reaches the daemon."""
        return self.state_dir / "bridge.sock"

    @property
    def ssh_host_key(self) -> Path:
        """The host key of this daemon's SSH rung (made at init; attested by the identity)."""
        return self.state_dir / "ssh_host_ed25519_key"


def _absolute(p: str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(p)))


def resolve_paths(
    state_dir: str | None,
    config: str | None,
    environ: Mapping[str, str] = os.environ,
) -> Paths:
    """Resolve the state directory and config file of a node (see module docstring).

    Returned paths are absolute, so a daemon that changes directory keeps them valid.
    """
    chosen_state = state_dir or environ.get(ENV_STATE_DIR) or None
    chosen_config = config or environ.get(ENV_CONFIG) or None

    state = _absolute(chosen_state) if chosen_state else Path(DEFAULT_STATE_DIR)
    if chosen_config:
        cfg = _absolute(chosen_config)
    elif chosen_state:
        cfg = state / CONFIG_NAME
    else:
        cfg = Path(DEFAULT_CONFIG)
    return Paths(state_dir=state, config=cfg)
