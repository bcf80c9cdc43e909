"""IDs that say what they are: img-…, fn-…, call-…, ctr-…, node-…, snap-…."""
from __future__ import annotations

import hashlib
import secrets


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_id(prefix: str, nbytes: int = 8) -> str:
    return f"{prefix}-{secrets.token_hex(nbytes)}"


def content_id(prefix: str, data: bytes, length: int = 24) -> str:
    return f"{prefix}-{digest(data)[:length]}"


def is_hex_digest(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)
