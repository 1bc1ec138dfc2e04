"""What agents read, over the real app on SQLite and PostgreSQL: the new text and
quote-free HTML of a message, attachment text, the budget, validation and isolation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mailgate.config import Settings, load_settings
from mailgate.domain.keys import Principal
from mailgate.errors import NotFound, ValidationFailed
from mailgate.runtime import Runtime
from mailgate.services.extraction import ExtractionService
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, deliver, problem_code
from tests.unit.test_extract import DOCX, PDF, make_docx, make_pdf

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


REPLY_TEXT = (
    "Yes, Thursday works. I attached the signed contract.\n\n"
    "Best regards,\nAnn\n\n"
    "On Mon, Jan 5, 2026 at 9:00 AM Support Bot <bot@agents.localhost> wrote:\n"
    "> Could you confirm the date and send the contract?\n"
    "> We have a long history here that the agent has already read.\n"
)
REPLY_HTML = (
    '<div dir="ltr">Yes, <b>Thursday</b> works. I attached the signed contract.'
    '<div class="gmail_signature">Ann</div></div><div class="gmail_quote">'
    '<div class="gmail_attr">On Mon, Jan 5, 2026, Support Bot wrote:</div>'
    "<blockquote>Could you confirm the date and send the contract?</blockquote></div>"
    '<script>alert("x")</script>'
)
NEW_TEXT = "Yes, Thursday works. I attached the signed contract."
CONTRACT = ["Contract between Acme and Ann", "Signed on Thursday"]


def deliver_reply(runtime: Runtime, agent: AgentHandle) -> tuple[str, dict[str, str]]:
    """A reply quoting history, with PDF, DOCX and image attachments; returns the
    message id and the attachment ids by file name."""
    stored = deliver(
        runtime,
        agent,
        subject="Re: contract",
        body=REPLY_TEXT,
        html=REPLY_HTML,
        attachments=[
            ("contract.pdf", PDF, make_pdf(CONTRACT)),
            ("notes.docx", DOCX, make_docx(["Meeting notes", "Bring the contract."])),
            ("photo.png", "image/png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
        ],
    )
    found = runtime.queries.get_message(agent_principal(runtime, agent), stored.message_id)
    return stored.message_id, {a.filename or "": a.attachment_id for a in found.attachments}


def agent_principal(runtime: Runtime, agent: AgentHandle) -> Principal:
    return runtime.tenancy.authenticate(agent.agent_key)


async def get(client: httpx.AsyncClient, path: str, key: str, **params: Any) -> httpx.Response:
    return await client.get(path, params=params, headers=auth(key))


# -- message detail -------------------------------------------------------------------


async def test_message_detail_carries_the_new_text_and_quote_free_html(
    runtime: Runtime, agent: AgentHandle
) -> None:
    message_id, _ = deliver_reply(runtime, agent)
    async with api_client(runtime) as client:
        response = await get(client, f"/v1/messages/{message_id}", agent.agent_key)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["extracted_text"] == NEW_TEXT
    assert body["extracted_truncated"] is False
    html = body["extracted_html"]
    assert "<b>Thursday</b>" in html
    for gone in ("Could you confirm", "Support Bot", "Ann</div>", "script", "alert"):
        assert gone not in html
    assert body["text"] == REPLY_TEXT  # the full body is still there


async def test_max_chars_cuts_the_extracted_text_and_says_so(
    runtime: Runtime, agent: AgentHandle
) -> None:
    message_id, _ = deliver_reply(runtime, agent)
    async with api_client(runtime) as client:
        response = await get(client, f"/v1/messages/{message_id}", agent.agent_key, max_chars=9)
    body = response.json()
    assert body["extracted_text"] == NEW_TEXT[:9]
    assert body["extracted_truncated"] is True
    assert len(body["extracted_html"]) <= 9


async def test_a_message_without_html_has_no_extracted_html(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent, body="Just text.\n\n-- \nsig\n")
    async with api_client(runtime) as client:
        body = (await get(client, f"/v1/messages/{stored.message_id}", agent.agent_key)).json()
    assert (body["extracted_text"], body["extracted_html"]) == ("Just text.", None)


# -- attachment text --------------------------------------------------------------------


async def test_attachment_text_reads_pdf_and_docx_and_describes_an_image(
    runtime: Runtime, agent: AgentHandle
) -> None:
    message_id, ids = deliver_reply(runtime, agent)
    base = f"/v1/messages/{message_id}/attachments"
    async with api_client(runtime) as client:
        pdf = (await get(client, f"{base}/{ids['contract.pdf']}/text", agent.agent_key)).json()
        word = (await get(client, f"{base}/{ids['notes.docx']}/text", agent.agent_key)).json()
        image = (await get(client, f"{base}/{ids['photo.png']}/text", agent.agent_key)).json()
    assert pdf == {
        "attachment_id": ids["contract.pdf"],
        "content_type": PDF,
        "filename": "contract.pdf",
        "extracted": True,
        "text": "\n\n".join(CONTRACT),
        "truncated": False,
        "reason": None,
    }
    assert (word["text"], word["extracted"], word["filename"]) == (
        "Meeting notes\nBring the contract.",
        True,
        "notes.docx",
    )
    assert (image["text"], image["extracted"], image["reason"]) == (
        None,
        False,
        "unsupported_type",
    )


async def test_attachment_text_is_cut_at_max_chars(runtime: Runtime, agent: AgentHandle) -> None:
    message_id, ids = deliver_reply(runtime, agent)
    base = f"/v1/messages/{message_id}/attachments"
    async with api_client(runtime) as client:
        pdf = (
            await get(client, f"{base}/{ids['contract.pdf']}/text", agent.agent_key, max_chars=8)
        ).json()
        word = (
            await get(client, f"{base}/{ids['notes.docx']}/text", agent.agent_key, max_chars=7)
        ).json()
    assert (pdf["text"], pdf["truncated"]) == ("Contract", True)
    assert (word["text"], word["truncated"]) == ("Meeting", True)


# -- isolation and validation ---------------------------------------------------------------


async def test_another_agents_key_gets_not_found_on_both_routes(
    runtime: Runtime, agent: AgentHandle
) -> None:
    message_id, ids = deliver_reply(runtime, agent)
    neighbour = runtime.tenancy.create_agent(agent.workspace_id, "neighbour").api_key
    stranger = make_agent(runtime, "stranger", workspace="elsewhere").agent_key
    paths = [
        f"/v1/messages/{message_id}",
        f"/v1/messages/{message_id}/attachments/{ids['contract.pdf']}/text",
    ]
    async with api_client(runtime) as client:
        for key in (neighbour, stranger):
            for path in paths:
                response = await get(client, path, key)
                assert response.status_code == 404, (path, response.text)
                assert problem_code(response) == "not_found"
        for path in paths:  # the owner and the agent itself do see them
            assert (await get(client, path, agent.owner_key)).status_code == 200
            assert (await get(client, path, agent.agent_key)).status_code == 200
        # An attachment id under another message of the same agent is not found either.
        other = deliver(runtime, agent, body="other").message_id
        response = await get(
            client, f"/v1/messages/{other}/attachments/{ids['contract.pdf']}/text", agent.agent_key
        )
        assert response.status_code == 404


@pytest.mark.parametrize("bad", ["0", "-1", "many"])
async def test_a_bad_max_chars_is_validation_failed_on_both_routes(
    runtime: Runtime, agent: AgentHandle, bad: str
) -> None:
    message_id, ids = deliver_reply(runtime, agent)
    async with api_client(runtime) as client:
        for path in (
            f"/v1/messages/{message_id}",
            f"/v1/messages/{message_id}/attachments/{ids['contract.pdf']}/text",
        ):
            response = await get(client, path, agent.agent_key, max_chars=bad)
            assert response.status_code == 422, response.text
            assert problem_code(response) == "validation_failed"
            assert "max_chars" in response.text


# -- the configured budget ----------------------------------------------------------------


@pytest.fixture
def small_budget(tmp_path: Path, database_url: str) -> Iterator[Runtime]:
    settings = load_settings(
        data_dir=tmp_path,
        database_url=database_url,
        extract_max_chars=20,
        extract_max_attachment_bytes=300,
    )
    runtime = Runtime.build(settings)
    yield runtime
    runtime.close()


async def test_a_caller_may_ask_for_less_than_the_configured_budget_never_more(
    small_budget: Runtime,
) -> None:
    agent = make_agent(small_budget)
    message_id, ids = deliver_reply(small_budget, agent)
    async with api_client(small_budget) as client:
        capped = (
            await get(client, f"/v1/messages/{message_id}", agent.agent_key, max_chars=10_000)
        ).json()
        default = (await get(client, f"/v1/messages/{message_id}", agent.agent_key)).json()
        fewer = (
            await get(client, f"/v1/messages/{message_id}", agent.agent_key, max_chars=3)
        ).json()
        over_size = (
            await get(
                client,
                f"/v1/messages/{message_id}/attachments/{ids['contract.pdf']}/text",
                agent.agent_key,
            )
        ).json()
    assert capped["extracted_text"] == default["extracted_text"] == NEW_TEXT[:20]
    assert capped["extracted_truncated"] is True
    assert fewer["extracted_text"] == NEW_TEXT[:3]
    # The PDF is larger than extract_max_attachment_bytes: described, not read.
    assert (over_size["text"], over_size["extracted"], over_size["reason"]) == (
        None,
        False,
        "too_large",
    )


def test_the_service_budget_and_isolation(runtime: Runtime, settings: Settings) -> None:
    agent = make_agent(runtime)
    message_id, ids = deliver_reply(runtime, agent)
    service = ExtractionService(runtime.queries, settings)
    assert service.budget(None) == settings.extract_max_chars
    assert service.budget(10**9) == settings.extract_max_chars
    assert service.budget(5) == 5
    with pytest.raises(ValidationFailed):
        service.budget(0)
    principal = agent_principal(runtime, agent)
    detail = runtime.queries.get_message(principal, message_id)
    text, html = service.message_extract(detail, max_chars=100)
    assert text.text == NEW_TEXT and html.text is not None and "Thursday" in html.text
    found = service.attachment_extract(principal, message_id, ids["notes.docx"])
    assert found.text == "Meeting notes\nBring the contract." and found.filename == "notes.docx"
    neighbour = runtime.tenancy.create_agent(agent.workspace_id, "neighbour").api_key
    with pytest.raises(NotFound):
        service.attachment_extract(
            runtime.tenancy.authenticate(neighbour), message_id, ids["notes.docx"]
        )
