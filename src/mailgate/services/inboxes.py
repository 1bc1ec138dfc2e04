"""Inboxes as the AgentMail face (``/v0``) manages them: an inbox *is* an agent.

The inbox id is the agent's primary address, the pod id its workspace. What AgentMail
keeps on an inbox and we did not have (display name, the caller's ``client_id``,
free-form metadata, ``updated_at``) lives on the agent row (migration 0004).

Why this is not :meth:`TenancyService.create_agent`:

* **Idempotent by ``client_id`` in one transaction.** AgentMail's SDK retries a create
  with the same ``client_id`` and expects the same inbox back. The agent, its address
  and its ``client_id`` are written together, and the unique
  ``(workspace_id, client_id)`` index decides a race on PostgreSQL: the loser's
  insert fails, and it answers with the winner's inbox. A create in two steps (agent,
  then client id) could leave a second agent behind.
* **No key is minted.** AgentMail hands back no key with an inbox; a secret nobody
  is ever shown is a liability. The owner key manages the inbox; ``mailgate key
  create --agent`` gives it one when an agent should act alone.
* **A random local part** when no username is given (AgentMail's behaviour).

Every change is one transaction with its audit entry (``agent.created``,
``agent.updated``, ``agent.deleted``, each with ``via: "v0"``).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeAlias

from sqlalchemy import Connection, Row, delete, select, update
from sqlalchemy.exc import IntegrityError

from mailgate.clock import Clock
from mailgate.config import Settings
from mailgate.domain.keys import Principal
from mailgate.errors import Conflict, NotFound, NotSupported, ValidationFailed
from mailgate.ids import new_id
from mailgate.services import audit
from mailgate.services.policy import PolicyCache
from mailgate.services.queries import check_limit, decode_time_cursor, encode_cursor
from mailgate.services.tenancy import TenancyService
from mailgate.store.db import Database
from mailgate.store.schema import agent_addresses, agents, consumers, deliveries, events

__all__ = ["Inbox", "InboxService", "MetadataValue"]

MetadataValue: TypeAlias = str | int | float | bool
"""What an inbox's metadata may hold per key (AgentMail: string, number, boolean)."""

_LOCAL_PART: Final = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")
_RANDOM_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"
_RANDOM_TRIES: Final = 5
_MAX_DISPLAY_NAME: Final = 200
_MAX_CLIENT_ID: Final = 200
_MAX_METADATA_KEYS: Final = 100
_MAX_METADATA_KEY: Final = 100
_MAX_METADATA_STRING: Final = 4096
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_CURSOR_KIND: Final = "ib"

_Row: TypeAlias = Row[Any]


@dataclass(frozen=True, slots=True)
class Inbox:
    """An agent seen as an AgentMail inbox."""

    agent_id: str
    workspace_id: str
    """AgentMail's ``pod_id``."""
    inbox_id: str
    """The agent's primary address (also AgentMail's ``email``)."""
    display_name: str | None
    client_id: str | None
    metadata: dict[str, MetadataValue] | None
    created_at: datetime
    updated_at: datetime


