"""Documents signed with the management service's Ed25519 key.

Two kinds travel from the service to the data plane:

- a **credential** activates one cluster of one account until it expires;
- a **standing notice** gives a cluster's daemons the service's current view: which
  credentials are revoked, whether the account is in arrears, whether the cluster was
  deleted. A newer notice replaces an older one (compare `issued`).

Wire form: `ems1.<payload>.<signature>`, both parts base64url without padding. The payload
is compact JSON with sorted keys; the signature covers the ASCII text `ems1.<payload>`.
Verification checks the signature before it reads any field, then the kind, so a notice can
never pass for a credential.
"""
from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PREFIX = "ems1"
# A token longer than its kind's limit is rejected before decoding. A standing notice lists
# about 32 characters per revoked credential, so it needs more room than a credential. It
# must still fit in one znode, whose size ZooKeeper limits to about 1 MiB by default.
MAX_TOKEN_CHARS = 8192
MAX_STANDING_CHARS = 512 << 10


class TokenError(ValueError):
    """A token that is malformed, forged, of the wrong kind, or for another cluster."""


@dataclass(frozen=True)
class Credential:
    """An activation credential: `account` may run `cluster` until `expires` (Unix s)."""

    id: str
    account: str
    cluster: str
    issued: int
    expires: int

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires


@dataclass(frozen=True)
class Standing:
    """The service's view of a cluster at `issued` (Unix ms, for ordering)."""

    account: str
    cluster: str
    issued: int
    revoked: frozenset[str] = field(default_factory=frozenset)   # credential ids
    arrears: bool = False
    deleted: bool = False


# ---- keys ------------------------------------------------------------------------------

def new_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: str) -> None:
    """Write the key as unencrypted PKCS#8 PEM, readable by the owner only."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: str) -> Ed25519PrivateKey:
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


def load_public_key(path: str) -> Ed25519PublicKey:
    """Read the service's public key (PEM), as `ems manage init` wrote it."""
    with open(path, "rb") as f:
        return parse_public_key(f.read(), path)


def parse_public_key(pem: bytes, source: str = "public key") -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(f"{source} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{source} is not an Ed25519 public key")
    return key


# ---- signing ---------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: Ed25519PrivateKey, payload: dict) -> str:
    body = _b64(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    signed = f"{PREFIX}.{body}"
    return f"{signed}.{_b64(key.sign(signed.encode('ascii')))}"


def _verify(public_key: Ed25519PublicKey, token: str, kind: str, max_chars: int) -> dict:
    """Return the payload of a token whose signature is good, else raise TokenError."""
    token = token.strip()
    if len(token) > max_chars:
        raise TokenError(f"{kind} is {len(token)} characters long; the limit is {max_chars}")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenError(f"{kind} is not an EMS token (expected '{PREFIX}.PAYLOAD.SIGNATURE')")
    try:
        signature = _unb64(parts[2])
        public_key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"))
    except (InvalidSignature, ValueError, UnicodeEncodeError):
        raise TokenError(f"{kind} signature does not verify with the management service's "
                         f"public key: forged, altered, or issued by another service") from None
    try:
        payload = json.loads(_unb64(parts[1]))
    except ValueError:
        raise TokenError(f"{kind} payload is not JSON") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        raise TokenError(f"token is a {payload.get('kind') if isinstance(payload, dict) else '?'}"
                         f", not a {kind}")
    return payload


def sign_credential(key: Ed25519PrivateKey, credential: Credential) -> str:
    return _sign(key, {"kind": "credential", "id": credential.id, "account": credential.account,
                       "cluster": credential.cluster, "issued": credential.issued,
                       "expires": credential.expires})


def sign_standing(key: Ed25519PrivateKey, standing: Standing) -> str:
    return _sign(key, {"kind": "standing", "account": standing.account,
                       "cluster": standing.cluster, "issued": standing.issued,
                       "revoked": sorted(standing.revoked), "arrears": standing.arrears,
                       "deleted": standing.deleted})


def parse_credential(public_key: Ed25519PublicKey, token: str) -> Credential:
    """Check signature, kind and fields, but neither cluster nor expiry; return the
    credential. Raises TokenError. Daemons use it to tell an expired or other-cluster
    credential from a forged one."""
    payload = _verify(public_key, token, "credential", MAX_TOKEN_CHARS)
    try:
        return Credential(id=str(payload["id"]), account=str(payload["account"]),
                          cluster=str(payload["cluster"]), issued=int(payload["issued"]),
                          expires=int(payload["expires"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise TokenError(f"credential lacks a valid field: {exc}") from None


def verify_credential(public_key: Ed25519PublicKey, token: str, *, cluster: str | None = None,
                      now: float | None = None) -> Credential:
    """Check signature, kind, cluster (when given) and expiry; return the credential.
    Raises TokenError with the reason."""
    credential = parse_credential(public_key, token)
    if cluster is not None and credential.cluster != cluster:
        raise TokenError(f"credential {credential.id} is for cluster {credential.cluster!r}, "
                         f"not {cluster!r}")
    if credential.expired(now):
        raise TokenError(f"credential {credential.id} expired at "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(credential.expires))}")
    return credential


def verify_standing(public_key: Ed25519PublicKey, token: str, *, cluster: str) -> Standing:
    """Check signature, kind and cluster; return the notice. Raises TokenError."""
    payload = _verify(public_key, token, "standing", MAX_STANDING_CHARS)
    try:
        standing = Standing(account=str(payload["account"]), cluster=str(payload["cluster"]),
                            issued=int(payload["issued"]),
                            revoked=frozenset(str(i) for i in payload["revoked"]),
                            arrears=bool(payload["arrears"]), deleted=bool(payload["deleted"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise TokenError(f"standing notice lacks a valid field: {exc}") from None
    if standing.cluster != cluster:
        raise TokenError(f"standing notice is for cluster {standing.cluster!r}, not {cluster!r}")
    return standing
