"""Tables for humans, JSON for tools.

Ratios lead, absolute figures follow: messages/s drift with the machine and its
neighbours, while mailgate / baseline measured seconds apart on the same cores is
what a change to mailgate can move.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.outbound import SEND_CONCURRENCY, OutboundResult, RelayCell, SendCell
from bench.outbound import TARGET_RATIO as OUTBOUND_TARGET
from bench.rss import TARGET_MULTIPLE, RssResult
from bench.rules import TARGET_RATIO as RULES_TARGET
from bench.rules import RulesResult
from bench.runner import TARGET_CELL, TARGET_RATIO, Cell, RunResult
from bench.webhook import HEADLINE_CONCURRENCY, HttpCell, WebhookResult

MIB = 1024 * 1024
NOISY_LOAD = 0.25  # cores used by unrelated processes before a cell counts as noisy


def filesystem_of(path: Path) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts), or "unknown".

    It matters: on tmpfs an fsync is free and every durable figure is flattered.
    """
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) < 3 or len(parts[1]) < len(best):
            continue
        if (target + "/").startswith(parts[1].rstrip("/") + "/"):
            best, kind = parts[1], parts[2]
    return kind


def machine(workdir: Path) -> dict[str, Any]:
    """What the figures were measured on (printed with them, stored with them)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "kernel": platform.release(),
        "sqlite": sqlite3.sqlite_version,
        "aiosmtpd": version("aiosmtpd"),
        "aiosmtplib": version("aiosmtplib"),
        "mailgate": version("mailgate"),
        "data_fs": filesystem_of(workdir),
    }


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def verdict(result: RunResult) -> tuple[float | None, bool | None]:
    """mailgate / discard in the target cell, and whether it meets the target."""
    label, conc = TARGET_CELL

    def rate(c: Cell) -> float:
        return c.rate

    ratio = _ratio(
        result.median("mailgate", label, conc, rate), result.median("discard", label, conc, rate)
    )
    return ratio, (None if ratio is None else ratio >= TARGET_RATIO)


def render(
    console: Console,
    info: dict[str, Any],
    result: RunResult,
    rss: RssResult | None,
    wall_seconds: float,
    *,
    rules: RulesResult | None = None,
    webhook: WebhookResult | None = None,
    outbound: OutboundResult | None = None,
) -> None:
    plan = result.plan
    console.print(
        f"[bold]machine[/bold] {info['cpus']} CPUs ({info['cpu_model'] or 'unknown'}), "
        f"Python {info['python']}, SQLite {info['sqlite']}, aiosmtpd {info['aiosmtpd']}, "
        f"aiosmtplib {info['aiosmtplib']}, kernel {info['kernel']}, "
        f"data on {info['data_fs']}"
    )
    if info["data_fs"] in ("tmpfs", "ramfs"):
        console.print("[yellow]note[/yellow]: data on a RAM filesystem: fsync is free here")
    console.print(
        "Absolute msg/s drift between runs and machines; the ratios, measured seconds "
        "apart on the same cores, are what matter."
    )

    def rate(c: Cell) -> float:
        return c.rate

    table = Table(
        title=f"SMTP ingest, messages/s end to end (median of {plan.repeats})",
        caption="mailgate: until accepted, stored and every message.received visible "
        + ("(pulled and acked over HTTP)" if result.visibility == "http" else "(events rows)")
        + "; sinks: until the last 250",
    )
    for name in (
        "size",
        "conc.",
        "discard",
        "sqlite",
        "mailgate",
        "mg/discard",
        "mg/sqlite",
        "target",
    ):
        table.add_column(name, justify="left" if name in ("size", "target") else "right")
    for label, _ in plan.sizes:
        for conc in plan.concurrency:
            d = result.median("discard", label, conc, rate)
            s = result.median("sqlite", label, conc, rate)
            m = result.median("mailgate", label, conc, rate)
            target = ""
            if (label, conc) == TARGET_CELL:
                ratio = _ratio(m, d)
                ok = ratio is not None and ratio >= TARGET_RATIO
                target = f"≥ {TARGET_RATIO:.2f}x discard: " + (
                    "[green]PASS[/green]" if ok else "[red]FAIL[/red]"
                )
            table.add_row(
                label,
                str(conc),
                _fmt(d),
                _fmt(s),
                _fmt(m),
                _fmt(_ratio(m, d), ".2f") + "x",
                _fmt(_ratio(m, s), ".2f") + "x",
                target,
            )
    console.print(table)

    detail = Table(
        title="Where the time goes (medians)",
        caption="CPU/msg: user+sys of the server process (all threads) per message. "
        "250s: mailgate msg/s counting only until the last 250; drain: seconds more until "
        "every event was pulled. client: load generator CPU against the discard sink "
        "(1.00 = one core). other: cores used by unrelated processes meanwhile.",
    )
    columns = (
        "size", "conc.", "µs CPU/msg discard", "sqlite", "mailgate",
        "mailgate 250s/s", "drain s", "p50 ms", "p99 ms", "client", "other max",
    )  # fmt: skip
    for name in columns:
        detail.add_column(name, justify="left" if name == "size" else "right")
    for label, _ in plan.sizes:
        for conc in plan.concurrency:

            def med(target: str, metric: Callable[[Cell], float]) -> float | None:
                return result.median(target, label, conc, metric)  # noqa: B023 - used at once

            others = [
                c.other_load for c in result.cells if (c.size_label, c.concurrency) == (label, conc)
            ]
            detail.add_row(
                label,
                str(conc),
                _fmt(med("discard", lambda c: c.cpu_per_message_us)),
                _fmt(med("sqlite", lambda c: c.cpu_per_message_us)),
                _fmt(med("mailgate", lambda c: c.cpu_per_message_us)),
                _fmt(med("mailgate", lambda c: c.send_rate)),
                _fmt(med("mailgate", lambda c: c.elapsed - c.send_elapsed), ".2f"),
                _fmt(med("mailgate", lambda c: c.latency_p50 * 1e3), ".1f"),
                _fmt(med("mailgate", lambda c: c.latency_p99 * 1e3), ".1f"),
                _fmt(med("discard", lambda c: c.client_cpu / c.send_elapsed), ".2f"),
                _fmt(max(others) if others else None, ".2f"),
            )
    console.print(detail)
    noisy = [c for c in result.cells if c.other_load > NOISY_LOAD]
    if noisy:
        worst = max(c.other_load for c in noisy)
        console.print(
            f"[yellow]note[/yellow]: other processes used more than {NOISY_LOAD:.2f} of a "
            f"core in {len(noisy)} of {len(result.cells)} measurements (up to {worst:.2f}); "
            "absolute figures are depressed, ratios less so (measured back to back)."
        )

    if rules is not None:
        render_rules(console, rules)
    if webhook is not None:
        render_webhook(console, webhook)
    if outbound is not None:
        render_outbound(console, outbound)

    if rss is not None:
        ok = rss.passed
        console.print(
            f"[bold]Peak RSS[/bold] ingesting one {rss.message_size / MIB:.2f} MiB message "
            f"(SIZE limit {rss.limit / MIB:.0f} MiB): idle {rss.idle_rss / MIB:.1f} MiB, "
            f"peak {max(rss.peak_after_250, rss.peak_after_visible) / MIB:.1f} MiB "
            f"(at 250: {rss.peak_after_250 / MIB:.1f}), "
            f"+{rss.multiple:.2f}x the message size above idle "
            f"(target ≤ {TARGET_MULTIPLE:.0f}x: "
            + ("[green]PASS[/green]" if ok else "[red]FAIL[/red]")
            + f"); ingest took {rss.ingest_seconds:.2f} s"
            + (
                ""
                if rss.peak_was_reset
                else " [yellow](VmHWM not resettable: peak since start)[/yellow]"
            )
        )
    console.print(f"bench took {wall_seconds:.0f} s")


def _pass(ok: bool | None) -> str:
    return "-" if ok is None else ("[green]PASS[/green]" if ok else "[red]FAIL[/red]")


def render_rules(console: Console, rules: RulesResult) -> None:
    """The rules-cost table: the same gateway with and without the rules."""
    plan = rules.plan
    bare, ruled = rules.names

    def med(target: str, metric: Callable[[Cell], float]) -> float | None:
        return rules.median(target, metric)

    paths = ", ".join(f"{n} {path}" for path, n in rules.paths.items())
    checked = (
        f"stored decisions report {rules.checked} checked"
        if rules.checked is not None
        else "stored decisions carry no rule count"
    )
    pairs = ", ".join(f"{r:.2f}" for r in rules.pair_ratios())
    table = Table(
        title=f"Rules cost: SMTP ingest, {plan.size[0]} at c={plan.concurrency}, "
        f"{plan.rules:,} inbound rules on the agent (none matching) vs none "
        f"(median of {plan.repeats})",
        caption=f"msgs/s end to end as in the matrix (until every message.received was "
        f"pulled). Ratio within each repeat: {pairs}. Extra server CPU with the rules: "
        f"{_fmt(rules.cpu_cost_us())} µs per message (median of per-repeat differences). "
        f"Compiled paths of the {plan.rules:,} rules: {paths}; {checked}.",
    )
    for name in ("agent rules", "msgs/s", "250s/s", "µs CPU/msg", "p50 ms", "p99 ms", "ratio"):
        table.add_column(name, justify="right")
    table.add_column("target")
    base_rate = med(bare, lambda c: c.rate)
    for name, count in ((bare, 0), (ruled, plan.rules)):
        rate = med(name, lambda c: c.rate)
        ratio = _ratio(rate, base_rate)
        target = ""
        if count:
            target = f"≥ {RULES_TARGET:.2f}x no rules: {_pass(rules.passed())}"
        table.add_row(
            f"{count:,}",
            _fmt(rate),
            _fmt(med(name, lambda c: c.send_rate)),
            _fmt(med(name, lambda c: c.cpu_per_message_us)),
            _fmt(med(name, lambda c: c.latency_p50 * 1e3), ".1f"),
            _fmt(med(name, lambda c: c.latency_p99 * 1e3), ".1f"),
            _fmt(ratio, ".3f") + "x",  # 3 places: a 0.796 must not read as a passing 0.80
            target,
        )
    console.print(table)
    _note_noise(console, [c.other_load for c in rules.cells])


def render_webhook(console: Console, webhook: WebhookResult) -> None:
    """The webhook table: mailgate's SendGrid endpoint against the bare ASGI endpoint."""
    if webhook.unavailable is not None:
        console.print(
            "[bold]Webhook ingest[/bold]: [yellow]not available[/yellow] "
            f"(mailgate's SendGrid endpoint refused the probe): {webhook.unavailable}"
        )
        return
    plan = webhook.plan

    def med(target: str, conc: int, metric: Callable[[HttpCell], float]) -> float | None:
        return webhook.median(target, conc, metric)

    table = Table(
        title=f"Webhook ingest: SendGrid parsed form ({webhook.body_size:,} B, "
        f"{webhook.fields} fields), requests/s (median of {plan.repeats})",
        caption="mg: mailgate's POST /inbound/sendgrid/<secret> until its 200 (stored and "
        "committed; events pulled after each cell, untimed). base: bare ASGI endpoint "
        f"under the same uvicorn settings, form parsed by {webhook.baseline_parser or '?'}, "
        "nothing stored. µs CPU: server user+sys per request; p50/p99 in ms. Load "
        f"generator: {plan.client} HTTP/1.1 keep-alive; client: its CPU in cores (max); "
        "other: cores used by unrelated processes (max).",
    )
    columns = (
        "conc.", "base req/s", "mg req/s", "mg/base", "base µs CPU", "mg µs CPU",
        "base p50", "mg p50", "base p99", "mg p99", "client", "other max",
    )  # fmt: skip
    for name in columns:
        table.add_column(name, justify="right")
    for conc in plan.concurrency:
        ratio = webhook.ratio(conc)
        label = f"{conc}" + (" (headline)" if conc == HEADLINE_CONCURRENCY else "")
        others = [c.other_load for c in webhook.cells if c.concurrency == conc]
        clients = [c.client_load for c in webhook.cells if c.concurrency == conc]
        table.add_row(
            label,
            _fmt(med("baseline", conc, lambda c: c.rate)),
            _fmt(med("mailgate", conc, lambda c: c.rate)),
            _fmt(ratio, ".2f") + "x",
            _fmt(med("baseline", conc, lambda c: c.cpu_per_request_us)),
            _fmt(med("mailgate", conc, lambda c: c.cpu_per_request_us)),
            _fmt(med("baseline", conc, lambda c: c.latency_p50 * 1e3), ".1f"),
            _fmt(med("mailgate", conc, lambda c: c.latency_p50 * 1e3), ".1f"),
            _fmt(med("baseline", conc, lambda c: c.latency_p99 * 1e3), ".1f"),
            _fmt(med("mailgate", conc, lambda c: c.latency_p99 * 1e3), ".1f"),
            _fmt(max(clients) if clients else None, ".2f"),
            _fmt(max(others) if others else None, ".2f"),
        )
    console.print(table)
    _note_noise(console, [c.other_load for c in webhook.cells])


