"""AgentMail's allow/block lists, mapped onto the policy objects that already decide
what an agent receives and sends. Nothing new is stored: each list is a view of one
of them, so an entry added here acts exactly like one made over ``/v1`` or the CLI,
and shows up there.

=========  ======  ==========================================================
direction  type    what an entry is
=========  ======  ==========================================================
receive    allow   a known contact (``contacts``, auto-approved): its
                   authenticated mail skips the rules when the workspace
                   allows it (``contacts_bypass``); ``reason`` is its name
receive    block   an inbound rule ``from`` / ``from_domain`` *is* the entry,
                   action ``trash``, named ``agentmail receive/block[: reason]``
                   (the tag the list finds it by). Trash keeps the mail out of
                   the agent's inbox and feed, restorable by an owner until
                   retention purges it. An inbox's rule goes first in its
                   rules; a workspace entry is a workspace default (after the
                   agents' own rules)
send       allow   a recipient ``allow`` entry: admitted under tier
                   ``allowlisted_domains``
send       block   a recipient ``deny`` entry: the outbound gateway blocks it
reply      block   the same ``deny`` entry: a reply to a denied address is
                   blocked like any send (the two lists are one)
reply      allow   not offered (501): replies are already what the narrowest
                   tier admits, so there is nothing to allow
=========  ======  ==========================================================

Scope: ``/v0/lists/...`` is the workspace's entries, ``/v0/inboxes/{id}/lists/...``
one agent's (not the workspace's, which apply to it too). A domain entry covers that
exact domain, not its subdomains. Entries are ordered by entry, ascending.

Who may write: an owner key anything in its workspace. An agent key may read its own
inbox's lists and the workspace's, and may *add block entries to its own inbox*
(that only narrows what it receives or sends); allow entries, deletions and
workspace entries need an owner key (``403``), since they widen an agent's reach.

Adding an entry that is already there returns it unchanged (``reason`` included), so
a retried call is harmless. Recipient list entries keep their reason in their own
column.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, TypeAlias, get_args

from sqlalchemy import Row, select

from mailgate.domain.keys import Principal
from mailgate.errors import Conflict, Forbidden, NotFound, NotSupported, ValidationFailed
from mailgate.services.mailbox import Operator
from mailgate.services.outbound_admin import WORKSPACE_SCOPE, OutboundAdmin
from mailgate.services.queries import check_limit, encode_cursor
from mailgate.services.rules_admin import RulesService, contact_value
from mailgate.store.db import Database
from mailgate.store.schema import contacts, recipient_lists
from mailgate.store.schema import rules as rules_table

__all__ = ["BLOCK_RULE_TAG", "AgentMailLists", "Direction", "ListEntry", "ListType"]

Direction: TypeAlias = Literal["send", "receive", "reply"]
ListType: TypeAlias = Literal["allow", "block"]
EntryType: TypeAlias = Literal["email", "domain"]

BLOCK_RULE_TAG: Final = "agentmail receive/block"
"""Name (prefix) of the inbound rules that hold ``receive/block`` entries."""
_BLOCK_ACTION: Final = "trash"
_MAX_REASON: Final = 200 - len(BLOCK_RULE_TAG) - 2
_CURSOR_KIND: Final = "le"

_Row: TypeAlias = Row[Any]


@dataclass(frozen=True, slots=True)
class ListEntry:
    """One entry as AgentMail shows it."""

    entry: str
    """Lower-cased address or domain."""
    workspace_id: str
    """AgentMail's ``organization_id``."""
    agent_id: str | None
    """None: a workspace entry."""
    reason: str | None
    direction: str
    list_type: str
    entry_type: EntryType
    created_at: datetime
    read_only: bool = False


