"""API keys: ``mxk_<key id>_<secret>``, stored as the SHA-256 of the secret (never the secret itself).

The secret is 32 random bytes, so a fast hash is safe here (there is no password to guess); comparison is
constant-time. Scopes nest: ``admin`` ⊇ ``write`` ⊇ ``read``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SCOPES = ("read", "write", "admin")
_RANK = {scope: i for i, scope in enumerate(SCOPES)}


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_scopes(scopes) -> list[str]:
    """``scopes`` sorted, if each is one of :data:`SCOPES`, else a ``ValueError`` naming them."""
    scopes = sorted(set(scopes))
    if not scopes or any(s not in SCOPES for s in scopes):
        raise ValueError(f"give one or more scopes of {', '.join(SCOPES)} (--scope), got {scopes}")
    return scopes


def create_key(store, scopes: list[str], name: str = "") -> str:
    """A new key with ``scopes`` in ``store``; returns the token (shown once: only its hash is kept)."""
    scopes = check_scopes(scopes)
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    store.add_key(key_id, _hash(secret), scopes, name)
    return f"mxk_{key_id}_{secret}"


def check_token(store, token: str | None) -> tuple[str, set[str]] | None:
    """``(key id, scopes)`` of a valid, unrevoked token, else None."""
    if not token or not token.startswith("mxk_") or token.count("_") < 2:
        return None
    key_id, _, secret = token[4:].partition("_")
    found = store.key(key_id)
    if found is None or not hmac.compare_digest(found[0], _hash(secret)):
        return None
    return key_id, set(found[1])


def allows(scopes: set[str], needed: str) -> bool:
    """Whether a key with ``scopes`` may do what ``needed`` guards (scopes nest)."""
    return any(_RANK[s] >= _RANK[needed] for s in scopes if s in _RANK)
