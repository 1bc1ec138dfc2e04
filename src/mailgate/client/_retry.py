"""When a request is tried again, and how long to wait first (pure: no I/O).

A request is retried only when doing it twice cannot do its work twice: reads, the
feed's ack/nack/extend (idempotent by design) and sends that carry an
``Idempotency-Key``. Everything else (approve, reject, trash, restore, release) is
tried once: a lost answer there is the caller's to resolve, not ours to guess.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime

from mailgate.client._errors import MailgateAPIError

__all__ = ["RetryPolicy", "parse_retry_after"]

RETRY_STATUSES = frozenset({429, 503})
"""Statuses that say "not now" about a request the gateway did not carry out."""
RETRY_CODES = frozenset({"idempotency_in_flight"})
"""409 codes that end once the first request with the key finishes."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded; ``Retry-After`` wins when given.

    Attributes:
        max_retries: retries after the first attempt (0 turns retrying off).
        backoff_base: the first wait's upper bound, in seconds; doubles per retry.
        backoff_max: the largest wait backoff picks.
        max_retry_after: the longest ``Retry-After`` the client waits out; a longer
            one raises at once, so a call never hangs for an hour.
        jitter: a uniform draw in ``[0, 1)`` (tests fix it).
    """

    max_retries: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    max_retry_after: float = 60.0
    jitter: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based): uniform in
        ``[0, min(backoff_max, backoff_base * 2**retry)]`` (AWS's "full jitter", which
        spreads clients that failed together)."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0**retry)
        return ceiling * self.jitter()

    def after_error(self, retry: int, *, retry_safe: bool) -> float | None:
        """The wait before trying again after a network error, or None to give up."""
        if not retry_safe or retry >= self.max_retries:
            return None
        return self.backoff(retry)

    def after_status(
        self, retry: int, error: MailgateAPIError, *, retry_safe: bool
    ) -> float | None:
        """The wait before trying again after an error answer, or None to give up."""
        if not retry_safe or retry >= self.max_retries:
            return None
        if error.status not in RETRY_STATUSES and not (
            error.status == 409 and error.code in RETRY_CODES
        ):
            return None
        if error.retry_after is not None:
            return error.retry_after if error.retry_after <= self.max_retry_after else None
        return self.backoff(retry)


def parse_retry_after(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """``Retry-After`` in seconds (RFC 9110 §10.2.3: delay-seconds or an HTTP-date),
    None when absent or unreadable. A date in the past means "now" (0)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": HTTP dates are always GMT (RFC 9110 §5.6.7)
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now())
