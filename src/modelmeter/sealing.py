"""Secrets at rest: AES-256-GCM under a key derived (HMAC-SHA256) from the admin token, one key per purpose.

What a database reader must not be able to use is stored sealed: kept Idempotency answers (a new API key's
secret), tenants' alert signing secrets. Replicas share the admin token, so any of them can open what another
sealed; a changed admin token makes old sealed values unreadable (``InvalidTag``), which their owners handle.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
_TEXT_PREFIX = "sealed:v1:"


class Sealer:
    """Seal and open bytes (bound to ``associated`` data) and short texts, for one ``purpose``."""

    def __init__(self, admin_token: str, purpose: bytes) -> None:
        self._aead = AESGCM(hmac.new(admin_token.encode(), purpose, hashlib.sha256).digest())

    def seal(self, data: bytes, associated: bytes = b"") -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, associated)

    def open(self, sealed: bytes, associated: bytes = b"") -> bytes:
        """Raises ``cryptography.exceptions.InvalidTag`` when not sealed by this key (or altered)."""
        return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)

    def seal_text(self, text: str, associated: str = "") -> str:
        """A text column's sealed form: ``sealed:v1:`` + base64 (fits where the plain text's ASCII did, x2)."""
        return _TEXT_PREFIX + base64.b64encode(self.seal(text.encode(), associated.encode())).decode()

    @staticmethod
    def is_sealed(stored: str) -> bool:
        return stored.startswith(_TEXT_PREFIX)

    def open_text(self, stored: str, associated: str = "") -> str:
        """The plain text of a sealed column; a value stored before sealing (no prefix) is returned as it is."""
        if not stored.startswith(_TEXT_PREFIX):
            return stored
        return self.open(base64.b64decode(stored[len(_TEXT_PREFIX):]), associated.encode()).decode()
