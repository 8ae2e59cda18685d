"""The management REST API through real HTTPS on loopback: request signing, isolation
between accounts, admin calls, bad input, secrets at rest, the audit log and the schema.

Clusters point at a real ZooKeeper, so revocations write real standing notices.
"""
import http.client
import json
import sqlite3
import time
import urllib.request

import pytest

import manage_rig
from ems.manage import signing, tokens, zkstate
from ems.manage.client import ApiError


@pytest.fixture
def rig(tmp_path):
    rig = manage_rig.start(str(tmp_path / "manage"))
    yield rig
    rig.stop()


@pytest.fixture
def acme(rig):
    return rig.new_account("acme")


def status_and_reason(client, method, path, **kwargs):
    status, data = client.raw(method, path, **kwargs)
    body = json.loads(data) if data else {}
    return status, body.get("reason", "")


# ---- signing -----------------------------------------------------------------------------

def test_signed_request_accepted(rig, acme):
    client, created = acme
    reply = client.call("GET", "/v1/account")
    assert reply["id"] == created["id"]
    assert reply["name"] == "acme"


@pytest.mark.parametrize("header", [signing.HEADER_KEY_ID, signing.HEADER_TIMESTAMP,
                                    signing.HEADER_NONCE, signing.HEADER_SIGNATURE])
def test_missing_header_rejected(rig, acme, header):
    client, _ = acme
    headers = signing.sign_headers(client.key_id, client.secret, "GET", "/v1/account")
    del headers[header]
    status, reason = status_and_reason(client, "GET", "/v1/account", sign=False,
                                       headers=headers)
    assert status == 401
    assert f"missing header {header}" in reason


def test_unsigned_request_rejected(rig):
    status, reason = status_and_reason(rig.admin, "GET", "/v1/clusters", sign=False)
    assert status == 401
    assert "missing header" in reason


def test_wrong_secret_rejected(rig, acme):
    client, _ = acme
    forger = rig.client(client.key_id, client.secret[:-1] + ("A" if client.secret[-1] != "A"
                                                             else "B"))
    status, reason = status_and_reason(forger, "GET", "/v1/account")
    assert status == 401
    assert "signature does not match" in reason


def test_request_changed_after_signing_rejected(rig, acme):
    client, _ = acme
    headers = signing.sign_headers(client.key_id, client.secret, "GET", "/v1/bill",
                                   "month=2026-11")
    status, reason = status_and_reason(client, "GET", "/v1/bill", sign=False,
                                       query={"month": "2026-12"}, headers=headers)
    assert status == 401
    assert "signature does not match" in reason
    body = {"name": "prod", "zookeeper": "127.0.0.1:2181"}
    headers = signing.sign_headers(client.key_id, client.secret, "POST", "/v1/clusters", "",
                                   json.dumps(dict(body, name="other")).encode())
    status, reason = status_and_reason(client, "POST", "/v1/clusters", body=body, sign=False,
                                       headers=headers)
    assert status == 401
    assert client.call("GET", "/v1/clusters")["clusters"] == []


def test_repeated_query_parameter_rejected(rig, acme):
    client, _ = acme
    signed = "month=2026-01&month=2026-02"
    headers = signing.sign_headers(client.key_id, client.secret, "GET", "/v1/bill", signed)
    status, data = send_bytes(client, "GET", "/v1/bill?month=2026-02&month=2026-01", b"",
                              headers)
    assert status == 400
    assert "'month' appears more than once" in data["reason"]


@pytest.mark.parametrize("offset", [-301, 400])
def test_stale_timestamp_rejected(rig, acme, offset):
    client, _ = acme
    headers = signing.sign_headers(client.key_id, client.secret, "GET", "/v1/account",
                                   now=time.time() + offset)
    status, reason = status_and_reason(client, "GET", "/v1/account", sign=False,
                                       headers=headers)
    assert status == 401
    assert "stale request" in reason


