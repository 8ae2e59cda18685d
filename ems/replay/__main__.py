"""Replay real multi-turn chats through vLLM, without and with the EMS connector.

    python -m ems.replay --model DIR [--sessions 8] [--in-flight 4] [--think-scale 0.001]
                         [--max-tokens 16] [--out bench/results/replay]

It runs the same sessions in up to six passes, one at a time. Each pass is a fresh engine
process:
  vllm    prefix cache only, KV space of --kv-tokens tokens (smaller than the sessions' history)
  ems     the same plus the EMS connector (pool of --pool-bytes, DRAM only)
  native  prefix cache only, KV space for every session's whole history (no eviction)
  spill     ems plus a spill tier (--spill-bytes in a fresh directory under --spill-dir)
  prefetch  spill plus scheduler-aware prefetch and protection of waiting requests' blocks
  session   prefetch with whole-session eviction from DRAM instead of CLOCK
The last three show the spill tier when the pool is smaller than the working set: give
--pool-bytes below the KV of all sessions' history (the default pool holds all of it).
After each replay, up to --probes requests with a history of 1,024 tokens or more are sent
again one at a time (max_tokens 1): after a prefix-cache reset in the vllm pass (a recompute)
and the ems pass (an EMS load), and as they are in the native pass (a vLLM prefix hit). Their
TTFTs compare the three without queueing or batching. The replay TTFTs include both.
It writes OUT.json (every request and the report) and OUT.png (TTFT against history length),
then prints the TTFT table. Build the model with `python -m ems.tools.build_model DIR --preset
bench`.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time

from ems.replay import report as rep
from ems.replay.dataset import MIN_REQUESTS, load_sessions
from ems.replay.runner import run_pass_in_child

PASSES = ("vllm", "ems", "native")
SPILL_PASSES = {   # label -> (prefetch, eviction policy)
    "spill": (False, "clock"),
    "prefetch": (True, "clock"),
    "session": (True, "session"),
}
ALL_PASSES = PASSES + tuple(SPILL_PASSES)
CONNECTOR_MODULE = "ems.integrations.vllm"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _at_least(minimum, kind=int):
    """Return an argparse type: `kind` with a lower bound, named in the error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is below the minimum {minimum}")
        return value
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m ems.replay", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory (ems.tools.build_model)")
    p.add_argument("--sessions", type=_at_least(1), default=8, help="conversations to replay")
    p.add_argument("--max-turns", type=_at_least(MIN_REQUESTS), default=24,
                   help="requests per session at most")
    p.add_argument("--in-flight", type=_at_least(1), default=4, help="sessions served concurrently")
    p.add_argument("--think-scale", type=_at_least(0.0, float), default=0.001,
                   help="multiplies the real gaps between messages (seconds)")
    p.add_argument("--max-tokens", type=_at_least(1), default=16, help="greedy tokens per reply")
    p.add_argument("--history", choices=("generated", "dataset"), default="generated",
                   help="assistant messages in later prompts: the engine's reply tokens, or "
                   "the dataset's reply text (then every pass sends the same prompts)")
    p.add_argument("--out", default="bench/results/replay", help="output path without suffix")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES),
                   help="float32 makes passes comparable token for token")
    p.add_argument("--max-model-len", type=_at_least(256), default=2048,
                   help="maximum prompt plus reply length in tokens; sessions stop before it")
    p.add_argument("--kv-tokens", type=_at_least(256), default=2048,
                   help="KV space of the vllm and ems passes, in tokens (>= --max-model-len)")
    p.add_argument("--pool-bytes", type=_at_least(1 << 20), default=None,
                   help="EMS pool capacity; default: twice the KV of every session's history")
    p.add_argument("--passes", default=",".join(PASSES), help="comma-separated subset of "
                   + ",".join(ALL_PASSES))
    p.add_argument("--spill-dir", default="/var/tmp",
                   help="where the spill passes create their spill directories (removed after)")
    p.add_argument("--spill-bytes", type=_at_least(1 << 20), default=8 << 30,
                   help="quota of each spill pass's directory")
    p.add_argument("--probes", type=_at_least(0), default=16,
                   help="requests with a long history timed alone after each replay")
    p.add_argument("--verbose", action="store_true", help="keep vLLM's INFO logs")
    return p.parse_args(argv)


