"""Where a stored message lives, and the moves between folders, as pure decisions.

A message's folder says who it is for: ``inbox`` (delivered to its agent), ``review``
(held by a rule for a human), ``quarantine`` (held by a rule, kept out of every agent
feed), ``trash`` (soft-deleted, purged after the retention period), and later
``outbox``/``sent``. Separately, a message is *visible* once it has reached its agent
(``messages.visible_at``); agent keys see visible messages only, and that never goes
back: trash keeps a visible message visible, so its agent can restore it.

The moves::

    any folder but trash ──trash──▶ trash          (previous folder remembered)
    trash ──restore──▶ the previous folder          (inbox when unknown)
    review | quarantine ──release──▶ inbox          (the agent sees it)
    review | quarantine ──trash (held only)──▶ trash

Whenever a move lands a never-visible message in the inbox (a release, or restoring
mail a rule trashed on arrival), the agent sees it for the first time: the service
sets ``visible_at`` and emits ``message.received``, the one event that hands content
to an agent. Every function returns a :class:`Transition` (allowed or not, with a
reason a human can read); the service applies it and records it, nothing here does
I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

INBOX: Final = "inbox"
REVIEW: Final = "review"
QUARANTINE: Final = "quarantine"
TRASH: Final = "trash"
OUTBOX: Final = "outbox"
SENT: Final = "sent"

FOLDERS: Final = (INBOX, REVIEW, QUARANTINE, TRASH, OUTBOX, SENT)
HELD: Final = frozenset({REVIEW, QUARANTINE})
"""Folders of mail a rule held for a human: never visible to the agent until released."""

Operation = Literal["trash", "restore", "release"]


@dataclass(frozen=True, slots=True)
class MessageState:
    """What a decision depends on: all of it, so a writer that checks these three
    fields are unchanged (a conditional UPDATE) knows its decision still holds."""

    folder: str
    previous_folder: str | None
    visible: bool
    """The message has reached its agent (``visible_at`` is set)."""


@dataclass(frozen=True, slots=True)
class Transition:
    """A move between folders, or a refusal (``allowed`` False, folders unchanged)."""

    operation: Operation
    allowed: bool
    reason: str
    from_folder: str
    to_folder: str
    previous_folder: str | None
    """What ``messages.previous_folder`` holds after the move (where restore goes)."""
    reaches_agent: bool = False
    """The agent sees the message for the first time: set ``visible_at``, emit
    ``message.received``."""
    visible_after: bool = False
    """The agent can see the message after the move; events about it then carry its
    agent id, otherwise they are for owners only."""


def trash(state: MessageState, *, held_only: bool = False) -> Transition:
    """Soft-delete: from any folder but the trash. ``held_only`` is the review
    inbox's trash, which applies only to held mail (an owner rejecting it)."""
    if state.folder == TRASH:
        return _refuse("trash", state, "the message is already in the trash")
    if held_only and state.folder not in HELD:
        return _refuse(
            "trash", state, f"only held mail can be trashed from review, not {state.folder}"
        )
    return Transition(
        operation="trash",
        allowed=True,
        reason=f"moved from {state.folder} to the trash",
        from_folder=state.folder,
        to_folder=TRASH,
        previous_folder=state.folder,
        visible_after=state.visible,
    )


def restore(state: MessageState) -> Transition:
    """Undo a trash: back to the folder it came from (the inbox when that is unknown,
    as for mail trashed before folders were remembered)."""
    if state.folder != TRASH:
        return _refuse("restore", state, f"only trashed mail can be restored, not {state.folder}")
    target = state.previous_folder
    if target not in FOLDERS or target == TRASH:
        target = INBOX
    first_time = target == INBOX and not state.visible
    return Transition(
        operation="restore",
        allowed=True,
        reason=f"restored from the trash to {target}",
        from_folder=TRASH,
        to_folder=target,
        previous_folder=None,
        reaches_agent=first_time,
        visible_after=state.visible or first_time,
    )


def release(state: MessageState) -> Transition:
    """Deliver held mail to its agent: from review or quarantine to the inbox."""
    if state.folder not in HELD:
        return _refuse(
            "release",
            state,
            f"only held mail (review, quarantine) can be released, not {state.folder}",
        )
    return Transition(
        operation="release",
        allowed=True,
        reason=f"released from {state.folder} to the inbox",
        from_folder=state.folder,
        to_folder=INBOX,
        previous_folder=state.folder,
        reaches_agent=not state.visible,
        visible_after=True,
    )


def _refuse(operation: Operation, state: MessageState, reason: str) -> Transition:
    return Transition(
        operation=operation,
        allowed=False,
        reason=reason,
        from_folder=state.folder,
        to_folder=state.folder,
        previous_folder=state.previous_folder,
        visible_after=state.visible,
    )
