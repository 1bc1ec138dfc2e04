"""Provider webhooks (``/inbound/...``): SendGrid, Mailgun, Postmark and raw MIME.

The routes are thin: :mod:`mailgate.ingress.webhooks` does the work, and a route maps
the outcome to the status its provider acts on. ``200`` is answered only after the
message is committed; a provider's retry of a stored delivery gets ``200`` again with
``duplicate: true``. Setting up each provider: ``docs/providers.md``.

===========================  ========  =======  ========  =====
outcome                      SendGrid  Mailgun  Postmark  raw
===========================  ========  =======  ========  =====
stored, or a duplicate       200       200      200       200
endpoint disabled            404       404      404       404
bad credentials/signature    401       401      401       401
malformed form or JSON       400       400      400       400
body or message too large    413       413      413       413
no recipient is an agent     403       406      403       403
===========================  ========  =======  ========  =====

Why those refusal statuses for an unknown recipient (the mail can never be accepted,
so the provider should stop retrying):

* Mailgun retries every status except ``200`` and ``406`` for 8 hours
  (documentation.mailgun.com, "Receiving Messages via HTTP through a forward()
  action" and "Automatic Retries"): ``406``.
* Postmark retries anything but ``200`` ten times over ~10.5 hours and "if we receive
  a 403 Forbidden response, retries stop immediately" (Postmark support,
  "Understanding Inbound Webhook Retries"): ``403``.
* SendGrid "queues and retries any POSTs that respond with a 5XX status" for up to 3
  days (twilio.com/docs/sendgrid, "Inbound Email Parse Webhook"); no status is named
  as final, so a ``4xx`` is the refusal, and ``403`` is used as for Postmark (a
  ``404`` would read as a wrong URL).
* raw: our own contract; ``403`` lets an Email Worker or MTA pipe tell "refused"
  (reject the mail: ``550 5.1.1``) from ``5xx`` (try again later).

Authentication failures stay ``401``: a wrong secret is an operator's mistake, and the
providers' retries then deliver the mail once it is fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict

from mailgate.api.auth import get_runtime
from mailgate.api.errors import PROBLEM_JSON, Problem, from_error, problem
from mailgate.errors import InvalidSignature, MailgateError, UnknownRecipient
from mailgate.ingress import webhooks
from mailgate.services.ingest import Stored

router = APIRouter(prefix="/inbound", tags=["inbound"])

_log = logging.getLogger(__name__)

UNKNOWN_RECIPIENT_STATUS = {"sendgrid": 403, "mailgun": 406, "postmark": 403, "raw": 403}
"""The status each provider treats as "refused, do not retry" (see the module doc)."""

_CHALLENGE = {
    "sendgrid": 'Basic realm="mailgate inbound"',
    "postmark": 'Basic realm="mailgate inbound"',
    "raw": 'Bearer realm="mailgate inbound"',
}


class StoredOut(BaseModel):
    """One agent's copy of the delivered message."""

    model_config = ConfigDict(from_attributes=True)

    agent_id: str
    message_id: str
    thread_id: str
    duplicate: bool
    """True when this delivery was already stored (a provider retry, or a copy)."""


class InboundOut(BaseModel):
    """The answer to an accepted webhook: every agent copy, committed."""

    stored: list[StoredOut]


def _responses(unknown_status: int) -> dict[int | str, dict[str, Any]]:
    problem_body = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    described = {
        400: "Malformed form or JSON (`bad_request`, `errors` names the field)",
        401: "Wrong or missing credentials or signature (`invalid_signature`, `reason`)",
        404: "This endpoint's secret is not configured (`inbound_disabled`)",
        413: "Body over the limit (`payload_too_large`) or message over "
        "max_message_size (`message_too_large`)",
        unknown_status: "No recipient is an agent address (`unknown_recipient`)",
    }
    return {
        status: {"model": Problem, "content": problem_body, "description": text}
        for status, text in described.items()
    }


