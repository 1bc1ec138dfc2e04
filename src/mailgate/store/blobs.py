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

Deleting is for retention only, and must survive a race that content addressing
invites: an ingest may be storing the very bytes being deleted, and names them in a
row that commits only later. The database tier is guarded by a table lock
(:meth:`TieredBlobStore.lock_for_delete`); the file tier by modification times: a
``put`` of bytes already stored refreshes the file's mtime, and :meth:`LocalBlobStore.delete`
spares any file modified within a grace period (see there).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Collection
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, delete, select, text

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

    def delete(self, sha256: str, *, grace_seconds: float) -> bool:
        """Delete a blob unless it was put (written, or put again) within the last
        ``grace_seconds``; True if it is gone now. The caller must know that nothing
        references it; the grace covers writers that are about to.
        """
        ...


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

    def lock_for_delete(self, conn: Connection) -> None:
        """Make the caller's transaction safe for deleting blob rows it has found
        unreferenced.

        Every ingest writes the rows of its small blobs (``INSERT ... ON CONFLICT DO
        NOTHING``, which finds an existing row and does nothing) in the transaction
        that inserts the message naming them. On PostgreSQL this takes a SHARE ROW
        EXCLUSIVE lock on ``blobs``: it waits for every transaction that has written
        blob rows to finish, so their messages are visible to the caller's next
        statement, and holds back new writers until the caller commits; their insert
        then finds no row and writes it again. It conflicts with itself, so two purges
        take turns. On SQLite the caller already is the only writer.
        """
        if conn.dialect.name == "postgresql":
            conn.execute(text("LOCK TABLE blobs IN SHARE ROW EXCLUSIVE MODE"))

    def delete_rows_in(self, conn: Connection, shas: Collection[str]) -> int:
        """Delete database-tier blobs in the caller's transaction (after
        :meth:`lock_for_delete` and its own reference check); returns how many went."""
        if not shas:
            return 0
        return conn.execute(delete(blob_rows).where(blob_rows.c.sha256.in_(sorted(shas)))).rowcount

    def delete(self, sha256: str, *, grace_seconds: float) -> bool:
        """Delete a blob from both tiers (the row under :meth:`lock_for_delete`, the
        file only outside its grace period). Callers that must check references in
        the same transaction use :meth:`delete_rows_in` instead."""
        with self.db.write() as conn:
            self.lock_for_delete(conn)
            row = self.delete_rows_in(conn, [sha256])
        return self.files.delete(sha256, grace_seconds=grace_seconds) or bool(row)


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
        try:
            # Already stored: refresh its mtime, which tells a concurrent delete that
            # someone is about to reference these bytes (see delete()).
            os.utime(path)
            return digest
        except FileNotFoundError:
            pass
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

    def delete(self, sha256: str, *, grace_seconds: float) -> bool:
        """Delete the file unless it was modified within ``grace_seconds``.

        The race it must survive: an ingest puts bytes already stored (the put
        only refreshes the mtime), then commits a row naming them, while retention,
        which found no such row, deletes the file. The ingest's put-to-commit time is
        milliseconds, far below any sensible grace, so a file it touched is spared.
        To close the gap between reading the mtime and unlinking, the file is first
        renamed aside and its mtime read again *after* the rename: a put that touched
        it before the rename shows in that mtime (the file is put back), and a put
        after the rename finds no file and writes a fresh one. Putting back replaces
        whatever a writer made meanwhile with identical bytes, so either way the
        digest's file ends up present.
        """
        try:
            path = self._path(sha256)
            if _recent(path.stat().st_mtime, grace_seconds):
                return False
            aside = path.with_name(f".{sha256}.{secrets.token_hex(8)}.purge")
            os.rename(path, aside)
        except (FileNotFoundError, NotFound):
            return False
        if _recent(aside.stat().st_mtime, grace_seconds):
            os.replace(aside, path)
            _fsync_dir(path.parent)
            return False
        aside.unlink()
        return True


class MemoryBlobStore:
    """The fast fake for unit tests."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.put_at: dict[str, float] = {}

    def put(self, data: bytes, sha256: str | None = None) -> str:
        digest = sha256 or hashlib.sha256(data).hexdigest()
        self.blobs.setdefault(digest, bytes(data))
        self.put_at[digest] = time.time()
        return digest

    def get(self, sha256: str) -> bytes:
        try:
            return self.blobs[sha256]
        except KeyError:
            raise NotFound("no such blob") from None

    def exists(self, sha256: str) -> bool:
        return sha256 in self.blobs

    def delete(self, sha256: str, *, grace_seconds: float) -> bool:
        if sha256 not in self.blobs or _recent(self.put_at[sha256], grace_seconds):
            return False
        del self.blobs[sha256], self.put_at[sha256]
        return True


def _recent(mtime: float, grace_seconds: float) -> bool:
    return time.time() - mtime < grace_seconds


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
