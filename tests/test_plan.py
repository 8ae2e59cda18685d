"""`ems plan`: KV bytes per token, tier counts, hit windows, stored layout and bad input.

Expected numbers are worked out here from the formulas, not read from the planner:
2 x layers x KV heads x head size x bytes per element per token, counts rounded down over
the whole cluster's capacity.
"""
import json
import os
import subprocess
import sys

import pytest

import ems
from ems import cli
from ems.tools import plan

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

GPT3 = ["--layers", "96", "--hidden", "12288", "--dtype", "fp16"]
GPT3_CONFIG = {"architectures": ["GPT3ForCausalLM"], "hidden_size": 12288,
               "num_attention_heads": 96, "num_hidden_layers": 96, "torch_dtype": "float16",
               "max_position_embeddings": 2048}
GPT3_TOKEN = 2 * 12288 * 96 * 2
LLAMA3_8B = ["--layers", "32", "--kv-heads", "8", "--head-dim", "128"]
LLAMA3_8B_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
                    "num_attention_heads": 32, "num_key_value_heads": 8,
                    "num_hidden_layers": 32, "max_position_embeddings": 8192,
                    "torch_dtype": "bfloat16"}
LLAMA3_8B_TOKEN = 2 * 32 * 8 * 128 * 2
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ems.__file__)))


def run_plan(capsys, *args):
    """Run `ems plan ARGS` in process and return its standard output."""
    assert cli.main(["plan", *args]) == 0
    return capsys.readouterr().out


def plan_json(capsys, *args):
    return json.loads(run_plan(capsys, *args, "--json"))


