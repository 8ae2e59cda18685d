"""The management CLI against a real `ems manage serve` process on loopback HTTPS:
init, accounts, clusters, credentials, bills and top-ups, and its errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import zookeeper_server
from ems.manage import tokens

EMS = [sys.executable, "-m", "ems.cli"]


def ems(*args, env=None, check=True):
    result = subprocess.run([*EMS, *args], capture_output=True, text=True, timeout=60, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"ems {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}{result.stderr}")
    return result


@pytest.fixture
def service(tmp_path):
    directory = str(tmp_path / "manage")
    port = zookeeper_server.free_port()
    init = ems("manage", "init", "--dir", directory, "--port", str(port))
    assert "admin account" in init.stdout
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([*EMS, "manage", "serve", "--dir", directory, "--port",
                                str(port), "--metrics-port", "-1"], stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    env = dict(os.environ, EMS_MANAGE_CONFIG=f"{directory}/admin.json")
    for name in ("EMS_MANAGE_URL", "EMS_ACCESS_KEY_ID", "EMS_SECRET_ACCESS_KEY", "EMS_MANAGE_CA"):
        env.pop(name, None)
    deadline = time.monotonic() + 30
    while ems("account", env=env, check=False).returncode != 0:
        assert process.poll() is None, open(tmp_path / "serve.log").read()
        assert time.monotonic() < deadline, "management service did not start"
        time.sleep(0.2)
    yield directory, env
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0


def account_env(env, created_text: str) -> dict:
    """Settings of a new account, from the output of `ems account create`."""
    lines = created_text.splitlines()
    key_id = next(line.split()[-1] for line in lines if line.startswith("access key id"))
    secret = next(line.split()[-1] for line in lines if line.startswith("secret access key"))
    with open(env["EMS_MANAGE_CONFIG"]) as f:
        admin = json.load(f)
    return dict(env, EMS_MANAGE_URL=admin["url"], EMS_MANAGE_CA=admin["ca_file"],
                EMS_ACCESS_KEY_ID=key_id, EMS_SECRET_ACCESS_KEY=secret)


def test_operator_walkthrough(service, tmp_path, zookeeper):
    directory, admin_env = service
    created = ems("account", "create", "acme", "--price", "0.50", env=admin_env).stdout
    assert "secret access key" in created
    env = account_env(admin_env, created)
    env["EMS_MANAGE_CONFIG"] = str(tmp_path / "none.json")
    shown = ems("account", env=env).stdout
    assert "acme" in shown
    assert "in good standing" in shown

    cluster = json.loads(ems("cluster", "create", "prod", "--zookeeper", zookeeper.hosts,
                             "--json", env=env).stdout)
    assert cluster["name"] == "prod"
    assert "prod" in ems("cluster", "list", env=env).stdout

    out = tmp_path / "prod.credential"
    text = ems("credential", "create", "--cluster", cluster["id"], "--lifetime", "30d",
               "--out", str(out), env=env).stdout
    assert f"written to {out}" in text
    assert oct(os.stat(out).st_mode & 0o777) == "0o600"
    credential = tokens.verify_credential(tokens.load_public_key(f"{directory}/signing.pub"),
                                          out.read_text(), cluster="prod")
    assert credential.expires - credential.issued == 30 * 86400
    listed = ems("credential", "list", env=env).stdout
    assert credential.id in listed
    assert "valid" in listed

    revoked = ems("credential", "revoke", credential.id, env=env).stdout
    assert "revoked" in revoked
    assert "published" in revoked

    bill = ems("bill", env=env).stdout
    assert "total: 0 node-hours, 0.00" in bill

    account_id = json.loads(ems("account", "--json", env=env).stdout)["id"]
    topped = ems("account", "topup", account_id, "25.00", "--note", "invoice 7",
                 env=admin_env).stdout
    assert "25.00" in topped
    assert "acme" in ems("account", "list", env=admin_env).stdout


def test_cli_errors_are_clear(service, tmp_path):
    directory, admin_env = service
    missing = dict(admin_env, EMS_MANAGE_CONFIG=str(tmp_path / "none.json"))
    result = ems("account", env=missing, check=False)
    assert result.returncode == 2
    assert "missing url, access_key_id, secret_access_key" in result.stderr

    result = ems("cluster", "show", "clu-0000000000000000", env=admin_env, check=False)
    assert result.returncode == 1
    assert "cluster clu-0000000000000000 not found (HTTP 404)" in result.stderr

    result = ems("credential", "create", "--cluster", "clu-0", "--lifetime", "soon",
                 "--out", str(tmp_path / "c"), env=admin_env, check=False)
    assert result.returncode == 2
    assert "duration 'soon'" in result.stderr

    wrong = dict(admin_env, EMS_SECRET_ACCESS_KEY="not-the-secret-at-all")
    result = ems("account", env=wrong, check=False)
    assert result.returncode == 1
    assert "signature does not match" in result.stderr

    result = ems("manage", "init", "--dir", directory, check=False)
    assert result.returncode == 2
    assert "already contains a management service" in result.stderr


@pytest.mark.parametrize("args,message", [
    (("cluster", "show", "a b"), "cluster a b not found (HTTP 404)"),
    (("cluster", "delete", "x?y=1"), "cluster x?y=1 not found (HTTP 404)"),
    (("credential", "revoke", "../accounts"), "Not Found (HTTP 404)"),   # no route matches
    (("access-key", "revoke", "EK 1"), "access key EK 1 not found (HTTP 404)"),
], ids=["space", "question-mark", "slashes", "key-with-space"])
def test_cli_odd_ids_not_found(service, args, message):
    _, admin_env = service
    result = ems(*args, env=admin_env, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_config_not_an_object(service, tmp_path):
    _, admin_env = service
    config = tmp_path / "list.json"
    config.write_text("[]")
    result = ems("account", "--config", str(config), env=admin_env, check=False)
    assert result.returncode == 2
    assert "must contain a JSON object" in result.stderr


def test_credential_out_unwritable_issues_nothing(service, tmp_path):
    _, admin_env = service
    cluster = json.loads(ems("cluster", "create", "unwritten", "--zookeeper", "127.0.0.1:1",
                             "--json", env=admin_env).stdout)
    out = tmp_path / "missing-directory" / "credential"
    result = ems("credential", "create", "--cluster", cluster["id"], "--out", str(out),
                 env=admin_env, check=False)
    assert result.returncode == 2
    assert "cannot be created: No such file or directory" in result.stderr
    listed = json.loads(ems("credential", "list", "--json", env=admin_env).stdout)
    assert listed["credentials"] == []

    # A call that fails leaves no empty file behind.
    out = tmp_path / "credential"
    result = ems("credential", "create", "--cluster", "clu-0000000000000000", "--out",
                 str(out), env=admin_env, check=False)
    assert result.returncode == 1
    assert not out.exists()
