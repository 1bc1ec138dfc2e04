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

from bench.rss import TARGET_MULTIPLE, RssResult
from bench.runner import TARGET_CELL, TARGET_RATIO, Cell, RunResult

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


def to_json(
    info: dict[str, Any], result: RunResult, rss: RssResult | None, wall_seconds: float
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
        "wall_seconds": wall_seconds,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