def run_plan_process(*args):
    """Run `python -m ems.cli plan ARGS` on this tree's ems package."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "ems.cli", "plan", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def write_config(tmp_path, config, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


# ---- bytes per token, block and context ---------------------------------------------

def test_plan_gpt3_text(capsys):
    out = run_plan(capsys, *GPT3)
    assert "4,718,592 bytes  (4.5 MiB)" in out
    assert f"{GPT3_TOKEN * 2048:,} bytes  (9 GiB)" in out
    assert "per 2048-token context" in out
    assert "binary" in out
    assert "1 GiB = 1024 MiB" in out


def test_plan_gpt3_json(capsys):
    result = plan_json(capsys, *GPT3)
    assert result["bytes_per_token"] == 4718592
    assert result["bytes_per_token"] == 4.5 * MiB
    assert result["bytes_per_context"] == 9 * GiB
    assert result["bytes_per_block"] == 16 * GPT3_TOKEN
    assert result["context_tokens"] == 2048
    assert result["block_tokens"] == 16
    assert result["model"]["dtype"] == "float16"
    assert result["model"]["bytes_per_element"] == 2
    assert result["model"]["attention"] == "mha"


def test_plan_gpt3_config(capsys, tmp_path):
    path = write_config(tmp_path, GPT3_CONFIG)
    result = plan_json(capsys, "--model", path)
    assert result["bytes_per_token"] == GPT3_TOKEN
    assert result["bytes_per_context"] == 9 * GiB
    assert result["model"]["source"] == path
    assert result["model"]["kv_heads"] == 96
    assert result["model"]["head_dim"] == 128
    assert result["model"]["dtype"] == "float16"
    assert result["model"]["max_position_embeddings"] == 2048
    out = run_plan(capsys, "--model", path)
    assert "(4.5 MiB)" in out
    assert "(9 GiB)" in out
    assert "96 KV heads of 128" in out


def test_plan_gqa_options(capsys):
    result = plan_json(capsys, *LLAMA3_8B)
    assert result["bytes_per_token"] == 131072
    assert plan.format_bytes(result["bytes_per_token"]) == "128 KiB"
    assert result["bytes_per_context"] == 2048 * 128 * KiB
    assert result["model"]["attention"] == "gqa"
    assert result["model"]["dtype"] == "bfloat16"   # the default without a config
    assert "(128 KiB)" in run_plan(capsys, *LLAMA3_8B)


def test_plan_gqa_config(capsys, tmp_path):
    result = plan_json(capsys, "--model", write_config(tmp_path, LLAMA3_8B_CONFIG))
    assert result["bytes_per_token"] == LLAMA3_8B_TOKEN
    assert result["model"]["head_dim"] == 4096 // 32
    assert result["model"]["attention_heads"] == 32
    assert result["model"]["kv_heads"] == 8


def test_plan_config_head_dim_wins(capsys, tmp_path):
    # Gemma-7B-like: head_dim 256, where hidden_size / num_attention_heads gives 192.
    config = dict(hidden_size=3072, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=256, num_hidden_layers=28, torch_dtype="bfloat16")
    result = plan_json(capsys, "--model", write_config(tmp_path, config))
    assert result["bytes_per_token"] == 2 * 28 * 16 * 256 * 2
    assert result["model"]["head_dim"] == 256


def test_plan_config_mqa(capsys, tmp_path):
    config = dict(hidden_size=2048, num_attention_heads=8, num_key_value_heads=1,
                  head_dim=256, num_hidden_layers=18, torch_dtype="bfloat16")
    result = plan_json(capsys, "--model", write_config(tmp_path, config))
    assert result["bytes_per_token"] == 2 * 18 * 1 * 256 * 2
    assert result["model"]["attention"] == "mqa"


def test_plan_config_null_fields(capsys, tmp_path):
    """Null num_key_value_heads and head_dim count as absent, as in some configs."""
    config = dict(LLAMA3_8B_CONFIG, num_key_value_heads=None, head_dim=None)
    result = plan_json(capsys, "--model", write_config(tmp_path, config))
    assert result["bytes_per_token"] == 2 * 32 * 4096 * 2
    assert result["model"]["attention"] == "mha"


def test_plan_config_text_config(capsys, tmp_path):
    """A multimodal config: the shape in text_config, the dtype at the top level."""
    text = {k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "torch_dtype"}
    config = {"architectures": ["LlavaForConditionalGeneration"], "text_config": text,
              "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24},
              "torch_dtype": "float32"}
    result = plan_json(capsys, "--model", write_config(tmp_path, config))
    assert result["bytes_per_token"] == 2 * 32 * 8 * 128 * 4
    assert result["model"]["dtype"] == "float32"
    assert result["model"]["max_position_embeddings"] == 8192


def test_plan_config_dtype_sources(capsys, tmp_path):
    no_dtype = {k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "torch_dtype"}
    path = write_config(tmp_path, no_dtype)
    assert plan_json(capsys, "--model", path)["model"]["dtype"] == "bfloat16"

    # transformers 5.19 writes "dtype".
    path = write_config(tmp_path, dict(no_dtype, dtype="float16"), "new.json")
    assert plan_json(capsys, "--model", path)["model"]["dtype"] == "float16"

    # --dtype (the KV-cache dtype) replaces the config's.
    path = write_config(tmp_path, LLAMA3_8B_CONFIG, "llama.json")
    result = plan_json(capsys, "--model", path, "--dtype", "fp8")
    assert result["bytes_per_token"] == 2 * 32 * 8 * 128 * 1


@pytest.mark.parametrize("name,size", [("float32", 4), ("FP32", 4), ("float16", 2),
                                       ("half", 2), ("bf16", 2), ("bfloat16", 2),
                                       ("fp8", 1), ("float8", 1), ("int8", 1),
                                       ("torch.bfloat16", 2)])
def test_plan_dtype_sizes(capsys, name, size):
    result = plan_json(capsys, "--layers", "2", "--hidden", "64", "--dtype", name)
    assert result["model"]["bytes_per_element"] == size
    assert result["bytes_per_token"] == 2 * 2 * 64 * size


def test_plan_context_and_block(capsys):
    result = plan_json(capsys, *LLAMA3_8B, "--context", "8192", "--block-tokens", "128")
    assert result["bytes_per_context"] == 8192 * LLAMA3_8B_TOKEN
    assert result["bytes_per_block"] == 128 * LLAMA3_8B_TOKEN
    out = run_plan(capsys, *LLAMA3_8B, "--context", "8192", "--block-tokens", "128")
    assert "per 128-token block" in out
    assert "per 8192-token context" in out


# ---- tiers --------------------------------------------------------------------------

def test_plan_tier_counts(capsys):
    result = plan_json(capsys, *GPT3, "--nodes", "8", "--dram-per-node", "512G",
                       "--ssd-per-node", "2T")
    context = 9 * GiB
    dram, ssd, total = (result["tiers"][t] for t in ("dram", "ssd", "total"))
    assert dram["capacity_bytes"] == 8 * 512 * GiB
    assert dram["contexts"] == (8 * 512 * GiB) // context
    assert dram["contexts"] == 455
    assert ssd["contexts"] == (8 * 2 * TiB) // context
    assert ssd["contexts"] == 1820
    assert total["contexts"] == (8 * (512 * GiB + 2 * TiB)) // context
    assert total["contexts"] == 2275
    assert dram["tokens"] == (8 * 512 * GiB) // GPT3_TOKEN
    assert ssd["tokens"] == (8 * 2 * TiB) // GPT3_TOKEN
    assert total["bytes_per_node"] == 512 * GiB + 2 * TiB


def test_plan_tier_counts_floor(capsys):
    """Counts divide the cluster's capacity and round down: 455.1 gives 455, where
    rounding each node first would give 8 x 56 = 448."""
    result = plan_json(capsys, *GPT3, "--nodes", "8", "--dram-per-node", "512G")
    assert 8 * 512 / 9 > 455
    assert result["tiers"]["dram"]["contexts"] == 455

    exact = plan_json(capsys, *GPT3, "--dram-per-node", "9G")
    assert exact["tiers"]["dram"]["contexts"] == 1
    one_byte_short = plan_json(capsys, *GPT3, "--dram-per-node", str(9 * GiB - 1))
    assert one_byte_short["tiers"]["dram"]["contexts"] == 0
    assert one_byte_short["tiers"]["dram"]["tokens"] == 2047


def test_plan_tier_total_spans_tiers(capsys):
    """A context's blocks may sit in both tiers, so the total can exceed the rows' sum."""
    result = plan_json(capsys, *GPT3, "--dram-per-node", "13.5G", "--ssd-per-node", "4.5G")
    tiers = result["tiers"]
    assert tiers["dram"]["contexts"] == 1
    assert tiers["ssd"]["contexts"] == 0
    assert tiers["total"]["contexts"] == 2


def test_plan_tier_table_text(capsys):
    out = run_plan(capsys, *GPT3, "--nodes", "8", "--dram-per-node", "512G",
                   "--ssd-per-node", "2T")
    lines = out.splitlines()
    dram = next(line for line in lines if line.strip().startswith("DRAM "))
    ssd = next(line for line in lines if line.strip().startswith("SSD "))
    total = next(line for line in lines if line.strip().startswith("total "))
    assert dram.split()[1:6] == ["512", "GiB", "4", "TiB", "455"]
    assert ssd.split()[1:6] == ["2", "TiB", "16", "TiB", "1,820"]
    assert total.split()[5] == "2,275"
    assert "Cluster of 8 nodes" in out


def test_plan_without_tiers(capsys):
    out = run_plan(capsys, *GPT3)
    assert "--dram-per-node" in out
    assert "contexts" in out
    assert plan_json(capsys, *GPT3)["tiers"] == {}


def test_plan_hit_window(capsys):
    rate = 1000.0
    result = plan_json(capsys, *GPT3, "--nodes", "8", "--dram-per-node", "512G",
                       "--ssd-per-node", "2T", "--new-tokens-per-s", "1000")
    dram_tokens = (8 * 512 * GiB) // GPT3_TOKEN
    ssd_tokens = (8 * 2 * TiB) // GPT3_TOKEN
    total_tokens = (8 * (512 * GiB + 2 * TiB)) // GPT3_TOKEN
    assert result["new_tokens_per_s"] == rate
    assert result["tiers"]["dram"]["hit_window_s"] == pytest.approx(dram_tokens / rate)
    assert result["tiers"]["ssd"]["hit_window_s"] == pytest.approx(ssd_tokens / rate)
    assert result["tiers"]["total"]["hit_window_s"] == pytest.approx(total_tokens / rate)

    out = run_plan(capsys, *GPT3, "--nodes", "8", "--dram-per-node", "512G",
                   "--ssd-per-node", "2T", "--new-tokens-per-s", "1000")
    assert "hit window" in out
    # 932 s in DRAM, 3,728 s on SSD, 4,660 s in total.
    assert "15.5 min" in out
    assert "62.1 min" in out
    assert "77.7 min" in out


def test_plan_hit_window_needs_rate(capsys):
    out = run_plan(capsys, *GPT3, "--dram-per-node", "512G")
    assert "--new-tokens-per-s RATE" in out
    assert "hit window" in out   # the hint names what the rate gives
    lines = out.splitlines()
    header = next(line for line in lines if line.strip().startswith("tier"))
    assert "hit window" not in header
    # With one tier the total row would repeat it, so it is left out.
    assert not any(line.strip().startswith("total ") for line in lines)
    assert plan_json(capsys, *GPT3, "--dram-per-node", "512G")["tiers"]["dram"][
        "hit_window_s"] is None


@pytest.mark.parametrize("seconds,text", [(0.25, "250 ms"), (45, "45 s"), (89.9, "89.9 s"),
                                          (932.067, "15.5 min"), (7200, "2 h"),
                                          (3 * 86400, "3 days")])
def test_format_duration(seconds, text):
    assert plan.format_duration(seconds) == text


@pytest.mark.parametrize("count,text", [(0, "0 bytes"), (1023, "1023 bytes"),
                                        (1024, "1 KiB"), (4718592, "4.5 MiB"),
                                        (9 * GiB, "9 GiB"), (2 * TiB, "2 TiB"),
                                        (1536 * KiB, "1.5 MiB")])
def test_format_bytes(count, text):
    assert plan.format_bytes(count) == text


# ---- tensor parallelism -------------------------------------------------------------

def test_plan_tp_splits_heads(capsys):
    one = plan_json(capsys, *LLAMA3_8B)
    eight = plan_json(capsys, *LLAMA3_8B, "--tp", "8")
    assert eight["bytes_per_token"] == one["bytes_per_token"]
    assert eight["kv_head_replicas"] == 1
    assert one["ems_serve"]["block_bytes"] == 16 * 2 * 8 * 128 * 2
    assert eight["ems_serve"]["block_bytes"] == 16 * 2 * 1 * 128 * 2
    assert eight["ems_serve"]["blocks_per_context"] == 128 * 32 * 8


def test_plan_tp_copies_heads(capsys):
    """With more ranks than KV heads, vLLM gives each rank one head, copying each head."""
    result = plan_json(capsys, *LLAMA3_8B, "--tp", "16")
    assert result["kv_head_replicas"] == 2
    assert result["bytes_per_token"] == 2 * LLAMA3_8B_TOKEN
    assert result["model"]["bytes_per_token"] == LLAMA3_8B_TOKEN
    assert "stored 2 times" in run_plan(capsys, *LLAMA3_8B, "--tp", "16")


# ---- as `ems serve` stores it -------------------------------------------------------

def test_plan_stored_gpt3(capsys):
    result = plan_json(capsys, *GPT3, "--nodes", "8", "--dram-per-node", "512G",
                       "--ssd-per-node", "2T")
    stored = result["ems_serve"]
    block = 16 * 2 * 12288 * 2
    per_context = (2048 // 16) * 96
    assert stored["block_bytes"] == block
    assert block == 768 * KiB
    assert stored["blocks_per_context"] == per_context

    # A 512 GiB pool gets 32 MiB slabs; a 768 KiB slot fits 42 times in one.
    dram = stored["dram"]
    assert dram["slab_bytes"] == 32 * MiB
    assert dram["slot_bytes"] == block
    assert dram["slots"] == (512 * GiB // (32 * MiB)) * 42
    assert dram["contexts"] == 8 * dram["slots"] // per_context
    assert dram["contexts"] == 448

    # A spill record is a 56-byte header and the payload, padded to 4 KiB.
    ssd = stored["ssd"]
    assert ssd["record_bytes"] == block + 4096
    assert ssd["contexts"] == 8 * (2 * TiB // (block + 4096)) // per_context


def test_plan_stored_text(capsys):
    out = run_plan(capsys, *GPT3, "--nodes", "8", "--dram-per-node", "512G",
                   "--ssd-per-node", "2T")
    assert "786,432 bytes (768 KiB)" in out
    assert "448 contexts" in out
    assert "790,528-byte records" in out


def test_plan_stored_index_limit(capsys):
    """8 KiB blocks fill a daemon's index (capacity / 16 KiB entries) at half the bytes."""
    result = plan_json(capsys, *LLAMA3_8B, "--tp", "8", "--dram-per-node", "256G")
    dram = result["ems_serve"]["dram"]
    assert dram["entries"] == 256 * GiB // (16 * KiB)
    assert dram["slots"] == 256 * GiB // (8 * KiB)
    assert dram["contexts"] == dram["entries"] // (128 * 32 * 8)
    assert dram["contexts"] * 2 == result["tiers"]["dram"]["contexts"]
    out = run_plan(capsys, *LLAMA3_8B, "--tp", "8", "--dram-per-node", "256G")
    assert "index" in out
    assert "NOTE:" in out


