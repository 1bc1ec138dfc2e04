"""Outbound tiers: how far an agent may send on its own, rolled out progressively.

From narrowest to widest: ``reply_only`` (replies within threads that already have
inbound mail), ``known_contacts`` (also new mail to the agent's known contacts),
``allowlisted_domains`` (also to allow-listed addresses and domains), ``open`` (anyone
not suppressed or denied). New agents start at ``settings.default_tier``; owners raise
or lower it; a complaint rate over the threshold lowers it one step.
"""

from __future__ import annotations

from typing import Final, Literal, TypeAlias

Tier: TypeAlias = Literal["reply_only", "known_contacts", "allowlisted_domains", "open"]
TIERS: Final[tuple[Tier, ...]] = ("reply_only", "known_contacts", "allowlisted_domains", "open")


def lower(tier: str) -> Tier:
    """The next narrower tier (``reply_only`` stays)."""
    index = TIERS.index(tier) if tier in TIERS else 0
    return TIERS[max(index - 1, 0)]


def rank(tier: str) -> int:
    """Position in :data:`TIERS` (unknown tiers rank as the narrowest)."""
    return TIERS.index(tier) if tier in TIERS else 0
