"""``mailgate demo``: one message through a running gateway, step by step.

It exercises the real edges, not shortcuts: the agent is created in the configured
database (as the CLI does), the message goes over SMTP to the gateway's port, and the
event is leased and acknowledged over the HTTP API with the agent's own key.
"""

from __future__ import annotations

import secrets
import smtplib
from email.message import EmailMessage
from email.utils import make_msgid

import httpx
from rich.console import Console
from rich.panel import Panel

from mailgate.config import Settings
from mailgate.errors import ServiceUnavailable
from mailgate.runtime import Runtime
from mailgate.store import migrate as migrations


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)


def run_demo(settings: Settings, *, timeout: float, console: Console) -> bool:
    """Returns True when every step succeeded.

    Raises:
        ServiceUnavailable: no gateway answers at the configured HTTP address.
    """
    http_host, http_port = settings.http_address
    smtp_host, smtp_port = settings.smtp_address
    base = f"http://{_connect_host(http_host)}:{http_port}"
    with httpx.Client(base_url=base, timeout=timeout + 5) as http:
        try:
            http.get("/readyz").raise_for_status()
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                f"no ready gateway at {base} ({exc}); start one with `make run`"
            ) from None
        console.print(f"[bold]1.[/bold] gateway ready at {base}")

        runtime = Runtime.build(settings, group_commit=False)
        try:
            migrations.ensure_migrated(runtime.db)
            tag = secrets.token_hex(3)
            ws = runtime.tenancy.create_workspace(f"demo-{tag}")
            agent = runtime.tenancy.create_agent(ws.workspace_id, f"demo-{tag}")
        finally:
            runtime.close()
        console.print(
            f"[bold]2.[/bold] created workspace {ws.workspace_id} and agent "
            f"[cyan]{agent.address}[/cyan]"
        )

        msg = EmailMessage()
        msg["From"] = "Alice Example <alice@example.com>"
        msg["To"] = agent.address
        msg["Subject"] = f"Hello from the mailgate demo {tag}"
        msg["Message-ID"] = make_msgid(domain="demo.example.com")
        msg.set_content("Hi agent,\n\nthis message travelled over real SMTP.\n\n-- Alice\n")
        with smtplib.SMTP(_connect_host(smtp_host), smtp_port, timeout=timeout) as client:
            client.ehlo("demo.example.com")
            refused = client.send_message(msg)
        console.print(
            f"[bold]3.[/bold] sent {msg['Message-ID']} over SMTP to "
            f"{smtp_host}:{smtp_port}: accepted ({len(refused)} refused)"
        )

        auth = {"Authorization": f"Bearer {agent.api_key}"}
        response = http.get(
            "/v1/events",
            params={"consumer": "demo", "limit": 10, "wait": timeout, "lease_seconds": 60},
            headers=auth,
        )
        response.raise_for_status()
        events = response.json()["events"]
        if not events:
            console.print("[red]no event arrived in time[/red]")
            return False
        event = events[0]
        payload = event["payload"]
        console.print(
            f"[bold]4.[/bold] pulled {event['type']} {event['event_id']} "
            f"(delivery {event['delivery_count']}): {payload['subject']!r} "
            f"from {payload['from']['address'] if payload.get('from') else '?'}"
        )

        message = http.get(f"/v1/messages/{payload['message_id']}", headers=auth)
        message.raise_for_status()
        body = message.json()
        console.print(
            Panel(
                (body.get("text") or "").strip(),
                title=f"[bold]5.[/bold] message {body['message_id']} in thread {body['thread_id']}",
            )
        )

        ack = http.post(
            "/v1/events/ack",
            json={"event_ids": [event["event_id"]], "consumer": "demo"},
            headers=auth,
        )
        ack.raise_for_status()
        console.print(f"[bold]6.[/bold] acked: {ack.json()}")

        again = http.get(
            "/v1/events", params={"consumer": "demo", "limit": 10, "wait": 0}, headers=auth
        )
        again.raise_for_status()
        left = again.json()["events"]
        console.print(f"[bold]7.[/bold] pulled again: {len(left)} events left (acked is gone)")
        return not left