def test_plan_stored_slab_option(capsys):
    """A 6 MiB block does not fit the 2 MiB default slab of a 32 MiB pool."""
    result = plan_json(capsys, *GPT3, "--block-tokens", "128", "--dram-per-node", "32M")
    dram = result["ems_serve"]["dram"]
    assert result["ems_serve"]["block_bytes"] == 6 * MiB
    assert dram["slab_size_option"] == "8M"
    assert dram["slab_bytes"] == 8 * MiB
    assert dram["slots"] == 4
    out = run_plan(capsys, *GPT3, "--block-tokens", "128", "--dram-per-node", "32M")
    assert "--slab-size 8M" in out


@pytest.mark.parametrize("length", [1, 64, 65, 3000, 4096, 4097, 5000, 65536, 65537, 100000,
                                    786432, MiB])
def test_slot_bytes_matches_pool(make_pool, length):
    pool = make_pool(4 * MiB, slab_size=MiB, pages="small")
    assert pool.put(os.urandom(32), bytes(length))
    assert pool.stats()["classes"][0]["slot_size"] == plan.slot_bytes(length)


@pytest.mark.parametrize("length", [100000, 3000])
def test_daemon_dram_matches_pool(make_pool, length):
    """A pool made as `ems serve` makes it holds exactly the blocks daemon_dram counts:
    100,000-byte blocks fill the slabs first, 3,000-byte blocks the index."""
    capacity = 8 * MiB
    pool = make_pool(capacity, pages="small")
    for _ in range(3000):
        pool.put(os.urandom(32), bytes(length))
    expected = plan.daemon_dram(length, capacity)
    assert expected["blocks"] == pool.stats()["blocks"]
    assert expected["slab_bytes"] == pool.slab_size


