"""Trust figures: rates, the Beta-prior score and the tier decision, as pure values."""

from __future__ import annotations

import pytest

from mailgate.domain.trust import TrustFigure


def figure(
    sent: int = 0, delivered: int = 0, bounced: int = 0, complaints: int = 0, unsubscribes: int = 0
) -> TrustFigure:
    return TrustFigure(sent, delivered, bounced, complaints, unsubscribes)


def test_a_new_agent_starts_at_the_neutral_prior_and_is_not_judged() -> None:
    new = figure()

    assert new.score == pytest.approx(0.9)
    assert (new.bounce_rate, new.complaint_rate) == (0.0, 0.0)
    assert not new.should_lower_tier(0.01, 20).lower


def test_clean_sending_raises_the_score_towards_one() -> None:
    assert figure(sent=100).score == pytest.approx(109 / 110)
    assert figure(sent=1000).score > figure(sent=100).score > figure().score


def test_a_complaint_weighs_as_ten_bad_outcomes() -> None:
    bounces = figure(sent=100, bounced=2)
    complaints = figure(sent=100, complaints=2)

    assert bounces.score == pytest.approx((9 + 98) / 110)
    assert complaints.score == pytest.approx((9 + 98) / (10 + 118))
    assert complaints.score < bounces.score


def test_the_score_stays_in_bounds_when_everything_goes_wrong() -> None:
    worst = figure(sent=5, bounced=5, complaints=5, unsubscribes=5)

    assert 0.0 <= worst.score <= 1.0


def test_without_delivery_reports_sent_and_not_bounced_counts_as_reached() -> None:
    relayed = figure(sent=100, bounced=10, complaints=3)
    reported = figure(sent=100, delivered=95, bounced=5, complaints=3)

    assert relayed.reached == 90
    assert relayed.complaint_rate == pytest.approx(3 / 90)
    assert relayed.bounce_rate == pytest.approx(0.1)
    assert reported.reached == 95


def test_too_small_a_sample_is_never_acted_on_however_bad() -> None:
    verdict = figure(sent=19, complaints=5).should_lower_tier(0.01, 20)

    assert not verdict.lower
    assert "fewer than the 20 needed" in verdict.reason


def test_a_complaint_rate_over_the_threshold_lowers_the_tier_with_the_figures() -> None:
    verdict = figure(sent=100, complaints=2).should_lower_tier(0.01, 20)

    assert verdict.lower
    assert "2.00% (2 of 100 reached)" in verdict.reason
    assert "over the threshold 1.00%" in verdict.reason


def test_a_rate_at_the_threshold_is_within_it() -> None:
    verdict = figure(sent=100, complaints=1).should_lower_tier(0.01, 20)

    assert not verdict.lower
    assert "within" in verdict.reason


def test_the_figures_read_as_a_dict_for_the_audit_log() -> None:
    shown = figure(sent=10, delivered=8, bounced=1, complaints=1).as_dict()

    assert shown["reached"] == 9
    assert shown["window_days"] == 30.0
    assert set(shown) >= {"sent", "bounce_rate", "complaint_rate", "score"}
