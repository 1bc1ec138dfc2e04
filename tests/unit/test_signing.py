"""DKIM signing (RFC 6376) checked by dkimpy's verifier, with the key served from a
DNS function (no network)."""

from __future__ import annotations

import base64
from collections.abc import Callable

import dkim
import pytest

from mailgate.domain import signing
from mailgate.domain.signing import SigningError
from mailgate.testing import build_message

DOMAIN = "example.com"
SELECTOR = "mg2026"


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    return signing.generate_key(1024)  # 1024 bits: a fast, still valid key for tests


def dns_serving(public_b64: str) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` that knows one record: the one ``dns_records`` suggests."""
    record = signing.dns_records(DOMAIN, SELECTOR, public_b64)[0]

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        if name.decode().rstrip(".") == record.name:
            return record.value.encode()
        return None

    return lookup


def signed_message(keys: tuple[str, str], **changes: str) -> bytes:
    raw = build_message(to="bob@example.org", sender=f"Agent <agent@{DOMAIN}>", **changes)
    return signing.sign(raw, domain=DOMAIN, selector=SELECTOR, private_key_pem=keys[0])


def test_a_signed_message_verifies_against_the_published_key(keys: tuple[str, str]) -> None:
    signed = signed_message(keys)
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert dkim.verify(signed, dnsfunc=dns_serving(keys[1]))


def test_the_signature_is_prepended_and_the_message_is_otherwise_unchanged(
    keys: tuple[str, str],
) -> None:
    raw = build_message(to="bob@example.org", sender=f"agent@{DOMAIN}")
    signed = signing.sign(raw, domain=DOMAIN, selector=SELECTOR, private_key_pem=keys[0])
    assert signed.endswith(raw)
    field = signed[: -len(raw)]
    assert field.endswith(b"\r\n") and b"\n" not in field.replace(b"\r\n", b"")


def test_a_tampered_body_fails_verification(keys: tuple[str, str]) -> None:
    signed = signed_message(keys, body="Pay invoice 100.\n")
    tampered = signed.replace(b"Pay invoice 100.", b"Pay invoice 900.")
    assert tampered != signed
    assert not dkim.verify(tampered, dnsfunc=dns_serving(keys[1]))


def test_a_tampered_subject_fails_verification(keys: tuple[str, str]) -> None:
    signed = signed_message(keys, subject="Quarterly report")
    tampered = signed.replace(b"Subject: Quarterly report", b"Subject: Urgent: wire money")
    assert not dkim.verify(tampered, dnsfunc=dns_serving(keys[1]))


def test_another_key_does_not_verify(keys: tuple[str, str]) -> None:
    _, other_public = signing.generate_key(1024)
    assert not dkim.verify(signed_message(keys), dnsfunc=dns_serving(other_public))


def test_relaxed_canonicalisation_survives_refolding_and_trailing_space(
    keys: tuple[str, str],
) -> None:
    signed = signed_message(keys, subject="Hello")
    relayed = signed.replace(b"Subject: Hello", b"Subject:   Hello  ").replace(
        b"Hi there.\r\n", b"Hi there.   \r\n"
    )
    assert dkim.verify(relayed, dnsfunc=dns_serving(keys[1]))


def test_a_header_added_after_signing_breaks_it_when_it_was_oversigned(
    keys: tuple[str, str],
) -> None:
    """Listing Reply-To signs its absence: a relay cannot add one to hijack replies."""
    signed = signed_message(keys)
    assert b"Reply-To" not in signed
    injected = signed.replace(b"\r\nSubject:", b"\r\nReply-To: thief@evil.test\r\nSubject:", 1)
    assert not dkim.verify(injected, dnsfunc=dns_serving(keys[1]))


def test_the_key_pair_is_pem_and_a_base64_subject_public_key_info(
    keys: tuple[str, str],
) -> None:
    private_pem, public_b64 = keys
    assert private_pem.startswith("-----BEGIN RSA PRIVATE KEY-----")
    der = base64.b64decode(public_b64, validate=True)
    assert der[0] == 0x30  # a DER SEQUENCE


def test_keys_under_1024_bits_are_refused() -> None:
    with pytest.raises(SigningError):
        signing.generate_key(512)


def test_a_message_without_from_cannot_be_signed(keys: tuple[str, str]) -> None:
    raw = b"To: bob@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    with pytest.raises(SigningError):
        signing.sign(raw, domain=DOMAIN, selector=SELECTOR, private_key_pem=keys[0])


def test_dns_records_name_dkim_spf_and_dmarc() -> None:
    records = signing.dns_records(DOMAIN, SELECTOR, "AAAA")
    assert [(r.type, r.name, r.purpose.split(":")[0]) for r in records] == [
        ("TXT", f"{SELECTOR}._domainkey.{DOMAIN}", "dkim"),
        ("TXT", DOMAIN, "spf"),
        ("TXT", f"_dmarc.{DOMAIN}", "dmarc"),
    ]
    assert records[0].value == "v=DKIM1; k=rsa; p=AAAA"
    assert records[1].value.startswith("v=spf1 ")
    assert "p=none" in records[2].value
