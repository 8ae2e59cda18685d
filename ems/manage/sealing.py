"""Secret access keys at rest: sealed with AES-256-GCM under the service's master key.

HMAC verification needs the secret itself, so it cannot be stored as a one-way hash. It
is encrypted instead, with the access key id as associated data, so a sealed secret copied
to another key id does not decrypt. The master key is a 32-byte file readable by the service's
user only.
"""
from __future__ import annotations

import os
import secrets
import string

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_KEY_BYTES = 32
NONCE_BYTES = 12
KEY_ID_ALPHABET = string.ascii_uppercase + string.digits


def new_master_key(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(AESGCM.generate_key(bit_length=8 * MASTER_KEY_BYTES))


def load_master_key(path: str) -> bytes:
    with open(path, "rb") as f:
        key = f.read()
    if len(key) != MASTER_KEY_BYTES:
        raise ValueError(f"master key {path} has {len(key)} bytes; expected {MASTER_KEY_BYTES}")
    return key


def new_access_key() -> tuple[str, str]:
    """Generate an (access key id, secret access key) pair: 'EK' and 18 characters, and
    40 characters."""
    key_id = "EK" + "".join(secrets.choice(KEY_ID_ALPHABET) for _ in range(18))
    return key_id, secrets.token_urlsafe(30)


def seal(master: bytes, key_id: str, secret: str) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(master).encrypt(nonce, secret.encode(), key_id.encode())


def unseal(master: bytes, key_id: str, sealed: bytes) -> str:
    nonce, box = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
    return AESGCM(master).decrypt(nonce, box, key_id.encode()).decode()