def render_outbound(console: Console, outbound: OutboundResult) -> None:
    """Two tables: sends accepted through the policy gateway against a bare JSON
    endpoint, and send→deliver through the SMTP relay transport against aiosmtplib."""
    plan = outbound.plan

    def sm(target: str, metric: Callable[[SendCell], float | None]) -> float | None:
        return outbound.send_median(target, metric)

    accept = Table(
        title=f"Outbound accept: POST /v1/send at c={SEND_CONCURRENCY}, capture transport, "
        f"sends/s (median of {plan.repeats})",
        caption=f"mailgate: 201 queued (every guard step passed, request, recipients, thread "
        f"copy, audit and idempotent response committed), one recipient, "
        f"{outbound.request_bytes:,} B JSON, {plan.sends} sends per cell; all sent: until "
        "the delivery worker in the same process marked every send sent (informative). "
        f"base: bare ASGI JSON endpoint, same uvicorn settings and client, "
        f"{plan.baseline_sends} requests per cell. µs CPU: server user+sys per send while "
        "accepting (its delivery worker included) and until all sent. client / other: "
        "cores used by the load generator / by unrelated processes (max).",
    )
    columns = (
        "target", "sends/s", "ratio", "µs CPU", "µs CPU all sent", "p50 ms", "p99 ms",
        "all sent s", "all sent/s", "client", "other max",
    )  # fmt: skip
    for name in columns:
        accept.add_column(name, justify="left" if name == "target" else "right")
    base_rate = sm("baseline", lambda c: c.rate)
    for target in ("baseline", "mailgate"):
        cells = [c for c in outbound.send_cells if c.target == target]
        rate = sm(target, lambda c: c.rate)
        gateway = target == "mailgate"
        accept.add_row(
            target,
            _fmt(rate),
            _fmt(_ratio(rate, base_rate), ".3f") + "x",
            _fmt(sm(target, lambda c: c.cpu_per_send_us)),
            _fmt(sm(target, lambda c: c.cpu_total_per_send_us) if gateway else None),
            _fmt(sm(target, lambda c: c.latency_p50 * 1e3), ".1f"),
            _fmt(sm(target, lambda c: c.latency_p99 * 1e3), ".1f"),
            _fmt(sm(target, lambda c: c.delivered), ".2f"),
            _fmt(sm(target, lambda c: c.delivered_rate)),
            _fmt(max((c.client_load for c in cells), default=None), ".2f"),
            _fmt(max((c.other_load for c in cells), default=None), ".2f"),
        )
    console.print(accept)

    def rm(target: str, metric: Callable[[RelayCell], float | None]) -> float | None:
        return outbound.relay_median(target, metric)

    pairs = ", ".join(f"{r:.2f}" for r in outbound.pair_ratios())
    size = rm("mailgate", lambda c: c.message_bytes)
    relay = Table(
        title=f"Outbound send→deliver: {plan.relay_sends} messages through the SMTP relay "
        f"transport to an aiosmtpd sink vs raw aiosmtplib (median of {plan.repeats})",
        caption=f"seconds from the first POST /v1/send (at c={SEND_CONCURRENCY}) / the "
        "first MAIL to the last message at the sink (one spool file each, counted by the "
        "sink). aiosmtplib: the same messages (mailgate's bytes, "
        f"{_fmt(size)} B mean, same recipients) over {outbound.sessions} kept-open "
        f"sessions (= delivery_workers). ratio: aiosmtplib s / mailgate s, higher is "
        f"better; per repeat: {pairs or '-'}. submit s: until the last 201; lag s: last "
        "201 to the last message at the sink. µs CPU: per message, of the gateway (HTTP, "
        "policy, store, delivery) and of the sink.",
    )
    columns = (
        "sender", "s to N at sink", "msgs/s", "ratio", "target", "submit s", "lag s",
        "µs CPU gateway", "µs CPU sink", "client", "other max",
    )  # fmt: skip
    for name in columns:
        relay.add_column(name, justify="left" if name in ("sender", "target") else "right")
    for target in ("aiosmtplib", "mailgate"):
        relayed = [c for c in outbound.relay_cells if c.target == target]
        gateway = target == "mailgate"
        relay.add_row(
            target if gateway else f"aiosmtplib ({outbound.sessions} sessions)",
            _fmt(rm(target, lambda c: c.elapsed), ".2f"),
            _fmt(rm(target, lambda c: c.rate)),
            (_fmt(outbound.relay_ratio(), ".3f") + "x") if gateway else "",
            f"≥ {OUTBOUND_TARGET:.2f}x: {_pass(outbound.passed())}" if gateway else "",
            _fmt(rm(target, lambda c: c.submit_elapsed), ".2f"),
            _fmt(rm(target, lambda c: c.lag), ".2f"),
            _fmt(rm(target, lambda c: c.server_cpu_per_message_us)),
            _fmt(rm(target, lambda c: c.sink_cpu_per_message_us)),
            _fmt(max((c.client_load for c in relayed), default=None), ".2f"),
            _fmt(max((c.other_load for c in relayed), default=None), ".2f"),
        )
    console.print(relay)
    loads = [c.other_load for c in outbound.send_cells]
    loads += [r.other_load for r in outbound.relay_cells]
    _note_noise(console, loads)


