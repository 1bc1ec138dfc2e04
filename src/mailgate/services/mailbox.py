"""Moving messages between folders: review release/trash, trash/restore, retention."""

from __future__ import annotations

from datetime import timedelta

from mailgate.clock import Clock
from mailgate.store.blobs import TieredBlobStore
from mailgate.store.committer import Committer
from mailgate.store.db import Database


class MailboxService:
    def __init__(
        self,
        db: Database,
        committer: Committer,
        blobs: TieredBlobStore,
        clock: Clock,
        *,
        trash_retention: timedelta,
    ) -> None:
        self.db = db
        self.committer = committer
        self.blobs = blobs
        self.clock = clock
        self.trash_retention = trash_retention