# ---- bad input ----------------------------------------------------------------------

BAD_OPTIONS = [
    ([], ["--model CONFIG.json", "--layers"]),
    (["--layers", "96"], ["--layers 96", "--hidden", "--kv-heads", "--head-dim"]),
    (["--layers", "32", "--kv-heads", "8"], ["--head-dim"]),
    (["--layers", "32", "--hidden", "4096", "--kv-heads", "8", "--head-dim", "128"],
     ["--hidden", "--kv-heads", "not both"]),
    (["--layers", "0", "--hidden", "4096"], ["--layers", "'0'", "1 or more"]),
    (["--layers", "-4", "--hidden", "4096"], ["--layers"]),
    (["--layers", "2.5", "--hidden", "4096"], ["--layers", "'2.5'", "whole number"]),
    (["--layers", "32", "--hidden", "0"], ["--hidden", "'0'", "1 or more"]),
    (["--layers", "32", "--kv-heads", "0", "--head-dim", "128"], ["--kv-heads", "'0'"]),
    (["--layers", "32", "--kv-heads", "8", "--head-dim", "0"], ["--head-dim", "'0'"]),
    (GPT3[:4] + ["--nodes", "0"], ["--nodes", "'0'", "1 or more"]),
    (GPT3[:4] + ["--tp", "0"], ["--tp", "'0'"]),
    (GPT3[:4] + ["--context", "0"], ["--context", "'0'"]),
    (GPT3[:4] + ["--block-tokens", "0"], ["--block-tokens", "'0'"]),
    (GPT3[:4] + ["--dtype", "fp4"], ["--dtype", "'fp4'", "bfloat16", "fp8"]),
    (GPT3[:4] + ["--dram-per-node", "0"], ["--dram-per-node", "'0'", "positive"]),
    (GPT3[:4] + ["--dram-per-node", "lots"], ["--dram-per-node", "'lots'", "512M"]),
    (GPT3[:4] + ["--ssd-per-node", "2X"], ["--ssd-per-node", "'2X'"]),
    (GPT3[:4] + ["--new-tokens-per-s", "0"], ["--new-tokens-per-s", "'0'", "above 0"]),
    (GPT3[:4] + ["--new-tokens-per-s", "inf"], ["--new-tokens-per-s", "'inf'", "finite"]),
    (GPT3[:4] + ["--new-tokens-per-s", "fast"], ["--new-tokens-per-s", "'fast'"]),
    (GPT3[:4] + ["--context", "8"], ["--block-tokens 16", "--context 8"]),
    (GPT3[:4] + ["--tp", "5"], ["--hidden 12288", "--tp 5"]),
    (LLAMA3_8B + ["--tp", "3"], ["--tp 3", "8 KV heads"]),
    (["--layers", "32", "--kv-heads", "2", "--head-dim", "128", "--tp", "3"],
     ["--tp 3", "2 KV heads"]),
    (["--model", "/nonexistent/config.json"],
     ["/nonexistent/config.json", "No such file"]),
]