class InboxService:
    """Create, list, read, change and delete inboxes for the ``/v0`` routes."""

    def __init__(
        self,
        db: Database,
        tenancy: TenancyService,
        settings: Settings,
        clock: Clock,
        *,
        policies: PolicyCache | None = None,
    ) -> None:
        self.db = db
        self.tenancy = tenancy
        self.clock = clock
        self.agent_domain = settings.agent_domain.strip().lower()
        self.default_tier = settings.default_tier
        self.policies = policies

    # -- create -------------------------------------------------------------------------

    def create(
        self,
        principal: Principal,
        *,
        username: str | None = None,
        domain: str | None = None,
        display_name: str | None = None,
        client_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        status: str | None = None,
    ) -> tuple[Inbox, bool]:
        """A new inbox, or (same ``client_id``) the one made before; the flag says
        whether this call created it.

        ``username`` None picks a random local part; ``domain`` None is the agent
        domain, the only one this gateway receives mail for.

        Raises:
            Forbidden: an agent key (agents do not create agents).
            ValidationFailed: a malformed field, or a domain other than the agent
                domain (``errors`` names each field).
            NotSupported: ``status="paused"`` (pausing is not offered).
            Conflict: the address is taken.
        """
        principal.require_owner()
        errors: list[dict[str, str]] = []
        _check_status(status, errors)
        local = None if username is None else _check_username(username, errors)
        wanted_domain = self.agent_domain if domain is None else _text(domain).strip().lower()
        if wanted_domain != self.agent_domain:
            errors.append(
                _error("domain", f"this gateway receives mail only for {self.agent_domain}")
            )
        name = _check_display_name(display_name, errors)
        cid = _check_client_id(client_id, errors)
        meta = None if metadata is None else _check_metadata(metadata, errors, allow_null=False)
        if errors:
            raise ValidationFailed("invalid inbox", errors=errors)
        if cid is not None:
            existing = self._by_client_id(principal.workspace_id, cid)
            if existing is not None:
                return existing, False
        for attempt in range(1 if local is not None else _RANDOM_TRIES):
            address = f"{local or _random_local()}@{self.agent_domain}"
            try:
                return self._insert(principal, address, name, cid, meta), True
            except _AddressTaken:
                if local is not None or attempt == _RANDOM_TRIES - 1:
                    raise Conflict(f"address {address} is taken", field="username") from None
            except IntegrityError:
                # A concurrent create: the same client id (answer with its inbox) or
                # the same address.
                if cid is not None:
                    existing = self._by_client_id(principal.workspace_id, cid)
                    if existing is not None:
                        return existing, False
                if local is not None or attempt == _RANDOM_TRIES - 1:
                    raise Conflict(f"address {address} is taken", field="username") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _insert(
        self,
        principal: Principal,
        address: str,
        display_name: str | None,
        client_id: str | None,
        metadata: dict[str, MetadataValue] | None,
    ) -> Inbox:
        now = self.clock.now()
        agent_id = new_id("agt")
        with self.db.write() as conn:
            if conn.execute(
                select(agent_addresses.c.address).where(agent_addresses.c.address == address)
            ).first():
                raise _AddressTaken
            conn.execute(
                agents.insert().values(
                    id=agent_id,
                    workspace_id=principal.workspace_id,
                    name=address,  # unique like the address, and says which inbox it is
                    created_at=now,
                    updated_at=now,
                    tier=self.default_tier,
                    display_name=display_name,
                    client_id=client_id,
                    inbox_metadata=metadata,
                )
            )
            conn.execute(
                agent_addresses.insert().values(
                    address=address,
                    agent_id=agent_id,
                    workspace_id=principal.workspace_id,
                    created_at=now,
                )
            )
            audit.record(
                conn, workspace_id=principal.workspace_id, actor=principal.actor,
                action="agent.created", at=now, target_type="agent", target_id=agent_id,
                name=address, address=address, client_id=client_id, via="v0",
            )  # fmt: skip
        return Inbox(
            agent_id, principal.workspace_id, address, display_name, client_id, metadata, now, now
        )

    def _by_client_id(self, workspace_id: str, client_id: str) -> Inbox | None:
        with self.db.read() as conn:
            row = conn.execute(
                select(agents).where(
                    agents.c.workspace_id == workspace_id, agents.c.client_id == client_id
                )
            ).first()
            return None if row is None else _inbox(conn, row)

    # -- read -----------------------------------------------------------------------------

    def list(
        self,
        principal: Principal,
        *,
        limit: int,
        page_token: str | None = None,
        ascending: bool = False,
    ) -> tuple[list[Inbox], str | None]:
        """The inboxes the caller may see, newest first (``ascending``: oldest first),
        and the token of the next page (None on the last).

        Raises:
            ValidationFailed: ``limit`` out of range or a token this listing did not
                hand out.
        """
        check_limit(limit)
        query = select(agents).where(agents.c.workspace_id == principal.workspace_id)
        if not principal.is_owner:
            query = query.where(agents.c.id == principal.agent_id)
        if page_token:
            at, last_id = _decode_token(page_token)
            if ascending:
                query = query.where(
                    (agents.c.created_at > at)
                    | ((agents.c.created_at == at) & (agents.c.id > last_id))
                )
            else:
                query = query.where(
                    (agents.c.created_at < at)
                    | ((agents.c.created_at == at) & (agents.c.id < last_id))
                )
        order = (
            (agents.c.created_at, agents.c.id)
            if ascending
            else (agents.c.created_at.desc(), agents.c.id.desc())
        )
        with self.db.read() as conn:
            rows = conn.execute(query.order_by(*order).limit(limit + 1)).all()
            page = [_inbox(conn, row) for row in rows[:limit]]
        token = None
        if len(rows) > limit:
            last = page[-1]
            token = encode_cursor(_CURSOR_KIND, f"{last.created_at.isoformat()}|{last.agent_id}")
        return page, token

    def get(self, principal: Principal, agent_id: str) -> Inbox:
        """Raises:
        NotFound: no such inbox visible to the caller.
        """
        with self.db.read() as conn:
            return _inbox(conn, _agent_row(conn, principal, agent_id))

    # -- change ---------------------------------------------------------------------------

    def update(self, principal: Principal, agent_id: str, changes: Mapping[str, Any]) -> Inbox:
        """Apply AgentMail's update: ``display_name`` replaces (null clears),
        ``metadata`` merges (a key with null is removed; null clears all; ``{}`` is
        refused), ``status`` may only say ``active``. At least one field must be given.

        An agent key may update its own inbox (a name and notes, not its reach).

        Raises:
            ValidationFailed: no field, an unknown field or a malformed one.
            NotSupported: ``status="paused"``.
            NotFound: no such inbox visible to the caller.
        """
        errors: list[dict[str, str]] = []
        errors.extend(_error(str(k), "unknown field") for k in changes if k not in _UPDATABLE)
        if not any(k in changes for k in _UPDATABLE):
            errors.append(_error("body", "give at least one of display_name, status or metadata"))
        if "status" in changes:
            _check_status(changes["status"], errors)
        values: dict[str, Any] = {}
        if "display_name" in changes:
            values["display_name"] = _check_display_name(changes["display_name"], errors)
        merge: dict[str, MetadataValue | None] | None = None
        if "metadata" in changes and changes["metadata"] is not None:
            raw = changes["metadata"]
            if isinstance(raw, Mapping) and not raw:
                errors.append(_error("metadata", "an empty object changes nothing: send null"))
            else:
                merge = _check_metadata(raw, errors, allow_null=True)
        if errors:
            raise ValidationFailed("invalid inbox update", errors=errors)
        now = self.clock.now()
        with self.db.write() as conn:
            row = _agent_row(conn, principal, agent_id, lock=True)
            if "metadata" in changes:
                values["inbox_metadata"] = _merged(row.inbox_metadata, merge)
            conn.execute(
                update(agents).where(agents.c.id == agent_id).values(updated_at=now, **values)
            )
            audit.record(
                conn, workspace_id=row.workspace_id, actor=principal.actor,
                action="agent.updated", at=now, target_type="agent", target_id=agent_id,
                changed=sorted(k for k in changes if k in _UPDATABLE), via="v0",
            )  # fmt: skip
            return _inbox(conn, _agent_row(conn, principal, agent_id))

    def delete(self, principal: Principal, agent_id: str) -> None:
        """Delete an agent with everything it owns: addresses, keys, messages, threads,
        events, drafts, outbound requests, rules, contacts, lists (the foreign keys
        cascade), and its feed consumers with their pending deliveries.

        Raises:
            Forbidden: an agent key.
            NotFound: no such inbox in the caller's workspace.
        """
        principal.require_owner()
        now = self.clock.now()
        with self.db.write() as conn:
            row = _agent_row(conn, principal, agent_id, lock=True)
            addresses = list(
                conn.execute(
                    select(agent_addresses.c.address).where(agent_addresses.c.agent_id == agent_id)
                ).scalars()
            )
            # Deliveries name events by seq without a foreign key: remove those of the
            # agent's events from workspace-wide consumers, and the agent's own consumers.
            conn.execute(
                delete(deliveries).where(
                    deliveries.c.event_seq.in_(
                        select(events.c.seq).where(events.c.agent_id == agent_id)
                    )
                )
            )
            conn.execute(
                delete(consumers).where(
                    consumers.c.workspace_id == row.workspace_id, consumers.c.scope == agent_id
                )
            )
            conn.execute(delete(agents).where(agents.c.id == agent_id))
            audit.record(
                conn, workspace_id=row.workspace_id, actor=principal.actor,
                action="agent.deleted", at=now, target_type="agent", target_id=agent_id,
                name=row.name, addresses=addresses, via="v0",
            )  # fmt: skip
        self.tenancy.forget_agent(agent_id)
        if self.policies is not None:
            self.policies.invalidate(agent_id=agent_id)


