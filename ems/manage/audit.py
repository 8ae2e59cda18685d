"""The audit log: one JSON line per management call, appended to audit.log.

Fields: time (UTC, ISO 8601), account (null when the call did not authenticate), key_id,
action, resource, result (the HTTP status), reason (why it failed, if it did), remote.
Bodies, headers and secrets are never written.
"""
from __future__ import annotations

import json
import os
import threading
import time


MAX_FIELD_CHARS = 500   # a longer action, resource or reason is cut to this length


def _cut(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_FIELD_CHARS:
        return text
    return f"{text[:MAX_FIELD_CHARS]}... ({len(text)} characters)"


class AuditLog:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def write(self, *, account: str | None, key_id: str | None, action: str,
              resource: str | None, result: int, reason: str | None, remote: str | None,
              now: float | None = None) -> None:
        now = time.time() if now is None else now
        line = json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
            "account": account, "key_id": key_id, "action": _cut(action),
            "resource": _cut(resource), "result": result, "reason": _cut(reason),
            "remote": remote}, sort_keys=True)
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()
