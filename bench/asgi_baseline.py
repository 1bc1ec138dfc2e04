"""The webhook baseline: a bare ASGI endpoint that parses a SendGrid form and stores nothing.

``POST /inbound/sendgrid/<anything>`` reads the multipart form with Starlette's parser
(``await request.form()``, every field and every file read), answers ``200`` with
``{"stored": []}``, and forgets it. ``POST /v1/send`` (the outbound section's
baseline, `bench.outbound`) reads the JSON body with ``json.loads`` and answers ``201``
with ``{"status": "queued"}`` and an id, storing nothing: the HTTP + JSON ceiling
``POST /v1/send`` is measured against. ``GET /`` answers ``200`` (readiness). Nothing
else: no routing framework, no auth, no storage. It runs under uvicorn with the
settings ``mailgate serve`` uses (src/mailgate/server.py: same loop and HTTP
implementation choice, ``access_log=False``, ``lifespan="on"``, INFO logging), so
mailgate / baseline is what mailgate's webhook path (FastAPI, auth, decoding,
building the MIME, ingest, commit) costs on top of receiving and parsing the form.

Starlette's form parser needs ``python-multipart``, which mailgate itself does not
depend on (it decodes forms with `mailgate.domain.providers.decode_form`). Where it
is missing the baseline parses with that decoder instead (the buffered body, one
pass), and ``GET /`` names the parser in use so the report can say which it was.

Run as ``python -m bench.asgi_baseline --port PORT``; it exits on SIGTERM/SIGINT
(uvicorn's handlers) and when its stdin closes, so a killed benchmark never leaves
it behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from starlette import formparsers
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from mailgate.domain.providers import decode_form

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PATH_PREFIX = "/inbound/sendgrid/"
SEND_PATH = "/v1/send"
MAX_PART_SIZE = 32 * 1024 * 1024
"""Starlette refuses a non-file part over 1 MiB by default; SendGrid's ``text`` and
``html`` can be larger, and mailgate accepts them, so the baseline must too."""


PARSER = "starlette" if formparsers.multipart is not None else "mailgate decode_form"
"""Which form parser this process uses (see the module docstring)."""


async def _parse_form(request: Request) -> int:
    """Read every field and file of the form; returns the bytes seen (so nothing is
    optimised away and a truncated parse would show)."""
    seen = 0
    if formparsers.multipart is None:
        decoded = decode_form(await request.body(), request.headers.get("content-type"))
        seen += sum(len(v) for v in decoded.fields.values())
        return seen + sum(len(f[2]) for f in decoded.files.values())
    async with request.form(max_part_size=MAX_PART_SIZE) as form:
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                seen += len(await value.read())
            else:
                seen += len(value)
    return seen


_SENT = itertools.count(1)


async def _accept_send(request: Request) -> Response:
    """Decode the JSON body (every byte read and parsed, as any JSON endpoint must) and
    answer as an accepted send would, with nothing behind it."""
    payload = json.loads(await request.body())
    if not isinstance(payload, dict):
        return JSONResponse({"error": {"code": "validation_failed"}}, status_code=422)
    return JSONResponse({"id": f"out_{next(_SENT):026d}", "status": "queued"}, status_code=201)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The whole application: lifespan, two POST routes, one readiness route."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    request = Request(scope, receive)
    response: Response
    if scope["method"] == "POST" and scope["path"].startswith(PATH_PREFIX):
        await _parse_form(request)
        response = JSONResponse({"stored": []})
    elif scope["method"] == "POST" and scope["path"] == SEND_PATH:
        response = await _accept_send(request)
    elif scope["method"] == "GET" and scope["path"] == "/":
        response = PlainTextResponse(f"ok: {PARSER}")
    else:
        response = PlainTextResponse("not found", status_code=404)
    await response(scope, receive, send)


def _watch_stdin(server: uvicorn.Server) -> None:
    """Ask uvicorn to exit when the parent's end of stdin closes."""
    with contextlib.suppress(Exception):
        sys.stdin.buffer.read()
    server.should_exit = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.asgi_baseline", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grace", type=int, default=2, help="graceful shutdown seconds")
    args = parser.parse_args(argv)
    # The same uvicorn.Config arguments as mailgate.server.serve (log level: the
    # INFO default of MAILGATE_LOG_LEVEL, which the benchmark leaves unset).
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=args.grace or None,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    threading.Thread(target=_watch_stdin, args=(server,), daemon=True).start()
    asyncio.run(server.serve())


if __name__ == "__main__":
    main()
