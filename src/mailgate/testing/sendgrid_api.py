"""A local stand-in for SendGrid's v3 Mail Send API, to test senders without the internet.

:class:`FakeSendGrid` is a real HTTP server on loopback (stdlib ``ThreadingHTTPServer``
in a thread) that keeps SendGrid's documented contract for ``POST /v3/mail/send``:

* ``Authorization: Bearer <key>`` must carry the configured key, else ``401``;
* a body over 30 MB is ``413`` (checked from ``Content-Length`` before reading);
* the JSON is validated as the API does: ``personalizations`` 1..1000, each with at
  least one ``to`` and every address once across to/cc/bcc, 1000 recipients at most;
  ``from.email`` present; a subject at the top or in every personalization (unless a
  ``template_id``); ``content`` non-empty with ``text/plain`` first, then
  ``text/html`` (unless a template); attachments with ``content`` and ``filename``;
  reserved headers refused. Failures answer ``400`` with SendGrid's
  ``{"errors": [{"message", "field", "help"}]}``;
* success is ``202`` with an empty body and an ``X-Message-Id`` header.

Accepted requests are kept in :attr:`FakeSendGrid.requests`. :meth:`FakeSendGrid.fail_next`
makes the next requests answer ``429``, ``500``, ``503``, ... first.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

MAX_BYTES = 30 * 1024 * 1024
MAX_PERSONALIZATIONS = 1000
MAX_RECIPIENTS = 1000
RESERVED_HEADERS = frozenset(
    [
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    ]
)
"""Headers the API refuses to let a sender set."""
_EMAIL = re.compile(r"^[^@\s\"<>,;]+@[^@\s\"<>,;]+\.[^@\s\"<>,;]+$")
_HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"


@dataclass(frozen=True, slots=True)
class MailSendRequest:
    """One accepted Mail Send call."""

    body: dict[str, Any]
    headers: dict[str, str]
    message_id: str


class FakeSendGrid:
    """See the module docstring. ``base_url`` goes in ``sendgrid_api_url``."""

    def __init__(self, api_key: str = "SG.test-key", *, host: str = "127.0.0.1") -> None:
        self.api_key = api_key
        self.requests: list[MailSendRequest] = []
        self.attempts = 0
        """Every request that reached the endpoint, failed or not."""
        self._faults: deque[int] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeSendGrid:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> FakeSendGrid:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def fail_next(self, count: int = 1, status: int = 503) -> None:
        """The next ``count`` requests answer ``status`` (after the key check)."""
        with self._lock:
            self._faults.extend([status] * count)

    def _take_fault(self) -> int | None:
        with self._lock:
            self.attempts += 1
            return self._faults.popleft() if self._faults else None

    def _accept(self, body: dict[str, Any], headers: dict[str, str]) -> str:
        message_id = secrets.token_urlsafe(16)[:22]
        with self._lock:
            self.requests.append(MailSendRequest(body, headers, message_id))
        return message_id


def validate(body: Any) -> list[dict[str, Any]]:
    """SendGrid's validation errors for a Mail Send body (empty: valid)."""
    errors: list[dict[str, Any]] = []

    def error(message: str, field: str | None) -> None:
        errors.append({"message": message, "field": field, "help": _HELP})

    if not isinstance(body, dict):
        error("Bad Request", None)
        return errors
    template = bool(body.get("template_id"))
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        error(
            "The personalizations field is required and must have at least one personalization.",
            "personalizations",
        )
        personalizations = []
    elif len(personalizations) > MAX_PERSONALIZATIONS:
        error(
            f"The personalization block is limited to {MAX_PERSONALIZATIONS} "
            "personalizations per API request.",
            "personalizations",
        )
    total = 0
    every_has_subject = bool(personalizations)
    for i, p in enumerate(personalizations):
        where = f"personalizations.{i}"
        if not isinstance(p, dict):
            error("Invalid type. Expected: object.", where)
            continue
        if not p.get("subject"):
            every_has_subject = False
        to = p.get("to")
        if not isinstance(to, list) or not to:
            error(
                "The to array is required for all personalization objects, and must "
                "have at least one email object with a valid email address.",
                f"{where}.to",
            )
        seen: set[str] = set()
        for kind in ("to", "cc", "bcc"):
            entries = p.get(kind) or []
            if not isinstance(entries, list):
                error("Invalid type. Expected: array.", f"{where}.{kind}")
                continue
            for j, entry in enumerate(entries):
                total += 1
                email = entry.get("email") if isinstance(entry, dict) else None
                if not isinstance(email, str) or not _EMAIL.match(email):
                    error("Does not contain a valid address.", f"{where}.{kind}.{j}.email")
                    continue
                if email.lower() in seen:
                    error(
                        "Each email address in the personalization block should be unique "
                        f"between to, cc, and bcc. We found the first duplicate instance "
                        f"of [{email}] in the {where}.{kind} field.",
                        where,
                    )
                seen.add(email.lower())
        for key in (p.get("headers") or {}) if isinstance(p.get("headers"), dict) else ():
            if str(key).lower() in RESERVED_HEADERS:
                error(f"The header {key} is reserved and cannot be set.", f"{where}.headers")
    if total > MAX_RECIPIENTS:
        error(
            f"There is a limit of {MAX_RECIPIENTS} total recipients (to + cc + bcc) per request.",
            "personalizations",
        )
    sender = body.get("from")
    if not isinstance(sender, dict) or not sender.get("email"):
        error(
            "The from object must be provided for every email send. It is an object "
            "that requires an email parameter, but may also contain a name parameter.",
            "from",
        )
    elif not _EMAIL.match(str(sender["email"])):
        error("The from email does not contain a valid address.", "from.email")
    subject = body.get("subject")
    if not template and not every_has_subject and (not isinstance(subject, str) or not subject):
        error(
            "The subject is required. You can get around this requirement if you use a "
            "template with a subject defined or if every personalization has a subject "
            "defined.",
            "subject",
        )
    _validate_content(body.get("content"), template, error)
    for i, attachment in enumerate(body.get("attachments") or []):
        if not isinstance(attachment, dict) or not attachment.get("content"):
            error("The attachment content is required.", f"attachments.{i}.content")
        elif not attachment.get("filename"):
            error("The attachment filename is required.", f"attachments.{i}.filename")
    headers = body.get("headers")
    if headers is not None and not isinstance(headers, dict):
        error("Invalid type. Expected: object.", "headers")
    for key, value in (headers or {}).items() if isinstance(headers, dict) else ():
        if str(key).lower() in RESERVED_HEADERS:
            error(f"The header {key} is reserved and cannot be set.", "headers")
        elif not isinstance(value, str):
            error("Invalid type. Expected: string.", f"headers.{key}")
    custom_args = body.get("custom_args")
    if custom_args is not None and not isinstance(custom_args, dict):
        error("Invalid type. Expected: object.", "custom_args")
    return errors


