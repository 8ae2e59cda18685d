"""The management REST API (FastAPI), served over HTTPS by `ems manage serve`.

Every /v1 call except /v1/public-key must be signed (ems.manage.signing). An account reaches
only its own resources: a request for another account's resource returns 404, as for an
unknown id.
Calls under /v1/accounts need the admin account that `ems manage init` creates. The
OpenAPI schema is at /openapi.json.
"""
from __future__ import annotations

import calendar
import logging
import os
import re
import time
from decimal import Decimal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

import ems
from ems.manage import billing, signing
from ems.manage.audit import AuditLog
from ems.manage.nodes import node_view
from ems.manage.metrics import UNMATCHED, ManageMetrics
from ems.manage.service import (DEFAULT_CREDENTIAL_LIFETIME_S, Forbidden, Service, money,
                                require_admin)
from ems.manage.store import Conflict, NotFound

log = logging.getLogger("ems.manage")

MONTH_PATTERN = re.compile(r"(\d{4})-(\d{2})")
CONSOLE_DIR = os.path.join(os.path.dirname(__file__), "console")
MAX_BODY_BYTES = 64 << 10   # every request body of this API is a small JSON object


class Caller:
    def __init__(self, account: str, key_id: str):
        self.account = account
        self.key_id = key_id


# ---- request bodies ----------------------------------------------------------------------

class AccountIn(BaseModel):
    name: str = Field(description="unique account name, 1 to 100 printable characters")
    price_per_node_hour: str = Field(description="decimal price of one node-hour, e.g. '0.50'")


class TopUpIn(BaseModel):
    amount: str = Field(description="decimal amount added to the balance, e.g. '100.00'")
    note: str = Field("", description="free text for the account's records, at most 200 "
                                      "characters")


class ClusterIn(BaseModel):
    name: str = Field(description="the daemons' --cluster name")
    zookeeper: str = Field(description="the cluster's ZooKeeper hosts, host:port[,host:port]")


class CredentialIn(BaseModel):
    cluster: str = Field(description="cluster id (clu-...)")
    lifetime_s: int = Field(DEFAULT_CREDENTIAL_LIFETIME_S,
                            description="seconds until the credential expires (60 s to 3 years)")


# ---- the app -----------------------------------------------------------------------------

