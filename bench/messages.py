"""Realistic test messages, built once and stamped cheaply per send.

Each message needs a unique Message-ID (mailgate dedups on Message-ID plus the raw
SHA-256, so identical copies would collapse into one stored row) and its own subject
(so the subject fallback of threading does not funnel everything into one hot thread).
Building an :class:`~email.message.EmailMessage` per send would cost the load
generator CPU it needs for sending, so a few templates are serialised once with
fixed-width placeholders and each message is a ``bytes.replace`` away.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime

_ID_TOKEN = b"MSGIDPLACEHOLDER0000000000000000"
_SUBJECT_TOKEN = b"SUBJ000000"
_SENDERS = (
    ("Ada Lovelace", "ada@example.org"),
    ("Grace Hopper", "grace@example.net"),
    ("Linus Pauling", "linus@example.com"),
    ("Mary Somerville", "mary@example.org"),
)
_VOCABULARY = (
    "invoice order shipment please could you confirm the delivery date for our account "
    "thanks regards team meeting tomorrow agenda attached review contract renewal terms "
    "pricing quarter support ticket customer issue resolved pending update status report "
    "schedule call follow up question about refund warehouse tracking number address"
)
_WORDS = tuple(_VOCABULARY.split())


@dataclass(frozen=True, slots=True)
class MessageFactory:
    """Unique messages of one shape (about ``size`` bytes on the wire)."""

    label: str
    size: int
    templates: tuple[bytes, ...]
    nonce: str

    def make(self, n: int) -> bytes:
        """The ``n``-th message: a template with its Message-ID and subject stamped."""
        template = self.templates[n % len(self.templates)]
        unique = f"{self.nonce}{n:020d}".encode()[-len(_ID_TOKEN) :]
        return template.replace(_ID_TOKEN, unique).replace(_SUBJECT_TOKEN, f"{n:010d}".encode())

    def batch(self, start: int, count: int) -> list[bytes]:
        """``count`` messages numbered from ``start`` (pre-built before timing)."""
        return [self.make(n) for n in range(start, start + count)]


def _prose(rng: random.Random, size: int) -> str:
    """Plain text of about ``size`` characters in lines under 76 characters."""
    lines: list[str] = []
    total = 0
    while total < size:
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 11)))
        line = line[:74].capitalize() + "."
        lines.append(line)
        total += len(line) + 2
    return "\r\n".join(lines) + "\r\n"


def _template(
    rng: random.Random, sender: tuple[str, str], rcpt: str, body: int, attachment: int
) -> bytes:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = f"{sender[0]} <{sender[1]}>"
    msg["To"] = rcpt
    msg["Subject"] = f"Question about order #{_SUBJECT_TOKEN.decode()}"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = f"<{_ID_TOKEN.decode()}@bench.example>"
    msg["Received"] = (
        "from mx.example.org (mx.example.org [192.0.2.10]) by relay.example.net "
        "with ESMTPS id 4Xb2kq1Zz9 for <" + rcpt + ">; " + format_datetime(datetime.now(UTC))
    )
    msg["X-Mailer"] = "mailgate-bench"
    msg.set_content(_prose(rng, body))
    if attachment:
        msg.add_attachment(
            rng.randbytes(attachment),
            maintype="application",
            subtype="pdf",
            filename="statement.pdf",
        )
    return msg.as_bytes()


def factory(label: str, target: int, rcpt: str, *, seed: int = 7) -> MessageFactory:
    """Messages of about ``target`` bytes: plain text up to 16 KB, beyond that a short
    text body plus a base64 PDF-like attachment (how large mail really arrives)."""
    rng = random.Random(seed)
    templates: list[bytes] = []
    for sender in _SENDERS:
        if target <= 16 * 1024:
            probe = _template(rng, sender, rcpt, 0, 0)
            templates.append(_template(rng, sender, rcpt, target - len(probe), 0))
        else:
            probe = _template(rng, sender, rcpt, 1500, 0)
            # base64 grows 4/3 and adds CRLF per 76 characters.
            raw = int((target - len(probe) - 200) * 3 / 4 * 76 / 78)
            templates.append(_template(rng, sender, rcpt, 1500, raw))
    return MessageFactory(label, target, tuple(templates), secrets.token_hex(6))


def one_off(target: int, rcpt: str) -> bytes:
    """A single message of about ``target`` bytes (mostly attachment), for RSS runs."""
    return factory("rss", target, rcpt, seed=11).make(0)


__all__ = ["MessageFactory", "factory", "one_off"]
