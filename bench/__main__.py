"""``python -m bench`` (``make bench``): run the SMTP matrix, the rules cost, the webhook
comparison, the outbound section and the RSS check, print tables.

Everything is bounded: each cell has a timeout, the whole run has a cap, and every
server subprocess is stopped in a ``finally`` (Ctrl-C and SIGTERM included). Server
logs and databases live in a temporary folder that is removed afterwards, or kept
(and named) when something failed or ``--keep`` was given.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import report
from bench.outbound import OUTBOUND_FULL, OUTBOUND_QUICK, OutboundResult, run_outbound
from bench.procs import BenchError
from bench.push import run as run_push
from bench.rss import RssResult
from bench.rss import measure as measure_rss
from bench.rules import RULES_FULL, RULES_QUICK, RulesResult, run_rules
from bench.runner import FULL, QUICK, run_matrix
from bench.webhook import WEBHOOK_FULL, WEBHOOK_QUICK, WebhookResult, run_webhook

RESULTS = Path(__file__).resolve().parent / "results"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke test")
    parser.add_argument("--repeats", type=int, help="runs per cell (median is reported)")
    parser.add_argument(
        "--sqlite-mode",
        choices=["thread", "inline"],
        default="thread",
        help="SQLite sink commits on a writer thread (default) or inside its event loop",
    )
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS check")
    parser.add_argument(
        "--no-rules", action="store_true", help="skip the 1,000-rules cost comparison"
    )
    parser.add_argument(
        "--no-webhook", action="store_true", help="skip the SendGrid webhook comparison"
    )
    parser.add_argument(
        "--no-outbound",
        action="store_true",
        help="skip the outbound section (POST /v1/send accept rate, send→deliver over SMTP)",
    )
    parser.add_argument(
        "--no-push",
        action="store_true",
        help="skip push latency (SMTP 250 -> websocket frame / webhook POST)",
    )
    parser.add_argument(
        "--webhook-client",
        choices=["raw", "httpx"],
        default="raw",
        help="webhook load generator: raw asyncio HTTP/1.1 (default) or httpx.AsyncClient",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="where to write results (default bench/results/latest.json, quick.json)",
    )
    parser.add_argument("--time-cap", type=float, help="abort after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep server logs and databases")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace, console: Console, workdir: Path) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    plan = QUICK if args.quick else FULL
    plan = dataclasses.replace(plan, sqlite_mode=args.sqlite_mode)
    if args.repeats:
        plan = dataclasses.replace(plan, repeats=args.repeats)
    if args.no_rss:
        plan = dataclasses.replace(plan, rss_limit=None)
    cap = args.time_cap or (180.0 if args.quick else 600.0)
    info = report.machine(workdir)
    started = time.perf_counter()

    progress = Console(stderr=True, log_path=False).log  # stdout stays the report alone

    rules_plan = RULES_QUICK if args.quick else RULES_FULL
    webhook_plan = WEBHOOK_QUICK if args.quick else WEBHOOK_FULL
    webhook_plan = dataclasses.replace(webhook_plan, client=args.webhook_client)
    outbound_plan = OUTBOUND_QUICK if args.quick else OUTBOUND_FULL
    if args.repeats:
        rules_plan = dataclasses.replace(rules_plan, repeats=args.repeats)
        webhook_plan = dataclasses.replace(webhook_plan, repeats=args.repeats)
        outbound_plan = dataclasses.replace(outbound_plan, repeats=args.repeats)

    async with asyncio.timeout(cap):
        result = await run_matrix(plan, workdir, progress)
        rules: RulesResult | None = None
        if not args.no_rules:
            rules = await run_rules(rules_plan, workdir, progress)
        webhook: WebhookResult | None = None
        if not args.no_webhook:
            webhook = await run_webhook(webhook_plan, workdir, progress)
        outbound: OutboundResult | None = None
        if not args.no_outbound:
            outbound = await run_outbound(outbound_plan, workdir, progress)
        push: dict[str, Any] | None = None
        if not args.no_push:
            progress("measuring push latency (websocket, webhook)")
            rate, seconds = (10.0, 3.0) if args.quick else (20.0, 10.0)
            push = await asyncio.to_thread(run_push, rate, seconds)
        rss: RssResult | None = None
        if plan.rss_limit is not None:
            progress("measuring peak RSS")
            rss = await measure_rss(workdir, plan.rss_limit)
    wall = time.perf_counter() - started
    report.render(console, info, result, rss, wall, rules=rules, webhook=webhook, outbound=outbound)
    if push is not None:
        _render_push(console, push)
    out = args.json or RESULTS / ("quick.json" if args.quick else "latest.json")
    document = report.to_json(
        info, result, rss, wall, rules=rules, webhook=webhook, outbound=outbound
    )
    if push is not None:
        document["push"] = push
    report.write_json(out, document)
    console.print(f"results written to {out}")
    _, ok = report.verdict(result)
    missed = (
        ok is False
        or (rss is not None and not rss.passed)
        or (rules is not None and rules.passed() is False)
        or (outbound is not None and outbound.passed() is False)
    )
    return 1 if args.strict and missed else 0


def _render_push(console: Console, push: dict[str, Any]) -> None:
    """Push latency next to its same-run baseline, the SMTP round trip to ``250``."""
    base = push["smtp_250"]
    console.print(
        f"\n[bold]Push latency[/bold] ({push['messages']} messages at {push['rate']:.0f}/s; "
        f"baseline SMTP DATA→250 p50 {base['p50_ms']:.1f} ms, p99 {base['p99_ms']:.1f} ms)"
    )
    for surface in ("websocket", "webhook"):
        cell = push[surface]
        if cell["p50_ms"] is None:
            console.print(f"  {surface}: nothing received")
            continue
        p50, p99 = cell["p50_ms"], cell["p99_ms"]
        console.print(
            f"  250→{surface}: p50 {p50:.1f} ms ({p50 / base['p50_ms']:.2f}x), "
            f"p99 {p99:.1f} ms ({p99 / base['p99_ms']:.2f}x), "
            f"{cell['received']}/{push['messages']} received"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    console = Console() if sys.stdout.isatty() else Console(width=150)
    workdir = Path(tempfile.mkdtemp(prefix="mailgate-bench-"))
    keep = args.keep
    try:
        return asyncio.run(_main(args, console, workdir))
    except (BenchError, TimeoutError) as exc:
        keep = True
        console.print(f"[red]bench failed[/red]: {exc or 'time cap reached'}")
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM cancelling _main
        keep = True
        console.print("[yellow]interrupted[/yellow]")
        return 130
    finally:
        if keep:
            console.print(f"server logs and databases kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
