"""Conversation threading, as pure decisions.

A message joins a thread by reference first (its own Message-ID, In-Reply-To, then
References newest-first, looked up in every id the agent has seen, including ids only
ever *referenced*, so siblings whose parent never reached us still meet). Without a
reference match it falls back to the normalised subject plus an overlapping
participant within a time window, which is how replies from clients that drop
References still thread. Otherwise it starts a new thread.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# "Re:", "RE :", "Fwd:", "Fw:", "AW:", "SV:", "Antw:", "VS:", "Re[2]:", "[list-tag]"
_PREFIX = re.compile(
    r"^\s*(?:(?:re|fwd?|aw|sv|vs|antw|wg|tr|rif|odp)\s*(?:\[\d+\]|\(\d+\))?\s*:|\[[^\]]{1,40}\])\s*",
    re.IGNORECASE,
)
_SPACE = re.compile(r"\s+")


def normalize_subject(subject: str) -> str:
    """Strip reply/forward prefixes and list tags, collapse whitespace, case-fold."""
    previous = None
    text = subject
    while previous != text:
        previous = text
        text = _PREFIX.sub("", text)
    return _SPACE.sub(" ", text).strip().casefold()


def subject_key(subject: str) -> str:
    """Fixed-width index key for a normalised subject (subjects can be megabytes)."""
    return hashlib.sha256(normalize_subject(subject).encode()).hexdigest()


def ref_key(message_id: str) -> str:
    """Fixed-width index key for a Message-ID (ids may be up to 998 octets)."""
    return hashlib.sha256(message_id.strip().strip("<>").encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ThreadDecision:
    """Where a message goes: an existing thread (``thread_id``) or a new one (None)."""

    thread_id: str | None
    reason: str  # "own-message-id" | "in-reply-to" | "references" | "subject" | "new"


@dataclass(frozen=True, slots=True)
class ThreadCandidate:
    thread_id: str
    participants: frozenset[str]


def reference_keys(
    message_id: str | None, in_reply_to: str | None, references: Sequence[str]
) -> list[tuple[str, str]]:
    """Keys to look up, in priority order, each with the reason it would give."""
    keys: list[tuple[str, str]] = []
    if message_id:
        keys.append((ref_key(message_id), "own-message-id"))
    if in_reply_to:
        keys.append((ref_key(in_reply_to), "in-reply-to"))
    keys.extend((ref_key(ref), "references") for ref in reversed(references))
    return keys


def decide_thread(
    keys: Sequence[tuple[str, str]],
    known: Mapping[str, str],
    subject_normalized: str,
    participants: Iterable[str],
    candidates: Sequence[ThreadCandidate],
) -> ThreadDecision:
    """Pick the thread for a message.

    Args:
        keys: from :func:`reference_keys`.
        known: ref key -> thread id for the keys the agent has already seen.
        subject_normalized: :func:`normalize_subject` of the message's subject.
        participants: the message's addresses other than the agent's own, lower-cased.
        candidates: recent threads with the same subject key, newest first.
    """
    for key, reason in keys:
        thread_id = known.get(key)
        if thread_id is not None:
            return ThreadDecision(thread_id, reason)
    if subject_normalized:
        people = set(participants)
        for candidate in candidates:
            if people & candidate.participants:
                return ThreadDecision(candidate.thread_id, "subject")
    return ThreadDecision(None, "new")
