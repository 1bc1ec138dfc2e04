"""The ``tier`` guard step: who an agent may write to, and why a reply is different.

A reply in a thread with inbound mail may go to the message's correspondents whatever
the tier; anyone the agent adds to a reply is judged like the recipient of new mail.
"""

from __future__ import annotations

import pytest

from mailgate.domain.guards import ContentFacts, Kind, OutboundFacts, StepOutcome, decide

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.org"


def tier_step(
    tier: str,
    recipients: tuple[str, ...],
    *,
    kind: Kind = "reply",
    thread_has_inbound: bool = True,
    correspondents: frozenset[str] = frozenset({ALICE}),
    known: frozenset[str] = frozenset(),
    allowlisted: frozenset[str] = frozenset(),
) -> StepOutcome:
    facts = OutboundFacts(
        kind=kind,
        has_scope=True,
        tier=tier,
        recipients=recipients,
        content=ContentFacts(size=100, max_size=1000),
        thread_has_inbound=thread_has_inbound,
        correspondents=correspondents,
        known_contacts=known,
        allowlisted=allowlisted,
    )
    [step] = [s for s in decide(facts).steps if s.step == "tier"]
    return step


@pytest.mark.parametrize("tier", ["reply_only", "known_contacts", "allowlisted_domains", "open"])
def test_a_reply_to_the_correspondents_passes_on_every_tier(tier: str) -> None:
    assert tier_step(tier, (ALICE,)).outcome == "pass"


def test_a_reply_only_agent_cannot_add_anyone_to_a_reply() -> None:
    step = tier_step("reply_only", (ALICE, BOB))
    assert (step.outcome, step.code) == ("block", "tier")
    assert BOB in step.reason and ALICE not in step.reason


def test_a_reply_only_agent_cannot_reply_where_nobody_wrote_in() -> None:
    step = tier_step("reply_only", (ALICE,), thread_has_inbound=False)
    assert (step.outcome, step.code) == ("block", "tier")
    assert "without inbound mail" in step.reason


def test_a_known_contacts_agent_may_add_a_known_contact_but_not_a_stranger() -> None:
    known = frozenset({BOB})
    assert tier_step("known_contacts", (ALICE, BOB), known=known).outcome == "pass"
    step = tier_step("known_contacts", (ALICE, BOB, CAROL), known=known)
    assert step.outcome == "block" and CAROL in step.reason and BOB not in step.reason


def test_an_allowlisted_domains_agent_may_add_an_allow_listed_address() -> None:
    step = tier_step("allowlisted_domains", (ALICE, CAROL), allowlisted=frozenset({CAROL}))
    assert step.outcome == "pass"


def test_an_open_agent_may_add_anyone() -> None:
    assert tier_step("open", (ALICE, BOB, CAROL)).outcome == "pass"


def test_new_mail_is_judged_on_every_recipient_even_former_correspondents() -> None:
    step = tier_step("known_contacts", (ALICE,), kind="send", thread_has_inbound=False)
    assert step.outcome == "block" and ALICE in step.reason