def _note_noise(console: Console, loads: list[float]) -> None:
    noisy = [load for load in loads if load > NOISY_LOAD]
    if noisy:
        console.print(
            f"[yellow]note[/yellow]: other processes used more than {NOISY_LOAD:.2f} of a "
            f"core in {len(noisy)} of {len(loads)} measurements (up to {max(noisy):.2f})."
        )


def _rules_json(rules: RulesResult) -> dict[str, Any]:
    plan = rules.plan
    bare, ruled = rules.names
    return {
        "rules": plan.rules,
        "size": plan.size[0],
        "concurrency": plan.concurrency,
        "count": plan.count,
        "repeats": plan.repeats,
        "paths": rules.paths,
        "decisions_checked": rules.checked,
        "rate_0_rules": rules.median(bare, lambda c: c.rate),
        "rate_with_rules": rules.median(ruled, lambda c: c.rate),
        "ratio": rules.ratio(),
        "pair_ratios": rules.pair_ratios(),
        "cpu_cost_us_per_message": rules.cpu_cost_us(),
        "min": RULES_TARGET,
        "passed": rules.passed(),
        "cells": [{**asdict(c), "rate": c.rate, "send_rate": c.send_rate} for c in rules.cells],
    }


def _webhook_json(webhook: WebhookResult) -> dict[str, Any]:
    plan = webhook.plan
    return {
        "available": webhook.unavailable is None,
        "unavailable": webhook.unavailable,
        "body_size": webhook.body_size,
        "fields": webhook.fields,
        "baseline_parser": webhook.baseline_parser,
        "client": plan.client,
        "repeats": plan.repeats,
        "counts": {f"c={c}": n for c, n in plan.counts.items()},
        "ratio": {f"c={c}": webhook.ratio(c) for c in plan.concurrency},
        "rates": {
            f"c={c}": {t: webhook.median(t, c, lambda x: x.rate) for t in ("baseline", "mailgate")}
            for c in plan.concurrency
        },
        "cells": [
            {**asdict(c), "rate": c.rate, "cpu_per_request_us": c.cpu_per_request_us}
            for c in webhook.cells
        ],
    }


