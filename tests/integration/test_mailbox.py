"""Folder moves (release, trash, restore) and agent visibility, on SQLite and PostgreSQL.

Held, quarantined and rule-trashed mail is mostly made here by delivering a message
and then filing it with SQL where a rule would have (:func:`file_as`): those tests are
about what happens *after* a rule decided. The end-to-end ones at the bottom let real
rules decide at ingest.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import func, select, update

from mailgate.clock import FakeClock
from mailgate.config import Settings
from mailgate.domain.keys import Principal
from mailgate.errors import Forbidden, InvalidTransition, MailgateError, NotFound
from mailgate.runtime import Runtime
from mailgate.services.events import append_event
from mailgate.services.feed import WORKSPACE_SCOPE
from mailgate.services.mailbox import MailboxService, Operator
from mailgate.services.queries import MessageFilter
from mailgate.store.committer import DirectCommitter
from mailgate.store.schema import audit_log, events, messages
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import deliver
from tests.integration.test_inbound_decisions import add_rule

# -- helpers shared with the other mailbox test modules ---------------------------------


def file_as(
    runtime: Runtime,
    message_id: str,
    folder: str,
    *,
    previous: str | None = None,
    visible: bool = False,
) -> None:
    """File a delivered message the way a rule would have: ``review``/``quarantine``
    (never visible), or ``trash`` with ``previous="inbox"`` (trashed on arrival)."""
    now = runtime.clock.now()
    with runtime.db.write() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == message_id)
            .values(
                folder=folder,
                previous_folder=previous,
                visible_at=now if visible else None,
                folder_changed_at=now,
            )
        )


def owner(handle: AgentHandle, runtime: Runtime) -> Principal:
    return runtime.tenancy.authenticate(handle.owner_key)


def agent_of(handle: AgentHandle, runtime: Runtime) -> Principal:
    return runtime.tenancy.authenticate(handle.agent_key)


def last_event_seq(runtime: Runtime) -> int:
    with runtime.db.read() as conn:
        return int(conn.execute(select(func.coalesce(func.max(events.c.seq), 0))).scalar_one())


def events_since(runtime: Runtime, seq: int) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(type, agent_id, payload) of the events after ``seq``, oldest first."""
    with runtime.db.read() as conn:
        rows = conn.execute(
            select(events.c.type, events.c.agent_id, events.c.payload)
            .where(events.c.seq > seq)
            .order_by(events.c.seq)
        ).all()
    return [(r.type, r.agent_id, r.payload) for r in rows]


