"""Public identifiers: a type prefix plus a time-ordered, URL-safe, random suffix.

Ordering by creation time keeps indexes append-mostly and makes ids readable in logs;
80 random bits make them unguessable enough that a wrong id is simply ``404``.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def _b32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id(prefix: str) -> str:
    """A new id such as ``msg_01jd3v8x2k4m6q8s0t2w4y6a8c``: 48-bit ms clock + 80 random bits."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    return f"{prefix}_{_b32(millis, 10)}{_b32(rand, 16)}"