class AgentMailLists:
    """The ``/v0`` lists over rules, contacts and recipient lists."""

    def __init__(self, db: Database, rules: RulesService, outbound_admin: OutboundAdmin) -> None:
        self.db = db
        self.rules = rules
        self.outbound_admin = outbound_admin

    # -- read -----------------------------------------------------------------------------

    def list_entries(
        self,
        principal: Principal,
        direction: str,
        list_type: str,
        *,
        agent_id: str | None,
        limit: int,
        page_token: str | None = None,
    ) -> tuple[list[ListEntry], str | None]:
        """One list's entries after ``page_token``, by entry, and the next page's token.

        ``agent_id`` names an inbox the caller may see (the route checked it); None is
        the workspace's list.

        Raises:
            ValidationFailed: unknown direction or type, bad limit or token.
            NotSupported: ``reply/allow``.
        """
        d, t = _check_list(direction, list_type)
        check_limit(limit)
        after = _decode_token(page_token) if page_token else None
        entries = self._entries(principal, d, t, agent_id, after=after, limit=limit + 1)
        page = entries[:limit]
        token = encode_cursor(_CURSOR_KIND, page[-1].entry) if len(entries) > limit else None
        return page, token

    def get_entry(
        self,
        principal: Principal,
        direction: str,
        list_type: str,
        entry: str,
        *,
        agent_id: str | None,
    ) -> ListEntry:
        """Raises:
        ValidationFailed: unknown direction or type, or a malformed entry.
        NotSupported: ``reply/allow``.
        NotFound: the entry is not on that list.
        """
        d, t = _check_list(direction, list_type)
        _, value = _entry_value(entry)
        found = self._entries(principal, d, t, agent_id, exact=value)
        if not found:
            raise NotFound(f"{value} is not on the {d}/{t} list")
        return found[0]

    def _entries(
        self,
        principal: Principal,
        direction: Direction,
        list_type: ListType,
        agent_id: str | None,
        *,
        after: str | None = None,
        exact: str | None = None,
        limit: int | None = None,
    ) -> list[ListEntry]:
        ws = principal.workspace_id
        scope = agent_id or WORKSPACE_SCOPE
        with self.db.read() as conn:
            if direction == "receive" and list_type == "block":
                rows = conn.execute(
                    select(rules_table).where(
                        rules_table.c.workspace_id == ws,
                        rules_table.c.agent_id == agent_id
                        if agent_id
                        else rules_table.c.agent_id.is_(None),
                        rules_table.c.direction == "inbound",
                        rules_table.c.action == _BLOCK_ACTION,
                        rules_table.c.name.startswith(BLOCK_RULE_TAG, autoescape=True),
                    )
                ).all()
                blocks = _block_entries(rows, ws, agent_id, direction)
                picked = [
                    e
                    for e in blocks
                    if (exact is None or e.entry == exact) and (after is None or e.entry > after)
                ]
                return picked[:limit] if limit is not None else picked
            if direction == "receive":
                table = contacts
                query = select(contacts).where(
                    contacts.c.workspace_id == ws, contacts.c.scope == scope
                )
            else:
                table = recipient_lists
                query = select(recipient_lists).where(
                    recipient_lists.c.workspace_id == ws,
                    recipient_lists.c.scope == scope,
                    recipient_lists.c.list == ("allow" if list_type == "allow" else "deny"),
                )
            if exact is not None:
                query = query.where(table.c.value == exact)
            if after is not None:
                query = query.where(table.c.value > after)
            query = query.order_by(table.c.value)
            if limit is not None:
                query = query.limit(limit)
            rows = conn.execute(query).all()
        return [
            ListEntry(
                entry=row.value,
                workspace_id=ws,
                agent_id=agent_id,
                reason=(row.name or None) if direction == "receive" else row.reason,
                direction=direction,
                list_type=list_type,
                entry_type="domain" if row.kind == "domain" else "email",
                created_at=row.created_at,
            )
            for row in rows
        ]

    # -- change ---------------------------------------------------------------------------

    def add_entry(
        self,
        principal: Principal,
        direction: str,
        list_type: str,
        entry: str,
        *,
        reason: str | None = None,
        agent_id: str | None,
    ) -> ListEntry:
        """Put an address or domain on a list (or return it, if it is there already).

        Raises:
            ValidationFailed: unknown direction or type, malformed entry or reason.
            NotSupported: ``reply/allow``.
            Forbidden: an agent key adding an allow entry or a workspace entry.
        """
        d, t = _check_list(direction, list_type)
        kind, value = _entry_value(entry)
        if reason is not None and (not isinstance(reason, str) or len(reason) > _MAX_REASON):
            raise ValidationFailed(
                "invalid reason",
                errors=[_error("reason", f"a string of at most {_MAX_REASON} characters")],
            )
        _check_writer(principal, agent_id, adding_block=t == "block")
        existing = self._entries(principal, d, t, agent_id, exact=value)
        if existing:
            return existing[0]
        ws, actor = principal.workspace_id, principal.actor
        try:
            if d == "receive" and t == "allow":
                self.rules.add_contact(
                    ws,
                    agent_id,
                    address=value if kind == "address" else None,
                    domain=value if kind == "domain" else None,
                    name=reason or "",
                    actor=actor,
                )
            elif d == "receive":
                field = "from" if kind == "address" else "from_domain"
                name = f"{BLOCK_RULE_TAG}: {reason}" if reason else BLOCK_RULE_TAG
                self.rules.create_rule(
                    ws,
                    agent_id,
                    {
                        "name": name,
                        "direction": "inbound",
                        "action": _BLOCK_ACTION,
                        "condition": {"field": field, "match": "is", "value": value},
                        "enabled": True,
                        "position": 0,  # before the inbox's own rules: a block wins
                    },
                    actor=actor,
                )
            else:
                # The operator form lets an agent add a deny entry to its own inbox
                # (checked above); the audit entry still names the agent.
                self.outbound_admin.add_entry(
                    Operator(actor=actor),
                    list="allow" if t == "allow" else "deny",
                    value=value,
                    agent_id=agent_id,
                    workspace_id=ws,
                    reason=reason,
                )
        except Conflict:
            pass  # added by a concurrent call: answer with it
        found = self._entries(principal, d, t, agent_id, exact=value)
        if not found:  # pragma: no cover - removed again between the two steps
            raise NotFound(f"{value} is not on the {d}/{t} list")
        return found[0]

    def remove_entry(
        self,
        principal: Principal,
        direction: str,
        list_type: str,
        entry: str,
        *,
        agent_id: str | None,
    ) -> None:
        """Take an entry off a list (``reply/block`` and ``send/block`` are one list).

        Raises:
            ValidationFailed: unknown direction or type, or a malformed entry.
            NotSupported: ``reply/allow``.
            Forbidden: an agent key.
            NotFound: the entry is not on that list.
        """
        d, t = _check_list(direction, list_type)
        _, value = _entry_value(entry)
        _check_writer(principal, agent_id, adding_block=False)
        ws, actor = principal.workspace_id, principal.actor
        scope = agent_id or WORKSPACE_SCOPE
        with self.db.read() as conn:
            if d == "receive" and t == "block":
                rows: Sequence[_Row] = conn.execute(
                    select(rules_table).where(
                        rules_table.c.workspace_id == ws,
                        rules_table.c.agent_id == agent_id
                        if agent_id
                        else rules_table.c.agent_id.is_(None),
                        rules_table.c.direction == "inbound",
                        rules_table.c.action == _BLOCK_ACTION,
                        rules_table.c.name.startswith(BLOCK_RULE_TAG, autoescape=True),
                    )
                ).all()
                ids = [r.id for r in rows if (_block_value(r) or ("", ""))[1] == value]
            elif d == "receive":
                ids = list(
                    conn.execute(
                        select(contacts.c.id).where(
                            contacts.c.workspace_id == ws,
                            contacts.c.scope == scope,
                            contacts.c.value == value,
                        )
                    ).scalars()
                )
            else:
                ids = list(
                    conn.execute(
                        select(recipient_lists.c.id).where(
                            recipient_lists.c.workspace_id == ws,
                            recipient_lists.c.scope == scope,
                            recipient_lists.c.list == ("allow" if t == "allow" else "deny"),
                            recipient_lists.c.value == value,
                        )
                    ).scalars()
                )
        if not ids:
            raise NotFound(f"{value} is not on the {d}/{t} list")
        for item in ids:
            try:
                if d == "receive" and t == "block":
                    self.rules.delete_rule(ws, item, actor=actor)
                elif d == "receive":
                    self.rules.delete_contact(ws, item, actor=actor)
                else:
                    self.outbound_admin.remove_entry(principal, item)
            except NotFound:
                continue  # removed by a concurrent call: the outcome is the same


