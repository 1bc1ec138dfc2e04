"""Rules and known contacts as owners manage them (CRUD, reorder, dry run)."""

from __future__ import annotations

from mailgate.clock import Clock
from mailgate.domain.mime import ParseLimits
from mailgate.services.policy import PolicyCache
from mailgate.store.blobs import TieredBlobStore
from mailgate.store.db import Database


class RulesService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        policies: PolicyCache,
        blobs: TieredBlobStore,
        limits: ParseLimits,
    ) -> None:
        self.db = db
        self.clock = clock
        self.policies = policies
        self.blobs = blobs
        self.limits = limits
