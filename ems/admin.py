"""`ems stats`, `ems nodes` and `ems route`: inspect the daemons of a running cluster.

Each command reads the member list (ZooKeeper or static peers, or else one local daemon
through its Unix socket), opens one connection per daemon and queries the daemons in
parallel. The commands only read, so nothing here writes to a pool or to the key
directory. A daemon that does not respond within --timeout-ms is shown as down and named
on stderr, and the exit status is then 1.

    python -m ems.admin stats|nodes|route [OPTIONS]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from ems import _core
from ems.client import BATCH_BYTES, directory_shards, load_secret
from ems.cluster.membership import HOLDER_NONE, NodeRecord, open_membership
from ems.errors import AuthenticationError, MembershipError, TransferError
from ems.keys import KEY_BYTES, chain_keys, layer_keys

# A daemon has one tier, its DRAM pool. The stats table has a tier column so that more
# tiers can be added as rows.
TIER = "dram"
LOCAL_NODE = "local"          # name of the daemon reached through --socket alone
MAX_PARALLEL = 32             # daemons queried at the same time
KEYS_PER_CALL = BATCH_BYTES // KEY_BYTES
TOKEN_ID_LIMIT = 1 << 32      # block keys hash token ids as uint32
SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")

EXIT_STATUS = ("exit status: 0 when every daemon responded, 1 when a daemon did not respond "
               "or the membership could not be read, 2 on invalid options")


# ---- options and connections -------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Return a parser with the options every command shares (defaults as in `ems serve`)."""
    env = os.environ
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=EXIT_STATUS)
    p.add_argument("--zookeeper", default=env.get("EMS_ZOOKEEPER"),
                   help="ZooKeeper hosts, e.g. 127.0.0.1:2181 (default: EMS_ZOOKEEPER)")
    p.add_argument("--peers", default=env.get("EMS_PEERS"),
                   help="static peers without ZooKeeper: id=host:port,... (default: EMS_PEERS)")
    p.add_argument("--cluster", default=env.get("EMS_CLUSTER", "default"),
                   help="cluster name in ZooKeeper (default: EMS_CLUSTER or 'default')")
    p.add_argument("--socket", default=env.get("EMS_SOCKET"),
                   help="Unix socket of one local daemon, used when neither --zookeeper nor "
                        "--peers is given (default: EMS_SOCKET)")
    p.add_argument("--secret-file", default=None,
                   help="file holding the cluster secret (default: EMS_SECRET or "
                        "EMS_SECRET_FILE; none means no authentication)")
    p.add_argument("--timeout-ms", type=_positive_int, default=1000,
                   help="deadline of each connection and call in milliseconds (default 1000)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


@dataclass(frozen=True)
class Target:
    """One daemon to query: a member record, or only a Unix socket (local mode)."""

    node_id: str
    record: NodeRecord | None = None
    socket_path: str | None = None

    @property
    def address(self) -> str:
        if self.record is None:
            return self.socket_path
        host = f"[{self.record.host}]" if ":" in self.record.host else self.record.host
        return f"{host}:{self.record.port}"


@dataclass
class Reply:
    """The result of one call to one daemon, or the error that replaced it."""

    target: Target
    value: object = None
    error: str | None = None
    refused: bool = False   # the daemon responded but rejected the secret

    @property
    def up(self) -> bool:
        return self.error is None

    @property
    def state(self) -> str:
        """State of the daemon: "up", "refused" (it rejected our secret) or "down"."""
        if self.up:
            return "up"
        if self.refused:
            return "refused"
        return "down"


@dataclass
class Session:
    """The daemons one command queries, and how to connect to them."""

    targets: list[Target]
    secret: bytes | None
    tenant: str
    timeout_ms: int

    @property
    def local(self) -> bool:
        return self.targets[0].record is None

    def connect(self, target: Target) -> _core.Connection:
        if target.record is None:
            return _core.Connection(unix_path=target.socket_path, secret=self.secret,
                                    tenant=self.tenant, timeout_ms=self.timeout_ms)
        return _core.Connection(target.record.host, target.record.port, secret=self.secret,
                                tenant=self.tenant, timeout_ms=self.timeout_ms)

    def ask(self, call, targets: list[Target] | None = None) -> list[Reply]:
        """Run call(connection, target) on each target in parallel, one connection each.
        Returns the replies in target order, where a failed connection or call becomes an
        error."""
        targets = self.targets if targets is None else targets
        if not targets:
            return []

        def ask_one(target: Target) -> Reply:
            try:
                conn = self.connect(target)
            except AuthenticationError as exc:
                return Reply(target, error=str(exc), refused=True)
            except TransferError as exc:
                return Reply(target, error=str(exc))
            try:
                return Reply(target, value=call(conn, target))
            except TransferError as exc:
                return Reply(target, error=str(exc))
            finally:
                conn.close()

        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(targets)),
                                thread_name_prefix="ems-admin") as executor:
            return list(executor.map(ask_one, targets))