@pytest.mark.parametrize("header,value,words", [
    (signing.HEADER_TIMESTAMP, "1" + "0" * 400, "is not Unix seconds"),
    (signing.HEADER_TIMESTAMP, "-5", "is not Unix seconds"),
    (signing.HEADER_SIGNATURE, "\xe9" * 64, "64 hexadecimal digits"),
    (signing.HEADER_SIGNATURE, "abc", "64 hexadecimal digits"),
], ids=["huge-timestamp", "negative-timestamp", "latin-1-signature", "short-signature"])
def test_malformed_header_rejected(rig, acme, header, value, words):
    client, _ = acme
    headers = signing.sign_headers(client.key_id, client.secret, "GET", "/v1/account")
    headers[header] = value
    status, data = client.raw("GET", "/v1/account", sign=False, headers=headers)
    assert status == 401, data[:200]
    assert words in json.loads(data)["reason"]


def test_replayed_nonce_rejected(rig, acme):
    client, _ = acme
    headers = signing.sign_headers(client.key_id, client.secret, "GET", "/v1/account")
    first, _ = status_and_reason(client, "GET", "/v1/account", sign=False, headers=headers)
    second, reason = status_and_reason(client, "GET", "/v1/account", sign=False,
                                       headers=headers)
    assert first == 200
    assert second == 401
    assert "replayed" in reason


def send_bytes(client, method, path, body: bytes, headers: dict):
    conn = http.client.HTTPSConnection(client.host, client.port, context=client.context)
    try:
        conn.request(method, path, body=body, headers=dict(headers,
                                                           **{"Content-Type": "application/json"}))
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize("body", [b"{not json", b"[" * 20000 + b"]" * 20000],
                         ids=["malformed", "deeply-nested"])
def test_unsigned_bad_body_rejected(rig, acme, body):
    client, created = acme
    status, reply = send_bytes(client, "POST", "/v1/clusters", body, {})
    assert status == 401
    assert "missing header" in reply["reason"]
    headers = signing.sign_headers(client.key_id, client.secret, "POST", "/v1/clusters",
                                   body=body)
    status, reply = send_bytes(client, "POST", "/v1/clusters", body, headers)
    assert status in (400, 422)
    with open(f"{rig.directory}/audit.log") as f:
        last = json.loads(f.readlines()[-1])
    assert last["account"] == created["id"]
    assert last["result"] == status


def test_unknown_and_revoked_keys_rejected(rig, acme):
    client, _ = acme
    stranger = rig.client("EK" + "Z" * 18, "x" * 40)
    status, reason = status_and_reason(stranger, "GET", "/v1/account")
    assert status == 401
    assert "unknown or revoked" in reason
    second = client.call("POST", "/v1/access-keys")
    client.call("DELETE", f"/v1/access-keys/{client.key_id}")
    status, reason = status_and_reason(client, "GET", "/v1/account")
    assert status == 401
    assert "unknown or revoked" in reason
    fresh = rig.client(second["access_key_id"], second["secret_access_key"])
    assert fresh.call("GET", "/v1/account")["name"] == "acme"
    with pytest.raises(ApiError, match="last live key") as caught:
        fresh.call("DELETE", f"/v1/access-keys/{fresh.key_id}")
    assert caught.value.status == 409


# ---- isolation between accounts ----------------------------------------------------------

def test_other_accounts_resources_are_not_found(rig, acme, zookeeper):
    client, _ = acme
    other, _ = rig.new_account("globex")
    cluster = client.call("POST", "/v1/clusters", {"name": "prod",
                                                   "zookeeper": zookeeper.hosts})
    credential = client.call("POST", "/v1/credentials", {"cluster": cluster["id"],
                                                         "lifetime_s": 3600})
    for method, path in [("GET", f"/v1/clusters/{cluster['id']}"),
                         ("DELETE", f"/v1/clusters/{cluster['id']}"),
                         ("GET", f"/v1/credentials/{credential['id']}"),
                         ("DELETE", f"/v1/credentials/{credential['id']}")]:
        status, data = other.raw(method, path)
        assert status == 404, (method, path)
        assert b"prod" not in data
        assert zookeeper.hosts.encode() not in data
    status, _ = other.raw("GET", "/v1/bill", query={"cluster": cluster["id"]})
    assert status == 404
    with pytest.raises(ApiError) as caught:
        other.call("POST", "/v1/credentials", {"cluster": cluster["id"]})
    assert caught.value.status == 404
    assert other.call("GET", "/v1/clusters")["clusters"] == []
    assert other.call("GET", "/v1/credentials")["credentials"] == []
    assert client.call("GET", f"/v1/credentials/{credential['id']}")["state"] == "valid"
    assert client.call("GET", f"/v1/clusters/{cluster['id']}")["deleted"] is None


