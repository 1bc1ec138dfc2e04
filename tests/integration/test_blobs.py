"""The tiered blob store: small blobs in the database, large ones as files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mailgate.errors import NotFound
from mailgate.store.blobs import LocalBlobStore, MemoryBlobStore, TieredBlobStore
from mailgate.store.db import Database


@pytest.fixture
def store(db: Database, tmp_path: Path) -> TieredBlobStore:
    return TieredBlobStore(db, LocalBlobStore(tmp_path / "files"), inline_max=1024)


def test_small_blobs_go_to_the_database_and_large_ones_to_files(
    store: TieredBlobStore, tmp_path: Path
) -> None:
    small, large = b"s" * 1024, b"L" * 1025
    small_sha, large_sha = store.put(small), store.put(large)
    assert store.get(small_sha) == small and store.get(large_sha) == large
    files = {p.name for p in (tmp_path / "files").rglob("*") if p.is_file()}
    assert files == {large_sha}
    assert small_sha == hashlib.sha256(small).hexdigest()


def test_putting_the_same_content_twice_stores_it_once(store: TieredBlobStore) -> None:
    sha = store.put(b"same")
    assert store.put(b"same") == sha
    with store.db.write() as conn:
        store.put_in(conn, b"same", sha)  # idempotent inside a transaction too
    assert store.get(sha) == b"same" and store.exists(sha)


def test_a_missing_or_malformed_digest_is_not_found(store: TieredBlobStore) -> None:
    with pytest.raises(NotFound):
        store.get("0" * 64)
    with pytest.raises(NotFound):
        store.get("../../etc/passwd")
    assert not store.exists("0" * 64)


def test_a_blob_put_in_a_rolled_back_transaction_is_not_stored(store: TieredBlobStore) -> None:
    sha = hashlib.sha256(b"gone").hexdigest()
    with pytest.raises(RuntimeError), store.db.write() as conn:
        store.put_in(conn, b"gone", sha)
        raise RuntimeError("abort")
    assert not store.exists(sha)


def test_any_store_can_be_the_large_tier_behind_the_same_port(db: Database) -> None:
    """The large-blob tier is a port: the in-memory fake stands in for the folder
    (as an S3-compatible store could)."""
    fake = MemoryBlobStore()
    store = TieredBlobStore(db, fake, inline_max=4)
    small, large = store.put(b"tiny"), store.put(b"larger")
    assert set(fake.blobs) == {large}
    assert store.get(small) == b"tiny" and store.get(large) == b"larger"
