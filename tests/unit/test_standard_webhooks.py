"""Our Standard Webhooks signer against svix's own verifier and signer, both ways."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
from svix.webhooks import Webhook as SvixWebhook
from svix.webhooks import WebhookVerificationError as SvixVerificationError

from mailgate.domain.standard_webhooks import (
    SECRET_PREFIX,
    WebhookVerificationError,
    new_secret,
    sign,
    signature_headers,
    verify,
)

BODY = json.dumps({"type": "event", "event_type": "message.received", "event_id": "evt_1"}).encode()


def test_a_new_secret_is_whsec_followed_by_base64_and_each_is_fresh() -> None:
    first, second = new_secret(), new_secret()
    assert first.startswith(SECRET_PREFIX) and first != second
    SvixWebhook(first)  # svix parses it as a key


def test_svix_verifies_what_we_sign_under_both_header_namings() -> None:
    secret = new_secret()
    headers = signature_headers(secret, "evt_1", int(time.time()), BODY)
    assert set(headers) == {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "svix-id",
        "svix-timestamp",
        "svix-signature",
    }
    assert headers["webhook-id"] == headers["svix-id"] == "evt_1"
    SvixWebhook(secret).verify(BODY, headers)  # raises when it does not verify
    SvixWebhook(secret).verify(BODY, {k: v for k, v in headers.items() if k.startswith("svix-")})
    SvixWebhook(secret).verify(BODY, {k: v for k, v in headers.items() if k.startswith("webhook-")})


def test_we_verify_what_svix_signs() -> None:
    secret = new_secret()
    stamp = datetime.now(UTC)
    signature = SvixWebhook(secret).sign("msg_1", stamp, BODY.decode())
    headers = {
        "Webhook-Id": "msg_1",
        "Webhook-Timestamp": str(int(stamp.timestamp())),
        "Webhook-Signature": signature,
    }
    assert verify(secret, BODY, headers, now=stamp.timestamp()) == "msg_1"
    assert signature == sign(secret, "msg_1", int(stamp.timestamp()), BODY)


def test_a_tampered_body_fails_both_verifiers() -> None:
    secret = new_secret()
    now = int(time.time())
    headers = signature_headers(secret, "evt_1", now, BODY)
    tampered = BODY.replace(b"evt_1", b"evt_2")
    with pytest.raises(SvixVerificationError):
        SvixWebhook(secret).verify(tampered, headers)
    with pytest.raises(WebhookVerificationError):
        verify(secret, tampered, headers, now=now)


def test_another_secret_fails_both_verifiers() -> None:
    now = int(time.time())
    headers = signature_headers(new_secret(), "evt_1", now, BODY)
    other = new_secret()
    with pytest.raises(SvixVerificationError):
        SvixWebhook(other).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        verify(other, BODY, headers, now=now)


def test_an_old_timestamp_fails_both_verifiers() -> None:
    secret = new_secret()
    old = int(time.time()) - 10 * 60
    headers = signature_headers(secret, "evt_1", old, BODY)
    with pytest.raises(SvixVerificationError):
        SvixWebhook(secret).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        verify(secret, BODY, headers, now=time.time())


def test_one_matching_signature_among_several_is_enough_for_key_rotation() -> None:
    secret, old_secret = new_secret(), new_secret()
    now = int(time.time())
    headers = signature_headers(secret, "evt_1", now, BODY)
    rotated = f"{sign(old_secret, 'evt_1', now, BODY)} {headers['webhook-signature']}"
    assert verify(secret, BODY, {**headers, "webhook-signature": rotated}, now=now) == "evt_1"


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_delivery_missing_a_header_is_refused(missing: str) -> None:
    secret = new_secret()
    now = int(time.time())
    headers = {
        k: v
        for k, v in signature_headers(secret, "evt_1", now, BODY).items()
        if k.startswith("webhook-") and k != missing
    }
    with pytest.raises(WebhookVerificationError):
        verify(secret, BODY, headers, now=now)


@pytest.mark.parametrize("secret", ["abc", "whsec_not base64!"])
def test_a_malformed_secret_is_refused(secret: str) -> None:
    with pytest.raises(ValueError):
        sign(secret, "evt_1", 1, BODY)
