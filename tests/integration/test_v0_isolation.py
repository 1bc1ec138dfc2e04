"""Object-level authorisation on the AgentMail face, route by route.

Every /v0 route that names an object is called with agent A's real ids by two
strangers: agent B of the same workspace (agent key) and the owner of another
workspace. Each must be refused (403/404) and A's objects must be unchanged
afterwards; every listing must leave A's ids out. A new /v0 route without a probe here
fails the first test, so isolation is decided when a route is added, not later.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from mailgate.api.app import create_app
from mailgate.domain.compose import AttachmentIn
from mailgate.runtime import Runtime
from mailgate.services.drafts import DraftFields
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, deliver, route_table

pytestmark = pytest.mark.anyio

_MAIL = {"to": ["x@example.com"], "subject": "s", "text": "t"}

# (method, path template) -> JSON body that would be valid for the owner of the object,
# so a refusal cannot come from validation instead of authorisation.
PROBES: dict[tuple[str, str], dict[str, Any] | None] = {
    ("DELETE", "/v0/inboxes/{inbox_id}"): None,
    ("GET", "/v0/inboxes/{inbox_id}"): None,
    ("PATCH", "/v0/inboxes/{inbox_id}"): {"display_name": "taken over"},
    ("GET", "/v0/inboxes/{inbox_id}/drafts"): None,
    ("POST", "/v0/inboxes/{inbox_id}/drafts"): _MAIL,
    ("DELETE", "/v0/inboxes/{inbox_id}/drafts/{draft_id}"): None,
    ("GET", "/v0/inboxes/{inbox_id}/drafts/{draft_id}"): None,
    ("PATCH", "/v0/inboxes/{inbox_id}/drafts/{draft_id}"): {"subject": "taken over"},
    ("GET", "/v0/inboxes/{inbox_id}/drafts/{draft_id}/attachments/{attachment_id}"): None,
    ("POST", "/v0/inboxes/{inbox_id}/drafts/{draft_id}/send"): {},
    ("GET", "/v0/drafts/{draft_id}"): None,
    ("GET", "/v0/drafts/{draft_id}/attachments/{attachment_id}"): None,
    ("GET", "/v0/inboxes/{inbox_id}/lists/{direction}/{type}"): None,
    ("POST", "/v0/inboxes/{inbox_id}/lists/{direction}/{type}"): {"entry": "y@example.com"},
    ("DELETE", "/v0/inboxes/{inbox_id}/lists/{direction}/{type}/{entry}"): None,
    ("GET", "/v0/inboxes/{inbox_id}/lists/{direction}/{type}/{entry}"): None,
    ("GET", "/v0/inboxes/{inbox_id}/messages"): None,
    ("POST", "/v0/inboxes/{inbox_id}/messages/send"): _MAIL,
    ("GET", "/v0/inboxes/{inbox_id}/messages/{message_id}"): None,
    ("PATCH", "/v0/inboxes/{inbox_id}/messages/{message_id}"): {"remove_labels": ["unread"]},
    ("GET", "/v0/inboxes/{inbox_id}/messages/{message_id}/attachments/{attachment_id}"): None,
    ("POST", "/v0/inboxes/{inbox_id}/messages/{message_id}/forward"): {"to": ["x@example.com"]},
    ("GET", "/v0/inboxes/{inbox_id}/messages/{message_id}/raw"): None,
    ("POST", "/v0/inboxes/{inbox_id}/messages/{message_id}/reply"): {"text": "t"},
    ("POST", "/v0/inboxes/{inbox_id}/messages/{message_id}/reply-all"): {"text": "t"},
    ("GET", "/v0/inboxes/{inbox_id}/threads"): None,
    ("GET", "/v0/inboxes/{inbox_id}/threads/{thread_id}"): None,
    ("GET", "/v0/inboxes/{inbox_id}/threads/{thread_id}/attachments/{attachment_id}"): None,
    ("GET", "/v0/threads/{thread_id}"): None,
    ("GET", "/v0/threads/{thread_id}/attachments/{attachment_id}"): None,
    ("GET", "/v0/inboxes/{inbox_id}/webhooks"): None,
    ("POST", "/v0/inboxes/{inbox_id}/webhooks"): {
        "url": "https://hooks.example.com/x",
        "event_types": ["message.received"],
    },
    ("DELETE", "/v0/inboxes/{inbox_id}/webhooks/{webhook_id}"): None,
    ("GET", "/v0/inboxes/{inbox_id}/webhooks/{webhook_id}"): None,
    ("PATCH", "/v0/inboxes/{inbox_id}/webhooks/{webhook_id}"): {"enabled": False},
    ("DELETE", "/v0/webhooks/{webhook_id}"): None,
    ("GET", "/v0/webhooks/{webhook_id}"): None,
    ("PATCH", "/v0/webhooks/{webhook_id}"): {"enabled": False},
    # Signed links: no bearer key at all; without a valid signature they give nothing.
    ("GET", "/v0/attachments/{attachment_id}/download"): None,
    ("GET", "/v0/attachments/{attachment_id}/text"): None,
    ("GET", "/v0/messages/{message_id}/raw/download"): None,
    ("GET", "/v0/drafts/{draft_id}/attachments/{attachment_id}/download"): None,
}

# Routes naming no object: listings (checked for A's ids), creation in the caller's
# own scope, workspace lists, and the catch-all.
LISTINGS = ("/v0/inboxes", "/v0/threads", "/v0/drafts", "/v0/webhooks")
UNSCOPED = {
    ("POST", "/v0/inboxes"),
    ("POST", "/v0/webhooks"),
    ("GET", "/v0/lists/{direction}/{type}"),
    ("POST", "/v0/lists/{direction}/{type}"),
    ("DELETE", "/v0/lists/{direction}/{type}/{entry}"),
    ("GET", "/v0/lists/{direction}/{type}/{entry}"),
    *((method, "/v0/{rest:path}") for method in ("GET", "POST", "PUT", "PATCH", "DELETE")),
    *(("GET", path) for path in LISTINGS),
}


def test_every_v0_route_has_an_isolation_probe(runtime: Runtime) -> None:
    routes = {r for r in route_table(create_app(runtime)) if r[1].startswith("/v0/")}
    assert routes - set(PROBES) - UNSCOPED == set()
    assert set(PROBES) - routes == set(), "a probe names a route that no longer exists"


def _victim(runtime: Runtime) -> tuple[AgentHandle, dict[str, str]]:
    """Agent A with one of everything: mail with an attachment, a draft with one, a
    webhook, an inbox list entry."""
    victim = make_agent(runtime, "victim", workspace="acme")
    stored = deliver(
        runtime,
        victim,
        subject="secret plans",
        attachments=[("plans.txt", "text/plain", b"the plans")],
    )
    principal = runtime.tenancy.authenticate(victim.agent_key)
    detail = runtime.queries.get_message(principal, stored.message_id)
    draft, _ = runtime.drafts.create(
        principal,
        victim.agent_id,
        DraftFields(to=("carol@example.com",), subject="draft plans"),
        attachments=[AttachmentIn("d.txt", "text/plain", b"draft bytes")],
    )
    hook, _ = runtime.webhooks.create(
        principal,
        url="https://hooks.example.com/victim",
        event_types=["message.received"],
        agent_id=victim.agent_id,
    )
    owner = runtime.tenancy.authenticate(victim.owner_key)
    runtime.agentmail_lists.add_entry(
        owner, "send", "block", "blocked@example.com", agent_id=victim.agent_id
    )
    ids = {
        "inbox_id": victim.address,
        "message_id": stored.message_id,
        "thread_id": detail.summary.thread_id,
        "attachment_id": detail.attachments[0].attachment_id,
        "draft_id": draft.id,
        "draft_attachment_id": draft.attachments[0]["attachment_id"],
        "webhook_id": hook.id,
        "direction": "send",
        "type": "block",
        "entry": "blocked@example.com",
    }
    return victim, ids


def _path(template: str, ids: dict[str, str]) -> str:
    if "/drafts/" in template:
        ids = {**ids, "attachment_id": ids["draft_attachment_id"]}
    return re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], template)


async def test_no_v0_route_shows_or_changes_one_agents_objects_for_another(
    runtime: Runtime,
) -> None:
    victim, ids = _victim(runtime)
    sibling = runtime.tenancy.create_agent(victim.workspace_id, "sibling")
    stranger = make_agent(runtime, "stranger", workspace="other corp")
    callers = {
        "agent of the same workspace": auth(sibling.api_key),
        "owner of another workspace": auth(stranger.owner_key),
        "agent of another workspace": auth(stranger.agent_key),
    }
    async with api_client(runtime) as client:
        for who, headers in callers.items():
            for (method, template), body in PROBES.items():
                url = _path(template, ids)
                response = await client.request(method, url, json=body, headers=headers)
                assert response.status_code in (403, 404), (who, method, url, response.text)
            for path in LISTINGS:
                listing = await client.get(path, headers=headers)
                assert listing.status_code in (200, 403), (who, path, listing.text)
                leaked = [v for v in ids.values() if len(v) > 8 and v in listing.text]
                assert leaked == [], (who, path, leaked)

        # A's objects are all still there, unchanged.
        own = auth(victim.agent_key)
        inbox = await client.get(f"/v0/inboxes/{ids['inbox_id']}", headers=own)
        assert inbox.status_code == 200 and inbox.json().get("display_name") != "taken over"
        message = await client.get(
            f"/v0/inboxes/{ids['inbox_id']}/messages/{ids['message_id']}", headers=own
        )
        assert "unread" in message.json()["labels"]
        draft = await client.get(f"/v0/drafts/{ids['draft_id']}", headers=own)
        assert draft.json()["subject"] == "draft plans"
        hook = await client.get(f"/v0/webhooks/{ids['webhook_id']}", headers=own)
        assert hook.json()["enabled"] is True
        entry = await client.get(
            f"/v0/inboxes/{ids['inbox_id']}/lists/send/block/blocked@example.com", headers=own
        )
        assert entry.status_code == 200
