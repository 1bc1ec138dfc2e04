"""``mailgate domain ...`` and the sending-domain service behind it: keys are generated
and kept, DNS records printed, duplicates and malformed names refused by code, and the
signer of an added domain signs what its published record verifies."""

from __future__ import annotations

import json
from pathlib import Path

import dkim
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from mailgate.cli import app
from mailgate.runtime import Runtime
from mailgate.services.domains import DomainService
from mailgate.store.schema import audit_log, sending_domains
from mailgate.testing import build_message
from tests.integration.test_cli_policy import run_error, run_json


@pytest.fixture
def cli_env(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAILGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MAILGATE_DATABASE_URL", database_url)
    return tmp_path


def test_domain_add_prints_the_dns_records_to_publish(cli_env: Path) -> None:
    result = CliRunner().invoke(app, ["domain", "add", "Example.COM", "--selector", "s1"])
    assert result.exit_code == 0, result.output
    dkim_line, spf_line, dmarc_line = result.stdout.splitlines()
    assert dkim_line.startswith('s1._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=')
    assert spf_line == 'example.com. IN TXT "v=spf1 mx a ~all"'
    assert dmarc_line.startswith('_dmarc.example.com. IN TXT "v=DMARC1; p=none')
    chunks = dkim_line.split(" IN TXT ")[1].split('" "')
    assert all(len(chunk.strip('"')) <= 255 for chunk in chunks)  # RFC 1035 §3.3


def test_domain_add_with_json_prints_one_object_with_the_records(cli_env: Path) -> None:
    added = run_json("domain", "add", "example.com")
    assert (added["domain"], added["selector"]) == ("example.com", "mailgate")
    dkim_record = added["records"][0]
    assert (dkim_record["type"], dkim_record["name"]) == ("TXT", "mailgate._domainkey.example.com")
    assert dkim_record["value"] == f"v=DKIM1; k=rsa; p={added['public_key']}"
    assert [r["purpose"].split(":")[0] for r in added["records"]] == ["dkim", "spf", "dmarc"]
    assert "private" not in json.dumps(added).lower()


def test_domain_list_and_remove(cli_env: Path) -> None:
    run_json("domain", "add", "b.example")
    run_json("domain", "add", "a.example")
    assert [d["domain"] for d in run_json("domain", "list")["domains"]] == [
        "a.example",
        "b.example",
    ]
    assert run_json("domain", "records", "a.example")["records"][0]["name"].endswith("a.example")
    assert run_json("domain", "remove", "a.example")["removed"] is True
    assert [d["domain"] for d in run_json("domain", "list")["domains"]] == ["b.example"]
    assert run_error("domain", "remove", "a.example")["code"] == "not_found"


def test_adding_a_domain_twice_is_a_conflict(cli_env: Path) -> None:
    run_json("domain", "add", "example.com")
    assert run_error("domain", "add", "EXAMPLE.com.")["code"] == "conflict"


@pytest.mark.parametrize(
    "bad",
    ["localhost", "bad-.example", "exa mple.com", "a..example", "192.0.2.1", "x" * 64 + ".io"],
)
def test_a_malformed_domain_is_refused(cli_env: Path, bad: str) -> None:
    error = run_error("domain", "add", bad)
    assert error["code"] == "validation_failed"
    assert error["errors"][0]["field"] == "domain"


def test_adding_and_removing_are_audited(runtime: Runtime) -> None:
    runtime.domains.add("example.com", actor="owner:own_1")
    runtime.domains.remove("example.com", actor="owner:own_1")
    with runtime.db.read() as conn:
        rows = conn.execute(
            select(audit_log.c.action, audit_log.c.actor, audit_log.c.target_id).order_by(
                audit_log.c.created_at, audit_log.c.id
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("domain.added", "owner:own_1", "example.com"),
        ("domain.removed", "owner:own_1", "example.com"),
    ]


def test_the_signer_of_an_added_domain_signs_what_its_dns_record_verifies(
    runtime: Runtime,
) -> None:
    added = runtime.domains.add("bücher.example", selector="s2026")
    assert added.domain.domain == "xn--bcher-kva.example"
    signer = runtime.domains.signer_for("XN--BCHER-KVA.example")
    assert signer is not None
    signed = signer.sign(build_message(to="bob@example.org", sender="agent@xn--bcher-kva.example"))
    published = {r.name + ".": r.value.encode() for r in added.records}

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return published.get(name.decode())

    assert dkim.verify(signed, dnsfunc=dns)
    assert runtime.domains.signer_for("unknown.example") is None
    assert runtime.domains.signer_for("not a domain") is None


def test_signers_are_cached_and_a_removal_here_drops_the_cache(runtime: Runtime) -> None:
    runtime.domains.add("example.com")
    first = runtime.domains.signer_for("example.com")
    with runtime.db.write() as conn:  # another process's change: seen after the TTL
        conn.execute(sending_domains.update().values(selector="other"))
    assert runtime.domains.signer_for("example.com") is first
    fresh = DomainService(runtime.db, runtime.clock).signer_for("example.com")
    assert fresh is not None and fresh.selector == "other"
    runtime.domains.remove("example.com")
    assert runtime.domains.signer_for("example.com") is None
