"""An agent's sending reputation as a value, and the decision to narrow its tier.

The counts are per recipient over a window (30 days): a message to five people that
one of them reports as spam is one complaint in five deliveries, not one in one.

* ``sent``: recipients a transport accepted (whatever happened afterwards);
* ``delivered``: recipients whose server reported delivery (provider events). SMTP
  relays rarely report deliveries, so the complaint rate's denominator is
  ``reached = max(delivered, sent - bounced)``: a sent message that did not bounce is
  presumed delivered;
* ``bounced``: hard bounces only (5.x.x, or a provider bounce); soft failures say
  nothing about the sender;
* ``complaints`` (spam reports) and ``unsubscribes``.

**Score** (informational, in [0, 1]): the posterior mean of a Beta distribution over
"a message ends well" (reached its recipient and was neither reported nor
unsubscribed from), starting from a Beta(9, 1) prior: a new agent scores 0.9, worth
10 messages of evidence, so it is neither punished nor vouched for. A complaint
counts as :data:`COMPLAINT_WEIGHT` bad outcomes, because mailbox providers act on
complaint rates about ten times lower than on bounce rates (Gmail's sender
guidelines: keep spam reports under 0.1%, never reach 0.3%; bounces are tolerated to a
few percent)::

    bad   = bounced + unsubscribes + W * complaints
    total = sent + (W - 1) * complaints
    score = (alpha + total - bad) / (alpha + beta + total)

**Tier decision** (:meth:`TrustFigure.should_lower_tier`): the plain complaint rate
``complaints / reached`` above the threshold, once at least ``min_sample`` recipients
were sent to. No prior smooths this rate: the sample floor is what keeps one early
complaint from narrowing a new agent, and a floor is easier to reason about than a
prior's strength.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["COMPLAINT_WEIGHT", "PRIOR_ALPHA", "PRIOR_BETA", "TierVerdict", "TrustFigure"]

PRIOR_ALPHA: Final = 9.0
PRIOR_BETA: Final = 1.0
COMPLAINT_WEIGHT: Final = 10
WINDOW_DAYS: Final = 30.0


@dataclass(frozen=True, slots=True)
class TierVerdict:
    """Whether to lower an agent's tier one step, and why (for the audit log)."""

    lower: bool
    reason: str


@dataclass(frozen=True, slots=True)
class TrustFigure:
    """Per-recipient outcome counts over ``window_days`` and what follows from them."""

    sent: int
    delivered: int
    bounced: int
    complaints: int
    unsubscribes: int
    window_days: float = WINDOW_DAYS

    @property
    def reached(self) -> int:
        """Recipients presumed to have the message: reported, else sent and not bounced."""
        return max(self.delivered, self.sent - self.bounced, 0)

    @property
    def bounce_rate(self) -> float:
        """Hard bounces per recipient sent to (0.0 before anything was sent)."""
        return self.bounced / self.sent if self.sent else 0.0

    @property
    def complaint_rate(self) -> float:
        """Spam reports per recipient reached (0.0 before anything was reached)."""
        return self.complaints / self.reached if self.reached else 0.0

    @property
    def score(self) -> float:
        """Beta posterior mean of a good outcome; see the module doc for the formula."""
        sent = max(self.sent, self.bounced + self.complaints + self.unsubscribes)
        bad = self.bounced + self.unsubscribes + COMPLAINT_WEIGHT * self.complaints
        total = sent + (COMPLAINT_WEIGHT - 1) * self.complaints
        good = max(total - bad, 0)
        return (PRIOR_ALPHA + good) / (PRIOR_ALPHA + PRIOR_BETA + total)

    def should_lower_tier(self, threshold: float, min_sample: int) -> TierVerdict:
        """Lower the tier when the complaint rate is over ``threshold`` and at least
        ``min_sample`` recipients were sent to in the window."""
        rate = f"{self.complaint_rate:.2%} ({self.complaints} of {self.reached} reached)"
        if self.sent < min_sample:
            return TierVerdict(
                False,
                f"{self.sent} sent in {self.window_days:g} days, fewer than the "
                f"{min_sample} needed to judge a complaint rate of {rate}",
            )
        if self.complaint_rate > threshold:
            return TierVerdict(
                True,
                f"complaint rate {rate} over the threshold {threshold:.2%} "
                f"in {self.window_days:g} days",
            )
        return TierVerdict(False, f"complaint rate {rate} within the threshold {threshold:.2%}")

    def as_dict(self) -> dict[str, float | int]:
        """The counts and figures, as the API and the audit log show them."""
        return {
            "window_days": self.window_days,
            "sent": self.sent,
            "delivered": self.delivered,
            "reached": self.reached,
            "bounced": self.bounced,
            "complaints": self.complaints,
            "unsubscribes": self.unsubscribes,
            "bounce_rate": round(self.bounce_rate, 6),
            "complaint_rate": round(self.complaint_rate, 6),
            "score": round(self.score, 6),
        }
