"""Ingest service: storage, dedup, threading and events, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import Table, func, select

from mailgate.runtime import Runtime
from mailgate.services.ingest import Envelope, Prepared, Stored
from mailgate.services.tenancy import Recipient
from mailgate.store.db import Database
from mailgate.store.schema import attachments, events, messages, threads
from mailgate.testing import build_message
from tests.conftest import AgentHandle, make_agent

ENVELOPE = Envelope(
    mail_from="alice@example.com", client_address="127.0.0.1", helo="client.example"
)


def _recipient(runtime: Runtime, agent: AgentHandle) -> list[Recipient]:
    found = runtime.tenancy.resolve_recipient(agent.address)
    assert found is not None
    return [found]


def _count(runtime: Runtime, table: Table, **where: str) -> int:
    with runtime.db.read() as conn:
        query = select(func.count()).select_from(table)
        for column, value in where.items():
            query = query.where(table.c[column] == value)
        return int(conn.execute(query).scalar_one())


def test_a_message_is_stored_verbatim_with_its_envelope_and_one_event(
    runtime: Runtime, agent: AgentHandle
) -> None:
    raw = build_message(to=agent.address, attachments=[("a.txt", "text/plain", b"hello")])
    [stored] = runtime.ingest.ingest(raw, ENVELOPE, _recipient(runtime, agent))
    assert not stored.duplicate
    with runtime.db.read() as conn:
        row = conn.execute(select(messages).where(messages.c.id == stored.message_id)).one()
        event = conn.execute(select(events)).one()
    assert runtime.blobs.get(row.raw_sha256) == raw
    assert (row.mail_from, row.rcpt_to, row.client_address, row.helo) == (
        "alice@example.com",
        agent.address,
        "127.0.0.1",
        "client.example",
    )
    assert row.folder == "inbox" and not row.message_id_generated
    assert event.type == "message.received"
    assert event.payload["message_id"] == stored.message_id
    assert event.payload["thread_id"] == stored.thread_id
    assert event.payload["from"]["address"] == "alice@example.com"
    assert _count(runtime, attachments, message_id=stored.message_id) == 1


def test_the_same_message_delivered_again_is_stored_once_and_reported_as_duplicate(
    runtime: Runtime, agent: AgentHandle
) -> None:
    raw = build_message(to=agent.address)
    first = runtime.ingest.ingest(raw, ENVELOPE, _recipient(runtime, agent))
    second = runtime.ingest.ingest(raw, ENVELOPE, _recipient(runtime, agent))
    assert second[0].duplicate and second[0].message_id == first[0].message_id
    assert _count(runtime, messages) == 1
    assert _count(runtime, events) == 1


def test_same_message_id_with_different_bytes_is_a_different_message(
    runtime: Runtime, agent: AgentHandle
) -> None:
    one = build_message(to=agent.address, message_id="same@example.com", body="one\n")
    two = build_message(to=agent.address, message_id="same@example.com", body="two\n")
    runtime.ingest.ingest(one, ENVELOPE, _recipient(runtime, agent))
    runtime.ingest.ingest(two, ENVELOPE, _recipient(runtime, agent))
    assert _count(runtime, messages) == 2


def test_concurrent_copies_of_one_message_are_stored_once(
    runtime: Runtime, agent: AgentHandle
) -> None:
    raw = build_message(to=agent.address)
    rcpt = _recipient(runtime, agent)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: runtime.ingest.ingest(raw, ENVELOPE, rcpt), range(16)))
    ids = {r[0].message_id for r in results}
    assert len(ids) == 1
    assert sum(not r[0].duplicate for r in results) == 1
    assert _count(runtime, messages) == 1


def test_a_message_without_message_id_gets_a_generated_one_that_still_dedups(
    runtime: Runtime, agent: AgentHandle
) -> None:
    raw = build_message(to=agent.address, message_id=None)
    [first] = runtime.ingest.ingest(raw, ENVELOPE, _recipient(runtime, agent))
    [again] = runtime.ingest.ingest(raw, ENVELOPE, _recipient(runtime, agent))
    assert again.duplicate
    with runtime.db.read() as conn:
        row = conn.execute(select(messages).where(messages.c.id == first.message_id)).one()
    assert row.message_id_generated
    assert row.rfc_message_id.endswith("@mailgate.invalid")


def test_one_message_to_two_agents_is_stored_once_per_agent(runtime: Runtime) -> None:
    a = make_agent(runtime, "alpha", "ws-a")
    b = make_agent(runtime, "beta", "ws-b")
    raw = build_message(to=f"{a.address}, {b.address}")
    rcpts = _recipient(runtime, a) + _recipient(runtime, b)
    stored = runtime.ingest.ingest(raw, ENVELOPE, rcpts)
    assert {s.agent_id for s in stored} == {a.agent_id, b.agent_id}
    assert _count(runtime, messages, agent_id=a.agent_id) == 1
    assert _count(runtime, messages, agent_id=b.agent_id) == 1
    assert _count(runtime, events) == 2


def test_replies_join_the_thread_of_the_message_they_answer(
    runtime: Runtime, agent: AgentHandle
) -> None:
    rcpt = _recipient(runtime, agent)
    root = build_message(to=agent.address, message_id="root@example.com", subject="Plan")
    reply = build_message(
        to=agent.address,
        message_id="reply@example.com",
        subject="Re: Plan",
        in_reply_to="root@example.com",
        references=["root@example.com"],
    )
    [first] = runtime.ingest.ingest(root, ENVELOPE, rcpt)
    [second] = runtime.ingest.ingest(reply, ENVELOPE, rcpt)
    assert second.thread_id == first.thread_id
    assert second.thread_reason == "own-message-id" or second.thread_reason == "in-reply-to"
    with runtime.db.read() as conn:
        count = conn.execute(
            select(threads.c.message_count).where(threads.c.id == first.thread_id)
        ).scalar_one()
    assert count == 2


def test_two_replies_to_a_parent_we_never_received_share_a_thread(
    runtime: Runtime, agent: AgentHandle
) -> None:
    rcpt = _recipient(runtime, agent)
    one = build_message(
        to=agent.address, subject="Topic A", in_reply_to="lost@x", references=["lost@x"]
    )
    two = build_message(
        to=agent.address,
        sender="Bob <bob@example.net>",
        subject="Different words",
        in_reply_to="lost@x",
        references=["lost@x"],
    )
    [a] = runtime.ingest.ingest(one, ENVELOPE, rcpt)
    [b] = runtime.ingest.ingest(two, ENVELOPE, rcpt)
    assert a.thread_id == b.thread_id


def test_a_reply_without_references_threads_by_subject_and_participant(
    runtime: Runtime, agent: AgentHandle
) -> None:
    rcpt = _recipient(runtime, agent)
    [first] = runtime.ingest.ingest(
        build_message(to=agent.address, subject="Quarterly numbers"), ENVELOPE, rcpt
    )
    [same_person] = runtime.ingest.ingest(
        build_message(to=agent.address, subject="RE: Quarterly numbers"), ENVELOPE, rcpt
    )
    [stranger] = runtime.ingest.ingest(
        build_message(
            to=agent.address, sender="eve@elsewhere.example", subject="Re: Quarterly numbers"
        ),
        ENVELOPE,
        rcpt,
    )
    assert same_person.thread_id == first.thread_id and same_person.thread_reason == "subject"
    assert stranger.thread_id != first.thread_id


def test_copies_racing_through_two_gateway_processes_are_stored_once(
    runtime: Runtime, agent: AgentHandle
) -> None:
    """Two runtimes on one database stand for two nodes: each has its own engine and
    committer, so only the unique index can settle the race."""
    other = Runtime.build(runtime.settings)
    try:
        raw = build_message(to=agent.address)
        rcpt = _recipient(runtime, agent)
        nodes = [runtime, other] * 6
        with ThreadPoolExecutor(len(nodes)) as pool:
            results = list(pool.map(lambda rt: rt.ingest.ingest(raw, ENVELOPE, rcpt), nodes))
    finally:
        other.close()
    assert len({r[0].message_id for r in results}) == 1
    assert sum(not r[0].duplicate for r in results) == 1
    assert _count(runtime, messages) == 1
    assert _count(runtime, events) == 1


def test_a_batch_stores_exactly_what_one_by_one_ingest_would(
    runtime: Runtime, agent: AgentHandle
) -> None:
    """One store_many call holding a root, its reply, a copy of the root and a
    subject-only reply threads and dedups as if each had been stored alone."""
    rcpt = _recipient(runtime, agent)
    root = build_message(to=agent.address, message_id="root@x", subject="Budget")
    reply = build_message(
        to=agent.address, message_id="reply@x", subject="Re: Budget", in_reply_to="root@x"
    )
    loose = build_message(to=agent.address, message_id="loose@x", subject="RE: Budget")
    items = [(runtime.ingest.prepare(raw), ENVELOPE, rcpt) for raw in (root, reply, root, loose)]
    with runtime.db.write() as conn:
        results = runtime.ingest.store_many(conn, items)
    [first], [second], [copy], [fourth] = results
    assert second.thread_id == first.thread_id and second.thread_reason == "in-reply-to"
    assert copy.duplicate and copy.message_id == first.message_id
    assert fourth.thread_id == first.thread_id and fourth.thread_reason == "subject"
    assert _count(runtime, messages) == 3
    assert _count(runtime, events) == 3
    with runtime.db.read() as conn:
        count = conn.execute(
            select(threads.c.message_count).where(threads.c.id == first.thread_id)
        ).scalar_one()
    assert count == 3


def test_a_later_batch_updates_threads_made_by_an_earlier_one(
    runtime: Runtime, agent: AgentHandle
) -> None:
    rcpt = _recipient(runtime, agent)
    root = runtime.ingest.prepare(build_message(to=agent.address, message_id="r@x"))
    replies = [
        runtime.ingest.prepare(
            build_message(
                to=agent.address,
                sender=f"p{i}@example.org",
                message_id=f"a{i}@x",
                in_reply_to="r@x",
            )
        )
        for i in range(3)
    ]
    with runtime.db.write() as conn:
        [[first]] = runtime.ingest.store_many(conn, [(root, ENVELOPE, rcpt)])
    with runtime.db.write() as conn:
        later = runtime.ingest.store_many(conn, [(p, ENVELOPE, rcpt) for p in replies])
    assert {r[0].thread_id for r in later} == {first.thread_id}
    with runtime.db.read() as conn:
        row = conn.execute(select(threads).where(threads.c.id == first.thread_id)).one()
    assert row.message_count == 4
    assert {"p0@example.org", "p1@example.org", "p2@example.org"} <= set(row.participants)


@pytest.mark.parametrize(
    "statement", ["_SELECT_DUPLICATES", "_SELECT_REFS", "_SELECT_SUBJECT_THREADS"]
)
def test_ingest_lookups_search_an_index_instead_of_scanning_the_mailbox(
    sqlite_url: str, statement: str
) -> None:
    """Ingest cost must stay flat as a mailbox grows: every per-batch lookup is an index
    search on SQLite (a row-value IN once silently became a full scan)."""
    from sqlalchemy.dialects import sqlite

    from mailgate.services import ingest

    sql = str(getattr(ingest, statement).compile(dialect=sqlite.dialect()))
    sql = sql.replace("(__[POSTCOMPILE_agents])", "(?, ?)").replace(
        "(__[POSTCOMPILE_keys])", "(?, ?)"
    )
    db = Database(sqlite_url)
    try:
        with db.read() as conn:
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, ("x",) * sql.count("?")).all()
    finally:
        db.dispose()
    details = " ".join(str(row[-1]) for row in plan)
    assert "SEARCH" in details and "USING INDEX" in details
    assert "SCAN messages" not in details and "SCAN thread" not in details


@pytest.mark.postgres
def test_losing_the_dedup_race_on_postgresql_answers_with_the_winners_copy(
    pg_url: str, tmp_path: Path
) -> None:
    """Node A has inserted a copy but not committed; node B's insert of the same copy
    waits on the unique index, fails when A commits, and must answer as a duplicate
    (not an error) from its savepoint."""
    from mailgate.config import load_settings

    runtime = Runtime.build(load_settings(data_dir=tmp_path, database_url=pg_url))
    try:
        agent = make_agent(runtime)
        rcpt = _recipient(runtime, agent)
        prepared = runtime.ingest.prepare(build_message(to=agent.address))
        release = threading.Event()
        winner: list[Stored] = []

        def node_a() -> None:
            with runtime.db.write() as conn:
                winner.extend(runtime.ingest.store(conn, prepared, ENVELOPE, rcpt))
                assert release.wait(20)

        a = threading.Thread(target=node_a)
        a.start()
        with ThreadPoolExecutor(1) as pool:
            while not winner:  # A has inserted (uncommitted)
                assert a.is_alive()
                time.sleep(0.01)
            future = pool.submit(_store_in_own_transaction, runtime, prepared, rcpt)
            _wait_for_lock_waiter(runtime)
            release.set()
            [loser] = future.result(timeout=20)
        a.join(20)
        assert loser.duplicate and loser.message_id == winner[0].message_id
        assert _count(runtime, messages) == 1
    finally:
        runtime.close()


def _store_in_own_transaction(
    runtime: Runtime, prepared: Prepared, rcpt: list[Recipient]
) -> list[Stored]:
    with runtime.db.write() as conn:
        return runtime.ingest.store(conn, prepared, ENVELOPE, rcpt)


def _wait_for_lock_waiter(runtime: Runtime) -> None:
    """Until some backend waits on a lock (node B blocked on A's unique-index entry)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with runtime.db.read() as conn:
            waiting = conn.exec_driver_sql("SELECT count(*) FROM pg_locks WHERE NOT granted")
            if waiting.scalar_one():
                return
        time.sleep(0.01)
    raise AssertionError("node B never blocked on the unique index")
