"""Push latency: SMTP ``250`` (mail accepted, committed) -> the event at a listener.

``python -m bench.push``: a gateway (``mailgate.testing.gateway.running_gateway``, the
real ``serve``) on a fresh SQLite data dir, one agent with a /v0 websocket (owner
key, subscribed to ``message.received``) and a /v0 webhook to a loopback receiver.
Mail is sent at a steady rate (``--rate`` msg/s for ``--seconds``) over one SMTP
session; each message's clock starts at its ``250`` and stops when the websocket
frame / the webhook POST naming its subject arrives. p50/p99 per surface.

Baseline, measured in the same run: the SMTP round trip itself (``DATA`` sent to
``250`` received) for the same messages. Push latency is on top of an accepted
message, so "how many SMTP acceptances long" is the comparable figure; a bare
websocket echo would measure only the socket, not the gateway's wake-up path.

Caveat: the gateway runs in a thread of this process, so the load generator and the
receivers share its GIL; absolute figures are pessimistic, ratios less so.
"""

from __future__ import annotations

import argparse
import json
import queue
import smtplib
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from mailgate.config import load_settings
from mailgate.runtime import Runtime
from mailgate.store import migrate
from mailgate.store.db import Database
from mailgate.testing import build_message
from mailgate.testing.gateway import running_gateway


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000


def run(rate: float, seconds: float) -> dict[str, Any]:
    arrivals: dict[str, dict[str, float]] = {"websocket": {}, "webhook": {}}
    hook_q: queue.Queue[tuple[str, float]] = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            hook_q.put((json.loads(body)["message"]["subject"], time.perf_counter()))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            data_dir=Path(tmp), webhook_allow_private_targets=True, sender_auth=False
        )
        db = Database(settings.effective_database_url)
        migrate.upgrade(db)
        db.dispose()
        setup = Runtime.build(settings, group_commit=False)
        ws = setup.tenancy.create_workspace("bench")
        agent = setup.tenancy.create_agent(ws.workspace_id, "bench bot")
        setup.close()
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with running_gateway(settings) as gw:
            import httpx

            made = httpx.post(
                f"{gw.http_url}/v0/webhooks",
                json={
                    "url": f"http://127.0.0.1:{server.server_address[1]}/",
                    "event_types": ["message.received"],
                },
                headers={"Authorization": f"Bearer {ws.owner_api_key}"},
            )
            made.raise_for_status()
            sock = connect(f"{gw.ws_url}/v0?api_key={ws.owner_api_key}")
            sock.send(json.dumps({"type": "subscribe", "event_types": ["message.received"]}))
            json.loads(sock.recv(timeout=10))

            def read_ws() -> None:
                try:
                    while True:
                        frame = json.loads(sock.recv())
                        if frame.get("type") == "event":
                            subject = frame["message"]["subject"]
                            arrivals["websocket"][subject] = time.perf_counter()
                except Exception:
                    return

            threading.Thread(target=read_ws, daemon=True).start()
            count = int(rate * seconds)
            messages = [
                (f"bench {i}", build_message(to=agent.address, subject=f"bench {i}"))
                for i in range(count)
            ]
            accepted: dict[str, float] = {}
            smtp_rtt: list[float] = []
            with smtplib.SMTP(gw.smtp_host, gw.smtp_port, timeout=30) as client:
                client.ehlo()
                start = time.perf_counter()
                for i, (subject, raw) in enumerate(messages):
                    due = start + i / rate
                    pause = due - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
                    client.mail("bench@example.com")
                    client.rcpt(agent.address)
                    t0 = time.perf_counter()
                    client.data(raw)
                    accepted[subject] = time.perf_counter()
                    smtp_rtt.append(accepted[subject] - t0)
            deadline = time.monotonic() + 30
            while len(arrivals["webhook"]) < count and time.monotonic() < deadline:
                try:
                    subject, at = hook_q.get(timeout=1)
                    arrivals["webhook"].setdefault(subject, at)
                except queue.Empty:
                    pass
            while len(arrivals["websocket"]) < count and time.monotonic() < deadline:
                time.sleep(0.05)
            sock.close()
        server.shutdown()
        server.server_close()

    result: dict[str, Any] = {"messages": count, "rate": rate}
    result["smtp_250"] = {"p50_ms": _pct(smtp_rtt, 0.5), "p99_ms": _pct(smtp_rtt, 0.99)}
    for surface, seen in arrivals.items():
        lat = [seen[s] - accepted[s] for s in accepted if s in seen]
        result[surface] = {
            "received": len(lat),
            "p50_ms": _pct(lat, 0.5) if lat else None,
            "p99_ms": _pct(lat, 0.99) if lat else None,
            "mean_ms": statistics.fmean(lat) * 1000 if lat else None,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.push", description=__doc__)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    result = run(args.rate, args.seconds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
