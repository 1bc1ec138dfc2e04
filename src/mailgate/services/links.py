"""Time-limited signed links: how an agent downloads bytes without its API key.

AgentMail hands out signed CDN URLs for attachments and raw messages; we hand out URLs
on this gateway whose query string carries ``expires`` (Unix seconds) and
``signature`` (HMAC-SHA256 over the purpose, the object id and the expiry). The
signature is the credential: whoever holds the link may fetch that one object, for
that one purpose, until it expires, and nothing else. Changing any of the three
breaks the signature; comparing it is constant-time.

The key is ``Settings.url_signing_secret`` or, when unset, 32 random bytes kept in
``<data_dir>/url-signing.key`` (mode 0600). That file is created by linking a fully
written temporary file into place, so two processes starting together both end up
reading the one key that won the link, and links minted by one verify on the other.
Several nodes on separate disks need a shared ``url_signing_secret``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal
from urllib.parse import quote, urlencode

from mailgate.clock import Clock, SystemClock
from mailgate.config import Settings
from mailgate.errors import ConfigError, NotFound

Purpose = Literal["attachment", "attachment-text", "raw", "draft-attachment"]

KEY_FILE: Final = "url-signing.key"
_KEY_BYTES: Final = 32
_MAX_SIGNATURE_CHARS: Final = 64


@dataclass(frozen=True, slots=True)
class SignedLink:
    url: str
    expires_at: datetime


class LinkSigner:
    """Mints and checks the links of :data:`Purpose` kinds (routes live in the API)."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self._settings = settings
        self._clock = clock or SystemClock()
        self._key: bytes | None = None

    @property
    def ttl_seconds(self) -> float:
        return self._settings.download_url_ttl_seconds

    def sign(self, purpose: Purpose, object_id: str, path: str) -> SignedLink:
        """A link to ``path`` (below the public base URL, starting with ``/``) that
        :meth:`verify` accepts for ``purpose`` and ``object_id`` until it expires.

        The expiry is rounded up to a whole second, so the link lives at least the TTL.
        """
        now = self._clock.now().timestamp()
        expires = math.ceil(now + self._settings.download_url_ttl_seconds)
        query = urlencode({"expires": expires, "signature": self._mac(purpose, object_id, expires)})
        url = f"{self._settings.effective_public_url}{quote(path)}?{query}"
        return SignedLink(url, datetime.fromtimestamp(expires, UTC))

    def verify(self, purpose: Purpose, object_id: str, expires: str, signature: str) -> None:
        """Raises:
        NotFound: a forged, altered or expired link (``extra['reason']`` says which).
            Not found rather than forbidden, so a link tells nothing about whether the
            object exists.
        """
        if not expires.isdigit() or len(expires) > 12 or len(signature) > _MAX_SIGNATURE_CHARS:
            raise NotFound("download link is not valid", reason="bad_signature")
        wanted = self._mac(purpose, object_id, int(expires))
        if not hmac.compare_digest(wanted.encode(), signature.encode()):
            raise NotFound("download link is not valid", reason="bad_signature")
        if int(expires) <= self._clock.now().timestamp():
            raise NotFound("download link has expired", reason="expired")

    def _mac(self, purpose: Purpose, object_id: str, expires: int) -> str:
        message = f"{purpose}\n{object_id}\n{expires}".encode()
        digest = hmac.new(self._signing_key(), message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def _signing_key(self) -> bytes:
        if self._key is None:
            secret = self._settings.url_signing_secret
            if secret is not None and secret.get_secret_value():
                self._key = secret.get_secret_value().encode()
            else:
                self._key = load_or_create_key(self._settings.data_dir / KEY_FILE)
        return self._key


def load_or_create_key(path: Path) -> bytes:
    """The key in ``path``, created (0600, atomically) if it does not exist yet.

    The new key is written and fsynced under a temporary name, then hard-linked to
    ``path``: ``link`` fails if another process got there first, and then both read
    the winner's key. A reader never sees a partly written file.
    """
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(_KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        temp.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    data = path.read_bytes()
    if len(data) < _KEY_BYTES:
        # Only a file someone else wrote by hand can be short: refuse a weak key.
        raise ConfigError(f"{path} holds fewer than {_KEY_BYTES} bytes")
    return data
