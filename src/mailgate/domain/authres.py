"""Sender-authentication verdicts, DMARC decisions and ``Authentication-Results``, as values.

The evaluator (:mod:`mailgate.services.sender_auth`) does the DNS work and hands this
module plain facts: what SPF said about the envelope domain, what each DKIM signature
said about its ``d=`` domain, the DMARC record it found. Everything that is a *decision*
lives here, without I/O, so it can be tested exhaustively and audited:

* DMARC alignment (RFC 7489 §3.1) of SPF's MAIL FROM domain and DKIM's ``d=`` with the
  RFC 5322 ``From`` domain, relaxed or strict, and the resulting pass/fail with the
  published policy (``p=``, or ``sp=`` for subdomains) recorded, not enforced: the
  gateway stores mail for agents, and rules decide what a ``p=reject`` failure means.
* Rendering an RFC 8601 ``Authentication-Results`` field for our ``authserv-id``.
* Finding incoming ``Authentication-Results`` fields that claim *our* ``authserv-id``
  (RFC 8601 §5: a border MTA must remove them, or a sender could forge a pass).

Organisational domains are found without a Public Suffix List download: a small bundled
list of multi-label public suffixes covers the common registries, anything else falls
back to "the last two labels". That errs towards *treating two unrelated subdomains of
an unlisted public suffix as aligned* only under relaxed alignment and only for suffixes
we do not list; ``organizational_domain`` is a parameter of :func:`decide_dmarc` so a
full PSL can be plugged in later without touching the decision logic.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

SpfResult = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
DkimResult = Literal["pass", "fail", "neutral", "none", "temperror", "permerror"]
DmarcResult = Literal["pass", "fail", "none", "temperror", "permerror"]
ArcResult = Literal["pass", "fail", "none", "temperror"]
DmarcPolicy = Literal["none", "quarantine", "reject"]
Alignment = Literal["r", "s"]

# Multi-label public suffixes under which registrants get the *third* label. Not a PSL:
# a deliberately short, offline list of the big ones (see the module docstring).
_SUFFIX_TABLE = """
    co.uk org.uk ac.uk gov.uk ltd.uk plc.uk me.uk net.uk sch.uk nhs.uk
    com.au net.au org.au edu.au gov.au asn.au id.au
    co.nz org.nz net.nz govt.nz ac.nz
    co.jp ne.jp or.jp ac.jp go.jp ad.jp ed.jp gr.jp lg.jp
    co.kr or.kr ne.kr go.kr ac.kr
    com.br net.br org.br gov.br edu.br
    com.cn net.cn org.cn gov.cn edu.cn ac.cn
    com.tw net.tw org.tw gov.tw edu.tw
    com.hk net.hk org.hk gov.hk edu.hk
    com.sg net.sg org.sg gov.sg edu.sg
    co.in net.in org.in gov.in ac.in firm.in gen.in ind.in
    co.za org.za gov.za ac.za net.za
    com.mx net.mx org.mx gob.mx edu.mx
    com.ar net.ar org.ar gob.ar edu.ar
    com.tr net.tr org.tr gov.tr edu.tr
    co.il org.il net.il ac.il gov.il
    com.my net.my org.my gov.my edu.my
    co.id or.id ac.id go.id web.id
    co.th or.th ac.th go.th in.th
    com.ua net.ua org.ua gov.ua
    com.pl net.pl org.pl
    co.at or.at ac.at gv.at
    com.es nom.es org.es gob.es edu.es
    com.ph net.ph org.ph gov.ph edu.ph
    com.vn net.vn org.vn gov.vn edu.vn
    com.sa net.sa org.sa gov.sa edu.sa
    com.eg org.eg gov.eg edu.eg
    com.ng org.ng gov.ng edu.ng
    com.pk net.pk org.pk gov.pk edu.pk
    com.co net.co org.co gov.co edu.co
    com.pe net.pe org.pe gob.pe edu.pe
