"""STUN Binding (RFC 8489, with RFC 5780's CHANGE-REQUEST, RESPONSE-ORIGIN and
OTHER-ADDRESS) for the NAT prober (client side) and the coordinator's reflection service
(server side). The codec is aioice's `aioice.stun` (its attribute table already has the
RFC 5780 attributes); this module only decides which messages are acceptable and how
large they may be. Sans-IO.

Rules:

- Everything untrusted goes through `parse_binding_response` / `parse_binding_request`,
  which raise `StunError` (a ValueError) for anything but the one message they accept:
  whatever aioice raises on malformed input (ValueError, struct.error) becomes StunError.
- No amplification: the server answers a request with at most as many bytes as the
  request had (`BindingRequest.size`). Its answer is XOR-MAPPED-ADDRESS, then, while they
  fit, OTHER-ADDRESS, RESPONSE-ORIGIN and FINGERPRINT; a request too small for
  XOR-MAPPED-ADDRESS alone gets nothing. So `binding_request` pads its requests (with
  SOFTWARE, which every server may ignore) to `REQUEST_SIZE`, the largest answer
  (three IPv6 addresses and a fingerprint). Nothing the sender chose is echoed except the
  transaction id.
- A server accepts a Binding request whose attributes are CHANGE-REQUEST and
  comprehension-optional ones (0x8000 and up: SOFTWARE, FINGERPRINT, ... ignored, a
  FINGERPRINT is checked). Any other comprehension-required attribute (USERNAME,
  MESSAGE-INTEGRITY, PADDING, RESPONSE-PORT, ...) is refused: RFC 8489 would answer 420,
  but a responder that answers only what it can serve sends no errors at all.
- CHANGE-REQUEST only when asked for: servers without RFC 5780 answer it with 420. A
  client asks for a change only when the server's OTHER-ADDRESS says it can make it.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
from dataclasses import dataclass

from aioice import stun as codec

from .report import Address

__all__ = [
    "REQUEST_SIZE",
    "BindingRequest",
    "BindingResponse",
    "StunError",
    "binding_request",
    "binding_response",
    "looks_like_stun",
    "parse_binding_request",
    "parse_binding_response",
]

HEADER_SIZE = codec.HEADER_LENGTH  # 20: type, length, magic cookie, transaction id
TRANSACTION_ID_SIZE = 12
_COOKIE = struct.pack("!I", codec.COOKIE)
_ATTRIBUTE_HEADER = 4  # type and length
_FINGERPRINT_SIZE = codec.FINGERPRINT_LENGTH  # 8: header and CRC-32
CHANGE_IP, CHANGE_PORT = 0x4, 0x2  # CHANGE-REQUEST flags (RFC 5780 section 7.2)
_CHANGE_REQUEST_TYPE = codec.ATTRIBUTES_BY_NAME["CHANGE-REQUEST"][0]
_COMPREHENSION_OPTIONAL = 0x8000  # attribute types from here on may be ignored (RFC 8489 section 14)

# The largest answer `binding_response` makes: three IPv6 address attributes and a fingerprint.
REQUEST_SIZE = HEADER_SIZE + 3 * (_ATTRIBUTE_HEADER + 4 + 16) + _FINGERPRINT_SIZE
_SOFTWARE = "tunnelmesh (padded to the size of the answer)"


class StunError(ValueError):
    """A datagram that is not the STUN message expected here."""


def looks_like_stun(datagram: bytes) -> bool:
    """Cheap test (no parsing) that `datagram` has a STUN header: the two top bits zero,
    the magic cookie, and a length that is a multiple of 4 and the rest of the datagram."""
    if len(datagram) < HEADER_SIZE or datagram[0] & 0xC0 or datagram[4:8] != _COOKIE:
        return False
    length = int.from_bytes(datagram[2:4], "big")
    return length % 4 == 0 and len(datagram) == HEADER_SIZE + length


def _parse(datagram: bytes) -> codec.Message:
    """aioice's parse, with its errors as StunError, after the header test it skips."""
    if not looks_like_stun(datagram):
        raise StunError("not a STUN message (header, magic cookie or length)")
    try:
        return codec.parse_message(datagram)
    except (ValueError, struct.error) as exc:
        raise StunError(f"malformed STUN message: {exc}") from exc


def _attribute_types(datagram: bytes) -> list[int]:
    """The types of the attributes of a message whose header `looks_like_stun` passed,
    checking that they fill its body exactly (aioice tolerates a truncated last one)."""
    types = []
    position = HEADER_SIZE
    while position < len(datagram):
        if len(datagram) - position < _ATTRIBUTE_HEADER:
            raise StunError("truncated STUN attribute header")
        kind, length = struct.unpack_from("!HH", datagram, position)
        position += _ATTRIBUTE_HEADER + length + codec.padding_length(length)
        if position > len(datagram):
            raise StunError(f"STUN attribute 0x{kind:04x} runs past the end of the message")
        types.append(kind)
    return types


