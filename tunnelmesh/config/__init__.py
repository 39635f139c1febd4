"""The node configuration file (TOML) and the static mesh's network secret file.

- `tunnelmesh.config.model`: `NodeConfig` and its parts, the defaults, `ConfigError`;
- `tunnelmesh.config.locator`: `Locator`, the line of each key of a TOML text;
- `tunnelmesh.config.checker`: `load_config` / `parse_config`, every field check;
- `tunnelmesh.config.secret`: read and write the network secret file;
- `tunnelmesh.config.starter`: the commented starter config.

The names the rest of tunnelmesh uses are re-exported here.
"""

from tunnelmesh.config.checker import NODE_KEYS, PEER_KEYS, check_peer_keys, load_config, parse_config
from tunnelmesh.config.locator import Locator
from tunnelmesh.config.model import (
    DEFAULT_COORDINATOR_PORT,
    DEFAULT_RELAY_PORT,
    DEFAULT_SSH_PORT,
    NETWORK_SECRET_BYTES,
    RUNG_NAMES,
    ConfigError,
    CoordinatorConfig,
    NodeConfig,
    PeerConfig,
    RungChoice,
    UDP_ONLY,
    TransportsConfig,
)
from tunnelmesh.config.secret import read_network_secret, write_network_secret
from tunnelmesh.config.starter import starter_config
from tunnelmesh.paths import DEFAULT_HOST_KEY

__all__ = [
    "DEFAULT_COORDINATOR_PORT", "DEFAULT_HOST_KEY", "DEFAULT_RELAY_PORT", "DEFAULT_SSH_PORT", "NETWORK_SECRET_BYTES",
    "NODE_KEYS", "PEER_KEYS", "RUNG_NAMES", "ConfigError", "CoordinatorConfig", "Locator", "NodeConfig",
    "PeerConfig", "RungChoice", "TransportsConfig", "UDP_ONLY", "check_peer_keys", "load_config", "parse_config",
    "read_network_secret", "starter_config", "write_network_secret",
]
