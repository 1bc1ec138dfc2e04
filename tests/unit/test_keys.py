"""API key format, hashing and scopes (pure)."""

from __future__ import annotations

import pytest

from mailgate.domain import keys
from mailgate.errors import Forbidden, Unauthorized


def test_a_minted_key_splits_back_to_its_id_and_matches_only_its_hash() -> None:
    minted = keys.mint("key_abc123")
    key_id, secret = keys.split_token(minted.token)
    assert key_id == "key_abc123"
    assert keys.secret_matches(secret, minted.secret_hash)
    assert not keys.secret_matches(secret + "x", minted.secret_hash)
    assert secret not in minted.secret_hash


@pytest.mark.parametrize("token", ["", "mg_", "mg_abc", "xx_abc_def", "Bearer mg_a_b"])
def test_malformed_tokens_are_unauthorized(token: str) -> None:
    with pytest.raises(Unauthorized) as info:
        keys.split_token(token)
    assert info.value.code == "invalid_api_key"


def test_an_agent_principal_needs_each_scope_and_an_owner_has_all() -> None:
    agent = keys.Principal("ws", "key", "agent", agent_id="a1", scopes=(keys.MESSAGES_READ,))
    owner = keys.Principal("ws", "key", "owner", owner_id="o1")
    agent.require(keys.MESSAGES_READ)
    owner.require(keys.EVENTS_ACK)
    with pytest.raises(Forbidden) as info:
        agent.require(keys.EVENTS_ACK)
    assert info.value.code == "missing_scope"
    assert agent.can_see_agent("a1") and not agent.can_see_agent("a2")
    assert owner.can_see_agent("anything")


def test_unknown_scopes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown scopes"):
        keys.validate_scopes(["messages:read", "admin"])
