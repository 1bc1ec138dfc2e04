"""The durable pull feed on real SQLite and real PostgreSQL.

Time is a FakeClock: leases expire by advancing it, never by sleeping. Long-poll tests
use real (short) waits, bounded, and wait on conditions rather than sleeping.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select

from mailgate.clock import FakeClock
from mailgate.config import Settings, load_settings
from mailgate.errors import ValidationFailed
from mailgate.ids import new_id
from mailgate.services import feed as feed_module
from mailgate.services.events import append_event
from mailgate.services.feed import (
    MATERIALISE_BATCH,
    FeedNotifier,
    FeedService,
    LeasedEvent,
)
from mailgate.store.db import Database
from mailgate.store.schema import agents, consumers, deliveries, events, workspaces

LEASE = 30.0


# -- set-up helpers --------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def notifier() -> FeedNotifier:
    return FeedNotifier()


@pytest.fixture
def feed(db: Database, settings: Settings, clock: FakeClock, notifier: FeedNotifier) -> FeedService:
    return FeedService(db, settings, clock, notifier)


def insert_workspace(db: Database, clock: FakeClock) -> str:
    ws = new_id("ws")
    with db.write() as conn:
        conn.execute(workspaces.insert().values(id=ws, name=ws, created_at=clock.now()))
    return ws


def insert_agent(db: Database, clock: FakeClock, ws: str) -> str:
    agent = new_id("agt")
    with db.write() as conn:
        conn.execute(
            agents.insert().values(id=agent, workspace_id=ws, name=agent, created_at=clock.now())
        )
    return agent


def append(
    db: Database,
    clock: FakeClock,
    ws: str,
    agent: str | None,
    *,
    count: int = 1,
    thread: str | None = None,
    type: str = "message.received",
) -> list[str]:
    with db.write() as conn:
        return [
            append_event(
                conn,
                workspace_id=ws,
                agent_id=agent,
                type=type,
                payload={"n": n},
                created_at=clock.now(),
                thread_id=thread,
            )
            for n in range(count)
        ]


@pytest.fixture
def ws_agent(db: Database, clock: FakeClock) -> tuple[str, str]:
    """(workspace id, agent id) of a fresh workspace with one agent."""
    ws = insert_workspace(db, clock)
    return ws, insert_agent(db, clock, ws)


def ids(batch: list[LeasedEvent]) -> list[str]:
    return [event.event_id for event in batch]


def with_settings(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update=changes)


# -- leasing ---------------------------------------------------------------------------


def test_a_lease_returns_events_oldest_first_and_respects_the_limit(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    appended = append(db, clock, ws, agt, count=5)

    first = feed.lease(ws, agt, "worker", limit=3, lease_seconds=LEASE)
    second = feed.lease(ws, agt, "worker", limit=3, lease_seconds=LEASE)

    assert ids(first) == appended[:3]
    assert ids(second) == appended[3:]
    event = first[0]
    assert (event.type, event.payload, event.agent_id, event.delivery_count) == (
        "message.received",
        {"n": 0},
        agt,
        1,
    )
    assert (event.lease_expires_at - clock.now()).total_seconds() == LEASE


def test_a_second_pull_while_the_lease_is_held_returns_nothing(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    append(db, clock, ws, agt, count=2)
    assert len(feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)) == 2

    clock.advance(LEASE - 1)

    assert feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE) == []


def test_an_expired_lease_redelivers_the_event_with_delivery_count_two(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    (event_id,) = append(db, clock, ws, agt)
    feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)

    clock.advance(LEASE)
    again = feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)

    assert ids(again) == [event_id]
    assert again[0].delivery_count == 2


def test_a_new_consumer_sees_every_event_retained_before_it_existed(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    appended = append(db, clock, ws, agt, count=MATERIALISE_BATCH + 20)
    seen: list[str] = []

    for _ in range(10):
        batch = feed.lease(ws, agt, "late-joiner", limit=100, lease_seconds=LEASE)
        if not batch:
            break
        seen += ids(batch)

    assert seen == appended


# -- ack / nack / extend ---------------------------------------------------------------


def test_ack_is_idempotent_and_reports_unknown_ids(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    a, b = append(db, clock, ws, agt, count=2)
    feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)

    first = feed.ack(ws, agt, "worker", [a])
    second = feed.ack(ws, agt, "worker", [a, b, "evt_unknown", a])

    assert (first.acked, first.already_acked, first.not_found) == ((a,), (), ())
    assert (second.acked, second.already_acked, second.not_found) == ((b,), (a,), ("evt_unknown",))


def test_acked_events_never_come_back(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    a, b = append(db, clock, ws, agt, count=2)
    feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)
    feed.ack(ws, agt, "worker", [a])

    clock.advance(LEASE * 10)

    assert ids(feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)) == [b]
    feed.ack(ws, agt, "worker", [b])
    clock.advance(LEASE * 10)
    assert feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE) == []


def test_nack_with_a_delay_redelivers_only_after_the_delay(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    (event_id,) = append(db, clock, ws, agt)
    feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)

    result = feed.nack(ws, agt, "worker", [event_id], delay_seconds=10)

    assert result.nacked == (event_id,)
    assert (result.visible_at - clock.now()).total_seconds() == 10
    clock.advance(9)
    assert feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE) == []
    clock.advance(1)
    again = feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)
    assert ids(again) == [event_id]
    assert again[0].delivery_count == 2


def test_nack_without_delay_redelivers_at_once_and_leaves_acked_events_alone(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    a, b = append(db, clock, ws, agt, count=2)
    feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)
    feed.ack(ws, agt, "worker", [a])

    result = feed.nack(ws, agt, "worker", [a, b, "evt_unknown"])

    assert (result.nacked, result.finished, result.not_found) == ((b,), (a,), ("evt_unknown",))
    assert ids(feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)) == [b]


def test_extend_keeps_an_event_hidden_past_its_original_lease(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    (event_id,) = append(db, clock, ws, agt)
    feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)
    clock.advance(LEASE - 5)

    result = feed.extend(ws, agt, "worker", [event_id], lease_seconds=60)

    assert result.extended == (event_id,)
    clock.advance(30)  # 25 s past the original lease
    assert feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE) == []
    clock.advance(30)
    assert ids(feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)) == [event_id]


def test_an_expired_or_unleased_event_is_not_extended(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    a, b = append(db, clock, ws, agt, count=2)
    feed.lease(ws, agt, "worker", limit=1, lease_seconds=LEASE)  # leases a only
    clock.advance(LEASE)

    result = feed.extend(ws, agt, "worker", [a, b, "evt_unknown"], lease_seconds=60)

    assert (result.extended, result.not_leased, result.not_found) == ((), (a, b), ("evt_unknown",))


def test_settling_on_an_unknown_consumer_reports_every_id_not_found_and_creates_nothing(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    (event_id,) = append(db, clock, ws, agt)

    assert feed.ack(ws, agt, "ghost", [event_id]).not_found == (event_id,)
    assert feed.nack(ws, agt, "ghost", [event_id]).not_found == (event_id,)
    assert feed.extend(ws, agt, "ghost", [event_id], lease_seconds=5).not_found == (event_id,)
    assert feed.redrive(ws, agt, "ghost", [event_id]).not_found == (event_id,)
    with db.read() as conn:
        assert conn.execute(select(consumers.c.id)).all() == []


# -- dead letters ----------------------------------------------------------------------


def test_after_max_deliveries_an_event_is_dead_lettered_listed_and_unblocks_its_thread(
    db: Database, settings: Settings, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    feed = FeedService(db, with_settings(settings, feed_max_deliveries=2), clock, FeedNotifier())
    ws, agt = ws_agent
    poison, follower = append(db, clock, ws, agt, count=2, thread="thr_1")

    assert ids(feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)) == [poison]
    clock.advance(LEASE)
    assert ids(feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)) == [poison]
    clock.advance(LEASE)
    third = feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)

    assert ids(third) == [follower]
    page = feed.dead_letters(ws)
    assert [(d.event_id, d.consumer, d.scope, d.delivery_count) for d in page.items] == [
        (poison, "worker", agt, 2)
    ]
    assert page.items[0].dead_at == clock.now()
    assert page.next_cursor is None
    assert feed.dead_letters(ws, consumer="other").items == ()


def test_redrive_puts_a_dead_event_back_with_a_fresh_delivery_budget(
    db: Database, settings: Settings, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    feed = FeedService(db, with_settings(settings, feed_max_deliveries=1), clock, FeedNotifier())
    ws, agt = ws_agent
    dead, alive = append(db, clock, ws, agt, count=2)
    feed.lease(ws, agt, "worker", limit=1, lease_seconds=LEASE)
    clock.advance(LEASE)
    feed.lease(ws, agt, "worker", limit=1, lease_seconds=LEASE)  # dead-letters, leases alive

    result = feed.redrive(ws, agt, "worker", [dead, alive])

    assert (result.redriven, result.not_dead) == ((dead,), (alive,))
    again = feed.lease(ws, agt, "worker", limit=10, lease_seconds=LEASE)
    assert ids(again) == [dead]
    assert again[0].delivery_count == 1
    assert feed.dead_letters(ws).items == ()


def test_a_late_ack_of_a_dead_letter_resolves_it(
    db: Database, settings: Settings, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    feed = FeedService(db, with_settings(settings, feed_max_deliveries=1), clock, FeedNotifier())
    ws, agt = ws_agent
    (event_id,) = append(db, clock, ws, agt)
    feed.lease(ws, agt, "worker", limit=1, lease_seconds=LEASE)
    clock.advance(LEASE)
    feed.lease(ws, agt, "worker", limit=1, lease_seconds=LEASE)

    assert feed.ack(ws, agt, "worker", [event_id]).acked == (event_id,)
    assert feed.dead_letters(ws).items == ()


def test_dead_letters_page_with_a_cursor_across_consumers(
    db: Database, settings: Settings, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    feed = FeedService(db, with_settings(settings, feed_max_deliveries=1), clock, FeedNotifier())
    ws, agt = ws_agent
    append(db, clock, ws, agt, count=3)
    for name in ("a", "b"):
        feed.lease(ws, agt, name, limit=10, lease_seconds=LEASE)
    clock.advance(LEASE)
    for name in ("a", "b"):
        assert feed.lease(ws, agt, name, limit=10, lease_seconds=LEASE) == []

    seen: list[tuple[str, str]] = []
    cursor: str | None = None
    for _ in range(10):
        page = feed.dead_letters(ws, limit=4, cursor=cursor)
        seen += [(d.consumer, d.event_id) for d in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break

    assert len(seen) == len(set(seen)) == 6
    assert len(feed.dead_letters(ws, consumer="a", scope=agt).items) == 3


# -- materialising on demand -----------------------------------------------------------


def test_a_deep_backlog_is_materialised_only_as_far_as_pulls_need(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    append(db, clock, ws, agt, count=MATERIALISE_BATCH * 3)

    for _ in range(3):
        feed.lease(ws, agt, "w", limit=100, lease_seconds=LEASE)

    with db.read() as conn:
        made = conn.execute(select(func.count()).select_from(deliveries)).scalar_one()
    assert made == MATERIALISE_BATCH


def test_a_thread_queued_deeper_than_the_pending_cap_holds_back_newer_events(
    feed: FeedService,
    db: Database,
    clock: FakeClock,
    ws_agent: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(feed_module, "MAX_PENDING_ROWS", 3)
    monkeypatch.setattr(feed_module, "MATERIALISE_BATCH", 3)
    ws, agt = ws_agent
    deep = append(db, clock, ws, agt, count=4, thread="thr_deep")
    (newer,) = append(db, clock, ws, agt)

    assert ids(feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE)) == deep[:1]
    assert feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE) == []  # capped
    feed.ack(ws, agt, "w", deep[:1])
    assert ids(feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE)) == [deep[1], newer]


def test_an_event_deleted_under_its_delivery_is_finished_and_unblocks_its_thread(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    first, second = append(db, clock, ws, agt, count=2, thread="thr_1")
    feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE)
    with db.write() as conn:
        conn.execute(delete(events).where(events.c.id == first))
    clock.advance(LEASE)

    assert ids(feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE)) == [second]


# -- ordering and isolation ------------------------------------------------------------


def test_events_of_one_thread_are_delivered_strictly_in_order_while_other_threads_proceed(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    t1_first = append(db, clock, ws, agt, thread="thr_1")[0]
    t2_first = append(db, clock, ws, agt, thread="thr_2")[0]
    t1_second = append(db, clock, ws, agt, thread="thr_1")[0]
    lone = append(db, clock, ws, agt)[0]
    t2_second = append(db, clock, ws, agt, thread="thr_2")[0]

    assert ids(feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE)) == [
        t1_first,
        t2_first,
        lone,
    ]
    feed.ack(ws, agt, "w", [t2_first, lone])
    assert ids(feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE)) == [t2_second]
    feed.ack(ws, agt, "w", [t2_second])
    clock.advance(LEASE)  # t1_first's lease expires: it is redelivered, still ahead of t1_second
    assert ids(feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE)) == [t1_first]
    feed.ack(ws, agt, "w", [t1_first])
    assert ids(feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE)) == [t1_second]


def test_an_agent_scope_never_sees_another_agents_events(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    other = insert_agent(db, clock, ws)
    append(db, clock, ws, other, count=3)
    append(db, clock, ws, None)  # a workspace-level event belongs to no agent
    mine = append(db, clock, ws, agt, count=2)

    assert ids(feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE)) == mine
    clock.advance(LEASE)
    assert ids(feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE)) == mine


def test_the_workspace_scope_sees_every_agent_but_not_another_workspace(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    other_ws = insert_workspace(db, clock)
    stranger = insert_agent(db, clock, other_ws)
    colleague = insert_agent(db, clock, ws)
    expected = append(db, clock, ws, agt)
    append(db, clock, other_ws, stranger, count=2)
    expected += append(db, clock, ws, colleague)
    expected += append(db, clock, ws, None)

    assert ids(feed.lease(ws, "*", "owner", limit=10, lease_seconds=LEASE)) == expected
    assert len(feed.lease(other_ws, "*", "owner", limit=10, lease_seconds=LEASE)) == 2
    assert feed.ack(ws, "*", "owner", expected).acked == tuple(expected)


def test_two_consumers_each_get_every_event_independently(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    appended = append(db, clock, ws, agt, count=3)

    a = feed.lease(ws, agt, "indexer", limit=10, lease_seconds=LEASE)
    feed.ack(ws, agt, "indexer", ids(a))
    b = feed.lease(ws, agt, "responder", limit=10, lease_seconds=LEASE)

    assert ids(a) == ids(b) == appended
    assert feed.lease(ws, agt, "indexer", limit=10, lease_seconds=LEASE) == []
    # the same name under another scope is another consumer
    owner = feed.lease(ws, "*", "indexer", limit=10, lease_seconds=LEASE)
    assert ids(owner) == appended


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": True}, "limit"),
        ({"lease_seconds": 0.5}, "lease_seconds"),
        ({"lease_seconds": 3601}, "lease_seconds"),
        ({"lease_seconds": float("nan")}, "lease_seconds"),
        ({"consumer": ""}, "consumer"),
        ({"consumer": "has space"}, "consumer"),
        ({"consumer": "x" * 201}, "consumer"),
        ({"consumer": "trailing-newline\n"}, "consumer"),
        ({"scope": ""}, "scope"),
    ],
)
def test_bad_lease_arguments_fail_validation_naming_the_field(
    feed: FeedService, changes: dict[str, Any], field: str
) -> None:
    args: dict[str, Any] = {
        "workspace_id": "ws_x",
        "scope": "agt_x",
        "consumer": "ok.name_1-2",
        "limit": 10,
        "lease_seconds": LEASE,
    } | changes

    with pytest.raises(ValidationFailed) as caught:
        feed.lease(**args)

    assert caught.value.code == "validation_failed"
    assert [e["field"] for e in caught.value.extra["errors"]] == [field]


def test_bad_settle_and_page_arguments_fail_validation(feed: FeedService) -> None:
    calls = [
        lambda: feed.nack("ws", "agt", "w", ["evt"], delay_seconds=-1),
        lambda: feed.nack("ws", "agt", "w", ["evt"], delay_seconds=3601),
        lambda: feed.extend("ws", "agt", "w", ["evt"], lease_seconds=0),
        lambda: feed.ack("ws", "agt", "w", [f"evt_{i}" for i in range(1001)]),
        lambda: feed.ack("ws", "agt", "w", "evt_as_a_string"),
        lambda: feed.ack("ws", "agt", "bad name", ["evt"]),
        lambda: feed.dead_letters("ws", limit=0),
        lambda: feed.dead_letters("ws", cursor="not-a-cursor"),
        lambda: asyncio.run(
            feed.pull("ws", "agt", "w", limit=1, lease_seconds=LEASE, wait_seconds=31)
        ),
    ]
    for call in calls:
        with pytest.raises(ValidationFailed) as caught:
            call()
        assert caught.value.code == "validation_failed"


# -- long-poll -------------------------------------------------------------------------


class ObservedFeed(FeedService):
    """Signals when a lease came back empty, so a test can write *after* the puller
    has started waiting instead of sleeping and hoping."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.empty_lease = threading.Event()

    def lease(self, *args: Any, **kwargs: Any) -> list[LeasedEvent]:
        batch = super().lease(*args, **kwargs)
        if not batch:
            self.empty_lease.set()
        return batch


