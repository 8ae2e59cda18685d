"""The management service's state: one SQLite database in the service's directory.

Money is kept as decimal text (exact), times as Unix seconds. Every method runs under one
lock, in one transaction, so the API threads and the sampler never see half an update.
Resource ids carry their kind: acct-, clu-, cred-; access key ids start with EK.
"""
from __future__ import annotations

import secrets
import sqlite3
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from ems.manage import billing

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, price TEXT NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS access_keys (
    id TEXT PRIMARY KEY, account TEXT NOT NULL REFERENCES accounts(id),
    sealed BLOB NOT NULL, created INTEGER NOT NULL, revoked INTEGER);
CREATE TABLE IF NOT EXISTS clusters (
    id TEXT PRIMARY KEY, account TEXT NOT NULL REFERENCES accounts(id), name TEXT NOT NULL,
    zookeeper TEXT NOT NULL, created INTEGER NOT NULL, activated INTEGER, deleted INTEGER);
CREATE UNIQUE INDEX IF NOT EXISTS live_cluster_names
    ON clusters(zookeeper, name) WHERE deleted IS NULL;
CREATE TABLE IF NOT EXISTS credentials (
    id TEXT PRIMARY KEY, account TEXT NOT NULL REFERENCES accounts(id),
    cluster TEXT NOT NULL REFERENCES clusters(id), issued INTEGER NOT NULL,
    expires INTEGER NOT NULL, revoked INTEGER);
CREATE TABLE IF NOT EXISTS samples (
    cluster TEXT NOT NULL REFERENCES clusters(id), time INTEGER NOT NULL,
    nodes INTEGER NOT NULL, PRIMARY KEY (cluster, time));
CREATE TABLE IF NOT EXISTS hours (
    cluster TEXT NOT NULL REFERENCES clusters(id), hour INTEGER NOT NULL,
    node_sum INTEGER NOT NULL, samples INTEGER NOT NULL, price TEXT NOT NULL,
    PRIMARY KEY (cluster, hour));
