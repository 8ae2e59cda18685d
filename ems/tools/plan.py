"""`ems plan`: the KV-cache size of a model and how many contexts an EMS cluster holds.

Bytes per token = 2 (K and V) x layers x KV heads x head size x bytes per element. With plain
multi-head attention, KV heads x head size is the hidden size. Counts are whole contexts,
rounded down, and sizes are binary (1 KiB = 1024 bytes). The planner computes from the model's
shape alone: it reads no weights and starts no pool. It treats every layer as full attention
with one K and one V vector per KV head, so it rejects configs of other KV layouts that it can
recognize (multi-head latent attention, Falcon's and ChatGLM's KV-head fields).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from dataclasses import dataclass

from ems import default_slab_size
from ems._core import MAX_SLAB_SIZE
from ems.serve import parse_size
from ems.tiering.segment import record_bytes

# Bytes per element of the KV cache. The fp8 names include vLLM's --kv-cache-dtype values.
DTYPE_BYTES = {
    "float32": 4, "fp32": 4,
    "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
    "fp8": 1, "float8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1,
    "float8_e5m2": 1, "int8": 1,
}
# Short names printed as the torch name.
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
DEFAULT_DTYPE = "bfloat16"

# A fixed default rather than the model's max_position_embeddings, because that is a ceiling
# few requests reach, and long-context models would then seem to fit only a few contexts.
DEFAULT_CONTEXT_TOKENS = 2048
DEFAULT_BLOCK_TOKENS = 16   # CacheConfig.DEFAULT_BLOCK_SIZE in vLLM 0.32.0

# Config fields of KV layouts that load_model_config does not read, each mapped to the
# layout's name and what to do instead. Falcon's and ChatGLM's layouts fit the formula when
# given as options.
_BY_OPTIONS = "give the shape with --layers, --kv-heads and --head-dim instead"
UNMODELED_FIELDS = {
    # NOTE: multi-head latent attention caches one latent vector per token and layer, not a
    # K and a V per head, so no combination of options describes it.
    "kv_lora_rank": ("multi-head latent attention (DeepSeek)",
                     "ems plan cannot size this KV cache"),
    "n_head_kv": ("Falcon's KV-head count", _BY_OPTIONS),
    "num_kv_heads": ("Falcon's KV-head count", _BY_OPTIONS),
    "multi_query": ("Falcon's multi-query attention", _BY_OPTIONS),
    "multi_query_group_num": ("ChatGLM's KV groups", _BY_OPTIONS),
}

# `ems serve` creates its pool with max_blocks left at 0, which the C core sets to
# capacity / 16 KiB (EMS_DEFAULT_BLOCK_HINT in csrc/pool.h), clamped to this range.
DEFAULT_BLOCK_HINT = 16 << 10
MIN_ENTRIES = 64
MAX_ENTRIES = 0xFFFFFFF0

BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
UNITS_LINE = ("Sizes are binary: 1 KiB = 1024 bytes, 1 MiB = 1024 KiB, 1 GiB = 1024 MiB, "
              "1 TiB = 1024 GiB.")


@dataclass(frozen=True)
class ModelShape:
    """The KV-cache shape of a model.

    kv_width is the length of one token's K (or V) vector in one layer, in elements:
    kv_heads x head_dim, or the hidden size when only that is known.
    """

    source: str                    # the config path, or "options"
    layers: int
    kv_width: int
    kv_heads: int | None           # None when given as --hidden
    head_dim: int | None
    attention_heads: int | None    # query heads, when the config gives them
    hidden_size: int | None
    dtype: str
    element_bytes: int
    max_positions: int | None      # max_position_embeddings of the config

    @property
    def attention(self) -> str:
        """Return "mha", "gqa" or "mqa" (one KV head)."""
        if self.kv_heads is None or self.kv_heads == self.attention_heads:
            return "mha"
        return "mqa" if self.kv_heads == 1 else "gqa"

    @property
    def bytes_per_token(self) -> int:
        """KV bytes per token of the whole model, before tensor-parallel copies."""
        return 2 * self.layers * self.kv_width * self.element_bytes


# ---- input ---------------------------------------------------------------------------

def positive_int(text: str) -> int:
    """Parse a whole number of at least 1 (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a whole number "
                                         "of 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: it must be 1 or more")
    return value


