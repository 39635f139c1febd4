"""Unit tests for tunnelmesh.fields: the shared field checks and the one host:port parser."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from tunnelmesh.coordinator.standalone import _listen_address
from tunnelmesh.fields import FieldError, Fields, decode_base64, is_name, parse_endpoint, shown


class Refusal(Exception):
    """A caller's own error type: Fields raises it, not FieldError."""


check = Fields(Refusal)


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.7:51820", ("192.0.2.7", 51820)),
    ("[2001:DB8::1]:4000", ("2001:db8::1", 4000)),
    ("node-1.example.org:22", ("node-1.example.org", 22)),
    ("example.org.:1", ("example.org.", 1)),
])
def test_an_endpoint_is_an_address_or_a_name_and_a_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(("text", "reason"), [
    ("192.0.2.7", "expected host:port, or [IPv6 address]:port"),
    (":51820", "expected host:port"),
    ("[2001:db8::1]4000", "expected host:port"),
    ("[nope]:1", "not an IPv6 address in brackets"),
    ("2001:db8::1:4000", "write an IPv6 address as [address]:port"),
    ("192.0.2.256:1", "'192.0.2.256' is neither an IP address nor a host name"),
    ("bad_name:1", "neither an IP address nor a host name"),
    ("192.0.2.7:0", "port must be 1 to 65535"),
    ("192.0.2.7:65536", "port must be 1 to 65535"),
    ("192.0.2.7:+80", "port must be 1 to 65535"),
])
def test_a_bad_endpoint_says_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(FieldError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_endpoint(text)


@pytest.mark.parametrize(("text", "reason"), [
    ("example.org:80", r"expected IPv4:port \('example.org' is not an IPv4 address\)"),
    ("[2001:db8::1]:80", "expected IPv4:port"),
    ("2001:db8::1:80", "expected IPv4:port"),
    ("192.0.2.7:99999", r"expected IPv4:port \(the port must be 1 to 65535\)"),
])
def test_an_ipv4_only_endpoint_refuses_names_and_ipv6(text: str, reason: str) -> None:
    with pytest.raises(FieldError, match=reason):
        parse_endpoint(text, ipv4_only=True)
    assert parse_endpoint("0.0.0.0:7400", ipv4_only=True) == ("0.0.0.0", 7400)


def test_a_long_host_is_not_repeated_in_the_error() -> None:
    secretish = "A" * 100
    with pytest.raises(FieldError) as info:
        parse_endpoint(f"{secretish}:1", ipv4_only=True)
    assert secretish not in str(info.value) and "100-character string" in str(info.value)
    assert shown("x\ny") == "(a 3-character string)"


@pytest.mark.parametrize(("call", "message"), [
    (lambda: check.object([], "record"), "record: expected a JSON object"),
    (lambda: check.list({}, "members"), "members: expected a list"),
    (lambda: check.keys({"a": 1}, {"a", "b"}, "record"), "record: missing b"),
    (lambda: check.keys({"a": 1, "z": 2}, {"a"}, "record"), "record: unexpected 'z'"),
    (lambda: check.integer(True, "at"), "at: expected an integer from 0 to"),
    (lambda: check.integer(7, "port", 8, 9), "port: expected an integer from 8 to 9"),
    (lambda: check.text("x" * 5, "name", 4), "name: expected text of at most 4 characters"),
    (lambda: check.base64("@@", "key"), "key: not valid base64"),
    (lambda: check.base64("AAAA", "key", 32), "key: expected 32 bytes, got 3"),
    (lambda: check.name("-web", "member name"), "member name must be 1 to 63 characters"),
])
def test_fields_raise_the_callers_error_with_one_wording(call: Any, message: str) -> None:
    with pytest.raises(Refusal, match=message):
        call()


def test_names_and_keys_that_pass() -> None:
    assert check.keys({"a": 1, "o": 2}, {"a"}, "record", {"o"}) is None
    assert check.name("web-1") == "web-1" and is_name("a") and not is_name("A") and not is_name("a" * 64)
    assert decode_base64("AAAA") == bytes(3) and decode_base64("AAAA", 32) is None and decode_base64("A") is None


def test_the_standalone_coordinators_listen_address_uses_the_one_parser() -> None:
    assert _listen_address("[::]:7400") == ("::", 7400)
    with pytest.raises(OSError) as info:
        _listen_address("0.0.0.0")
    assert info.value.errno == errno.EINVAL and "e.g. 0.0.0.0:7400" in str(info.value)
