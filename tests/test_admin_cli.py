"""`ems stats`, `ems nodes` and `ems route` (ems.admin) against real daemons.

Three `ems serve` processes with static peers and a cluster secret run on 127.0.0.1 for the
module. The blocks of one token sequence are written, layer by layer, through daemon a.
The commands then run in this process, and their output is checked against what was
written. The down-node tests start their own two daemons, so that stopping one leaves the
shared cluster whole.
"""
import json
import os
import re
import time

import pytest

import cluster_rig as rig

import ems
from ems import _core, admin
from ems.keys import chain_keys, layer_keys

NAMESPACE = bytes(range(32))
TENANT = "admin-test"
BLOCK_SIZE = 16
LAYERS = 4
TOKENS = list(range(100, 196))          # 96 tokens: 6 full blocks
BLOCKS = len(TOKENS) // BLOCK_SIZE
BLOCK_BYTES = 4096
ANNOUNCE_WAIT_S = 5.0                   # a daemon announces new keys every 50 ms


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Keep the caller's EMS_* settings out of the option defaults."""
    for name in ("EMS_ZOOKEEPER", "EMS_PEERS", "EMS_CLUSTER", "EMS_SOCKET", "EMS_SECRET",
                 "EMS_SECRET_FILE", "EMS_TENANT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Start daemons a, b and c, and write the blocks of TOKENS through a. Yields
    (daemons, common options)."""
    run_dir = str(tmp_path_factory.mktemp("admin-run"))
    secret_file = os.path.join(run_dir, "secret")
    with open(secret_file, "w") as f:
        f.write(rig.SECRET + "\n")
    daemons = rig.plan(run_dir, ["a", "b", "c"])
    peers = ",".join(d.peer for d in daemons)
    try:
        for daemon in daemons:
            rig.start(daemon, run_dir, peers=peers)
        keys = [key for block in chain_keys(NAMESPACE, TOKENS, BLOCK_SIZE)
                for key in layer_keys(block, LAYERS)]
        datas = [bytes([i % 251]) * BLOCK_BYTES for i in range(len(keys))]
        with ems.connect("cluster", peers=peers, socket_path=daemons[0].socket_path,
                         secret=rig.SECRET.encode(), tenant=TENANT) as client:
            assert client.put_many(keys, datas) == len(keys)
        yield daemons, ["--peers", peers, "--secret-file", secret_file]
    finally:
        for daemon in daemons:
            rig.stop(daemon)


def run(capsys, argv):
    """Run `ems.admin COMMAND ...` and return (exit status, stdout, stderr)."""
    status = admin.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def table_rows(text):
    """Parse a table printed by format_table into dicts keyed by the header (cells are
    separated by two or more spaces)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = re.split(r"\s{2,}", lines[0].strip())
    return {cells[0]: dict(zip(header, cells))
            for cells in (re.split(r"\s{2,}", line.strip()) for line in lines[1:])}


def route_argv(common, tokens, *extra):
    return ["route", *common, "--tokens", ",".join(map(str, tokens)), "--namespace",
            NAMESPACE.hex(), "--block-size", str(BLOCK_SIZE), "--layers", str(LAYERS),
            "--tenant", TENANT, *extra]


def route_until(capsys, argv, blocks):
    """Run route with --json until it reports `blocks`, because the holder announces its
    keys to the directory shortly after the write. Returns the last result."""
    deadline = time.monotonic() + ANNOUNCE_WAIT_S
    while True:
        status, out, err = run(capsys, argv + ["--json"])
        assert status == 0, err
        result = json.loads(out)
        if result["route"]["blocks"] == blocks or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


# ---- ems stats ---------------------------------------------------------------------

def test_stats_json_counts_written_blocks(cluster, capsys):
    _, common = cluster
    status, out, err = run(capsys, ["stats", *common, "--json"])
    assert status == 0, err
    result = json.loads(out)
    assert sorted(result["nodes"]) == ["a", "b", "c"]
    a = result["nodes"]["a"]
    assert a["up"]
    assert a["tier"] == "dram"
    assert a["stats"]["blocks"] == BLOCKS * LAYERS
    assert a["stats"]["used_bytes"] == BLOCKS * LAYERS * BLOCK_BYTES
    for name in ("b", "c"):
        assert result["nodes"][name]["stats"]["blocks"] == 0
    assert result["total"]["blocks"] == BLOCKS * LAYERS
    assert result["total"]["used_bytes"] == BLOCKS * LAYERS * BLOCK_BYTES
    assert result["total"]["capacity_bytes"] == 3 * (128 << 20)


def test_stats_table_agrees_with_json(cluster, capsys):
    _, common = cluster
    status, out, err = run(capsys, ["stats", *common])
    assert status == 0, err
    rows = table_rows(out)
    assert list(rows) == ["a", "b", "c", "TOTAL"]
    a = rows["a"]
    assert a["tier"] == "dram"
    assert a["capacity"] == "128.0 MiB"
    assert a["blocks"] == str(BLOCKS * LAYERS)
    assert a["used"] == admin.format_size(BLOCKS * LAYERS * BLOCK_BYTES)
    assert a["evictions"] == "0"
    assert rows["b"]["used"] == "0 B"
    assert rows["TOTAL"]["tier"] == "all"
    assert rows["TOTAL"]["capacity"] == "384.0 MiB"
    assert rows["TOTAL"]["blocks"] == str(BLOCKS * LAYERS)


def test_stats_watch_rates_from_two_samples(cluster, capsys, monkeypatch):
    daemons, common = cluster
    key = layer_keys(chain_keys(NAMESPACE, TOKENS, BLOCK_SIZE)[0], LAYERS)[0]
    conn = ems._core.Connection("127.0.0.1", daemons[0].port, secret=rig.SECRET.encode(),
                                tenant=TENANT)
    real_sleep = time.sleep

    def sleep_after_reads(seconds):
        # Between the two samples: 5 hits on daemon a over TCP.
        buffers = [bytearray(BLOCK_BYTES) for _ in range(5)]
        assert conn.get_many_into([key] * 5, buffers) == [BLOCK_BYTES] * 5
        real_sleep(seconds)

    monkeypatch.setattr(admin.time, "sleep", sleep_after_reads)
    try:
        status, out, err = run(capsys, ["stats", *common, "--json", "--watch", "0.2",
                                        "--count", "2"])
    finally:
        conn.close()
    assert status == 0, err
    first, second = [json.loads(line) for line in out.splitlines()]
    assert first["nodes"]["a"]["rates"] is None
    rates = second["nodes"]["a"]["rates"]
    hits = second["nodes"]["a"]["stats"]["hits"] - first["nodes"]["a"]["stats"]["hits"]
    assert hits == 5
    assert 0 < rates["hits_per_s"] <= 5 / 0.2
    assert rates["bytes_out_per_s"] > 0
    assert second["nodes"]["b"]["rates"]["hits_per_s"] == 0


def test_stats_watch_table_has_rate_columns(cluster, capsys):
    _, common = cluster
    status, out, err = run(capsys, ["stats", *common, "--watch", "0.1", "--count", "2"])
    assert status == 0, err
    frames = [frame for frame in out.split("\n\n") if frame.strip()]
    assert len(frames) == 2
    rows = table_rows(frames[1].split("\n", 1)[1])
    assert rows["a"]["hits/s"] == "0.0"
    assert rows["a"]["out/s"].endswith("B/s")
    assert table_rows(frames[0].split("\n", 1)[1])["a"]["hits/s"] == "-"


def test_stats_local_socket(cluster, capsys):
    daemons, common = cluster
    status, out, err = run(capsys, ["stats", "--socket", daemons[0].socket_path,
                                    "--secret-file", common[-1], "--json"])
    assert status == 0, err
    local = json.loads(out)["nodes"]["local"]
    assert local["address"] == daemons[0].socket_path
    assert local["stats"]["blocks"] == BLOCKS * LAYERS


def test_stats_without_secret_is_refused(cluster, capsys):
    _, common = cluster
    status, out, err = run(capsys, ["stats", *common[:2]])     # no secret
    assert status == 1
    rows = table_rows(out)
    assert rows["a"]["capacity"] == "refused"
    assert "node a (" in err
    assert "refused our credentials" in err


# ---- ems nodes ---------------------------------------------------------------------

def test_nodes_lists_members_and_pings(cluster, capsys):
    daemons, common = cluster
    status, out, err = run(capsys, ["nodes", *common])
    assert status == 0, err
    rows = table_rows(out)
    assert list(rows) == ["a", "b", "c"]
    for daemon in daemons:
        row = rows[daemon.node_id]
        assert row["address"] == f"127.0.0.1:{daemon.port}"
        assert row["capacity"] == "128.0 MiB"
        # The range the daemon reports in STATS, which static peers do not list.
        assert row["protocol"] == f"{_core.PROTO_VERSION_MIN}-{_core.PROTO_VERSION_MAX}"
        assert re.fullmatch(r"ok \d+\.\d{3} ms", row["ping"]), row["ping"]


def test_nodes_json(cluster, capsys):
    daemons, common = cluster
    status, out, err = run(capsys, ["nodes", *common, "--json"])
    assert status == 0, err
    entries = {entry["node_id"]: entry for entry in json.loads(out)["nodes"]}
    assert sorted(entries) == ["a", "b", "c"]
    for daemon in daemons:
        entry = entries[daemon.node_id]
        assert entry["up"]
        assert entry["port"] == daemon.port
        assert entry["ping_ms"] > 0
        assert entry["capacity_bytes"] == 128 << 20
    assert entries["a"]["free_bytes"] == (128 << 20) - BLOCKS * LAYERS * BLOCK_BYTES


# ---- ems route ---------------------------------------------------------------------

def test_route_finds_writer_node(cluster, capsys):
    _, common = cluster
    prompt = TOKENS + [7] * 40                  # extends the written sequence
    result = route_until(capsys, route_argv(common, prompt), BLOCKS)
    assert result["route"] == {"node": "a", "blocks": BLOCKS, "tokens": BLOCKS * BLOCK_SIZE}
    assert result["blocks"] == len(prompt) // BLOCK_SIZE
    assert [n["node"] for n in result["nodes"]][0] == "a"
    assert [n["blocks"] for n in result["nodes"]] == [BLOCKS, 0, 0]
    assert result["any_node_blocks"] == BLOCKS

    status, out, err = run(capsys, route_argv(common, prompt))
    assert status == 0, err
    assert f"route to a: {BLOCKS} blocks ({BLOCKS * BLOCK_SIZE} tokens) cached" in out


def test_route_partial_prefix(cluster, capsys):
    _, common = cluster
    prompt = TOKENS[:3 * BLOCK_SIZE] + [1] * BLOCK_SIZE + TOKENS[4 * BLOCK_SIZE:]
    result = route_until(capsys, route_argv(common, prompt), 3)
    assert result["route"]["node"] == "a"
    assert result["route"]["blocks"] == 3


def test_route_other_first_block_is_zero(cluster, capsys):
    _, common = cluster
    route_until(capsys, route_argv(common, TOKENS), BLOCKS)     # the keys are announced
    prompt = [99] + TOKENS[1:]
    status, out, err = run(capsys, route_argv(common, prompt, "--json"))
    assert status == 0, err
    result = json.loads(out)
    assert result["route"] == {"node": None, "blocks": 0, "tokens": 0}
    assert all(n["blocks"] == 0 for n in result["nodes"])

    status, out, err = run(capsys, route_argv(common, prompt))
    assert "route to any node: 0 blocks (0 tokens) cached" in out


def test_route_other_tenant_is_zero(cluster, capsys):
    _, common = cluster
    route_until(capsys, route_argv(common, TOKENS), BLOCKS)
    argv = route_argv(common, TOKENS, "--json")
    argv[argv.index(TENANT)] = "someone-else"
    status, out, err = run(capsys, argv)
    assert status == 0, err
    assert json.loads(out)["route"]["blocks"] == 0


def test_route_tokens_file(cluster, capsys, tmp_path):
    _, common = cluster
    path = tmp_path / "tokens.txt"
    path.write_text(" ".join(map(str, TOKENS[:48])) + "\n" + ",".join(map(str, TOKENS[48:])))
    argv = route_argv(common, [0])
    argv[argv.index("--tokens"):argv.index("--tokens") + 2] = ["--tokens-file", str(path)]
    result = route_until(capsys, argv, BLOCKS)
    assert result["tokens"] == len(TOKENS)
    assert result["route"]["blocks"] == BLOCKS


def test_route_text_with_tokenizer(cluster, capsys, tmp_path):
    """A word-level tokenizer that maps "t<i>" to id i, so the text gives TOKENS."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {f"t{i}": i for i in range(256)} | {"<unk>": 256}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>") \
        .save_pretrained(tmp_path)

    _, common = cluster
    argv = route_argv(common, [0])
    argv[argv.index("--tokens"):argv.index("--tokens") + 2] = [
        "--text", " ".join(f"t{t}" for t in TOKENS), "--tokenizer", str(tmp_path)]
    result = route_until(capsys, argv, BLOCKS)
    assert result["tokens"] == len(TOKENS)
    assert result["route"]["node"] == "a"


def test_route_local_socket(cluster, capsys):
    daemons, common = cluster
    argv = route_argv(["--socket", daemons[0].socket_path, "--secret-file", common[-1]],
                      TOKENS + [5] * 20, "--json")
    status, out, err = run(capsys, argv)
    assert status == 0, err
    result = json.loads(out)
    assert result["route"] == {"node": "local", "blocks": BLOCKS,
                               "tokens": BLOCKS * BLOCK_SIZE}


BAD_ROUTE_OPTIONS = [
    # (options replaced or removed, text the error must contain)
    ({"--namespace": "zz" * 32}, "'" + "zz" * 32 + "'"),
    ({"--namespace": "ab" * 31}, "64 hex digits"),
    ({"--tokens": "1,2,x,4"}, "'x'"),
    ({"--tokens": "1,-2"}, "'-2'"),
    ({"--tokens": str(1 << 32)}, f"'{1 << 32}'"),
    ({"--tokens": " , "}, "no token ids"),
    ({"--block-size": None}, "--block-size"),
    ({"--block-size": "0"}, "'0'"),
    ({"--layers": "many"}, "'many'"),
    ({"--tenant": "two words"}, "'two words'"),
]


@pytest.mark.parametrize("changes,expected", BAD_ROUTE_OPTIONS)
def test_route_bad_input_exits_2(capsys, changes, expected):
    argv = route_argv(["--peers", "a=127.0.0.1:1"], TOKENS)
    for option, value in changes.items():
        at = argv.index(option)
        if value is None:
            del argv[at:at + 2]
        else:
            argv[at + 1] = value
    with pytest.raises(SystemExit) as exit_info:
        admin.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err


def test_route_text_needs_tokenizer(capsys):
    with pytest.raises(SystemExit) as exit_info:
        admin.main(["route", "--peers", "a=127.0.0.1:1", "--text", "hello", "--namespace",
                    NAMESPACE.hex(), "--block-size", "16", "--layers", "2"])
    assert exit_info.value.code == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_no_daemon_given_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        admin.main(["stats"])
    assert exit_info.value.code == 2
    assert "--peers" in capsys.readouterr().err


def test_missing_secret_file_exits_2(capsys, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(SystemExit) as exit_info:
        admin.main(["nodes", "--peers", "a=127.0.0.1:1", "--secret-file", missing])
    assert exit_info.value.code == 2
    assert missing in capsys.readouterr().err


def test_unknown_command_exits_2(capsys):
    assert admin.main(["status"]) == 2
    assert "'status'" in capsys.readouterr().err


def test_format_size_units():
    assert admin.format_size(0) == "0 B"
    assert admin.format_size(1023) == "1023 B"
    assert admin.format_size(1536) == "1.5 KiB"
    assert admin.format_size(128 << 20) == "128.0 MiB"
    assert admin.format_size(3 << 30) == "3.0 GiB"


# ---- a node that stops -------------------------------------------------------------

@pytest.fixture
def stopped_node(tmp_path):
    """Start daemons x and y, stop y, and yield the common options."""
    run_dir = str(tmp_path)
    daemons = rig.plan(run_dir, ["x", "y"])
    peers = ",".join(d.peer for d in daemons)
    try:
        for daemon in daemons:
            rig.start(daemon, run_dir, peers=peers)
        assert rig.stop(daemons[1]) == 0
        yield ["--peers", peers, "--timeout-ms", "500"]
    finally:
        for daemon in daemons:
            rig.stop(daemon)


def test_stopped_node_shown_down(stopped_node, capsys, monkeypatch):
    monkeypatch.setenv("EMS_SECRET", rig.SECRET)
    status, out, err = run(capsys, ["stats", *stopped_node])
    assert status == 1
    rows = table_rows(out)
    assert rows["x"]["capacity"] == "128.0 MiB"
    assert rows["y"]["capacity"] == "down"
    assert rows["TOTAL"]["capacity"] == "128.0 MiB"
    assert "node y (" in err
    assert "node x" not in err

    status, out, err = run(capsys, ["stats", *stopped_node, "--json"])
    assert status == 1
    nodes = json.loads(out)["nodes"]
    assert nodes["x"]["up"]
    assert not nodes["y"]["up"]
    assert nodes["y"]["error"]

    status, out, err = run(capsys, ["nodes", *stopped_node])
    assert status == 1
    rows = table_rows(out)
    assert rows["x"]["ping"].startswith("ok ")
    assert rows["y"]["ping"] == "down"
    assert "node y (" in err


def test_stopped_node_route_reports_shard(stopped_node, capsys, monkeypatch):
    monkeypatch.setenv("EMS_SECRET", rig.SECRET)
    status, out, err = run(capsys, route_argv(stopped_node, TOKENS, "--json"))
    assert status == 1
    result = json.loads(out)
    assert result["route"]["blocks"] == 0
    assert {n["node"]: n["down"] for n in result["nodes"]} == {"x": False, "y": True}
    assert "node y (" in err
    assert "directory lookup" in err


# ---- ZooKeeper membership ----------------------------------------------------------

def test_nodes_zookeeper_record_fields(zookeeper, tmp_path, capsys, monkeypatch):
    """A ZooKeeper record carries the metrics port, socket and version that static peers
    lack."""
    run_dir = str(tmp_path)
    cluster_name = f"admin-{time.monotonic_ns()}"
    (daemon,) = rig.plan(run_dir, ["z"])
    argv = ["nodes", "--zookeeper", zookeeper.hosts, "--cluster", cluster_name, "--json"]
    monkeypatch.setenv("EMS_SECRET", rig.SECRET)
    try:
        rig.start(daemon, run_dir, zookeeper=zookeeper.hosts, extra=("--cluster", cluster_name))
        deadline = time.monotonic() + 10
        while True:     # the daemon registers after its socket opens
            status, out, err = run(capsys, argv)
            if "has no members" not in err or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 0, err
        (entry,) = json.loads(out)["nodes"]
        assert entry["node_id"] == "z"
        assert entry["up"]
        assert entry["port"] == daemon.port
        assert entry["metrics_port"] == daemon.metrics_port
        assert entry["local_socket"] == daemon.socket_path
        assert entry["version"] == ems.__version__
        assert entry["proto_min"] == _core.PROTO_VERSION_MIN
        assert entry["proto_max"] == _core.PROTO_VERSION_MAX

        status, out, err = run(capsys, argv[:-1])
        assert status == 0, err
        row = table_rows(out)["z"]
        assert row["metrics"] == str(daemon.metrics_port)
        assert row["version"] == ems.__version__
    finally:
        rig.stop(daemon)


def test_zookeeper_empty_cluster_exits_1(zookeeper, capsys):
    status, out, err = run(capsys, ["stats", "--zookeeper", zookeeper.hosts, "--cluster",
                                    f"empty-{time.monotonic_ns()}"])
    assert status == 1
    assert "has no members" in err