def _outbound_json(outbound: OutboundResult) -> dict[str, Any]:
    plan = outbound.plan
    return {
        "plan": asdict(plan),
        "concurrency": SEND_CONCURRENCY,
        "relay_sessions": outbound.sessions,
        "request_bytes": outbound.request_bytes,
        "accept": {
            "rate": {
                t: outbound.send_median(t, lambda c: c.rate) for t in ("baseline", "mailgate")
            },
            "ratio": outbound.send_ratio(),
            "all_sent_seconds": outbound.send_median("mailgate", lambda c: c.delivered),
            "all_sent_rate": outbound.send_median("mailgate", lambda c: c.delivered_rate),
        },
        "relay": {
            "seconds": {
                t: outbound.relay_median(t, lambda c: c.elapsed) for t in ("aiosmtplib", "mailgate")
            },
            "ratio": outbound.relay_ratio(),
            "pair_ratios": outbound.pair_ratios(),
            "min": OUTBOUND_TARGET,
            "passed": outbound.passed(),
        },
        "send_cells": [
            {**asdict(c), "rate": c.rate, "cpu_per_send_us": c.cpu_per_send_us}
            for c in outbound.send_cells
        ],
        "relay_cells": [{**asdict(c), "rate": c.rate} for c in outbound.relay_cells],
    }


def to_json(
    info: dict[str, Any],
    result: RunResult,
    rss: RssResult | None,
    wall_seconds: float,
    *,
    rules: RulesResult | None = None,
    webhook: WebhookResult | None = None,
    outbound: OutboundResult | None = None,
) -> dict[str, Any]:
    ratio, ok = verdict(result)
    return {
        "machine": info,
        "plan": {
            "repeats": result.plan.repeats,
            "counts": {f"{k[0]} c={k[1]}": v for k, v in result.plan.counts.items()},
            "sqlite_mode": result.plan.sqlite_mode,
        },
        "visibility": result.visibility,
        "cells": [{**asdict(c), "rate": c.rate, "send_rate": c.send_rate} for c in result.cells],
        "target": {"cell": list(TARGET_CELL), "ratio": ratio, "min": TARGET_RATIO, "passed": ok},
        "rss": None if rss is None else rss.as_dict(),
        "rules": None if rules is None else _rules_json(rules),
        "webhook": None if webhook is None else _webhook_json(webhook),
        "outbound": None if outbound is None else _outbound_json(outbound),
        "wall_seconds": wall_seconds,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