def _read_secret(parser: argparse.ArgumentParser, args) -> bytes | None:
    try:
        if not args.secret_file:
            return load_secret()
        with open(args.secret_file, "rb") as f:
            secret = f.read().strip()
    except OSError as exc:
        parser.error(f"cannot read the cluster secret: {exc}")
    if not secret:
        parser.error(f"secret file {args.secret_file} is empty")
    return secret


def _open_session(parser: argparse.ArgumentParser, args, tenant: str) -> Session:
    """Build the session from the options. Exits with status 2 on invalid options and
    raises MembershipError when ZooKeeper cannot be read or lists no daemon."""
    secret = _read_secret(parser, args)
    try:
        _core.tenant_keys(tenant, [])   # raises ValueError naming an invalid tenant
    except ValueError as exc:
        parser.error(str(exc))
    if args.zookeeper or args.peers:
        try:
            membership = open_membership(args.zookeeper, args.peers, args.cluster)
        except ValueError as exc:
            parser.error(str(exc))
        try:
            records = membership.nodes()
        finally:
            membership.close()
        if not records:
            where = f"ZooKeeper {args.zookeeper}" if args.zookeeper else "--peers"
            raise MembershipError(f"cluster {args.cluster!r} has no members in {where}")
        targets = [Target(node_id, record) for node_id, record in sorted(records.items())]
    elif args.socket:
        targets = [Target(LOCAL_NODE, socket_path=args.socket)]
    else:
        parser.error("no daemon to query: pass --zookeeper, --peers or --socket (or set "
                     "EMS_ZOOKEEPER, EMS_PEERS or EMS_SOCKET)")
    return Session(targets, secret, tenant, args.timeout_ms)


def _report_down(prog: str, replies: list[Reply], detail: str = "") -> int:
    """Name each daemon that did not respond on stderr, and return the exit status."""
    for reply in replies:
        if not reply.up:
            what = "refused our credentials" if reply.refused else "did not respond"
            print(f"{prog}: node {reply.target.node_id} ({reply.target.address}) {what}"
                  f"{detail}: {reply.error}", file=sys.stderr)
    return 0 if all(reply.up for reply in replies) else 1


# ---- formatting --------------------------------------------------------------------

def format_size(nbytes: float) -> str:
    """Format a byte count with binary units: "512 B", "1.5 KiB", "128.0 MiB"."""
    if nbytes < 1024:
        return f"{nbytes:.0f} B"
    for unit in SIZE_UNITS:
        nbytes /= 1024
        if nbytes < 1024 or unit == SIZE_UNITS[-1]:
            return f"{nbytes:.1f} {unit}"


def format_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Align columns: the first `left` columns to the left, the others to the right."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) if i < left else cell.rjust(width)
                 for i, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# ---- ems stats ---------------------------------------------------------------------

STATS_HEADER = ["node", "tier", "capacity", "used", "blocks", "hits", "misses", "hit ratio",
                "evictions", "bytes in", "bytes out"]
RATE_HEADER = ["hits/s", "misses/s", "in/s", "out/s"]
TOTAL_FIELDS = ("capacity_bytes", "used_bytes", "free_bytes", "blocks", "hits", "misses",
                "evictions", "bytes_in", "bytes_out")
RATE_FIELDS = {"hits_per_s": "hits", "misses_per_s": "misses", "bytes_in_per_s": "bytes_in",
               "bytes_out_per_s": "bytes_out"}


def _total(replies: list[Reply]) -> dict:
    up = [reply.value for reply in replies if reply.up]
    return {field: sum(figures[field] for figures in up) for field in TOTAL_FIELDS}


def _rates(before: dict | None, after: dict | None, seconds: float) -> dict | None:
    """Compute per-second rates between two STATS samples of one daemon. Returns None
    when a sample is missing or a counter went down (the daemon restarted in between)."""
    if before is None or after is None or seconds <= 0:
        return None
    if any(after[field] < before[field] for field in RATE_FIELDS.values()):
        return None
    return {name: (after[field] - before[field]) / seconds
            for name, field in RATE_FIELDS.items()}