"""
_MULTI_LABEL_SUFFIXES = frozenset(_SUFFIX_TABLE.split())


def normalize_domain(domain: str) -> str:
    """Lower-case, strip a trailing dot and IDNA-encode, so comparisons are exact."""
    text = domain.strip().rstrip(".").lower()
    try:
        return text.encode("idna").decode("ascii")
    except UnicodeError:
        return text


def organizational_domain(domain: str) -> str:
    """The registrable domain of ``domain`` (RFC 7489 §3.2), by the bundled heuristic."""
    labels = normalize_domain(domain).split(".")
    if len(labels) <= 2:
        return ".".join(labels)
    if ".".join(labels[-2:]) in _MULTI_LABEL_SUFFIXES:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def aligned(
    identifier: str,
    from_domain: str,
    mode: Alignment,
    org_domain: Callable[[str], str] = organizational_domain,
) -> bool:
    """Whether an authenticated identifier aligns with the From domain (RFC 7489 §3.1).

    Strict needs the exact domain; relaxed needs the same organisational domain.
    """
    a, b = normalize_domain(identifier), normalize_domain(from_domain)
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return org_domain(a) == org_domain(b)


@dataclass(frozen=True, slots=True)
class SpfVerdict:
    """SPF (RFC 7208) for the envelope: ``domain`` is MAIL FROM's, or HELO's for ``<>``."""

    result: SpfResult
    domain: str | None
    reason: str = ""
    identity: Literal["mailfrom", "helo"] = "mailfrom"


@dataclass(frozen=True, slots=True)
class DkimVerdict:
    """One DKIM signature (RFC 6376): its ``d=``, ``s=`` and what verifying it gave."""

    result: DkimResult
    domain: str | None = None
    selector: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DmarcVerdict:
    """DMARC (RFC 7489) for the From domain.

    ``policy`` is what the domain owner asked for on failure (already ``sp=`` when the
    From domain is a subdomain covered by its organisational record); ``aligned_by``
    names the mechanisms that produced an aligned pass (``"dkim"``, ``"spf"``).
    """

    result: DmarcResult
    domain: str | None = None
    policy: DmarcPolicy | None = None
    aligned_by: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ArcVerdict:
    """ARC chain validation (RFC 8617): ``none`` when the message carries no chain."""

    result: ArcResult
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """The parts of a ``v=DMARC1`` record the decision uses (``pct``/reporting ignored)."""

    policy: DmarcPolicy
    subdomain_policy: DmarcPolicy | None = None
    adkim: Alignment = "r"
    aspf: Alignment = "r"


_POLICIES: frozenset[str] = frozenset({"none", "quarantine", "reject"})


def parse_dmarc_record(text: str) -> DmarcRecord | None:
    """Parse a DMARC TXT record, or None when it is not one (RFC 7489 §6.3, §6.6.3).

    A record whose ``p=`` is missing or unknown is not a usable policy; unknown tags are
    ignored, and a bad ``adkim``/``aspf`` falls back to relaxed, as the RFC asks.
    """
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1":
        return None
    policy = tags.get("p", "").lower()
    if policy not in _POLICIES:
        return None
    sub = tags.get("sp", "").lower()
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return DmarcRecord(
        policy=policy,  # type: ignore[arg-type]  # checked against _POLICIES above
        subdomain_policy=sub if sub in _POLICIES else None,  # type: ignore[arg-type]
        adkim="s" if adkim == "s" else "r",
        aspf="s" if aspf == "s" else "r",
    )


def decide_dmarc(
    from_domain: str,
    record: DmarcRecord | None,
    record_domain: str | None,
    spf: SpfVerdict,
    dkim: Sequence[DkimVerdict],
    org_domain: Callable[[str], str] = organizational_domain,
) -> DmarcVerdict:
    """Decide DMARC for a message from facts already gathered.

    Args:
        from_domain: the single RFC 5322.From domain.
        record: the DMARC record found for it, or None when none was published.
        record_domain: where the record was found (the From domain or its
            organisational domain); decides whether ``sp=`` applies.
        spf: the SPF verdict (only a ``mailfrom`` pass can align; RFC 7489 §3.1.2).
        dkim: every DKIM signature's verdict; any aligned pass is enough.
        org_domain: organisational-domain function (the bundled heuristic by default).
    """
    domain = normalize_domain(from_domain)
    if record is None:
        return DmarcVerdict("none", domain, reason="no DMARC record published")
    policy: DmarcPolicy = record.policy
    if (
        record_domain is not None
        and normalize_domain(record_domain) != domain
        and record.subdomain_policy is not None
    ):
        policy = record.subdomain_policy
    aligned_by: list[str] = []
    if any(
        v.result == "pass" and v.domain and aligned(v.domain, domain, record.adkim, org_domain)
        for v in dkim
    ):
        aligned_by.append("dkim")
    if (
        spf.result == "pass"
        and spf.identity == "mailfrom"
        and spf.domain
        and aligned(spf.domain, domain, record.aspf, org_domain)
    ):
        aligned_by.append("spf")
    if aligned_by:
        return DmarcVerdict(
            "pass", domain, policy, tuple(aligned_by), reason="aligned " + "+".join(aligned_by)
        )
    passing = [f"dkim d={v.domain}" for v in dkim if v.result == "pass"]
    if spf.result == "pass":
        passing.append(f"spf {spf.identity}={spf.domain}")
    reason = (
        "passing identifiers not aligned with From: " + ", ".join(passing)
        if passing
        else "no passing SPF or DKIM identifier"
    )
    return DmarcVerdict("fail", domain, policy, (), reason=reason)


@dataclass(frozen=True, slots=True)
class AuthResults:
    """Everything sender authentication found for one message.

    ``dkim`` holds one verdict per signature (empty when the message was unsigned).
    """

    spf: SpfVerdict
    dkim: tuple[DkimVerdict, ...]
    dmarc: DmarcVerdict
    arc: ArcVerdict

    @property
    def sender_authenticated(self) -> bool:
        """True only when DMARC passed: the From domain is vouched for by SPF or DKIM.

        This is what a known-contact bypass must check (DESIGN §3): a spoofed ``From:``
        has no aligned pass, so it never skips the rules.
        """
        return self.dmarc.result == "pass"

    @property
    def dkim_result(self) -> DkimResult:
        """The best DKIM result across signatures (``none`` when unsigned)."""
        order: tuple[DkimResult, ...] = (
            "pass",
            "fail",
            "temperror",
            "permerror",
            "neutral",
        )
        found = {v.result for v in self.dkim}
        return next((r for r in order if r in found), "none")

    def header(self, authserv_id: str) -> str:
        """The ``Authentication-Results`` field (name included, no trailing CRLF).

        Folded with CRLF + space between methods so it can be prepended to raw bytes
        verbatim; see :func:`render_authentication_results`.
        """
        return "Authentication-Results: " + render_authentication_results(self, authserv_id)


# RFC 8601 §2.2 / RFC 2045 "value": a token, else a quoted-string.
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _value(text: str) -> str:
    """A property value as a token, or a quoted-string when it is not one.

    ``d=`` and MAIL FROM come from the sender, so they are never trusted to be tokens:
    a crafted domain must not inject a second ``;`` method or a fake ``dmarc=pass``.
    """
    text = _CONTROL.sub("", text)
    if _TOKEN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    """A reason as an RFC 5322 comment, with parentheses and backslashes escaped."""
    text = _CONTROL.sub(" ", text).strip()[:200]
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return f" ({escaped})" if escaped else ""


def render_authentication_results(results: AuthResults, authserv_id: str) -> str:
    """The field *value* of an RFC 8601 ``Authentication-Results`` for our results."""
    methods: list[str] = []
    spf = results.spf
    spf_text = f"spf={spf.result}{_comment(spf.reason)}"
    if spf.domain:
        spf_text += f" smtp.{spf.identity}={_value(spf.domain)}"
    methods.append(spf_text)
    if not results.dkim:
        methods.append("dkim=none (message not signed)")
    for v in results.dkim:
        text = f"dkim={v.result}{_comment(v.reason)}"
        if v.domain:
            text += f" header.d={_value(v.domain)}"
        if v.selector:
            text += f" header.s={_value(v.selector)}"
        methods.append(text)
    d = results.dmarc
    detail = d.reason
    if d.policy:
        detail = f"p={d.policy}" + (f", {detail}" if detail else "")
    dmarc_text = f"dmarc={d.result}{_comment(detail)}"
    if d.domain:
        dmarc_text += f" header.from={_value(d.domain)}"
    methods.append(dmarc_text)
    methods.append(f"arc={results.arc.result}{_comment(results.arc.reason)}")
    return _value(authserv_id) + ";\r\n " + ";\r\n ".join(methods)


_CFWS_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


def authserv_id_of(value: str) -> str | None:
    """The ``authserv-id`` an ``Authentication-Results`` value claims (lower-cased).

    Comments are dropped (one nesting level, which is what real headers carry), the
    optional version after the id is ignored, and a quoted id is unquoted.
    """
    text = _CFWS_COMMENT.sub(" ", value.replace("\r", " ").replace("\n", " "))
    head = text.split(";", 1)[0].strip()
    if not head:
        return None
    if head.startswith('"'):
        end = head.find('"', 1)
        token = head[1:end] if end > 0 else head[1:]
    else:
        token = head.split()[0]
    return token.strip().lower() or None


def forged_authentication_results(
    headers: Iterable[tuple[str, str]], authserv_id: str
) -> list[int]:
    """Indexes of ``Authentication-Results`` fields that claim our ``authserv-id``.

    RFC 8601 §5: such fields arriving from outside are forgeries (only we add them), and
    leaving them would let a sender pre-write ``dmarc=pass`` for a reader that trusts
    our id. Fields naming other servers are kept: they are someone else's claims.
    """
    ours = authserv_id.strip().lower()
    return [
        index
        for index, (name, value) in enumerate(headers)
        if name.strip().lower() == "authentication-results" and authserv_id_of(value) == ours
    ]


def strip_forged_authentication_results(
    headers: Sequence[tuple[str, str]], authserv_id: str
) -> list[tuple[str, str]]:
    """``headers`` without the fields :func:`forged_authentication_results` finds."""
    drop = set(forged_authentication_results(headers, authserv_id))
    return [field for index, field in enumerate(headers) if index not in drop]


def _header_end(raw: bytes) -> int:
    """Offset of the blank line ending the header block (``len(raw)`` when none)."""
    ends = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    return min(ends) if ends else len(raw)


def stamp_message(raw: bytes, header: str | None, authserv_id: str) -> bytes:
    """The bytes we store: ``raw`` with forged fields removed and our own prepended.

    What an MTA does on receipt (RFC 8601 §5): fields claiming ``authserv_id`` are
    removed, whole (continuation lines included), and our ``header`` (a complete
    ``Authentication-Results: ...`` field, may be None) goes on top, with the line
    ending the message itself uses. Every other byte is kept as received, so the
    stored copy is the received one plus a trace field, like a ``Received:`` line.
    """
    end = _header_end(raw)
    block = raw[:end]
    if b"authentication-results" in block.lower():
        kept: list[bytes] = []
        dropping = False
        ours = authserv_id.strip().lower()
        for line in block.splitlines(keepends=True):
            if line[:1] in (b" ", b"\t"):
                if not dropping:
                    kept.append(line)
                continue
            name, sep, value = line.partition(b":")
            dropping = bool(sep) and (
                name.strip().lower() == b"authentication-results"
                and authserv_id_of(value.decode("latin-1")) == ours
            )
            if not dropping:
                kept.append(line)
        stripped = b"".join(kept)
        rest = raw[end:]
        # The block's last line has no line end of its own: the separator supplies it.
        # If that last field was dropped, the kept text now ends with a line end that
        # would double the separator's, so it goes (and with no field left, the
        # separator's first line end goes instead).
        if stripped.endswith(b"\n"):
            stripped = stripped[: -2 if stripped.endswith(b"\r\n") else -1]
        elif not stripped and rest:
            rest = rest[2:] if rest.startswith(b"\r\n") else rest[1:]
        raw = stripped + rest
    if header is None:
        return raw
    first_end = raw.find(b"\n")
    newline = b"\n" if first_end > 0 and raw[first_end - 1 : first_end] != b"\r" else b"\r\n"
    field = header.encode("utf-8").replace(b"\r\n", newline)
    return field + newline + raw
