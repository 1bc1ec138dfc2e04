"""Helpers for testing code that talks to mailgate (and for mailgate's own tests)."""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

__all__ = ["build_message"]


def build_message(
    *,
    to: str,
    sender: str = "Alice Example <alice@example.com>",
    subject: str = "Hello",
    body: str = "Hi there.\n",
    message_id: str | None = "auto",
    in_reply_to: str | None = None,
    references: list[str] | None = None,
    cc: str | None = None,
    html: str | None = None,
    attachments: list[tuple[str, str, bytes]] | None = None,
    date: datetime | None = None,
    extra_headers: dict[str, str] | None = None,
) -> bytes:
    """A well-formed message as CRLF bytes, the way an SMTP client would send it.

    ``message_id="auto"`` makes a fresh one, ``None`` leaves the header out.
    ``attachments`` are ``(filename, content type, data)``; ``extra_headers`` are
    added as given (``{"Auto-Submitted": "auto-replied"}``).
    """
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date or datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    if message_id == "auto":
        msg["Message-ID"] = make_msgid(domain="example.com")
    elif message_id is not None:
        msg["Message-ID"] = f"<{message_id.strip('<>')}>"
    if in_reply_to:
        msg["In-Reply-To"] = f"<{in_reply_to.strip('<>')}>"
    if references:
        msg["References"] = " ".join(f"<{r.strip('<>')}>" for r in references)
    for name, value in (extra_headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for filename, content_type, data in attachments or []:
        maintype, _, subtype = content_type.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