async def _answer(provider: str, work: Awaitable[list[Stored]]) -> Response | InboundOut:
    """Await the webhook's work and map its outcome for ``provider``."""
    try:
        stored = await work
    except UnknownRecipient as exc:
        _refused(provider, exc)
        status = UNKNOWN_RECIPIENT_STATUS[provider]
        return problem(status, exc.code, exc.title, exc.detail, **exc.extra)
    except InvalidSignature as exc:
        _refused(provider, exc)
        challenge = _CHALLENGE.get(provider)
        if challenge is None:
            return from_error(exc)
        headers = {"WWW-Authenticate": challenge}
        return problem(exc.status, exc.code, exc.title, exc.detail, headers=headers, **exc.extra)
    except MailgateError as exc:
        _refused(provider, exc)
        raise
    return InboundOut(stored=[StoredOut.model_validate(s) for s in stored])


def _refused(provider: str, exc: MailgateError) -> None:
    reason = exc.extra.get("reason")
    _log.info("inbound %s refused: %s%s", provider, exc.code, f" ({reason})" if reason else "")


@router.post(
    "/sendgrid",
    response_model=InboundOut,
    responses=_responses(UNKNOWN_RECIPIENT_STATUS["sendgrid"]),
)
async def sendgrid(request: Request) -> Response | InboundOut:
    """SendGrid Inbound Parse (parsed fields or "POST the raw, full MIME message"),
    authenticated by basic auth: user `inbound_sendgrid_user`, password
    `inbound_sendgrid_secret`. An unknown recipient is `403` (SendGrid retries only
    `5xx`)."""
    runtime = get_runtime(request)
    return await _answer("sendgrid", webhooks.receive_sendgrid(runtime, request))


@router.post(
    "/sendgrid/{secret}",
    response_model=InboundOut,
    responses=_responses(UNKNOWN_RECIPIENT_STATUS["sendgrid"]),
)
async def sendgrid_with_secret(request: Request, secret: str) -> Response | InboundOut:
    """SendGrid Inbound Parse with `inbound_sendgrid_secret` as the last path segment
    (for Parse settings whose URL cannot carry credentials)."""
    runtime = get_runtime(request)
    return await _answer("sendgrid", webhooks.receive_sendgrid(runtime, request, secret))


@router.post(
    "/mailgun",
    response_model=InboundOut,
    responses=_responses(UNKNOWN_RECIPIENT_STATUS["mailgun"]),
)
async def mailgun(request: Request) -> Response | InboundOut:
    """A Mailgun route's `forward()`; the `timestamp`/`token`/`signature` fields are
    verified with `inbound_mailgun_signing_key`. An unknown recipient is `406`, the
    one refusal Mailgun does not retry."""
    runtime = get_runtime(request)
    return await _answer("mailgun", webhooks.receive_mailgun(runtime, request))


@router.post(
    "/mailgun/mime",
    response_model=InboundOut,
    responses=_responses(UNKNOWN_RECIPIENT_STATUS["mailgun"]),
)
async def mailgun_mime(request: Request) -> Response | InboundOut:
    """As `/inbound/mailgun`; Mailgun posts `body-mime` (the message as received) to
    forward URLs ending in `mime`, so this is the URL to give it for raw MIME."""
    runtime = get_runtime(request)
    return await _answer("mailgun", webhooks.receive_mailgun(runtime, request))


@router.post(
    "/postmark",
    response_model=InboundOut,
    responses=_responses(UNKNOWN_RECIPIENT_STATUS["postmark"]),
)
async def postmark(request: Request) -> Response | InboundOut:
    """Postmark's inbound webhook JSON, basic auth (`inbound_postmark_user` /
    `inbound_postmark_password`). An unknown recipient is `403`, which stops
    Postmark's retries."""
    runtime = get_runtime(request)
    return await _answer("postmark", webhooks.receive_postmark(runtime, request))


@router.post(
    "/raw",
    response_model=InboundOut,
    responses=_responses(UNKNOWN_RECIPIENT_STATUS["raw"]),
)
async def raw(request: Request) -> Response | InboundOut:
    """A raw `message/rfc822` body with `Authorization: Bearer <inbound_raw_token>`;
    envelope in `X-Envelope-From` / `X-Envelope-To`. An unknown recipient is `403`
    (reject the mail), while a `5xx` means "try again later"."""
    runtime = get_runtime(request)
    return await _answer("raw", webhooks.receive_raw(runtime, request))