def positive_rate(text: str) -> float:
    """Parse a finite number above 0 (an argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected tokens per "
                                         "second, such as 5000 or 2.5e4") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: it must be a finite "
                                         "number above 0")
    return value


def size_argument(text: str) -> int:
    """Parse a size such as 512G or 2T into bytes (an argparse type)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def dtype_argument(text: str) -> str:
    """Return the dtype's name in lower case, its torch name for an alias (an argparse type)."""
    name = text.strip().lower().removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; expected one of "
                                         f"{', '.join(DTYPE_BYTES)}")
    return DTYPE_ALIASES.get(name, name)


def _config_int(fields: dict, name: str, path: str) -> int | None:
    """Return fields[name] as a positive int, None when absent or null."""
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--model {path}: {name} must be a positive integer, got {value!r}")
    return value


def load_model_config(path: str, dtype: str | None) -> ModelShape:
    """Read the KV shape from a Hugging Face config.json.

    Shape fields come from `text_config` when the config nests one (multimodal models), and
    the dtype and max_position_embeddings from there or the top level. An explicit `dtype`
    (the KV-cache dtype, e.g. fp8) replaces the config's torch_dtype. Raises ValueError
    naming the path and the field.
    """
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read --model {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--model {path} is not a JSON config.json: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--model {path} is a JSON {type(config).__name__}; expected an "
                         "object")
    fields = config.get("text_config", config)
    if not isinstance(fields, dict):
        raise ValueError(f"--model {path}: text_config must be an object")

    for name, (layout, instead) in UNMODELED_FIELDS.items():
        if fields.get(name) not in (None, False):
            raise ValueError(f"--model {path} sets {name} ({layout}), a KV layout that "
                             f"ems plan does not read from a config; {instead}")

    # Step 1: layers and heads.
    layers = _config_int(fields, "num_hidden_layers", path)
    heads = _config_int(fields, "num_attention_heads", path)
    for name, value in (("num_hidden_layers", layers), ("num_attention_heads", heads)):
        if value is None:
            raise ValueError(f"--model {path} has no {name}; give the shape with --layers "
                             "and --hidden or --kv-heads and --head-dim instead")
    kv_heads = _config_int(fields, "num_key_value_heads", path) or heads
    if heads % kv_heads:
        raise ValueError(f"--model {path}: num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv_heads}")

    # Step 2: head size, from head_dim or hidden_size / num_attention_heads.
    hidden = _config_int(fields, "hidden_size", path)
    head_dim = _config_int(fields, "head_dim", path)
    if head_dim is None:
        if hidden is None:
            raise ValueError(f"--model {path} has neither head_dim nor hidden_size")
        if hidden % heads:
            raise ValueError(f"--model {path}: hidden_size {hidden} is not divisible by "
                             f"num_attention_heads {heads}, and there is no head_dim")
        head_dim = hidden // heads

    # Step 3: element size and context limit, from the text config or the top level.
    if dtype is None:
        for scope in (fields, config):
            # transformers 5.19 writes "dtype", and older releases write "torch_dtype".
            dtype = scope.get("torch_dtype") or scope.get("dtype")
            if dtype is not None:
                break
        dtype = DEFAULT_DTYPE if dtype is None else str(dtype).lower().removeprefix("torch.")
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"--model {path}: unknown dtype {dtype!r}; give the KV "
                             "element type with --dtype")
        dtype = DTYPE_ALIASES.get(dtype, dtype)
    max_positions = (_config_int(fields, "max_position_embeddings", path)
                     or _config_int(config, "max_position_embeddings", path))

    return ModelShape(source=path, layers=layers, kv_width=kv_heads * head_dim,
                      kv_heads=kv_heads, head_dim=head_dim, attention_heads=heads,
                      hidden_size=hidden, dtype=dtype, element_bytes=DTYPE_BYTES[dtype],
                      max_positions=max_positions)


