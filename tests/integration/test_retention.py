"""Trash retention: purging expired trash, its threads and the blobs only it used, on
SQLite and PostgreSQL, including the race with an ingest storing the same bytes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import ColumnElement, Table, func, select, text, update

from mailgate.clock import FakeClock
from mailgate.config import Settings
from mailgate.domain.compose import AttachmentIn
from mailgate.errors import NotFound
from mailgate.runtime import Runtime
from mailgate.services.drafts import DraftFields, DraftService
from mailgate.services.mailbox import Operator, PurgeResult
from mailgate.store.blobs import LocalBlobStore, MemoryBlobStore
from mailgate.store.schema import (
    attachments,
    audit_log,
    blobs,
    events,
    messages,
    thread_refs,
    threads,
    webhook_receipts,
)
from mailgate.testing import build_message
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import ENVELOPE, deliver
from tests.integration.test_mailbox import file_as

DAY = 86400.0
INLINE_MAX = 1024  # attachments above this are files
HOUR_AGO = 3600.0 + 60


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rt(settings: Settings, clock: FakeClock) -> Iterator[Runtime]:
    changed = settings.model_copy(
        update={"blob_inline_max": INLINE_MAX, "trash_retention_days": 30}
    )
    runtime = Runtime.build(changed, clock=clock)
    yield runtime
    runtime.close()


@pytest.fixture
def bot(rt: Runtime) -> AgentHandle:
    return make_agent(rt)


def count(rt: Runtime, table: Table, *where: ColumnElement[bool]) -> int:
    with rt.db.read() as conn:
        query = select(func.count()).select_from(table).where(*where)
        return int(conn.execute(query).scalar_one())


def blob_files(rt: Runtime) -> set[str]:
    root = rt.settings.effective_blob_dir
    return {p.name for p in root.rglob("*") if p.is_file()}


def age_files(rt: Runtime, seconds: float) -> None:
    """Make every blob file look written ``seconds`` ago (mtime is wall-clock time,
    which the FakeClock does not move)."""
    then = time.time() - seconds
    for path in rt.settings.effective_blob_dir.rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))


def trash(rt: Runtime, message_id: str) -> None:
    rt.mailbox.trash(Operator(), message_id)


# -- what goes and what stays -----------------------------------------------------------


def test_trash_past_retention_is_purged_with_its_attachments_and_nothing_else(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    old = deliver(rt, bot, subject="old", attachments=[("a.txt", "text/plain", b"old bytes")])
    kept_inbox = deliver(rt, bot, subject="inbox")
    held = deliver(rt, bot, subject="held")
    file_as(rt, held.message_id, "review")
    trash(rt, old.message_id)
    clock.advance(29 * DAY)
    young = deliver(rt, bot, subject="young")
    trash(rt, young.message_id)
    events_before = count(rt, events)
    clock.advance(1 * DAY + 1)

    result = rt.mailbox.purge_trash()

    assert (result.messages, result.attachments, result.more) == (1, 1, False)
    with rt.db.read() as conn:
        left = set(conn.execute(select(messages.c.id)).scalars())
    assert left == {kept_inbox.message_id, held.message_id, young.message_id}
    assert count(rt, attachments, attachments.c.message_id == old.message_id) == 0
    assert count(rt, events) == events_before  # history stays
    with pytest.raises(NotFound):
        rt.queries.get_message(rt.tenancy.authenticate(bot.owner_key), old.message_id)


def test_a_purge_run_is_audited_once_with_its_counts(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    gone = [deliver(rt, bot, subject=f"n{i}") for i in range(3)]
    for stored in gone:
        trash(rt, stored.message_id)
    clock.advance(31 * DAY)

    rt.mailbox.purge_trash()
    rt.mailbox.purge_trash()  # nothing left: no second entry

    with rt.db.read() as conn:
        rows = conn.execute(
            select(audit_log.c.actor, audit_log.c.detail).where(
                audit_log.c.action == "trash.purged"
            )
        ).all()
    [(actor, detail)] = [(r.actor, r.detail) for r in rows]
    assert actor == "system"
    assert detail["messages"] == 3
    assert detail["by_workspace"] == {bot.workspace_id: 3}
    assert sorted(detail["message_ids"]) == sorted(s.message_id for s in gone)


def test_retention_counts_from_when_mail_was_trashed_not_when_it_arrived(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    stored = deliver(rt, bot)
    clock.advance(60 * DAY)
    trash(rt, stored.message_id)
    clock.advance(29 * DAY)
    assert rt.mailbox.purge_trash().messages == 0
    clock.advance(1 * DAY + 1)
    assert rt.mailbox.purge_trash().messages == 1


def test_a_purge_takes_at_most_limit_messages_and_says_there_is_more(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    for i in range(5):
        trash(rt, deliver(rt, bot, subject=f"n{i}").message_id)
    clock.advance(31 * DAY)

    first = rt.mailbox.purge_trash(limit=3)
    second = rt.mailbox.purge_trash(limit=3)

    assert (first.messages, first.more) == (3, True)
    assert (second.messages, second.more) == (2, False)


# -- threads ----------------------------------------------------------------------------


def test_a_thread_left_empty_goes_with_its_refs_and_a_shared_one_counts_one_less(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    alone = deliver(rt, bot, subject="alone", message_id="alone@example.com")
    parent = deliver(rt, bot, subject="pair", message_id="pair@example.com")
    reply = deliver(rt, bot, subject="Re: pair", in_reply_to="pair@example.com")
    assert reply.thread_id == parent.thread_id
    trash(rt, alone.message_id)
    trash(rt, reply.message_id)
    clock.advance(31 * DAY)

    result = rt.mailbox.purge_trash()

    assert (result.threads_deleted, result.threads_updated) == (1, 1)
    assert count(rt, threads, threads.c.id == alone.thread_id) == 0
    assert count(rt, thread_refs, thread_refs.c.thread_id == alone.thread_id) == 0
    with rt.db.read() as conn:
        remaining = conn.execute(
            select(threads.c.message_count).where(threads.c.id == parent.thread_id)
        ).scalar_one()
    assert remaining == 1
    assert count(rt, thread_refs, thread_refs.c.thread_id == parent.thread_id) > 0


def test_a_purge_never_waits_for_a_thread_an_ingest_holds_and_catches_up_later(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    """On PostgreSQL the purge skips threads another transaction holds (no lock waits,
    so no deadlock with ingest); SQLite's single writer simply runs it afterwards."""
    stored = deliver(rt, bot)
    trash(rt, stored.message_id)
    clock.advance(31 * DAY)
    results: list[PurgeResult] = []
    with rt.db.write() as conn:  # an ingest adding to the thread, not yet committed
        conn.execute(
            update(threads)
            .where(threads.c.id == stored.thread_id)
            .values(message_count=threads.c.message_count + 1)
        )
        purge = threading.Thread(target=lambda: results.append(rt.mailbox.purge_trash()))
        purge.start()
        if not rt.db.is_sqlite:
            purge.join(timeout=30)
            assert not purge.is_alive(), "the purge waited for the thread's lock"
            assert (results[0].messages, results[0].more) == (0, False)
    purge.join(timeout=30)
    results.append(rt.mailbox.purge_trash())

    assert sum(r.messages for r in results) == 1
    assert count(rt, messages, messages.c.id == stored.message_id) == 0


