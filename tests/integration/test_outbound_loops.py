"""The loop guard between two agents on one gateway (local delivery, no transport):
RFC 3834 marking (the default) stops an automatic exchange before it starts; with
marking off, the per-thread cap stops it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.store.schema import messages
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client
from tests.integration.outbound_support import drain, reply, send, set_tier

pytestmark = pytest.mark.anyio

CAP = 3


def _latest_inbound(runtime: Runtime, agent: AgentHandle) -> str:
    with runtime.db.read() as conn:
        return str(
            conn.execute(
                select(messages.c.id)
                .where(messages.c.agent_id == agent.agent_id, messages.c.direction == "inbound")
                .order_by(messages.c.seq.desc())
                .limit(1)
            ).scalar_one()
        )


def _build(settings: Settings, *, marked: bool) -> Runtime:
    return Runtime.build(
        settings.model_copy(update={"loop_thread_cap": CAP, "outbound_auto_submitted": marked})
    )


@pytest.fixture(params=[True, False], ids=["marked", "unmarked"])
def loop_runtime(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Runtime]:
    rt = _build(settings, marked=request.param)
    yield rt
    rt.close()


async def test_two_agents_replying_to_each_other_automatically_are_stopped(
    loop_runtime: Runtime,
) -> None:
    marked = loop_runtime.settings.outbound_auto_submitted
    alpha = make_agent(loop_runtime, "alpha", workspace="one")
    beta = make_agent(loop_runtime, "beta", workspace="two")
    set_tier(loop_runtime, alpha.agent_id, "open")
    sent: dict[str, int] = {alpha.agent_id: 0, beta.agent_id: 0}
    blocked = None
    async with api_client(loop_runtime) as client:
        first = await send(
            client, alpha.agent_key, {"to": [beta.address], "subject": "Ping", "text": "ping"}
        )
        assert first.json()["status"] == "queued"
        await drain(loop_runtime)
        turn = [beta, alpha]
        for step in range(4 * CAP):
            who = turn[step % 2]
            response = await reply(
                client,
                who.agent_key,
                {"message_id": _latest_inbound(loop_runtime, who), "text": f"pong {step}"},
            )
            body = response.json()
            if body["status"] == "blocked":
                blocked = (who, body)
                break
            sent[who.agent_id] += 1
            await drain(loop_runtime)
    assert blocked is not None, "the exchange never stopped"
    who, body = blocked
    assert body["decision"]["codes"] == ["loop_guard"]
    if marked:
        # Agent mail says Auto-Submitted (auto-generated, auto-replied): beta may not
        # answer alpha automatically at all.
        assert sent == {alpha.agent_id: 0, beta.agent_id: 0}
        assert who is beta
        assert "Auto-Submitted: auto-generated" in " ".join(body["decision"]["reasons"])
    else:
        assert max(sent.values()) == CAP
        assert "cap" in " ".join(body["decision"]["reasons"])