def test_admin_calls_need_the_admin(rig, acme):
    client, created = acme
    for method, path, body in [("GET", "/v1/accounts", None),
                               ("POST", "/v1/accounts", {"name": "x",
                                                         "price_per_node_hour": "1"}),
                               ("POST", f"/v1/accounts/{created['id']}/topups",
                                {"amount": "1000"})]:
        with pytest.raises(ApiError, match="admin") as caught:
            client.call(method, path, body)
        assert caught.value.status == 403
    assert client.call("GET", "/v1/account")["balance"] == "0.00"


# ---- resources ---------------------------------------------------------------------------

def test_credential_is_signed_for_its_cluster(rig, acme, zookeeper):
    client, created = acme
    cluster = client.call("POST", "/v1/clusters", {"name": "prod",
                                                   "zookeeper": zookeeper.hosts})
    reply = client.call("POST", "/v1/credentials", {"cluster": cluster["id"],
                                                    "lifetime_s": 7200})
    status, pem = client.raw("GET", "/v1/public-key", sign=False)
    assert status == 200
    public_key = tokens.parse_public_key(pem)
    credential = tokens.verify_credential(public_key, reply["token"], cluster="prod")
    assert credential.account == created["id"]
    assert credential.id == reply["id"]
    assert credential.expires - credential.issued == 7200
    with open(f"{rig.directory}/signing.pub", "rb") as f:
        assert f.read() == pem
    assert "token" not in client.call("GET", f"/v1/credentials/{reply['id']}")


def test_revocation_writes_a_signed_standing_notice(rig, acme, zookeeper):
    client, created = acme
    cluster = client.call("POST", "/v1/clusters", {"name": "revoked-here",
                                                   "zookeeper": zookeeper.hosts})
    credential = client.call("POST", "/v1/credentials", {"cluster": cluster["id"]})
    reply = client.call("DELETE", f"/v1/credentials/{credential['id']}")
    assert reply["state"] == "revoked"
    assert reply["notice"] == "published"
    zk = zkstate.connect(zookeeper.hosts)
    try:
        token = zkstate.read(zk, zkstate.standing_path("revoked-here"))
    finally:
        zk.stop()
        zk.close()
    public_key = tokens.load_public_key(f"{rig.directory}/signing.pub")
    standing = tokens.verify_standing(public_key, token, cluster="revoked-here")
    assert standing.revoked == {credential["id"]}
    assert standing.account == created["id"]
    assert not standing.arrears


def read_notice(rig, zookeeper, cluster: str) -> tokens.Standing:
    zk = zkstate.connect(zookeeper.hosts)
    try:
        token = zkstate.read(zk, zkstate.standing_path(cluster))
    finally:
        zk.stop()
        zk.close()
    public_key = tokens.load_public_key(f"{rig.directory}/signing.pub")
    return tokens.verify_standing(public_key, token, cluster=cluster)


class FrozenClock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_notices_in_one_millisecond_ordered(tmp_path, zookeeper):
    rig = manage_rig.start(str(tmp_path / "manage"), clock=FrozenClock())
    try:
        client, _ = rig.new_account("acme")
        cluster = client.call("POST", "/v1/clusters", {"name": "same-ms",
                                                       "zookeeper": zookeeper.hosts})
        first = client.call("POST", "/v1/credentials", {"cluster": cluster["id"]})
        second = client.call("POST", "/v1/credentials", {"cluster": cluster["id"]})
        client.call("DELETE", f"/v1/credentials/{first['id']}")
        earlier = read_notice(rig, zookeeper, "same-ms")
        client.call("DELETE", f"/v1/credentials/{second['id']}")
        later = read_notice(rig, zookeeper, "same-ms")
    finally:
        rig.stop()
    assert later.revoked == {first["id"], second["id"]}
    assert later.issued > earlier.issued   # daemons drop a notice that is not newer


