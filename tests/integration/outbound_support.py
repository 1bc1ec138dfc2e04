"""Helpers for outbound tests: open an agent's tier, send through the real API, run
the delivery worker's rounds, and read what happened."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from sqlalchemy import func, select

from mailgate.clock import Clock
from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.services.delivery import Outcome
from mailgate.services.mailbox import Operator
from mailgate.store.schema import outbound


@asynccontextmanager
async def outbound_runtime(
    settings: Settings, *, clock: Clock | None = None, **update: Any
) -> AsyncIterator[Runtime]:
    """A runtime on the test's database with ``update`` applied to its settings; its
    transport connections are closed on the loop that opened them."""
    runtime = Runtime.build(settings.model_copy(update=update), clock=clock)
    try:
        yield runtime
        await runtime.aclose_outbound()
    finally:
        runtime.close()


def set_tier(runtime: Runtime, agent_id: str, tier: str) -> None:
    runtime.outbound_admin.set_tier(Operator(), agent_id, tier)


def key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


async def send(
    client: httpx.AsyncClient, api_key: str, body: dict[str, Any], *, idem: str | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {api_key}", **key()}
    if idem is not None:
        headers["Idempotency-Key"] = idem
    return await client.post("/v1/send", json=body, headers=headers)


async def reply(
    client: httpx.AsyncClient, api_key: str, body: dict[str, Any], *, idem: str | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {api_key}", **key()}
    if idem is not None:
        headers["Idempotency-Key"] = idem
    return await client.post("/v1/reply", json=body, headers=headers)


async def drain(runtime: Runtime, *, rounds: int = 20) -> list[Outcome]:
    """Run delivery rounds until nothing is due (bounded)."""
    done: list[Outcome] = []
    for _ in range(rounds):
        outcomes = await runtime.delivery.run_once(50)
        if not outcomes:
            break
        done.extend(outcomes)
    return done


def count_outbound(runtime: Runtime, **where: Any) -> int:
    query = select(func.count()).select_from(outbound)
    for name, value in where.items():
        query = query.where(outbound.c[name] == value)
    with runtime.db.read() as conn:
        return int(conn.execute(query).scalar_one())
