"""Feedback on real databases: DSNs delivered through ingest, the tier drop, the
suppression service, trust figures and workspace isolation."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select, update

from mailgate.domain.keys import Principal
from mailgate.errors import Conflict, Forbidden, NotFound, ValidationFailed
from mailgate.ids import new_id
from mailgate.runtime import Runtime
from mailgate.services.feedback import FeedbackService
from mailgate.services.ingest import Envelope
from mailgate.services.mailbox import Operator
from mailgate.store.schema import (
    agents,
    audit_log,
    events,
    messages,
    outbound,
    outbound_recipients,
    suppressions,
)
from tests.conftest import CORPUS, AgentHandle, make_agent

BOUNCE_ENVELOPE = Envelope(mail_from="", client_address="192.0.2.25", helo="mx.example.net")


def _sent_outbound(
    runtime: Runtime,
    agent: AgentHandle,
    recipients: Sequence[str],
    *,
    rfc_message_id: str | None = None,
    provider_message_id: str | None = None,
    state: str = "sent",
    status: str = "sent",
) -> tuple[str, str]:
    """Test fixture: an outbound request the agent sent, as the delivery worker leaves
    it (``state`` sent, every recipient ``sent``), written directly so these tests do
    not depend on the outbound pipeline. Returns ``(outbound id, rfc Message-ID)``."""
    outbound_id = new_id("out")
    rfc_id = rfc_message_id or f"{outbound_id}@{agent.address.split('@')[1]}"
    now = runtime.clock.now()
    with runtime.db.write() as conn:
        conn.execute(
            outbound.insert().values(
                id=outbound_id, workspace_id=agent.workspace_id, agent_id=agent.agent_id,
                kind="send", state=state, decision={"action": "allow"}, rfc_message_id=rfc_id,
                mail_from=agent.address, recipients=list(recipients), raw_sha256="0" * 64,
                raw_size=100, transport="smtp", provider_message_id=provider_message_id,
                created_at=now, updated_at=now, sent_at=now,
            )
        )  # fmt: skip
        conn.execute(
            outbound_recipients.insert(),
            [
                {
                    "outbound_id": outbound_id, "address": r.lower(),
                    "workspace_id": agent.workspace_id, "agent_id": agent.agent_id,
                    "domain": r.split("@")[1].lower(), "kind": "to", "status": status,
                    "detail": None, "created_at": now, "updated_at": now,
                }
                for r in recipients
            ],
        )  # fmt: skip
    return outbound_id, rfc_id


def dsn_bytes(
    agent: AgentHandle,
    entries: Sequence[tuple[str, str, str]],
    *,
    original_id: str | None,
    envid: str | None = None,
    diagnostic: str = "smtp; 550 5.1.1 user unknown",
) -> bytes:
    """A Postfix-style DSN to the agent: ``entries`` are (address, action, status)."""
    groups = "\r\n".join(
        f"Final-Recipient: rfc822; {address}\r\nOriginal-Recipient: rfc822;{address}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\nRemote-MTA: dns; mx.example.org\r\n"
        f"Diagnostic-Code: {diagnostic}\r\n"
        for address, action, status in entries
    )
    envelope = f"Original-Envelope-Id: {envid}\r\n" if envid else ""
    returned = f"Message-ID: <{original_id}>\r\n" if original_id else ""
    return (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        f"To: {agent.address}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: <{new_id('dsn')}@mx.example.net>\r\n"
        "Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="BND"\r\n'
        "\r\n--BND\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you...\r\n"
        "--BND\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.example.net\r\nX-Postfix-Queue-ID: 4F1\r\n{envelope}\r\n"
        f"{groups}\r\n"
        "--BND\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: {agent.address}\r\n{returned}Subject: hello\r\n\r\n"
        "--BND--\r\n"
    ).encode()


def ingest(runtime: Runtime, agent: AgentHandle, raw: bytes) -> str:
    recipient = runtime.tenancy.resolve_recipient(agent.address)
    assert recipient is not None
    [stored] = runtime.ingest.ingest(raw, BOUNCE_ENVELOPE, [recipient])
    return stored.message_id


def recipient_statuses(runtime: Runtime, outbound_id: str) -> dict[str, str]:
    with runtime.db.read() as conn:
        rows = conn.execute(
            select(outbound_recipients.c.address, outbound_recipients.c.status).where(
                outbound_recipients.c.outbound_id == outbound_id
            )
        )
        return {r.address: r.status for r in rows}


def state_of(runtime: Runtime, outbound_id: str) -> str:
    with runtime.db.read() as conn:
        return str(
            conn.execute(select(outbound.c.state).where(outbound.c.id == outbound_id)).scalar()
        )


def suppressed(runtime: Runtime, workspace_id: str) -> dict[str, tuple[str, str, str | None]]:
    with runtime.db.read() as conn:
        rows = conn.execute(select(suppressions).where(suppressions.c.workspace_id == workspace_id))
        return {r.address: (r.reason, r.source, r.outbound_id) for r in rows}


def feedback_events(
    runtime: Runtime, agent_id: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    with runtime.db.read() as conn:
        query = select(events.c.type, events.c.payload, events.c.agent_id).where(
            events.c.type.like("outbound.%")
        )
        rows = conn.execute(query.order_by(events.c.seq)).all()
    return [(r.type, r.payload) for r in rows if agent_id is None or r.agent_id == agent_id]


def audits(runtime: Runtime, action: str) -> list[dict[str, Any]]:
    with runtime.db.read() as conn:
        rows = conn.execute(
            select(audit_log.c.detail, audit_log.c.actor, audit_log.c.target_id)
            .where(audit_log.c.action == action)
            .order_by(audit_log.c.seq)
        )
        return [{**r.detail, "_actor": r.actor, "_target": r.target_id} for r in rows]


# -- DSNs through ingest ---------------------------------------------------------------


def test_a_hard_bounce_dsn_suppresses_the_address_and_bounces_the_request(
    runtime: Runtime, agent: AgentHandle
) -> None:
    outbound_id, rfc_id = _sent_outbound(runtime, agent, ["Gone@Example.org"])

    message_id = ingest(
        runtime,
        agent,
        dsn_bytes(agent, [("gone@example.org", "failed", "5.1.1")], original_id=rfc_id),
    )

    assert recipient_statuses(runtime, outbound_id) == {"gone@example.org": "bounced"}
    assert state_of(runtime, outbound_id) == "bounced"
    assert suppressed(runtime, agent.workspace_id) == {
        "gone@example.org": ("hard_bounce", "dsn", outbound_id)
    }
    [(kind, payload)] = feedback_events(runtime, agent.agent_id)
    assert kind == "outbound.bounced"
    assert payload["outbound_id"] == outbound_id
    assert payload["recipient"] == "gone@example.org"
    assert (payload["reason"], payload["source"], payload["permanent"]) == (
        "hard_bounce",
        "dsn",
        True,
    )
    assert payload["detail"].startswith("5.1.1 smtp; 550 5.1.1")
    [added] = audits(runtime, "suppression.added")
    assert (added["address"], added["source"], added["_actor"]) == (
        "gone@example.org",
        "dsn",
        "system",
    )
    with runtime.db.read() as conn:  # the bounce itself is still stored and filed
        folder = conn.execute(select(messages.c.folder).where(messages.c.id == message_id)).scalar()
    assert folder == "inbox"


def test_one_hard_bounce_among_several_recipients_keeps_the_request_sent(
    runtime: Runtime, agent: AgentHandle
) -> None:
    outbound_id, rfc_id = _sent_outbound(runtime, agent, ["a@example.org", "b@example.org"])

    ingest(
        runtime, agent, dsn_bytes(agent, [("a@example.org", "failed", "5.1.1")], original_id=rfc_id)
    )

    assert recipient_statuses(runtime, outbound_id) == {
        "a@example.org": "bounced",
        "b@example.org": "sent",
    }
    assert state_of(runtime, outbound_id) == "sent"
    assert set(suppressed(runtime, agent.workspace_id)) == {"a@example.org"}


def test_a_dsn_without_the_original_message_id_matches_by_envelope_id(
    runtime: Runtime, agent: AgentHandle
) -> None:
    outbound_id, _ = _sent_outbound(runtime, agent, ["c@example.org"])

    ingest(
        runtime,
        agent,
        dsn_bytes(
            agent, [("c@example.org", "failed", "5.2.1")], original_id=None, envid=outbound_id
        ),
    )

    assert recipient_statuses(runtime, outbound_id) == {"c@example.org": "bounced"}


def test_a_redelivered_dsn_is_applied_once(runtime: Runtime, agent: AgentHandle) -> None:
    _outbound_id, rfc_id = _sent_outbound(runtime, agent, ["d@example.org"])
    raw = dsn_bytes(agent, [("d@example.org", "failed", "5.1.1")], original_id=rfc_id)

    ingest(runtime, agent, raw)
    ingest(runtime, agent, raw)
    # A second, different report about the same recipient changes nothing either.
    ingest(
        runtime, agent, dsn_bytes(agent, [("d@example.org", "failed", "5.1.1")], original_id=rfc_id)
    )

    assert [kind for kind, _ in feedback_events(runtime)] == ["outbound.bounced"]
    assert len(audits(runtime, "suppression.added")) == 1


def test_a_soft_failure_fails_the_request_without_suppressing_the_address(
    runtime: Runtime, agent: AgentHandle
) -> None:
    outbound_id, rfc_id = _sent_outbound(runtime, agent, ["full@example.org"])

    ingest(
        runtime,
        agent,
        dsn_bytes(
            agent,
            [("full@example.org", "failed", "4.2.2")],
            original_id=rfc_id,
            diagnostic="smtp; 452 4.2.2 mailbox full",
        ),
    )

    assert recipient_statuses(runtime, outbound_id) == {"full@example.org": "failed"}
    assert state_of(runtime, outbound_id) == "failed"
    assert suppressed(runtime, agent.workspace_id) == {}
    [(kind, payload)] = feedback_events(runtime)
    assert (kind, payload["permanent"], payload["reason"]) == (
        "outbound.bounced",
        False,
        "soft_bounce",
    )


def test_a_delay_notice_defers_the_recipient_and_tells_no_one(
    runtime: Runtime, agent: AgentHandle
) -> None:
    outbound_id, rfc_id = _sent_outbound(runtime, agent, ["slow@example.org"])

    ingest(
        runtime,
        agent,
        dsn_bytes(agent, [("slow@example.org", "delayed", "4.4.1")], original_id=rfc_id),
    )

    assert recipient_statuses(runtime, outbound_id) == {"slow@example.org": "deferred"}
    assert state_of(runtime, outbound_id) == "sent"
    assert feedback_events(runtime) == []


def test_a_delivery_report_marks_the_request_delivered(
    runtime: Runtime, agent: AgentHandle
) -> None:
    outbound_id, rfc_id = _sent_outbound(runtime, agent, ["yes@example.org"])

    ingest(
        runtime,
        agent,
        dsn_bytes(agent, [("yes@example.org", "delivered", "2.0.0")], original_id=rfc_id,
                  diagnostic="smtp; 250 2.0.0 ok"),
    )  # fmt: skip

    assert state_of(runtime, outbound_id) == "delivered"
    with runtime.db.read() as conn:
        delivered_at = conn.execute(
            select(outbound.c.delivered_at).where(outbound.c.id == outbound_id)
        ).scalar()
    assert delivered_at is not None
    assert [kind for kind, _ in feedback_events(runtime)] == ["outbound.delivered"]


@pytest.mark.parametrize(
    "name",
    [
        "mailgun-flanker/bounce__zed.eml",  # Postfix, message/rfc822 returned
        "apache-spamassassin/BOUNCE_MESSAGE__bug5884_att4343_tbwamerlin",  # Exchange, headers
        "jstedfast-mimekit/messages__bounce.txt",  # a base64-encoded recipient group
    ],
)
def test_a_real_dsn_from_the_corpus_bounces_the_request_it_returns(
    runtime: Runtime, agent: AgentHandle, name: str
) -> None:
    from mailgate.domain.dsn import parse_report

    raw = (CORPUS / name).read_bytes()
    report = parse_report(raw)
    assert report is not None and report.original_message_id is not None
    address = report.recipients[0].address
    assert address is not None
    outbound_id, _ = _sent_outbound(
        runtime, agent, [address], rfc_message_id=report.original_message_id
    )

    ingest(runtime, agent, raw)

    assert recipient_statuses(runtime, outbound_id) == {address: "bounced"}
    assert suppressed(runtime, agent.workspace_id)[address][0] == "hard_bounce"


def test_a_dsn_cannot_bounce_another_agents_or_workspaces_mail(
    runtime: Runtime, agent: AgentHandle
) -> None:
    neighbour = runtime.tenancy.create_agent(agent.workspace_id, "neighbour bot")
    stranger = make_agent(runtime, "stranger bot", workspace="evil corp")
    outbound_id, rfc_id = _sent_outbound(runtime, agent, ["victim@example.org"])
    entries = [("victim@example.org", "failed", "5.1.1")]
    neighbour_handle = AgentHandle(
        agent.workspace_id,
        agent.owner_key,
        neighbour.agent_id,
        neighbour.address,
        neighbour.api_key,
    )

    ingest(runtime, neighbour_handle, dsn_bytes(neighbour_handle, entries, original_id=rfc_id))
    ingest(runtime, stranger, dsn_bytes(stranger, entries, original_id=None, envid=outbound_id))

    assert recipient_statuses(runtime, outbound_id) == {"victim@example.org": "sent"}
    assert suppressed(runtime, agent.workspace_id) == {}
    assert feedback_events(runtime) == []


def test_a_dsn_about_an_address_the_request_never_had_changes_nothing(
    runtime: Runtime, agent: AgentHandle
) -> None:
    outbound_id, rfc_id = _sent_outbound(runtime, agent, ["real@example.org"])

    ingest(
        runtime,
        agent,
        dsn_bytes(agent, [("other@example.org", "failed", "5.1.1")], original_id=rfc_id),
    )

    assert recipient_statuses(runtime, outbound_id) == {"real@example.org": "sent"}
    assert suppressed(runtime, agent.workspace_id) == {}


def test_apply_dsn_reports_an_outcome_per_recipient(runtime: Runtime, agent: AgentHandle) -> None:
    from mailgate.domain.dsn import parse_report

    outbound_id, rfc_id = _sent_outbound(runtime, agent, ["x@example.org"])
    entries = [("x@example.org", "failed", "5.1.1"), ("y@example.org", "failed", "5.1.1")]
    report = parse_report(dsn_bytes(agent, entries, original_id=rfc_id))
    assert report is not None

    with runtime.db.write() as conn:
        outcomes = runtime.feedback.apply_dsn(conn, report, now=runtime.clock.now())

    assert [(o.recipient, o.outbound_id, o.changed, o.suppressed) for o in outcomes] == [
        ("x@example.org", outbound_id, True, "hard_bounce"),
        ("y@example.org", outbound_id, False, None),
    ]


# -- trust and the tier drop -----------------------------------------------------------


def _set_tier(runtime: Runtime, agent_id: str, tier: str) -> None:
    with runtime.db.write() as conn:
        conn.execute(update(agents).where(agents.c.id == agent_id).values(tier=tier))


def tier_of(runtime: Runtime, agent_id: str) -> str:
    with runtime.db.read() as conn:
        return str(conn.execute(select(agents.c.tier).where(agents.c.id == agent_id)).scalar())


def _complaint(runtime: Runtime, outbound_id: str, address: str) -> list[Any]:
    """A signed Event Webhook post with one spam report, through the service."""
    private = ec.generate_private_key(ec.SECP256R1())
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    settings = runtime.settings.model_copy(
        update={"sendgrid_event_public_key": base64.b64encode(public).decode()}
    )
    service = FeedbackService(runtime.db, runtime.clock, settings)
    body = json.dumps(
        [{"event": "spamreport", "email": address, "sg_event_id": new_id("sg"),
          "outbound_id": outbound_id, "timestamp": 1}]
    ).encode()  # fmt: skip
    stamp = str(int(runtime.clock.now().timestamp()))
    signature = private.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    result = service.apply_sendgrid(body, base64.b64encode(signature).decode(), stamp)
    return list(result.tier_changes)


def test_a_complaint_rate_over_the_threshold_lowers_the_tier_once_per_fresh_sample(
    runtime: Runtime, agent: AgentHandle
) -> None:
    _set_tier(runtime, agent.agent_id, "open")
    recipients = [f"r{i}@example.org" for i in range(20)]
    outbound_id, _ = _sent_outbound(runtime, agent, recipients)

    [change] = _complaint(runtime, outbound_id, "r0@example.org")  # 1 of 20: 5% > 1%
    again = _complaint(runtime, outbound_id, "r1@example.org")  # no fresh sample yet

    assert (change.from_tier, change.to_tier) == ("open", "allowlisted_domains")
    assert again == []
    assert tier_of(runtime, agent.agent_id) == "allowlisted_domains"
    [lowered] = audits(runtime, "agent.tier_lowered")
    assert lowered["_target"] == agent.agent_id
    assert (lowered["from_tier"], lowered["to_tier"]) == ("open", "allowlisted_domains")
    assert lowered["figures"]["complaints"] == 1 and lowered["figures"]["sent"] == 20
    assert "over the threshold" in lowered["reason"]
    assert suppressed(runtime, agent.workspace_id)["r0@example.org"][0] == "complaint"
    kinds = [kind for kind, _ in feedback_events(runtime, agent.agent_id)]
    assert kinds == ["outbound.complained", "outbound.complained"]


def test_complaints_below_the_minimum_sample_leave_the_tier_alone(
    runtime: Runtime, agent: AgentHandle
) -> None:
    _set_tier(runtime, agent.agent_id, "open")
    outbound_id, _ = _sent_outbound(runtime, agent, [f"s{i}@example.org" for i in range(5)])

    assert _complaint(runtime, outbound_id, "s0@example.org") == []
    assert tier_of(runtime, agent.agent_id) == "open"


def test_trust_is_for_owners_and_the_agent_itself(runtime: Runtime, agent: AgentHandle) -> None:
    _outbound_id, rfc_id = _sent_outbound(runtime, agent, ["t1@example.org", "t2@example.org"])
    ingest(
        runtime,
        agent,
        dsn_bytes(agent, [("t1@example.org", "failed", "5.1.1")], original_id=rfc_id),
    )
    owner = Principal(agent.workspace_id, "key_owner", "owner", owner_id="own_1")
    self_key = Principal(
        agent.workspace_id, "key_a", "agent", agent.agent_id, scopes=("messages:read",)
    )
    neighbour = runtime.tenancy.create_agent(agent.workspace_id, "neighbour bot")
    other = Principal(
        agent.workspace_id, "key_n", "agent", neighbour.agent_id, scopes=("messages:read",)
    )
    stranger = make_agent(runtime, "stranger bot", workspace="evil corp")
    stranger_owner = Principal(stranger.workspace_id, "key_s", "owner", owner_id="own_2")

    trust = runtime.feedback.trust(owner, agent.agent_id)

    assert (trust.figure.sent, trust.figure.bounced, trust.figure.reached) == (2, 1, 1)
    assert trust.figure.bounce_rate == pytest.approx(0.5)
    assert trust.tier == "reply_only"
    assert not trust.verdict.lower
    assert runtime.feedback.trust(self_key, agent.agent_id).figure == trust.figure
    for intruder in (other, stranger_owner):
        with pytest.raises(NotFound):
            runtime.feedback.trust(intruder, agent.agent_id)
    with pytest.raises(Forbidden):
        runtime.feedback.trust(
            Principal(agent.workspace_id, "key_b", "agent", agent.agent_id), agent.agent_id
        )


def test_trust_counts_only_the_last_thirty_days(runtime: Runtime, agent: AgentHandle) -> None:
    outbound_id, _ = _sent_outbound(runtime, agent, ["old@example.org"])
    with runtime.db.write() as conn:
        conn.execute(
            update(outbound_recipients)
            .where(outbound_recipients.c.outbound_id == outbound_id)
            .values(created_at=runtime.clock.now() - timedelta(days=31))
        )
    owner = Principal(agent.workspace_id, "key_owner", "owner", owner_id="own_1")

    assert runtime.feedback.trust(owner, agent.agent_id).figure.sent == 0


# -- suppressions ----------------------------------------------------------------------


def owner_of(agent: AgentHandle) -> Principal:
    return Principal(agent.workspace_id, "key_owner", "owner", owner_id="own_1")


def test_owners_add_list_and_remove_suppressions_audited(
    runtime: Runtime, agent: AgentHandle
) -> None:
    owner = owner_of(agent)

    added = runtime.feedback.add_suppression(owner, " Bob@Example.ORG ", detail="asked by phone")
    runtime.feedback.add_suppression(owner, "carol@example.org", reason="unsubscribe")
    page = runtime.feedback.list_suppressions(owner)
    removed = runtime.feedback.remove_suppression(owner, "BOB@example.org")

    assert (added.address, added.reason, added.source, added.detail) == (
        "bob@example.org", "manual", "api", "asked by phone",
    )  # fmt: skip
    assert [s.address for s in page.items] == ["carol@example.org", "bob@example.org"]
    assert removed.suppression_id == added.suppression_id
    assert set(suppressed(runtime, agent.workspace_id)) == {"carol@example.org"}
    assert [a["address"] for a in audits(runtime, "suppression.added")] == [
        "bob@example.org", "carol@example.org",
    ]  # fmt: skip
    [gone] = audits(runtime, "suppression.removed")
    assert (gone["address"], gone["_actor"]) == ("bob@example.org", "owner:own_1")


def test_suppressing_twice_is_a_conflict_naming_the_existing_reason(
    runtime: Runtime, agent: AgentHandle
) -> None:
    owner = owner_of(agent)
    runtime.feedback.add_suppression(owner, "dup@example.org", reason="complaint")

    with pytest.raises(Conflict) as caught:
        runtime.feedback.add_suppression(owner, "DUP@example.org")

    assert caught.value.extra["reason"] == "complaint"


@pytest.mark.parametrize("address", ["not an address", "a@b@c", "<x@example.org>", "x@", "@x.org"])
def test_a_suppression_must_name_a_bare_address(
    runtime: Runtime, agent: AgentHandle, address: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        runtime.feedback.add_suppression(owner_of(agent), address)

    assert caught.value.extra["errors"][0]["field"] == "address"


def test_suppressions_are_for_owners_and_stay_in_their_workspace(
    runtime: Runtime, agent: AgentHandle
) -> None:
    runtime.feedback.add_suppression(owner_of(agent), "mine@example.org")
    stranger = make_agent(runtime, "stranger bot", workspace="evil corp")
    stranger_owner = owner_of(stranger)
    agent_key = Principal(agent.workspace_id, "key_a", "agent", agent.agent_id,
                          scopes=("messages:read", "messages:send"))  # fmt: skip

    for call in (
        lambda: runtime.feedback.list_suppressions(agent_key),
        lambda: runtime.feedback.add_suppression(agent_key, "x@example.org"),
        lambda: runtime.feedback.remove_suppression(agent_key, "mine@example.org"),
    ):
        with pytest.raises(Forbidden):
            call()
    assert runtime.feedback.list_suppressions(stranger_owner).items == ()
    with pytest.raises(NotFound):
        runtime.feedback.remove_suppression(stranger_owner, "mine@example.org")
    with pytest.raises(NotFound):
        runtime.feedback.list_suppressions(stranger_owner, workspace_id=agent.workspace_id)
    assert set(suppressed(runtime, agent.workspace_id)) == {"mine@example.org"}


def test_the_operator_names_the_workspace_it_acts_in(runtime: Runtime, agent: AgentHandle) -> None:
    operator = Operator("cli")

    added = runtime.feedback.add_suppression(
        operator, "op@example.org", workspace_id=agent.workspace_id
    )

    assert (added.source, added.workspace_id) == ("cli", agent.workspace_id)
    with pytest.raises(ValidationFailed):
        runtime.feedback.add_suppression(operator, "op2@example.org")
    with pytest.raises(NotFound):
        runtime.feedback.add_suppression(operator, "op2@example.org", workspace_id="wsp_nowhere")


def test_listing_pages_with_a_cursor_and_filters_by_reason(
    runtime: Runtime, agent: AgentHandle
) -> None:
    owner = owner_of(agent)
    for i in range(5):
        runtime.feedback.add_suppression(
            owner, f"p{i}@example.org", reason="manual" if i % 2 else "unsubscribe"
        )

    first = runtime.feedback.list_suppressions(owner, limit=2)
    assert first.next_cursor is not None
    second = runtime.feedback.list_suppressions(owner, limit=2, cursor=first.next_cursor)
    third = runtime.feedback.list_suppressions(owner, limit=2, cursor=second.next_cursor)
    only = runtime.feedback.list_suppressions(owner, reason="unsubscribe")

    walked = [s.address for page in (first, second, third) for s in page.items]
    assert walked == [f"p{i}@example.org" for i in reversed(range(5))]
    assert third.next_cursor is None
    assert [s.address for s in only.items] == ["p4@example.org", "p2@example.org", "p0@example.org"]
    with pytest.raises(ValidationFailed):
        runtime.feedback.list_suppressions(owner, cursor="garbage")


def test_is_suppressed_answers_inside_the_callers_transaction(
    runtime: Runtime, agent: AgentHandle
) -> None:
    runtime.feedback.add_suppression(owner_of(agent), "no@example.org", reason="complaint")
    stranger = make_agent(runtime, "stranger bot", workspace="evil corp")

    with runtime.db.read() as conn:
        mine = runtime.feedback.is_suppressed(
            conn, agent.workspace_id, ["NO@example.org", "yes@example.org"]
        )
        theirs = runtime.feedback.is_suppressed(conn, stranger.workspace_id, ["no@example.org"])
        nothing = runtime.feedback.is_suppressed(conn, agent.workspace_id, [])

    assert mine == {"no@example.org": "complaint"}
    assert theirs == {}
    assert nothing == {}


def test_ordinary_mail_leaves_outbound_alone(runtime: Runtime, agent: AgentHandle) -> None:
    from tests.integration.api_support import deliver

    outbound_id, rfc_id = _sent_outbound(runtime, agent, ["z@example.org"])
    deliver(runtime, agent, in_reply_to=f"<{rfc_id}>", subject="Re: hello")

    assert recipient_statuses(runtime, outbound_id) == {"z@example.org": "sent"}
    with runtime.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(suppressions)).scalar() == 0
