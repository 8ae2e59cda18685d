"""Client load of the rolling upgrade test, run as a separate process:

    python upgrade_load.py OUT_PREFIX STOP_FILE SOCKET ZOOKEEPER CLUSTER TAG [PEER_KEYS]

Until STOP_FILE exists, each round writes BATCH new blocks through ems.connect, in cluster
mode and attached to the daemon at SOCKET. It finds the daemons that hold them with an
EXISTS call to each daemon. Then it reads back a sample of its own earlier blocks and of
the blocks listed in PEER_KEYS (another worker's key file), and checks every hit byte for
byte.
EMS_PROTO_MAX=1 in the environment makes it a client of the previous protocol version.

OUT_PREFIX.keys gets one JSON line per block written: key (hex), size, t (time.time()
before the write) and holders (node ids whose pool had it just after). OUT_PREFIX.json
gets the summary when the worker ends: counts, wrong blocks, client counters, and the
error when a call raised.
"""
import json
import os
import random
import sys
import time
import traceback

import ems
import ems._core as core
from conftest import make_block, make_key
from ems.errors import TransferError

BATCH = 4
SIZES = (2048, 4096)
READ_SAMPLE = 6
ROUND_SLEEP_S = 0.05
MAX_RUN_S = 180.0          # a stop file that never comes must not leave the worker running
TENANT = "load"


class Holders:
    """Direct connections to each daemon, to ask which of them store a block."""

    def __init__(self, secret: bytes):
        self.secret = secret
        self.conns = {}

    def find(self, membership, keys) -> list[list[str]]:
        holders = [[] for _ in keys]
        for node_id, record in sorted(membership.nodes().items()):
            try:
                conn = self.conns.get(node_id)
                if conn is None or not conn.alive:
                    conn = core.Connection(record.host, record.port, secret=self.secret,
                                           tenant=TENANT, timeout_ms=1000)
                    self.conns[node_id] = conn
                present = conn.exists_many(keys, timeout_ms=1000)
            except TransferError:
                self.conns.pop(node_id, None)
                continue   # the node restarts: holders unknown there
            for i, found in enumerate(present):
                if found:
                    holders[i].append(node_id)
        return holders


def read_peer_keys(path: str | None, offset: int, known: list) -> int:
    """Append the whole lines of another worker's key file after `offset`; returns the new
    offset."""
    if not path or not os.path.exists(path):
        return offset
    with open(path) as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind("\n") + 1
    for line in data[:end].splitlines():
        record = json.loads(line)
        if record["holders"]:
            known.append((bytes.fromhex(record["key"]), record["size"]))
    return offset + len(data[:end].encode())


def run(out_prefix, stop_file, socket_path, zookeeper, cluster, tag, peer_keys) -> dict:
    summary = dict(rounds=0, offered=0, stored=0, located=0, reads=0, hits=0, misses=0,
                   wrong=[], protocol=core.protocol_range()[1])
    secret = os.environ["EMS_SECRET"].encode()
    client = ems.connect("cluster", socket_path=socket_path, zookeeper=zookeeper,
                         cluster=cluster, secret=secret, tenant=TENANT, timeout_ms=1000)
    holders = Holders(secret)
    own, peers, peer_offset = [], [], 0
    started = time.monotonic()
    try:
        with open(out_prefix + ".keys", "w") as keys_file:
            while not os.path.exists(stop_file) and time.monotonic() - started < MAX_RUN_S:
                first = summary["rounds"] * BATCH
                keys = [make_key(first + i, tag) for i in range(BATCH)]
                sizes = [SIZES[(first + i) % len(SIZES)] for i in range(BATCH)]
                blocks = [make_block(k, 1, s) for k, s in zip(keys, sizes)]
                written_at = time.time()
                summary["stored"] += client.put_many(keys, blocks)
                summary["offered"] += BATCH
                found = holders.find(client.membership, keys)
                for key, size, holder_ids in zip(keys, sizes, found):
                    keys_file.write(json.dumps({"key": key.hex(), "size": size,
                                                "t": written_at, "holders": holder_ids}) + "\n")
                    if holder_ids:
                        own.append((key, size))
                        summary["located"] += 1
                keys_file.flush()

                peer_offset = read_peer_keys(peer_keys, peer_offset, peers)
                sample = random.sample(own, min(READ_SAMPLE, len(own)))
                sample += random.sample(peers, min(READ_SAMPLE, len(peers)))
                if sample:
                    buffers = [bytearray(size) for _, size in sample]
                    hits = client.get_many_into([key for key, _ in sample], buffers)
                    for (key, size), hit, buffer in zip(sample, hits, buffers):
                        summary["reads"] += 1
                        summary["hits" if hit else "misses"] += 1
                        if hit and bytes(buffer) != make_block(key, 1, size):
                            summary["wrong"].append(key.hex())
                summary["rounds"] += 1
                time.sleep(ROUND_SLEEP_S)
        summary["client"] = client.stats()
    finally:
        client.close()
    return summary


def main(argv) -> int:
    out_prefix = argv[0]
    try:
        summary = run(*argv, *([None] * (7 - len(argv))))
        summary["error"] = None
    except BaseException:
        summary = {"error": traceback.format_exc()}
    with open(out_prefix + ".json", "w") as f:
        json.dump(summary, f)
    return 0 if summary["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
