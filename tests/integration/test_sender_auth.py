"""Sender authentication against real DNS on loopback and real DKIM keys.

Every zone is served by :class:`mailgate.testing.dns.DnsTestServer` on 127.0.0.1, so
the resolver, pyspf and dkimpy run their real wire code paths and nothing leaves the
machine. Keys are generated per test module with ``cryptography``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import default

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailgate.domain.authres import (
    AuthResults,
    authserv_id_of,
    forged_authentication_results,
    strip_forged_authentication_results,
)
from mailgate.services.sender_auth import SenderAuthenticator
from mailgate.testing import build_message
from mailgate.testing.dns import DnsTestServer

AUTHSERV_ID = "mx.gateway.test"
GOOD_IP = "192.0.2.10"
OTHER_IP = "198.51.100.7"


@dataclass(frozen=True)
class Key:
    private_pem: bytes
    dns_record: str


@pytest.fixture(scope="module")
def key() -> Key:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode())


@pytest.fixture
def dns_server(key: Key) -> Iterator[DnsTestServer]:
    with DnsTestServer() as server:
        server.add("example.com", "TXT", f"v=spf1 ip4:{GOOD_IP} -all")
        server.add("soft.example", "TXT", f"v=spf1 ip4:{GOOD_IP} ~all")
        server.add("sel1._domainkey.example.com", "TXT", key.dns_record)
        server.add("sel1._domainkey.mail.example.com", "TXT", key.dns_record)
        server.add("sel1._domainkey.other.example", "TXT", key.dns_record)
        server.add("other.example", "TXT", f"v=spf1 ip4:{GOOD_IP} -all")
        server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; sp=quarantine")
        server.add("_dmarc.strict.example", "TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")
        server.add("sel1._domainkey.mail.strict.example", "TXT", key.dns_record)
        yield server


@pytest.fixture
def auth(dns_server: DnsTestServer) -> SenderAuthenticator:
    return SenderAuthenticator(dns_server.resolver(timeout=2.0))


def signed(key: Key, domain: str, *, sender: str, selector: str = "sel1") -> bytes:
    raw = build_message(to="agent@gateway.test", sender=sender)
    signature = dkim.sign(
        raw,
        selector.encode(),
        domain.encode(),
        key.private_pem,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return bytes(signature) + raw


def evaluate(
    auth: SenderAuthenticator, raw: bytes, mail_from: str, ip: str = GOOD_IP
) -> AuthResults:
    return auth.evaluate(raw, mail_from=mail_from, client_ip=ip, helo="client.example")


# -- SPF (RFC 7208 §2.6) --------------------------------------------------------------

SPF_CASES = [
    # mail from,              client ip, expected
    ("bob@example.com", GOOD_IP, "pass"),
    ("bob@example.com", OTHER_IP, "fail"),
    ("bob@soft.example", OTHER_IP, "softfail"),
    ("bob@unpublished.example", GOOD_IP, "none"),
]


@pytest.mark.parametrize(("mail_from", "ip", "expected"), SPF_CASES)
def test_spf_verdict_follows_the_published_policy(
    auth: SenderAuthenticator, mail_from: str, ip: str, expected: str
) -> None:
    results = evaluate(auth, build_message(to="a@gateway.test"), mail_from, ip)
    assert results.spf.result == expected
    assert results.spf.domain == mail_from.rpartition("@")[2]
    assert results.spf.identity == "mailfrom"


def test_null_sender_is_checked_against_the_helo_name(dns_server: DnsTestServer) -> None:
    dns_server.add("client.example", "TXT", f"v=spf1 ip4:{GOOD_IP} -all")
    auth = SenderAuthenticator(dns_server.resolver())
    results = evaluate(auth, build_message(to="a@gateway.test"), "")
    assert (results.spf.result, results.spf.identity) == ("pass", "helo")
    assert results.spf.domain == "client.example"


def test_a_dns_server_answering_servfail_gives_temperror_everywhere_not_an_exception(
    key: Key, dns_server: DnsTestServer, auth: SenderAuthenticator
) -> None:
    raw = signed(key, "example.com", sender="bob@example.com")
    dns_server.failing = True
    results = evaluate(auth, raw, "bob@example.com")
    assert results.spf.result == "temperror"
    assert [v.result for v in results.dkim] == ["temperror"]
    assert results.dmarc.result == "temperror"
    assert not results.sender_authenticated


def test_an_unreachable_dns_server_gives_temperror_within_the_query_timeout() -> None:
    server = DnsTestServer().start()
    resolver = server.resolver(timeout=0.3)
    server.stop()  # nothing listens on the port any more
    results = SenderAuthenticator(resolver, budget_seconds=1.0).evaluate(
        build_message(to="a@gateway.test"),
        mail_from="bob@example.com",
        client_ip=GOOD_IP,
        helo="client.example",
    )
    assert results.spf.result == "temperror"
    assert results.dmarc.result == "temperror"


# -- DKIM (RFC 6376 §6) -----------------------------------------------------------------


def test_a_good_signature_passes_and_names_its_domain_and_selector(
    key: Key, auth: SenderAuthenticator
) -> None:
    results = evaluate(
        auth, signed(key, "example.com", sender="bob@example.com"), "x@other.example"
    )
    assert [(v.result, v.domain, v.selector) for v in results.dkim] == [
        ("pass", "example.com", "sel1")
    ]


def test_a_tampered_body_fails_the_signature(key: Key, auth: SenderAuthenticator) -> None:
    raw = signed(key, "example.com", sender="bob@example.com").replace(b"Hi there.", b"Pay now!")
    results = evaluate(auth, raw, "bob@example.com", OTHER_IP)
    assert [v.result for v in results.dkim] == ["fail"]
    assert "body hash" in results.dkim[0].reason
    assert results.dmarc.result == "fail"


def test_an_unsigned_message_has_no_dkim_verdicts(auth: SenderAuthenticator) -> None:
    results = evaluate(auth, build_message(to="a@gateway.test"), "bob@example.com")
    assert results.dkim == ()
    assert results.dkim_result == "none"


def test_a_signature_whose_selector_is_not_published_is_a_permerror(
    key: Key, auth: SenderAuthenticator
) -> None:
    raw = signed(key, "example.com", sender="bob@example.com", selector="missing")
    results = evaluate(auth, raw, "bob@example.com", OTHER_IP)
    assert [(v.result, v.selector) for v in results.dkim] == [("permerror", "missing")]


# -- DMARC (RFC 7489 §3.1, §6.6) --------------------------------------------------------


def test_dmarc_passes_by_aligned_dkim_even_when_spf_fails(
    key: Key, auth: SenderAuthenticator
) -> None:
    raw = signed(key, "example.com", sender="Bob <bob@example.com>")
    results = evaluate(auth, raw, "bob@example.com", OTHER_IP)
    assert results.spf.result == "fail"
    assert (results.dmarc.result, results.dmarc.aligned_by) == ("pass", ("dkim",))
    assert results.dmarc.policy == "reject"
    assert results.sender_authenticated


def test_dmarc_passes_by_aligned_spf_on_an_unsigned_message(auth: SenderAuthenticator) -> None:
    raw = build_message(to="a@gateway.test", sender="Bob <bob@example.com>")
    results = evaluate(auth, raw, "bounces@example.com")
    assert (results.dmarc.result, results.dmarc.aligned_by) == ("pass", ("spf",))


def test_a_spoofed_from_fails_dmarc_although_spf_and_dkim_pass_for_another_domain(
    key: Key, auth: SenderAuthenticator
) -> None:
    raw = signed(key, "other.example", sender="CEO <ceo@example.com>")
    results = evaluate(auth, raw, "bob@other.example")
    assert results.spf.result == "pass"
    assert [v.result for v in results.dkim] == ["pass"]
    assert results.dmarc.result == "fail"
    assert results.dmarc.policy == "reject"  # recorded for rules, not enforced here
    assert "not aligned" in results.dmarc.reason
    assert not results.sender_authenticated


def test_relaxed_alignment_accepts_a_subdomain_signature_and_strict_does_not(
    key: Key, auth: SenderAuthenticator
) -> None:
    relaxed = evaluate(
        auth, signed(key, "mail.example.com", sender="bob@example.com"), "x@none.example"
    )
    assert (relaxed.dmarc.result, relaxed.dmarc.aligned_by) == ("pass", ("dkim",))
    strict = evaluate(
        auth, signed(key, "mail.strict.example", sender="bob@strict.example"), "x@none.example"
    )
    assert [v.result for v in strict.dkim] == ["pass"]
    assert strict.dmarc.result == "fail"


def test_a_subdomain_without_its_own_record_gets_the_organisational_sp_policy(
    auth: SenderAuthenticator,
) -> None:
    raw = build_message(to="a@gateway.test", sender="bob@news.example.com")
    results = evaluate(auth, raw, "bob@unpublished.example")
    assert (results.dmarc.result, results.dmarc.policy) == ("fail", "quarantine")


def test_a_domain_without_a_dmarc_record_gets_dmarc_none(auth: SenderAuthenticator) -> None:
    raw = build_message(to="a@gateway.test", sender="bob@unpublished.example")
    results = evaluate(auth, raw, "bob@unpublished.example")
    assert results.dmarc.result == "none"
    assert not results.sender_authenticated


def test_two_from_addresses_are_a_dmarc_permerror(auth: SenderAuthenticator) -> None:
    raw = build_message(to="a@gateway.test", sender="a@example.com, b@evil.example")
    results = evaluate(auth, raw, "bob@example.com")
    assert results.dmarc.result == "permerror"


# -- ARC (RFC 8617) ---------------------------------------------------------------------


def test_a_message_without_an_arc_chain_has_arc_none(auth: SenderAuthenticator) -> None:
    assert evaluate(auth, build_message(to="a@gateway.test"), "b@example.com").arc.result == "none"


def test_a_valid_arc_chain_passes(key: Key, auth: SenderAuthenticator) -> None:
    raw = signed(key, "example.com", sender="bob@example.com")
    raw = b"Authentication-Results: relay.other.example; dkim=pass header.d=example.com\r\n" + raw
    arc_headers = dkim.arc_sign(
        raw, b"sel1", b"other.example", key.private_pem, b"relay.other.example"
    )
    results = evaluate(auth, b"".join(arc_headers) + raw, "bob@example.com")
    assert results.arc.result == "pass"


# -- Authentication-Results (RFC 8601) -------------------------------------------------


def test_the_rendered_header_parses_back_with_each_method(
    key: Key, auth: SenderAuthenticator
) -> None:
    raw = signed(key, "example.com", sender="bob@example.com")
    results = evaluate(auth, raw, "bob@example.com")
    message = BytesParser(policy=default).parsebytes(
        results.header(AUTHSERV_ID).encode() + b"\r\n" + raw
    )
    value = str(message["Authentication-Results"])
    assert authserv_id_of(value) == AUTHSERV_ID
    methods = [part.strip().split()[0] for part in value.split(";")[1:]]
    assert methods == ["spf=pass", "dkim=pass", "dmarc=pass", "arc=none"]
    assert "header.d=example.com header.s=sel1" in value
    assert "smtp.mailfrom=example.com" in value


def test_hostile_domains_cannot_inject_methods_into_the_header() -> None:
    from mailgate.domain.authres import ArcVerdict, DkimVerdict, DmarcVerdict, SpfVerdict

    results = AuthResults(
        SpfVerdict("fail", "evil.example; dmarc=pass", "no (match)"),
        (DkimVerdict("fail", "x\r\nX-Injected: 1", "s"),),
        DmarcVerdict("fail", "example.com", "reject"),
        ArcVerdict("none"),
    )
    value = results.header(AUTHSERV_ID).split(":", 1)[1]
    assert value.count(";") - value.count('";') == 4  # one separator per method only
    assert "\r\nX-Injected" not in value
    assert "(no \\(match\\))" in value


def test_incoming_results_claiming_our_authserv_id_are_found_and_others_kept() -> None:
    headers = [
        ("Received", "from x by y"),
        ("Authentication-Results", "MX.Gateway.Test; dmarc=pass header.from=bank.example"),
        ("Authentication-Results", '(forged) "mx.gateway.test" 1; spf=pass'),
        ("authentication-results", "relay.other.example; dkim=pass header.d=other.example"),
        ("Authentication-Results", "mx.gateway.test.evil.example; spf=pass"),
    ]
    assert forged_authentication_results(headers, AUTHSERV_ID) == [1, 2]
    kept = strip_forged_authentication_results(headers, AUTHSERV_ID)
    assert [value.split(";")[0] for _, value in kept[1:]] == [
        "relay.other.example",
        "mx.gateway.test.evil.example",
    ]
