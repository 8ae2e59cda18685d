"""The activation gate of a node daemon: it serves only while its cluster is activated.

With `ems serve --manage-public-key FILE` the daemon starts with its pool suspended
(Pool.set_suspended) and resumes it only while a credential signed by the management
service activates the daemon's cluster and the service's latest standing notice does not
withdraw it. The credential comes from `--credential FILE` and from the activation znode,
the notice from the standing znode (ems.manage.zkstate). The gate re-judges on every znode
change and at least once a second, so a credential stops serving at its expiry time.

The data path never waits here: the C pool reads one shared flag. ZooKeeper is read through
kazoo DataWatch callbacks and written only from the gate's own thread. Tokens are never
logged, only the ids they carry.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from kazoo.exceptions import KazooException, NoNodeError
from kazoo.recipe.watchers import DataWatch

from ems.manage import zkstate
from ems.manage.tokens import Credential, Standing, TokenError, parse_credential, \
    verify_standing

logger = logging.getLogger("ems.activation")

# Every state a gate can report; the daemon serves only in "active".
STATES = ("active", "not_activated", "invalid", "wrong_cluster", "expired", "revoked",
          "arrears", "deleted")
NOT_ENFORCED = "not_enforced"   # the state a daemon without a gate reports
TICK_S = 1.0                    # maximum wait between two judgements
WRITE_RETRY_S = 5.0             # wait after a failed write of --credential to ZooKeeper
FIRST_READ_TIMEOUT_S = 5.0      # maximum wait at start for the standing notice


@dataclass(frozen=True)
class ActivationStatus:
    """The gate's decision and its reason. `credential` and `account` are ids or None."""

    state: str
    reason: str
    credential: str | None = None
    account: str | None = None
    expires: int | None = None      # Unix seconds

    @property
    def serving(self) -> bool:
        return self.state in ("active", NOT_ENFORCED)

    def as_dict(self) -> dict:
        return {"state": self.state, "reason": self.reason, "serving": self.serving,
                "account": self.account, "credential": self.credential,
                "expires": self.expires}


