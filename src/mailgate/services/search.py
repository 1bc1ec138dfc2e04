"""Substring search over the messages a caller may see (subject, sender, text body).

Built on :func:`mailgate.services.queries.visible_messages`, so a search can never
return mail outside the caller's workspace or, for an agent key, outside what has
reached its agent: the same isolation as every other read.

The match is a case-insensitive ``LIKE`` (``ILIKE`` on PostgreSQL, ``lower() LIKE
lower()`` on SQLite, which folds ASCII only) with the caller's ``%``, ``_`` and ``\\``
escaped, so they match themselves and a query cannot turn into a pattern. There is no
full-text index: the scan walks the caller's messages newest first on the
``(agent_id, seq)`` index and stops at ``limit`` matches, which is cheap for a
mailbox of an agent's size and never slower than one pass over it.
"""

from __future__ import annotations

from sqlalchemy import or_, select

from mailgate.domain.keys import MESSAGES_READ, Principal
from mailgate.errors import ValidationFailed
from mailgate.services.queries import (
    DEFAULT_LIMIT,
    SUMMARY_COLUMNS,
    MessageSummary,
    check_limit,
    summary_of,
    visible_messages,
)
from mailgate.store.db import Database
from mailgate.store.schema import messages

MAX_QUERY_CHARS = 200
"""Longest query accepted: a search term, not a document."""

_ESCAPE = "\\"


def like_pattern(query: str) -> str:
    """``%query%`` with LIKE's wildcards and the escape character escaped, so every
    character of ``query`` matches only itself (use with ``escape="\\"``)."""
    escaped = (
        query.replace(_ESCAPE, _ESCAPE * 2).replace("%", _ESCAPE + "%").replace("_", _ESCAPE + "_")
    )
    return f"%{escaped}%"


class SearchService:
    """One read transaction per search."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def search(
        self, principal: Principal, query: str, *, limit: int = DEFAULT_LIMIT
    ) -> tuple[MessageSummary, ...]:
        """Messages whose subject, first ``From`` address or text body contains
        ``query`` (case-insensitive), newest first, at most ``limit``.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            ValidationFailed: an empty or over-long query, or ``limit`` out of range.
        """
        principal.require(MESSAGES_READ)
        term = query.strip()
        if not term or len(term) > MAX_QUERY_CHARS:
            raise ValidationFailed(
                f"query must be 1 to {MAX_QUERY_CHARS} characters",
                errors=[
                    {"field": "query", "message": f"must be 1 to {MAX_QUERY_CHARS} characters"}
                ],
            )
        check_limit(limit)
        pattern = like_pattern(term)
        statement = (
            select(*SUMMARY_COLUMNS)
            .where(
                visible_messages(principal),
                or_(
                    messages.c.subject.ilike(pattern, escape=_ESCAPE),
                    messages.c.from_address.ilike(pattern, escape=_ESCAPE),
                    messages.c.text_body.ilike(pattern, escape=_ESCAPE),
                ),
            )
            .order_by(messages.c.seq.desc())
            .limit(limit)
        )
        with self.db.read() as conn:
            rows = conn.execute(statement).all()
        return tuple(summary_of(row, principal) for row in rows)


__all__ = ["MAX_QUERY_CHARS", "SearchService", "like_pattern"]
