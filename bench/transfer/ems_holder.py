"""Serve one EMS pool over TCP on 127.0.0.1 and a Unix socket, for the transfer benchmark.

ems_side.py starts this script as a separate process so that every byte it measures
crosses a socket between two processes. The parent writes the shared secret as one hex
line to standard input. The holder prints `port <N>` once its server listens, then serves
until standard input closes or it receives SIGTERM. It binds 127.0.0.1 and no other
address.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

import ems
import ems._core as core

log = logging.getLogger("ems_holder")

LOOPBACK = "127.0.0.1"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, required=True,
                        help="data bytes of the pool (rounded down to whole slabs)")
    parser.add_argument("--slab-size", type=int, required=True,
                        help="slab size in bytes: a power of two at least the largest block")
    parser.add_argument("--max-blocks", type=int, default=None,
                        help="index entries, the maximum number of blocks stored (default: one "
                             "per 16 KiB of capacity)")
    parser.add_argument("--unix-path", required=True,
                        help="path of the Unix socket that same-host clients attach through")
    parser.add_argument("--node-id", type=int, default=1, help="node id of the server")
    return parser.parse_args()


def stop_on_sigterm(signum, frame) -> None:
    # Raising here ends the blocking read of standard input, so the finally blocks in
    # main() stop the server and close the pool, which also withdraws the pool's name.
    raise SystemExit(0)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="ems_holder %(levelname)s %(message)s")
    args = parse_args()
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    secret = bytes.fromhex(sys.stdin.readline().strip())
    if not secret:
        raise SystemExit("ems_holder: expected the secret as a hex line on standard input")

    pool = ems.Pool(args.capacity, slab_size=args.slab_size, max_blocks=args.max_blocks)
    try:
        server = core.Server(pool, host=LOOPBACK, port=0, unix_path=args.unix_path,
                             secret=secret, node_id=args.node_id)
        try:
            log.info("serving pool %s (%d bytes, slab %d, %s pages) on %s:%d and %s",
                     pool.name, pool.capacity, pool.slab_size, pool.page_kind, LOOPBACK,
                     server.port, args.unix_path)
            print(f"port {server.port}", flush=True)
            sys.stdin.read()
        finally:
            for line in server.take_log():
                log.warning("server: %s", line)
            server.stop()
            log.info("stopped")
    finally:
        pool.close()


if __name__ == "__main__":
    main()
