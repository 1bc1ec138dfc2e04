"""The stored copy is the received bytes plus our Authentication-Results, minus forgeries."""

from __future__ import annotations

import pytest

from mailgate.domain.authres import stamp_message

OURS = "mx.gateway.test"
STAMP = f"Authentication-Results: {OURS}; spf=pass"

CASES = [
    (
        "a forged field in the middle goes, continuation lines included",
        b"From: a\r\nAuthentication-Results: mx.gateway.test; dmarc=pass\r\n x=y\r\n"
        b"Subject: s\r\n\r\nbody\r\n",
        b"From: a\r\nSubject: s\r\n\r\nbody\r\n",
    ),
    (
        "a forged last field goes without doubling the blank line",
        b"From: a\r\nAuthentication-Results: MX.GATEWAY.TEST (c); dkim=pass\r\n\r\nbody\r\n",
        b"From: a\r\n\r\nbody\r\n",
    ),
    (
        "a message of nothing but a forged field keeps its body intact",
        b"Authentication-Results: mx.gateway.test; spf=pass\r\n\r\nbody\r\n",
        b"\r\nbody\r\n",
    ),
    (
        "another server's field stays, and so does a quoted lookalike in the body",
        b"Authentication-Results: mx.other.test; spf=pass\r\n\r\n"
        b"Authentication-Results: mx.gateway.test; dmarc=pass\r\n",
        b"Authentication-Results: mx.other.test; spf=pass\r\n\r\n"
        b"Authentication-Results: mx.gateway.test; dmarc=pass\r\n",
    ),
    (
        "bare-LF mail is handled with its own line ends",
        b"From: a\nAuthentication-Results: mx.gateway.test; spf=pass\n\nbody\n",
        b"From: a\n\nbody\n",
    ),
    (
        "a message without a body keeps its headers",
        b"From: a\r\nSubject: s",
        b"From: a\r\nSubject: s",
    ),
]


@pytest.mark.parametrize(("case", "received", "kept"), CASES, ids=[c[0] for c in CASES])
def test_forged_fields_are_removed_and_everything_else_is_kept(
    case: str, received: bytes, kept: bytes
) -> None:
    assert stamp_message(received, None, OURS) == kept, case


def test_our_field_goes_on_top_with_the_message_s_own_line_ending() -> None:
    crlf = stamp_message(b"From: a\r\n\r\nhi\r\n", STAMP + ";\r\n dkim=none", OURS)
    assert crlf == (STAMP + ";\r\n dkim=none\r\nFrom: a\r\n\r\nhi\r\n").encode()
    lf = stamp_message(b"From: a\n\nhi\n", STAMP + ";\r\n dkim=none", OURS)
    assert lf == (STAMP + ";\n dkim=none\nFrom: a\n\nhi\n").encode()


def test_untouched_mail_is_the_same_object_so_its_hash_is_reused() -> None:
    raw = b"From: a\r\n\r\nhi\r\n"
    assert stamp_message(raw, None, OURS) is raw