# --- client side -------------------------------------------------------------------------


def binding_request(*, change_ip: bool = False, change_port: bool = False) -> tuple[bytes, bytes]:
    """A new Binding request: (its transaction id, the datagram), `REQUEST_SIZE` bytes long
    so that a server that does not amplify can answer it in full."""
    transaction_id = secrets.token_bytes(TRANSACTION_ID_SIZE)
    attributes: dict[str, object] = {}
    size = HEADER_SIZE + _FINGERPRINT_SIZE
    if change_ip or change_port:
        attributes["CHANGE-REQUEST"] = (CHANGE_IP if change_ip else 0) | (CHANGE_PORT if change_port else 0)
        size += _ATTRIBUTE_HEADER + 4
    # SOFTWARE fills the rest: a multiple of 4, so it has no padding of its own.
    attributes["SOFTWARE"] = _SOFTWARE.ljust(REQUEST_SIZE - size - _ATTRIBUTE_HEADER)
    message = codec.Message(codec.Method.BINDING, codec.Class.REQUEST, transaction_id, attributes)
    message.add_fingerprint()
    return transaction_id, bytes(message)


@dataclass(frozen=True, slots=True)
class BindingResponse:
    """A Binding success response: where the server saw the request come from (`mapped`),
    the address it answered from (`origin`, RESPONSE-ORIGIN) and its other address
    (`other`, OTHER-ADDRESS: RFC 5780's alternate address and port), when it said."""

    transaction_id: bytes
    mapped: Address
    origin: Address | None = None
    other: Address | None = None


def parse_binding_response(datagram: bytes) -> BindingResponse:
    """The Binding success response in `datagram`; StunError for anything else (an error
    response included: the caller treats it as no answer)."""
    message = _parse(datagram)
    if message.message_method != codec.Method.BINDING or message.message_class != codec.Class.RESPONSE:
        raise StunError(f"not a Binding success response: {message.message_method.name} "
                        f"{message.message_class.name}")
    attributes = message.attributes
    mapped = attributes.get("XOR-MAPPED-ADDRESS") or attributes.get("MAPPED-ADDRESS")
    if mapped is None:
        raise StunError("Binding response without a mapped address")
    return BindingResponse(message.transaction_id, mapped, attributes.get("RESPONSE-ORIGIN"),
                           attributes.get("OTHER-ADDRESS"))


# --- server side -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BindingRequest:
    """A Binding request a server may answer; `size` is its length in bytes, the most its
    answer may have."""

    transaction_id: bytes
    change_ip: bool
    change_port: bool
    size: int


def parse_binding_request(datagram: bytes) -> BindingRequest:
    """The Binding request in `datagram`; StunError for anything else (see the module
    header for the attributes a request may have)."""
    message = _parse(datagram)
    if message.message_method != codec.Method.BINDING or message.message_class != codec.Class.REQUEST:
        raise StunError(f"not a Binding request: {message.message_method.name} {message.message_class.name}")
    refused = [kind for kind in _attribute_types(datagram)
               if kind < _COMPREHENSION_OPTIONAL and kind != _CHANGE_REQUEST_TYPE]
    if refused:
        raise StunError("Binding request with attributes this server does not serve: "
                        + ", ".join(f"0x{kind:04x}" for kind in refused))
    flags = message.attributes.get("CHANGE-REQUEST", 0)
    return BindingRequest(message.transaction_id, bool(flags & CHANGE_IP), bool(flags & CHANGE_PORT),
                          len(datagram))


def _address_attribute_size(address: Address) -> int:
    return _ATTRIBUTE_HEADER + 4 + len(ipaddress.ip_address(address[0]).packed)


def binding_response(request: BindingRequest, source: Address, *, origin: Address | None,
                     other: Address | None) -> bytes:
    """The answer to `request`, which came from `source`, sent from `origin` by a server
    whose other address is `other`: no larger than the request (see the module header).
    StunError when the request is too small for even the mapped address."""
    size = HEADER_SIZE + _address_attribute_size(source)
    if size > request.size:
        raise StunError(f"a {request.size}-byte request is too small for a {size}-byte answer")
    attributes: dict[str, object] = {"XOR-MAPPED-ADDRESS": source}
    for name, address in (("OTHER-ADDRESS", other), ("RESPONSE-ORIGIN", origin)):
        if address is not None and size + _address_attribute_size(address) <= request.size:
            attributes[name] = address
            size += _address_attribute_size(address)
    message = codec.Message(codec.Method.BINDING, codec.Class.RESPONSE, request.transaction_id, attributes)
    if size + _FINGERPRINT_SIZE <= request.size:
        message.add_fingerprint()
    return bytes(message)