# -- helpers ------------------------------------------------------------------------------


def _check_list(direction: Any, list_type: Any) -> tuple[Direction, ListType]:
    """Raises:
    ValidationFailed: unknown direction or type (``errors`` names each).
    NotSupported: ``reply/allow``.
    """
    errors: list[dict[str, str]] = []
    if direction not in get_args(Direction):
        errors.append(_error("direction", f"must be one of {list(get_args(Direction))}"))
    if list_type not in get_args(ListType):
        errors.append(_error("type", f"must be one of {list(get_args(ListType))}"))
    if errors:
        raise ValidationFailed("unknown list", errors=errors)
    if direction == "reply" and list_type == "allow":
        raise NotSupported("the reply/allow list is not supported by this gateway")
    d: Direction = direction
    t: ListType = list_type
    return d, t


def _check_writer(principal: Principal, agent_id: str | None, *, adding_block: bool) -> None:
    """Raises:
    Forbidden: an agent key, unless it adds a block entry to its own inbox.
    """
    if principal.is_owner:
        return
    if adding_block and agent_id is not None and agent_id == principal.agent_id:
        return
    raise Forbidden(
        "this list change needs an owner key (an agent key may only add block entries "
        "to its own inbox)",
        scope="owner",
    )


def _entry_value(entry: Any) -> tuple[str, str]:
    """``(kind, lower-cased value)``: an address if it holds ``@`` (``@example.com``
    reads as a domain), else a domain.

    Raises:
        ValidationFailed: neither (``errors`` names ``entry``).
    """
    text = entry.strip() if isinstance(entry, str) else ""
    try:
        if "@" in text.removeprefix("@"):
            return contact_value(text, None)
        return contact_value(None, text)
    except ValidationFailed as exc:
        raise ValidationFailed(
            exc.detail,
            errors=[_error("entry", "must be an address (name@example.com) or a domain")],
        ) from None


