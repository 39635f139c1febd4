"""NAT-PMP (RFC 6886): the messages a client sends to its gateway's UDP port 5351 and
the answers it parses. Sans-IO: bytes in, records out; the exchange is in client.py.

Hand-written because no maintained Python library speaks it (PyPI's `nat-pmp` is a
synchronous 2021 module). Parsing is strict: anything but a well-formed answer of the
expected length raises `NatPmpError`, never another exception.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

VERSION = 0
OP_EXTERNAL_ADDRESS = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2
RESPONSE_BIT = 128
EXTERNAL_ADDRESS_ANSWER_SIZE = 12
MAP_ANSWER_SIZE = 16

#: RFC 6886 section 3.5.
RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized/refused (the gateway has NAT-PMP switched off or refuses this client)",
    3: "network failure (the gateway has no external address yet)",
    4: "out of resources (no ports left to map)",
    5: "unsupported opcode",
}
SUCCESS = 0
UNSUPPORTED_VERSION = 1


class NatPmpError(ValueError):
    """An answer that is not a well-formed NAT-PMP answer to what was asked."""


class NatPmpRefused(Exception):
    """A well-formed answer with a non-zero result code."""

    def __init__(self, result: int) -> None:
        self.result = result
        super().__init__(f"NAT-PMP result {result}: {describe(result)}")


def describe(result: int) -> str:
    return RESULTS.get(result, "unknown result code")


@dataclass(frozen=True, slots=True)
class ExternalAddress:
    epoch: int  # seconds since the gateway's mapping table started (a drop: it restarted)
    address: str


@dataclass(frozen=True, slots=True)
class MapAnswer:
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int  # seconds; 0 answers a deletion


def external_address_request() -> bytes:
    return struct.pack("!BB", VERSION, OP_EXTERNAL_ADDRESS)


def map_request(internal_port: int, external_port: int, lifetime: int) -> bytes:
    """A UDP mapping request; lifetime 0 (with external port 0) deletes the mapping."""
    _check_port(internal_port, allow_zero=False)
    _check_port(external_port, allow_zero=True)
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError(f"lifetime {lifetime} out of range")
    return struct.pack("!BBHHHI", VERSION, OP_MAP_UDP, 0, internal_port, external_port, lifetime)


def parse_external_address(data: bytes) -> ExternalAddress:
    """The answer to `external_address_request`. NatPmpRefused on a non-zero result."""
    epoch = _header(data, OP_EXTERNAL_ADDRESS, EXTERNAL_ADDRESS_ANSWER_SIZE)
    return ExternalAddress(epoch, str(ipaddress.IPv4Address(data[8:12])))


def parse_map(data: bytes, internal_port: int) -> MapAnswer:
    """The answer to `map_request(internal_port, ...)`. NatPmpRefused on a non-zero result."""
    epoch = _header(data, OP_MAP_UDP, MAP_ANSWER_SIZE)
    answered_port, external_port, lifetime = struct.unpack_from("!HHI", data, 8)
    if answered_port != internal_port:
        raise NatPmpError(f"answer for internal port {answered_port}, asked for {internal_port}")
    if lifetime and not external_port:
        raise NatPmpError("answer maps external port 0")
    return MapAnswer(epoch, answered_port, external_port, lifetime)


def _header(data: bytes, opcode: int, size: int) -> int:
    """Check version, opcode and result; the epoch. A refusal may be shorter than a
    success (RFC 6886 3.5: an unsupported-version answer may be 8 bytes)."""
    if len(data) < 8:
        raise NatPmpError(f"answer of {len(data)} bytes, shorter than a NAT-PMP header")
    version, answered_op, result, epoch = struct.unpack_from("!BBHI", data)
    if version != VERSION:
        raise NatPmpError(f"answer of version {version}, not NAT-PMP's {VERSION}")
    if answered_op != opcode | RESPONSE_BIT:
        raise NatPmpError(f"answer to opcode {answered_op}, expected {opcode | RESPONSE_BIT}")
    if result != SUCCESS:
        raise NatPmpRefused(result)
    if len(data) != size:
        raise NatPmpError(f"answer of {len(data)} bytes, expected {size}")
    return int(epoch)


def _check_port(port: int, *, allow_zero: bool) -> None:
    if not (0 if allow_zero else 1) <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
