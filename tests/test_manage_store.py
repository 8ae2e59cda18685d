"""ems.manage.store.Store on a real SQLite file: what it does when the database is busy."""
import sqlite3
import threading

import pytest

from ems.manage.store import Store


@pytest.fixture
def store(tmp_path):
    store = Store(str(tmp_path / "state.db"))
    store._db.execute("PRAGMA busy_timeout = 200")   # fail fast on a locked database
    yield store
    store.close()


def test_store_usable_after_locked_database(store, tmp_path):
    account = store.create_account("acme", "1", now=0)
    other = sqlite3.connect(str(tmp_path / "state.db"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")   # the write lock taken, as by another process
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.add_topup(account.id, "5", now=1)
    other.execute("ROLLBACK")
    other.close()

    # Another thread (an API worker, the sampler) must get the store's lock again.
    results = []
    worker = threading.Thread(target=lambda: results.append(store.add_topup(account.id, "7",
                                                                            now=2)),
                              daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "the store's lock stayed taken after a failed BEGIN"
    assert results == [7]
    assert store.paid(account.id) == 7