def test_deleted_cluster_spares_successor_notice(rig, acme, zookeeper):
    client, _ = acme
    body = {"name": "reused", "zookeeper": zookeeper.hosts}
    old = client.call("POST", "/v1/clusters", body)
    old_credential = client.call("POST", "/v1/credentials", {"cluster": old["id"]})
    client.call("DELETE", f"/v1/clusters/{old['id']}")
    assert read_notice(rig, zookeeper, "reused").deleted
    new = client.call("POST", "/v1/clusters", body)
    spare = client.call("POST", "/v1/credentials", {"cluster": new["id"]})
    assert client.call("DELETE", f"/v1/credentials/{spare['id']}")["notice"] == "published"
    assert not read_notice(rig, zookeeper, "reused").deleted

    # Calls on the deleted cluster must not write its notice over the new cluster's.
    client.call("DELETE", f"/v1/clusters/{old['id']}")
    assert not read_notice(rig, zookeeper, "reused").deleted
    reply = client.call("DELETE", f"/v1/credentials/{old_credential['id']}")
    assert reply["notice"].startswith("not written")
    notice = read_notice(rig, zookeeper, "reused")
    assert not notice.deleted
    assert spare["id"] in notice.revoked


def test_recreated_cluster_keeps_credentials_dead(rig, acme, zookeeper):
    client, _ = acme
    body = {"name": "recreated", "zookeeper": zookeeper.hosts}
    old = client.call("POST", "/v1/clusters", body)
    revoked = client.call("POST", "/v1/credentials", {"cluster": old["id"]})
    unrevoked = client.call("POST", "/v1/credentials", {"cluster": old["id"]})
    client.call("DELETE", f"/v1/credentials/{revoked['id']}")
    client.call("DELETE", f"/v1/clusters/{old['id']}")

    new = client.call("POST", "/v1/clusters", body)
    live = client.call("POST", "/v1/credentials", {"cluster": new["id"]})
    spare = client.call("POST", "/v1/credentials", {"cluster": new["id"]})
    client.call("DELETE", f"/v1/credentials/{spare['id']}")   # writes the new notice
    notice = read_notice(rig, zookeeper, "recreated")
    assert not notice.deleted
    assert revoked["id"] in notice.revoked     # its revocation must outlive the cluster
    assert unrevoked["id"] in notice.revoked   # it activated the deleted cluster only
    assert spare["id"] in notice.revoked
    assert live["id"] not in notice.revoked


def test_expired_credentials_leave_the_notice(tmp_path, zookeeper):
    clock = FrozenClock()
    rig = manage_rig.start(str(tmp_path / "manage"), clock=clock)
    try:
        client, _ = rig.new_account("acme")
        cluster = client.call("POST", "/v1/clusters", {"name": "expiring",
                                                       "zookeeper": zookeeper.hosts})
        short = client.call("POST", "/v1/credentials", {"cluster": cluster["id"],
                                                        "lifetime_s": 60})
        client.call("DELETE", f"/v1/credentials/{short['id']}")
        assert read_notice(rig, zookeeper, "expiring").revoked == {short["id"]}

        # A day past its expiry daemons reject it anyway. Signed calls would now be stale,
        # so the service publishes directly.
        clock.now += 60 + 86400 + 1
        service = rig.server.service
        assert service.publish_standing(service.store.cluster(None, cluster["id"])) == \
            "published"
        assert read_notice(rig, zookeeper, "expiring").revoked == set()
    finally:
        rig.stop()


def test_oversized_notice_not_written(rig, acme, zookeeper, monkeypatch):
    client, _ = acme
    cluster = client.call("POST", "/v1/clusters", {"name": "oversized",
                                                   "zookeeper": zookeeper.hosts})
    first = client.call("POST", "/v1/credentials", {"cluster": cluster["id"]})
    second = client.call("POST", "/v1/credentials", {"cluster": cluster["id"]})
    client.call("DELETE", f"/v1/credentials/{first['id']}")
    monkeypatch.setattr(tokens, "MAX_STANDING_CHARS", 100)   # below any signed notice
    reply = client.call("DELETE", f"/v1/credentials/{second['id']}")
    assert reply["notice"].startswith("pending")
    assert "above the 100 that daemons accept" in reply["notice"]
    monkeypatch.undo()
    assert read_notice(rig, zookeeper, "oversized").revoked == {first["id"]}