def _connector_config(pool_bytes, **spill):
    """Return the kv_transfer_config of an EMS pass; `spill` adds spill tier settings."""
    extra = {"pool_capacity_bytes": pool_bytes, "pool_name": f"ems-replay-{os.getpid()}",
             **spill}
    return {"kv_connector": "EMSConnector", "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra}


def kv_bytes_per_token(model_dir, dtype):
    """Return the bytes of K and V per token over all layers, from the model's config.json."""
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * head_dim * DTYPE_BYTES[dtype]


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    passes = [p for p in args.passes.split(",") if p]
    unknown = set(passes) - set(ALL_PASSES)
    if unknown:
        raise SystemExit(f"unknown pass {sorted(unknown)}; choose from {ALL_PASSES}")
    if not passes:
        raise SystemExit(f"--passes {args.passes!r} names no pass; choose from {ALL_PASSES}")
    if args.kv_tokens < args.max_model_len:
        raise SystemExit(f"--kv-tokens {args.kv_tokens} must be >= --max-model-len "
                         f"{args.max_model_len} (vLLM refuses to start otherwise)")
    if set(passes) - {"vllm", "native"} and importlib.util.find_spec(CONNECTOR_MODULE) is None:
        raise SystemExit(f"the ems pass needs {CONNECTOR_MODULE}, which is not installed; "
                         f"run with --passes vllm,native")
    from transformers import AutoTokenizer

    # local_files_only: a mistyped path must not turn into a download from the Hub.
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    sessions = load_sessions(tokenizer, args.sessions, args.history, args.max_turns,
                             args.max_model_len - args.max_tokens, args.max_tokens,
                             args.think_scale)
    if not sessions:
        raise SystemExit(f"no conversation has {MIN_REQUESTS} turns that fit --max-turns "
                         f"{args.max_turns} and --max-model-len {args.max_model_len}")
    per_token = kv_bytes_per_token(args.model, args.dtype)
    all_tokens = sum(len(t.new_ids) + args.max_tokens for s in sessions for t in s.turns)
    block = 128   # vLLM's CPU block size; slack for partial blocks per session
    big_tokens = max(args.max_model_len, all_tokens + block * (len(sessions) + 8))
    small_bytes = (args.kv_tokens + block) * per_token   # + vLLM's reserved null block
    pool_bytes = args.pool_bytes or 2 * big_tokens * per_token
    n_requests = sum(len(s.turns) for s in sessions)
    print(f"{len(sessions)} sessions, {n_requests} requests, {all_tokens} tokens of final "
          f"history; KV {per_token} B/token: small {args.kv_tokens} tokens "
          f"({args.kv_tokens * per_token >> 20} MiB), native {big_tokens} tokens "
          f"({big_tokens * per_token >> 20} MiB); EMS pool {pool_bytes >> 20} MiB", flush=True)

    base = dict(model=os.path.abspath(args.model), dtype=args.dtype,
                max_model_len=args.max_model_len, in_flight=args.in_flight,
                max_tokens=args.max_tokens, verbose=args.verbose, kv_transfer_config=None,
                probe="reset", probe_min_history=rep.LONG_HISTORY, probe_count=args.probes)
    configs = {
        "vllm": dict(base, label="vllm", kv_cache_bytes=small_bytes),
        "ems": dict(base, label="ems", kv_cache_bytes=small_bytes,
                    kv_transfer_config=_connector_config(pool_bytes)),
        "native": dict(base, label="native", kv_cache_bytes=big_tokens * per_token,
                       probe="keep"),
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="ems-replay-") as tmp, \
            tempfile.TemporaryDirectory(prefix="ems-replay-spill-", dir=args.spill_dir) as spill:
        for label, (prefetch, policy) in SPILL_PASSES.items():
            configs[label] = dict(base, label=label, kv_cache_bytes=small_bytes,
                                  kv_transfer_config=_connector_config(
                                      pool_bytes, spill_dir=os.path.join(spill, label),
                                      spill_bytes=args.spill_bytes, prefetch=prefetch,
                                      eviction=policy))
        for label in passes:
            t0 = time.time()
            results[label] = run_pass_in_child(configs[label], sessions,
                                               os.path.join(tmp, label + ".json"))
            r = results[label]
            share = r["other_cpu_s"] / (r["pass_wall_s"] * os.cpu_count())
            print(f"[{label}] pass took {time.time() - t0:.0f} s (startup {r['startup_s']:.0f} s)"
                  f"; other processes used {r['other_cpu_s']:.0f} CPU s ({share:.0%} of the "
                  f"machine)", flush=True)
            if share > 0.05:
                print(f"[{label}] NOTE: other processes were busy during this pass, so its "
                      f"timings are not comparable", flush=True)

    report = rep.build_report(results)
    text = rep.table(report)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(argv=sys.argv, args=vars(args), date=datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"), cpus=os.cpu_count(),
        machine=platform.machine(), python=platform.python_version(),
        sessions=[s.uuid for s in sessions], requests=n_requests,
        prefix_stable_turns_checked=n_requests, kv_bytes_per_token=per_token,
        small_kv_tokens=args.kv_tokens, native_kv_tokens=big_tokens, pool_bytes=pool_bytes,
        wall_s=time.time() - t_start)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, report=report, passes=results), f)
    rep.plot(results, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png in {meta['wall_s']:.0f} s")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
