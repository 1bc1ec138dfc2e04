"""Rules over HTTP: CRUD, order, enable/disable, dry runs, validation, audit, policy
versions, and owner-only isolation of every policy route, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from mailgate.api import policy as policy_api
from mailgate.domain import rules
from mailgate.runtime import Runtime
from mailgate.services.ingest import Envelope, SenderAuth
from mailgate.store.schema import agents, audit_log, workspaces
from mailgate.testing import build_message
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, deliver, problem_code, route_table

pytestmark = pytest.mark.anyio

FROM_EXAMPLE = {"field": "from_domain", "match": "is", "value": "example.com"}
SUBJECT_INVOICE = {"field": "subject", "match": "contains", "value": "invoice"}


async def create(client: httpx.AsyncClient, key: str, **body: Any) -> dict[str, Any]:
    """POST a rule as ``key`` and return the created rule."""
    response = await client.post("/v1/rules", json=body, headers=auth(key))
    assert response.status_code == 201, response.text
    payload: dict[str, Any] = response.json()
    return payload


def policy_rule_ids(runtime: Runtime, agent_id: str) -> list[str | None]:
    """The ids of the rules ingest would run for the agent right now, in order."""
    with runtime.db.read() as conn:
        compiled = runtime.policies.get(conn, agent_id)
    return [c.rule.id for c in compiled.inbound.rules]


def audit_actions(runtime: Runtime, workspace_id: str) -> list[str]:
    with runtime.db.read() as conn:
        return list(
            conn.execute(
                select(audit_log.c.action)
                .where(audit_log.c.workspace_id == workspace_id)
                .order_by(audit_log.c.seq)
            ).scalars()
        )


# -- CRUD -------------------------------------------------------------------------------


async def test_an_owner_creates_reads_updates_and_deletes_a_rule(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        created = await create(
            client,
            agent.owner_key,
            agent_id=agent.agent_id,
            name="newsletters",
            action="review",
            condition={"field": "header:List-Id", "match": "glob", "value": "*.lists.example"},
        )
        assert created["rule_id"].startswith("rul_")
        assert created["scope"] == "agent" and created["agent_id"] == agent.agent_id
        assert created["position"] == 0 and created["enabled"] is True
        assert created["direction"] == "inbound"
        # The canonical spelling of the header field is stored.
        assert created["condition"]["field"] == "header:list-id"

        url = f"/v1/rules/{created['rule_id']}"
        headers = auth(agent.owner_key)
        fetched = await client.get(url, headers=headers)
        assert fetched.json() == created

        patched = await client.patch(
            url, json={"name": "lists", "action": "trash"}, headers=headers
        )
        assert patched.status_code == 200, patched.text
        assert patched.json()["name"] == "lists" and patched.json()["action"] == "trash"
        assert patched.json()["condition"] == created["condition"]  # untouched

        deleted = await client.delete(url, headers=headers)
        assert deleted.status_code == 200
        assert deleted.json() == {"rule_id": created["rule_id"], "deleted": True}
        gone = await client.get(url, headers=headers)
        assert gone.status_code == 404 and problem_code(gone) == "not_found"
        again = await client.delete(url, headers=headers)
        assert again.status_code == 404


async def test_the_listing_puts_agent_rules_before_workspace_defaults_and_filters(
    runtime: Runtime, agent: AgentHandle
) -> None:
    other = runtime.tenancy.create_agent(agent.workspace_id, "other bot")
    key = agent.owner_key
    async with api_client(runtime) as client:
        default = await create(client, key, action="quarantine", condition=FROM_EXAMPLE)
        mine = await create(
            client, key, agent_id=agent.agent_id, action="review", condition=SUBJECT_INVOICE
        )
        theirs = await create(
            client, key, agent_id=other.agent_id, action="trash", condition=FROM_EXAMPLE
        )
        outbound = await create(
            client,
            key,
            agent_id=agent.agent_id,
            action="block",
            direction="outbound",
            condition=FROM_EXAMPLE,
        )

        async def ids(**params: str) -> list[str]:
            response = await client.get("/v1/rules", params=params, headers=auth(key))
            assert response.status_code == 200, response.text
            return [r["rule_id"] for r in response.json()["rules"]]

        everything = await ids()
        assert everything[-1] == default["rule_id"]
        assert set(everything) == {
            default["rule_id"],
            mine["rule_id"],
            theirs["rule_id"],
            outbound["rule_id"],
        }
        assert await ids(agent_id=agent.agent_id) == [
            mine["rule_id"],
            outbound["rule_id"],
            default["rule_id"],
        ]
        assert await ids(agent_id=agent.agent_id, direction="inbound") == [
            mine["rule_id"],
            default["rule_id"],
        ]
        assert await ids(agent_id=agent.agent_id, scope="agent") == [
            mine["rule_id"],
            outbound["rule_id"],
        ]
        assert await ids(scope="workspace") == [default["rule_id"]]
        assert set(await ids(scope="agent", direction="inbound")) == {
            mine["rule_id"],
            theirs["rule_id"],
        }
        bad = await client.get(
            "/v1/rules",
            params={"scope": "workspace", "agent_id": agent.agent_id},
            headers=auth(key),
        )
        assert bad.status_code == 422
        assert [e["field"] for e in bad.json()["errors"]] == ["agent_id"]
        bad_scope = await client.get("/v1/rules", params={"scope": "mine"}, headers=auth(key))
        assert [e["field"] for e in bad_scope.json()["errors"]] == ["scope"]


# -- order ------------------------------------------------------------------------------


async def test_new_rules_go_last_unless_placed_and_positions_stay_dense(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = agent.owner_key
    async with api_client(runtime) as client:
        a = await create(
            client, key, agent_id=agent.agent_id, name="a", action="review", condition=FROM_EXAMPLE
        )
        b = await create(
            client, key, agent_id=agent.agent_id, name="b", action="review", condition=FROM_EXAMPLE
        )
        first = await create(
            client,
            key,
            agent_id=agent.agent_id,
            name="first",
            action="trash",
            condition=FROM_EXAMPLE,
            position=0,
        )
        far = await create(
            client,
            key,
            agent_id=agent.agent_id,
            name="far",
            action="trash",
            condition=FROM_EXAMPLE,
            position=99,
        )
        assert (a["position"], b["position"], first["position"], far["position"]) == (0, 1, 0, 3)

        async def order() -> list[tuple[str, int]]:
            response = await client.get(
                "/v1/rules", params={"agent_id": agent.agent_id}, headers=auth(key)
            )
            return [(r["name"], r["position"]) for r in response.json()["rules"]]

        assert await order() == [("first", 0), ("a", 1), ("b", 2), ("far", 3)]
        moved = await client.patch(
            f"/v1/rules/{far['rule_id']}", json={"position": 1}, headers=auth(key)
        )
        assert moved.json()["position"] == 1
        assert await order() == [("first", 0), ("far", 1), ("a", 2), ("b", 3)]
        await client.delete(f"/v1/rules/{first['rule_id']}", headers=auth(key))
        assert await order() == [("far", 0), ("a", 1), ("b", 2)]
    # Ingest sees the same order at once.
    assert policy_rule_ids(runtime, agent.agent_id) == [far["rule_id"], a["rule_id"], b["rule_id"]]


async def test_reorder_sets_the_new_order_for_the_listing_and_for_ingest(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = agent.owner_key
    async with api_client(runtime) as client:
        made = [
            await create(
                client,
                key,
                agent_id=agent.agent_id,
                name=f"r{i}",
                action="review",
                condition={**FROM_EXAMPLE, "value": f"d{i}.example"},
            )
            for i in range(3)
        ]
        policy_rule_ids(runtime, agent.agent_id)  # warm the cache: the change must evict it
        wanted = [made[2]["rule_id"], made[0]["rule_id"], made[1]["rule_id"]]
        response = await client.post(
            "/v1/rules/reorder",
            json={"agent_id": agent.agent_id, "rule_ids": wanted},
            headers=auth(key),
        )
        assert response.status_code == 200, response.text
        body = response.json()["rules"]
        assert [(r["rule_id"], r["position"]) for r in body] == [
            (w, i) for i, w in enumerate(wanted)
        ]
    assert policy_rule_ids(runtime, agent.agent_id) == wanted


async def test_workspace_defaults_reorder_with_a_null_agent(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = agent.owner_key
    async with api_client(runtime) as client:
        x = await create(client, key, name="x", action="review", condition=FROM_EXAMPLE)
        y = await create(client, key, name="y", action="trash", condition=SUBJECT_INVOICE)
        response = await client.post(
            "/v1/rules/reorder",
            json={"agent_id": None, "rule_ids": [y["rule_id"], x["rule_id"]]},
            headers=auth(key),
        )
        assert [r["name"] for r in response.json()["rules"]] == ["y", "x"]
    assert policy_rule_ids(runtime, agent.agent_id) == [y["rule_id"], x["rule_id"]]


@pytest.mark.parametrize(
    "pick",
    [
        pytest.param(lambda ids: ids[:1], id="one missing"),
        pytest.param(lambda ids: [*ids, "rul_00000000000000000000000000"], id="one unknown"),
        pytest.param(lambda ids: [ids[0], ids[0], ids[1]], id="a repeat"),
        pytest.param(lambda ids: [], id="none"),
    ],
)
async def test_a_reorder_that_is_not_exactly_the_owners_rules_is_a_422(
    runtime: Runtime, agent: AgentHandle, pick: Callable[[list[str]], list[str]]
) -> None:
    key = agent.owner_key
    async with api_client(runtime) as client:
        ids = [
            (
                await create(
                    client, key, agent_id=agent.agent_id, action="review", condition=FROM_EXAMPLE
                )
            )["rule_id"]
            for _ in range(2)
        ]
        response = await client.post(
            "/v1/rules/reorder",
            json={"agent_id": agent.agent_id, "rule_ids": pick(ids)},
            headers=auth(key),
        )
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == ["rule_ids"]
    assert policy_rule_ids(runtime, agent.agent_id) == ids  # unchanged


# -- enable / disable -------------------------------------------------------------------


async def test_disable_and_enable_take_a_rule_out_of_the_policy_and_back_at_once(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = agent.owner_key
    async with api_client(runtime) as client:
        rule = await create(
            client, key, agent_id=agent.agent_id, action="trash", condition=FROM_EXAMPLE
        )
        assert policy_rule_ids(runtime, agent.agent_id) == [rule["rule_id"]]
        off = await client.post(f"/v1/rules/{rule['rule_id']}/disable", headers=auth(key))
        assert off.status_code == 200 and off.json()["enabled"] is False
        assert policy_rule_ids(runtime, agent.agent_id) == []
        on = await client.post(f"/v1/rules/{rule['rule_id']}/enable", headers=auth(key))
        assert on.json()["enabled"] is True
        assert policy_rule_ids(runtime, agent.agent_id) == [rule["rule_id"]]
        # A rule created disabled is stored but not applied.
        idle = await create(
            client,
            key,
            agent_id=agent.agent_id,
            action="review",
            condition=SUBJECT_INVOICE,
            enabled=False,
        )
        assert idle["enabled"] is False
    assert policy_rule_ids(runtime, agent.agent_id) == [rule["rule_id"]]


async def test_every_change_bumps_the_owners_policy_version_in_its_transaction(
    runtime: Runtime, agent: AgentHandle
) -> None:
    def versions() -> tuple[int, int]:
        with runtime.db.read() as conn:
            agent_v = conn.execute(
                select(agents.c.policy_version).where(agents.c.id == agent.agent_id)
            ).scalar_one()
            ws_v = conn.execute(
                select(workspaces.c.policy_version).where(workspaces.c.id == agent.workspace_id)
            ).scalar_one()
        return agent_v, ws_v

    key = agent.owner_key
    async with api_client(runtime) as client:
        start = versions()
        rule = await create(
            client, key, agent_id=agent.agent_id, action="trash", condition=FROM_EXAMPLE
        )
        assert versions() == (start[0] + 1, start[1])
        await client.patch(f"/v1/rules/{rule['rule_id']}", json={"name": "n"}, headers=auth(key))
        assert versions() == (start[0] + 2, start[1])
        default = await create(client, key, action="review", condition=FROM_EXAMPLE)
        assert versions() == (start[0] + 2, start[1] + 1)
        await client.delete(f"/v1/rules/{default['rule_id']}", headers=auth(key))
        assert versions() == (start[0] + 2, start[1] + 2)
    with runtime.db.read() as conn:
        assert runtime.policies.get(conn, agent.agent_id).version == versions()


async def test_every_rule_change_is_in_the_audit_log_with_the_owner_as_actor(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = agent.owner_key
    async with api_client(runtime) as client:
        rule = await create(
            client, key, agent_id=agent.agent_id, action="trash", condition=FROM_EXAMPLE
        )
        url = f"/v1/rules/{rule['rule_id']}"
        await client.patch(url, json={"action": "review"}, headers=auth(key))
        await client.post(f"{url}/disable", headers=auth(key))
        await client.post(
            "/v1/rules/reorder",
            json={"agent_id": agent.agent_id, "rule_ids": [rule["rule_id"]]},
            headers=auth(key),
        )
        await client.delete(url, headers=auth(key))
    actions = audit_actions(runtime, agent.workspace_id)
    assert [a for a in actions if a.startswith("rule.")] == [
        "rule.created",
        "rule.updated",
        "rule.updated",
        "rule.reordered",
        "rule.deleted",
    ]
    with runtime.db.read() as conn:
        rows = conn.execute(select(audit_log).where(audit_log.c.target_id == rule["rule_id"])).all()
    assert {row.actor for row in rows} == {f"owner:{owner_id(runtime, agent)}"}
    updated = [row for row in rows if row.action == "rule.updated"]
    assert updated[0].detail["changed"] == ["action"]
    assert updated[1].detail["changed"] == ["enabled"]


def owner_id(runtime: Runtime, agent: AgentHandle) -> str:
    principal = runtime.tenancy.authenticate(agent.owner_key)
    assert principal.owner_id is not None
    return principal.owner_id


# -- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "field"),
    [
        pytest.param(
            {"any": [FROM_EXAMPLE, {"field": "subject", "match": "regex", "value": r"(a)\1"}]},
            "condition.any[1].value",
            id="backreference regex",
        ),
        pytest.param(
            {"all": [{"field": "colour", "match": "is", "value": "red"}]},
            "condition.all[0].field",
            id="unknown field",
        ),
        pytest.param(
            {"not": {"field": "subject", "match": "regex", "value": "(?=x)"}},
            "condition.not.value",
            id="look-ahead regex",
        ),
        pytest.param(
            {"field": "size", "match": "contains", "value": "1"},
            "condition.match",
            id="text match on a number",
        ),
        pytest.param("from is bob", "condition", id="not an object"),
    ],
)
async def test_an_invalid_condition_is_a_422_naming_its_path(
    runtime: Runtime, agent: AgentHandle, condition: Any, field: str
) -> None:
    async with api_client(runtime) as client:
        response = await client.post(
            "/v1/rules",
            json={"agent_id": agent.agent_id, "action": "trash", "condition": condition},
            headers=auth(agent.owner_key),
        )
    assert response.status_code == 422, response.text
    assert problem_code(response) == "validation_failed"
    assert field in [e["field"] for e in response.json()["errors"]]
    assert policy_rule_ids(runtime, agent.agent_id) == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"action": "explode"}, "action"),
        ({"action": "block"}, "action"),  # an outbound action on an inbound rule
        ({"action": "trash", "enabled": "yes"}, "enabled"),  # strict: no string booleans
        ({"action": "trash", "position": -1}, "position"),
        ({"action": "trash", "colour": "red"}, "colour"),
        ({"condition": FROM_EXAMPLE}, "action"),
    ],
)
async def test_a_malformed_rule_body_is_a_422_naming_the_field(
    runtime: Runtime, agent: AgentHandle, body: dict[str, Any], field: str
) -> None:
    async with api_client(runtime) as client:
        response = await client.post(
            "/v1/rules",
            json={"condition": FROM_EXAMPLE, **body},
            headers=auth(agent.owner_key),
        )
    assert response.status_code == 422, response.text
    assert field in [e["field"] for e in response.json()["errors"]]


async def test_an_update_is_validated_as_the_merged_rule(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = agent.owner_key
    async with api_client(runtime) as client:
        rule = await create(
            client, key, agent_id=agent.agent_id, action="trash", condition=FROM_EXAMPLE
        )
        url = f"/v1/rules/{rule['rule_id']}"
        # trash is no outbound action: the direction alone cannot change.
        response = await client.patch(url, json={"direction": "outbound"}, headers=auth(key))
        assert response.status_code == 422
        assert [e["field"] for e in response.json()["errors"]] == ["action"]
        both = await client.patch(
            url, json={"direction": "outbound", "action": "require_approval"}, headers=auth(key)
        )
        assert both.status_code == 200 and both.json()["direction"] == "outbound"
        bad_regex = await client.patch(
            url,
            json={"condition": {"field": "subject", "match": "regex", "value": r"(x)\1"}},
            headers=auth(key),
        )
        assert [e["field"] for e in bad_regex.json()["errors"]] == ["condition.value"]
        owner_move = await client.patch(url, json={"agent_id": None}, headers=auth(key))
        assert owner_move.status_code == 422
        for field in ("name", "action", "condition", "direction", "enabled", "position"):
            nulled = await client.patch(url, json={field: None}, headers=auth(key))
            assert nulled.status_code == 422, (field, nulled.text)
            assert [e["field"] for e in nulled.json()["errors"]] == [field]
        unchanged = await client.get(url, headers=auth(key))
    assert unchanged.json()["action"] == "require_approval"
    assert unchanged.json()["condition"] == FROM_EXAMPLE


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/rules"),
        ("PATCH", "/v1/rules/{rule_id}"),
        ("POST", "/v1/rules/reorder"),
        ("POST", "/v1/rules/test"),
        ("POST", "/v1/contacts"),
        ("PATCH", "/v1/contacts/{contact_id}"),
        ("PATCH", "/v1/workspace/settings"),
    ],
)
async def test_a_body_that_is_not_json_is_a_400_naming_the_body(
    runtime: Runtime, agent: AgentHandle, method: str, path: str
) -> None:
    async with api_client(runtime) as client:
        response = await client.request(
            method,
            path.format(rule_id="rul_x", contact_id="con_x"),
            content=b'{"action": "trash",',
            headers={**auth(agent.owner_key), "content-type": "application/json"},
        )
    assert response.status_code == 400, response.text
    assert problem_code(response) == "bad_request"
    assert [e["field"] for e in response.json()["errors"]] == ["body"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/rules/test", '{"agent_id": "%s", "raw": "Subject: \\ud800\\r\\n\\r\\nhi"}', "raw"),
        ("/v1/contacts", '{"address": "bob@example.com", "name": "\\udc80"}', "name"),
        (
            "/v1/rules",
            '{"action": "trash", "condition": {"field": "subject", "match": "is", '
            '"value": "\\ud800"}}',
            "condition",
        ),
    ],
)
async def test_json_text_that_is_not_unicode_is_a_422_naming_the_field(
    runtime: Runtime, agent: AgentHandle, path: str, body: str, field: str
) -> None:
    content = (body % agent.agent_id if "%s" in body else body).encode()
    async with api_client(runtime) as client:
        response = await client.post(
            path,
            content=content,
            headers={**auth(agent.owner_key), "content-type": "application/json"},
        )
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == [field]


# -- dry runs ---------------------------------------------------------------------------


async def test_a_dry_run_on_pasted_mime_shows_each_rule_tried_and_each_condition(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = agent.owner_key
    raw = build_message(to=agent.address, sender="Bob <bob@Example.com>", subject="Lunch?")
    async with api_client(runtime) as client:
        invoices = await create(
            client,
            key,
            agent_id=agent.agent_id,
            name="invoices",
            action="review",
            condition=SUBJECT_INVOICE,
        )
        example = await create(
            client,
            key,
            name="example",
            action="quarantine",
            condition={"all": [FROM_EXAMPLE, {"not": SUBJECT_INVOICE}]},
        )
        later = await create(
            client, key, name="never reached", action="trash", condition={"all": []}
        )
        response = await client.post(
            "/v1/rules/test",
            json={"agent_id": agent.agent_id, "raw": raw.decode()},
            headers=auth(key),
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["action"] == "quarantine"
    assert body["rule_id"] == example["rule_id"] and body["rule_name"] == "example"
    assert body["contact_bypass"] is False
    assert any("example" in reason for reason in body["reasons"])
    assert [(t["rule_id"], t["matched"]) for t in body["trace"]] == [
        (invoices["rule_id"], False),
        (example["rule_id"], True),
    ]  # the first match ends the run: `later` is never tried
    assert later["rule_id"] not in {t["rule_id"] for t in body["trace"]}
    assert body["trace"][0]["conditions"] == [
        {"path": "condition", "condition": "subject contains 'invoice'", "result": False}
    ]
    results = {c["path"]: c["result"] for c in body["trace"][1]["conditions"]}
    assert results == {
        "condition.all[0]": True,
        "condition.all[1].not": False,
        "condition.all[1]": True,
        "condition": True,
    }


async def test_a_dry_run_with_no_matching_rule_delivers(
    runtime: Runtime, agent: AgentHandle
) -> None:
    raw = build_message(to=agent.address, subject="hi")
    async with api_client(runtime) as client:
        await create(
            client,
            agent.owner_key,
            agent_id=agent.agent_id,
            action="trash",
            condition=SUBJECT_INVOICE,
        )
        response = await client.post(
            "/v1/rules/test",
            json={"agent_id": agent.agent_id, "raw": raw.decode()},
            headers=auth(agent.owner_key),
        )
    body = response.json()
    assert body["action"] == "deliver" and body["rule_id"] is None
    assert [t["matched"] for t in body["trace"]] == [False]


async def test_a_dry_run_on_a_stored_message_uses_its_agent_and_an_unsaved_rule_runs_first(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent, subject="Your invoice", sender="Ann <ann@shop.test>")
    key = agent.owner_key
    async with api_client(runtime) as client:
        saved = await create(
            client, key, agent_id=agent.agent_id, action="review", condition=SUBJECT_INVOICE
        )
        plain = await client.post(
            "/v1/rules/test", json={"message_id": stored.message_id}, headers=auth(key)
        )
        assert plain.status_code == 200, plain.text
        assert plain.json()["rule_id"] == saved["rule_id"]
        assert plain.json()["action"] == "review"
        draft = {
            "name": "draft",
            "action": "trash",
            "condition": {"field": "from", "match": "glob", "value": "*@shop.test"},
            "enabled": False,  # a dry run runs the draft anyway
        }
        with_draft = await client.post(
            "/v1/rules/test",
            json={"agent_id": agent.agent_id, "message_id": stored.message_id, "rule": draft},
            headers=auth(key),
        )
    body = with_draft.json()
    assert body["action"] == "trash" and body["rule_id"] is None and body["rule_name"] == "draft"
    assert [(t["rule_id"], t["matched"]) for t in body["trace"]] == [(None, True)]
    assert audit_actions(runtime, agent.workspace_id).count("rule.created") == 1  # nothing saved


async def test_a_dry_run_applies_the_stored_messages_sender_authentication(
    runtime: Runtime, agent: AgentHandle
) -> None:
    facts = rules.AuthResults(spf="pass", spf_domain="example.com", dmarc="pass")
    recipient = runtime.tenancy.resolve_recipient(agent.address)
    assert recipient is not None
    raw = build_message(to=agent.address, sender="bob@example.com", subject="invoice")
    envelope = Envelope(
        mail_from="bob@example.com", auth=SenderAuth(facts=facts, record=facts.as_dict())
    )
    [stored] = runtime.ingest.ingest(raw, envelope, [recipient])
    key = agent.owner_key
    async with api_client(runtime) as client:
        await create(
            client, key, agent_id=agent.agent_id, action="trash", condition=SUBJECT_INVOICE
        )
        await client.post("/v1/contacts", json={"domain": "example.com"}, headers=auth(key))
        trusted = await client.post(
            "/v1/rules/test", json={"message_id": stored.message_id}, headers=auth(key)
        )
        assert trusted.json()["contact_bypass"] is True
        assert trusted.json()["action"] == "deliver" and trusted.json()["trace"] == []
        # The same bytes claimed as unauthenticated go through the rules.
        forged = await client.post(
            "/v1/rules/test",
            json={"message_id": stored.message_id, "auth": {"spf": "fail", "dmarc": "fail"}},
            headers=auth(key),
        )
    body = forged.json()
    assert body["contact_bypass"] is False and body["action"] == "trash"
    assert body["reasons"][0] == "known contact but sender not authenticated; rules applied"


async def test_a_dry_run_needs_exactly_one_message_and_an_agent_for_pasted_mime(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent)
    raw = build_message(to=agent.address).decode()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"agent_id": agent.agent_id}, "message_id"),
        ({"agent_id": agent.agent_id, "message_id": stored.message_id, "raw": raw}, "message_id"),
        ({"raw": raw}, "agent_id"),
        (
            {
                "agent_id": agent.agent_id,
                "raw": raw,
                "rule": {"action": "trash", "condition": {"x": 1}},
            },
            "rule.condition.field",
        ),
        (
            {
                "agent_id": agent.agent_id,
                "raw": raw,
                "rule": {"action": "block", "direction": "outbound", "condition": {"all": []}},
            },
            "rule.direction",
        ),
        ({"agent_id": agent.agent_id, "raw": raw, "auth": {"spf": "great"}}, "auth.spf"),
    ]
    async with api_client(runtime) as client:
        for body, field in cases:
            response = await client.post("/v1/rules/test", json=body, headers=auth(agent.owner_key))
            assert response.status_code == 422, (body, response.text)
            assert field in [e["field"] for e in response.json()["errors"]], response.text


async def test_a_pasted_message_over_the_size_limit_is_a_413(
    runtime: Runtime, agent: AgentHandle
) -> None:
    raw = "Subject: big\r\n\r\n" + "x" * runtime.settings.max_message_size
    async with api_client(runtime) as client:
        response = await client.post(
            "/v1/rules/test",
            json={"agent_id": agent.agent_id, "raw": raw},
            headers=auth(agent.owner_key),
        )
    assert response.status_code == 413
    assert problem_code(response) == "message_too_large"


# -- isolation --------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    victim: AgentHandle
    ids: dict[str, str]  # path parameter -> an id of the victim workspace's
    message_id: str
    neighbour_key: str  # an agent key of the victim's workspace
    stranger_key: str  # the owner key of another workspace


@dataclass(frozen=True)
class Probe:
    """A policy route: what to send, and whether a stranger's call must be 404.

    Routes without an id of the victim's (its own listing, its own settings) answer a
    stranger about the stranger's own workspace; ``stranger_sees_own`` checks that
    answer holds nothing of the victim's.
    """

    body: Callable[[World], dict[str, Any]] | None = None
    query: Callable[[World], dict[str, Any]] = lambda w: {}
    stranger_sees_own: Callable[[httpx.Response, World], None] | None = None
    control_status: int = 200


def victim_agent(w: World) -> dict[str, Any]:
    return {"agent_id": w.victim.agent_id}


def nothing_of_the_victims(response: httpx.Response, world: World) -> None:
    assert response.status_code in (200, 201), response.text
    assert world.victim.workspace_id not in response.text
    for value in world.ids.values():
        assert value not in response.text


PROBES: dict[tuple[str, str], Probe] = {
    ("GET", "/v1/rules"): Probe(query=victim_agent),
    ("POST", "/v1/rules/reorder"): Probe(
        body=lambda w: {**victim_agent(w), "rule_ids": [w.ids["rule_id"]]}
    ),
    ("POST", "/v1/rules/test"): Probe(body=lambda w: {"message_id": w.message_id}),
    ("GET", "/v1/rules/{rule_id}"): Probe(),
    ("PATCH", "/v1/rules/{rule_id}"): Probe(body=lambda w: {"name": "pwned"}),
    ("POST", "/v1/rules/{rule_id}/disable"): Probe(),
    ("POST", "/v1/rules/{rule_id}/enable"): Probe(),
    ("GET", "/v1/contacts"): Probe(query=victim_agent),
    ("GET", "/v1/contacts/{contact_id}"): Probe(),
    ("PATCH", "/v1/contacts/{contact_id}"): Probe(body=lambda w: {"auto_approve": False}),
    ("GET", "/v1/workspace/settings"): Probe(stranger_sees_own=nothing_of_the_victims),
    ("PATCH", "/v1/workspace/settings"): Probe(
        body=lambda w: {"contacts_bypass": False}, stranger_sees_own=nothing_of_the_victims
    ),
    # Creates late (the control's reorder names the one rule there is), deletes last.
    ("POST", "/v1/rules"): Probe(
        body=lambda w: {**victim_agent(w), "action": "trash", "condition": FROM_EXAMPLE},
        control_status=201,
    ),
    ("POST", "/v1/contacts"): Probe(
        body=lambda w: {**victim_agent(w), "address": "spy@evil.test"}, control_status=201
    ),
    ("DELETE", "/v1/rules/{rule_id}"): Probe(),
    ("DELETE", "/v1/contacts/{contact_id}"): Probe(),
}


def test_every_policy_route_has_an_isolation_probe() -> None:
    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(policy_api.router)
    assert {r for r in route_table(app) if r[1].startswith("/v1/")} == set(PROBES)


async def test_no_policy_route_lets_an_agent_key_or_another_workspace_touch_an_owners_objects(
    runtime: Runtime,
) -> None:
    victim = make_agent(runtime, "victim bot", workspace="acme")
    neighbour = runtime.tenancy.create_agent(victim.workspace_id, "neighbour bot")
    stranger = make_agent(runtime, "stranger bot", workspace="evil corp")
    stored = deliver(runtime, victim)
    async with api_client(runtime) as client:
        rule = await create(
            client,
            victim.owner_key,
            agent_id=victim.agent_id,
            action="review",
            condition=FROM_EXAMPLE,
        )
        contact = await client.post(
            "/v1/contacts",
            json={"agent_id": victim.agent_id, "address": "friend@example.com"},
            headers=auth(victim.owner_key),
        )
        world = World(
            victim=victim,
            ids={"rule_id": rule["rule_id"], "contact_id": contact.json()["contact_id"]},
            message_id=stored.message_id,
            neighbour_key=neighbour.api_key,
            stranger_key=stranger.owner_key,
        )
        before = await snapshot(client, world)

        async def call(method: str, path: str, probe: Probe, key: str) -> httpx.Response:
            return await client.request(
                method,
                path.format(**world.ids),
                params=probe.query(world),
                json=probe.body(world) if probe.body else None,
                headers=auth(key),
            )

        for (method, path), probe in PROBES.items():
            where = f"{method} {path}"
            as_agent = await call(method, path, probe, world.neighbour_key)
            assert as_agent.status_code == 403, f"agent key on {where}: {as_agent.text}"
            assert problem_code(as_agent) == "missing_scope"
            as_victims_agent = await call(method, path, probe, victim.agent_key)
            assert as_victims_agent.status_code == 403, f"own agent key on {where}"
            as_stranger = await call(method, path, probe, world.stranger_key)
            if probe.stranger_sees_own is not None:
                probe.stranger_sees_own(as_stranger, world)
                continue
            assert as_stranger.status_code == 404, f"stranger on {where}: {as_stranger.text}"
            assert problem_code(as_stranger) == "not_found"
        # Nothing the intruders sent changed the victim's workspace.
        assert await snapshot(client, world) == before
        # Positive controls: the same calls with the victim's owner key work.
        for (method, path), probe in PROBES.items():
            response = await call(method, path, probe, victim.owner_key)
            assert response.status_code == probe.control_status, f"{method} {path}: {response.text}"


async def snapshot(client: httpx.AsyncClient, world: World) -> dict[str, Any]:
    headers = auth(world.victim.owner_key)
    rules_ = await client.get("/v1/rules", headers=headers)
    contacts_ = await client.get("/v1/contacts", headers=headers)
    settings = await client.get("/v1/workspace/settings", headers=headers)
    return {"rules": rules_.json(), "contacts": contacts_.json(), "settings": settings.json()}


async def test_a_strangers_404_is_the_same_as_for_an_id_that_exists_nowhere(
    runtime: Runtime,
) -> None:
    victim = make_agent(runtime, "victim bot", workspace="acme")
    stranger = make_agent(runtime, "stranger bot", workspace="evil corp")
    async with api_client(runtime) as client:
        rule = await create(
            client,
            victim.owner_key,
            agent_id=victim.agent_id,
            action="review",
            condition=FROM_EXAMPLE,
        )
        ghost_id = "rul_" + "0" * 26
        real = await client.get(f"/v1/rules/{rule['rule_id']}", headers=auth(stranger.owner_key))
        ghost = await client.get(f"/v1/rules/{ghost_id}", headers=auth(stranger.owner_key))
    expected = ghost.json()
    expected["detail"] = expected["detail"].replace(ghost_id, rule["rule_id"])
    assert real.json() == expected


async def test_the_workspace_setting_is_per_workspace(runtime: Runtime) -> None:
    one = make_agent(runtime, "one", workspace="one")
    two = make_agent(runtime, "two", workspace="two")
    async with api_client(runtime) as client:
        changed = await client.patch(
            "/v1/workspace/settings", json={"contacts_bypass": False}, headers=auth(one.owner_key)
        )
        assert changed.json() == {"workspace_id": one.workspace_id, "contacts_bypass": False}
        other = await client.get("/v1/workspace/settings", headers=auth(two.owner_key))
    assert other.json() == {"workspace_id": two.workspace_id, "contacts_bypass": True}


async def test_the_stored_message_of_another_workspace_cannot_be_dry_run(
    runtime: Runtime,
) -> None:
    victim = make_agent(runtime, "victim bot", workspace="acme")
    stranger = make_agent(runtime, "stranger bot", workspace="evil corp")
    stored = deliver(runtime, victim)
    async with api_client(runtime) as client:
        # Even naming the stranger's own agent, the victim's message is not there.
        response = await client.post(
            "/v1/rules/test",
            json={"agent_id": stranger.agent_id, "message_id": stored.message_id},
            headers=auth(stranger.owner_key),
        )
    assert response.status_code == 404 and problem_code(response) == "not_found"