def test_revocation_with_zookeeper_down_says_pending(rig, acme):
    client, _ = acme
    import zookeeper_server
    cluster = client.call("POST", "/v1/clusters", {
        "name": "unreachable", "zookeeper": f"127.0.0.1:{zookeeper_server.free_port()}"})
    credential = client.call("POST", "/v1/credentials", {"cluster": cluster["id"]})
    reply = client.call("DELETE", f"/v1/credentials/{credential['id']}")
    assert reply["state"] == "revoked"
    assert reply["notice"].startswith("pending")


@pytest.mark.parametrize("path,body,words", [
    ("/v1/clusters", {"name": "bad/name", "zookeeper": "127.0.0.1:2181"}, "invalid cluster"),
    ("/v1/clusters", {"name": "ok", "zookeeper": "no-port"}, "is not host:port"),
    ("/v1/clusters", {"name": "ok", "zookeeper": "[::1:2181"}, "are invalid"),
    ("/v1/credentials", {"cluster": "clu-0", "lifetime_s": 1}, "lifetime 1 s"),
    ("/v1/accounts", {"name": "x", "price_per_node_hour": "cheap"}, "'cheap' is not a decimal"),
    ("/v1/accounts", {"name": "y", "price_per_node_hour": "-1"}, "must be at least 0"),
])
def test_bad_input_named(rig, acme, path, body, words):
    client = rig.admin if path == "/v1/accounts" else acme[0]
    with pytest.raises(ApiError, match=words) as caught:
        client.call("POST", path, body)
    assert caught.value.status == 400


@pytest.mark.parametrize("price", ["-0", "0E+99999", "-0.000"])
def test_zero_price_stored_as_zero(rig, price):
    reply = rig.admin.call("POST", "/v1/accounts", {"name": f"free {price}",
                                                    "price_per_node_hour": price})
    assert reply["price_per_node_hour"] == "0.00"


def test_bad_topup_and_month_named(rig, acme):
    _, created = acme
    with pytest.raises(ApiError, match="top-up amount '0'") as caught:
        rig.admin.call("POST", f"/v1/accounts/{created['id']}/topups", {"amount": "0"})
    assert caught.value.status == 400
    with pytest.raises(ApiError, match="month '2026-13'"):
        rig.admin.call("GET", "/v1/bill", query={"month": "2026-13"})
    with pytest.raises(ApiError, match="amount") as caught:
        rig.admin.call("POST", f"/v1/accounts/{created['id']}/topups", {"note": "no amount"})
    assert caught.value.status == 422


# ---- secrets, audit and schema -----------------------------------------------------------

def test_secrets_absent_from_disk_and_audit(rig, acme):
    client, created = acme
    client.call("GET", "/v1/account")
    status_and_reason(rig.client(client.key_id, "Qx7" * 12), "GET", "/v1/account")
    with open(f"{rig.directory}/state.db", "rb") as f:
        database = f.read()
    for suffix in ("-wal", "-shm"):
        try:
            with open(f"{rig.directory}/state.db{suffix}", "rb") as f:
                database += f.read()
        except FileNotFoundError:
            pass
    assert created["secret_access_key"].encode() not in database
    with open(f"{rig.directory}/admin.json") as f:
        admin_secret = json.load(f)["secret_access_key"]
    assert admin_secret.encode() not in database
    with open(f"{rig.directory}/audit.log") as f:
        audit = f.read()
    assert created["secret_access_key"] not in audit
    assert admin_secret not in audit
    assert "Qx7Qx7" not in audit


