"""Workspaces, owners, agents, addresses and API keys.

Every create/revoke is one transaction with its audit entry. Secrets are returned once
(in the ``*Created`` values) and only their hashes are stored.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from sqlalchemy import Connection, func, select, update

from mailgate.clock import Clock
from mailgate.domain import keys
from mailgate.domain.keys import Principal
from mailgate.errors import Conflict, NotFound, Unauthorized, ValidationFailed
from mailgate.ids import new_id
from mailgate.services import audit
from mailgate.store.db import Database
from mailgate.store.schema import agent_addresses, agents, api_keys, owners, workspaces

_RECIPIENT_CACHE_MAX = 100_000
_LOCAL_PART = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class WorkspaceCreated:
    workspace_id: str
    name: str
    owner_id: str
    owner_key_id: str
    owner_api_key: str


@dataclass(frozen=True, slots=True)
class AgentCreated:
    agent_id: str
    workspace_id: str
    name: str
    address: str
    key_id: str
    api_key: str
    scopes: tuple[str, ...] = keys.AGENT_SCOPES


@dataclass(frozen=True, slots=True)
class KeyCreated:
    key_id: str
    workspace_id: str
    kind: str
    api_key: str
    agent_id: str | None = None
    owner_id: str | None = None
    scopes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Recipient:
    """An agent address that mail may be delivered to."""

    address: str
    agent_id: str
    workspace_id: str


def slugify(name: str) -> str:
    """An address local part from an agent name: ``Support Bot`` -> ``support-bot``."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.strip().lower()).strip("-._")
    return slug[:64].strip("-._")