def _stats_cells(figures: dict) -> list[str]:
    lookups = figures["hits"] + figures["misses"]
    ratio = f"{100 * figures['hits'] / lookups:.1f}%" if lookups else "-"
    return [format_size(figures["capacity_bytes"]), format_size(figures["used_bytes"]),
            str(figures["blocks"]), str(figures["hits"]), str(figures["misses"]), ratio,
            str(figures["evictions"]), format_size(figures["bytes_in"]),
            format_size(figures["bytes_out"])]


def _rate_cells(rates: dict | None) -> list[str]:
    if rates is None:
        return ["-"] * len(RATE_HEADER)
    return [f"{rates['hits_per_s']:.1f}", f"{rates['misses_per_s']:.1f}",
            format_size(rates["bytes_in_per_s"]) + "/s",
            format_size(rates["bytes_out_per_s"]) + "/s"]


def render_stats(replies: list[Reply], rates: dict[str, dict | None] | None = None) -> str:
    """Format the stats table: one row per node and tier, then a TOTAL row. With `rates`
    (by node id), the rate columns are added."""
    header = STATS_HEADER + (RATE_HEADER if rates is not None else [])
    rows = []
    for reply in replies:
        node = reply.target.node_id
        if reply.up:
            row = [node, TIER, *_stats_cells(reply.value)]
        else:
            row = [node, TIER, reply.state, *["-"] * (len(STATS_HEADER) - 3)]
        if rates is not None:
            row += _rate_cells(rates.get(node))
        rows.append(row)

    total = ["TOTAL", "all", *_stats_cells(_total(replies))]
    if rates is not None:
        known = [r for r in rates.values() if r is not None]
        total += _rate_cells({name: sum(r[name] for r in known) for name in RATE_FIELDS}
                             if known else None)
    rows.append(total)
    return format_table(header, rows, left=2)


def stats_json(replies: list[Reply], rates: dict[str, dict | None] | None = None) -> dict:
    """Collect the raw STATS figures of each daemon, by node id, and their sums."""
    nodes = {}
    for reply in replies:
        entry = {"address": reply.target.address, "tier": TIER, "up": reply.up,
                 "state": reply.state}
        if reply.up:
            entry["stats"] = reply.value
        else:
            entry["error"] = reply.error
        if rates is not None:
            entry["rates"] = rates.get(reply.target.node_id)
        nodes[reply.target.node_id] = entry
    return {"nodes": nodes, "total": _total(replies)}


def stats_main(argv: list[str] | None = None) -> int:
    parser = _parser("ems stats", "Print the pool statistics of every daemon: capacity, "
                     "use, hits, evictions and traffic, one row per node and tier.")
    parser.add_argument("--watch", type=_positive_float, metavar="SECONDS",
                        help="refresh every SECONDS until Ctrl-C, adding per-second rates "
                             "computed from the difference between two samples")
    parser.add_argument("--count", type=_positive_int, metavar="N",
                        help="with --watch: stop after N refreshes (default: until Ctrl-C)")
    args = parser.parse_args(argv)
    if args.count is not None and args.watch is None:
        parser.error("--count needs --watch")
    try:
        session = _open_session(parser, args, os.environ.get("EMS_TENANT") or "default")
    except MembershipError as exc:
        print(f"ems stats: {exc}", file=sys.stderr)
        return 1

    def sample() -> list[Reply]:
        return session.ask(lambda conn, target: conn.stats(timeout_ms=session.timeout_ms))

    if args.watch is None:
        replies = sample()
        print(json.dumps(stats_json(replies), indent=2) if args.json else render_stats(replies))
        return _report_down("ems stats", replies)

    try:
        return _watch(args, sample)
    except KeyboardInterrupt:
        return 0