def _pull_while_another_thread_appends(
    feed: ObservedFeed, db: Database, clock: FakeClock, ws: str, agt: str, *, notify: bool
) -> tuple[list[LeasedEvent], list[str], float]:
    appended: list[str] = []

    def writer() -> None:
        assert feed.empty_lease.wait(timeout=10)
        appended.extend(append(db, clock, ws, agt))
        if notify:
            feed._notifier.notify(ws)

    async def scenario() -> tuple[list[LeasedEvent], float]:
        thread = threading.Thread(target=writer)
        started = time.monotonic()
        thread.start()
        try:
            batch = await feed.pull(
                ws, agt, "poller", limit=10, lease_seconds=LEASE, wait_seconds=10
            )
        finally:
            await asyncio.to_thread(thread.join, 10)
        return batch, time.monotonic() - started

    batch, elapsed = asyncio.run(scenario())
    return batch, appended, elapsed


def test_a_long_poll_returns_as_soon_as_notify_is_called_after_an_append(
    db: Database, settings: Settings, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    # The poll interval is longer than the wait, so only notify() can wake the poller.
    slow_poll = with_settings(settings, feed_poll_interval=20.0)
    feed = ObservedFeed(db, slow_poll, clock, FeedNotifier())
    ws, agt = ws_agent

    batch, appended, elapsed = _pull_while_another_thread_appends(
        feed, db, clock, ws, agt, notify=True
    )

    assert ids(batch) == appended
    assert elapsed < 3.0  # the wait was 10 s


def test_a_long_poll_catches_events_from_other_processes_at_the_poll_interval(
    db: Database, settings: Settings, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    fast_poll = with_settings(settings, feed_poll_interval=0.05)
    feed = ObservedFeed(db, fast_poll, clock, FeedNotifier())
    ws, agt = ws_agent

    batch, appended, elapsed = _pull_while_another_thread_appends(
        feed, db, clock, ws, agt, notify=False
    )

    assert ids(batch) == appended
    assert elapsed < 3.0


def test_a_long_poll_returns_empty_after_the_wait_when_nothing_arrives(
    db: Database, settings: Settings, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    notifier = FeedNotifier()
    feed = FeedService(db, with_settings(settings, feed_poll_interval=0.1), clock, notifier)
    ws, agt = ws_agent

    async def scenario() -> tuple[list[LeasedEvent], float]:
        started = time.monotonic()
        batch = await feed.pull(ws, agt, "poller", limit=10, lease_seconds=LEASE, wait_seconds=0.3)
        return batch, time.monotonic() - started

    notifier.notify("ws_of_someone_else")  # unrelated wake-ups do not end the wait
    batch, elapsed = asyncio.run(scenario())

    assert batch == []
    assert 0.3 <= elapsed < 2.0


def test_closing_the_notifier_ends_open_long_polls_at_once(
    db: Database, settings: Settings, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    """Shutdown must not wait out every open long-poll."""
    slow_poll = with_settings(settings, feed_poll_interval=20.0)
    feed = ObservedFeed(db, slow_poll, clock, FeedNotifier())
    ws, agt = ws_agent

    async def scenario() -> tuple[list[LeasedEvent], float]:
        started = time.monotonic()
        poll = asyncio.create_task(
            feed.pull(ws, agt, "poller", limit=10, lease_seconds=LEASE, wait_seconds=20)
        )
        assert await asyncio.to_thread(feed.empty_lease.wait, 10)
        feed._notifier.close()
        return await poll, time.monotonic() - started

    batch, elapsed = asyncio.run(scenario())

    assert batch == []
    assert elapsed < 5.0  # the wait was 20 s


# -- concurrency -----------------------------------------------------------------------


def test_concurrent_pullers_on_one_consumer_get_every_event_exactly_once(
    feed: FeedService, db: Database, clock: FakeClock, ws_agent: tuple[str, str]
) -> None:
    ws, agt = ws_agent
    total, pullers, batch_size = 500, 6, 10
    predecessor: dict[str, str] = {}
    last_of_thread: dict[str, str] = {}
    with db.write() as conn:
        for n in range(total):
            # 250 events in 5 threads, two of a thread adjacent so one batch could hold both
            thread = f"thr_{(n // 4) % 5}" if n % 2 == 0 else None
            event_id = append_event(
                conn,
                workspace_id=ws,
                agent_id=agt,
                type="message.received",
                payload={"n": n},
                created_at=clock.now(),
                thread_id=thread,
            )
            if thread is not None:
                if thread in last_of_thread:
                    predecessor[event_id] = last_of_thread[thread]
                last_of_thread[thread] = event_id

    lock = threading.Lock()
    delivered: Counter[str] = Counter()
    held: set[str] = set()
    ack_started: set[str] = set()
    acked: set[str] = set()
    problems: list[str] = []
    deadline = time.monotonic() + 15

    def puller() -> None:
        while time.monotonic() < deadline:
            with lock:
                if len(acked) == total or problems:
                    return
            batch = feed.lease(ws, agt, "workers", limit=batch_size, lease_seconds=600)
            with lock:
                for event in batch:
                    delivered[event.event_id] += 1
                    if event.event_id in held:
                        problems.append(f"{event.event_id} held by two pullers")
                    before = predecessor.get(event.event_id)
                    if before is not None and before not in ack_started:
                        problems.append(f"{event.event_id} delivered before {before} was acked")
                    held.add(event.event_id)
                ack_started.update(ids(batch))
            if batch:
                result = feed.ack(ws, agt, "workers", ids(batch))
                with lock:
                    if set(result.acked) != set(ids(batch)):
                        problems.append(f"ack refused: {result}")
                    held.difference_update(ids(batch))
                    acked.update(ids(batch))

    with ThreadPoolExecutor(pullers) as pool:
        for future in [pool.submit(puller) for _ in range(pullers)]:
            future.result()

    assert problems == []
    assert len(acked) == total
    assert set(delivered.values()) == {1}
    with db.read() as conn:
        counts = conn.execute(select(deliveries.c.delivery_count, deliveries.c.state)).all()
    assert set(counts) == {(1, "acked")}


# -- PostgreSQL: commits out of seq order ----------------------------------------------


@pytest.fixture
def pg_feed(
    pg_url: str, tmp_path: Path, clock: FakeClock
) -> Iterator[tuple[FeedService, Database]]:
    database = Database(pg_url)
    settings = load_settings(data_dir=tmp_path, database_url=pg_url)
    yield FeedService(database, settings, clock, FeedNotifier(), gap_settle_seconds=30), database
    database.dispose()


def _cursor(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(select(consumers.c.cursor_seq)).scalar_one())


@pytest.mark.postgres
def test_an_event_that_commits_after_a_later_one_is_not_skipped(
    pg_feed: tuple[FeedService, Database], clock: FakeClock
) -> None:
    feed, db = pg_feed
    ws = insert_workspace(db, clock)
    agt = insert_agent(db, clock, ws)
    with db.engine.connect() as slow:
        transaction = slow.begin()
        early = append_event(  # takes the lower seq, but does not commit yet
            slow,
            workspace_id=ws,
            agent_id=agt,
            type="message.received",
            payload={},
            created_at=clock.now(),
        )
        (late,) = append(db, clock, ws, agt)

        assert ids(feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE)) == [late]
        assert _cursor(db) == 0  # held below the in-flight seq
        transaction.commit()

    assert ids(feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE)) == [early]
    assert _cursor(db) >= 2


@pytest.mark.postgres
def test_a_rolled_back_sequence_gap_stops_holding_the_cursor_once_settled(
    pg_feed: tuple[FeedService, Database], clock: FakeClock
) -> None:
    feed, db = pg_feed
    ws = insert_workspace(db, clock)
    agt = insert_agent(db, clock, ws)
    with db.engine.connect() as aborted:
        transaction = aborted.begin()
        append_event(
            aborted,
            workspace_id=ws,
            agent_id=agt,
            type="message.received",
            payload={},
            created_at=clock.now(),
        )
        transaction.rollback()
    (event_id,) = append(db, clock, ws, agt)

    assert ids(feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE)) == [event_id]
    assert _cursor(db) == 0
    feed.ack(ws, agt, "w", [event_id])
    clock.advance(31)
    assert feed.lease(ws, agt, "w", limit=10, lease_seconds=LEASE) == []
    assert _cursor(db) == 2