@pytest.mark.parametrize("args,words", BAD_OPTIONS)
def test_plan_bad_option(args, words):
    result = run_plan_process(*args)
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""
    assert "ems plan: error:" in result.stderr
    for word in words:
        assert word in result.stderr


BAD_CONFIGS = [
    ({k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "num_hidden_layers"},
     ["num_hidden_layers", "--layers"]),
    ({k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "num_attention_heads"},
     ["num_attention_heads"]),
    ({k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "hidden_size"},
     ["head_dim", "hidden_size"]),
    (dict(LLAMA3_8B_CONFIG, hidden_size=4000, num_attention_heads=48, num_key_value_heads=8),
     ["hidden_size 4000", "num_attention_heads 48"]),
    (dict(LLAMA3_8B_CONFIG, num_key_value_heads=6), ["num_attention_heads 32",
                                                     "num_key_value_heads 6"]),
    (dict(LLAMA3_8B_CONFIG, num_hidden_layers=0), ["num_hidden_layers", "positive", "0"]),
    (dict(LLAMA3_8B_CONFIG, num_hidden_layers="32"), ["num_hidden_layers", "'32'"]),
    (dict(LLAMA3_8B_CONFIG, head_dim=-128), ["head_dim", "-128"]),
    (dict(LLAMA3_8B_CONFIG, torch_dtype="float4"), ["'float4'", "--dtype"]),
    (dict(LLAMA3_8B_CONFIG, kv_lora_rank=512), ["kv_lora_rank", "latent"]),
    (dict(LLAMA3_8B_CONFIG, multi_query=True), ["multi_query"]),
    (dict(LLAMA3_8B_CONFIG, text_config=[1, 2]), ["text_config"]),
    ([LLAMA3_8B_CONFIG], ["JSON list", "expected an object"]),
]


