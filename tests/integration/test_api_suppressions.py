"""``POST /feedback/sendgrid`` (signed with a key pair made here, posted through the
real ASGI app), ``/v1/suppressions`` and ``/v1/agents/{agent_id}/trust``."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from sqlalchemy import select, update

from mailgate.api import feedback as feedback_api
from mailgate.config import Settings
from mailgate.ids import new_id
from mailgate.runtime import Runtime
from mailgate.store.schema import agents, events, outbound, webhook_receipts
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, problem_code, route_table
from tests.integration.test_feedback import (
    _sent_outbound,
    recipient_statuses,
    state_of,
    suppressed,
    tier_of,
)

pytestmark = pytest.mark.anyio

PRIVATE = ec.generate_private_key(ec.SECP256R1())
PUBLIC = base64.b64encode(
    PRIVATE.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def signed(settings: Settings) -> Iterator[Runtime]:
    """A gateway whose Event Webhook is on, verifying with :data:`PUBLIC`."""
    runtime = Runtime.build(settings.model_copy(update={"sendgrid_event_public_key": PUBLIC}))
    yield runtime
    runtime.close()


@pytest.fixture
def bot(signed: Runtime) -> AgentHandle:
    return make_agent(signed)


def headers(body: bytes, *, stamp: str | None = None, key: Any = PRIVATE) -> dict[str, str]:
    stamp = stamp or str(int(time.time()))
    signature = key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
    }


def event(kind: str, email: str, **fields: Any) -> dict[str, Any]:
    return {
        "event": kind,
        "email": email,
        "timestamp": 1772366400,
        "sg_event_id": new_id("sg"),
        **fields,
    }


async def post(client: httpx.AsyncClient, payload: Any) -> httpx.Response:
    body = json.dumps(payload).encode()
    return await client.post("/feedback/sendgrid", content=body, headers=headers(body))


def outbound_events(runtime: Runtime) -> list[tuple[str, dict[str, Any]]]:
    with runtime.db.read() as conn:
        rows = conn.execute(
            select(events.c.type, events.c.payload)
            .where(events.c.type.like("outbound.%"))
            .order_by(events.c.seq)
        )
        return [(r.type, r.payload) for r in rows]


# -- the Event Webhook --------------------------------------------------------------------


async def test_the_event_webhook_is_off_until_its_key_is_set(runtime: Runtime) -> None:
    async with api_client(runtime) as client:
        response = await post(client, [event("delivered", "a@example.org")])

    assert response.status_code == 404
    assert problem_code(response) == "inbound_disabled"


async def test_signed_events_update_recipients_suppressions_and_the_agents_feed(
    signed: Runtime, bot: AgentHandle
) -> None:
    outbound_id, _ = _sent_outbound(signed, bot, ["gone@example.org", "ok@example.org"])
    payload = [
        event("processed", "gone@example.org", outbound_id=outbound_id),
        event("bounce", "gone@example.org", outbound_id=outbound_id, type="bounce",
              status="5.1.1", reason="550 5.1.1 no such user"),
        event("delivered", "ok@example.org", outbound_id=outbound_id, response="250 OK"),
        event("open", "ok@example.org", outbound_id=outbound_id),
    ]  # fmt: skip

    async with api_client(signed) as client:
        response = await post(client, payload)

    assert response.status_code == 200, response.text
    assert response.json() == {
        "received": 4, "applied": 2, "duplicates": 0, "ignored": 2, "unmatched": 0,
        "tier_changes": [],
    }  # fmt: skip
    assert recipient_statuses(signed, outbound_id) == {
        "gone@example.org": "bounced",
        "ok@example.org": "delivered",
    }
    assert state_of(signed, outbound_id) == "sent"  # one recipient is fine
    assert suppressed(signed, bot.workspace_id) == {
        "gone@example.org": ("hard_bounce", "sendgrid", outbound_id)
    }
    kinds = [(kind, p["recipient"], p["source"]) for kind, p in outbound_events(signed)]
    assert kinds == [
        ("outbound.bounced", "gone@example.org", "sendgrid"),
        ("outbound.delivered", "ok@example.org", "sendgrid"),
    ]


async def test_a_retried_post_is_answered_200_and_applied_once(
    signed: Runtime, bot: AgentHandle
) -> None:
    outbound_id, _ = _sent_outbound(signed, bot, ["r@example.org"])
    body = json.dumps([event("bounce", "r@example.org", outbound_id=outbound_id)]).encode()

    async with api_client(signed) as client:
        first = await client.post("/feedback/sendgrid", content=body, headers=headers(body))
        retry = await client.post("/feedback/sendgrid", content=body, headers=headers(body))

    assert (first.status_code, retry.status_code) == (200, 200)
    assert (first.json()["applied"], retry.json()["applied"]) == (1, 0)
    assert retry.json()["duplicates"] == 1
    assert [kind for kind, _ in outbound_events(signed)] == ["outbound.bounced"]
    with signed.db.read() as conn:
        receipt = conn.execute(
            select(webhook_receipts.c.provider, webhook_receipts.c.expires_at)
        ).one()
    assert receipt.provider == "sendgrid_events"


async def test_two_copies_of_a_post_at_once_apply_it_once(
    signed: Runtime, bot: AgentHandle
) -> None:
    outbound_id, _ = _sent_outbound(signed, bot, ["twice@example.org"])
    payload = [event("spamreport", "twice@example.org", outbound_id=outbound_id)]

    async with api_client(signed) as client:
        answers = await asyncio.gather(post(client, payload), post(client, payload))

    assert [a.status_code for a in answers] == [200, 200]
    assert sorted(a.json()["applied"] for a in answers) == [0, 1]
    assert [kind for kind, _ in outbound_events(signed)] == ["outbound.complained"]


async def test_events_without_our_custom_arg_match_by_the_x_message_id(
    signed: Runtime, bot: AgentHandle
) -> None:
    outbound_id, _ = _sent_outbound(
        signed, bot, ["m@example.org"], provider_message_id="14c5d75ce93"
    )
    payload = [
        event("delivered", "m@example.org", sg_message_id="14c5d75ce93.filter0001.16648.0"),
        event("delivered", "m@example.org", sg_message_id="unknown.filter0001.0"),
        event("bounce", "nobody@example.org"),  # an asynchronous bounce with no ids at all
    ]

    async with api_client(signed) as client:
        response = await post(client, payload)

    assert (response.json()["applied"], response.json()["unmatched"]) == (1, 2)
    assert state_of(signed, outbound_id) == "delivered"


async def test_spam_reports_suppress_and_lower_the_tier_past_the_complaint_rate(
    signed: Runtime, bot: AgentHandle
) -> None:
    with signed.db.write() as conn:
        conn.execute(update(agents).where(agents.c.id == bot.agent_id).values(tier="open"))
    recipients = [f"n{i}@example.org" for i in range(25)]
    outbound_id, _ = _sent_outbound(signed, bot, recipients)

    async with api_client(signed) as client:
        response = await post(
            client,
            [event("spamreport", "n0@example.org", outbound_id=outbound_id),
             event("group_unsubscribe", "n1@example.org", outbound_id=outbound_id)],
        )  # fmt: skip

    assert response.status_code == 200
    assert response.json()["tier_changes"] == [
        {"agent_id": bot.agent_id, "from": "open", "to": "allowlisted_domains"}
    ]
    assert tier_of(signed, bot.agent_id) == "allowlisted_domains"
    assert {a: r for a, (r, _, _) in suppressed(signed, bot.workspace_id).items()} == {
        "n0@example.org": "complaint",
        "n1@example.org": "unsubscribe",
    }
    reasons = [(kind, p["reason"]) for kind, p in outbound_events(signed)]
    assert reasons == [
        ("outbound.complained", "complaint"),
        ("outbound.complained", "unsubscribe"),
    ]


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda h: {k: v for k, v in h.items() if "Signature" not in k}, "missing_signature"),
        (lambda h: {k: v for k, v in h.items() if "Timestamp" not in k}, "missing_timestamp"),
        (lambda h: {**h, "X-Twilio-Email-Event-Webhook-Timestamp": "1"}, "stale_timestamp"),
        (lambda h: {**h, "X-Twilio-Email-Event-Webhook-Signature": "AAAA"}, "bad_signature"),
    ],
)
async def test_a_post_without_a_good_fresh_signature_is_refused_with_its_reason(
    signed: Runtime, bot: AgentHandle, mangle: Any, reason: str
) -> None:
    outbound_id, _ = _sent_outbound(signed, bot, ["s@example.org"])
    body = json.dumps([event("bounce", "s@example.org", outbound_id=outbound_id)]).encode()

    async with api_client(signed) as client:
        response = await client.post(
            "/feedback/sendgrid", content=body, headers=mangle(headers(body))
        )

    assert response.status_code == 401
    assert problem_code(response) == "invalid_signature"
    assert response.json()["reason"] == reason
    assert recipient_statuses(signed, outbound_id) == {"s@example.org": "sent"}


async def test_a_body_signed_by_another_key_or_altered_is_refused(signed: Runtime) -> None:
    body = json.dumps([event("delivered", "a@example.org")]).encode()
    other = ec.generate_private_key(ec.SECP256R1())

    async with api_client(signed) as client:
        forged = await client.post(
            "/feedback/sendgrid", content=body, headers=headers(body, key=other)
        )
        altered = await client.post(
            "/feedback/sendgrid", content=body + b" ", headers=headers(body)
        )

    assert [problem_code(forged), problem_code(altered)] == ["invalid_signature"] * 2
    assert [forged.json()["reason"], altered.json()["reason"]] == ["bad_signature"] * 2


@pytest.mark.parametrize("body", [b"not json", b'{"event": "bounce"}'])
async def test_a_signed_body_that_is_not_a_json_array_is_a_bad_request(
    signed: Runtime, body: bytes
) -> None:
    async with api_client(signed) as client:
        response = await client.post("/feedback/sendgrid", content=body, headers=headers(body))

    assert response.status_code == 400
    assert problem_code(response) == "bad_request"


async def test_a_key_that_is_not_p256_is_a_configuration_error(settings: Settings) -> None:
    runtime = Runtime.build(settings.model_copy(update={"sendgrid_event_public_key": "bm9wZQ=="}))
    try:
        async with api_client(runtime, raise_app_exceptions=False) as client:
            response = await post(client, [])
    finally:
        runtime.close()

    assert response.status_code == 500
    assert problem_code(response) == "invalid_config"


# -- suppressions ---------------------------------------------------------------------------


async def test_owners_add_list_and_remove_suppressions(
    runtime: Runtime, agent: AgentHandle
) -> None:
    owner = auth(agent.owner_key)
    async with api_client(runtime) as client:
        created = await client.post(
            "/v1/suppressions",
            json={"address": "Bob@Example.org", "reason": "unsubscribe", "detail": "by phone"},
            headers=owner,
        )
        again = await client.post(
            "/v1/suppressions", json={"address": "bob@example.org"}, headers=owner
        )
        listed = await client.get("/v1/suppressions", headers=owner)
        removed = await client.delete("/v1/suppressions/BOB@example.org", headers=owner)
        gone = await client.delete("/v1/suppressions/bob@example.org", headers=owner)
        after = await client.get("/v1/suppressions", headers=owner)

    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["address"], body["reason"], body["source"], body["detail"]) == (
        "bob@example.org", "unsubscribe", "api", "by phone",
    )  # fmt: skip
    assert again.status_code == 409
    assert problem_code(again) == "conflict"
    assert again.json()["reason"] == "unsubscribe"
    assert [s["address"] for s in listed.json()["suppressions"]] == ["bob@example.org"]
    assert listed.json()["next_cursor"] is None
    assert removed.status_code == 204
    assert gone.status_code == 404 and problem_code(gone) == "not_found"
    assert after.json()["suppressions"] == []


async def test_listing_pages_and_filters(runtime: Runtime, agent: AgentHandle) -> None:
    owner = auth(agent.owner_key)
    async with api_client(runtime) as client:
        for i in range(3):
            await client.post(
                "/v1/suppressions", json={"address": f"l{i}@example.org"}, headers=owner
            )
        first = await client.get("/v1/suppressions", params={"limit": 2}, headers=owner)
        rest = await client.get(
            "/v1/suppressions",
            params={"limit": 2, "cursor": first.json()["next_cursor"]},
            headers=owner,
        )
        none = await client.get("/v1/suppressions", params={"reason": "complaint"}, headers=owner)
        bad = await client.get("/v1/suppressions", params={"cursor": "nope"}, headers=owner)

    pages = first.json()["suppressions"] + rest.json()["suppressions"]
    assert [s["address"] for s in pages] == ["l2@example.org", "l1@example.org", "l0@example.org"]
    assert none.json()["suppressions"] == []
    assert bad.status_code == 422 and problem_code(bad) == "validation_failed"


@pytest.mark.parametrize(
    "body",
    [
        {"address": "not an address"},
        {"address": "x@example.org", "reason": "because"},
        {"address": "x@example.org", "colour": "red"},
    ],
)
async def test_a_malformed_suppression_is_refused_naming_the_field(
    runtime: Runtime, agent: AgentHandle, body: dict[str, Any]
) -> None:
    async with api_client(runtime) as client:
        response = await client.post("/v1/suppressions", json=body, headers=auth(agent.owner_key))

    assert response.status_code == 422
    assert problem_code(response) == "validation_failed"


async def test_the_trust_figure_is_shown_to_owners_and_the_agent_itself(
    runtime: Runtime, agent: AgentHandle
) -> None:
    _sent_outbound(runtime, agent, ["t@example.org"])
    async with api_client(runtime) as client:
        as_owner = await client.get(
            f"/v1/agents/{agent.agent_id}/trust", headers=auth(agent.owner_key)
        )
        as_self = await client.get(
            f"/v1/agents/{agent.agent_id}/trust", headers=auth(agent.agent_key)
        )

    assert as_owner.status_code == 200, as_owner.text
    figure = as_owner.json()
    assert (figure["agent_id"], figure["tier"], figure["sent"], figure["reached"]) == (
        agent.agent_id, "reply_only", 1, 1,
    )  # fmt: skip
    assert figure["score"] == pytest.approx(10 / 11)
    assert figure["lower_tier"] is False and "fewer than" in figure["verdict"]
    assert as_self.json() == figure


# -- isolation ------------------------------------------------------------------------------


class World:
    def __init__(self, runtime: Runtime) -> None:
        self.victim = make_agent(runtime, "victim bot", workspace="acme")
        self.neighbour = runtime.tenancy.create_agent(self.victim.workspace_id, "neighbour bot")
        self.stranger = make_agent(runtime, "stranger bot", workspace="evil corp")
        runtime.feedback.add_suppression(
            feedback_api_owner(runtime, self.victim), "secret@example.org", reason="complaint"
        )


def feedback_api_owner(runtime: Runtime, handle: AgentHandle) -> Any:
    return runtime.tenancy.authenticate(handle.owner_key)


FEEDBACK_PROBES: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/v1/suppressions"): {},
    ("DELETE", "/v1/suppressions/{address}"): {"address": "secret@example.org"},
    ("GET", "/v1/agents/{agent_id}/trust"): {},
    # Last: the stranger's add lands in its own workspace, where it may then stay.
    ("POST", "/v1/suppressions"): {"json": {"address": "secret@example.org"}},
}
"""Every /v1 route of :mod:`mailgate.api.feedback` and how to call it about the victim."""


def test_every_feedback_route_has_an_isolation_probe() -> None:
    app = FastAPI()
    app.include_router(feedback_api.router)

    assert {r for r in route_table(app) if r[1].startswith("/v1/")} == set(FEEDBACK_PROBES)


async def test_no_feedback_route_shows_or_changes_another_workspaces_suppressions_or_figures(
    runtime: Runtime,
) -> None:
    world = World(runtime)
    neighbour_key = auth(world.neighbour.api_key)
    stranger_key = auth(world.stranger.owner_key)
    async with api_client(runtime) as client:
        for (method, path), probe in FEEDBACK_PROBES.items():
            url = path.format(address=probe.get("address", ""), agent_id=world.victim.agent_id)
            # An agent key, even of the victim's own workspace, touches no suppression
            # and sees no other agent's figure.
            answer = await client.request(
                method, url, json=probe.get("json"), headers=neighbour_key
            )
            expected = 404 if "trust" in path else 403
            assert answer.status_code == expected, f"neighbour on {method} {path}: {answer.text}"
            # Another workspace's owner sees and changes only its own workspace.
            answer = await client.request(method, url, json=probe.get("json"), headers=stranger_key)
            if method == "GET" and "trust" not in path:
                assert answer.json()["suppressions"] == []
            elif method == "POST":
                assert answer.status_code == 201  # in the stranger's own workspace
            else:
                assert answer.status_code == 404, f"stranger on {method} {path}"
                ghost = await client.request(
                    method, url.replace(world.victim.agent_id, "agt_" + "0" * 26)
                    .replace("secret@", "ghost@"), headers=stranger_key,
                )  # fmt: skip
                assert problem_code(ghost) == problem_code(answer)
    assert set(suppressed(runtime, world.victim.workspace_id)) == {"secret@example.org"}
    assert set(suppressed(runtime, world.stranger.workspace_id)) == {"secret@example.org"}
    with runtime.db.read() as conn:
        assert conn.execute(select(outbound.c.id)).first() is None
