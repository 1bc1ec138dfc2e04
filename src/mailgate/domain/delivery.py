"""Outbound states and the retry decision, as pure logic.

An outbound request moves through these states (one row, ``outbound.state``)::

    pending_approval ──approve──▶ queued ──claim──▶ sending ──250──▶ sent ──event──▶ delivered
         │  └─reject/expire──▶ rejected/expired      ▲   │
         │                                            │   ├─4xx / network──▶ queued (retry later)
    (policy) blocked / quarantined                    │   ├─5xx, out of tries──▶ bounced / failed
                                                      └───┘ lease expired (worker died): claim again

``sent`` means a transport accepted the message; ``delivered``, ``bounced`` and
``complained`` come later from feedback (DSNs, provider events). Retry timing is a
value (:class:`RetryDecision`), computed from the attempt count and the failure, so the
worker only applies it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

PENDING_APPROVAL: Final = "pending_approval"
QUEUED: Final = "queued"
SENDING: Final = "sending"
SENT: Final = "sent"
DELIVERED: Final = "delivered"
BOUNCED: Final = "bounced"
FAILED: Final = "failed"
"""Temporary failures until the attempts ran out (no 5xx was ever seen)."""
BLOCKED: Final = "blocked"
QUARANTINED: Final = "quarantined"
REJECTED: Final = "rejected"
EXPIRED: Final = "expired"

STATES: Final = (
    PENDING_APPROVAL,
    QUEUED,
    SENDING,
    SENT,
    DELIVERED,
    BOUNCED,
    FAILED,
    BLOCKED,
    QUARANTINED,
    REJECTED,
    EXPIRED,
)
FINAL_STATES: Final = frozenset({DELIVERED, BOUNCED, FAILED, BLOCKED, REJECTED, EXPIRED})
"""States nothing moves out of (``sent`` can still become delivered or bounced)."""

Failure = Literal["temporary", "permanent"]


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after a failed attempt: retry at ``retry_at``, or give up as
    ``final_state`` (``bounced`` for a permanent failure, ``failed`` when temporary
    failures used up every attempt)."""

    retry_at: datetime | None
    final_state: str | None
    reason: str

    @property
    def retry(self) -> bool:
        return self.retry_at is not None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS architecture blog's "full jitter":
    the delay is uniform in ``[base/2, min(max, base * 2**(n-1))]``), so that many
    messages deferred by one relay outage do not all come back at the same second."""

    base_seconds: float = 30.0
    max_seconds: float = 3600.0
    max_attempts: int = 8

    def decide(
        self,
        *,
        attempts: int,
        failure: Failure,
        now: datetime,
        rng: random.Random | None = None,
    ) -> RetryDecision:
        """``attempts`` is how many attempts have been made, including the failed one."""
        if failure == "permanent":
            return RetryDecision(None, BOUNCED, "permanent failure (5xx): not retried")
        if attempts >= self.max_attempts:
            return RetryDecision(
                None, FAILED, f"temporary failures on all {self.max_attempts} attempts"
            )
        ceiling = min(self.max_seconds, self.base_seconds * 2 ** (attempts - 1))
        floor = min(ceiling, self.base_seconds / 2)
        delay = (rng or _RNG).uniform(floor, ceiling)
        return RetryDecision(
            now + timedelta(seconds=delay),
            None,
            f"temporary failure: attempt {attempts + 1} of {self.max_attempts} in {delay:.0f}s",
        )


_RNG = random.Random()