# -- helpers ----------------------------------------------------------------------------

_UPDATABLE: Final = ("display_name", "status", "metadata")


class _AddressTaken(Exception):
    """The address exists (found before inserting)."""


def _agent_row(
    conn: Connection, principal: Principal, agent_id: str, *, lock: bool = False
) -> _Row:
    """Raises:
    NotFound: no such agent visible to the caller.
    """
    query = select(agents).where(
        agents.c.id == agent_id, agents.c.workspace_id == principal.workspace_id
    )
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None or not principal.can_see_agent(agent_id):
        raise NotFound(f"no inbox {agent_id}")
    return row


def _inbox(conn: Connection, row: _Row) -> Inbox:
    address = conn.execute(
        select(agent_addresses.c.address)
        .where(agent_addresses.c.agent_id == row.id)
        .order_by(agent_addresses.c.created_at, agent_addresses.c.address)
        .limit(1)
    ).scalar_one_or_none()
    return Inbox(
        agent_id=row.id,
        workspace_id=row.workspace_id,
        inbox_id=str(address or row.id),
        display_name=row.display_name,
        client_id=row.client_id,
        metadata=dict(row.inbox_metadata) if row.inbox_metadata is not None else None,
        created_at=row.created_at,
        updated_at=row.updated_at or row.created_at,
    )