def format_time(seconds: int) -> str:
    """UTC date and time of Unix `seconds`, for messages."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return f"Unix time {seconds}"


def judge(credential: Credential, cluster: str, standing: Standing | None,
          now: float) -> ActivationStatus:
    """Decide the state of a credential whose signature is good: its own cluster and
    expiry first, then the standing notice of its account (None: no notice)."""
    ids = dict(credential=credential.id, account=credential.account,
               expires=credential.expires)
    if credential.cluster != cluster:
        return ActivationStatus("wrong_cluster", f"credential {credential.id} is for cluster "
                                f"{credential.cluster!r}, not {cluster!r}", **ids)
    if credential.expired(now):
        return ActivationStatus("expired", f"credential {credential.id} expired at "
                                f"{format_time(credential.expires)}", **ids)
    if standing is not None and standing.account == credential.account:
        if standing.deleted:
            return ActivationStatus("deleted", f"cluster {cluster} of account "
                                    f"{credential.account} was deleted", **ids)
        if credential.id in standing.revoked:
            return ActivationStatus("revoked", f"credential {credential.id} revoked", **ids)
        if standing.arrears:
            return ActivationStatus("arrears", f"account {credential.account} in arrears",
                                    **ids)
    return ActivationStatus("active", f"credential {credential.id} of account "
                            f"{credential.account} activates cluster {cluster} until "
                            f"{format_time(credential.expires)}", **ids)


class ActivationGate:
    """Suspends or resumes one daemon's pool from its credential and standing notice.

    Threads: kazoo's callbacks and the gate's own thread both call _judge, which holds
    _judge_lock while it decides, sets the pool flag and logs, so changes apply in order.
    _lock guards the tokens, notices and status for short reads and writes; status()
    takes only _lock and never waits on ZooKeeper.
    """

    def __init__(self, pool, *, node_id: str, cluster: str, public_key,
                 credential_token: str | None = None, credential_source: str = "--credential",
                 clock=time.time):
        self.pool = pool
        self.node_id = node_id
        self.cluster = cluster
        self.public_key = public_key
        self.clock = clock
        self._lock = threading.Lock()
        self._judge_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._client = None
        self._watches: list[DataWatch] = []
        self._status: ActivationStatus | None = None   # None until the first judgement

        # Candidate credentials: (source, token). The znode's is the last token read from
        # it that verified for this cluster. It is kept while the znode is removed or
        # contains something that does not verify, so that such a write cannot stop a
        # cluster.
        self._file = (credential_source, credential_token) if credential_token else None
        self._znode = None
        self._znode_problem = None      # (state, reason) when the znode's text is not used
        self._notices: dict[str, Standing] = {}   # latest notice by account (anti-rollback)
        self._write_pending = self._file is not None
        self._next_write = 0.0

    # -- lifecycle --

    def start(self, zk_client=None) -> None:
        """Suspend the pool, judge the --credential token, and start the gate's thread. With
        `zk_client` (a started KazooClient) the thread also watches the znodes and writes a
        valid --credential token to the activation znode."""
        self.pool.set_suspended(True)
        self._client = zk_client
        self._write_pending = self._write_pending and zk_client is not None
        if zk_client is not None:
            self._read_standing_once()
        self._judge()
        self._thread = threading.Thread(target=self._run, name="ems-activation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread. Each watch ends at its next event, and the pool flag stays as
        it is."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def status(self) -> ActivationStatus:
        """Return the latest decision without waiting on ZooKeeper."""
        with self._lock:
            status = self._status
        return status or ActivationStatus("not_activated", "the gate has not started")

    def _read_standing_once(self) -> None:
        """Read the standing notice before the first judgement, so that a revoked
        --credential file does not serve until the watch delivers the notice."""
        path = zkstate.standing_path(self.cluster)
        try:
            data, _ = self._client.get_async(path).get(timeout=FIRST_READ_TIMEOUT_S)
        except self._client.handler.timeout_exception:
            logger.warning("node %s: reading %s timed out after %g s; judging without it "
                           "until the watch reads it", self.node_id, path,
                           FIRST_READ_TIMEOUT_S)
            return
        except NoNodeError:
            return
        except KazooException as exc:
            logger.warning("node %s: reading %s failed: %r; judging without it until the "
                           "watch reads it", self.node_id, path, exc)
            return
        if data:
            self._take_standing(data.decode("ascii", "replace").strip())

    # -- the gate's thread --

    def _run(self) -> None:
        if self._client is not None:
            self._watch()
        while not self._stop.is_set():
            try:
                if self._write_pending and self.clock() >= self._next_write:
                    self._write_credential()
                self._judge()
            except Exception:   # the thread must survive; the pool flag keeps its value
                logger.exception("node %s: activation check failed; retrying", self.node_id)
            self._stop.wait(self._wait_s())

    def _wait_s(self) -> float:
        """Return the wait until the next judgement: TICK_S, or less when the active
        credential expires sooner, so that it stops serving at its expiry time."""
        status = self.status()
        if status.state != "active" or status.expires is None:
            return TICK_S
        return min(TICK_S, max(0.01, status.expires - self.clock()))

    def _watch(self) -> None:
        """Start the DataWatches. Each first reads its znode, retrying while ZooKeeper is
        unreachable, which is why this runs here and not in the daemon's start."""
        paths = [(zkstate.activation_path(self.cluster), self._on_activation),
                 (zkstate.standing_path(self.cluster), self._on_standing)]
        for path, callback in paths:
            try:
                self._watches.append(DataWatch(self._client, path, callback))
            except KazooException as exc:
                # Only a closed client gets here (DataWatch retries everything else).
                logger.warning("node %s: cannot watch %s: %r", self.node_id, path, exc)

    def _write_credential(self) -> None:
        """Write the --credential token to the activation znode, unless the znode contains
        a credential that is active and expires no earlier."""
        source, token = self._file
        path = zkstate.activation_path(self.cluster)
        mine = self._candidate_status(token)
        if mine.state != "active":
            self._write_pending = False
            logger.warning("node %s: %s not written to %s: %s", self.node_id, source, path,
                           mine.reason)
            return
        try:
            current = zkstate.read(self._client, path)
            theirs = self._candidate_status(current) if current else None
            if current == token.strip():
                pass
            elif theirs is not None and theirs.state == "active" and \
                    theirs.expires >= mine.expires:
                logger.info("node %s: %s not written to %s: it contains credential %s, which "
                            "expires no earlier", self.node_id, source, path, theirs.credential)
            else:
                zkstate.write(self._client, path, token.strip())
                logger.info("node %s: wrote credential %s from %s to %s", self.node_id,
                            mine.credential, source, path,
                            extra={"cluster": self.cluster, "account": mine.account,
                                   "credential": mine.credential})
            self._write_pending = False
        except KazooException as exc:
            self._next_write = self.clock() + WRITE_RETRY_S
            logger.warning("node %s: writing credential %s to %s failed: %r; retrying in "
                           "%g s", self.node_id, mine.credential, path, exc, WRITE_RETRY_S)

    # -- ZooKeeper callbacks (kazoo's threads) --

    def _on_activation(self, data, stat):
        if self._stop.is_set():
            return False
        try:
            self._take_activation(data.decode("ascii", "replace").strip() if data else None)
            self._judge()
        except Exception:   # kazoo would log and drop the watch otherwise
            logger.exception("node %s: applying the activation znode failed", self.node_id)
        return None

    def _on_standing(self, data, stat):
        if self._stop.is_set():
            return False
        try:
            if data:
                self._take_standing(data.decode("ascii", "replace").strip())
                self._judge()
        except Exception:
            logger.exception("node %s: applying the standing notice failed", self.node_id)
        return None

    def _take_activation(self, token: str | None) -> None:
        path = zkstate.activation_path(self.cluster)
        if not token:
            problem = ("not_activated", f"{path} is empty or missing")
        else:
            try:
                credential = parse_credential(self.public_key, token)
            except TokenError as exc:
                problem = ("invalid", f"the credential in {path} is invalid: {exc}")
            else:
                if credential.cluster == self.cluster:
                    with self._lock:
                        self._znode = (path, token)
                        self._znode_problem = None
                    return
                problem = ("wrong_cluster", f"credential {credential.id} in {path} is for "
                           f"cluster {credential.cluster!r}, not {self.cluster!r}")
        with self._lock:
            previous_token = self._znode
            self._znode_problem = problem
        if previous_token is not None:
            logger.warning("node %s: %s; keeping the credential read from it before",
                           self.node_id, problem[1])

    def _take_standing(self, token: str) -> None:
        path = zkstate.standing_path(self.cluster)
        try:
            notice = verify_standing(self.public_key, token, cluster=self.cluster)
        except TokenError as exc:
            logger.warning("node %s: ignoring the standing notice in %s: %s", self.node_id,
                           path, exc)
            return
        with self._lock:
            applied = self._notices.get(notice.account)
            if applied is None or notice.issued > applied.issued:
                self._notices[notice.account] = notice
        if applied is None or notice.issued > applied.issued:
            logger.info("node %s: applied the standing notice of account %s issued at %d ms "
                        "(%d credentials revoked, arrears: %s, deleted: %s)", self.node_id,
                        notice.account, notice.issued, len(notice.revoked),
                        "yes" if notice.arrears else "no", "yes" if notice.deleted else "no")
        elif notice.issued < applied.issued:
            logger.warning("node %s: ignoring the standing notice of account %s issued at "
                           "%d ms: it is older than the one applied (issued at %d ms)",
                           self.node_id, notice.account, notice.issued, applied.issued)

    # -- judging --

    def _candidate_status(self, token: str | None) -> ActivationStatus:
        """State of one credential token under the notices known now."""
        if not token:
            return ActivationStatus("not_activated", "no credential")
        try:
            credential = parse_credential(self.public_key, token)
        except TokenError as exc:
            return ActivationStatus("invalid", f"invalid credential: {exc}")
        with self._lock:
            notice = self._notices.get(credential.account)
        return judge(credential, self.cluster, notice, self.clock())

    def _decide(self) -> ActivationStatus:
        """Judge every candidate and keep the best: an active one that expires last, else
        the znode's (the cluster-wide one), else the --credential file's."""
        with self._lock:
            candidates = [c for c in (self._znode, self._file) if c is not None]
            problem = self._znode_problem
        if not candidates:
            if problem is not None and problem[0] != "not_activated":
                return ActivationStatus(*problem)
            return ActivationStatus("not_activated", "no credential: activate the cluster "
                                    "with `ems activate` or `ems serve --credential`")
        judged = [(source, self._candidate_status(token)) for source, token in candidates]
        active = [status for _, status in judged if status.state == "active"]
        if active:
            return max(active, key=lambda status: status.expires)
        source, status = judged[0]
        return ActivationStatus(status.state, f"{status.reason} (from {source})",
                                status.credential, status.account, status.expires)

    def _judge(self) -> None:
        """Decide, and on a change of state or credential set the pool flag and log one
        line."""
        with self._judge_lock:
            status = self._decide()
            with self._lock:
                previous, self._status = self._status, status
            if previous is not None and \
                    (status.state, status.credential) == (previous.state, previous.credential):
                return
            self.pool.set_suspended(not status.serving)
            self._log(status)

    def _log(self, status: ActivationStatus) -> None:
        ids = {"cluster": self.cluster, "account": status.account,
               "credential": status.credential, "state": status.state}
        if status.serving:
            logger.info("node %s: serving: %s", self.node_id, status.reason, extra=ids)
        else:
            logger.warning("node %s: not serving: %s", self.node_id, status.reason, extra=ids)
