"""Stopping a server while local clients write: the pool must stay intact.

A local client reserves slots (LOCAL_RESERVE), copies into them through its mapping of
the pool, then commits. When the server stops between the two, the client may still be
copying. The server once aborted such reservations at stop, putting the slots on the
free list under the copy, which overwrote the list's links and crashed the next writer
(a daemon stopped with SIGTERM under load did so). The stress runs in a child process,
so that a crash fails the test instead of killing pytest.
"""
import os
import subprocess
import sys
import threading
import time

ROUNDS = 5
WORKERS = 4
LOAD_S = 0.3


def local_writer(port, unix_path, tag, stop):
    """Write 4 KiB blocks through the local socket until the server goes away."""
    import ems._core as core
    from conftest import make_block, make_key
    from ems.errors import TransferError

    try:
        local = core.Connection(unix_path=unix_path, tenant="t")
        os.close(local.local_attach())
        i = 0
        while not stop.is_set():
            keys = [make_key(i * 4 + j, tag) for j in range(4)]
            local.put_many(keys, [make_block(k, 1, 4096) for k in keys])
            i += 1
    except TransferError:
        pass   # the server stopped


def stress(run_dir: str) -> None:
    """Stop servers under local write load, then fill each pool again: a corrupt free
    list crashes or fails here."""
    import ems
    import ems._core as core
    from conftest import make_key

    for round_ in range(ROUNDS):
        pool = ems.Pool(16 << 20, pages="small")
        unix_path = os.path.join(run_dir, "stop.sock")
        server = core.Server(pool, unix_path=unix_path)
        stop = threading.Event()
        threads = [threading.Thread(target=local_writer,
                                    args=(server.port, unix_path, f"w{round_}-{k}", stop))
                   for k in range(WORKERS)]
        for thread in threads:
            thread.start()
        time.sleep(LOAD_S)
        server.stop()
        stop.set()
        for thread in threads:
            thread.join()

        # 32 MiB through a 16 MiB pool: every freed slot is taken again.
        keys = [make_key(i, f"after-{round_}") for i in range(8192)]
        pool.put_many(keys, [bytes(4096)] * len(keys))
        stats = pool.stats()
        assert stats["bytes_used"] <= stats["capacity_bytes"], stats
        pool.close()


def test_stop_under_local_writes_keeps_pool_intact(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
               PYTHONFAULTHANDLER="1")
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


if __name__ == "__main__":
    stress(sys.argv[1])
