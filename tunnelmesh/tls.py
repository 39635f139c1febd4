"""The coordinator's own TLS: a self-signed certificate made at `tunnelmesh init` (or
by a standalone `tunnelmesh coordinator` on first start), and the pin clients check
it by, ``sha256:<hex of SHA-256 of the DER certificate>``.

The pin travels like the admin key's fingerprint: in the invite token, then in each
node's config (``[coordinator] tls_fingerprint``). A client with a pin trusts that one
certificate and nothing else (no CA, no host name check: the pin is stronger than
both); a client without one verifies against the system's CAs (and a private CA
file). A pin is never dropped for an unpinned connection.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnelmesh import files

PIN_PREFIX = "sha256:"
#: A self-made certificate is pinned, not renewed: it lasts as long as the network.
VALIDITY = datetime.timedelta(days=100 * 365)
#: Where `init` puts the embedded coordinator's certificate and key (state directory).
CERT_NAME, KEY_NAME = "coordinator-tls.pem", "coordinator-tls.key"

_HEX = re.compile(r"[0-9a-f]{64}")


class TlsError(Exception):
    """A certificate, key or pin that cannot be used; the message says what to do."""


def parse_pin(text: Any) -> str:
    """A certificate pin in its one spelling, ``sha256:`` + 64 lowercase hex digits.
    Also takes upper case and the colon-separated form openssl prints
    (``SHA256:AB:CD:...``). ValueError saying what a pin looks like."""
    if not isinstance(text, str) or len(text) > 200:
        raise ValueError("a TLS fingerprint is sha256: followed by 64 hex digits")
    value = text.strip().lower()
    if not value.startswith(PIN_PREFIX):
        raise ValueError(f"TLS fingerprint {text[:80]!r}: expected sha256: followed by 64 hex digits")
    digits = value[len(PIN_PREFIX):].replace(":", "")
    if _HEX.fullmatch(digits) is None:
        raise ValueError(f"TLS fingerprint {text[:80]!r}: expected sha256: followed by 64 hex digits")
    return PIN_PREFIX + digits


def pin_digest(pin: str) -> bytes:
    """The 32 bytes a pin names (what aiohttp's Fingerprint compares)."""
    return bytes.fromhex(parse_pin(pin)[len(PIN_PREFIX):])


def fingerprint(der: bytes) -> str:
    """The pin of a DER certificate."""
    return PIN_PREFIX + hashlib.sha256(der).hexdigest()


def certificate_fingerprint(path: Path) -> str:
    """The pin of the (first) PEM certificate in `path`."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise TlsError(f"TLS certificate {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise TlsError(f"TLS certificate {path} holds no PEM certificate") from None
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def _subject_alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificate(host: str, *, now: datetime.datetime | None = None
                     ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed EC P-256 server certificate for `host` (an IP address or a DNS
    name: the SAN). Clients pin it, so it is its own issuer and lasts VALIDITY."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tunnelmesh coordinator {host}"[:64])])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName([_subject_alt_name(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def write_certificate(cert_path: Path, key_path: Path, host: str) -> str:
    """Make a certificate for `host`, write it (PEM, 0644) and its key (PEM, 0600);
    returns its pin."""
    cert, key = make_certificate(host)
    try:
        files.write_secret(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
        files.write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    except files.FileError as exc:
        raise TlsError(f"cannot write the coordinator's TLS certificate: {exc}") from None
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def load_or_make(cert_path: Path, key_path: Path, host: str) -> tuple[str, bool]:
    """The pin of the certificate at `cert_path`, made (with its key) if neither file
    exists yet; and whether it was made now."""
    if cert_path.exists() or key_path.exists():
        if not (cert_path.exists() and key_path.exists()):
            missing = key_path if cert_path.exists() else cert_path
            raise TlsError(f"{missing} is missing: restore it, or remove {cert_path} and {key_path} to make a new "
                           "certificate (every member then needs the new fingerprint)")
        return certificate_fingerprint(cert_path), False
    return write_certificate(cert_path, key_path, host), True


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """The TLS context a coordinator serves with (TLS 1.2 and later)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:  # an OSError too: first
        raise TlsError(f"TLS certificate {cert_path} and key {key_path} do not make a pair, or are not PEM "
                       f"({exc.reason or exc})") from None
    except OSError as exc:
        raise TlsError(f"TLS certificate or key: {exc.filename or cert_path}: {exc.strerror or exc}") from None
    return context


def client_ssl(ca_file: str | None, pin: str | None) -> Any:
    """What aiohttp's `ssl=` gets: with a pin, a Fingerprint (that certificate only);
    else the system's CAs (plus `ca_file`'s). LinkError for an unusable CA file."""
    import aiohttp

    from tunnelmesh.links.proxy import ssl_context

    if pin is not None:
        return aiohttp.Fingerprint(pin_digest(pin))
    return ssl_context(ca_file) or True


def check_pinned_url(url: str, pin: str | None) -> None:
    """A pin needs https:// (over http:// there is no certificate to check it against):
    ValueError otherwise."""
    if pin is not None and not url.lower().startswith(("https://", "wss://")):
        raise ValueError(f"{url} is not https://, but a TLS fingerprint is pinned for it: use the https:// URL "
                         "(or remove tls_fingerprint to talk plain HTTP to a coordinator behind a TLS proxy)")


def mismatch_message(where: str, expected: bytes, got: bytes) -> str:
    """A pin that did not match: both fingerprints and what to do."""
    return (f"TLS: {where} presented the certificate {PIN_PREFIX}{got.hex()}, not the pinned "
            f"{PIN_PREFIX}{expected.hex()}; refusing to talk to it (someone may be intercepting the connection). "
            "If the coordinator's certificate was replaced on purpose, set [coordinator] tls_fingerprint to the "
            "new one (`tunnelmesh status` on the admin node shows it; a standalone coordinator logs it at start)")
