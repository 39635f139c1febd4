"""TunnelMesh: a self-hosted mesh VPN speaking the WireGuard protocol, keyed by SSH keys."""

__version__ = "0.1.0"