def _block_value(row: _Row) -> tuple[str, str] | None:
    """``(kind, value)`` of a tagged rule that still has the shape the list made, else
    None (an owner changed it into something else: no longer a list entry)."""
    condition = row.condition
    if not isinstance(condition, dict) or condition.get("match") != "is":
        return None
    if condition.get("case_sensitive") or set(condition) - {"field", "match", "value"}:
        return None
    value = condition.get("value")
    if not isinstance(value, str):
        return None
    field = condition.get("field")
    if field == "from":
        return "address", value.lower()
    if field == "from_domain":
        return "domain", value.lower()
    return None


def _block_entries(
    rows: Sequence[_Row], workspace_id: str, agent_id: str | None, direction: Direction
) -> list[ListEntry]:
    """Entries of the tagged block rules, one per value (the oldest rule's), by value."""
    out: dict[str, ListEntry] = {}
    for row in sorted(rows, key=lambda r: (r.created_at, r.id)):
        shape = _block_value(row)
        if shape is None or shape[1] in out:
            continue
        reason = row.name[len(BLOCK_RULE_TAG) :].removeprefix(":").strip() or None
        out[shape[1]] = ListEntry(
            entry=shape[1],
            workspace_id=workspace_id,
            agent_id=agent_id,
            reason=reason,
            direction=direction,
            list_type="block",
            entry_type="domain" if shape[0] == "domain" else "email",
            created_at=row.created_at,
            read_only=False,
        )
    return [out[key] for key in sorted(out)]


def _decode_token(token: str) -> str:
    """The entry a page token (``encode_cursor(_CURSOR_KIND, entry)``) continues after.

    Raises:
        ValidationFailed: not a token this listing handed out.
    """
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    kind, sep, value = text.partition(":")
    if kind != _CURSOR_KIND or not sep or not value:
        raise ValidationFailed(
            "page_token is not one this listing handed out",
            errors=[_error("page_token", "invalid page token")],
        )
    return value


def _error(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}