@pytest.mark.parametrize("config,words", BAD_CONFIGS)
def test_plan_bad_config(tmp_path, config, words):
    path = write_config(tmp_path, config)
    result = run_plan_process("--model", path)
    assert result.returncode == 2, result.stdout
    assert path in result.stderr
    for word in words:
        assert word in result.stderr


def test_plan_config_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    result = run_plan_process("--model", str(path))
    assert result.returncode == 2
    assert "not a JSON config.json" in result.stderr


def test_plan_config_with_shape_options(tmp_path):
    path = write_config(tmp_path, LLAMA3_8B_CONFIG)
    result = run_plan_process("--model", path, "--layers", "32")
    assert result.returncode == 2
    assert "--model" in result.stderr
    assert "--layers" in result.stderr


def test_plan_bad_input_in_process(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--layers", "32", "--hidden", "4096", "--kv-heads", "8"])
    assert exit_info.value.code == 2
    assert "not both" in capsys.readouterr().err

    path = write_config(tmp_path, dict(LLAMA3_8B_CONFIG, hidden_size=4095, head_dim=None))
    with pytest.raises(SystemExit) as exit_info:
        plan.main(["--model", path])
    assert exit_info.value.code == 2
    assert "hidden_size 4095 is not divisible by num_attention_heads 32" in (
        capsys.readouterr().err)


def test_plan_process_output():
    """`python -m ems.cli plan` exits 0 and prints the plan."""
    result = run_plan_process(*GPT3, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bytes_per_context"] == 9 * GiB


def test_plan_listed_in_cli_help(capsys):
    assert cli.main(["--help"]) == 0
    assert "\n  plan " in capsys.readouterr().out


def doc_examples(text):
    """Yield ("file", name, lines) and ("run", argv, lines) from `$ ` commands in code blocks."""
    blocks = text.split("```")[1::2]
    for block in blocks:
        command, output = None, []
        for line in block.strip("\n").splitlines() + ["$ end"]:
            if not line.startswith("$ "):
                output.append(line)
                continue
            if command is not None:
                words = command.split()
                if words[0] == "cat":
                    yield "file", words[1], output
                elif words[:2] == ["ems", "plan"]:
                    yield "run", words[2:], output
            command, output = line[2:], []


def test_plan_docs_output_current(capsys, tmp_path, monkeypatch):
    """Each `ems plan` output pasted in docs/operations.md is what the command prints now.
    An output that starts with "..." is compared by its last lines."""
    with open(os.path.join(REPO_ROOT, "docs", "operations.md"), encoding="utf-8") as f:
        examples = list(doc_examples(f.read()))
    monkeypatch.chdir(tmp_path)
    runs = 0
    for kind, target, lines in examples:
        if kind == "file":
            (tmp_path / target).write_text("\n".join(lines) + "\n")
            continue
        printed = run_plan(capsys, *target).rstrip("\n").splitlines()
        if lines and lines[0] == "...":
            lines = lines[1:]
            printed = printed[-len(lines):]
        assert printed == lines, f"ems plan {' '.join(target)}"
        runs += 1
    assert runs >= 3
