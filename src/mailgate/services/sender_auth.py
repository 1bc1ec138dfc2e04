"""Sender authentication for inbound mail: SPF, DKIM, DMARC and ARC through one DNS port.

The libraries do the cryptography and the RFC 7208 term evaluation (pyspf for SPF,
dkimpy for DKIM and ARC); this module feeds every one of them the same injectable
:class:`DnsResolver`, bounds the DNS time spent per message, and turns whatever they
say, including exceptions, into the values of :mod:`mailgate.domain.authres`. The
contract for ingest: :meth:`SenderAuthenticator.evaluate` never raises for anything a
sender or DNS can do; a DNS failure is a ``temperror`` verdict.

It does blocking DNS I/O, so call it *before* the ingest transaction (for example from
``anyio.to_thread.run_sync``), never inside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses, parseaddr
from typing import Any, Literal, Protocol

import dkim
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename
import spf
from dkim.util import InvalidTagValueList, parse_tag_value

from mailgate.domain import rules
from mailgate.domain.authres import (
    ArcResult,
    ArcVerdict,
    AuthResults,
    DkimVerdict,
    DmarcRecord,
    DmarcVerdict,
    SpfVerdict,
    decide_dmarc,
    normalize_domain,
    organizational_domain,
    parse_dmarc_record,
)
from mailgate.services.ingest import SenderAuth

__all__ = [
    "DnsPythonResolver",
    "DnsResolver",
    "DnsTemporaryError",
    "SenderAuthenticator",
    "sender_auth_of",
]

MAX_DKIM_SIGNATURES = 5  # more is a resource attack, not a real message


class DnsTemporaryError(Exception):
    """A lookup could not be answered now (timeout, SERVFAIL, budget spent).

    Part of the :class:`DnsResolver` contract, not of the public error tree: it never
    leaves :class:`SenderAuthenticator`, which turns it into ``temperror``.
    """


class DnsResolver(Protocol):
    """The DNS the sender checks need. "No such name" and "no such record" are ``[]``.

    Raises:
        DnsTemporaryError: the answer is unknown right now (so the verdict is
            ``temperror``, never ``fail``).
    """

    def txt(self, name: str) -> list[str]:
        """TXT records, each record's character-strings joined."""
        ...

    def a(self, name: str) -> list[str]:
        """IPv4 addresses as text."""
        ...

    def aaaa(self, name: str) -> list[str]:
        """IPv6 addresses as text."""
        ...

    def mx(self, name: str) -> list[tuple[int, str]]:
        """``(preference, exchange)`` pairs, exchange without the trailing dot."""
        ...

    def ptr(self, name: str) -> list[str]:
        """PTR targets of a reverse name (``4.3.2.1.in-addr.arpa``), no trailing dot."""
        ...


