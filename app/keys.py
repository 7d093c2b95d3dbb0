"""API keys: made here, shown once, kept in the store as a SHA-256 hash.

A key is 32 random bytes, so a plain hash is as good as a slow one: nothing short of the key itself
finds it. The name says whose it is; requests are journalled under it.
"""

import hashlib
import re
import secrets

from llmd.engine.errors import LlmdError

from .store import Store

PREFIX = "llmd-"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
KEY = re.compile(r"llmd-[A-Za-z0-9_-]{43}")


class BadKeyName(LlmdError): ...


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: Store, name: str) -> str:
    """A new key for `name`: returned once, stored as its hash."""
    if not NAME.fullmatch(name or ""):
        raise BadKeyName("a key's name is 1-64 letters, digits or _.@- (starting with a letter or digit)")
    key = PREFIX + secrets.token_urlsafe(32)
    store.add_key(name, digest(key))
    return key


def key_name(store: Store, key: str) -> str | None:
    """The name of the live key `key`, or None (malformed, unknown or revoked)."""
    if not KEY.fullmatch(key or ""):
        return None
    return store.key_named_by_hash(digest(key))
