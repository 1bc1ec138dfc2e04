"""API keys and scopes, as pure logic.

A key reads ``mg_<key id>_<secret>``. Only the SHA-256 of the secret is stored: the
secret has 256 bits of entropy, so a fast hash is as safe as a slow one and keeps
authentication off the hot path. The key id lets the gateway find the row without
scanning, and the ``mg_`` prefix lets secret scanners recognise a leaked key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Final

from mailgate.errors import Forbidden, Unauthorized

MESSAGES_READ: Final = "messages:read"
EVENTS_READ: Final = "events:read"
EVENTS_ACK: Final = "events:ack"
MESSAGES_REPLY: Final = "messages:reply"
MESSAGES_SEND: Final = "messages:send"
MESSAGES_WRITE: Final = "messages:write"
"""Organise the agent's own mailbox: trash and restore (soft, reversible, audited)."""
AGENT_SCOPES: Final = (
    MESSAGES_READ,
    EVENTS_READ,
    EVENTS_ACK,
    MESSAGES_REPLY,
    MESSAGES_SEND,
    MESSAGES_WRITE,
)

_KEY_PREFIX = "mg"


@dataclass(frozen=True, slots=True)
class NewSecret:
    key_id: str
    token: str  # shown once
    secret_hash: str


def mint(key_id: str) -> NewSecret:
    """A fresh token for ``key_id`` (``key_<suffix>``) and the hash to store."""
    secret = secrets.token_urlsafe(32)
    suffix = key_id.removeprefix("key_")
    return NewSecret(key_id, f"{_KEY_PREFIX}_{suffix}_{secret}", hash_secret(secret))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str]:
    """``(key id, secret)`` of a presented token.

    Raises:
        Unauthorized: the token is not shaped like one of ours.
    """
    prefix, _, rest = token.partition("_")
    suffix, _, secret = rest.partition("_")
    if prefix != _KEY_PREFIX or not suffix or not secret:
        raise Unauthorized("malformed API key")
    return f"key_{suffix}", secret


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def validate_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Raises:
    ValueError: a scope is not one of :data:`AGENT_SCOPES`.
    """
    unknown = sorted(set(scopes) - set(AGENT_SCOPES))
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(unknown)}")
    return tuple(s for s in AGENT_SCOPES if s in scopes)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an owner (whole workspace) or an agent (one agent, scoped)."""

    workspace_id: str
    key_id: str
    kind: str  # "owner" | "agent"
    agent_id: str | None = None
    owner_id: str | None = None
    scopes: tuple[str, ...] = ()

    @property
    def is_owner(self) -> bool:
        return self.kind == "owner"

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"owner:{self.owner_id}" if self.is_owner else f"agent:{self.agent_id}"

    def require(self, scope: str) -> None:
        """Owners hold every scope in their workspace.

        Raises:
            Forbidden: an agent key without ``scope``.
        """
        if not self.is_owner and scope not in self.scopes:
            raise Forbidden(f"this key lacks the {scope!r} scope", scope=scope)

    def require_owner(self) -> None:
        """Raises:
        Forbidden: the caller is an agent.
        """
        if not self.is_owner:
            raise Forbidden("this operation needs an owner key", scope="owner")

    def can_see_agent(self, agent_id: str) -> bool:
        return self.is_owner or self.agent_id == agent_id
