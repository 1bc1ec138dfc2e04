"""Routes for outbound feedback: SendGrid's Event Webhook, suppressions, trust figures.

``POST /feedback/sendgrid`` is SendGrid's, not a client's: no API key, but the Signed
Event Webhook's ECDSA signature over timestamp and body (``401 invalid_signature``
with a ``reason`` when missing, wrong or stale). It is off (``404
inbound_disabled``) until ``sendgrid_event_public_key`` is set. ``200`` is answered
only after the events are committed; SendGrid retries anything else, and each retried
event is applied once (its ``sg_event_id`` is remembered).

Suppressions are owner business (agent keys: ``403 missing_scope``), pinned to the
caller's workspace. The trust figure is for owners and for the agent itself.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

import anyio.to_thread
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from mailgate.api.auth import PrincipalDep, RuntimeDep, get_runtime
from mailgate.api.errors import PROBLEM_JSON, PROBLEM_RESPONSES, Problem
from mailgate.domain.sendgrid_events import SIGNATURE_HEADER, TIMESTAMP_HEADER
from mailgate.domain.trust import TrustFigure
from mailgate.ingress.webhooks import read_body
from mailgate.services.feedback import AgentTrust, SendGridResult, Suppression
from mailgate.services.queries import MAX_LIMIT, Page

router = APIRouter()

Reason = Literal["hard_bounce", "complaint", "unsubscribe", "dropped", "manual"]
_REASON_DOC = (
    "`hard_bounce` (a permanent failure), `complaint` (a spam report), `unsubscribe`, "
    "`dropped` (the provider refused to send to it), `manual` (an owner's choice)."
)


def _problem(description: str) -> dict[str, Any]:
    return {
        "model": Problem,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        "description": description,
    }


# -- SendGrid Event Webhook ---------------------------------------------------------------


class SendGridEventsOut(BaseModel):
    """What a post did; every count is committed."""

    received: int
    applied: int = Field(description="Events matched to an outbound request and applied.")
    duplicates: int = Field(description="Events an earlier post already applied.")
    ignored: int = Field(description="Events with no meaning here (processed, open, click).")
    unmatched: int = Field(description="Events about mail this gateway did not send.")
    tier_changes: list[dict[str, str]] = Field(
        description="Agents whose tier a complaint rate lowered: `agent_id`, `from`, `to`."
    )

    @classmethod
    def of(cls, result: SendGridResult) -> Self:
        return cls(
            received=result.received,
            applied=result.applied,
            duplicates=result.duplicates,
            ignored=result.ignored,
            unmatched=result.unmatched,
            tier_changes=[
                {"agent_id": c.agent_id, "from": c.from_tier, "to": c.to_tier}
                for c in result.tier_changes
            ],
        )


@router.post(
    "/feedback/sendgrid",
    tags=["feedback"],
    responses={
        400: _problem("The body is not a JSON array of events (`bad_request`)"),
        401: _problem(
            "Missing or wrong signature, or a stale timestamp (`invalid_signature`, `reason`)"
        ),
        404: _problem("`sendgrid_event_public_key` is not set (`inbound_disabled`)"),
        413: _problem("Body over the limit (`payload_too_large`)"),
    },
)
async def sendgrid_events(request: Request) -> SendGridEventsOut:
    """SendGrid's Event Webhook (enable "Signed Event Webhook Requests" and give the
    verification key as `sendgrid_event_public_key`). Deliveries, bounces, drops, spam
    reports and unsubscribes update the outbound request, its recipients, the
    workspace's suppressions and the agent's tier."""
    runtime = get_runtime(request)
    runtime.feedback.sendgrid_public_key()  # disabled or misconfigured: before the body
    body = await read_body(request, runtime.settings.effective_inbound_max_body)
    result = await anyio.to_thread.run_sync(
        runtime.feedback.apply_sendgrid,
        body,
        request.headers.get(SIGNATURE_HEADER),
        request.headers.get(TIMESTAMP_HEADER),
    )
    return SendGridEventsOut.of(result)


# -- suppressions ------------------------------------------------------------------------


class SuppressionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    address: str
    reason: Reason = Field(description=_REASON_DOC)
    source: str = Field(description="Who added it: `dsn`, `sendgrid`, `smtp`, `api`, `cli`.")
    detail: str
    outbound_id: str | None = Field(description="The request whose feedback added it.")
    created_at: datetime

    @classmethod
    def of(cls, value: Suppression) -> Self:
        return cls.model_validate(value)


class SuppressionList(BaseModel):
    suppressions: list[SuppressionOut]
    next_cursor: str | None

    @classmethod
    def of(cls, page: Page[Suppression]) -> Self:
        return cls(
            suppressions=[SuppressionOut.of(s) for s in page.items],
            next_cursor=page.next_cursor,
        )


class SuppressionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    address: Annotated[str, StringConstraints(min_length=3, max_length=320)]
    reason: Reason = Field("manual", description=_REASON_DOC)
    detail: Annotated[str, StringConstraints(max_length=1000)] = Field(
        "", description="Why, for people reading the list later."
    )


@router.get("/v1/suppressions", tags=["suppressions"], responses=PROBLEM_RESPONSES)
def list_suppressions(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    reason: Reason | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> SuppressionList:
    """Addresses the workspace will not send to, newest first."""
    page = runtime.feedback.list_suppressions(principal, reason=reason, limit=limit, cursor=cursor)
    return SuppressionList.of(page)


@router.post(
    "/v1/suppressions",
    tags=["suppressions"],
    status_code=201,
    responses={
        **PROBLEM_RESPONSES,
        409: _problem("The address is already suppressed (`conflict`, `reason`)"),
    },
)
def add_suppression(
    runtime: RuntimeDep, principal: PrincipalDep, body: SuppressionIn
) -> SuppressionOut:
    """Stop sending to an address (audited). Outbound mail to it is then blocked by
    the policy's suppression step."""
    found = runtime.feedback.add_suppression(
        principal, body.address, reason=body.reason, detail=body.detail
    )
    return SuppressionOut.of(found)


