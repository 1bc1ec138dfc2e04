"""Threading decisions (pure)."""

from __future__ import annotations

import pytest

from mailgate.domain.threads import (
    ThreadCandidate,
    decide_thread,
    normalize_subject,
    ref_key,
    reference_keys,
)


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Re: Hello", "hello"),
        ("RE: re: Fwd: Hello  world", "hello world"),
        ("AW: SV: Antw: Report", "report"),
        ("Re[2]: Invoice", "invoice"),
        ("[list] Re: [other] Topic", "topic"),
        ("Fw : spaced colon", "spaced colon"),
        ("Renewal notice", "renewal notice"),
        ("", ""),
    ],
)
def test_reply_prefixes_and_list_tags_are_stripped_from_subjects(
    subject: str, expected: str
) -> None:
    assert normalize_subject(subject) == expected


def test_reference_keys_put_own_id_then_in_reply_to_then_newest_reference_first() -> None:
    keys = reference_keys("me@x", "parent@x", ["root@x", "parent@x"])
    assert [reason for _, reason in keys] == [
        "own-message-id",
        "in-reply-to",
        "references",
        "references",
    ]
    assert keys[2][0] == ref_key("parent@x")
    assert ref_key("<a@b>") == ref_key("a@b")


def test_a_known_reference_wins_over_a_subject_match() -> None:
    keys = reference_keys("me@x", "parent@x", [])
    decision = decide_thread(
        keys,
        {ref_key("parent@x"): "thr_ref"},
        "hello",
        {"bob@example.com"},
        [ThreadCandidate("thr_subject", frozenset({"bob@example.com"}))],
    )
    assert (decision.thread_id, decision.reason) == ("thr_ref", "in-reply-to")


def test_subject_fallback_needs_a_shared_participant() -> None:
    candidates = [ThreadCandidate("thr_1", frozenset({"carol@example.com"}))]
    strangers = decide_thread([], {}, "hello", {"bob@example.com"}, candidates)
    friends = decide_thread([], {}, "hello", {"carol@example.com"}, candidates)
    assert strangers.thread_id is None and strangers.reason == "new"
    assert friends.thread_id == "thr_1" and friends.reason == "subject"


def test_an_empty_subject_never_threads_by_subject() -> None:
    candidates = [ThreadCandidate("thr_1", frozenset({"bob@example.com"}))]
    assert decide_thread([], {}, "", {"bob@example.com"}, candidates).thread_id is None
