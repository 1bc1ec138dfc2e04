"""Content-addressed blob store: raw MIME and attachment bytes, keyed by SHA-256.

A blob is written to a temporary file, fsynced, renamed into place and its folder
fsynced, so it is durable *before* the database row that names it commits. The same
content is stored once however many messages carry it. Orphans (a blob written for a
transaction that then failed) are harmless and left for a later sweep.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Protocol

from mailgate.errors import NotFound


class BlobStore(Protocol):
    """The port: a local folder now; an S3-compatible store can implement the same."""

    def put(self, data: bytes, sha256: str | None = None) -> str:
        """Store ``data`` durably and return its SHA-256 hex digest."""
        ...

    def get(self, sha256: str) -> bytes:
        """Return the bytes of a blob.

        Raises:
            NotFound: no blob has that digest.
        """
        ...

    def exists(self, sha256: str) -> bool: ...


class LocalBlobStore:
    """Blobs as files under ``root/ab/cd/<sha256>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise NotFound("no such blob")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, data: bytes, sha256: str | None = None) -> str:
        digest = sha256 or hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if path.exists():
            return digest
        folder = path.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(folder.parent)
        tmp = folder / f".{digest}.{secrets.token_hex(8)}.tmp"  # unique per writer
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(folder)
        return digest

    def get(self, sha256: str) -> bytes:
        try:
            return self._path(sha256).read_bytes()
        except FileNotFoundError:
            raise NotFound("no such blob") from None

    def exists(self, sha256: str) -> bool:
        try:
            return self._path(sha256).exists()
        except NotFound:
            return False


class MemoryBlobStore:
    """The fast fake for unit tests."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, data: bytes, sha256: str | None = None) -> str:
        digest = sha256 or hashlib.sha256(data).hexdigest()
        self.blobs.setdefault(digest, bytes(data))
        return digest

    def get(self, sha256: str) -> bytes:
        try:
            return self.blobs[sha256]
        except KeyError:
            raise NotFound("no such blob") from None

    def exists(self, sha256: str) -> bool:
        return sha256 in self.blobs


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