@router.delete(
    "/v1/suppressions/{address}",
    tags=["suppressions"],
    status_code=204,
    responses=PROBLEM_RESPONSES,
)
def remove_suppression(runtime: RuntimeDep, principal: PrincipalDep, address: str) -> Response:
    """Allow sending to an address again (audited)."""
    runtime.feedback.remove_suppression(principal, address)
    return Response(status_code=204)


# -- trust ----------------------------------------------------------------------------------


class TrustOut(BaseModel):
    """An agent's sending reputation over the last 30 days, per recipient."""

    agent_id: str
    tier: str
    window_days: float
    sent: int
    delivered: int = Field(description="Reported delivered by the recipient's server.")
    reached: int = Field(description="Delivered, or sent and not bounced.")
    bounced: int = Field(description="Hard bounces.")
    complaints: int
    unsubscribes: int
    bounce_rate: float
    complaint_rate: float = Field(description="complaints / reached.")
    score: float = Field(
        description="0..1; Beta(9, 1) prior (a new agent is 0.9), a complaint weighs "
        "as ten bad outcomes."
    )
    lower_tier: bool = Field(description="Whether this figure would lower the tier now.")
    verdict: str = Field(description="Why, in words.")

    @classmethod
    def of(cls, trust: AgentTrust) -> Self:
        figure: TrustFigure = trust.figure
        return cls(
            agent_id=trust.agent_id,
            tier=trust.tier,
            window_days=figure.window_days,
            sent=figure.sent,
            delivered=figure.delivered,
            reached=figure.reached,
            bounced=figure.bounced,
            complaints=figure.complaints,
            unsubscribes=figure.unsubscribes,
            bounce_rate=figure.bounce_rate,
            complaint_rate=figure.complaint_rate,
            score=figure.score,
            lower_tier=trust.verdict.lower,
            verdict=trust.verdict.reason,
        )


@router.get("/v1/agents/{agent_id}/trust", tags=["suppressions"], responses=PROBLEM_RESPONSES)
def agent_trust(runtime: RuntimeDep, principal: PrincipalDep, agent_id: str) -> TrustOut:
    """Bounce and complaint figures and the trust score of an agent (owners, or the
    agent's own key with `messages:read`)."""
    return TrustOut.of(runtime.feedback.trust(principal, agent_id))