class TenancyService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        agent_domain: str,
        *,
        recipient_cache_seconds: float = 0.0,
        default_tier: str = "reply_only",
    ) -> None:
        self.db = db
        self.default_tier = default_tier
        self.clock = clock
        self.agent_domain = agent_domain.lower()
        self.recipient_cache_seconds = recipient_cache_seconds
        # address -> (recipient, monotonic expiry). Positive answers only: a new agent
        # is reachable at once; a removed address is honoured within the TTL.
        self._recipients: dict[str, tuple[Recipient, float]] = {}

    # -- workspaces -------------------------------------------------------------------

    def create_workspace(
        self, name: str, *, owner_email: str | None = None, actor: str = "cli"
    ) -> WorkspaceCreated:
        """A workspace, its first owner and that owner's key.

        Raises:
            ValidationFailed: empty name, or a malformed owner email.
        """
        name = name.strip()
        if not name:
            raise ValidationFailed("workspace name is empty", errors=[_field("name", "empty")])
        email = _owner_email(owner_email) if owner_email else None
        now = self.clock.now()
        ws_id, owner_id, key_id = new_id("ws"), new_id("own"), new_id("key")
        secret = keys.mint(key_id)
        with self.db.write() as conn:
            conn.execute(workspaces.insert().values(id=ws_id, name=name, created_at=now))
            conn.execute(
                owners.insert().values(
                    id=owner_id, workspace_id=ws_id, name="owner", email=email, created_at=now
                )
            )
            self._insert_key(conn, ws_id, key_id, secret, "owner", owner_id=owner_id)
            audit.record(
                conn, workspace_id=ws_id, actor=actor, action="workspace.created", at=now,
                target_type="workspace", target_id=ws_id, name=name,
            )  # fmt: skip
        return WorkspaceCreated(ws_id, name, owner_id, key_id, secret.token)

    def set_owner_email(self, workspace_id: str, email: str, *, actor: str = "cli") -> str:
        """Set the first owner's address, where held outbound mail is announced; returns
        the owner id.

        Raises:
            ValidationFailed: not an address.
            NotFound: no such workspace.
        """
        address = _owner_email(email)
        now = self.clock.now()
        with self.db.write() as conn:
            self._require_workspace(conn, workspace_id)
            owner_id = conn.execute(
                select(owners.c.id)
                .where(owners.c.workspace_id == workspace_id)
                .order_by(owners.c.created_at)
            ).scalar_one()
            conn.execute(update(owners).where(owners.c.id == owner_id).values(email=address))
            audit.record(
                conn, workspace_id=workspace_id, actor=actor, action="owner.email_set", at=now,
                target_type="owner", target_id=owner_id, email=address,
            )  # fmt: skip
        return str(owner_id)

    def resolve_workspace(self, ref: str | None) -> str:
        """A workspace id from an id or a name; with no ref, the only workspace there is
        (one named ``default`` is created when there is none).

        Raises:
            NotFound: no workspace has that id or name.
            Conflict: no ref given and several workspaces exist.
        """
        with self.db.read() as conn:
            if ref:
                row = conn.execute(
                    select(workspaces.c.id)
                    .where((workspaces.c.id == ref) | (workspaces.c.name == ref))
                    .order_by(workspaces.c.created_at)
                ).first()
                if row is None:
                    raise NotFound(f"no workspace {ref!r}")
                return str(row.id)
            ids = conn.execute(select(workspaces.c.id).limit(2)).scalars().all()
        if len(ids) == 1:
            return str(ids[0])
        if len(ids) > 1:
            raise Conflict("several workspaces exist: name one with --workspace")
        return self.create_workspace("default").workspace_id

    # -- agents -----------------------------------------------------------------------

    def create_agent(
        self,
        workspace_id: str,
        name: str,
        *,
        local_part: str | None = None,
        actor: str = "cli",
    ) -> AgentCreated:
        """An agent, its address ``<local part>@<agent domain>`` and an agent key with
        every agent scope.

        Raises:
            ValidationFailed: the name gives no usable local part.
            Conflict: the name or address is taken.
            NotFound: no such workspace.
        """
        name = name.strip()
        local = (local_part or slugify(name)).lower()
        if not name or not _LOCAL_PART.match(local):
            raise ValidationFailed(
                f"cannot make an address from {name!r}",
                errors=[_field("name", "needs letters or digits for the address")],
            )
        address = f"{local}@{self.agent_domain}"
        now = self.clock.now()
        agent_id, key_id = new_id("agt"), new_id("key")
        secret = keys.mint(key_id)
        with self.db.write() as conn:
            self._require_workspace(conn, workspace_id)
            taken = conn.execute(
                select(func.count())
                .select_from(agents)
                .where(agents.c.workspace_id == workspace_id, agents.c.name == name)
            ).scalar_one()
            if taken:
                raise Conflict(f"an agent named {name!r} exists", field="name")
            if conn.execute(
                select(agent_addresses.c.address).where(agent_addresses.c.address == address)
            ).first():
                raise Conflict(f"address {address} is taken", field="address")
            conn.execute(
                agents.insert().values(
                    id=agent_id,
                    workspace_id=workspace_id,
                    name=name,
                    created_at=now,
                    tier=self.default_tier,
                )
            )
            conn.execute(
                agent_addresses.insert().values(
                    address=address, agent_id=agent_id, workspace_id=workspace_id, created_at=now
                )
            )
            self._insert_key(
                conn, workspace_id, key_id, secret, "agent", agent_id=agent_id,
                scopes=keys.AGENT_SCOPES,
            )  # fmt: skip
            audit.record(
                conn, workspace_id=workspace_id, actor=actor, action="agent.created", at=now,
                target_type="agent", target_id=agent_id, name=name, address=address,
            )  # fmt: skip
        return AgentCreated(agent_id, workspace_id, name, address, key_id, secret.token)

    def cached_recipient(self, address: str) -> Recipient | None:
        """A recent positive answer of :meth:`resolve_recipient`, without I/O, or None
        (meaning *ask the database*, not *unknown*). Lets SMTP answer RCPT on the event
        loop without a thread hop for the addresses it sees all the time."""
        hit = self._recipients.get(address.strip().strip("<>").lower())
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def forget_agent(self, agent_id: str) -> None:
        """Drop cached answers naming ``agent_id`` (it was deleted), sub-addresses
        included, so this process refuses its mail at once; other processes stop
        within ``recipient_cache_seconds``."""
        for address, (recipient, _expiry) in list(self._recipients.items()):
            if recipient.agent_id == agent_id:
                self._recipients.pop(address, None)

    def resolve_recipient(self, address: str) -> Recipient | None:
        """The agent an envelope recipient belongs to, or None (refuse it: no relaying).

        ``name+tag@domain`` is delivered to ``name@domain`` (sub-addressing).
        """
        found = self._lookup_recipient(address)
        if found is not None and self.recipient_cache_seconds > 0:
            if len(self._recipients) >= _RECIPIENT_CACHE_MAX:
                self._recipients.clear()  # crude but bounded; refilled on demand
            expiry = time.monotonic() + self.recipient_cache_seconds
            self._recipients[address.strip().strip("<>").lower()] = (found, expiry)
        return found

    def _lookup_recipient(self, address: str) -> Recipient | None:
        wanted = address.strip().strip("<>").lower()
        local, at, domain = wanted.rpartition("@")
        candidates = [wanted]
        if at and "+" in local:
            candidates.append(f"{local.split('+', 1)[0]}@{domain}")
        with self.db.read() as conn:
            rows = conn.execute(
                select(agent_addresses).where(agent_addresses.c.address.in_(candidates))
            ).all()
        by_address = {row.address: row for row in rows}
        for candidate in candidates:
            row = by_address.get(candidate)
            if row is not None:
                return Recipient(row.address, row.agent_id, row.workspace_id)
        return None

    # -- keys -------------------------------------------------------------------------

    def create_key(
        self,
        workspace_id: str,
        *,
        agent_id: str | None = None,
        scopes: tuple[str, ...] | None = None,
        name: str = "",
        actor: str = "cli",
    ) -> KeyCreated:
        """An agent key (``agent_id`` given; ``scopes`` default to all agent scopes) or an
        owner key for the workspace's first owner.

        Raises:
            ValidationFailed: unknown scope, or scopes given for an owner key.
            NotFound: no such workspace or agent in it.
        """
        try:
            valid = keys.validate_scopes(scopes or keys.AGENT_SCOPES)
        except ValueError as exc:
            raise ValidationFailed(str(exc), errors=[_field("scopes", str(exc))]) from None
        if agent_id is None and scopes:
            raise ValidationFailed(
                "owner keys hold every scope", errors=[_field("scopes", "not for owner keys")]
            )
        now = self.clock.now()
        key_id = new_id("key")
        secret = keys.mint(key_id)
        with self.db.write() as conn:
            self._require_workspace(conn, workspace_id)
            if agent_id is not None:
                found = conn.execute(
                    select(agents.c.id).where(
                        agents.c.id == agent_id, agents.c.workspace_id == workspace_id
                    )
                ).first()
                if found is None:
                    raise NotFound(f"no agent {agent_id} in this workspace")
                self._insert_key(
                    conn, workspace_id, key_id, secret, "agent", agent_id=agent_id,
                    scopes=valid, name=name,
                )  # fmt: skip
                result = KeyCreated(
                    key_id, workspace_id, "agent", secret.token, agent_id, None, valid
                )
            else:
                owner_id = conn.execute(
                    select(owners.c.id)
                    .where(owners.c.workspace_id == workspace_id)
                    .order_by(owners.c.created_at)
                ).scalar_one()
                self._insert_key(
                    conn, workspace_id, key_id, secret, "owner", owner_id=owner_id, name=name
                )
                result = KeyCreated(key_id, workspace_id, "owner", secret.token, None, owner_id)
            audit.record(
                conn, workspace_id=workspace_id, actor=actor, action="key.created", at=now,
                target_type="api_key", target_id=key_id, kind=result.kind, agent_id=agent_id,
                scopes=list(result.scopes),
            )  # fmt: skip
        return result

    def revoke_key(
        self, key_id: str, *, workspace_id: str | None = None, actor: str = "cli"
    ) -> None:
        """Revoke a key at once (the next request with it gets ``401``). Idempotent.

        Raises:
            NotFound: no such key (in the workspace, when one is given).
        """
        now = self.clock.now()
        with self.db.write() as conn:
            query = select(api_keys.c.workspace_id, api_keys.c.revoked_at).where(
                api_keys.c.id == key_id
            )
            if workspace_id is not None:
                query = query.where(api_keys.c.workspace_id == workspace_id)
            row = conn.execute(query).first()
            if row is None:
                raise NotFound(f"no key {key_id}")
            if row.revoked_at is not None:
                return
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=now))
            audit.record(
                conn, workspace_id=row.workspace_id, actor=actor, action="key.revoked", at=now,
                target_type="api_key", target_id=key_id,
            )  # fmt: skip

    def authenticate(self, token: str) -> Principal:
        """The principal a bearer token stands for.

        Raises:
            Unauthorized: malformed, unknown or revoked key (one code for all three, so
                a caller cannot probe which keys exist).
        """
        key_id, secret = keys.split_token(token)
        with self.db.read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        if (
            row is None
            or row.revoked_at is not None
            or not keys.secret_matches(secret, row.secret_hash)
        ):
            raise Unauthorized("unknown or revoked API key")
        return Principal(
            workspace_id=row.workspace_id,
            key_id=row.id,
            kind=row.kind,
            agent_id=row.agent_id,
            owner_id=row.owner_id,
            scopes=tuple(row.scopes),
        )

    # -- helpers ----------------------------------------------------------------------

    def _insert_key(
        self,
        conn: Connection,
        workspace_id: str,
        key_id: str,
        secret: keys.NewSecret,
        kind: str,
        *,
        owner_id: str | None = None,
        agent_id: str | None = None,
        scopes: tuple[str, ...] = (),
        name: str = "",
    ) -> None:
        conn.execute(
            api_keys.insert().values(
                id=key_id,
                workspace_id=workspace_id,
                owner_id=owner_id,
                agent_id=agent_id,
                kind=kind,
                name=name or f"{kind} key",
                secret_hash=secret.secret_hash,
                scopes=list(scopes),
                created_at=self.clock.now(),
            )
        )

    @staticmethod
    def _require_workspace(conn: Connection, workspace_id: str) -> None:
        if (
            conn.execute(select(workspaces.c.id).where(workspaces.c.id == workspace_id)).first()
            is None
        ):
            raise NotFound(f"no workspace {workspace_id}")


def _owner_email(value: str) -> str:
    address = value.strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() or ord(c) < 32 for c in address):
        raise ValidationFailed(
            f"{value!r} is not an email address", errors=[_field("email", "not an address")]
        )
    return address


def _field(name: str, message: str) -> dict[str, str]:
    return {"field": name, "message": message}
