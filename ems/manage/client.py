"""A signed HTTPS client of the management API (stdlib only), and where its settings come
from.

Settings come first from the JSON file named by --config or EMS_MANAGE_CONFIG (default
~/.config/ems/manage.json), with the keys url, access_key_id, secret_access_key and
ca_file. The variables EMS_MANAGE_URL, EMS_ACCESS_KEY_ID, EMS_SECRET_ACCESS_KEY and
EMS_MANAGE_CA override them.
"""
from __future__ import annotations

import http.client
import json
import os
import ssl
from urllib.parse import urlencode, urlsplit

from ems.manage import signing

DEFAULT_CONFIG = os.path.join("~", ".config", "ems", "manage.json")
ENVIRONMENT = {"url": "EMS_MANAGE_URL", "access_key_id": "EMS_ACCESS_KEY_ID",
               "secret_access_key": "EMS_SECRET_ACCESS_KEY", "ca_file": "EMS_MANAGE_CA"}
TIMEOUT_S = 30.0


class ApiError(Exception):
    """Raised when the service returns an error status. The message is its reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


def load_settings(config_path: str | None = None) -> dict:
    path = config_path or os.environ.get("EMS_MANAGE_CONFIG") or os.path.expanduser(DEFAULT_CONFIG)
    settings: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            try:
                settings = json.load(f)
            except ValueError as exc:
                raise ValueError(f"{path} is not JSON: {exc}") from None
        if not isinstance(settings, dict):
            raise ValueError(f"{path} must contain a JSON object with the keys url, "
                             f"access_key_id, secret_access_key and ca_file")
    elif config_path:
        raise FileNotFoundError(f"config file {config_path} not found")
    for name, variable in ENVIRONMENT.items():
        if os.environ.get(variable):
            settings[name] = os.environ[variable]
    missing = [name for name in ("url", "access_key_id", "secret_access_key")
               if not settings.get(name)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: set them in {path} or through "
                         f"{', '.join(ENVIRONMENT[m] for m in missing)}")
    return settings


class ManageClient:
    def __init__(self, url: str, access_key_id: str, secret_access_key: str,
                 ca_file: str | None = None, timeout: float = TIMEOUT_S):
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"management URL {url!r} must be https://HOST[:PORT]")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.key_id = access_key_id
        self.secret = secret_access_key
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=ca_file)

    @classmethod
    def from_settings(cls, settings: dict) -> ManageClient:
        return cls(settings["url"], settings["access_key_id"], settings["secret_access_key"],
                   settings.get("ca_file"))

    def call(self, method: str, path: str, body: dict | None = None,
             query: dict | None = None, sign: bool = True) -> dict:
        """Send one signed request; return the JSON reply or raise ApiError."""
        status, data = self.raw(method, path, body, query, sign)
        try:
            reply = json.loads(data) if data else {}
        except ValueError:
            reply = {"reason": data.decode(errors="replace")[:500]}
        if status >= 400:
            raise ApiError(status, reply.get("reason", f"status {status}"))
        return reply

    def raw(self, method: str, path: str, body: dict | None = None,
            query: dict | None = None, sign: bool = True, headers: dict | None = None):
        query_text = urlencode({k: v for k, v in (query or {}).items() if v is not None})
        payload = json.dumps(body).encode() if body is not None else b""
        sent = {"Content-Type": "application/json"} if body is not None else {}
        if sign:
            sent.update(signing.sign_headers(self.key_id, self.secret, method, path,
                                             query_text, payload))
        sent.update(headers or {})
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                           context=self.context)
        try:
            conn.request(method, path + (f"?{query_text}" if query_text else ""),
                         body=payload or None, headers=sent)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()