# -- blobs ------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw_of(rt: Runtime, message_id: str) -> str:
    with rt.db.read() as conn:
        return str(
            conn.execute(
                select(messages.c.raw_sha256).where(messages.c.id == message_id)
            ).scalar_one()
        )


def test_blobs_only_purged_mail_used_are_deleted_from_both_tiers(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    large, shared = os.urandom(4 * INLINE_MAX), os.urandom(4 * INLINE_MAX)
    binary = "application/octet-stream"
    gone = deliver(rt, bot, attachments=[("big", binary, large), ("small", binary, b"mine")])
    also = deliver(rt, bot, attachments=[("copy", binary, shared)])
    keeper = deliver(rt, bot, attachments=[("big", binary, shared)])
    # Raws are over INLINE_MAX too, so they are files; only b"mine" is a row.
    unused_files = {raw_of(rt, gone.message_id), raw_of(rt, also.message_id), sha(large)}
    files_before = blob_files(rt)
    assert unused_files | {sha(shared)} <= files_before
    trash(rt, gone.message_id)
    trash(rt, also.message_id)
    clock.advance(31 * DAY)
    age_files(rt, HOUR_AGO)

    result = rt.mailbox.purge_trash()

    assert (result.messages, result.blob_rows, result.blob_files) == (2, 1, 3)
    assert blob_files(rt) == files_before - unused_files
    assert count(rt, blobs, blobs.c.sha256 == sha(b"mine")) == 0
    for digest in unused_files:
        assert not rt.blobs.exists(digest)
    owner = rt.tenancy.authenticate(bot.owner_key)
    [attachment] = rt.queries.get_message(owner, keeper.message_id).attachments
    found = rt.queries.get_attachment(owner, keeper.message_id, attachment.attachment_id)
    assert found.data == shared  # the keeper still uses the shared bytes


def test_a_small_blob_another_message_uses_stays(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    raw = build_message(to=bot.address, message_id="same@example.com")
    other = make_agent(rt, "other bot")
    gone = deliver(rt, bot, raw=raw)
    kept = deliver(rt, other, raw=raw)  # same bytes, another agent: one blob row
    trash(rt, gone.message_id)
    clock.advance(31 * DAY)

    result = rt.mailbox.purge_trash()

    assert (result.messages, result.blob_rows) == (1, 0)
    owner = rt.tenancy.authenticate(other.owner_key)
    assert rt.queries.get_raw(owner, kept.message_id) == raw


def test_a_blob_a_draft_attaches_stays_when_mail_with_the_same_bytes_is_purged(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    data = b"quarterly figures, the same bytes in a message and in a draft"
    raw = build_message(
        to=bot.address, attachments=[("figures.txt", "application/octet-stream", data)]
    )
    gone = deliver(rt, bot, raw=raw)
    drafts = DraftService(rt.db, rt.blobs, rt.clock, rt.settings, rt.outbound)
    agent = rt.tenancy.authenticate(bot.agent_key)
    drafts.create(
        agent,
        bot.agent_id,
        DraftFields(to=("carol@example.com",), subject="figures"),
        attachments=[AttachmentIn("figures.txt", "application/octet-stream", data)],
    )
    trash(rt, gone.message_id)
    clock.advance(31 * DAY)

    result = rt.mailbox.purge_trash()

    assert result.messages == 1
    assert rt.blobs.get(hashlib.sha256(data).hexdigest()) == data


def test_a_blob_file_put_again_within_the_grace_period_is_spared(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    """The file-tier race: an ingest of the same bytes re-puts the file (refreshing its
    mtime) and will commit a row naming it; retention must not delete it meanwhile."""
    large = os.urandom(4 * INLINE_MAX)
    gone = deliver(rt, bot, attachments=[("big", "application/octet-stream", large)])
    trash(rt, gone.message_id)
    clock.advance(31 * DAY)
    age_files(rt, HOUR_AGO)
    rt.blobs.files.put(large)  # an ingest in flight stores the same attachment

    result = rt.mailbox.purge_trash()

    assert result.messages == 1
    assert result.blob_files == 1  # the raw went; the re-put attachment stayed
    assert rt.blobs.get(sha(large)) == large


def test_a_blob_row_an_uncommitted_ingest_relies_on_is_not_deleted(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    """The database-tier race: an ingest of the same bytes finds the blob row present
    (its insert does nothing) and names it in a message not yet committed. The blob
    collection must wait for it rather than delete the row under it."""
    raw = build_message(to=bot.address, message_id="race@example.com")
    other = make_agent(rt, "other bot")
    gone = deliver(rt, bot, raw=raw)
    trash(rt, gone.message_id)
    clock.advance(31 * DAY)
    recipient = rt.tenancy.resolve_recipient(other.address)
    assert recipient is not None
    prepared = rt.ingest.prepare(raw)
    purged: list[object] = []
    with rt.db.write() as conn:  # the ingest's transaction, held open
        [[stored]] = rt.ingest.store_many(conn, [(prepared, ENVELOPE, [recipient])])
        purge = threading.Thread(target=lambda: purged.append(rt.mailbox.purge_trash()))
        purge.start()
        if not rt.db.is_sqlite:  # (SQLite: the purge cannot even begin until we commit)
            wait_until(lambda: not purge.is_alive() or waiting_for_a_lock(rt))
    purge.join(timeout=30)

    assert not purge.is_alive() and len(purged) == 1
    owner = rt.tenancy.authenticate(other.owner_key)
    assert rt.queries.get_raw(owner, stored.message_id) == raw
    assert count(rt, messages, messages.c.id == gone.message_id) == 0


def waiting_for_a_lock(rt: Runtime) -> bool:
    """Whether some PostgreSQL session waits for a lock (the purge, on ``blobs``)."""
    with rt.db.engine.connect() as conn:
        return bool(conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar())


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


# -- the file tier on its own -----------------------------------------------------------


def test_putting_bytes_already_stored_refreshes_the_files_mtime(tmp_path: Path) -> None:
    files = LocalBlobStore(tmp_path)
    digest = files.put(b"x" * 10)
    path = tmp_path / digest[:2] / digest
    os.utime(path, (1.0, 1.0))
    files.put(b"x" * 10)
    assert time.time() - path.stat().st_mtime < 60


def test_a_file_is_deleted_only_outside_its_grace_period(tmp_path: Path) -> None:
    files = LocalBlobStore(tmp_path)
    digest = files.put(b"payload")
    assert not files.delete(digest, grace_seconds=3600)
    assert files.get(digest) == b"payload"
    path = tmp_path / digest[:2] / digest
    os.utime(path, (time.time() - HOUR_AGO, time.time() - HOUR_AGO))
    assert files.delete(digest, grace_seconds=3600)
    assert not files.exists(digest)
    assert not files.delete(digest, grace_seconds=0)  # already gone
    assert not files.delete("not a digest", grace_seconds=0)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing left aside
    files.put(b"payload")  # and the same bytes can come back
    assert files.get(digest) == b"payload"


def test_the_memory_fake_honours_the_grace_period_too() -> None:
    fake = MemoryBlobStore()
    digest = fake.put(b"payload")
    assert not fake.delete(digest, grace_seconds=3600)
    assert fake.delete(digest, grace_seconds=0)
    assert not fake.exists(digest)


def test_the_tiered_store_deletes_from_whichever_tier_holds_the_blob(rt: Runtime) -> None:
    small, large = rt.blobs.put(b"tiny"), rt.blobs.put(os.urandom(2 * INLINE_MAX))
    age_files(rt, HOUR_AGO)
    assert rt.blobs.delete(small, grace_seconds=3600)
    assert rt.blobs.delete(large, grace_seconds=3600)
    assert not rt.blobs.exists(small) and not rt.blobs.exists(large)
    assert not rt.blobs.delete(small, grace_seconds=0)


# -- webhook receipts -------------------------------------------------------------------


def test_expired_webhook_receipts_are_deleted(rt: Runtime, clock: FakeClock) -> None:
    now = clock.now()
    with rt.db.write() as conn:
        conn.execute(
            webhook_receipts.insert(),
            [
                {
                    "provider": "mailgun",
                    "event_id": name,
                    "body_sha256": "0" * 64,
                    "results": [],
                    "created_at": now,
                    "expires_at": now + timedelta(days=days),
                }
                for name, days in (("old", 1), ("fresh", 10))
            ],
        )
    clock.advance(2 * DAY)

    assert rt.mailbox.purge_trash().receipts == 1
    with rt.db.read() as conn:
        left = list(conn.execute(select(webhook_receipts.c.event_id)).scalars())
    assert left == ["fresh"]


# -- the worker -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_retention_worker_purges_until_told_to_stop(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    from mailgate.workers.retention import run_retention

    trash(rt, deliver(rt, bot).message_id)
    clock.advance(31 * DAY)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_retention(rt, interval=3600, stop=stop))

    async with asyncio.timeout(10):
        while count(rt, messages):
            await asyncio.sleep(0.01)
    stop.set()
    async with asyncio.timeout(10):
        await worker


@pytest.mark.breaks_schema
@pytest.mark.anyio
async def test_a_failing_retention_run_is_logged_and_the_worker_goes_on(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    from mailgate.workers.retention import run_retention

    with rt.db.write() as conn:  # break the store under the worker
        conn.execute(text("DROP TABLE webhook_receipts"))

    def failures() -> int:
        return sum("retention run failed" in r.getMessage() for r in caplog.records)

    stop = asyncio.Event()
    worker = asyncio.create_task(run_retention(rt, interval=0.01, stop=stop))
    async with asyncio.timeout(10):
        while failures() < 2:  # it failed, and went on to try again
            await asyncio.sleep(0.01)
    stop.set()
    async with asyncio.timeout(10):
        await worker