def _watch(args, sample) -> int:
    """Print a table (or a JSON line) every args.watch seconds. The first has no rates."""
    status = 0
    previous, previous_time = None, 0.0
    refreshes = 0
    while args.count is None or refreshes < args.count:
        if previous is not None:
            time.sleep(max(0.0, previous_time + args.watch - time.monotonic()))
        now = time.monotonic()
        replies = sample()
        rates = {}
        for reply in replies:
            before = previous.get(reply.target.node_id) if previous is not None else None
            rates[reply.target.node_id] = _rates(before, reply.value, now - previous_time)

        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if args.json:
            print(json.dumps({"time": stamp, "interval_s": args.watch,
                              **stats_json(replies, rates)}), flush=True)
        else:
            if sys.stdout.isatty():
                print("\033[H\033[2J", end="")     # clear the terminal, cursor home
            print(f"{stamp}, every {args.watch:g} s (Ctrl-C to stop)")
            print(render_stats(replies, rates), flush=True)
            print()
        status = _report_down("ems stats", replies)
        previous = {reply.target.node_id: reply.value for reply in replies if reply.up}
        previous_time = now
        refreshes += 1
    return status


# ---- ems nodes ---------------------------------------------------------------------

NODES_HEADER = ["node", "address", "metrics", "socket", "capacity", "free", "protocol",
                "version", "ping"]


def _ping(conn: _core.Connection, target: Target, timeout_ms: int) -> dict:
    """Time one PING (the round trip only, not the connection set-up) and read STATS for
    the live capacity and free bytes."""
    start = time.perf_counter()
    conn.ping(timeout_ms=timeout_ms)
    ping_ms = (time.perf_counter() - start) * 1000
    stats = conn.stats(timeout_ms=timeout_ms)
    entry = {"ping_ms": ping_ms, "capacity_bytes": stats["capacity_bytes"],
             "free_bytes": stats["free_bytes"], "protocol": conn.version}
    if "proto_min" in stats:   # the range the daemon speaks, which static peers do not list
        entry.update(proto_min=stats["proto_min"], proto_max=stats["proto_max"])
    return entry


def _node_entry(reply: Reply) -> dict:
    """Merge a member's record with what its daemon reported, which wins where both
    have a field."""
    target = reply.target
    entry = asdict(target.record) if target.record is not None else {
        "node_id": target.node_id, "local_socket": target.socket_path}
    entry.update(address=target.address, up=reply.up, state=reply.state)
    if reply.up:
        entry.update(reply.value)
    else:
        entry["error"] = reply.error
    return entry


def _node_row(entry: dict) -> list[str]:
    def text(value) -> str:
        return str(value) if value else "-"

    if "proto_min" in entry:
        low, high = entry["proto_min"], entry["proto_max"]
        protocol = str(low) if low == high else f"{low}-{high}"
    else:
        protocol = text(entry.get("protocol"))
    capacity = entry.get("capacity_bytes")
    free = entry.get("free_bytes")
    ping = f"ok {entry['ping_ms']:.3f} ms" if entry["up"] else entry.get("state", "down")
    return [entry["node_id"], entry["address"], text(entry.get("metrics_port")),
            text(entry.get("local_socket")), format_size(capacity) if capacity else "-",
            format_size(free) if capacity else "-", protocol, text(entry.get("version")),
            ping]


def nodes_main(argv: list[str] | None = None) -> int:
    parser = _parser("ems nodes", "List the members of the cluster: address, metrics port, "
                     "local socket, capacity, free bytes, protocol range, version, and "
                     "whether each responds to PING. Static peers carry only id=host:port, so "
                     "their metrics port, socket and version show as '-'.")
    args = parser.parse_args(argv)
    try:
        session = _open_session(parser, args, os.environ.get("EMS_TENANT") or "default")
    except MembershipError as exc:
        print(f"ems nodes: {exc}", file=sys.stderr)
        return 1

    replies = session.ask(lambda conn, target: _ping(conn, target, session.timeout_ms))
    entries = [_node_entry(reply) for reply in replies]
    if args.json:
        print(json.dumps({"nodes": entries}, indent=2))
    else:
        print(format_table(NODES_HEADER, [_node_row(entry) for entry in entries], left=4))
    return _report_down("ems nodes", replies)


# ---- ems route ---------------------------------------------------------------------

def parse_tokens(text: str, source: str) -> list[int]:
    """Parse token ids separated by whitespace or commas. Raises ValueError naming the
    first invalid item and its source."""
    tokens = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        if not re.fullmatch(r"[0-9]+", item) or int(item) >= TOKEN_ID_LIMIT:
            raise ValueError(f"invalid token id {item!r} in {source}: expected an integer "
                             f"from 0 to {TOKEN_ID_LIMIT - 1}")
        tokens.append(int(item))
    if not tokens:
        raise ValueError(f"no token ids in {source}")
    return tokens