def shape_from_options(args) -> ModelShape:
    """Build the shape from --layers and --hidden, or --layers, --kv-heads and --head-dim."""
    if args.layers is None:
        raise ValueError("give the model shape: --model CONFIG.json, or --layers with "
                         "--hidden (multi-head attention) or --kv-heads and --head-dim "
                         "(grouped-query attention)")
    if args.hidden is not None and (args.kv_heads is not None or args.head_dim is not None):
        raise ValueError("give either --hidden (multi-head attention) or --kv-heads and "
                         "--head-dim (grouped-query attention), not both")
    dtype = args.dtype or DEFAULT_DTYPE
    common = dict(source="options", layers=args.layers, attention_heads=None,
                  dtype=dtype, element_bytes=DTYPE_BYTES[dtype], max_positions=None)
    if args.hidden is not None:
        return ModelShape(kv_width=args.hidden, kv_heads=None, head_dim=None,
                          hidden_size=args.hidden, **common)
    if args.kv_heads is None or args.head_dim is None:
        raise ValueError(f"--layers {args.layers} needs --hidden, or both --kv-heads and "
                         "--head-dim")
    return ModelShape(kv_width=args.kv_heads * args.head_dim, kv_heads=args.kv_heads,
                      head_dim=args.head_dim, hidden_size=None, **common)


def rank_kv_width(shape: ModelShape, tp: int) -> tuple[int, int]:
    """Return (K or V elements per token and layer on one TP rank, copies of each KV head).

    Follows vLLM 0.32.0 (QKVParallelLinear): with at least as many KV heads as ranks, each
    rank gets kv_heads / tp of them. With fewer, each rank gets one head, so every head is
    copied tp / kv_heads times, and each copy is stored under its own rank's keys.
    """
    if shape.attention_heads is not None and shape.attention_heads % tp:
        raise ValueError(f"--tp {tp} does not divide the {shape.attention_heads} attention "
                         "heads")
    if shape.kv_heads is None:
        if shape.kv_width % tp:
            raise ValueError(f"--hidden {shape.kv_width} is not divisible by --tp {tp}")
        return shape.kv_width // tp, 1
    if shape.kv_heads >= tp:
        if shape.kv_heads % tp:
            raise ValueError(f"--tp {tp} does not divide the {shape.kv_heads} KV heads")
        return shape.kv_width // tp, 1
    if tp % shape.kv_heads:
        raise ValueError(f"--tp {tp} is not a multiple of the {shape.kv_heads} KV heads")
    return shape.head_dim, tp // shape.kv_heads


# ---- the plan ------------------------------------------------------------------------

def slot_bytes(length: int) -> int:
    """Return the slot size a pool gives a block of `length` bytes.

    Mirrors ems_slab_class_of and ems_slab_class_size in csrc/slab.c: 64-byte steps up to
    4 KiB, then 64 steps per power of two. tests/test_plan.py checks it against a real pool.
    """
    if length <= 4096:
        return (length + 63) // 64 * 64
    exponent = (length - 1).bit_length() - 1
    step = 1 << (exponent - 6)
    return (length + step - 1) // step * step