def _validate_content(content: Any, template: bool, error: Any) -> None:
    if content is None or content == []:
        if not template:
            error(
                "Unless a valid template_id is provided, the content parameter is "
                "required. There must be at least one defined content block. We "
                "typically suggest both text/plain and text/html blocks are included, "
                "but only one block is required.",
                "content",
            )
        return
    if not isinstance(content, list):
        error("Invalid type. Expected: array.", "content")
        return
    types = []
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not block.get("type"):
            error("The content type is required.", f"content.{i}.type")
            continue
        value = block.get("value")
        if not isinstance(value, str) or not value:
            error(
                "The content value must be a string at least one character in length.",
                f"content.{i}.value",
            )
        types.append(str(block["type"]).lower())
    expected = [t for t in ("text/plain", "text/html") if t in types]
    if types[: len(expected)] != expected:
        error(
            "If present, text/plain must be first, followed by text/html, followed by "
            "any other content.",
            "content",
        )


def _handler_for(fake: FakeSendGrid) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            if self.path.split("?")[0] != "/v3/mail/send":
                self._answer(404, [{"message": "not found", "field": None}], read=True)
                return
            auth = self.headers.get("Authorization", "")
            if auth != f"Bearer {fake.api_key}":
                self._answer(
                    401,
                    [
                        {
                            "message": "The provided authorization grant is invalid, "
                            "expired, or revoked",
                            "field": None,
                            "help": None,
                        }
                    ],
                    read=True,
                )
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BYTES:
                self.close_connection = True
                self._answer(413, [{"message": "content too large", "field": None}])
                return
            raw = self.rfile.read(length)
            status = fake._take_fault()
            if status is not None:
                self._answer(status, [{"message": f"injected {status}", "field": None}])
                return
            try:
                body = json.loads(raw)
            except ValueError:
                self._answer(400, [{"message": "Bad Request", "field": None, "help": None}])
                return
            errors = validate(body)
            if errors:
                self._answer(400, errors)
                return
            message_id = fake._accept(body, {k: v for k, v in self.headers.items()})
            self.send_response(202)
            self.send_header("X-Message-Id", message_id)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _answer(self, status: int, errors: list[dict[str, Any]], read: bool = False) -> None:
            if read:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
            data = json.dumps({"errors": errors}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return None  # tests read what matters from FakeSendGrid, not stderr

    return Handler
