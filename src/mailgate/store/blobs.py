"""Content-addressed blob store: raw MIME and attachment bytes, keyed by SHA-256.

Two tiers behind one port (:class:`TieredBlobStore`):

* **small blobs** (up to ``blob_inline_max`` bytes, most mail) are rows of the ``blobs``
  table, written *inside* the transaction that stores the message. They commit
  atomically with it and share its group-commit fsync. As files they would cost two
  fsyncs each (file, then folder), which measured as the largest cost of ingesting a
  4 KB message.
* **large blobs** are files: written to a temporary file, fsynced, renamed into place
  and the folder fsynced, so they are durable *before* the row naming them commits.
  Orphans (a file written for a transaction that then failed) are harmless.

Either way the same content is stored once however many messages carry it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, select

from mailgate.errors import NotFound
from mailgate.store.db import Database
from mailgate.store.dialect import insert_ignoring_conflicts
from mailgate.store.schema import blobs as blob_rows


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


class TieredBlobStore:
    """Small blobs in the database, large ones in a file store (see the module doc)."""

    def __init__(self, db: Database, files: BlobStore, inline_max: int) -> None:
        self.db = db
        self.files = files
        self.inline_max = inline_max

    def inlines(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes belongs in the database tier."""
        return size <= self.inline_max

    def put_in(self, conn: Connection, data: bytes, sha256: str) -> None:
        """Store a small blob inside the caller's transaction (idempotent)."""
        self.put_many_in(conn, {sha256: data})

    def put_many_in(self, conn: Connection, blobs: dict[str, bytes]) -> None:
        """Store small blobs (digest -> bytes) inside the caller's transaction."""
        insert_ignoring_conflicts(
            conn,
            blob_rows,
            [
                {"sha256": sha, "size": len(data), "data": bytes(data)}
                for sha, data in blobs.items()
            ],
        )

    def put(self, data: bytes, sha256: str | None = None) -> str:
        digest = sha256 or hashlib.sha256(data).hexdigest()
        if not self.inlines(len(data)):
            return self.files.put(data, digest)
        with self.db.write() as conn:
            self.put_in(conn, data, digest)
        return digest

    def get(self, sha256: str) -> bytes:
        with self.db.read() as conn:
            data = conn.execute(
                select(blob_rows.c.data).where(blob_rows.c.sha256 == sha256)
            ).scalar()
        if data is not None:
            return bytes(data)
        return self.files.get(sha256)

    def exists(self, sha256: str) -> bool:
        with self.db.read() as conn:
            found = conn.execute(
                select(blob_rows.c.sha256).where(blob_rows.c.sha256 == sha256)
            ).first()
        return found is not None or self.files.exists(sha256)


class LocalBlobStore:
    """Blobs as files under ``root/ab/<sha256>``.

    One level of 256 folders: a second level would create (and fsync) a new folder
    for nearly every blob until there are millions.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise NotFound("no such blob")
        return self.root / sha256[:2] / sha256

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