def audit_of(runtime: Runtime, message_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    with runtime.db.read() as conn:
        rows = conn.execute(
            select(audit_log.c.actor, audit_log.c.action, audit_log.c.detail)
            .where(audit_log.c.target_id == message_id)
            .order_by(audit_log.c.seq)
        ).all()
    return [(r.actor, r.action, r.detail) for r in rows if r.action.startswith("message.")]


def folder_of(runtime: Runtime, message_id: str) -> tuple[str, str | None, datetime | None]:
    with runtime.db.read() as conn:
        row = conn.execute(
            select(messages.c.folder, messages.c.previous_folder, messages.c.visible_at).where(
                messages.c.id == message_id
            )
        ).one()
    return row.folder, row.previous_folder, row.visible_at


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rt(settings: Settings, clock: FakeClock) -> Iterator[Runtime]:
    runtime = Runtime.build(settings, clock=clock)
    yield runtime
    runtime.close()


@pytest.fixture
def bot(rt: Runtime) -> AgentHandle:
    return make_agent(rt)


# -- release ----------------------------------------------------------------------------


@pytest.mark.parametrize("held", ["review", "quarantine"])
def test_release_delivers_held_mail_to_the_agent_with_message_received(
    rt: Runtime, bot: AgentHandle, clock: FakeClock, held: str
) -> None:
    stored = deliver(rt, bot, subject="Invoice 42")
    file_as(rt, stored.message_id, held)
    mark = last_event_seq(rt)
    clock.advance(60)

    change = rt.mailbox.release(owner(bot, rt), stored.message_id)

    assert (change.operation, change.from_folder, change.to_folder) == ("release", held, "inbox")
    assert change.reached_agent and change.changed_at == clock.now()
    assert change.message.folder == "inbox" and change.message.visible_at == clock.now()
    assert folder_of(rt, stored.message_id) == ("inbox", held, clock.now())
    [(released, to_owners, payload), (received, to_agent, delivered)] = events_since(rt, mark)
    assert (released, to_owners) == ("message.released", None)  # for owners only
    assert payload["agent_id"] == bot.agent_id and payload["from_folder"] == held
    assert (received, to_agent) == ("message.received", bot.agent_id)
    assert delivered["message_id"] == stored.message_id
    assert delivered["subject"] == "Invoice 42" and delivered["folder"] == "inbox"
    assert delivered["via"] == "release"
    [(actor, action, detail)] = audit_of(rt, stored.message_id)
    assert actor == f"owner:{owner(bot, rt).owner_id}"
    assert action == "message.released"
    assert (detail["from_folder"], detail["to_folder"]) == (held, "inbox")


def test_released_mail_appears_for_the_agent_and_its_feed_gets_it(
    rt: Runtime, bot: AgentHandle
) -> None:
    stored = deliver(rt, bot)
    file_as(rt, stored.message_id, "review")
    me = agent_of(bot, rt)
    # Ingest announced it before file_as() held it: settle that, as a real hold emits
    # no agent event at all.
    drained = rt.feed.lease(bot.workspace_id, bot.agent_id, "worker", limit=10, lease_seconds=30)
    rt.feed.ack(bot.workspace_id, bot.agent_id, "worker", [e.event_id for e in drained])
    with pytest.raises(NotFound):
        rt.queries.get_message(me, stored.message_id)

    rt.mailbox.release(owner(bot, rt), stored.message_id)

    assert rt.queries.get_message(me, stored.message_id).summary.folder == "inbox"
    leased = rt.feed.lease(bot.workspace_id, bot.agent_id, "worker", limit=10, lease_seconds=30)
    assert [(e.type, e.payload["message_id"]) for e in leased] == [
        ("message.received", stored.message_id)
    ]


def test_a_second_release_of_the_same_message_is_an_invalid_transition(
    rt: Runtime, bot: AgentHandle
) -> None:
    stored = deliver(rt, bot)
    file_as(rt, stored.message_id, "review")
    rt.mailbox.release(owner(bot, rt), stored.message_id)
    mark = last_event_seq(rt)

    with pytest.raises(InvalidTransition) as caught:
        rt.mailbox.release(owner(bot, rt), stored.message_id)

    assert caught.value.code == "invalid_folder_transition" and caught.value.status == 409
    assert caught.value.extra == {"folder": "inbox", "operation": "release"}
    assert events_since(rt, mark) == []


def test_owners_releasing_at_once_see_exactly_one_succeed(
    settings: Settings, rt: Runtime, bot: AgentHandle
) -> None:
    """Each racer has its own service and committer, as separate gateway processes
    would: the database, not one process's committer, must settle it."""
    stored = deliver(rt, bot)
    file_as(rt, stored.message_id, "review")
    principal = owner(bot, rt)
    racers = 6
    services = [
        MailboxService(
            rt.db,
            DirectCommitter(rt.db),
            rt.blobs,
            rt.clock,
            trash_retention=rt.mailbox.trash_retention,
        )
        for _ in range(racers)
    ]
    start = threading.Barrier(racers)

    def race(service: MailboxService) -> str:
        start.wait(timeout=10)
        try:
            service.release(principal, stored.message_id)
        except MailgateError as exc:
            return exc.code
        return "released"

    with ThreadPoolExecutor(racers) as pool:
        outcomes = sorted(pool.map(race, services))

    assert outcomes == ["invalid_folder_transition"] * (racers - 1) + ["released"]
    received = [t for t, _, _ in events_since(rt, 0) if t == "message.released"]
    assert len(received) == 1
    assert len(audit_of(rt, stored.message_id)) == 1


@pytest.mark.parametrize("folder", ["inbox", "trash"])
def test_only_held_mail_can_be_released(rt: Runtime, bot: AgentHandle, folder: str) -> None:
    stored = deliver(rt, bot)
    if folder == "trash":
        rt.mailbox.trash(owner(bot, rt), stored.message_id)
    with pytest.raises(InvalidTransition):
        rt.mailbox.release(owner(bot, rt), stored.message_id)


def test_agents_may_not_release_or_trash_from_review(rt: Runtime, bot: AgentHandle) -> None:
    stored = deliver(rt, bot)
    file_as(rt, stored.message_id, "review")
    me = agent_of(bot, rt)
    for move in (rt.mailbox.release, rt.mailbox.trash_held):
        with pytest.raises(Forbidden):
            move(me, stored.message_id)
    assert folder_of(rt, stored.message_id)[0] == "review"


def test_another_workspaces_owner_cannot_find_held_mail(rt: Runtime, bot: AgentHandle) -> None:
    stored = deliver(rt, bot)
    file_as(rt, stored.message_id, "review")
    stranger = make_agent(rt, "stranger", workspace="evil corp")
    with pytest.raises(NotFound):
        rt.mailbox.release(owner(stranger, rt), stored.message_id)


# -- review trash and restore -----------------------------------------------------------


def test_trashing_held_mail_and_restoring_it_never_shows_it_to_the_agent(
    rt: Runtime, bot: AgentHandle
) -> None:
    stored = deliver(rt, bot)
    file_as(rt, stored.message_id, "quarantine")
    mark = last_event_seq(rt)

    trashed = rt.mailbox.trash_held(owner(bot, rt), stored.message_id)
    restored = rt.mailbox.restore(owner(bot, rt), stored.message_id)

    assert (trashed.from_folder, trashed.to_folder) == ("quarantine", "trash")
    assert (restored.from_folder, restored.to_folder) == ("trash", "quarantine")
    assert not restored.reached_agent
    assert folder_of(rt, stored.message_id) == ("quarantine", None, None)
    assert [(t, a) for t, a, _ in events_since(rt, mark)] == [
        ("message.trashed", None),
        ("message.restored", None),
    ]
    assert [action for _, action, _ in audit_of(rt, stored.message_id)] == [
        "message.trashed",
        "message.restored",
    ]


def test_the_review_trash_refuses_mail_that_is_not_held(rt: Runtime, bot: AgentHandle) -> None:
    stored = deliver(rt, bot)
    with pytest.raises(InvalidTransition):
        rt.mailbox.trash_held(owner(bot, rt), stored.message_id)
    assert folder_of(rt, stored.message_id)[0] == "inbox"


# -- agent trash and restore ------------------------------------------------------------


def test_an_agent_trashes_and_restores_its_own_mail_with_events_it_receives(
    rt: Runtime, bot: AgentHandle
) -> None:
    stored = deliver(rt, bot)
    me = agent_of(bot, rt)
    mark = last_event_seq(rt)

    trashed = rt.mailbox.trash(me, stored.message_id)
    listed = rt.queries.list_trash(me)
    restored = rt.mailbox.restore(me, stored.message_id)

    assert (trashed.to_folder, trashed.message.previous_folder) == ("trash", "inbox")
    assert [m.message_id for m in listed.items] == [stored.message_id]
    assert (restored.to_folder, restored.reached_agent) == ("inbox", False)
    assert [(t, a) for t, a, _ in events_since(rt, mark)] == [
        ("message.trashed", bot.agent_id),
        ("message.restored", bot.agent_id),
    ]
    actors = {actor for actor, _, _ in audit_of(rt, stored.message_id)}
    assert actors == {f"agent:{bot.agent_id}"}


def test_trash_twice_or_restore_outside_the_trash_is_an_invalid_transition(
    rt: Runtime, bot: AgentHandle
) -> None:
    stored = deliver(rt, bot)
    me = agent_of(bot, rt)
    with pytest.raises(InvalidTransition):
        rt.mailbox.restore(me, stored.message_id)
    rt.mailbox.trash(me, stored.message_id)
    with pytest.raises(InvalidTransition):
        rt.mailbox.trash(me, stored.message_id)


def test_restoring_mail_a_rule_trashed_delivers_it_to_the_agent_for_the_first_time(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    stored = deliver(rt, bot)
    file_as(rt, stored.message_id, "trash", previous="inbox")
    me = agent_of(bot, rt)
    assert rt.queries.list_trash(me).items == ()  # not the agent's to restore
    with pytest.raises(NotFound):
        rt.mailbox.restore(me, stored.message_id)
    mark = last_event_seq(rt)
    clock.advance(5)

    change = rt.mailbox.restore(owner(bot, rt), stored.message_id)

    assert (change.to_folder, change.reached_agent) == ("inbox", True)
    assert folder_of(rt, stored.message_id) == ("inbox", None, clock.now())
    assert [(t, a) for t, a, _ in events_since(rt, mark)] == [
        ("message.restored", bot.agent_id),
        ("message.received", bot.agent_id),
    ]


def test_an_agent_key_without_messages_write_cannot_trash(rt: Runtime, bot: AgentHandle) -> None:
    stored = deliver(rt, bot)
    key = rt.tenancy.create_key(bot.workspace_id, agent_id=bot.agent_id, scopes=("messages:read",))
    reader = rt.tenancy.authenticate(key.api_key)
    for move in (rt.mailbox.trash, rt.mailbox.restore):
        with pytest.raises(Forbidden) as caught:
            move(reader, stored.message_id)
        assert caught.value.extra["scope"] == "messages:write"


def test_an_agent_cannot_move_another_agents_mail(rt: Runtime, bot: AgentHandle) -> None:
    stored = deliver(rt, bot)
    neighbour = rt.tenancy.create_agent(bot.workspace_id, "neighbour")
    other = rt.tenancy.authenticate(neighbour.api_key)
    with pytest.raises(NotFound):
        rt.mailbox.trash(other, stored.message_id)


def test_the_operator_moves_mail_in_any_workspace_audited_as_cli(
    rt: Runtime, bot: AgentHandle
) -> None:
    stored = deliver(rt, bot)
    file_as(rt, stored.message_id, "review")
    rt.mailbox.release(Operator(), stored.message_id)
    [(actor, _, _)] = audit_of(rt, stored.message_id)
    assert actor == "cli"


# -- what agent keys see ----------------------------------------------------------------


def test_agent_keys_see_only_mail_that_reached_them(rt: Runtime, bot: AgentHandle) -> None:
    shown = deliver(rt, bot, subject="shown", message_id="shown@example.com")
    held = deliver(
        rt,
        bot,
        subject="Re: shown",
        in_reply_to="shown@example.com",
        attachments=[("x.txt", "text/plain", b"x")],
    )
    lonely = deliver(rt, bot, subject="alone in its thread")
    assert held.thread_id == shown.thread_id
    file_as(rt, held.message_id, "review")
    file_as(rt, lonely.message_id, "quarantine")
    me, boss = agent_of(bot, rt), owner(bot, rt)
    attachment_id = rt.queries.get_message(boss, held.message_id).attachments[0].attachment_id

    assert [m.message_id for m in rt.queries.list_messages(me).items] == [shown.message_id]
    assert rt.queries.list_messages(me, MessageFilter(folder="review")).items == ()
    for read in (rt.queries.get_message, rt.queries.get_raw):
        with pytest.raises(NotFound):
            read(me, held.message_id)
    with pytest.raises(NotFound):
        rt.queries.get_attachment(me, held.message_id, attachment_id)
    with pytest.raises(NotFound):
        rt.queries.get_thread(me, lonely.thread_id)
    [thread] = rt.queries.list_threads(me).items
    assert (thread.thread_id, thread.message_count) == (shown.thread_id, 1)
    detail = rt.queries.get_thread(me, shown.thread_id)
    assert [m.message_id for m in detail.messages] == [shown.message_id]
    assert detail.thread.message_count == 1

    # the owner sees all of it, as it is
    assert len(rt.queries.list_messages(boss).items) == 3
    assert len(rt.queries.get_thread(boss, shown.thread_id).messages) == 2
    assert rt.queries.get_thread(boss, shown.thread_id).thread.message_count == 2
    assert len(rt.queries.list_threads(boss).items) == 2


def test_the_rule_decision_is_shown_to_owners_and_not_to_agents(
    rt: Runtime, bot: AgentHandle
) -> None:
    stored = deliver(rt, bot)
    decision = {"action": "deliver", "rule_id": "rul_x", "rule_name": "vip", "reasons": ["vip"]}
    with rt.db.write() as conn:
        conn.execute(
            update(messages).where(messages.c.id == stored.message_id).values(decision=decision)
        )
    assert rt.queries.get_message(owner(bot, rt), stored.message_id).summary.decision == decision
    assert rt.queries.get_message(agent_of(bot, rt), stored.message_id).summary.decision is None


def test_the_review_listing_is_for_owners_and_lists_held_mail_only(
    rt: Runtime, bot: AgentHandle
) -> None:
    deliver(rt, bot)
    review = deliver(rt, bot)
    quarantine = deliver(rt, bot)
    file_as(rt, review.message_id, "review")
    file_as(rt, quarantine.message_id, "quarantine")
    boss = owner(bot, rt)

    both = rt.queries.list_held(boss)
    only = rt.queries.list_held(boss, folder="quarantine")

    assert [m.message_id for m in both.items] == [quarantine.message_id, review.message_id]
    assert [m.message_id for m in only.items] == [quarantine.message_id]
    with pytest.raises(Forbidden):
        rt.queries.list_held(agent_of(bot, rt))


# -- the feed and workspace-scoped events -----------------------------------------------


def test_owner_only_events_never_reach_an_agent_consumer_nor_block_its_thread(
    rt: Runtime, bot: AgentHandle
) -> None:
    """The feed orders events per thread and delivers only each thread's head. An
    event for owners only (agent_id NULL) about a thread must not become the head of
    that thread for an agent consumer, or the agent would wait for an ack it can
    never give."""
    first = deliver(rt, bot, subject="Topic", message_id="topic@example.com")
    for scope, consumer in ((bot.agent_id, "agent"), (WORKSPACE_SCOPE, "owner")):
        [seen] = rt.feed.lease(bot.workspace_id, scope, consumer, limit=10, lease_seconds=30)
        rt.feed.ack(bot.workspace_id, scope, consumer, [seen.event_id])
    with rt.db.write() as conn:  # held mail in the same thread, for owners only
        held = append_event(
            conn,
            workspace_id=bot.workspace_id,
            agent_id=None,
            type="message.held",
            thread_id=first.thread_id,
            payload={"agent_id": bot.agent_id},
            created_at=rt.clock.now(),
        )
    reply = deliver(rt, bot, subject="Re: Topic", in_reply_to="topic@example.com")
    assert reply.thread_id == first.thread_id

    agent_batch = rt.feed.lease(bot.workspace_id, bot.agent_id, "agent", limit=10, lease_seconds=30)
    owner_batch = rt.feed.lease(
        bot.workspace_id, WORKSPACE_SCOPE, "owner", limit=10, lease_seconds=30
    )

    assert [(e.type, e.payload["message_id"]) for e in agent_batch] == [
        ("message.received", reply.message_id)
    ]
    assert [e.event_id for e in owner_batch] == [held]  # the head of the thread for owners
    rt.feed.ack(bot.workspace_id, WORKSPACE_SCOPE, "owner", [held])
    after = rt.feed.lease(bot.workspace_id, WORKSPACE_SCOPE, "owner", limit=10, lease_seconds=30)
    assert [e.type for e in after] == ["message.received"]
    every = rt.feed.lease(bot.workspace_id, bot.agent_id, "fresh", limit=50, lease_seconds=30)
    assert all(e.agent_id == bot.agent_id for e in every)
    assert held not in {e.event_id for e in every}


# -- end to end: rules decide at ingest -------------------------------------------------


def rule(action: str) -> dict[str, Any]:
    return {"action": action, "condition": {"field": "subject", "match": "contains", "value": "x"}}


def agent_feed(rt: Runtime, bot: AgentHandle) -> list[tuple[str, str]]:
    """(type, message id) of everything the agent's feed hands out now, acking as it
    goes (a thread's next event comes only once the one before is acked)."""
    seen: list[tuple[str, str]] = []
    while leased := rt.feed.lease(
        bot.workspace_id, bot.agent_id, "agent", limit=50, lease_seconds=30
    ):
        rt.feed.ack(bot.workspace_id, bot.agent_id, "agent", [e.event_id for e in leased])
        seen += [(e.type, e.payload["message_id"]) for e in leased]
    return seen


@pytest.mark.parametrize("action", ["review", "quarantine"])
def test_mail_a_rule_held_reaches_the_agents_feed_only_once_released(
    rt: Runtime, bot: AgentHandle, action: str
) -> None:
    add_rule(rt, bot, rule(action))
    stored = deliver(rt, bot, subject="x marks the spot")
    assert folder_of(rt, stored.message_id) == (action, None, None)
    assert agent_feed(rt, bot) == []
    owners = rt.feed.lease(bot.workspace_id, WORKSPACE_SCOPE, "o", limit=50, lease_seconds=30)
    assert [e.agent_id for e in owners] == [None]  # held/quarantined: for owners only

    rt.mailbox.release(owner(bot, rt), stored.message_id)

    assert agent_feed(rt, bot) == [("message.received", stored.message_id)]
    assert rt.queries.get_message(agent_of(bot, rt), stored.message_id).summary.folder == "inbox"


def test_mail_a_rule_trashed_reaches_the_agent_when_an_owner_restores_it(
    rt: Runtime, bot: AgentHandle
) -> None:
    add_rule(rt, bot, rule("trash"))
    stored = deliver(rt, bot, subject="x")
    assert folder_of(rt, stored.message_id)[:2] == ("trash", "inbox")
    assert rt.queries.list_trash(agent_of(bot, rt)).items == ()
    assert agent_feed(rt, bot) == []

    change = rt.mailbox.restore(owner(bot, rt), stored.message_id)

    assert (change.to_folder, change.reached_agent) == ("inbox", True)
    assert agent_feed(rt, bot) == [
        ("message.restored", stored.message_id),
        ("message.received", stored.message_id),
    ]
