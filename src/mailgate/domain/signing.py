"""DKIM for outbound mail (RFC 6376): keys, signatures and the DNS records to publish.

Pure functions, no I/O: the sending-domain service stores keys and picks the signer,
the delivery service signs the final bytes just before they leave. Signatures are
``rsa-sha256`` with ``relaxed/relaxed`` canonicalisation, which survives the header
refolding and trailing-whitespace changes relays commonly make (RFC 6376 §3.4).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# Headers a recipient relies on and a relay has no business changing (RFC 6376
# §5.4.1; ``from`` is required). Listing one the message lacks signs its absence, so
# nobody can add it later without breaking the signature (§5.4.2).
DEFAULT_SIGNED: tuple[bytes, ...] = (
    b"from",
    b"sender",
    b"reply-to",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"auto-submitted",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
)

MIN_KEY_BITS = 1024
"""RFC 8301 §3.2: verifiers must refuse RSA keys under 1024 bits."""


class SigningError(ValueError):
    """The key or the message cannot be signed (a bug upstream, not a delivery error)."""


@dataclass(frozen=True, slots=True)
class DnsRecord:
    """One DNS record an owner should publish for a sending domain."""

    type: str
    name: str
    value: str
    purpose: str


def generate_key(bits: int = 2048) -> tuple[str, str]:
    """A new RSA key pair: the private key as PEM (PKCS#1) and the public key as the
    base64 of its DER SubjectPublicKeyInfo (the DKIM DNS record's ``p=`` value).

    Raises:
        SigningError: ``bits`` below 1024.
    """
    if bits < MIN_KEY_BITS:
        raise SigningError(f"DKIM keys need at least {MIN_KEY_BITS} bits")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode("ascii")
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, base64.b64encode(public_der).decode("ascii")


def sign(
    raw: bytes,
    *,
    domain: str,
    selector: str,
    private_key_pem: str,
    headers: Sequence[bytes] = DEFAULT_SIGNED,
) -> bytes:
    """``raw`` with a ``DKIM-Signature`` field prepended (CRLF line endings).

    Raises:
        SigningError: the key is unusable or the message has no ``From`` field.
    """
    head = raw.split(b"\r\n\r\n", 1)[0]
    if not any(line[:5].lower() == b"from:" for line in head.split(b"\r\n")):
        raise SigningError("cannot DKIM-sign a message without a From field (RFC 6376 §5.4)")
    try:
        field = dkim.sign(
            raw,
            selector.encode("ascii"),
            domain.encode("ascii"),
            private_key_pem.encode("ascii"),
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=b"rsa-sha256",
            include_headers=list(headers),
            linesep=b"\r\n",
        )
    except (dkim.DKIMException, UnicodeEncodeError) as exc:
        raise SigningError(f"cannot DKIM-sign: {exc}") from exc
    assert isinstance(field, bytes)
    return field + raw


def dns_records(domain: str, selector: str, public_b64: str) -> list[DnsRecord]:
    """What to publish for ``domain``: the DKIM key, a starting SPF record and a
    monitoring-only DMARC policy (``p=none``: collect reports before enforcing)."""
    return [
        DnsRecord(
            type="TXT",
            name=f"{selector}._domainkey.{domain}",
            value=f"v=DKIM1; k=rsa; p={public_b64}",
            purpose="dkim: the public key receivers check signatures against (a TXT "
            "string holds 255 characters: longer values are several strings)",
        ),
        DnsRecord(
            type="TXT",
            name=domain,
            value="v=spf1 mx a ~all",
            purpose="spf: hosts allowed to send for the domain; add your relay's "
            "include: or ip4: before ~all, and merge with any existing SPF record",
        ),
        DnsRecord(
            type="TXT",
            name=f"_dmarc.{domain}",
            value="v=DMARC1; p=none; adkim=r; aspf=r",
            purpose="dmarc: start with p=none (monitor), add rua=mailto:... for "
            "reports, then move to quarantine or reject",
        ),
    ]
