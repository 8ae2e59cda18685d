"""HMAC-SHA256 request signing of the management API.

A client signs every request with its secret access key. The string to sign is, one item
per line:

    EMS-HMAC-SHA256
    METHOD                      upper case
    /path                       as sent, percent-encoded
    canonical query             pairs sorted by name then value, each part percent-encoded
                                (RFC 3986 unreserved characters kept), joined with '&'
    hex SHA-256 of the body     of the empty string when there is none
    timestamp                   Unix seconds, as in X-EMS-Timestamp
    nonce                       as in X-EMS-Nonce, 16 to 64 characters [A-Za-z0-9_-]
    access key id               as in X-EMS-Key-Id

and X-EMS-Signature carries the hex HMAC-SHA256 of it under the secret. The service
rejects a request whose timestamp is more than MAX_SKEW_S away from its clock, and a nonce
it has seen from the same key within that window (a replay).
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from urllib.parse import parse_qsl, quote

ALGORITHM = "EMS-HMAC-SHA256"
MAX_SKEW_S = 300
HEADER_KEY_ID = "X-EMS-Key-Id"
HEADER_TIMESTAMP = "X-EMS-Timestamp"
HEADER_NONCE = "X-EMS-Nonce"
HEADER_SIGNATURE = "X-EMS-Signature"
NONCE_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,64}")
# The form of ems.manage.sealing.new_access_key's ids, which no secret access key has. A
# header of another form is never echoed or logged, because it may be a secret sent in the
# wrong header.
KEY_ID_PATTERN = re.compile(r"EK[A-Z0-9]{18}")
# ASCII digits only, because int() also accepts signs, spaces, underscores and digits of
# other scripts, and a 400-digit number overflows the float arithmetic of check_fresh.
TIMESTAMP_PATTERN = re.compile(r"[0-9]{1,15}")
SIGNATURE_PATTERN = re.compile(r"[0-9A-Fa-f]{64}")


def canonical_query(query: str) -> str:
    pairs = sorted(parse_qsl(query, keep_blank_values=True))
    return "&".join(f"{quote(name, safe='-_.~')}={quote(value, safe='-_.~')}"
                    for name, value in pairs)


def check_query(query: str) -> None:
    """Raise ValueError for a query that names a parameter twice. The canonical query sorts
    repeated values, so the signature does not fix their order, and the API reads the last
    one: reordering them would change the request without changing its signature."""
    seen = set()
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if name in seen:
            raise ValueError(f"query parameter {name[:40]!r} appears more than once; send "
                             f"each parameter once")
        seen.add(name)


def string_to_sign(method: str, path: str, query: str, body: bytes, timestamp: str,
                   nonce: str, key_id: str) -> str:
    return "\n".join([ALGORITHM, method.upper(), path, canonical_query(query),
                      hashlib.sha256(body).hexdigest(), timestamp, nonce, key_id])


def signature(secret: str, text: str) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def sign_headers(key_id: str, secret: str, method: str, path: str, query: str = "",
                 body: bytes = b"", now: float | None = None, nonce: str | None = None) -> dict:
    """Headers that authenticate one request."""
    timestamp = str(int(time.time() if now is None else now))
    nonce = nonce or secrets.token_urlsafe(18)
    text = string_to_sign(method, path, query, body, timestamp, nonce, key_id)
    return {HEADER_KEY_ID: key_id, HEADER_TIMESTAMP: timestamp, HEADER_NONCE: nonce,
            HEADER_SIGNATURE: signature(secret, text)}


class SignatureError(Exception):
    """Raised for a request that does not authenticate. The message is the reason that the
    401 response carries, and `reason` names its kind for metrics (missing_header,
    malformed_header, unknown_key, stale, bad_signature or replayed)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def check_headers(headers) -> tuple[str, int, str, str]:
    """Return (key id, timestamp, nonce, signature) or raise SignatureError naming what is
    missing or malformed. `headers` is case-insensitive (a Starlette Headers object)."""
    values = {}
    for name in (HEADER_KEY_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE):
        value = headers.get(name)
        if not value:
            raise SignatureError(f"missing header {name}: every request must be signed "
                                 f"(see docs/management.md, 'Signing requests')",
                                 reason="missing_header")
        values[name] = value
    if not KEY_ID_PATTERN.fullmatch(values[HEADER_KEY_ID]):
        raise SignatureError(f"{HEADER_KEY_ID} is not an access key id ('EK' and 18 capital "
                             f"letters or digits); check that the key id and the secret are "
                             f"not swapped", reason="malformed_header")
    if not TIMESTAMP_PATTERN.fullmatch(values[HEADER_TIMESTAMP]):
        raise SignatureError(f"{HEADER_TIMESTAMP} {values[HEADER_TIMESTAMP][:32]!r} is not "
                             f"Unix seconds (1 to 15 decimal digits)", reason="malformed_header")
    nonce = values[HEADER_NONCE]
    if not NONCE_PATTERN.fullmatch(nonce):
        raise SignatureError(f"{HEADER_NONCE} must be 16 to 64 characters from "
                             f"A-Z a-z 0-9 _ -", reason="malformed_header")
    if not SIGNATURE_PATTERN.fullmatch(values[HEADER_SIGNATURE]):
        raise SignatureError(f"{HEADER_SIGNATURE} must be 64 hexadecimal digits (the "
                             f"HMAC-SHA256 of the string to sign)", reason="malformed_header")
    return values[HEADER_KEY_ID], int(values[HEADER_TIMESTAMP]), nonce, values[HEADER_SIGNATURE]


def check_fresh(timestamp: int, now: float) -> None:
    skew = timestamp - now
    if abs(skew) > MAX_SKEW_S:
        raise SignatureError(f"stale request: its timestamp is {abs(skew):.0f} s "
                             f"{'ahead of' if skew > 0 else 'behind'} the service clock "
                             f"(limit {MAX_SKEW_S} s); check the client's clock",
                             reason="stale")


def check_signature(secret: str, text: str, given: str) -> None:
    if not hmac.compare_digest(signature(secret, text), given.lower()):
        raise SignatureError("signature does not match: wrong secret key, or the request was "
                             "changed after signing", reason="bad_signature")
