"""The long-poll wake-up signal (no database)."""

from __future__ import annotations

import asyncio
import threading

from mailgate.services.feed import FeedListener, FeedNotifier


def test_notify_from_another_thread_wakes_a_waiting_listener() -> None:
    notifier = FeedNotifier()

    async def scenario() -> bool:
        with notifier.listen("ws_1") as listener:
            listener.clear()
            threading.Thread(target=notifier.notify, args=("ws_1",)).start()
            return await listener.wait(timeout=10)

    assert asyncio.run(scenario()) is True


def test_a_notify_that_lands_before_the_wait_is_not_lost() -> None:
    notifier = FeedNotifier()

    async def scenario() -> bool:
        with notifier.listen("ws_1") as listener:
            listener.clear()
            notifier.notify("ws_1")  # e.g. while the lease was running
            return await listener.wait(timeout=10)

    assert asyncio.run(scenario()) is True


def test_notify_for_another_workspace_does_not_wake_a_listener() -> None:
    notifier = FeedNotifier()

    async def scenario() -> bool:
        with notifier.listen("ws_1") as listener:
            listener.clear()
            notifier.notify("ws_2")
            return await listener.wait(timeout=0.05)

    assert asyncio.run(scenario()) is False


def test_notify_without_a_workspace_wakes_every_listener() -> None:
    notifier = FeedNotifier()

    async def scenario() -> list[bool]:
        with notifier.listen("ws_1") as first, notifier.listen("ws_2") as second:
            first.clear()
            second.clear()
            notifier.notify()
            return [await first.wait(timeout=10), await second.wait(timeout=10)]

    assert asyncio.run(scenario()) == [True, True]


def test_a_listener_is_forgotten_when_its_block_ends_and_a_closed_loop_is_ignored() -> None:
    notifier = FeedNotifier()
    kept: list[FeedListener] = []

    async def scenario() -> None:
        with notifier.listen("ws_1") as listener:
            kept.append(listener)

    asyncio.run(scenario())
    notifier.notify("ws_1")  # nobody registered: a no-op
    kept[0]._wake()  # its loop is closed: swallowed, not raised

    assert notifier._listeners == set()