def _merged(
    current: Mapping[str, Any] | None, merge: Mapping[str, MetadataValue | None] | None
) -> dict[str, Any] | None:
    """AgentMail's merge: None clears; keys with None are removed, others set."""
    if merge is None:
        return None
    out = dict(current or {})
    for key, value in merge.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out or None


def _random_local() -> str:
    """A local part nobody picked: a letter, then 11 letters or digits."""
    first = secrets.choice(_RANDOM_ALPHABET[:26])
    return first + "".join(secrets.choice(_RANDOM_ALPHABET) for _ in range(11))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _check_status(status: Any, errors: list[dict[str, str]]) -> None:
    """Raises:
    NotSupported: ``paused`` (an inbox here cannot be paused).
    """
    if status is None or status == "active":
        return
    if status == "paused":
        raise NotSupported("status 'paused' is not supported by this gateway", field="status")
    errors.append(_error("status", "must be 'active'"))


def _check_username(username: Any, errors: list[dict[str, str]]) -> str | None:
    local = _text(username).strip().lower()
    if not _LOCAL_PART.match(local):
        errors.append(
            _error(
                "username",
                "1-64 letters, digits, '.', '_' or '-', starting and ending with a letter or digit",
            )
        )
        return None
    return local


def _check_display_name(value: Any, errors: list[dict[str, str]]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _MAX_DISPLAY_NAME or _CONTROL.search(value):
        errors.append(
            _error(
                "display_name",
                f"a string of at most {_MAX_DISPLAY_NAME} characters without control characters",
            )
        )
        return None
    return value.strip() or None


def _check_client_id(value: Any, errors: list[dict[str, str]]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_CLIENT_ID:
        errors.append(_error("client_id", f"a non-empty string of at most {_MAX_CLIENT_ID}"))
        return None
    return value


def _check_metadata(
    value: Any, errors: list[dict[str, str]], *, allow_null: bool
) -> dict[str, Any] | None:
    """Metadata as given, if every key is a short string and every value a string,
    number or boolean (or, for an update, null)."""
    if not isinstance(value, Mapping):
        errors.append(_error("metadata", "must be an object"))
        return None
    if len(value) > _MAX_METADATA_KEYS:
        errors.append(_error("metadata", f"at most {_MAX_METADATA_KEYS} keys"))
        return None
    out: dict[str, Any] = {}
    for key, item in value.items():
        field = f"metadata.{key}"
        if not isinstance(key, str) or not key or len(key) > _MAX_METADATA_KEY:
            errors.append(_error(field, f"keys are 1-{_MAX_METADATA_KEY} characters"))
        elif item is None and allow_null:
            out[key] = None
        elif isinstance(item, str) and len(item) > _MAX_METADATA_STRING:
            errors.append(_error(field, f"at most {_MAX_METADATA_STRING} characters"))
        elif isinstance(item, str | bool | int | float):
            out[key] = item
        else:
            errors.append(_error(field, "must be a string, number or boolean"))
    return out


def _decode_token(token: str) -> tuple[datetime, str]:
    try:
        return decode_time_cursor(token, _CURSOR_KIND)
    except ValidationFailed:
        raise ValidationFailed(
            "page_token is not one this listing handed out",
            errors=[_error("page_token", "invalid page token")],
        ) from None


def _error(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}