class DnsPythonResolver:
    """:class:`DnsResolver` over dnspython, with a bounded time per query.

    ``nameservers=None`` uses the system configuration (production); tests pass
    ``["127.0.0.1"]`` and the port of :class:`mailgate.testing.dns.DnsTestServer`.
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        port: int = 53,
        timeout: float = 2.0,
    ) -> None:
        self.timeout = timeout
        self._error: str | None = None
        try:
            self._resolver = dns.resolver.Resolver(configure=nameservers is None)
        except dns.exception.DNSException as exc:  # no /etc/resolv.conf, say
            self._resolver = dns.resolver.Resolver(configure=False)
            self._error = f"no DNS configuration: {exc}"
        if nameservers is not None:
            self._resolver.nameservers = list(nameservers)
            self._resolver.port = port
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout

    def _answer(self, name: str, rdtype: dns.rdatatype.RdataType) -> list[Any]:
        if self._error:
            raise DnsTemporaryError(self._error)
        try:
            answer = self._resolver.resolve(
                name, rdtype, search=False, raise_on_no_answer=False, lifetime=self.timeout
            )
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsTemporaryError(f"{type(exc).__name__}: {exc}") from exc
        return list(answer.rrset or [])

    def txt(self, name: str) -> list[str]:
        return [
            b"".join(r.strings).decode("utf-8", "replace")
            for r in self._answer(name, dns.rdatatype.TXT)
        ]

    def a(self, name: str) -> list[str]:
        return [str(r.address) for r in self._answer(name, dns.rdatatype.A)]

    def aaaa(self, name: str) -> list[str]:
        return [str(r.address) for r in self._answer(name, dns.rdatatype.AAAA)]

    def mx(self, name: str) -> list[tuple[int, str]]:
        return [
            (int(r.preference), r.exchange.to_text(omit_final_dot=True))
            for r in self._answer(name, dns.rdatatype.MX)
        ]

    def ptr(self, name: str) -> list[str]:
        return [
            r.target.to_text(omit_final_dot=True) for r in self._answer(name, dns.rdatatype.PTR)
        ]


class _Budgeted:
    """Wraps a resolver so one message's lookups stop once its time budget is spent.

    Each query is still bounded by the resolver's own timeout, so the worst case is the
    budget plus one query timeout.
    """

    def __init__(self, inner: DnsResolver, budget: float, clock: Callable[[], float]) -> None:
        self._inner = inner
        self._clock = clock
        self._deadline = clock() + budget

    def _check(self) -> None:
        if self._clock() >= self._deadline:
            raise DnsTemporaryError("DNS time budget for this message exhausted")

    def txt(self, name: str) -> list[str]:
        self._check()
        return self._inner.txt(name)

    def a(self, name: str) -> list[str]:
        self._check()
        return self._inner.a(name)

    def aaaa(self, name: str) -> list[str]:
        self._check()
        return self._inner.aaaa(name)

    def mx(self, name: str) -> list[tuple[int, str]]:
        self._check()
        return self._inner.mx(name)

    def ptr(self, name: str) -> list[str]:
        self._check()
        return self._inner.ptr(name)


class _SpfQuery(spf.query):  # type: ignore[misc]  # pyspf is untyped
    """pyspf's evaluator with its DNS replaced by our port.

    pyspf looks names up through a module-global function (dnspython's deprecated
    ``dns.resolver.query``); overriding :meth:`dns` per query keeps the resolver
    injectable and thread-safe. CNAMEs are followed by the resolver itself, the
    per-query cache and the RFC 7208 §4.6.4 void-lookup limit are kept.
    """

    def __init__(self, resolver: DnsResolver, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._port = resolver

    def dns(
        self, name: str, qtype: str, cnames: object = None, ignore_void: bool = False
    ) -> list[Any]:
        name = str(name).rstrip(".").lower()
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            return []
        key = (name, qtype)
        if key in self.cache:
            return list(self.cache[key])
        try:
            result: list[Any]
            if qtype in ("TXT", "SPF"):
                result = [[t.encode("utf-8")] for t in self._port.txt(name)]
            elif qtype == "A":
                result = self._port.a(name)
            elif qtype == "AAAA":
                result = self._port.aaaa(name)
            elif qtype == "MX":
                result = [(pref, host) for pref, host in self._port.mx(name)]
            elif qtype == "PTR":
                result = self._port.ptr(name)
            else:
                result = []
        except DnsTemporaryError as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        self.cache[key] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return list(result)


class _CaptureLog:
    """A logger for dkimpy that keeps its error messages instead of emitting them.

    dkimpy reports *why* a key was unusable only through its logger; keeping the text
    gives the verdict a reason, and keeps per-message sender noise out of our logs.
    """

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, message: object, *args: object) -> None:
        self.errors.append(str(message) % args if args else str(message))

    def debug(self, *args: object, **kwargs: object) -> None:
        pass

    info = warning = debug


class SenderAuthenticator:
    """Evaluates SPF, DKIM, DMARC and ARC for inbound messages.

    Built once with the resolver (system DNS in production, the loopback test server in
    tests) and a per-message DNS time budget.
    """

    def __init__(
        self,
        resolver: DnsResolver,
        *,
        budget_seconds: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
        org_domain: Callable[[str], str] = organizational_domain,
    ) -> None:
        self.resolver = resolver
        self.budget_seconds = budget_seconds
        self._clock = clock
        self._org_domain = org_domain

    def evaluate(
        self,
        raw: bytes,
        *,
        mail_from: str,
        client_ip: str,
        helo: str,
    ) -> AuthResults:
        """Authenticate one message as received.

        Args:
            raw: the message bytes as received (CRLF line endings).
            mail_from: the envelope sender without angle brackets; ``""`` for ``<>``.
            client_ip: the connecting client's address.
            helo: the HELO/EHLO name the client gave.

        Never raises for message or DNS content: failures become verdicts.
        """
        dns_port = _Budgeted(self.resolver, self.budget_seconds, self._clock)
        spf_verdict = self._spf(dns_port, mail_from, client_ip, helo)
        dkim_verdicts = self._dkim(dns_port, raw)
        dmarc_verdict = self._dmarc(dns_port, raw, spf_verdict, dkim_verdicts)
        arc_verdict = self._arc(dns_port, raw)
        return AuthResults(spf_verdict, dkim_verdicts, dmarc_verdict, arc_verdict)

    def check(
        self, raw: bytes, *, mail_from: str, client_ip: str, helo: str, authserv_id: str
    ) -> SenderAuth:
        """:meth:`evaluate`, packaged for ingest: what rules see, what is stored, and
        the ``Authentication-Results`` field to prepend. Never raises (as evaluate)."""
        results = self.evaluate(raw, mail_from=mail_from, client_ip=client_ip, helo=helo)
        return sender_auth_of(results, authserv_id)

    # -- SPF ---------------------------------------------------------------------

    def _spf(self, port: DnsResolver, mail_from: str, client_ip: str, helo: str) -> SpfVerdict:
        _, _, domain_part = mail_from.rpartition("@")
        identity: Literal["mailfrom", "helo"] = "mailfrom" if mail_from else "helo"
        domain = normalize_domain(domain_part if mail_from else helo) or None
        try:
            query = _SpfQuery(port, client_ip, mail_from, helo, receiver="mailgate")
            result, _code, explanation = query.check()
        except Exception as exc:  # pyspf raises on odd input (bad IP, bad names)
            return SpfVerdict("permerror", domain, f"{type(exc).__name__}: {exc}", identity)
        if result not in ("pass", "fail", "softfail", "neutral", "none", "temperror"):
            result = "permerror"
        return SpfVerdict(result, domain, str(explanation), identity)

    # -- DKIM --------------------------------------------------------------------

    @staticmethod
    def _dnsfunc(port: DnsResolver, seen: list[str] | None = None) -> Callable[..., bytes | None]:
        """dkimpy's ``dnsfunc(name, timeout=...)``: the first TXT record, or None.

        dkimpy turns a missing key and a DNS timeout alike into a plain ``False``, so the
        lookup notes what happened in ``seen`` ("found", "missing", "temperror") for
        :meth:`_dkim` to tell ``fail`` from ``permerror`` and ``temperror``.
        """
        notes = seen if seen is not None else []

        def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
            text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
            try:
                records = port.txt(text.rstrip("."))
            except DnsTemporaryError as exc:
                notes.append("temperror")
                raise dkim.DnsTimeoutError(str(exc)) from exc
            notes.append("found" if records else "missing")
            return records[0].encode("utf-8") if records else None

        return lookup

    def _dkim(self, port: DnsResolver, raw: bytes) -> tuple[DkimVerdict, ...]:
        log = _CaptureLog()
        try:
            verifier = dkim.DKIM(raw, minkey=1024, logger=log)
        except Exception as exc:  # dkimpy rejects unparseable messages this way
            return (DkimVerdict("permerror", reason=f"unparseable message: {exc}"),)
        signatures = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"]
        return tuple(
            self._dkim_one(port, verifier, log, index, value)
            for index, value in enumerate(signatures[:MAX_DKIM_SIGNATURES])
        )

    def _dkim_one(
        self, port: DnsResolver, verifier: Any, log: _CaptureLog, index: int, value: bytes
    ) -> DkimVerdict:
        domain: str | None = None
        selector: str | None = None
        try:
            tags = parse_tag_value(value)
            domain = normalize_domain(tags.get(b"d", b"").decode("ascii", "replace")) or None
            selector = tags.get(b"s", b"").decode("ascii", "replace") or None
        except (InvalidTagValueList, ValueError):
            pass
        seen: list[str] = []
        log.errors.clear()
        try:
            ok = verifier.verify(idx=index, dnsfunc=self._dnsfunc(port, seen))
        except dkim.ValidationError as exc:
            return DkimVerdict("fail", domain, selector, str(exc))
        except Exception as exc:  # malformed signatures and dkimpy's own bugs alike
            return DkimVerdict("permerror", domain, selector, f"{type(exc).__name__}: {exc}")
        if ok:
            return DkimVerdict("pass", domain, selector, "good signature")
        if "temperror" in seen:
            return DkimVerdict("temperror", domain, selector, "key lookup failed temporarily")
        if "missing" in seen:
            return DkimVerdict("permerror", domain, selector, "no key published for selector")
        if log.errors:  # key found but unusable (bad syntax, revoked, too small)
            return DkimVerdict("permerror", domain, selector, log.errors[-1])
        return DkimVerdict("fail", domain, selector, "signature did not verify")

    # -- DMARC -------------------------------------------------------------------

    def _dmarc(
        self,
        port: DnsResolver,
        raw: bytes,
        spf_verdict: SpfVerdict,
        dkim_verdicts: Sequence[DkimVerdict],
    ) -> DmarcVerdict:
        try:
            headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
            from_values = headers.get_all("From") or []
        except Exception as exc:
            return DmarcVerdict("permerror", reason=f"unparseable header: {exc}")
        addresses = [addr for _, addr in getaddresses([str(v) for v in from_values]) if addr]
        domains = {normalize_domain(parseaddr(a)[1].rpartition("@")[2]) for a in addresses}
        domains.discard("")
        if len(domains) != 1 or len(from_values) != 1:
            return DmarcVerdict("permerror", reason="not exactly one RFC5322.From domain")
        from_domain = domains.pop()
        try:
            record, where = self._dmarc_record(port, from_domain)
        except DnsTemporaryError as exc:
            return DmarcVerdict("temperror", from_domain, reason=str(exc))
        return decide_dmarc(
            from_domain, record, where, spf_verdict, dkim_verdicts, self._org_domain
        )

    def _dmarc_record(
        self, port: DnsResolver, from_domain: str
    ) -> tuple[DmarcRecord | None, str | None]:
        """Policy discovery (RFC 7489 §6.6.3): the From domain, then its org domain."""
        candidates = [from_domain]
        org = self._org_domain(from_domain)
        if org != from_domain:
            candidates.append(org)
        for domain in candidates:
            texts = [t for t in port.txt(f"_dmarc.{domain}") if t.startswith("v=DMARC1")]
            if len(texts) == 1:
                record = parse_dmarc_record(texts[0])
                if record is not None:
                    return record, domain
        return None, None

    # -- ARC ---------------------------------------------------------------------

    def _arc(self, port: DnsResolver, raw: bytes) -> ArcVerdict:
        try:
            arc = dkim.ARC(raw, minkey=1024, logger=_CaptureLog())
            cv, _results, reason = arc.verify(dnsfunc=self._dnsfunc(port))
        except dkim.DnsTimeoutError as exc:
            return ArcVerdict("temperror", str(exc))
        except Exception as exc:  # a broken chain is a failed chain (RFC 8617 §5.2)
            return ArcVerdict("fail", f"{type(exc).__name__}: {exc}")
        text = cv.decode("ascii", "replace") if isinstance(cv, bytes) else str(cv)
        result: ArcResult = "pass" if text == "pass" else "none" if text == "none" else "fail"
        return ArcVerdict(result, str(reason or ""))


def sender_auth_of(results: AuthResults, authserv_id: str) -> SenderAuth:
    """Our verdicts as ingest stores them (``messages.auth_results``) and rules see them."""
    facts = rules.AuthResults.from_verdicts(results)
    header = results.header(authserv_id)
    record: dict[str, Any] = {
        **facts.as_dict(),
        "source": "smtp",
        "arc": results.arc.result,
        "spf_detail": {
            "domain": results.spf.domain,
            "identity": results.spf.identity,
            "reason": results.spf.reason,
        },
        "dkim_signatures": [
            {"domain": v.domain, "selector": v.selector, "result": v.result, "reason": v.reason}
            for v in results.dkim
        ],
        "dmarc_detail": {
            "domain": results.dmarc.domain,
            "policy": results.dmarc.policy,
            "aligned_by": list(results.dmarc.aligned_by),
            "reason": results.dmarc.reason,
        },
        "authentication_results": header.partition(": ")[2],
    }
    return SenderAuth(facts=facts, record=record, header=header)
