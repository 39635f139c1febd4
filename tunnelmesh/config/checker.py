"""Reading and checking a config file: `load_config` / `parse_config` turn TOML into a
`NodeConfig` or raise `ConfigError` naming the file and the line of the offending key,
e.g.::

    /etc/tunnelmesh/tunnelmesh.toml:14: peer "beta": mesh_ip: '100.100.0.300' is not an IPv4 address

Errors never repeat the content of a secret (a value that could be a pasted private
key). See docs/config.md for the reference of every key.

Sans-IO but for `load_config` reading the file: no asyncio, no actors. It imports
``tunnelmesh.identity`` lazily, only when a peer identity line has to be checked, and
``tunnelmesh.filter`` (which imports this package) only for a ``[filter]`` table.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunnelmesh.config.reader import TableReader, type_name
from tunnelmesh.config.model import (
    DEFAULT_COORDINATOR_PORT,
    DEFAULT_INTERFACE,
    DEFAULT_LISTEN_PORT,
    DEFAULT_MESH_PREFIX,
    DEFAULT_MTU,
    DEFAULT_PORT_MAPPING_LIFETIME,
    DEFAULT_PROBE_INTERVAL,
    DEFAULT_RELAY_PORT,
    DEFAULT_SSH_PORT,
    MAX_MTU,
    MAX_PORT_MAPPING_LIFETIME,
    MAX_PROBE_INTERVAL,
    MAX_STUN_SERVERS,
    MIN_MESH_PREFIX,
    MIN_MTU,
    MIN_PORT_MAPPING_LIFETIME,
    MIN_PROBE_INTERVAL,
    PORT_MAPPING_PROTOCOLS,
    RUNG_NAMES,
    WG_KEY_BYTES,
    ConfigError,
    CoordinatorConfig,
    IPNetwork,
    NatConfig,
    NodeConfig,
    PeerConfig,
    RungChoice,
    TransportsConfig,
)
from tunnelmesh.fields import NAME_RULE, FieldError, decode_base64, is_name, parse_endpoint, shown
from tunnelmesh.paths import DEFAULT_HOST_KEY

if TYPE_CHECKING:  # pragma: no cover - import only for type checkers
    from tunnelmesh.coordinator.reflection import ReflectionAddresses
    from tunnelmesh.filter.policy import Rule
    from tunnelmesh.identity import PublicIdentity

#: Refuse config files larger than this (a config is a few KiB at most).
MAX_CONFIG_BYTES = 1 << 20

TOP_KEYS = ("node", "peers", "coordinator", "transports", "filter", "metrics", "nat")
METRICS_KEYS = ("listen",)
NAT_KEYS = ("stun_servers", "probe_interval", "port_mapping", "port_mapping_protocols", "port_mapping_lifetime",
            "public_endpoint")
COORDINATOR_KEYS = ("url", "urls", "serve", "db", "db_password_file", "cluster_url", "ca_file", "trusted_proxies",
                    "tls_fingerprint", "tls_cert", "tls_key", "stun", "stun_alternate")
#: `[coordinator] urls`: a node fails over between at most this many coordinators.
MAX_COORDINATOR_URLS = 16
TRANSPORT_KEYS = ("rungs", "force", "ssh_port", "ssh_bridge_user", "ssh_bridge_port", "relay", "relay_listen",
                  "relay_url", "peers", "sshd_host_keys")
PEER_TRANSPORT_KEYS = ("rungs", "force")
NODE_KEYS = (
    "name",
    "identity",
    "passphrase_file",
    "agent_socket",
    "cache_mesh_key",
    "network_secret_file",
    "mesh_ip",
    "mesh_prefix",
    "listen_port",
    "interface",
    "mtu",
    "offload",
)
PEER_KEYS = (
    "name",
    "identity",
    "wireguard_public_key",
    "mesh_ip",
    "endpoint",
    "persistent_keepalive",
    "allowed_ips",
)

_INTERFACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_FINGERPRINT_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
_TOML_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END_RE = re.compile(r"\s*\(at end of document\)\s*$")


class _Checker(TableReader):
    """The sections of a config, checked with the reader's getters."""

    # -- sections

    def node(self, data: Mapping[str, Any]) -> dict[str, Any]:
        node = self.table(data, "node", NODE_KEYS)
        if node is None:
            raise self.error("missing the [node] table")
        what = "[node]"

        name = self.get_str(node, "name", what, "node", required=True)
        assert name is not None
        if not is_name(name):
            raise self.error(
                f"{what}: name {shown(name)} {NAME_RULE}",
                "node",
                "name",
            )

        identity_value = self.get_str(node, "identity", what, "node")
        if identity_value is None:
            identity = DEFAULT_HOST_KEY
            is_agent = False
        elif identity_value == "agent":
            identity, is_agent = "agent", True
        elif identity_value.startswith("agent:"):
            fingerprint = identity_value[len("agent:") :]
            if _FINGERPRINT_RE.fullmatch(fingerprint) is None:
                raise self.error(
                    f"{what}: identity: {shown(identity_value)} must be \"agent\" or "
                    '"agent:SHA256:<fingerprint>" (as `ssh-add -l` prints it)',
                    "node",
                    "identity",
                )
            identity, is_agent = identity_value, True
        else:
            identity = str(self.to_path(identity_value, f"{what}: identity", "node", "identity"))
            is_agent = False

        passphrase_file = self.get_path(node, "passphrase_file", what, "node")
        if passphrase_file is not None and is_agent:
            raise self.error(
                f"{what}: passphrase_file only applies to a key file identity, not to ssh-agent",
                "node",
                "passphrase_file",
            )
        agent_socket = self.get_path(node, "agent_socket", what, "node")
        cache_mesh_key = node.get("cache_mesh_key", False)
        if not isinstance(cache_mesh_key, bool):
            raise self.error(f"{what}: cache_mesh_key must be true or false, not {type_name(cache_mesh_key)}",
                             "node", "cache_mesh_key")
        for key, used in (("agent_socket", agent_socket is not None), ("cache_mesh_key", cache_mesh_key)):
            if used and not is_agent:
                raise self.error(f"{what}: {key} only applies to an ssh-agent identity (identity = \"agent:...\")",
                                 "node", key)
        secret = self.get_path(node, "network_secret_file", what, "node")
        if secret is None:
            secret = self.state_dir / "network.secret"

        mesh_ip: ipaddress.IPv4Address | None = None
        mesh_prefix = DEFAULT_MESH_PREFIX
        if "coordinator" in data:
            for key in ("mesh_ip", "mesh_prefix"):
                if key in node:
                    raise self.error(
                        f"{what}: {key} is assigned by the coordinator; remove it (or remove [coordinator] "
                        "for a static mesh)", "node", key,
                    )
        else:
            mesh_ip = self.get_ipv4(node, "mesh_ip", what, "node")
            mesh_prefix = self.get_int(
                node, "mesh_prefix", what, "node", default=DEFAULT_MESH_PREFIX, lo=MIN_MESH_PREFIX, hi=32
            )
            net = ipaddress.IPv4Network(f"{mesh_ip}/{mesh_prefix}", strict=False)
            if mesh_prefix <= 30 and mesh_ip in (net.network_address, net.broadcast_address):
                kind = "network" if mesh_ip == net.network_address else "broadcast"
                raise self.error(f"{what}: mesh_ip {mesh_ip} is the {kind} address of {net}", "node", "mesh_ip")
        listen_port = self.get_int(
            node, "listen_port", what, "node", default=DEFAULT_LISTEN_PORT, lo=0, hi=65535, hint=" (0 = random)"
        )
        interface = self.get_str(node, "interface", what, "node")
        if interface is None:
            interface = DEFAULT_INTERFACE
        elif _INTERFACE_RE.fullmatch(interface) is None or interface in (".", ".."):
            raise self.error(
                f"{what}: interface {shown(interface)} must be 1 to 15 characters of A-Z, a-z, 0-9, '_', '.', '-'",
                "node",
                "interface",
            )
        mtu = self.get_int(node, "mtu", what, "node", default=DEFAULT_MTU, lo=MIN_MTU, hi=MAX_MTU)
        offload = node.get("offload", True)
        if not isinstance(offload, bool):
            raise self.error(f"{what}: offload must be true or false, not {type_name(offload)}", "node", "offload")
        return dict(
            path=self.path.absolute(),
            name=name,
            identity=identity,
            passphrase_file=passphrase_file,
            agent_socket=agent_socket,
            cache_mesh_key=cache_mesh_key,
            network_secret_file=secret,
            mesh_ip=mesh_ip,
            mesh_prefix=mesh_prefix,
            listen_port=listen_port,
            interface=interface,
            mtu=mtu,
            offload=offload,
        )

    def table(self, data: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        """The top-level table `key` with only `allowed` keys, or None if absent."""
        if key not in data:
            return None
        table = data[key]
        if not isinstance(table, dict):
            raise self.error(f"{key} must be a table ([{key}]), not {type_name(table)}", key)
        self.check_keys(table, allowed, f"[{key}]", key)
        return table

    def coordinator(self, data: Mapping[str, Any]) -> CoordinatorConfig | None:
        table = self.table(data, "coordinator", COORDINATOR_KEYS)
        if table is None:
            return None
        what = "[coordinator]"
        urls = self.coordinator_urls(table, what)
        serve = None
        serve_value = self.get_str(table, "serve", what, "coordinator")
        if serve_value is not None:
            try:
                serve = parse_endpoint(serve_value, ipv4_only=True)
            except FieldError:
                raise self.error(
                    f"{what}: serve {shown(serve_value)} must be IPv4:port, e.g. \"0.0.0.0:{DEFAULT_COORDINATOR_PORT}\"",
                    "coordinator", "serve",
                ) from None
        db = self.coordinator_db(table, what)
        db_password_file = self.get_path(table, "db_password_file", what, "coordinator")
        cluster_url = self.get_str(table, "cluster_url", what, "coordinator")
        for key, value in (("db_password_file", db_password_file), ("cluster_url", cluster_url)):
            if value is not None and not isinstance(db, str):
                raise self.error(f"{what}: {key} goes with a PostgreSQL db (postgresql://...), not a SQLite file",
                                 "coordinator", key)
        ca_file = self.get_path(table, "ca_file", what, "coordinator")
        proxies = table.get("trusted_proxies", [])
        try:
            if not isinstance(proxies, list) or not all(isinstance(p, str) for p in proxies):
                raise ValueError
            trusted = frozenset(str(ipaddress.ip_address(p)) for p in proxies)
        except ValueError:
            raise self.error(f"{what}: trusted_proxies must be a list of IP addresses, e.g. [\"192.0.2.9\"]",
                             "coordinator", "trusted_proxies") from None
        if trusted and serve is None:
            raise self.error(f"{what}: trusted_proxies is for the embedded coordinator (needs serve)",
                             "coordinator", "trusted_proxies")
        pin = self.tls_fingerprint(table, what, urls, ca_file)
        tls_cert = self.get_path(table, "tls_cert", what, "coordinator")
        tls_key = self.get_path(table, "tls_key", what, "coordinator")
        for key, value in (("tls_cert", tls_cert), ("tls_key", tls_key)):
            if value is not None and serve is None:
                raise self.error(f"{what}: {key} is for the embedded coordinator (needs serve)", "coordinator", key)
        if (tls_cert is None) != (tls_key is None):
            key = "tls_key" if tls_key is None else "tls_cert"
            raise self.error(f"{what}: tls_cert and tls_key go together (the certificate and its key); {key} is missing",
                             "coordinator", "tls_cert" if tls_cert is not None else "tls_key")
        return CoordinatorConfig(url=urls[0], urls=urls, serve=serve, db=db, ca_file=ca_file, trusted_proxies=trusted,
                                 tls_fingerprint=pin, tls_cert=tls_cert, tls_key=tls_key, stun=self.stun(table, serve),
                                 db_password_file=db_password_file, cluster_url=cluster_url)

    def coordinator_db(self, table: Mapping[str, Any], what: str) -> Path | str:
        """`db`: the embedded coordinator's SQLite file (default: in the state directory), or
        a PostgreSQL connection string (several coordinators share it), kept as written. A
        password written in it is refused: db_password_file holds it."""
        value = self.get_str(table, "db", what, "coordinator")
        if value is None:
            return self.state_dir / "coordinator.db"
        from tunnelmesh.coordinator.store import StoreError, is_postgres  # lazily: a node without db= needs neither

        try:
            postgres = is_postgres(value)
        except StoreError as exc:
            raise self.error(f"{what}: db: {str(exc).removeprefix('--db ')}", "coordinator", "db") from None
        if not postgres:
            return self.to_path(value, f"{what}: db", "coordinator", "db")
        try:
            parts = urllib.parse.urlsplit(value)
            has_password = parts.password is not None or "password=" in parts.query.lower()
        except ValueError:
            raise self.error(f"{what}: db is not a PostgreSQL connection string, e.g. "
                             "\"postgresql://tunnelmesh@db.example/tunnelmesh\"", "coordinator", "db") from None
        if has_password:
            raise self.error(f"{what}: db holds a password: take it out and put it in a file named by "
                             "db_password_file (mode 0600)", "coordinator", "db")
        return value

    def coordinator_urls(self, table: Mapping[str, Any], what: str) -> tuple[str, ...]:
        """`url`, or `urls` (several coordinators of one network, in order of preference):
        exactly one of the two; each http(s)://host:port, without its trailing slash."""
        if "url" in table and "urls" in table:
            raise self.error(f"{what}: url and urls both say where the coordinator is: keep one (urls for several "
                             "coordinators, url for one)", "coordinator", "urls")
        if "urls" in table:
            key, values = "urls", table["urls"]
            if not isinstance(values, list) or not values or len(values) > MAX_COORDINATOR_URLS:
                raise self.error(f"{what}: urls must be a list of 1 to {MAX_COORDINATOR_URLS} URLs, e.g. "
                                 '["https://c1.example.org:7400", "https://c2.example.org:7400"]', "coordinator", "urls")
        elif "url" in table:
            key, values = "url", [table["url"]]
        else:
            raise self.error(f"{what}: missing required key 'url' (or 'urls' for several coordinators)", "coordinator")
        urls: list[str] = []
        for index, value in enumerate(values):
            where = ("coordinator", key, index) if key == "urls" else ("coordinator", key)
            if not isinstance(value, str):
                raise self.error(f"{what}: {key} must be {'strings' if key == 'urls' else 'a string'}, not "
                                 f"{type_name(value)}", *where)
            try:
                parsed = urllib.parse.urlsplit(value)
                usable = parsed.scheme in ("http", "https") and bool(parsed.hostname) and parsed.port != 0
            except ValueError:  # a bracketed host that is no IPv6 address, a port out of range
                usable = False
            if not usable:
                raise self.error(f"{what}: {key} {shown(value)} must be http://host:port or https://host:port", *where)
            if value.rstrip("/") in urls:
                raise self.error(f"{what}: urls lists {shown(value)} twice", *where)
            urls.append(value.rstrip("/"))
        return tuple(urls)

    def stun(self, table: Mapping[str, Any], serve: tuple[str, int] | None) -> ReflectionAddresses | None:
        """`stun` and `stun_alternate`: the embedded coordinator's STUN reflection (on by default)."""
        from tunnelmesh.coordinator.reflection import StunSettingError, reflection_addresses  # lazily: aiohttp

        try:
            return reflection_addresses(table.get("stun"), table.get("stun_alternate"), serve)
        except StunSettingError as exc:
            raise self.error(f"[coordinator]: {exc}", "coordinator", exc.key) from None

    def tls_fingerprint(self, table: Mapping[str, Any], what: str, urls: tuple[str, ...], ca_file: Path | None
                        ) -> str | None:
        """The pin, one for every coordinator of the list (they serve the same certificate)."""
        value = self.get_str(table, "tls_fingerprint", what, "coordinator")
        if value is None:
            return None
        from tunnelmesh.tls import parse_pin  # lazily, as membership below

        try:
            pin = parse_pin(value)
        except ValueError:
            raise self.error(f"{what}: tls_fingerprint {shown(value)} must be \"sha256:\" and 64 hex digits (the SHA-256 "
                             "of the coordinator's certificate)", "coordinator", "tls_fingerprint") from None
        plain = [url for url in urls if urllib.parse.urlsplit(url).scheme != "https"]
        if plain:
            raise self.error(f"{what}: tls_fingerprint needs an https:// url (over http:// there is no certificate "
                             f"to check it against), not {shown(plain[0])}", "coordinator", "tls_fingerprint")
        if ca_file is not None:
            raise self.error(f"{what}: tls_fingerprint and ca_file both say which certificate to trust: keep one "
                             "(tls_fingerprint for the coordinator's own certificate, ca_file for a TLS proxy's)",
                             "coordinator", "tls_fingerprint")
        return pin

    def rung_choice(self, table: Mapping[str, Any], what: str, *where: Any, base: RungChoice) -> RungChoice:
        rungs = base.rungs
        if "rungs" in table:
            value = table["rungs"]
            if not isinstance(value, list) or not value or any(r not in RUNG_NAMES for r in value) \
                    or len(set(value)) != len(value):
                raise self.error(f"{what}: rungs must be a non-empty list of distinct rungs from "
                                 f"{', '.join(map(repr, RUNG_NAMES))}, e.g. [\"udp\", \"relay\"]", *where, "rungs")
            rungs = tuple(r for r in RUNG_NAMES if r in value)
        force = self.get_str(table, "force", what, *where)
        if force is not None and force not in rungs:
            raise self.error(f"{what}: force {shown(force)} must be one of the enabled rungs "
                             f"({', '.join(rungs)})", *where, "force")
        return RungChoice(rungs=rungs, force=force)

    def transports(self, data: Mapping[str, Any], coordinator: CoordinatorConfig | None) -> TransportsConfig:
        table = self.table(data, "transports", TRANSPORT_KEYS)
        if table is None:
            return TransportsConfig()
        what = "[transports]"
        default = self.rung_choice(table, what, "transports", base=RungChoice())
        if coordinator is None and default.enabled != ("udp",) and ("rungs" in table or "force" in table):
            raise self.error(f"{what}: the SSH and relay rungs need a [coordinator] (a static mesh is UDP only)",
                             "transports")
        peers: dict[str, RungChoice] = {}
        raw_peers = table.get("peers", {})
        if not isinstance(raw_peers, dict):
            raise self.error(f"{what}: peers must be tables, e.g. [transports.peers.beta]", "transports", "peers")
        for name, raw in raw_peers.items():
            where = ("transports", "peers", name)
            label = f"[transports.peers.{name}]"
            if not isinstance(raw, dict):
                raise self.error(f"{label} must be a table", *where)
            self.check_keys(raw, PEER_TRANSPORT_KEYS, label, *where)
            peers[name] = self.rung_choice(raw, label, *where, base=default)
        ssh_port = self.get_int(table, "ssh_port", what, "transports", default=DEFAULT_SSH_PORT, lo=0, hi=65535,
                                hint=" (0 = serve no SSH)")
        bridge_user = self.get_str(table, "ssh_bridge_user", what, "transports")
        if bridge_user is not None and re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", bridge_user) is None:
            raise self.error(f"{what}: ssh_bridge_user {shown(bridge_user)} is not a valid account name",
                             "transports", "ssh_bridge_user")
        bridge_port = self.get_int(table, "ssh_bridge_port", what, "transports", default=22, lo=1, hi=65535)
        relay_listen, relay_url = self.relay_service(table, what, coordinator)
        sshd_host_keys = table.get("sshd_host_keys")
        if sshd_host_keys is not None and (not isinstance(sshd_host_keys, list)
                                           or not all(isinstance(path, str) for path in sshd_host_keys)):
            raise self.error(f"{what}: sshd_host_keys must be a list of public key files, e.g. "
                             '["/etc/ssh/ssh_host_ed25519_key.pub"]', "transports", "sshd_host_keys")
        return TransportsConfig(default=default, peers=peers, ssh_port=ssh_port, ssh_bridge_user=bridge_user,
                                ssh_bridge_port=bridge_port, relay_listen=relay_listen, relay_url=relay_url,
                                sshd_host_keys=None if sshd_host_keys is None else tuple(
                                    self.to_path(path, f"{what}: sshd_host_keys", "transports", "sshd_host_keys")
                                    for path in sshd_host_keys))

    def relay_service(self, table: Mapping[str, Any], what: str, coordinator: CoordinatorConfig | None
                      ) -> tuple[tuple[str, int] | None, str | None]:
        """`relay = true` and where it listens and is reached; (None, None) without it."""
        serve = table.get("relay", False)
        if not isinstance(serve, bool):
            raise self.error(f"{what}: relay must be true or false, not {type_name(serve)}", "transports", "relay")
        listen_value = self.get_str(table, "relay_listen", what, "transports")
        url = self.get_str(table, "relay_url", what, "transports")
        if not serve:
            for key in ("relay_listen", "relay_url"):
                if key in table:
                    raise self.error(f"{what}: {key} needs relay = true", "transports", key)
            return None, None
        if coordinator is None:
            raise self.error(f"{what}: relay = true needs a [coordinator] (members find the relay in the peer map)",
                             "transports", "relay")
        from tunnelmesh.membership import MembershipError, parse_relay_url  # lazily, as identity below

        listen = ("0.0.0.0", DEFAULT_RELAY_PORT)
        if listen_value is not None:
            try:
                listen = parse_endpoint(listen_value, ipv4_only=True)
            except FieldError:
                raise self.error(f"{what}: relay_listen {shown(listen_value)} must be IPv4:port, "
                                 f"e.g. \"0.0.0.0:{DEFAULT_RELAY_PORT}\"", "transports", "relay_listen") from None
        if url is not None:
            try:
                url = parse_relay_url(url)
            except MembershipError as exc:
                raise self.error(f"{what}: relay_url: {exc}", "transports", "relay_url") from None
        return listen, url

    def metrics_listen(self, data: Mapping[str, Any]) -> tuple[str, int] | None:
        """`[metrics]`: where to serve them (loopback unless `listen` says), or None without the table."""
        table = self.table(data, "metrics", METRICS_KEYS)
        if table is None:
            return None
        from tunnelmesh.metrics import DEFAULT_METRICS_LISTEN, parse_listen  # lazily: aiohttp and prometheus

        listen = self.get_str(table, "listen", "[metrics]", "metrics")
        if listen is None:
            return DEFAULT_METRICS_LISTEN
        try:
            return parse_listen(listen)
        except FieldError as exc:
            raise self.error(f"[metrics]: listen {exc}", "metrics", "listen") from None

    def nat(self, data: Mapping[str, Any]) -> NatConfig:
        """`[nat]`: the NAT prober's extra STUN servers ("host:port") and its interval."""
        table = self.table(data, "nat", NAT_KEYS)
        if table is None:
            return NatConfig()
        servers = table.get("stun_servers", [])
        if not isinstance(servers, list) or not all(isinstance(server, str) for server in servers):
            raise self.error('[nat]: stun_servers must be a list of "host:port", e.g. ["stun.example.org:3478"]',
                             "nat", "stun_servers")
        if len(servers) > MAX_STUN_SERVERS:
            raise self.error(f"[nat]: stun_servers: at most {MAX_STUN_SERVERS}", "nat", "stun_servers")
        for server in servers:
            try:
                parse_endpoint(server)
            except FieldError as exc:
                raise self.error(f"[nat]: stun_servers: {shown(server)}: {exc}", "nat", "stun_servers") from None
        interval = self.get_int(table, "probe_interval", "[nat]", "nat", default=DEFAULT_PROBE_INTERVAL,
                                lo=MIN_PROBE_INTERVAL, hi=MAX_PROBE_INTERVAL, hint=" seconds")
        public = self.get_str(table, "public_endpoint", "[nat]", "nat")
        try:
            public_endpoint = None if public is None else parse_endpoint(public, ipv4_only=True)
        except FieldError as exc:
            raise self.error(f"[nat]: public_endpoint {shown(public)}: {exc} (e.g. \"198.51.100.7:51820\")", "nat",
                             "public_endpoint") from None
        return NatConfig(stun_servers=tuple(servers), probe_interval=interval, public_endpoint=public_endpoint,
                         **self.port_mapping(table))

    def port_mapping(self, table: Mapping[str, Any]) -> dict[str, Any]:
        """`[nat]`'s port_mapping (bool), port_mapping_protocols and port_mapping_lifetime."""
        enabled = table.get("port_mapping", True)
        if not isinstance(enabled, bool):
            raise self.error(f"[nat]: port_mapping must be true or false, not {type_name(enabled)}", "nat",
                             "port_mapping")
        protocols = table.get("port_mapping_protocols", list(PORT_MAPPING_PROTOCOLS))
        if (not isinstance(protocols, list) or not protocols or len(set(protocols)) != len(protocols)
                or not all(protocol in PORT_MAPPING_PROTOCOLS for protocol in protocols)):
            raise self.error(f"[nat]: port_mapping_protocols must be a list of distinct names out of "
                             f"{', '.join(map(repr, PORT_MAPPING_PROTOCOLS))}", "nat", "port_mapping_protocols")
        lifetime = self.get_int(table, "port_mapping_lifetime", "[nat]", "nat", default=DEFAULT_PORT_MAPPING_LIFETIME,
                                lo=MIN_PORT_MAPPING_LIFETIME, hi=MAX_PORT_MAPPING_LIFETIME, hint=" seconds")
        return {"port_mapping": enabled, "port_mapping_protocols": tuple(protocols), "port_mapping_lifetime": lifetime}

    def filter_rules(self, data: Mapping[str, Any]) -> tuple[Rule, ...] | None:
        """The ``[filter]`` table's ``[[filter.allow]]`` rules (docs/filter.md), None without one."""
        if "filter" not in data:
            return None
        from tunnelmesh.filter.policy import parse_node_rules

        return parse_node_rules(data["filter"], self.loc, self.path)

    def endpoint(self, value: str, what: str, index: int) -> tuple[str, int]:
        try:
            return parse_endpoint(value)
        except FieldError as exc:
            raise self.error(f"{what}: endpoint {shown(value)}: {exc}", "peers", index, "endpoint") from None

    def peer(self, raw: Any, index: int) -> PeerConfig:
        where = ("peers", index)
        what = f"peer #{index + 1}"
        if not isinstance(raw, dict):
            raise self.error(f"{what} must be a table, not {type_name(raw)}", *where)
        self.check_keys(raw, PEER_KEYS, what, *where)
        name = self.get_str(raw, "name", what, *where, required=True)
        assert name is not None
        if not is_name(name):
            raise self.error(
                f"{what}: name {shown(name)} {NAME_RULE}",
                *where,
                "name",
            )
        what = f"peer {name!r}"

        line_text = self.get_str(raw, "identity", what, *where)
        key_text = self.get_str(raw, "wireguard_public_key", what, *where)
        if line_text is not None and key_text is not None:
            raise self.error(
                f"{what}: give either identity (a tunnelmesh peer) or wireguard_public_key "
                "(a plain WireGuard peer), not both",
                *where,
                "wireguard_public_key",
            )
        identity: PublicIdentity | None = None
        if line_text is not None:
            identity = self.identity_line(line_text, what, *where, "identity")
            wg_key = bytes(identity.wg_public_key)
        elif key_text is not None:
            decoded = decode_base64(key_text.strip(), WG_KEY_BYTES)
            if decoded is None:
                # The value is not shown: it might be a private key pasted by mistake.
                raise self.error(
                    f"{what}: wireguard_public_key must be the base64 of 32 bytes (as `wg pubkey` prints it)",
                    *where,
                    "wireguard_public_key",
                )
            if decoded == bytes(32):
                raise self.error(f"{what}: wireguard_public_key is all zeros", *where, "wireguard_public_key")
            wg_key = decoded
        else:
            raise self.error(
                f"{what}: needs identity (a tunnelmesh peer's identity line) or "
                "wireguard_public_key (a plain WireGuard peer)",
                *where,
            )
        if len(wg_key) != WG_KEY_BYTES:
            raise self.error(f"{what}: identity carries a WireGuard key of the wrong length", *where, "identity")

        mesh_ip = self.get_ipv4(raw, "mesh_ip", what, *where)
        endpoint_text = self.get_str(raw, "endpoint", what, *where)
        endpoint = None if endpoint_text is None else self.endpoint(endpoint_text, what, index)
        keepalive = self.get_int(
            raw, "persistent_keepalive", what, *where, default=0, lo=0, hi=65535, hint=" seconds (0 = off)"
        )

        mesh_net = ipaddress.IPv4Network(f"{mesh_ip}/32")
        allowed: list[IPNetwork] = [mesh_net]
        if "allowed_ips" in raw:
            items = raw["allowed_ips"]
            if not isinstance(items, list):
                raise self.error(
                    f"{what}: allowed_ips must be an array of strings, not {type_name(items)}",
                    *where,
                    "allowed_ips",
                )
            for n, item in enumerate(items):
                if not isinstance(item, str):
                    raise self.error(
                        f"{what}: allowed_ips entries must be strings, not {type_name(item)}",
                        *where,
                        "allowed_ips",
                        n,
                    )
                try:
                    net = ipaddress.ip_network(item, strict=True)
                except ValueError as exc:
                    hint = ""
                    if "host bits set" in str(exc):
                        hint = f" (host bits set; did you mean {ipaddress.ip_network(item, strict=False)}?)"
                    raise self.error(
                        f"{what}: allowed_ips: {shown(item)} is not an IP network{hint}",
                        *where,
                        "allowed_ips",
                        n,
                    ) from None
                if net not in allowed:
                    allowed.append(net)

        return PeerConfig(
            name=name,
            mesh_ip=mesh_ip,
            identity=identity,
            wireguard_public_key=wg_key,
            endpoint=endpoint,
            persistent_keepalive=keepalive,
            allowed_ips=tuple(allowed),
            line=self.loc.line_of(*where) or 1,
        )

    def identity_line(self, text: str, what: str, *where: Any) -> PublicIdentity:
        try:
            from tunnelmesh.identity import IdentityError, PublicIdentity
        except Exception as exc:  # noqa: BLE001 - report, never crash
            raise self.error(
                f"{what}: cannot check the identity line: tunnelmesh.identity is unavailable ({type(exc).__name__})",
                *where,
            ) from None
        try:
            return PublicIdentity.from_line(text.strip())
        except IdentityError as exc:
            raise self.error(f"{what}: identity: {exc}", *where) from None
        except Exception as exc:  # noqa: BLE001 - a malformed line must be a ConfigError
            raise self.error(f"{what}: identity: not a valid identity line ({type(exc).__name__})", *where) from None

    def peers(self, data: Mapping[str, Any], node: Mapping[str, Any]) -> tuple[PeerConfig, ...]:
        raw = data.get("peers", [])
        if not isinstance(raw, list):
            raise self.error(
                f"peers must be an array of tables (write [[peers]]), not {type_name(raw)}",
                "peers",
            )
        result: list[PeerConfig] = []
        names: dict[str, PeerConfig] = {}
        ips: dict[ipaddress.IPv4Address, PeerConfig] = {}
        keys: dict[bytes, PeerConfig] = {}
        routes: dict[IPNetwork, PeerConfig] = {}
        own_ip: ipaddress.IPv4Address = node["mesh_ip"]
        own_net = ipaddress.IPv4Network(f"{own_ip}/32")
        for index, item in enumerate(raw):
            peer = self.peer(item, index)
            where = ("peers", index)
            what = f"peer {peer.name!r}"
            if peer.name == node["name"]:
                raise self.error(f"{what}: has the name of this node", *where, "name")
            if peer.name in names:
                raise self.error(
                    f"{what}: duplicate peer name (first at line {names[peer.name].line})", *where, "name"
                )
            if peer.mesh_ip == own_ip:
                raise self.error(f"{what}: mesh_ip {peer.mesh_ip} is this node's own mesh_ip", *where, "mesh_ip")
            if peer.mesh_ip in ips:
                other = ips[peer.mesh_ip]
                raise self.error(
                    f"{what}: mesh_ip {peer.mesh_ip} is already used by peer {other.name!r} (line {other.line})",
                    *where,
                    "mesh_ip",
                )
            if peer.wireguard_public_key in keys:
                other = keys[peer.wireguard_public_key]
                raise self.error(
                    f"{what}: has the same WireGuard key as peer {other.name!r} (line {other.line}); "
                    "cloned machines?",
                    *where,
                )
            for net in peer.allowed_ips:
                if net == own_net:
                    raise self.error(
                        f"{what}: allowed_ips: {net} is this node's own mesh address", *where, "allowed_ips"
                    )
                if net in routes:
                    other = routes[net]
                    raise self.error(
                        f"{what}: allowed_ips: {net} is already routed via peer {other.name!r} (line {other.line})",
                        *where,
                        "allowed_ips" if net != ipaddress.ip_network(f"{peer.mesh_ip}/32") else "mesh_ip",
                    )
            names[peer.name] = peer
            ips[peer.mesh_ip] = peer
            keys[peer.wireguard_public_key] = peer
            for net in peer.allowed_ips:
                routes[net] = peer
            result.append(peer)
        return tuple(result)


def _toml_syntax_error(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    message = str(exc)
    line: int | None = None
    m = _TOML_POS_RE.search(message)
    if m:
        line = int(m.group(1))
        message = f"{message[: m.start()]} (column {m.group(2)})"
    else:
        m = _TOML_END_RE.search(message)
        if m:
            line = text.count("\n") + 1
            message = f"{message[: m.start()]} (at end of file)"
    return ConfigError(path, line, f"invalid TOML: {message}")


# --------------------------------------------------------------------------- API


def parse_config(text: str, *, path: Path, state_dir: Path) -> NodeConfig:
    """Check the text of a config file; ``path`` is used for messages and to resolve
    relative paths. Raises ``ConfigError`` only."""
    path = Path(path)
    try:
        if text.startswith("\ufeff"):
            text = text[1:]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _toml_syntax_error(path, text, exc) from None
        except RecursionError:
            raise ConfigError(path, None, "invalid TOML: nested too deeply") from None
        except ValueError as exc:  # e.g. integers beyond Python's digit limit
            raise ConfigError(path, None, f"invalid TOML: {exc}") from None

        checker = _Checker(path, text, state_dir)
        checker.check_keys(data, TOP_KEYS, "top level")
        node = checker.node(data)
        coordinator = checker.coordinator(data)
        if coordinator is not None and data.get("peers"):
            raise checker.error("[[peers]] are not used with a [coordinator]: it tells this node its peers", "peers")
        peers = checker.peers(data, node) if coordinator is None else ()
        transports = checker.transports(data, coordinator)
        return NodeConfig(peers=peers, coordinator=coordinator, transports=transports,
                          filter_rules=checker.filter_rules(data), metrics_listen=checker.metrics_listen(data),
                          nat=checker.nat(data), **node)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(path, None, "config nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - load_config promises ConfigError only
        raise ConfigError(path, None, f"cannot check config: internal error ({type(exc).__name__})") from None


def load_config(path: Path, *, state_dir: Path) -> NodeConfig:
    """Read and check a config file. Raises ``ConfigError`` only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(path, None, f"cannot read config: {reason}") from None
    except (ValueError, TypeError) as exc:  # e.g. a NUL in the path
        raise ConfigError(path, None, f"cannot read config: {exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(path, None, f"config file is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(path, line, "config is not valid UTF-8") from None
    return parse_config(text, path=path, state_dir=state_dir)


def check_peer_keys(config: NodeConfig, own_wg_public_key: bytes) -> None:
    """Refuse a config that lists this node itself as a peer (same WireGuard key);
    call once the node's identity is loaded."""
    own = bytes(own_wg_public_key)
    for peer in config.peers:
        if peer.wireguard_public_key == own:
            raise ConfigError(
                config.path,
                peer.line,
                f"peer {peer.name!r} uses this node's own key (cloned machines, or this node listed as its own peer?)",
            )
