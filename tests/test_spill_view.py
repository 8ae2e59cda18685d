"""SpillView, the scheduler's read-only view of a spill directory that another process
writes: blocks in open segments count, and so do blocks of a segment published mid-scan."""
import hashlib

from ems.tiering import SpillStore
from ems.tiering.view import SpillView

SIZE = 4096


def key(i: int) -> bytes:
    return hashlib.blake2b(f"view-{i}".encode(), digest_size=32).digest()


def test_open_segment_blocks_count(tmp_path):
    with SpillStore(tmp_path, 64 << 20, io="posix") as writer:
        assert all(writer.put_many([key(i) for i in range(4)], [bytes(SIZE)] * 4))
        view = SpillView(tmp_path)
        try:
            assert view.exists_many([key(i) for i in range(5)]) == [True] * 4 + [False]
            assert view.count() == 4
        finally:
            view.close()


def test_segment_published_mid_scan_found(tmp_path, monkeypatch):
    """The writer publishes its open segment right after the view refreshed its store: the
    blocks must still be found, through the open segment the view read first."""
    with SpillStore(tmp_path, 64 << 20, io="posix") as writer:
        view = SpillView(tmp_path)
        try:
            assert view.exists_many([key(0)]) == [False]    # the view's store exists now
            assert all(writer.put_many([key(i) for i in range(4)], [bytes(SIZE)] * 4))
            refresh = view._store.refresh

            def refresh_then_publish():
                refresh()
                assert writer.publish()

            monkeypatch.setattr(view._store, "refresh", refresh_then_publish)
            view.new_step()
            assert view.exists_many([key(i) for i in range(4)]) == [True] * 4
        finally:
            view.close()
