"""ems.manage.activation.ActivationGate in this process, over a real pool and, for the
znode sources, a real ZooKeeper (tests/zookeeper_server.py).

Tokens are signed in the test with a key made by tokens.new_private_key; a second key
stands for a forger. Each test uses its own cluster name, so the znodes of one test never
reach another. The gate's judgements run on its thread and on kazoo's, so the tests wait
for a state with wait_for and then check the pool itself.
"""
import logging
import time

import pytest

from conftest import make_block, make_key
from ems.manage import tokens, zkstate
from ems.manage.activation import STATES, ActivationGate, judge

ACCOUNT = "acct-1"
WAIT_S = 10.0


def wait_for(predicate, timeout: float = WAIT_S, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture(scope="module")
def service_key():
    return tokens.new_private_key()


@pytest.fixture(scope="module")
def public_key(service_key):
    return service_key.public_key()


@pytest.fixture
def cluster(request):
    return "gate-" + request.node.name.replace("[", "-").replace("]", "")[:60]


def credential(key, cluster, cred_id="cred-1", account=ACCOUNT, expires_in=3600):
    now = int(time.time())
    return tokens.sign_credential(key, tokens.Credential(
        id=cred_id, account=account, cluster=cluster, issued=now, expires=now + expires_in))


def standing(key, cluster, issued, account=ACCOUNT, revoked=(), arrears=False, deleted=False):
    return tokens.sign_standing(key, tokens.Standing(
        account=account, cluster=cluster, issued=issued, revoked=frozenset(revoked),
        arrears=arrears, deleted=deleted))


@pytest.fixture
def gates():
    """Factory of started gates, stopped at teardown."""
    started = []

    def factory(pool, cluster, public_key, zk_client=None, **options):
        gate = ActivationGate(pool, node_id="n1", cluster=cluster, public_key=public_key,
                              **options)
        gate.start(zk_client)
        started.append(gate)
        return gate

    yield factory
    for gate in started:
        gate.stop()


@pytest.fixture
def zk(zookeeper):
    client = zkstate.connect(zookeeper.hosts)
    yield client
    client.stop()
    client.close()


def state_is(gate, state):
    return lambda: gate.status().state == state


def serves(pool) -> bool:
    """Whether a block put now can be read back."""
    key = make_key(time.monotonic_ns(), "probe")
    block = make_block(key, 1, 512)
    return pool.put(key, block) and pool.get(key) == block


# ---- judging one credential -----------------------------------------------------------


def test_judge_orders_reasons(service_key):
    cred = tokens.Credential(id="c", account=ACCOUNT, cluster="x", issued=0, expires=100)
    notice = tokens.Standing(account=ACCOUNT, cluster="x", issued=1, revoked=frozenset({"c"}),
                             arrears=True, deleted=True)
    assert judge(cred, "y", notice, 50).state == "wrong_cluster"
    assert judge(cred, "x", notice, 100).state == "expired"
    assert judge(cred, "x", notice, 50).state == "deleted"
    revoked = tokens.Standing(account=ACCOUNT, cluster="x", issued=1,
                              revoked=frozenset({"c"}), arrears=True)
    assert judge(cred, "x", revoked, 50).state == "revoked"
    arrears = tokens.Standing(account=ACCOUNT, cluster="x", issued=1, arrears=True)
    assert judge(cred, "x", arrears, 50).state == "arrears"
    other = tokens.Standing(account="acct-2", cluster="x", issued=1, deleted=True)
    assert judge(cred, "x", other, 50).state == "active"
    assert judge(cred, "x", None, 50).state == "active"
    assert set(STATES) >= {judge(cred, "x", None, 50).state}


# ---- the --credential file ------------------------------------------------------------


def test_no_credential_suspends_pool(pool, gates, public_key, cluster):
    key = make_key(0)
    assert pool.put(key, b"before") is True
    gate = gates(pool, cluster, public_key)
    status = gate.status()
    assert status.state == "not_activated"
    assert status.serving is False
    assert pool.suspended is True
    assert pool.get(key) is None
    assert pool.put(make_key(1), b"x") is False


def test_file_credential_serves_until_expiry(pool, gates, service_key, public_key, cluster,
                                              caplog):
    now = [time.time()]
    token = credential(service_key, cluster, expires_in=60)
    with caplog.at_level(logging.INFO, logger="ems.activation"):
        gate = gates(pool, cluster, public_key, credential_token=token, clock=lambda: now[0])
        assert gate.status().state == "active"
        assert pool.suspended is False
        assert serves(pool)
        key = make_key(7)
        assert pool.put(key, b"kept") is True

        now[0] += 61    # the gate's clock passes the expiry; its thread notices within 1 s
        assert wait_for(state_is(gate, "expired"), timeout=3.0)
    assert pool.suspended is True
    assert pool.get(key) is None
    assert "not serving: credential cred-1 expired at" in caplog.text
    assert token not in caplog.text
    assert token.split(".")[2] not in caplog.text


@pytest.mark.parametrize("case,state,reason", [
    ("forged", "invalid", "signature does not verify"),
    ("garbage", "invalid", "not an EMS token"),
    ("other_cluster", "wrong_cluster", "is for cluster 'elsewhere'"),
    ("expired", "expired", "expired at"),
    ("standing_as_credential", "invalid", "not a credential"),
])
def test_bad_file_credentials(pool, gates, service_key, public_key, cluster, caplog, case,
                              state, reason):
    token = {
        "forged": lambda: credential(tokens.new_private_key(), cluster),
        "garbage": lambda: "this is not a token",
        "other_cluster": lambda: credential(service_key, "elsewhere"),
        "expired": lambda: credential(service_key, cluster, expires_in=-10),
        "standing_as_credential": lambda: standing(service_key, cluster, 1),
    }[case]()
    with caplog.at_level(logging.WARNING, logger="ems.activation"):
        gate = gates(pool, cluster, public_key, credential_token=token)
    status = gate.status()
    assert status.state == state
    assert reason in status.reason
    assert "--credential" in status.reason
    assert pool.suspended is True
    assert f"node n1: not serving: " in caplog.text
    assert reason in caplog.text
    assert token not in caplog.text


# ---- ZooKeeper ------------------------------------------------------------------------


def test_znode_credential_and_standing_notices(pool, gates, zk, service_key, public_key,
                                               cluster, caplog):
    caplog.set_level(logging.INFO, logger="ems.activation")
    gate = gates(pool, cluster, public_key, zk_client=zk)
    assert wait_for(state_is(gate, "not_activated"))
    assert pool.suspended is True

    zkstate.write(zk, zkstate.activation_path(cluster), credential(service_key, cluster))
    assert wait_for(state_is(gate, "active"))
    assert gate.status().credential == "cred-1"
    assert gate.status().account == ACCOUNT
    key = make_key(1, cluster)
    block = make_block(key, 1, 4096)
    assert pool.put(key, block) is True

    path = zkstate.standing_path(cluster)
    zkstate.write(zk, path, standing(service_key, cluster, 10, revoked={"cred-1"}))
    assert wait_for(state_is(gate, "revoked"))
    assert pool.suspended is True
    assert pool.get(key) is None
    assert "node n1: not serving: credential cred-1 revoked" in caplog.text

    # An older notice, genuine but rolled back, changes nothing.
    zkstate.write(zk, path, standing(service_key, cluster, 5))
    assert wait_for(lambda: "older than the one applied" in caplog.text)
    assert gate.status().state == "revoked"

    zkstate.write(zk, path, standing(service_key, cluster, 20, arrears=True))
    assert wait_for(state_is(gate, "arrears"))
    assert f"account {ACCOUNT} in arrears" in gate.status().reason

    # A notice of another account does not touch this credential.
    zkstate.write(zk, path, standing(service_key, cluster, 30, account="acct-2", deleted=True))
    assert wait_for(lambda: "standing notice of account acct-2" in caplog.text)
    assert gate.status().state == "arrears"

    # A forged notice is ignored and logged.
    zkstate.write(zk, path, standing(tokens.new_private_key(), cluster, 35))
    assert wait_for(lambda: "ignoring the standing notice" in caplog.text)
    assert gate.status().state == "arrears"

    zkstate.write(zk, path, standing(service_key, cluster, 40))
    assert wait_for(state_is(gate, "active"))
    assert pool.get(key) == block

    zkstate.write(zk, path, standing(service_key, cluster, 50, deleted=True))
    assert wait_for(state_is(gate, "deleted"))
    assert pool.get(key) is None


def test_long_standing_notice_applied(pool, gates, zk, service_key, public_key, cluster):
    gate = gates(pool, cluster, public_key, zk_client=zk)
    zkstate.write(zk, zkstate.activation_path(cluster), credential(service_key, cluster))
    assert wait_for(state_is(gate, "active"))

    # A cluster whose account revoked many credentials over the years.
    revoked = {f"cred-{i:016x}" for i in range(2000)} | {"cred-1"}
    zkstate.write(zk, zkstate.standing_path(cluster),
                  standing(service_key, cluster, 10, revoked=revoked))
    assert wait_for(state_is(gate, "revoked"))
    assert pool.suspended is True


def test_znode_overwrite_keeps_last_valid_credential(pool, gates, zk, service_key,
                                                     public_key, cluster, caplog):
    caplog.set_level(logging.INFO, logger="ems.activation")
    gate = gates(pool, cluster, public_key, zk_client=zk)
    path = zkstate.activation_path(cluster)
    zkstate.write(zk, path, credential(service_key, cluster))
    assert wait_for(state_is(gate, "active"))

    zkstate.write(zk, path, "garbage")
    assert wait_for(lambda: "keeping the credential read from it before" in caplog.text)
    assert gate.status().state == "active"
    zk.delete(path)
    assert wait_for(lambda: "is empty or missing" in caplog.text)
    assert gate.status().state == "active"
    assert pool.suspended is False

    # A genuine newer credential replaces it.
    zkstate.write(zk, path, credential(service_key, cluster, cred_id="cred-2"))
    assert wait_for(lambda: gate.status().credential == "cred-2")
    assert gate.status().state == "active"


def test_invalid_znode_without_history_is_invalid(pool, gates, zk, service_key, public_key,
                                                  cluster):
    zkstate.write(zk, zkstate.activation_path(cluster),
                  credential(tokens.new_private_key(), cluster))
    gate = gates(pool, cluster, public_key, zk_client=zk)
    assert wait_for(state_is(gate, "invalid"))
    assert "signature" in gate.status().reason
    assert pool.suspended is True


def test_file_credential_written_to_znode(pool, gates, zk, service_key, public_key, cluster,
                                          caplog):
    caplog.set_level(logging.INFO, logger="ems.activation")
    path = zkstate.activation_path(cluster)
    token = credential(service_key, cluster)
    gate = gates(pool, cluster, public_key, zk_client=zk, credential_token=token)
    assert gate.status().state == "active"
    assert wait_for(lambda: zkstate.read(zk, path) == token)
    assert "wrote credential cred-1" in caplog.text


def test_file_credential_does_not_replace_longer_one(pool, gates, zk, service_key, public_key,
                                                     cluster, caplog):
    caplog.set_level(logging.INFO, logger="ems.activation")
    path = zkstate.activation_path(cluster)
    longer = credential(service_key, cluster, cred_id="cred-long", expires_in=7200)
    zkstate.write(zk, path, longer)
    shorter = credential(service_key, cluster, cred_id="cred-short", expires_in=3600)
    gate = gates(pool, cluster, public_key, zk_client=zk, credential_token=shorter)
    assert wait_for(lambda: "not written" in caplog.text)
    assert zkstate.read(zk, path) == longer
    assert wait_for(lambda: gate.status().credential == "cred-long")
    assert gate.status().state == "active"


def test_invalid_file_credential_not_written(pool, gates, zk, service_key, public_key, cluster,
                                             caplog):
    caplog.set_level(logging.INFO, logger="ems.activation")
    path = zkstate.activation_path(cluster)
    forged = credential(tokens.new_private_key(), cluster)
    gate = gates(pool, cluster, public_key, zk_client=zk, credential_token=forged)
    assert wait_for(lambda: "not written" in caplog.text)
    assert zkstate.read(zk, path) is None
    assert gate.status().state == "invalid"


def test_revoked_file_credential_never_serves(pool, gates, zk, service_key, public_key,
                                              cluster, caplog):
    """The notice is read before the first judgement, so the pool is never resumed."""
    caplog.set_level(logging.INFO, logger="ems.activation")
    zkstate.write(zk, zkstate.standing_path(cluster),
                  standing(service_key, cluster, 10, revoked={"cred-1"}))
    gate = gates(pool, cluster, public_key, zk_client=zk,
                 credential_token=credential(service_key, cluster))
    assert gate.status().state == "revoked"
    assert pool.suspended is True
    assert "node n1: serving" not in caplog.text
    assert wait_for(lambda: "not written" in caplog.text)
    assert zkstate.read(zk, zkstate.activation_path(cluster)) is None