CREATE TABLE IF NOT EXISTS topups (
    id INTEGER PRIMARY KEY AUTOINCREMENT, account TEXT NOT NULL REFERENCES accounts(id),
    amount TEXT NOT NULL, time INTEGER NOT NULL, note TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS nonces (
    key_id TEXT NOT NULL, nonce TEXT NOT NULL, time INTEGER NOT NULL,
    PRIMARY KEY (key_id, nonce));
"""

MAX_PRICE = Decimal("1000000")
MAX_TOPUP = Decimal("1000000000")


class NotFound(LookupError):
    """A resource that does not exist or belongs to another account (the API returns 404)."""


class Conflict(ValueError):
    """A request that clashes with the current state (the API returns 409)."""


def new_id(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(8)}"


def parse_money(text, what: str, limit: Decimal, allow_zero: bool = False) -> Decimal:
    """Parse an amount above 0 (or at 0 with allow_zero) and at most `limit`, with at most 6
    decimal places; ValueError otherwise."""
    try:
        value = Decimal(str(text))
    except InvalidOperation:
        raise ValueError(f"{what} {text!r} is not a decimal number such as 12.50") from None
    if not value.is_finite() or value < 0 or (value == 0 and not allow_zero) or value > limit:
        lowest = "at least 0" if allow_zero else "greater than 0"
        raise ValueError(f"{what} {text!r} must be {lowest} and at most {limit}")
    if value == 0:
        return Decimal(0)   # not -0 or 0E+99, which would be stored and shown as typed
    if value.as_tuple().exponent < -6:
        raise ValueError(f"{what} {text!r} has more than 6 decimal places")
    return value


@dataclass
class Account:
    id: str
    name: str
    price: Decimal
    admin: bool
    created: int


class Store:
    def __init__(self, path: str):
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        return _Transaction(self)

    def _one(self, sql: str, *args):
        return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, *args) -> list:
        return self._db.execute(sql, args).fetchall()

    # ---- accounts and keys -------------------------------------------------------------

    def create_account(self, name: str, price, now: int, admin: bool = False) -> Account:
        if not isinstance(name, str) or not 1 <= len(name) <= 100 or not name.isprintable():
            raise ValueError(f"account name {name!r} must be 1 to 100 printable characters")
        price = parse_money(price, "price per node-hour", MAX_PRICE, allow_zero=True)
        account = Account(new_id("acct"), name, price, admin, now)
        with self._tx():
            if self._one("SELECT 1 FROM accounts WHERE name = ?", name):
                raise Conflict(f"an account named {name!r} exists already")
            self._db.execute("INSERT INTO accounts VALUES (?, ?, ?, ?, ?)",
                             (account.id, name, str(price), int(admin), now))
        return account

    def account(self, account_id: str) -> Account:
        with self._lock:
            row = self._one("SELECT * FROM accounts WHERE id = ?", account_id)
        if row is None:
            raise NotFound(f"account {account_id} not found")
        return Account(row["id"], row["name"], Decimal(row["price"]), bool(row["admin"]),
                       row["created"])

    def accounts(self) -> list[Account]:
        with self._lock:
            rows = self._all("SELECT id FROM accounts ORDER BY created, id")
        return [self.account(row["id"]) for row in rows]

    def add_access_key(self, account_id: str, key_id: str, sealed: bytes, now: int) -> None:
        with self._tx():
            self._db.execute("INSERT INTO access_keys VALUES (?, ?, ?, ?, NULL)",
                             (key_id, account_id, sealed, now))

    def access_key(self, key_id: str):
        """Return the live key's row (account, sealed secret), or None."""
        with self._lock:
            return self._one("SELECT * FROM access_keys WHERE id = ? AND revoked IS NULL",
                             key_id)

    def access_keys(self, account_id: str) -> list[dict]:
        with self._lock:
            rows = self._all("SELECT id, created, revoked FROM access_keys WHERE account = ? "
                             "ORDER BY created, id", account_id)
        return [dict(row) for row in rows]

    def revoke_access_key(self, account_id: str, key_id: str, now: int) -> None:
        with self._tx():
            row = self._one("SELECT revoked FROM access_keys WHERE id = ? AND account = ?",
                            key_id, account_id)
            if row is None:
                raise NotFound(f"access key {key_id} not found")
            live = self._one("SELECT COUNT(*) AS n FROM access_keys WHERE account = ? AND "
                             "revoked IS NULL", account_id)["n"]
            if row["revoked"] is None and live == 1:
                raise Conflict(f"access key {key_id} is the account's last live key; create "
                               f"another before revoking it")
            self._db.execute("UPDATE access_keys SET revoked = COALESCE(revoked, ?) "
                             "WHERE id = ?", (now, key_id))

    def use_nonce(self, key_id: str, nonce: str, now: int, window: int) -> bool:
        """Record a nonce; False when the key used it within `window` seconds (a replay)."""
        with self._tx():
            self._db.execute("DELETE FROM nonces WHERE time < ?", (now - 2 * window,))
            try:
                self._db.execute("INSERT INTO nonces VALUES (?, ?, ?)", (key_id, nonce, now))
            except sqlite3.IntegrityError:
                return False
        return True

    # ---- clusters ----------------------------------------------------------------------

    def create_cluster(self, account_id: str, name: str, zookeeper: str, now: int) -> dict:
        cluster_id = new_id("clu")
        with self._tx():
            try:
                self._db.execute("INSERT INTO clusters VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                                 (cluster_id, account_id, name, zookeeper, now))
            except sqlite3.IntegrityError:
                raise Conflict(f"a cluster named {name!r} on ZooKeeper {zookeeper} exists "
                               f"already") from None
        return self.cluster(account_id, cluster_id)

    def cluster(self, account_id: str | None, cluster_id: str) -> dict:
        """Return a cluster of the account (of any account when account_id is None)."""
        with self._lock:
            row = self._one("SELECT * FROM clusters WHERE id = ?", cluster_id)
        if row is None or (account_id is not None and row["account"] != account_id):
            raise NotFound(f"cluster {cluster_id} not found")
        return dict(row)

    def clusters(self, account_id: str | None = None, live_only: bool = False) -> list[dict]:
        sql, args = "SELECT * FROM clusters WHERE 1", []
        if account_id is not None:
            sql, args = sql + " AND account = ?", [account_id]
        if live_only:
            sql += " AND deleted IS NULL"
        with self._lock:
            return [dict(row) for row in self._all(sql + " ORDER BY created, id", *args)]

    def live_cluster(self, zookeeper: str, name: str) -> dict | None:
        """Return the live cluster named `name` on `zookeeper`, of any account, or None. The
        index live_cluster_names allows at most one."""
        with self._lock:
            row = self._one("SELECT * FROM clusters WHERE zookeeper = ? AND name = ? AND "
                            "deleted IS NULL", zookeeper, name)
        return dict(row) if row is not None else None

    def delete_cluster(self, account_id: str, cluster_id: str, now: int) -> dict:
        with self._tx():
            self.cluster(account_id, cluster_id)
            self._db.execute("UPDATE clusters SET deleted = COALESCE(deleted, ?) WHERE id = ?",
                             (now, cluster_id))
        return self.cluster(account_id, cluster_id)

    def mark_activated(self, cluster_id: str, now: int) -> None:
        with self._tx():
            self._db.execute("UPDATE clusters SET activated = ? WHERE id = ? AND "
                             "activated IS NULL", (now, cluster_id))

    # ---- credentials -------------------------------------------------------------------

    def add_credential(self, account_id: str, cluster_id: str, issued: int,
                       expires: int) -> dict:
        credential_id = new_id("cred")
        with self._tx():
            cluster = self.cluster(account_id, cluster_id)
            if cluster["deleted"] is not None:
                raise Conflict(f"cluster {cluster_id} is deleted")
            self._db.execute("INSERT INTO credentials VALUES (?, ?, ?, ?, ?, NULL)",
                             (credential_id, account_id, cluster_id, issued, expires))
        return self.credential(account_id, credential_id)

    def credential(self, account_id: str, credential_id: str) -> dict:
        with self._lock:
            row = self._one("SELECT * FROM credentials WHERE id = ?", credential_id)
        if row is None or row["account"] != account_id:
            raise NotFound(f"credential {credential_id} not found")
        return dict(row)

    def credentials(self, account_id: str, cluster_id: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM credentials WHERE account = ?", [account_id]
        if cluster_id is not None:
            sql, args = sql + " AND cluster = ?", args + [cluster_id]
        with self._lock:
            return [dict(row) for row in self._all(sql + " ORDER BY issued, id", *args)]

    def revoke_credential(self, account_id: str, credential_id: str, now: int) -> dict:
        with self._tx():
            self.credential(account_id, credential_id)
            self._db.execute("UPDATE credentials SET revoked = COALESCE(revoked, ?) "
                             "WHERE id = ?", (now, credential_id))
        return self.credential(account_id, credential_id)

    def dead_credentials(self, account_id: str, cluster_name: str,
                         expires_after: int) -> list[str]:
        """Return the ids of the account's credentials for any cluster named `cluster_name`
        that are revoked or whose cluster is deleted, and that expire after `expires_after`.
        A credential names its cluster only by name, so it activates every cluster of that
        name, including one registered again after its own was deleted: the notice of each
        must list it."""
        with self._lock:
            rows = self._all(
                "SELECT cr.id FROM credentials cr JOIN clusters c ON c.id = cr.cluster "
                "WHERE cr.account = ? AND c.name = ? AND cr.expires > ? AND "
                "(cr.revoked IS NOT NULL OR c.deleted IS NOT NULL) ORDER BY cr.id",
                account_id, cluster_name, expires_after)
        return [row["id"] for row in rows]

    # ---- metering ----------------------------------------------------------------------

    def record_sample(self, cluster_id: str, time: int, nodes: int) -> bool:
        """Store one sample and add it to its hour, once: a second sample of the same
        cluster and time is ignored. Returns whether it was new."""
        if not billing.is_sample_time(time) or nodes < 0:
            raise ValueError(f"invalid sample: time {time}, nodes {nodes}")
        hour = billing.hour_of(time)
        with self._tx():
            cluster = self._one("SELECT account FROM clusters WHERE id = ?", cluster_id)
            if cluster is None:
                raise NotFound(f"cluster {cluster_id} not found")
            inserted = self._db.execute("INSERT OR IGNORE INTO samples VALUES (?, ?, ?)",
                                        (cluster_id, time, nodes)).rowcount
            if not inserted:
                return False
            price = self.account(cluster["account"]).price
            # The hour keeps the price of its first sample, so a later price change does
            # not reprice hours already metered.
            self._db.execute(
                "INSERT INTO hours VALUES (?, ?, ?, 1, ?) ON CONFLICT (cluster, hour) DO "
                "UPDATE SET node_sum = node_sum + excluded.node_sum, samples = samples + 1",
                (cluster_id, hour, nodes, str(price)))
        return True

    def has_sample(self, cluster_id: str, time: int) -> bool:
        with self._lock:
            return self._one("SELECT 1 FROM samples WHERE cluster = ? AND time = ?",
                             cluster_id, time) is not None

    def samples(self, cluster_id: str) -> list[tuple[int, int]]:
        with self._lock:
            rows = self._all("SELECT time, nodes FROM samples WHERE cluster = ? ORDER BY time",
                             cluster_id)
        return [(row["time"], row["nodes"]) for row in rows]

    def hours(self, account_id: str, start: int | None = None, end: int | None = None,
              cluster_id: str | None = None) -> list[dict]:
        """Metered hours of the account's clusters with start <= hour < end, oldest first."""
        sql = ("SELECT h.cluster, c.name, h.hour, h.node_sum, h.samples, h.price FROM hours h "
               "JOIN clusters c ON c.id = h.cluster WHERE c.account = ?")
        args: list = [account_id]
        if start is not None:
            sql, args = sql + " AND h.hour >= ?", args + [start]
        if end is not None:
            sql, args = sql + " AND h.hour < ?", args + [end]
        if cluster_id is not None:
            sql, args = sql + " AND h.cluster = ?", args + [cluster_id]
        with self._lock:
            rows = self._all(sql + " ORDER BY h.hour, c.name, h.cluster", *args)
        return [dict(row) for row in rows]

    # ---- money -------------------------------------------------------------------------

    def add_topup(self, account_id: str, amount, now: int, note: str = "") -> Decimal:
        amount = parse_money(amount, "top-up amount", MAX_TOPUP)
        if len(note) > 200:
            raise ValueError(f"top-up note has {len(note)} characters; the limit is 200")
        with self._tx():
            self.account(account_id)
            self._db.execute("INSERT INTO topups (account, amount, time, note) "
                             "VALUES (?, ?, ?, ?)", (account_id, str(amount), now, note))
        return amount

    def paid(self, account_id: str) -> Decimal:
        with self._lock:
            rows = self._all("SELECT amount FROM topups WHERE account = ?", account_id)
        return sum((Decimal(row["amount"]) for row in rows), Decimal(0))

    def charged(self, account_id: str) -> Decimal:
        """Everything metered so far, hour by hour: floor(node_sum / 12) x the hour's price."""
        return sum((billing.charge(billing.node_hours(row["node_sum"]), Decimal(row["price"]))
                    for row in self.hours(account_id)), Decimal(0))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the store's lock; ROLLBACK on an exception."""

    def __init__(self, store: Store):
        self.store = store

    def __enter__(self):
        self.store._lock.acquire()
        try:
            self.nested = self.store._db.in_transaction
            if not self.nested:
                self.store._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            # BEGIN fails when another process keeps the write lock past the busy
            # timeout. The lock must not stay taken, or every later call would wait forever.
            self.store._lock.release()
            raise
        return self

    def __exit__(self, kind, value, traceback):
        try:
            if not self.nested:
                self.store._db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.store._lock.release()
        return False
