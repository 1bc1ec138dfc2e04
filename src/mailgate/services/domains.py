"""Sending domains: the DKIM key each one signs with, and the signer delivery uses.

Domains are gateway-wide (one key per domain, whoever sends from it): the gateway, not
a workspace, answers for what is signed with its keys. Adding a domain generates a key
and returns the DNS records the owner must publish; nothing is signed for a domain that
is not added. The private key is stored in the database (the deployment's secret store
for everything else too) and never leaves it through the API or CLI.

Delivery asks :meth:`DomainService.signer_for` for every message, so answers (found or
not) are cached in process for :data:`SIGNER_CACHE_SECONDS`; a change made by this
process drops the cache at once, other processes see it within that time.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from mailgate.clock import Clock
from mailgate.domain import signing
from mailgate.domain.signing import DnsRecord
from mailgate.errors import Conflict, NotFound, ValidationFailed
from mailgate.services import audit
from mailgate.store.db import Database
from mailgate.store.schema import sending_domains

SIGNER_CACHE_SECONDS = 5.0
DEFAULT_SELECTOR = "mailgate"

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class SendingDomain:
    domain: str
    selector: str
    public_key_b64: str
    created_at: datetime

    @property
    def records(self) -> list[DnsRecord]:
        """The DNS records to publish for this domain."""
        return signing.dns_records(self.domain, self.selector, self.public_key_b64)


@dataclass(frozen=True, slots=True)
class DomainAdded:
    domain: SendingDomain
    records: list[DnsRecord]


@dataclass(frozen=True, slots=True)
class Signer:
    """Signs for one domain; holds the private key, so it never leaves the process."""

    domain: str
    selector: str
    private_key_pem: str

    def sign(self, raw: bytes) -> bytes:
        """``raw`` with this domain's ``DKIM-Signature`` on top.

        Raises:
            SigningError: the message cannot be signed (no ``From``, for instance).
        """
        return signing.sign(
            raw, domain=self.domain, selector=self.selector, private_key_pem=self.private_key_pem
        )


def normalise_domain(value: str, *, field: str = "domain") -> str:
    """A domain as stored: lower case, IDNA (``bücher.example`` -> ``xn--bcher-kva...``),
    no trailing dot.

    Raises:
        ValidationFailed: not a host name with at least two labels.
    """
    text = value.strip().rstrip(".").lower()
    try:
        text = text.encode("idna").decode("ascii")
    except UnicodeError:
        raise _invalid(field, "not a valid domain name") from None
    labels = text.split(".")
    if len(text) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise _invalid(field, "not a valid domain name")
    if labels[-1].isdigit():
        raise _invalid(field, "an IP address is not a domain")
    return text


def _normalise_selector(value: str) -> str:
    selector = value.strip().lower()
    if not all(_LABEL.match(label) for label in selector.split(".")):
        raise _invalid("selector", "letters, digits and hyphens (dot-separated labels)")
    return selector


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"{field}: {message}", errors=[{"field": field, "message": message}])


class DomainService:
    """Adds, lists and removes sending domains; hands delivery the right signer."""

    def __init__(self, db: Database, clock: Clock, *, key_bits: int = 2048) -> None:
        self.db = db
        self.clock = clock
        self.key_bits = key_bits
        self._cache: dict[str, tuple[float, Signer | None]] = {}
        self._lock = threading.Lock()

    def add(
        self, domain: str, *, selector: str = DEFAULT_SELECTOR, actor: str = "cli"
    ) -> DomainAdded:
        """Generate a DKIM key for ``domain`` and store it; returns the DNS records.

        Raises:
            ValidationFailed: a malformed domain or selector.
            Conflict: the domain is already added (remove it first to rotate the key).
        """
        name = normalise_domain(domain)
        selector = _normalise_selector(selector)
        private_pem, public_b64 = signing.generate_key(self.key_bits)
        now = self.clock.now()
        try:
            with self.db.write() as conn:
                if conn.execute(
                    select(sending_domains.c.domain).where(sending_domains.c.domain == name)
                ).first():
                    raise Conflict(f"{name} is already a sending domain", field="domain")
                conn.execute(
                    sending_domains.insert().values(
                        domain=name,
                        selector=selector,
                        private_key_pem=private_pem,
                        public_key_b64=public_b64,
                        created_at=now,
                    )
                )
                audit.record(
                    conn, workspace_id=None, actor=actor, action="domain.added", at=now,
                    target_type="sending_domain", target_id=name, selector=selector,
                )  # fmt: skip
        except IntegrityError:  # another process added it between our check and insert
            raise Conflict(f"{name} is already a sending domain", field="domain") from None
        self._forget(name)
        added = SendingDomain(name, selector, public_b64, now)
        return DomainAdded(added, added.records)

    def list(self) -> list[SendingDomain]:
        """Every sending domain, alphabetically."""
        query = select(
            sending_domains.c.domain,
            sending_domains.c.selector,
            sending_domains.c.public_key_b64,
            sending_domains.c.created_at,
        ).order_by(sending_domains.c.domain)
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        return [SendingDomain(r.domain, r.selector, r.public_key_b64, r.created_at) for r in rows]

    def get(self, domain: str) -> SendingDomain:
        """One sending domain (for its records).

        Raises:
            ValidationFailed: a malformed domain.
            NotFound: the domain is not added.
        """
        name = normalise_domain(domain)
        found = [d for d in self.list() if d.domain == name]
        if not found:
            raise NotFound(f"{name} is not a sending domain")
        return found[0]

    def remove(self, domain: str, *, actor: str = "cli") -> str:
        """Forget the domain and its key: mail from it is no longer signed. Returns the
        domain as stored (normalised).

        Raises:
            ValidationFailed: a malformed domain.
            NotFound: the domain is not added.
        """
        name = normalise_domain(domain)
        now = self.clock.now()
        with self.db.write() as conn:
            gone = conn.execute(delete(sending_domains).where(sending_domains.c.domain == name))
            if gone.rowcount == 0:
                raise NotFound(f"{name} is not a sending domain")
            audit.record(
                conn, workspace_id=None, actor=actor, action="domain.removed", at=now,
                target_type="sending_domain", target_id=name,
            )  # fmt: skip
        self._forget(name)
        return name

    def signer_for(self, domain: str) -> Signer | None:
        """The signer for mail from ``domain`` (the ``From`` address's domain), or None
        when the domain is not added (the mail goes unsigned). Cached: a hit costs no
        I/O; a miss is one indexed read (call it off the event loop)."""
        try:
            name = normalise_domain(domain)
        except ValidationFailed:
            return None
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        with self.db.read() as conn:
            row = conn.execute(
                select(sending_domains.c.selector, sending_domains.c.private_key_pem).where(
                    sending_domains.c.domain == name
                )
            ).first()
        signer = Signer(name, row.selector, row.private_key_pem) if row is not None else None
        with self._lock:
            self._cache[name] = (now + SIGNER_CACHE_SECONDS, signer)
        return signer

    def _forget(self, name: str) -> None:
        with self._lock:
            self._cache.pop(name, None)