def test_swapped_key_and_secret_not_logged(rig, acme):
    client, created = acme
    swapped = rig.client(created["secret_access_key"], created["access_key_id"])
    status, data = swapped.raw("GET", "/v1/account")
    assert status == 401
    assert "not an access key id" in json.loads(data)["reason"]
    assert created["secret_access_key"].encode() not in data
    with open(f"{rig.directory}/audit.log") as f:
        audit = f.read()
    assert created["secret_access_key"] not in audit


def test_audit_log_has_one_line_per_call(rig, acme, zookeeper):
    client, created = acme
    cluster = client.call("POST", "/v1/clusters", {"name": "audited",
                                                   "zookeeper": zookeeper.hosts})
    client.raw("GET", "/v1/clusters/clu-0000000000000000")
    client.raw("GET", "/v1/account", sign=False)
    with open(f"{rig.directory}/audit.log") as f:
        lines = [json.loads(line) for line in f]
    assert [line["action"] for line in lines] == ["account.create", "cluster.create",
                                                  "cluster.get", "account.get"]
    create = lines[1]
    assert create["account"] == created["id"]
    assert create["resource"] == cluster["id"]
    assert create["result"] == 201
    assert lines[2]["result"] == 404
    assert lines[3]["result"] == 401
    assert lines[3]["account"] is None
    assert "missing header" in lines[3]["reason"]
    assert all(line["time"].endswith("Z") for line in lines)


def test_internal_error_is_audited(rig, acme):
    client, created = acme
    rig.server.service.store._db.execute("PRAGMA busy_timeout = 200")
    other = sqlite3.connect(f"{rig.directory}/state.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")   # the write lock taken, as by another process
    try:
        status, data = client.raw("GET", "/v1/account")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert status == 500
    assert json.loads(data)["error"] == "internal_error"
    with open(f"{rig.directory}/audit.log") as f:
        last = json.loads(f.readlines()[-1])
    assert last["result"] == 500
    assert last["action"] == "account.get"
    assert last["key_id"] == client.key_id
    assert client.call("GET", "/v1/account")["id"] == created["id"]


def test_audit_line_stays_short(rig, acme):
    client, _ = acme
    status, _ = client.raw("POST", "/v1/credentials", {"cluster": "clu-" + "x" * 60000})
    assert status == 404
    status, _ = client.raw("GET", "/v1/clusters/clu-" + "y" * 8000)
    assert status == 404
    with open(f"{rig.directory}/audit.log") as f:
        lines = f.readlines()[-2:]
    for line in lines:
        assert len(line) < 2000
    assert json.loads(lines[0])["reason"].endswith("... (60022 characters)")
    assert json.loads(lines[1])["resource"].startswith("clu-yyy")


def test_openapi_schema_published(rig):
    status, data = rig.admin.raw("GET", "/openapi.json", sign=False)
    assert status == 200
    schema = json.loads(data)
    for path in ("/v1/account", "/v1/clusters", "/v1/credentials/{credential_id}",
                 "/v1/bill", "/v1/accounts/{account_id}/topups"):
        assert path in schema["paths"]


def test_secret_database_columns_are_sealed(rig, acme):
    db = sqlite3.connect(f"{rig.directory}/state.db")
    try:
        rows = db.execute("SELECT id, sealed FROM access_keys").fetchall()
    finally:
        db.close()
    assert len(rows) == 2
    assert all(len(sealed) > 40 for _, sealed in rows)


def test_metrics_show_balance(rig, acme):
    _, created = acme
    rig.admin.call("POST", f"/v1/accounts/{created['id']}/topups", {"amount": "12.5"})
    url = f"http://127.0.0.1:{rig.server.metrics.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    assert f'ems_manage_account_balance{{account="{created["id"]}"}} 12.5' in text
    assert f'ems_manage_account_in_arrears{{account="{created["id"]}"}} 0.0' in text


def test_oversized_body_rejected_before_reading(rig, acme):
    client, _ = acme
    body = {"name": "x" * (70 << 10), "zookeeper": "127.0.0.1:2181"}
    status, reason = status_and_reason(client, "POST", "/v1/clusters", body=body)
    assert status == 413
    assert "exceeds the limit of 65536 bytes" in reason
    assert client.call("GET", "/v1/clusters")["clusters"] == []