def daemon_dram(block: int, capacity: int) -> dict:
    """Size the pool of `ems serve --capacity CAPACITY` for uniform blocks of `block` bytes.

    The default slab must hold one block, else the daemon rejects every block and needs a
    larger --slab-size. The returned `blocks` is the number that both the slabs and the
    index have room for.
    """
    slab = default_slab_size(capacity)
    needs_option = block > slab
    if needs_option:
        slab = 1 << (block - 1).bit_length()
    slot = slot_bytes(block)
    entries = min(max(capacity // DEFAULT_BLOCK_HINT, MIN_ENTRIES), MAX_ENTRIES)
    if slab > MAX_SLAB_SIZE or slab > capacity:
        return dict(slab_bytes=None, slab_size_option=None, slot_bytes=slot, slots=0,
                    entries=entries, blocks=0)
    slots = (capacity // slab) * (slab // slot)
    return dict(slab_bytes=slab, slab_size_option=f"{slab >> 20}M" if needs_option else None,
                slot_bytes=slot, slots=slots, entries=entries, blocks=min(slots, entries))


def build_plan(shape: ModelShape, args) -> dict:
    """Compute every figure `ems plan` prints; returns the --json object.

    Raises ValueError when --tp does not split the heads or a block exceeds the context.
    """
    if args.block_tokens > args.context:
        raise ValueError(f"--block-tokens {args.block_tokens} exceeds --context "
                         f"{args.context}; a context shorter than one block stores no block")
    rank_width, replicas = rank_kv_width(shape, args.tp)
    bytes_per_token = 2 * shape.layers * rank_width * args.tp * shape.element_bytes
    context = args.context

    plan = {
        "model": dict(source=shape.source, layers=shape.layers, attention=shape.attention,
                      attention_heads=shape.attention_heads, kv_heads=shape.kv_heads,
                      head_dim=shape.head_dim, hidden_size=shape.hidden_size,
                      dtype=shape.dtype, bytes_per_element=shape.element_bytes,
                      max_position_embeddings=shape.max_positions,
                      bytes_per_token=shape.bytes_per_token),
        "tp": args.tp, "kv_head_replicas": replicas, "block_tokens": args.block_tokens,
        "context_tokens": context, "nodes": args.nodes,
        "new_tokens_per_s": args.new_tokens_per_s,
        "bytes_per_token": bytes_per_token,
        "bytes_per_block": bytes_per_token * args.block_tokens,
        "bytes_per_context": bytes_per_token * context,
        "tiers": {},
    }

    # Cluster-wide tiers. A context's blocks may sit on several nodes and in both tiers, so
    # each count divides the summed capacity.
    per_node = {"dram": args.dram_per_node, "ssd": args.ssd_per_node}
    per_node = {tier: size for tier, size in per_node.items() if size is not None}
    if per_node:
        per_node["total"] = sum(per_node.values())
    for tier, size in per_node.items():
        capacity = size * args.nodes
        tokens = capacity // bytes_per_token
        window = tokens / args.new_tokens_per_s if args.new_tokens_per_s else None
        plan["tiers"][tier] = dict(bytes_per_node=size, capacity_bytes=capacity,
                                   contexts=capacity // plan["bytes_per_context"],
                                   tokens=tokens, hit_window_s=window)

    plan["ems_serve"] = stored_layout(plan, rank_width, shape.element_bytes, args)
    return plan


def stored_layout(plan: dict, width: int, element_bytes: int, args) -> dict:
    """Count what `ems serve` daemons store, with the vLLM connector's block layout.

    The connector stores each layer's slice of a full block, for one TP rank, as one EMS
    block, and never a partial block. The daemon pool rounds each block up to a slot, and
    the spill tier writes it as a 4 KiB-aligned record with a header.
    """
    block = args.block_tokens * 2 * width * element_bytes
    per_context = (args.context // args.block_tokens) * plan["model"]["layers"] * args.tp
    stored = {"block_bytes": block, "blocks_per_context": per_context}
    if args.dram_per_node is not None:
        dram = daemon_dram(block, args.dram_per_node)
        dram["contexts"] = dram["blocks"] * args.nodes // per_context
        stored["dram"] = dram
    if args.ssd_per_node is not None:
        record = record_bytes(block)
        records = args.ssd_per_node // record
        stored["ssd"] = dict(record_bytes=record, records=records,
                             contexts=records * args.nodes // per_context)
    return stored


# ---- output --------------------------------------------------------------------------

def format_bytes(count: int) -> str:
    """Format a byte count in the largest binary unit it reaches, e.g. "4.5 MiB"."""
    if count < 1024:
        return f"{count} bytes"
    value = float(count)
    for unit in BINARY_UNITS:
        value /= 1024
        if value < 1024 or unit == BINARY_UNITS[-1]:
            break
    return f"{value:.2f}".rstrip("0").rstrip(".") + " " + unit


def format_duration(seconds: float) -> str:
    """Format seconds as ms, s, min, h or days, switching unit at 1.5 of the next one."""
    for limit, divisor, unit in ((1, 1e-3, "ms"), (90, 1, "s"), (5400, 60, "min"),
                                 (129600, 3600, "h")):
        if seconds < limit:
            value = seconds / divisor
            break
    else:
        value, unit = seconds / 86400, "days"
    return f"{value:.1f}".removesuffix(".0") + " " + unit


def describe_model(model: dict) -> str:
    """Return the model line: layers, attention kind and element type."""
    if model["kv_heads"] is None:
        attention = f"multi-head attention, hidden size {model['hidden_size']}"
    else:
        kinds = {"mha": "multi-head", "gqa": "grouped-query", "mqa": "multi-query"}
        query = (f"{model['attention_heads']} query heads, " if model["attention_heads"]
                 else "")
        attention = (f"{kinds[model['attention']]} attention, {query}{model['kv_heads']} KV "
                     f"heads of {model['head_dim']}")
    source = "" if model["source"] == "options" else f" ({model['source']})"
    return (f"Model{source}: {model['layers']} layers, {attention}; {model['dtype']}, "
            f"{model['bytes_per_element']} bytes per element")


def format_plan(plan: dict) -> str:
    """Render the plan as the text `ems plan` prints."""
    lines = textwrap.wrap(describe_model(plan["model"]), width=92, subsequent_indent="  ")
    lines += [UNITS_LINE, ""]
    lines += format_sizes(plan)
    lines += [""] + format_tiers(plan)
    lines += [""] + format_stored(plan)
    notes = plan_notes(plan)
    if notes:
        lines.append("")
    for note in notes:
        lines += textwrap.wrap(f"NOTE: {note}", width=92, subsequent_indent="  ")
    return "\n".join(lines)


def format_sizes(plan: dict) -> list[str]:
    """Return the lines on KV bytes per token, block and context."""
    title = "KV cache"
    if plan["tp"] > 1:
        title += f", summed over {plan['tp']} tensor-parallel ranks"
    lines = [title]
    for label, key in (("per token", "bytes_per_token"),
                       (f"per {plan['block_tokens']}-token block", "bytes_per_block"),
                       (f"per {plan['context_tokens']}-token context", "bytes_per_context")):
        lines.append(f"  {label:<26} {plan[key]:>20,} bytes  ({format_bytes(plan[key])})")
    return lines


def format_tiers(plan: dict) -> list[str]:
    """Return the table of capacity, contexts, tokens and hit window per tier."""
    tiers, rate = plan["tiers"], plan["new_tokens_per_s"]
    if not tiers:
        return ["Give --dram-per-node and --ssd-per-node to count the contexts that each",
                "tier of the cluster holds and, with --new-tokens-per-s, its hit window."]
    nodes = plan["nodes"]
    lines = [f"Cluster of {nodes} node{'s' if nodes > 1 else ''} "
             "(contexts and tokens are whole, rounded down)"]
    header = f"  {'tier':<6} {'per node':>10} {'cluster':>10} {'contexts':>12} {'tokens':>18}"
    lines.append(header + ("  hit window" if rate else ""))
    for tier, row in tiers.items():
        if tier == "total" and len(tiers) == 2:
            continue   # one tier given: the total repeats it
        line = (f"  {tier if tier == 'total' else tier.upper():<6} "
                f"{format_bytes(row['bytes_per_node']):>10} "
                f"{format_bytes(row['capacity_bytes']):>10} "
                f"{row['contexts']:>12,} {row['tokens']:>18,}")
        if rate:
            line += f"  {format_duration(row['hit_window_s'])}"
        lines.append(line)
    if rate:
        lines += ["  Hit window (an estimate): how long a token's KV stays in the tier when "
                  "the cluster",
                  f"  stores {rate:,.6g} new tokens per second and each tier evicts its oldest "
                  "blocks first."]
    else:
        lines += ["  Give --new-tokens-per-s RATE (new KV tokens per second across the "
                  "cluster) for",
                  "  the hit window, how long a context stays cached."]
    return lines


def format_stored(plan: dict) -> list[str]:
    """Return the lines on blocks as the vLLM connector and `ems serve` store them."""
    stored = plan["ems_serve"]
    block = stored["block_bytes"]
    lines = ["Stored by `ems serve` daemons, as the vLLM connector writes them",
             f"  EMS block  {block:,} bytes ({format_bytes(block)}): one layer, one TP rank "
             f"and {plan['block_tokens']} tokens;",
             f"             {stored['blocks_per_context']:,} per "
             f"{plan['context_tokens']}-token context"]
    dram = stored.get("dram")
    if dram is not None and dram["slab_bytes"] is not None:
        lines.append(f"  DRAM       {dram['slot_bytes']:,}-byte slots in "
                     f"{format_bytes(dram['slab_bytes'])} slabs: {dram['contexts']:,} contexts")
    elif dram is not None:
        lines.append("  DRAM       no slab holds this block: 0 contexts")
    ssd = stored.get("ssd")
    if ssd is not None:
        lines.append(f"  SSD        {ssd['record_bytes']:,}-byte records: at most "
                     f"{ssd['contexts']:,} contexts")
    return lines


def plan_notes(plan: dict) -> list[str]:
    """Return warnings on the plan: TP copies, context limits, slab and index limits."""
    notes = []
    model, stored = plan["model"], plan["ems_serve"]
    context, block_tokens = plan["context_tokens"], plan["block_tokens"]
    if plan["kv_head_replicas"] > 1:
        notes.append(f"--tp {plan['tp']} exceeds the {model['kv_heads']} KV heads, so each "
                     f"head is stored {plan['kv_head_replicas']} times (once per rank).")
    limit = model["max_position_embeddings"]
    if limit and context > limit:
        notes.append(f"--context {context} exceeds the model's max_position_embeddings "
                     f"{limit}.")
    if context % block_tokens:
        notes.append(f"the connector stores full {block_tokens}-token blocks only, so the "
                     f"last {context % block_tokens} tokens of a context are not stored.")

    dram = stored.get("dram")
    if dram is None:
        return notes
    if dram["slab_size_option"] is not None:
        capacity = format_bytes(plan["tiers"]["dram"]["bytes_per_node"])
        notes.append(f"an EMS block is larger than the default slab of a {capacity} pool, so "
                     f"start the daemons with --slab-size {dram['slab_size_option']}.")
    elif dram["slab_bytes"] is None:
        notes.append(f"an EMS block of {stored['block_bytes']:,} bytes is larger than the "
                     f"largest slab ({MAX_SLAB_SIZE:,} bytes) or the DRAM per node; lower "
                     "--block-tokens or raise --tp.")
    if dram["entries"] < dram["slots"]:
        by_slots = dram["slots"] * plan["nodes"] // stored["blocks_per_context"]
        notes.append(f"EMS blocks under {DEFAULT_BLOCK_HINT >> 10} KiB fill the daemon's index "
                     f"({dram['entries']:,} entries per node) before its slabs, so DRAM holds "
                     f"{dram['contexts']:,} contexts instead of {by_slots:,}.")
    return notes


# ---- command line --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ems plan",
        description="Compute the KV-cache size of a model and how many contexts the DRAM and "
                    "SSD tiers of an EMS cluster hold. Sizes are binary (1 GiB = 2^30 bytes).")
    shape = p.add_argument_group("model shape (--model, or --layers with --hidden or with "
                                 "--kv-heads and --head-dim)")
    shape.add_argument("--model", metavar="CONFIG.json",
                       help="Hugging Face config.json of the model")
    shape.add_argument("--layers", type=positive_int, help="number of layers")
    shape.add_argument("--hidden", type=positive_int,
                       help="hidden size, for plain multi-head attention")
    shape.add_argument("--kv-heads", type=positive_int,
                       help="KV heads, for grouped-query attention")
    shape.add_argument("--head-dim", type=positive_int, help="size of one attention head")
    shape.add_argument("--dtype", type=dtype_argument,
                       help="KV element type: float32/fp32 (4 bytes), float16/fp16/bfloat16/"
                            "bf16 (2), fp8/float8/int8 (1) (default: the config's "
                            f"torch_dtype, else {DEFAULT_DTYPE})")

    p.add_argument("--context", type=positive_int, default=DEFAULT_CONTEXT_TOKENS,
                   metavar="TOKENS", help="tokens per context (default "
                   f"{DEFAULT_CONTEXT_TOKENS}, whatever the model's maximum)")
    p.add_argument("--block-tokens", type=positive_int, default=DEFAULT_BLOCK_TOKENS,
                   help=f"tokens per KV block, vLLM's block_size (default "
                        f"{DEFAULT_BLOCK_TOKENS}, vLLM's default; its CPU backend uses 128)")
    p.add_argument("--tp", type=positive_int, default=1,
                   help="tensor-parallel ranks per engine (default 1)")
    p.add_argument("--nodes", type=positive_int, default=1,
                   help="EMS nodes in the cluster (default 1)")
    p.add_argument("--dram-per-node", type=size_argument, metavar="SIZE",
                   help="DRAM pool per node (`ems serve --capacity`), e.g. 512G; K, M, G, T "
                        "are powers of 1024")
    p.add_argument("--ssd-per-node", type=size_argument, metavar="SIZE",
                   help="spill-tier quota per node (`ems serve --spill-size`), e.g. 2T; with "
                        "one shared directory, its quota divided by --nodes")
    p.add_argument("--new-tokens-per-s", type=positive_rate, metavar="RATE",
                   help="tokens of new KV the whole cluster stores per second; gives the "
                        "hit window, the time a context stays cached")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.model is not None:
            if any(v is not None for v in (args.layers, args.hidden, args.kv_heads,
                                           args.head_dim)):
                raise ValueError("--model reads the shape from the config; leave out "
                                 "--layers, --hidden, --kv-heads and --head-dim")
            shape = load_model_config(args.model, args.dtype)
        else:
            shape = shape_from_options(args)
        plan = build_plan(shape, args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