def parse_namespace(text: str) -> bytes:
    """Parse the 32-byte key namespace from 64 hex digits. Raises ValueError naming the
    text."""
    try:
        namespace = bytes.fromhex(text)
    except ValueError:
        namespace = b""
    if len(namespace) != KEY_BYTES:
        raise ValueError(f"invalid --namespace {text!r}: expected {2 * KEY_BYTES} hex digits, "
                         f"as the vLLM connector logs them at start ('namespace <hex>')")
    return namespace


def _prompt_tokens(parser: argparse.ArgumentParser, args) -> list[int]:
    try:
        if args.tokens is not None:
            return parse_tokens(args.tokens, "--tokens")
        if args.tokens_file is not None:
            with open(args.tokens_file) as f:
                return parse_tokens(f.read(), args.tokens_file)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if not args.tokenizer:
        parser.error("--text needs --tokenizer DIR (a local Hugging Face tokenizer)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        parser.error("--text needs the transformers package; pass --tokens instead")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    except (OSError, ValueError) as exc:
        parser.error(f"cannot load a tokenizer from {args.tokenizer}: {exc}")
    # encode() adds the special tokens (BOS), as vLLM does for a plain completion prompt.
    tokens = tokenizer.encode(args.text)
    if not tokens:
        parser.error(f"the tokenizer in {args.tokenizer} produced no tokens for --text")
    return tokens


def _directory_holders(session: Session, keys: list[bytes]) -> tuple[np.ndarray, list[Reply]]:
    """Look up the holder id of each key (HOLDER_NONE where unknown), with one request
    per directory shard for all of its keys. Returns the holders and the shards' replies."""
    holders = np.full(len(keys), HOLDER_NONE, dtype=np.uint32)
    records = [target.record for target in session.targets]   # sorted by node id
    shard = directory_shards(_core.tenant_keys(session.tenant, keys), records)
    indices = {session.targets[int(s)].node_id: np.flatnonzero(shard == s)
               for s in np.unique(shard)}

    def lookup(conn: _core.Connection, target: Target) -> np.ndarray:
        idx = indices[target.node_id]
        found = []
        for start in range(0, len(idx), KEYS_PER_CALL):
            batch = [keys[i] for i in idx[start:start + KEYS_PER_CALL]]
            found += conn.dir_lookup(batch, timeout_ms=session.timeout_ms)
        return np.asarray(found, dtype=np.uint32)

    shards = [target for target in session.targets if target.node_id in indices]
    replies = session.ask(lookup, shards)
    for reply in replies:
        if reply.up:
            holders[indices[reply.target.node_id]] = reply.value
    return holders, replies


def _local_presence(session: Session, keys: list[bytes]) -> tuple[np.ndarray, list[Reply]]:
    """Check whether the local daemon's pool stores each key. Without a member list there
    is no directory to ask."""
    def exists(conn: _core.Connection, target: Target) -> list[bool]:
        present = []
        for start in range(0, len(keys), KEYS_PER_CALL):
            present += conn.exists_many(keys[start:start + KEYS_PER_CALL],
                                        timeout_ms=session.timeout_ms)
        return present

    replies = session.ask(exists)
    present = np.asarray(replies[0].value if replies[0].up else [False] * len(keys), dtype=bool)
    return present, replies


def _leading_blocks(stored: np.ndarray) -> int:
    """Count the leading rows (blocks) whose every column (layer key) is True."""
    full = stored.all(axis=1)
    return len(full) if full.all() else int(full.argmin())


def compute_route(session: Session, block_keys: list[bytes],
                  num_layers: int) -> tuple[dict, list[Reply]]:
    """Count the leading cached blocks per node. Returns the result and the daemons'
    replies.

    A block counts for a node when the directory names that node as the holder of every
    layer key of the block. NOTE: the directory is a hint. It keeps one holder per key (the
    last to register it), and daemons do not withdraw evicted keys, so a block evicted
    since it was announced still counts and a second copy on another node does not.
    """
    keys = [key for block_key in block_keys for key in layer_keys(block_key, num_layers)]
    shape = (len(block_keys), num_layers)
    if session.local:
        present, replies = _local_presence(session, keys)
        stored = {LOCAL_NODE: present.reshape(shape)}
        anywhere = stored[LOCAL_NODE]
    else:
        holders, replies = _directory_holders(session, keys)
        holders = holders.reshape(shape)
        stored = {t.node_id: holders == t.record.holder_id() for t in session.targets}
        anywhere = holders != HOLDER_NONE

    down = {reply.target.node_id for reply in replies if not reply.up}
    nodes = [{"node": target.node_id, "address": target.address,
              "blocks": _leading_blocks(stored[target.node_id]),
              "down": target.node_id in down} for target in session.targets]
    # Best first: more cached blocks, then a node that responded, then by node id.
    nodes.sort(key=lambda n: (-n["blocks"], n["down"], n["node"]))
    return {"nodes": nodes, "any_node_blocks": _leading_blocks(anywhere)}, replies


def route_main(argv: list[str] | None = None) -> int:
    parser = _parser("ems route", "Find the node that holds the longest cached prefix of a "
                     "prompt: compute the prompt's block keys as the vLLM connector does, "
                     "look them up in the key directory (one call per shard), and print "
                     "the leading cached blocks per node, best first.")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--tokens", help="token ids separated by commas or whitespace")
    prompt.add_argument("--tokens-file", metavar="FILE",
                        help="file of token ids separated by commas or whitespace")
    prompt.add_argument("--text", help="prompt text, tokenized with --tokenizer (special "
                                       "tokens added; a chat request's ids come from its chat "
                                       "template, so pass those with --tokens)")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="local Hugging Face tokenizer directory for --text")
    parser.add_argument("--namespace", required=True, metavar="HEX",
                        help="key namespace, 64 hex digits; the vLLM connector logs it at "
                             "start as 'namespace <hex>, block size N, L layers'")
    parser.add_argument("--block-size", type=_positive_int, required=True, metavar="N",
                        help="tokens per block (the connector's 'block size N')")
    parser.add_argument("--layers", type=_positive_int, required=True, metavar="L",
                        help="layers per block, one key each (the connector's 'L layers')")
    parser.add_argument("--tenant", default=os.environ.get("EMS_TENANT") or "default",
                        help="tenant the blocks were written under (default: EMS_TENANT or "
                             "'default')")
    args = parser.parse_args(argv)
    try:
        namespace = parse_namespace(args.namespace)
    except ValueError as exc:
        parser.error(str(exc))
    tokens = _prompt_tokens(parser, args)
    try:
        session = _open_session(parser, args, args.tenant)
    except MembershipError as exc:
        print(f"ems route: {exc}", file=sys.stderr)
        return 1

    block_keys = chain_keys(namespace, tokens, args.block_size)
    result, replies = compute_route(session, block_keys, args.layers)
    # Route to the best node that responded. A down node is listed but not chosen.
    best = next((n for n in result["nodes"] if not n["down"]), {"node": None, "blocks": 0})
    result = {"tenant": args.tenant, "tokens": len(tokens), "block_size": args.block_size,
              "layers": args.layers, "blocks": len(block_keys), **result,
              "route": {"node": best["node"] if best["blocks"] else None,
                        "blocks": best["blocks"], "tokens": best["blocks"] * args.block_size}}
    for node in result["nodes"]:
        node["tokens"] = node["blocks"] * args.block_size

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_render_route(result))
    return _report_down("ems route", replies, " to its directory lookup, so its keys count "
                        "as not cached")


