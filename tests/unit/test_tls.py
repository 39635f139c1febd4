"""The coordinator's self-made certificate and its pin (tunnelmesh/tls.py), and the pin
in the invite token."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tunnelmesh.membership import AdminKey, MembershipError, Token, make_invite
from tunnelmesh.tls import (
    TlsError,
    certificate_fingerprint,
    check_pinned_url,
    load_or_make,
    make_certificate,
    parse_pin,
    pin_digest,
    server_context,
    write_certificate,
)

HEX = "0123456789abcdef" * 4


def test_pins_have_one_spelling() -> None:
    assert parse_pin(f"sha256:{HEX}") == f"sha256:{HEX}"
    assert parse_pin(f"  SHA256:{HEX.upper()}\n") == f"sha256:{HEX}"
    openssl = ":".join(HEX[i:i + 2] for i in range(0, 64, 2)).upper()  # `openssl x509 -fingerprint -sha256`
    assert parse_pin(f"SHA256:{openssl}") == f"sha256:{HEX}"
    assert pin_digest(f"sha256:{HEX}") == bytes.fromhex(HEX)


@pytest.mark.parametrize("bad", [HEX, f"sha1:{HEX}", f"sha256:{HEX[:-2]}", f"sha256:{HEX}00", f"sha256:{HEX[:-1]}g",
                                 "sha256:", "", None, 42, "sha256:" + "0" * 500])
def test_anything_else_is_not_a_pin(bad: object) -> None:
    with pytest.raises(ValueError, match="sha256: followed by 64 hex digits"):
        parse_pin(bad)


def test_a_pin_needs_https() -> None:
    check_pinned_url("https://192.0.2.1:7400", f"sha256:{HEX}")
    check_pinned_url("http://192.0.2.1:7400", None)  # plain HTTP without a pin: behind a TLS proxy
    with pytest.raises(ValueError, match="not https://"):
        check_pinned_url("http://192.0.2.1:7400", f"sha256:{HEX}")


@pytest.mark.parametrize("host, kind", [("192.0.2.1", x509.IPAddress), ("coord.example.org", x509.DNSName)])
def test_the_certificate_is_p256_self_signed_for_the_host_and_long_lived(host: str, kind: type) -> None:
    cert, key = make_certificate(host)
    assert isinstance(key.curve, ec.SECP256R1)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    expected = ipaddress.ip_address(host) if kind is x509.IPAddress else host
    assert san.get_values_for_type(kind) == [expected]
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert lifetime > datetime.timedelta(days=20 * 365)


def test_written_certificate_key_is_private_and_the_pin_is_the_der_hash(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "c.key"
    pin = write_certificate(cert_path, key_path, "192.0.2.1")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert pin == "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert certificate_fingerprint(cert_path) == pin
    server_context(cert_path, key_path)  # they make a pair
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_load_or_make_makes_once_and_refuses_half_a_pair(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "c.key"
    pin, made = load_or_make(cert_path, key_path, "192.0.2.1")
    assert made
    assert load_or_make(cert_path, key_path, "192.0.2.1") == (pin, False)
    key_path.unlink()
    with pytest.raises(TlsError, match="c.key is missing"):
        load_or_make(cert_path, key_path, "192.0.2.1")


def test_unusable_certificates_are_clear_errors(tmp_path: Path) -> None:
    a_cert, a_key = tmp_path / "a.pem", tmp_path / "a.key"
    b_cert, b_key = tmp_path / "b.pem", tmp_path / "b.key"
    write_certificate(a_cert, a_key, "192.0.2.1")
    write_certificate(b_cert, b_key, "192.0.2.1")
    with pytest.raises(TlsError, match="do not make a pair"):
        server_context(a_cert, b_key)
    with pytest.raises(TlsError, match="missing.pem"):
        server_context(tmp_path / "missing.pem", a_key)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TlsError, match="holds no PEM certificate"):
        certificate_fingerprint(tmp_path / "junk.pem")


# --- the token ---------------------------------------------------------------------------------


def _payload(token: str) -> dict:
    data = token.removeprefix("tmjoin1-")
    return json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))


def _encode(payload: dict) -> str:
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return "tmjoin1-" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_the_token_carries_the_pin_to_the_joiner() -> None:
    admin = AdminKey.generate()
    token = make_invite(admin, "https://192.0.2.1:7400", name=None, expires=2000, uses=1, now=1000,
                        tls=f"sha256:{HEX}")
    parsed = Token.parse(token.encode())
    assert parsed.tls == f"sha256:{HEX}" and parsed == token
    # Without a pin (a coordinator behind a TLS proxy): no "tls" key, the token reads as before.
    plain = make_invite(admin, "https://192.0.2.1:7400", name=None, expires=2000, uses=1, now=1000)
    assert "tls" not in _payload(plain.encode()) and Token.parse(plain.encode()).tls is None


@pytest.mark.parametrize("url, pin, error", [
    ("https://192.0.2.1:7400", "sha256:beef", "sha256: followed by 64 hex digits"),
    ("https://192.0.2.1:7400", 7, "sha256: followed by 64 hex digits"),
    ("http://192.0.2.1:7400", f"sha256:{HEX}", "not https://"),
])
def test_a_token_with_a_bad_pin_is_refused(url: str, pin: object, error: str) -> None:
    token = make_invite(AdminKey.generate(), url, name=None, expires=2000, uses=1, now=1000).encode()
    payload = _payload(token)
    payload["tls"] = pin
    with pytest.raises(MembershipError, match=error):
        Token.parse(_encode(payload))


# --- init and invite ---------------------------------------------------------------------------


def test_init_makes_the_certificate_pins_it_and_invites_carry_it(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tunnelmesh.cli import EXIT_OK, main
    from tunnelmesh.config import load_config

    state = tmp_path / "admin"
    assert main(["--state-dir", str(state), "init", "--name", "admin", "--new-key",
                 "--url", "https://192.0.2.1:7400"]) == EXIT_OK
    out = capsys.readouterr()
    coordinator = load_config(state / "tunnelmesh.toml", state_dir=state).coordinator
    assert coordinator is not None and coordinator.tls_cert == state / "coordinator-tls.pem"
    pin = certificate_fingerprint(state / "coordinator-tls.pem")
    assert coordinator.tls_fingerprint == pin and pin in out.out and "warning" not in out.err
    assert stat.S_IMODE((state / "coordinator-tls.key").stat().st_mode) == 0o600
    server_context(state / "coordinator-tls.pem", state / "coordinator-tls.key")
    cert = x509.load_pem_x509_certificate((state / "coordinator-tls.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.1")]
    assert main(["--state-dir", str(state), "invite"]) == EXIT_OK
    assert Token.parse(capsys.readouterr().out.strip()).tls == pin


def test_init_over_plain_http_warns_and_pins_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tunnelmesh.cli import EXIT_OK, EXIT_USAGE, main

    state = tmp_path / "admin"
    assert main(["--state-dir", str(state), "init", "--name", "admin", "--new-key",
                 "--url", "http://192.0.2.1:7400"]) == EXIT_OK
    assert "in clear unless a TLS-terminating proxy fronts it" in capsys.readouterr().err
    assert not (state / "coordinator-tls.pem").exists()
    assert main(["--state-dir", str(state), "invite"]) == EXIT_OK
    assert Token.parse(capsys.readouterr().out.strip()).tls is None
    other = tmp_path / "other"
    assert main(["--state-dir", str(other), "init", "--new-key", "--url", "https://192.0.2.1:7400",
                 "--tls-fingerprint", f"sha256:{HEX}"]) == EXIT_USAGE
    assert "--tls-fingerprint is for --external-coordinator" in capsys.readouterr().err
