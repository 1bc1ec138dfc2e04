"""Idempotency keys (IETF httpapi ``Idempotency-Key`` draft, Stripe semantics).

A request with a key runs at most once per agent, across processes and nodes, because
the claim is a row under a primary key (agent, key):

- first use: the row is inserted ``in_flight`` and committed before any work starts;
- same key, same payload, finished: the stored first response is returned, nothing runs;
- same key, different payload (or endpoint): ``422 idempotency_key_reused``;
- same key while the first request still runs: ``409 idempotency_in_flight``;
- an ``in_flight`` row older than ``lock`` belongs to a request that crashed and may
  be taken over by a retry (its work never committed: the response is stored in the
  same transaction as the work, so a committed send always has its response).

Like Stripe, a request that fails validation before doing anything releases its key,
so a corrected retry may reuse it; everything that reached the policy gateway
(including a ``block`` decision) is remembered.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, delete, select, update
from sqlalchemy.exc import IntegrityError

from mailgate.errors import IdempotencyInFlight, IdempotencyKeyMissing, IdempotencyKeyReused
from mailgate.store.db import Database
from mailgate.store.schema import idempotency_keys

MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Claim:
    """A key this request now holds; finish it with :meth:`IdempotencyStore.complete`
    (in the work's transaction) or give it back with :meth:`IdempotencyStore.release`."""

    agent_id: str
    key: str
    request_sha256: str


@dataclass(frozen=True, slots=True)
class Replay:
    """The stored response of the first request with this key."""

    status: int
    body: dict[str, Any]


def fingerprint(endpoint: str, payload: Any) -> str:
    """A stable hash of what was asked: the endpoint and the canonical JSON body."""
    canonical = json.dumps([endpoint, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_key(key: str | None) -> str:
    """Raises:
    IdempotencyKeyMissing: no key, an empty one, or one too long or not printable.
    """
    if key is None or not key.strip():
        raise IdempotencyKeyMissing(
            "send, reply and forward need an Idempotency-Key header (a unique value per "
            "intended message, e.g. a UUID); retries reuse it"
        )
    key = key.strip()
    if len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise IdempotencyKeyMissing(
            f"the Idempotency-Key must be printable and at most {MAX_KEY_LENGTH} characters"
        )
    return key


class IdempotencyStore:
    def __init__(self, db: Database, *, ttl: timedelta, lock: timedelta) -> None:
        self.db = db
        self.ttl = ttl
        self.lock = lock

    def claim(
        self,
        *,
        agent_id: str,
        workspace_id: str,
        key: str,
        endpoint: str,
        request_sha256: str,
        now: datetime,
    ) -> Claim | Replay:
        """Take the key (committed before returning) or answer from its first use.

        Raises:
            IdempotencyKeyReused: the key was used with another payload or endpoint.
            IdempotencyInFlight: the first request with the key is still running.
        """
        for _ in range(3):
            try:
                with self.db.write() as conn:
                    return self._claim(
                        conn, agent_id, workspace_id, key, endpoint, request_sha256, now
                    )
            except IntegrityError:
                continue  # another node inserted the same key between our read and insert
        raise IdempotencyInFlight("the first request with this Idempotency-Key is running")

    def _claim(
        self,
        conn: Connection,
        agent_id: str,
        workspace_id: str,
        key: str,
        endpoint: str,
        request_sha256: str,
        now: datetime,
    ) -> Claim | Replay:
        where = (idempotency_keys.c.agent_id == agent_id) & (idempotency_keys.c.key == key)
        query = select(idempotency_keys).where(where)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).first()
        claim = Claim(agent_id, key, request_sha256)
        values = {
            "workspace_id": workspace_id,
            "endpoint": endpoint,
            "request_sha256": request_sha256,
            "state": "in_flight",
            "locked_until": now + self.lock,
            "response_status": None,
            "response_body": None,
            "outbound_id": None,
            "created_at": now,
            "expires_at": now + self.ttl,
        }
        if row is None:
            conn.execute(idempotency_keys.insert(), dict(agent_id=agent_id, key=key, **values))
            return claim
        if row.expires_at <= now:  # forgotten: a new use of an old key
            conn.execute(update(idempotency_keys).where(where).values(**values))
            return claim
        if row.request_sha256 != request_sha256 or row.endpoint != endpoint:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used with a different request; use a new key "
                "for a different message",
                endpoint=row.endpoint,
            )
        if row.state == "done":
            return Replay(int(row.response_status), dict(row.response_body))
        if row.locked_until is not None and row.locked_until > now:
            raise IdempotencyInFlight(
                "the first request with this Idempotency-Key is still running; retry "
                "shortly for its result"
            )
        # The first request died without committing its work: take the key over.
        conn.execute(update(idempotency_keys).where(where).values(locked_until=now + self.lock))
        return claim

    @staticmethod
    def complete(
        conn: Connection,
        claim: Claim,
        *,
        status: int,
        body: dict[str, Any],
        outbound_id: str | None,
    ) -> None:
        """Store the response, in the transaction of the work it describes."""
        conn.execute(
            update(idempotency_keys)
            .where(
                idempotency_keys.c.agent_id == claim.agent_id,
                idempotency_keys.c.key == claim.key,
            )
            .values(
                state="done",
                locked_until=None,
                response_status=status,
                response_body=body,
                outbound_id=outbound_id,
            )
        )

    def release(self, claim: Claim) -> None:
        """Give the key back after a failure that did no work (validation, 5xx)."""
        with self.db.write() as conn:
            conn.execute(
                delete(idempotency_keys).where(
                    idempotency_keys.c.agent_id == claim.agent_id,
                    idempotency_keys.c.key == claim.key,
                    idempotency_keys.c.state == "in_flight",
                )
            )

    def purge_expired(self, now: datetime, *, limit: int = 1000) -> int:
        """Forget up to ``limit`` keys past their retention; returns how many (the
        retention job calls this until fewer than ``limit`` went)."""
        with self.db.write() as conn:
            ids = conn.execute(
                select(idempotency_keys.c.agent_id, idempotency_keys.c.key)
                .where(idempotency_keys.c.expires_at < now)
                .limit(limit)
            ).all()
            if ids:
                conn.execute(
                    delete(idempotency_keys).where(
                        idempotency_keys.c.agent_id == bindparam("a"),
                        idempotency_keys.c.key == bindparam("k"),
                    ),
                    [{"a": agent_id, "k": key} for agent_id, key in ids],
                )
        return len(ids)
