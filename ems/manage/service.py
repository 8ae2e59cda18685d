"""The management service's logic, below HTTP: what each API call does to the state, and
what the service sends to the data plane (credentials and standing notices in ZooKeeper).

Files in the service directory (`ems manage init` creates them):

    state.db       SQLite state (ems.manage.store)
    master.key     AES-256 key that seals secret access keys (0600)
    signing.key    Ed25519 key that signs credentials and standing notices (0600)
    signing.pub    its public key: daemons and `ems activate` verify with it
    tls.crt/.key   the HTTPS certificate (self-signed by init; production passes its own)
    audit.log      one JSON line per management call
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from decimal import Decimal

from ems.cluster.membership import check_name
from ems.manage import sealing, tokens, zkstate
from ems.manage.store import Account, Store

log = logging.getLogger("ems.manage")

MAX_CREDENTIAL_LIFETIME_S = 3 * 366 * 86400
DEFAULT_CREDENTIAL_LIFETIME_S = 365 * 86400
PUBLISH_TIMEOUT_S = 3.0   # an API call waits this long for an unreachable ZooKeeper
PUBLISH_RETRY_S = 60.0    # the sampler retries a failed notice after this long
# A dead credential leaves the standing notice this long after it expires: daemons reject
# it by its expiry by then, unless their clock is more than this far behind.
EXPIRED_LISTED_S = 86400


def money(value) -> str:
    """Decimal text with at least two decimal places: 10 -> '10.00', 0.125 -> '0.125'."""
    value = Decimal(value)
    if value.as_tuple().exponent >= -2:
        return str(value.quantize(Decimal("0.01")))
    return format(value, "f")


class Forbidden(PermissionError):
    """A call that needs the admin account (the API returns 403)."""


class Service:
    """State, keys and clock of one management service. `clock` returns Unix seconds;
    tests pass a controllable one."""

    def __init__(self, directory: str, clock=time.time):
        self.directory = directory
        self.clock = clock
        self.store = Store(os.path.join(directory, "state.db"))
        self.master = sealing.load_master_key(os.path.join(directory, "master.key"))
        self.signing_key = tokens.load_private_key(os.path.join(directory, "signing.key"))
        self.public_pem = tokens.public_pem(self.signing_key)
        # cluster id -> standing notice content last written to its ZooKeeper; clusters
        # missing here (new, or a write failed) are written on the next sampler pass.
        self._published: dict[str, tuple] = {}
        self._retry_at: dict[str, float] = {}   # cluster id -> clock time of the next try
        self._last_issued = 0                    # Unix ms of the newest notice signed
        # (zookeeper, cluster name) -> the lock held while that standing znode is written
        self._znode_locks: dict[tuple[str, str], threading.Lock] = {}
        self._publish_lock = threading.Lock()   # guards the four fields above, briefly
        self.probe = None   # reads clusters' ZooKeeper and nodes; set by ManageServer

    def now(self) -> int:
        return int(self.clock())

    def close(self) -> None:
        self.store.close()

    # ---- accounts and access keys ------------------------------------------------------

    def create_account(self, name: str, price, admin: bool = False) -> tuple[Account, str, str]:
        """Create an account with its first access key; returns it, the key id and the
        secret (shown this once)."""
        account = self.store.create_account(name, price, self.now(), admin)
        key_id, secret = self.create_access_key(account.id)
        return account, key_id, secret

    def create_access_key(self, account_id: str) -> tuple[str, str]:
        key_id, secret = sealing.new_access_key()
        self.store.add_access_key(account_id, key_id, sealing.seal(self.master, key_id, secret),
                                  self.now())
        return key_id, secret

    def secret_of(self, key_id: str) -> tuple[str, str] | None:
        """(account id, secret) of a live access key, or None."""
        row = self.store.access_key(key_id)
        if row is None:
            return None
        return row["account"], sealing.unseal(self.master, key_id, row["sealed"])

    def account_view(self, account_id: str) -> dict:
        account = self.store.account(account_id)
        paid, charged = self.store.paid(account_id), self.store.charged(account_id)
        return {"id": account.id, "name": account.name, "admin": account.admin,
                "price_per_node_hour": money(account.price), "balance": money(paid),
                "bill_due": money(charged), "available": money(paid - charged),
                "in_arrears": paid < charged,
                "clusters": len(self.store.clusters(account_id, live_only=True))}

    def in_arrears(self, account_id: str) -> bool:
        return self.store.paid(account_id) < self.store.charged(account_id)

    def top_up(self, account_id: str, amount, note: str = "") -> dict:
        was = self.in_arrears(account_id)
        self.store.add_topup(account_id, amount, self.now(), note)
        if was != self.in_arrears(account_id):
            self.publish_account(account_id)
        return self.account_view(account_id)

    # ---- clusters ----------------------------------------------------------------------

    def create_cluster(self, account_id: str, name: str, zookeeper: str) -> dict:
        check_name("cluster name", name)
        zkstate.check_hosts(zookeeper)
        return self.cluster_view(self.store.create_cluster(account_id, name, zookeeper,
                                                           self.now()))

    def cluster_view(self, row: dict) -> dict:
        return {"id": row["id"], "name": row["name"], "zookeeper": row["zookeeper"],
                "created": row["created"], "activated": row["activated"],
                "deleted": row["deleted"],
                "last_sample": self._last_sample(row["id"])}

    def _last_sample(self, cluster_id: str) -> dict | None:
        samples = self.store.samples(cluster_id)
        return {"time": samples[-1][0], "nodes": samples[-1][1]} if samples else None

    def delete_cluster(self, account_id: str, cluster_id: str) -> dict:
        row = self.store.delete_cluster(account_id, cluster_id, self.now())
        self.publish_standing(row)
        return self.cluster_view(row)

    # ---- credentials -------------------------------------------------------------------

    def create_credential(self, account_id: str, cluster_id: str,
                          lifetime_s: int = DEFAULT_CREDENTIAL_LIFETIME_S) -> tuple[dict, str]:
        """Issue a credential for one of the account's clusters; returns its view and the
        token (shown this once)."""
        if not 60 <= lifetime_s <= MAX_CREDENTIAL_LIFETIME_S:
            raise ValueError(f"credential lifetime {lifetime_s} s must be between 60 s and "
                             f"{MAX_CREDENTIAL_LIFETIME_S} s (3 years)")
        now = self.now()
        row = self.store.add_credential(account_id, cluster_id, now, now + lifetime_s)
        cluster = self.store.cluster(account_id, cluster_id)
        token = tokens.sign_credential(self.signing_key, tokens.Credential(
            id=row["id"], account=account_id, cluster=cluster["name"], issued=row["issued"],
            expires=row["expires"]))
        return self.credential_view(row), token

    def credential_view(self, row: dict) -> dict:
        cluster = self.store.cluster(None, row["cluster"])
        state = ("revoked" if row["revoked"] is not None else
                 "expired" if row["expires"] <= self.now() else "valid")
        return {"id": row["id"], "cluster": row["cluster"], "cluster_name": cluster["name"],
                "issued": row["issued"], "expires": row["expires"], "revoked": row["revoked"],
                "state": state}

    def revoke_credential(self, account_id: str, credential_id: str) -> dict:
        row = self.store.revoke_credential(account_id, credential_id, self.now())
        view = self.credential_view(row)
        view["notice"] = self.publish_standing(self.store.cluster(account_id, row["cluster"]))
        return view

    # ---- standing notices --------------------------------------------------------------

    def standing_of(self, cluster: dict) -> tokens.Standing:
        """Return the cluster's standing now, with `issued` 0 until publish_standing signs it."""
        return tokens.Standing(account=cluster["account"], cluster=cluster["name"], issued=0,
                               revoked=frozenset(self.store.dead_credentials(
                                   cluster["account"], cluster["name"],
                                   self.now() - EXPIRED_LISTED_S)),
                               arrears=self.in_arrears(cluster["account"]),
                               deleted=cluster["deleted"] is not None)

    def _next_issued(self) -> int:
        """Return the Unix ms time for a new notice, later than every notice signed before.
        A daemon applies a notice only when it is newer than the one it holds, so two
        notices signed in the same millisecond must not share a time. Call it under
        _publish_lock.
        NOTE: only this process's notices are ordered. A service restarted with its clock
        set back signs notices that daemons ignore until the clock passes the old ones."""
        self._last_issued = max(int(self.clock() * 1000), self._last_issued + 1)
        return self._last_issued

    def publish_standing(self, cluster: dict, force: bool = True) -> str:
        """Write the cluster's standing notice to its ZooKeeper. Without force, only when it
        differs from what was last written, and not within PUBLISH_RETRY_S of a failed
        write. Returns "published", "unchanged", or why it was not written (the sampler
        retries a notice that is pending)."""
        with self._publish_lock:
            znode_lock = self._znode_locks.setdefault((cluster["zookeeper"], cluster["name"]),
                                                      threading.Lock())
        # One writer per standing znode, so that of two concurrent calls the one that writes
        # last also read the state last and signs the later time. Different znodes, such as
        # the sampler's many clusters, are written in parallel.
        with znode_lock:
            return self._publish_standing(cluster["id"], force)

    def _publish_standing(self, cluster_id: str, force: bool) -> str:
        # The row is read again because the caller's copy (the sampler's listing) may
        # predate a deletion.
        cluster = self.store.cluster(None, cluster_id)
        if cluster["deleted"] is not None and \
                self.store.live_cluster(cluster["zookeeper"], cluster["name"]):
            # A newer cluster of this name and ZooKeeper owns the standing znode now. This
            # notice would replace that cluster's notice and stop its daemons.
            return ("not written: a newer cluster of this name on this ZooKeeper uses the "
                    "standing notice")

        standing = self.standing_of(cluster)
        content = (standing.revoked, standing.arrears, standing.deleted)
        with self._publish_lock:
            if not force and self._published.get(cluster_id) == content:
                return "unchanged"
            if not force and self.clock() < self._retry_at.get(cluster_id, 0.0):
                return "pending: waiting to retry ZooKeeper"
            self._published.pop(cluster_id, None)
            standing = dataclasses.replace(standing, issued=self._next_issued())

        token = tokens.sign_standing(self.signing_key, standing)
        try:
            if len(token) > tokens.MAX_STANDING_CHARS:
                raise ValueError(f"the notice is {len(token)} characters long, above the "
                                 f"{tokens.MAX_STANDING_CHARS} that daemons accept")
            zkstate.publish(cluster["zookeeper"], zkstate.standing_path(cluster["name"]),
                            token, timeout=PUBLISH_TIMEOUT_S)
        except Exception as exc:   # ZooKeeper down or unreachable: retried later
            with self._publish_lock:
                self._retry_at[cluster_id] = self.clock() + PUBLISH_RETRY_S
            log.warning("standing notice of cluster %s (%s) not written to ZooKeeper %s: %s; "
                        "retrying in %.0f s", cluster_id, cluster["name"],
                        cluster["zookeeper"], exc, PUBLISH_RETRY_S,
                        extra={"cluster": cluster_id, "account": cluster["account"]})
            return f"pending: ZooKeeper {cluster['zookeeper']} unreachable ({exc})"

        with self._publish_lock:
            self._published[cluster_id] = content
        log.info("standing notice of cluster %s (%s): revoked %d credentials, arrears %s, "
                 "deleted %s", cluster_id, cluster["name"], len(standing.revoked),
                 standing.arrears, standing.deleted,
                 extra={"cluster": cluster_id, "account": cluster["account"]})
        return "published"

    def publish_account(self, account_id: str) -> None:
        for cluster in self.store.clusters(account_id, live_only=True):
            self.publish_standing(cluster)


def require_admin(service: Service, account_id: str) -> None:
    if not service.store.account(account_id).admin:
        raise Forbidden("this call needs the service's admin account")

