"""The Event Webhook's ECDSA signature check and event mapping, with a key pair made
here and bodies signed as SendGrid signs them (timestamp + raw body, SHA-256, DER)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mailgate.domain.sendgrid_events import load_public_key, parse_events, verify_signature
from mailgate.errors import BadRequest, InvalidSignature

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STAMP = str(int(NOW.timestamp()))


def key_pair() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A P-256 key and its public half as SendGrid's console shows it (base64 DER)."""
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(der).decode()


def sign(private: ec.EllipticCurvePrivateKey, body: bytes, timestamp: str = STAMP) -> str:
    der = private.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(der).decode()


def check(public: str, body: bytes, signature: str | None, timestamp: str | None) -> None:
    verify_signature(
        load_public_key(public), body, signature, timestamp, now=NOW, max_age_seconds=600
    )


def test_a_body_signed_with_the_key_verifies() -> None:
    private, public = key_pair()
    body = b'[{"event":"delivered","email":"a@example.org"}]'

    check(public, body, sign(private, body), STAMP)


def test_the_public_key_may_be_given_as_pem() -> None:
    private, _ = key_pair()
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    assert load_public_key(pem.decode()).curve.name == "secp256r1"


@pytest.mark.parametrize(
    "text", ["", "not base64!", base64.b64encode(b"junk").decode(), "-----BEGIN PUBLIC KEY-----"]
)
def test_a_key_that_is_not_p256_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        load_public_key(text)


def test_a_p384_key_is_refused() -> None:
    der = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError):
        load_public_key(base64.b64encode(der).decode())


def _reason(public: str, body: bytes, signature: str | None, timestamp: str | None) -> str:
    with pytest.raises(InvalidSignature) as caught:
        check(public, body, signature, timestamp)
    assert caught.value.code == "invalid_signature"
    return str(caught.value.extra["reason"])


def test_each_way_a_signature_fails_has_its_own_reason() -> None:
    private, public = key_pair()
    _, other = key_pair()
    body = b'[{"event":"bounce","email":"a@example.org"}]'
    good = sign(private, body)
    old = str(int(NOW.timestamp()) - 601)

    assert _reason(public, body, None, STAMP) == "missing_signature"
    assert _reason(public, body, good, None) == "missing_timestamp"
    assert _reason(public, body, good, "yesterday") == "bad_timestamp"
    assert _reason(public, body, sign(private, body, old), old) == "stale_timestamp"
    future = str(int(NOW.timestamp()) + 601)
    assert _reason(public, body, sign(private, body, future), future) == "stale_timestamp"
    assert _reason(other, body, good, STAMP) == "bad_signature"  # another key
    assert _reason(public, body + b" ", good, STAMP) == "bad_signature"  # body changed
    later = str(int(NOW.timestamp()) + 1)
    assert _reason(public, body, good, later) == "bad_signature"  # timestamp changed
    assert _reason(public, body, "%%%", STAMP) == "bad_signature"  # not base64
    assert _reason(public, body, base64.b64encode(b"x").decode(), STAMP) == "bad_signature"


def _one(**event: Any) -> Any:
    [parsed] = parse_events(json.dumps([event]).encode())
    return parsed


def test_events_map_to_what_they_mean_for_feedback() -> None:
    base = {"email": "A@Example.org", "timestamp": 1772366400, "sg_event_id": "e1"}

    delivered = _one(**base, event="delivered", response="250 OK")
    bounce = _one(**base, event="bounce", type="bounce", status="5.1.1", reason="550 no user")
    blocked = _one(**base, event="bounce", type="blocked", reason="550 spam content")
    spam = _one(**base, event="spamreport")
    unsub = _one(**base, event="group_unsubscribe", asm_group_id=7)
    deferred = _one(**base, event="deferred", response="421 later")

    assert (delivered.kind, delivered.recipient_status, delivered.suppression) == (
        "delivered", "delivered", None,
    )  # fmt: skip
    assert delivered.email == "a@example.org"
    assert delivered.reason == "250 OK"
    assert delivered.occurred_at == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert (bounce.kind, bounce.recipient_status, bounce.suppression) == (
        "bounced", "bounced", "hard_bounce",
    )  # fmt: skip
    assert bounce.status == "5.1.1"
    # A block is about the message, not the address: the message failed, no suppression.
    assert (blocked.kind, blocked.recipient_status, blocked.suppression) == (
        "blocked", "failed", None,
    )  # fmt: skip
    assert (spam.kind, spam.recipient_status, spam.suppression) == (
        "complained", "complained", "complaint",
    )  # fmt: skip
    assert (unsub.kind, unsub.suppression) == ("unsubscribed", "unsubscribe")
    assert (deferred.kind, deferred.recipient_status, deferred.suppression) == (
        "deferred", "deferred", None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("reason", "suppression"),
    [
        ("Bounced Address", "dropped"),
        ("Invalid", "dropped"),
        ("Unsubscribed Address", "unsubscribe"),
        ("Spam Reporting Address", "complaint"),
        ("Invalid SMTPAPI header", None),  # our fault, not the address's
        ("Spam Content (if spam checker app enabled)", None),
    ],
)
def test_a_drop_suppresses_only_for_reasons_about_the_address(
    reason: str, suppression: str | None
) -> None:
    event = _one(event="dropped", email="a@example.org", sg_event_id="d1", reason=reason)

    assert event.recipient_status == "dropped"
    assert event.suppression == suppression


@pytest.mark.parametrize("name", ["processed", "open", "click", "group_resubscribe", "new_thing"])
def test_engagement_and_unknown_events_are_ignored(name: str) -> None:
    event = _one(event=name, email="a@example.org", sg_event_id="x")

    assert event.kind == "ignored"
    assert event.recipient_status is None
    assert event.suppression is None


def test_our_outbound_id_custom_arg_and_the_x_message_id_are_read() -> None:
    event = _one(
        event="delivered",
        email="a@example.org",
        sg_event_id="e2",
        sg_message_id="14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
        outbound_id="out_01abc",
    )
    legacy = _one(event="delivered", email="a@example.org", unique_args={"outbound_id": "out_2"})

    assert event.outbound_id == "out_01abc"
    assert event.provider_message_id == "14c5d75ce93"
    assert legacy.outbound_id == "out_2"
    assert legacy.provider_message_id is None


def test_an_event_without_sg_event_id_gets_a_stable_derived_id() -> None:
    body = b'[{"event":"dropped","email":"x@example.org","reason":"Invalid"}]'

    first, again = parse_events(body)[0], parse_events(body)[0]

    assert first.event_id.startswith("sha256:")
    assert first.event_id == again.event_id


def test_elements_that_are_not_events_are_ignored_not_fatal() -> None:
    events = parse_events(b'[1, "x", {"event": "delivered"}, {"email": "a@example.org"}]')

    assert [e.kind for e in events] == ["ignored"] * 4


@pytest.mark.parametrize("body", [b"", b"{", b'{"event": "delivered"}', b"\xff\xfe", b"null"])
def test_a_body_that_is_not_a_json_array_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_events(body)

    assert caught.value.code == "bad_request"
    assert caught.value.extra["errors"][0]["field"] == "body"