def _render_route(result: dict) -> str:
    lines = [f"prompt: {result['tokens']} tokens, {result['blocks']} full blocks of "
             f"{result['block_size']} tokens, {result['layers']} layer keys per block, "
             f"tenant {result['tenant']}", ""]
    rows = [[n["node"], n["address"], str(n["blocks"]), str(n["tokens"]),
             "down" if n["down"] else ""] for n in result["nodes"]]
    lines += [format_table(["node", "address", "blocks", "tokens", ""], rows, left=2), ""]

    route = result["route"]
    target = route["node"] or "any node"
    lines.append(f"route to {target}: {route['blocks']} blocks ({route['tokens']} tokens) "
                 f"cached")
    spread = result["any_node_blocks"]
    if spread > route["blocks"]:
        lines.append(f"across nodes: the first {spread} blocks "
                     f"({spread * result['block_size']} tokens) have every layer key cached "
                     f"on some node")
    return "\n".join(lines)


# ---- entry point -------------------------------------------------------------------

COMMANDS = {"stats": stats_main, "nodes": nodes_main, "route": route_main}


def main(argv: list[str] | None = None) -> int:
    """Run `COMMAND [OPTIONS]`, COMMAND being stats, nodes or route."""
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: python -m ems.admin {{{','.join(COMMANDS)}}} [OPTIONS]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] not in COMMANDS:
        print(f"ems.admin: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