def create_app(service: Service, audit: AuditLog,
               metrics: ManageMetrics | None = None) -> FastAPI:
    """Build the API. `metrics` receives each request's action, status and duration and
    each authentication failure; None records nothing."""
    app = FastAPI(title="EMS management API", version=ems.__version__,
                  description="Accounts, clusters, activation credentials, metering and "
                              "billing of EMS. Requests are signed with HMAC-SHA256.",
                  docs_url=None, redoc_url=None)

    async def authenticate(request: Request) -> Caller:
        body = await request.body()
        now = service.clock()
        try:
            key_id, timestamp, nonce, given = signing.check_headers(request.headers)
            request.state.key_id = key_id
            found = service.secret_of(key_id)
            if found is None:
                raise signing.SignatureError(f"access key id {key_id[:40]!r} is unknown or "
                                             f"revoked", reason="unknown_key")
            account, secret = found
            signing.check_fresh(timestamp, now)
            raw_path = request.scope.get("raw_path") or request.url.path.encode()
            text = signing.string_to_sign(request.method, raw_path.decode("latin-1"),
                                          request.url.query, body,
                                          request.headers[signing.HEADER_TIMESTAMP], nonce,
                                          key_id)
            signing.check_signature(secret, text, given)
            if not service.store.use_nonce(key_id, nonce, int(now), signing.MAX_SKEW_S):
                raise signing.SignatureError("replayed request: this nonce was used already",
                                             reason="replayed")
        except signing.SignatureError as exc:
            if metrics is not None:
                metrics.auth_failures.labels(reason=exc.reason).inc()
            raise HTTPException(401, str(exc),
                                headers={"WWW-Authenticate": signing.ALGORITHM}) from None
        request.state.account = account
        signing.check_query(request.url.query)
        return Caller(account, key_id)

    def error(request: Request, status: int, kind: str, reason: str, headers=None):
        request.state.reason = reason
        return JSONResponse({"error": kind, "reason": reason}, status_code=status,
                            headers=headers)

    @app.middleware("http")
    async def audit_calls(request: Request, call_next):
        started = time.perf_counter()
        request.state.account = None
        request.state.key_id = None
        request.state.resource = None
        request.state.reason = None

        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            response = error(request, 413, "too_large", f"request body of {length[:20]} bytes "
                             f"exceeds the limit of {MAX_BODY_BYTES} bytes")
        elif length is None and "chunked" in request.headers.get("transfer-encoding", ""):
            response = error(request, 411, "length_required",
                             "send the body with a Content-Length header, not chunked")
        else:
            try:
                response = await call_next(request)
            except Exception:   # an unexpected error still gets a JSON reply and an audit line
                log.exception("%s %s failed (account %s, key %s)", request.method,
                              request.url.path, request.state.account, request.state.key_id,
                              extra={"account": request.state.account,
                                     "key": request.state.key_id})
                response = error(request, 500, "internal_error", "internal error of the "
                                 "management service; its log has the details")

        route = request.scope.get("route")
        name = getattr(route, "name", None)
        if metrics is not None:
            metrics.observe_request(name or UNMATCHED, response.status_code,
                                    time.perf_counter() - started)

        action = name or f"{request.method} {request.url.path}"
        if request.url.path.startswith("/v1/"):
            resource = request.state.resource or _path_resource(request)
            client = request.client.host if request.client else None
            audit.write(account=request.state.account, key_id=request.state.key_id,
                        action=action, resource=resource, result=response.status_code,
                        reason=request.state.reason, remote=client, now=service.clock())
        return response

    async def unsigned_response(request: Request):
        """Return the 401 response for a request that failed before `authenticate` ran and
        does not authenticate, else None. FastAPI parses a JSON body before it resolves
        dependencies, so without this an unsigned request with a malformed body would get
        400 or 422."""
        path = request.url.path
        if request.state.account is not None or not path.startswith("/v1/") or \
                path == "/v1/public-key":
            return None
        try:
            await authenticate(request)
        except HTTPException as exc:
            return error(request, exc.status_code, "unauthorized", str(exc.detail),
                         exc.headers)
        return None

    # Registered for Starlette's HTTPException, the base of FastAPI's, because the router
    # raises it for 404 and 405 and FastAPI raises it for a body it cannot parse.
    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:   # FastAPI could not parse the body
            rejected = await unsigned_response(request)
            if rejected is not None:
                return rejected
        kind = {401: "unauthorized", 404: "not_found"}.get(exc.status_code, "error")
        return error(request, exc.status_code, kind, str(exc.detail), exc.headers)

    @app.exception_handler(NotFound)
    async def on_not_found(request: Request, exc: NotFound):
        return error(request, 404, "not_found", str(exc))

    @app.exception_handler(Conflict)
    async def on_conflict(request: Request, exc: Conflict):
        return error(request, 409, "conflict", str(exc))

    @app.exception_handler(Forbidden)
    async def on_forbidden(request: Request, exc: Forbidden):
        return error(request, 403, "forbidden", str(exc))

    @app.exception_handler(ValueError)
    async def on_value(request: Request, exc: ValueError):
        return error(request, 400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        rejected = await unsigned_response(request)
        if rejected is not None:
            return rejected
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                            for e in exc.errors())
        return error(request, 422, "invalid_request", details)

    # -- unsigned ---------------------------------------------------------------------

    # The console is static: its page signs each API call in the browser.
    app.mount("/console", StaticFiles(directory=CONSOLE_DIR, html=True), name="console")

    @app.get("/healthz", name="health", response_class=PlainTextResponse)
    def health():
        return "ok\n"

    @app.get("/v1/public-key", name="public_key.get", response_class=PlainTextResponse)
    def public_key():
        """Return the Ed25519 public key (PEM) that verifies credentials and standing notices."""
        return service.public_pem.decode()

    # -- own account ------------------------------------------------------------------

    @app.get("/v1/account", name="account.get")
    def own_account(caller: Caller = Depends(authenticate)):
        """Return the caller's account: price, balance, bill due and arrears state."""
        return service.account_view(caller.account)

    @app.get("/v1/access-keys", name="access_key.list")
    def list_keys(caller: Caller = Depends(authenticate)):
        return {"access_keys": service.store.access_keys(caller.account)}

    @app.post("/v1/access-keys", name="access_key.create", status_code=201)
    def create_key(request: Request, caller: Caller = Depends(authenticate)):
        """Create an access key; the secret is in this response only."""
        key_id, secret = service.create_access_key(caller.account)
        request.state.resource = key_id
        return {"access_key_id": key_id, "secret_access_key": secret}

    @app.delete("/v1/access-keys/{key_id}", name="access_key.revoke")
    def revoke_key(key_id: str, caller: Caller = Depends(authenticate)):
        service.store.revoke_access_key(caller.account, key_id, service.now())
        return {"access_key_id": key_id, "revoked": True}

    # -- clusters ---------------------------------------------------------------------

    @app.post("/v1/clusters", name="cluster.create", status_code=201)
    def create_cluster(body: ClusterIn, request: Request, caller: Caller = Depends(authenticate)):
        view = service.create_cluster(caller.account, body.name, body.zookeeper)
        request.state.resource = view["id"]
        return view

    @app.get("/v1/clusters", name="cluster.list")
    def list_clusters(caller: Caller = Depends(authenticate)):
        return {"clusters": [service.cluster_view(row)
                             for row in service.store.clusters(caller.account)]}

    @app.get("/v1/clusters/{cluster_id}", name="cluster.get")
    def get_cluster(cluster_id: str, caller: Caller = Depends(authenticate)):
        return service.cluster_view(service.store.cluster(caller.account, cluster_id))

    @app.get("/v1/clusters/{cluster_id}/nodes", name="cluster.nodes")
    def cluster_nodes(cluster_id: str, caller: Caller = Depends(authenticate)):
        """Return the cluster's registered nodes, each with its activation state, capacity
        and use per tier and hit ratio, read from the nodes now."""
        cluster = service.store.cluster(caller.account, cluster_id)
        if cluster["deleted"] is not None:
            return {"nodes": [], "error": None}
        try:
            records = service.probe.records(cluster)
        except Exception as exc:   # ZooKeeper down: the console shows why
            log.warning("nodes of cluster %s (%s) not read from ZooKeeper %s: %s", cluster_id,
                        cluster["name"], cluster["zookeeper"], exc)
            return {"nodes": [], "error": f"ZooKeeper {cluster['zookeeper']}: {exc}"}
        return {"nodes": service.probe.map(node_view, records), "error": None}

    @app.delete("/v1/clusters/{cluster_id}", name="cluster.delete")
    def delete_cluster(cluster_id: str, caller: Caller = Depends(authenticate)):
        """Stop billing the cluster and tell its daemons to stop serving."""
        return service.delete_cluster(caller.account, cluster_id)

    # -- credentials ------------------------------------------------------------------

    @app.post("/v1/credentials", name="credential.create", status_code=201)
    def create_credential(body: CredentialIn, request: Request,
                          caller: Caller = Depends(authenticate)):
        """Issue an activation credential; the token is in this response only."""
        view, token = service.create_credential(caller.account, body.cluster, body.lifetime_s)
        request.state.resource = view["id"]
        return dict(view, token=token)

    @app.get("/v1/credentials", name="credential.list")
    def list_credentials(caller: Caller = Depends(authenticate)):
        return {"credentials": [service.credential_view(row)
                                for row in service.store.credentials(caller.account)]}

    @app.get("/v1/credentials/{credential_id}", name="credential.get")
    def get_credential(credential_id: str, caller: Caller = Depends(authenticate)):
        return service.credential_view(service.store.credential(caller.account, credential_id))

    @app.delete("/v1/credentials/{credential_id}", name="credential.revoke")
    def revoke_credential(credential_id: str, caller: Caller = Depends(authenticate)):
        """Revoke a credential; its cluster's daemons stop serving when they read the
        standing notice (the field `notice` reports whether it was written)."""
        return service.revoke_credential(caller.account, credential_id)

    # -- billing ----------------------------------------------------------------------

    @app.get("/v1/bill", name="bill.get")
    def bill(month: str | None = None, cluster: str | None = None,
             caller: Caller = Depends(authenticate)):
        """Return the itemised bill: one item per hour and cluster with node-hours, for a calendar
        month (YYYY-MM, UTC; default: the current one)."""
        if cluster is not None:
            service.store.cluster(caller.account, cluster)
        return bill_view(service, caller.account, month, cluster)

    # -- admin ------------------------------------------------------------------------

    @app.post("/v1/accounts", name="account.create", status_code=201)
    def create_account(body: AccountIn, request: Request, caller: Caller = Depends(authenticate)):
        """Create an account with its first access key (admin only)."""
        require_admin(service, caller.account)
        account, key_id, secret = service.create_account(body.name, body.price_per_node_hour)
        request.state.resource = account.id
        return dict(service.account_view(account.id), access_key_id=key_id,
                    secret_access_key=secret)

    @app.get("/v1/accounts", name="account.list")
    def list_accounts(caller: Caller = Depends(authenticate)):
        require_admin(service, caller.account)
        return {"accounts": [service.account_view(a.id) for a in service.store.accounts()]}

    @app.get("/v1/accounts/{account_id}", name="account.get_any")
    def get_account(account_id: str, caller: Caller = Depends(authenticate)):
        require_admin(service, caller.account)
        return service.account_view(account_id)

    @app.post("/v1/accounts/{account_id}/topups", name="account.top_up", status_code=201)
    def top_up(account_id: str, body: TopUpIn, caller: Caller = Depends(authenticate)):
        """Record a payment into an account's balance (admin only)."""
        require_admin(service, caller.account)
        return service.top_up(account_id, body.amount, body.note)

    return app


