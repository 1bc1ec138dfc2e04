"""Folder moves as pure decisions: every folder against every move."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mailgate.domain import folders
from mailgate.domain.folders import MessageState, Transition


def state(folder: str, previous: str | None = None, *, visible: bool = False) -> MessageState:
    return MessageState(folder, previous, visible)


# -- trash ------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["inbox", "review", "quarantine", "outbox", "sent"])
def test_anything_but_trash_can_be_trashed_and_remembers_where_it_was(folder: str) -> None:
    move = folders.trash(state(folder, visible=folder == "inbox"))
    assert move.allowed
    assert (move.from_folder, move.to_folder, move.previous_folder) == (folder, "trash", folder)
    assert not move.reaches_agent


def test_trashing_mail_already_in_the_trash_is_refused_with_a_reason() -> None:
    move = folders.trash(state("trash", "inbox", visible=True))
    assert not move.allowed
    assert move.to_folder == move.from_folder == "trash"
    assert "already in the trash" in move.reason


def test_trash_keeps_a_visible_message_visible_and_held_mail_hidden() -> None:
    assert folders.trash(state("inbox", visible=True)).visible_after
    assert not folders.trash(state("review")).visible_after


@pytest.mark.parametrize(
    ("folder", "allowed"),
    [("review", True), ("quarantine", True), ("inbox", False), ("trash", False)],
)
def test_the_review_inbox_trash_applies_to_held_mail_only(folder: str, allowed: bool) -> None:
    move = folders.trash(state(folder), held_only=True)
    assert move.allowed is allowed


# -- restore ----------------------------------------------------------------------------


@pytest.mark.parametrize("previous", ["inbox", "review", "quarantine", "sent"])
def test_restore_puts_trashed_mail_back_where_it_was(previous: str) -> None:
    move = folders.restore(state("trash", previous, visible=previous in {"inbox", "sent"}))
    assert move.allowed
    assert (move.from_folder, move.to_folder, move.previous_folder) == ("trash", previous, None)
    assert not move.reaches_agent


@pytest.mark.parametrize("previous", [None, "trash", "spam"])
def test_restore_without_a_known_previous_folder_goes_to_the_inbox(previous: str | None) -> None:
    move = folders.restore(state("trash", previous, visible=True))
    assert move.to_folder == "inbox"


def test_restoring_mail_a_rule_trashed_on_arrival_reaches_the_agent_for_the_first_time() -> None:
    move = folders.restore(state("trash", "inbox", visible=False))
    assert move.to_folder == "inbox"
    assert move.reaches_agent and move.visible_after


def test_restoring_rejected_held_mail_returns_it_to_review_still_hidden() -> None:
    move = folders.restore(state("trash", "review", visible=False))
    assert move.to_folder == "review"
    assert not move.reaches_agent and not move.visible_after


@pytest.mark.parametrize("folder", ["inbox", "review", "quarantine", "outbox", "sent"])
def test_only_trashed_mail_can_be_restored(folder: str) -> None:
    move = folders.restore(state(folder))
    assert not move.allowed
    assert folder in move.reason


# -- release ----------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["review", "quarantine"])
def test_release_delivers_held_mail_to_the_inbox(folder: str) -> None:
    move = folders.release(state(folder))
    assert move.allowed
    assert (move.from_folder, move.to_folder, move.previous_folder) == (folder, "inbox", folder)
    assert move.reaches_agent and move.visible_after


@pytest.mark.parametrize("folder", ["inbox", "trash", "outbox", "sent"])
def test_only_held_mail_can_be_released(folder: str) -> None:
    move = folders.release(state(folder, visible=True))
    assert not move.allowed
    assert move.to_folder == folder


# -- properties -------------------------------------------------------------------------


def trash_held(state: MessageState) -> Transition:
    return folders.trash(state, held_only=True)


MOVES: list[Callable[[MessageState], Transition]] = [
    folders.release,
    folders.restore,
    folders.trash,
    trash_held,
]


@pytest.mark.parametrize("folder", folders.FOLDERS)
@pytest.mark.parametrize("previous", [None, *folders.FOLDERS])
@pytest.mark.parametrize("visible", [False, True])
def test_no_move_ever_hides_a_message_its_agent_has_seen(
    folder: str, previous: str | None, visible: bool
) -> None:
    for decide in MOVES:
        move = decide(state(folder, previous, visible=visible))
        if visible:
            assert move.visible_after and not move.reaches_agent
        if move.reaches_agent:
            assert move.to_folder == "inbox" and move.visible_after
        if not move.allowed:
            assert move.to_folder == folder and move.reason
