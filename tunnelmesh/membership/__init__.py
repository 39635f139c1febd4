"""Who is in the network: the records the admin key signs and every node checks.

- `tunnelmesh.membership.records`: the signed records (network, invite, member,
  revocation, secret, network policy), join tokens, the admin key and sealed secrets;
- `tunnelmesh.membership.auth`: signed coordinator requests and the join proof;
- `tunnelmesh.membership.peermap`: the node's verified peer map and its change set.

The names the rest of tunnelmesh uses are re-exported here.
"""

from tunnelmesh.membership.auth import (
    JOIN_NAMESPACE,
    JOIN_WINDOW,
    REQUEST_NAMESPACE,
    REQUEST_WINDOW,
    ReplayGuard,
    RequestAuth,
    join_proof_message,
    request_message,
    sign_admin_request,
    verify_admin_request,
    verify_join_proof,
    verify_member_request,
)
from tunnelmesh.membership.peermap import (
    MAX_ENDPOINTS,
    Endpoints,
    MapChanges,
    MapSnapshot,
    PeerMap,
    bindings_of,
    parse_address,
    parse_bindings,
    parse_endpoints,
    parse_relay_url,
    reachable_ipv4,
    reachable_unicast,
    relay_address_usable,
)
from tunnelmesh.membership.records import (
    DEFAULT_CIDR,
    MAX_POLICY_TEXT,
    TOKEN_PREFIX,
    AdminKey,
    DeviceEntry,
    Entry,
    InviteGrant,
    MemberEntry,
    MembershipError,
    NetworkInfo,
    PolicyRecord,
    Revocation,
    SecretRecord,
    Token,
    b64,
    canonical,
    check_name,
    device_body,
    key_fingerprint,
    make_invite,
    member_body,
    parse_entry,
    seal,
    sign_member_as_admin,
    sign_member_with_invite,
    unb64,
    unseal,
)

__all__ = [
    "DEFAULT_CIDR", "JOIN_NAMESPACE", "JOIN_WINDOW", "MAX_ENDPOINTS", "MAX_POLICY_TEXT", "REQUEST_NAMESPACE", "REQUEST_WINDOW",
    "TOKEN_PREFIX", "AdminKey", "DeviceEntry", "Endpoints", "Entry", "InviteGrant", "MapChanges", "MapSnapshot",
    "MemberEntry", "MembershipError",
    "NetworkInfo", "PeerMap", "PolicyRecord", "ReplayGuard", "RequestAuth", "Revocation", "SecretRecord", "Token", "b64",
    "bindings_of", "canonical", "check_name", "device_body", "join_proof_message", "key_fingerprint", "make_invite",
    "member_body", "parse_address", "parse_bindings", "parse_endpoints", "parse_entry", "parse_relay_url",
    "reachable_ipv4",
    "reachable_unicast",
    "relay_address_usable", "request_message", "seal", "sign_admin_request", "sign_member_as_admin",
    "sign_member_with_invite", "unb64", "unseal", "verify_admin_request", "verify_join_proof",
    "verify_member_request",
]
