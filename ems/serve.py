"""`ems serve`: run a node daemon until SIGTERM (see ems.daemon)."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from ems import logs
from ems.client import load_secret
from ems.daemon import Daemon, DaemonConfig
from ems.manage.tokens import load_public_key
from ems.pool import physical_memory_bytes

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from "4096", "512M", "8G" (powers of 1024); raises ValueError naming the text."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1] if value and value[-1] in _UNITS else ""
    number = value[:-1] if unit else value
    try:
        size = int(float(number) * _UNITS[unit])
    except (ValueError, OverflowError):
        raise ValueError(f"size {text!r} is not a number of bytes such as 4096, 512M or 8G") from None
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def load_activation(key_path: str | None, credential_path: str | None):
    """Return (public key or None, credential token or None) for the activation gate.
    Raises ValueError or OSError naming the file. A credential that does not verify is no
    error here: the daemon starts, does not serve, and logs why."""
    if credential_path and not key_path:
        raise ValueError("--credential needs --manage-public-key (or EMS_MANAGE_PUBLIC_KEY) "
                         "to verify it")
    if not key_path:
        return None, None
    public_key = load_public_key(key_path)
    if not credential_path:
        return public_key, None
    with open(credential_path, encoding="ascii", errors="replace") as f:
        credential = f.read().strip()
    if not credential:
        raise ValueError(f"credential file {credential_path} is empty")
    return public_key, credential


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ems serve", description="Run an EMS node daemon: a "
                                "DRAM pool served over TCP and a local socket, one directory "
                                "shard, cluster membership and Prometheus metrics.")
    p.add_argument("--node-id", default=os.environ.get("EMS_NODE_ID") or socket.gethostname(),
                   help="stable id of this node in the cluster (default: EMS_NODE_ID or the "
                        "host name)")
    p.add_argument("--capacity", default=os.environ.get("EMS_CAPACITY", "1G"),
                   help="DRAM pool size, e.g. 512M or 16G; K, M, G, T are powers of 1024 "
                        "(default: EMS_CAPACITY or 1G)")
    p.add_argument("--pages", default="auto", choices=["auto", "hugetlb", "thp", "small"],
                   help="page kind of the pool (default: auto, hugetlb then THP then 4 KiB)")
    p.add_argument("--slab-size", default=None,
                   help="slab size, the largest block (default: from the capacity)")

    p.add_argument("--host", default="127.0.0.1", help="TCP listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7700, help="TCP port (default 7700; 0: any)")
    p.add_argument("--advertise", default=None,
                   help="address other nodes use to reach this one (default: --host)")
    p.add_argument("--socket", default=None,
                   help="Unix socket for clients on this host (default: "
                        "$EMS_RUN_DIR/ems-NODE.sock)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="metrics HTTP listen address (default 127.0.0.1)")
    p.add_argument("--metrics-port", type=int, default=7701,
                   help="metrics HTTP port (default 7701; 0: any; -1: no metrics)")

    p.add_argument("--zookeeper", default=os.environ.get("EMS_ZOOKEEPER"),
                   help="ZooKeeper hosts, e.g. 127.0.0.1:2181 (default: EMS_ZOOKEEPER)")
    p.add_argument("--peers", default=os.environ.get("EMS_PEERS"),
                   help="static peers without ZooKeeper: id=host:port,... (default: EMS_PEERS)")
    p.add_argument("--cluster", default=os.environ.get("EMS_CLUSTER", "default"),
                   help="cluster name in ZooKeeper (default: EMS_CLUSTER or 'default')")

    p.add_argument("--spill-dir", default=os.environ.get("EMS_SPILL_DIR"),
                   help="directory for the spill tier: blocks evicted from DRAM are written "
                        "there and read back on a miss; survives restarts (default: "
                        "EMS_SPILL_DIR; none: DRAM only)")
    p.add_argument("--spill-size", default=os.environ.get("EMS_SPILL_SIZE"),
                   help="quota of the spill directory, e.g. 100G (required with --spill-dir; "
                        "default: EMS_SPILL_SIZE)")
    p.add_argument("--spill-io", default="auto", choices=["auto", "uring", "posix"],
                   help="spill I/O: io_uring, else preadv/pwritev (auto, the default)")
    p.add_argument("--spill-shared", action="store_true",
                   help="the spill directory is shared with other nodes (an NFS-like mount): "
                        "misses rescan it for their segments")

    p.add_argument("--manage-public-key", default=os.environ.get("EMS_MANAGE_PUBLIC_KEY"),
                   help="PEM file of the management service's public key: the daemon then "
                        "serves only while a credential signed with it activates the cluster "
                        "(default: EMS_MANAGE_PUBLIC_KEY; none: activation is not enforced)")
    p.add_argument("--credential", default=os.environ.get("EMS_CREDENTIAL"),
                   help="file holding an activation credential token; the daemon verifies it "
                        "and, with --zookeeper, writes it to the cluster's activation znode "
                        "(default: EMS_CREDENTIAL; needs --manage-public-key)")
    p.add_argument("--secret-file", default=None,
                   help="file holding the cluster secret (default: EMS_SECRET or "
                        "EMS_SECRET_FILE; none means no authentication)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections served at once; more are refused as busy "
                        "(default 256)")
    logs.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logs.configure(args.log_format, args.log_level, node_id=args.node_id)
        capacity = parse_size(args.capacity)
        slab = parse_size(args.slab_size) if args.slab_size else None
        memory = physical_memory_bytes()
        if capacity > memory:
            raise ValueError(f"--capacity {args.capacity} ({capacity} bytes) exceeds this "
                             f"machine's memory ({memory >> 20} MiB)")
        if slab and capacity < slab:
            raise ValueError(f"--capacity {args.capacity} is smaller than one slab "
                             f"(--slab-size {args.slab_size})")
        spill_bytes = None
        if args.spill_dir:
            if not args.spill_size:
                raise ValueError("--spill-dir needs --spill-size, the directory's quota")
            spill_bytes = parse_size(args.spill_size)
        elif args.spill_size or args.spill_shared:
            raise ValueError("--spill-size and --spill-shared need --spill-dir")
        if args.secret_file:
            with open(args.secret_file, "rb") as f:
                secret = f.read().strip()
            if not secret:
                raise ValueError(f"secret file {args.secret_file} is empty")
        else:
            secret = load_secret()
        public_key, credential = load_activation(args.manage_public_key, args.credential)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    config = DaemonConfig(
        node_id=args.node_id, capacity_bytes=capacity, host=args.host, port=args.port,
        advertise_host=args.advertise, socket_path=args.socket,
        metrics_host=args.metrics_host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        pages=args.pages, slab_size=slab, zookeeper=args.zookeeper, peers=args.peers,
        cluster=args.cluster, secret=secret, max_connections=args.max_connections,
        spill_dir=args.spill_dir, spill_bytes=spill_bytes, spill_io=args.spill_io,
        spill_shared=args.spill_shared, manage_public_key=public_key, credential=credential,
        credential_source=f"--credential {args.credential}")
    try:
        Daemon(config).run()
    except Exception as exc:   # a clear last line for the operator, then a failing exit
        # The traceback goes into the JSON line's exception field; text keeps one line.
        logging.getLogger("ems.daemon").error(
            "node %s failed: %s", args.node_id, exc, extra={"cluster": args.cluster},
            exc_info=exc if args.log_format == "json" else None)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