def _path_resource(request: Request) -> str | None:
    params = request.path_params
    return next((str(v) for k, v in params.items() if k.endswith("_id")), None)


def month_bounds(month: str | None, now: float) -> tuple[int, int, str]:
    if month is None:
        month = time.strftime("%Y-%m", time.gmtime(now))
    match = MONTH_PATTERN.fullmatch(month)
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise ValueError(f"month {month!r} must be YYYY-MM, e.g. 2026-12")
    year, number = int(match.group(1)), int(match.group(2))
    start = calendar.timegm((year, number, 1, 0, 0, 0))
    end = calendar.timegm((year + number // 12, number % 12 + 1, 1, 0, 0, 0))
    return start, end, month


def iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def bill_view(service: Service, account_id: str, month: str | None,
              cluster_id: str | None) -> dict:
    start, end, month = month_bounds(month, service.clock())
    items, total, hours = [], Decimal(0), 0
    for row in service.store.hours(account_id, start, end, cluster_id):
        node_hours = billing.node_hours(row["node_sum"])
        if not row["node_sum"]:
            continue
        amount = billing.charge(node_hours, Decimal(row["price"]))
        items.append({"hour": iso(row["hour"]), "hour_end": iso(row["hour"] + billing.HOUR_S),
                      "cluster": row["cluster"], "cluster_name": row["name"],
                      "samples": row["samples"], "node_sum": row["node_sum"],
                      "node_hours": node_hours, "price_per_node_hour": money(row["price"]),
                      "amount": money(amount)})
        total += amount
        hours += node_hours
    return {"account": account_id, "month": month, "items": items, "node_hours": hours,
            "total": money(total), "account_state": service.account_view(account_id)}
