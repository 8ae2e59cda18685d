"""One pass of the replay: a fresh vLLM engine serving every session, in its own process.

`run_pass(config, sessions)` starts `AsyncLLM` (the engine behind vLLM's OpenAI server) and
warms it up. Then `config["in_flight"]` session workers each take the next session. For each
turn a worker sleeps the scaled think time, streams the request and records when its first
output arrived. Requests of different sessions interleave in the engine as they would behind
an API server.

TTFT is measured two ways, both in seconds (queue_s and prefill_s split the second):
  ttft_s         client side: from just before `generate()` to the first streamed output (the
                 first token); includes queueing in the engine, as a user would see it.
  ttft_engine_s  `RequestOutput.metrics.first_token_latency`: vLLM's own value, from the
                 request's arrival in the frontend to the output step of its first token. It
                 needs log stats on (`disable_log_stats=False`); the offline `LLM` class turns
                 them off, so its `metrics` is None.
Neither changes what is cached: every request is the turn's real prompt, sent once.

`num_cached_tokens` is what vLLM reports per request: its own prefix-cache hit plus tokens a
KV connector loaded. The split between the two exists only per engine step, so the pass records
it as totals (`prompt_tokens_by_source`) through a stat logger.

Engine processes must be started under `if __name__ == "__main__":` (vLLM spawns workers);
`run_pass_in_child` gives each pass a fresh process so no state leaks between passes.
"""
import asyncio
import hashlib
import json
import multiprocessing
import os
import resource
import time

ENGINE_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_HOST_IP": "127.0.0.1",      # else vLLM learns its address by a UDP connect to 8.8.8.8
}
WARMUP_TOKENS = 300                   # prompt length of each warm-up request


def set_engine_env(verbose=False):
    """Set the process environment for vLLM. Call it before the first `import vllm`.

    VLLM_CPU_KVCACHE_SPACE is removed: it is a whole number of GiB and overrides
    `kv_cache_memory_bytes`, which each pass sets (the KV space is part of the experiment).
    """
    os.environ.update(ENGINE_ENV)
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _stat_logger_class():
    """Return a vLLM stat logger class that sums the per-step statistics the replay reports."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class Totals(StatLoggerBase):
        instances = []

        def __init__(self, vllm_config, engine_index=0):
            self.totals = dict(computed=0, local_cache_hit=0, external_kv_transfer=0,
                               prefix_queries=0, prefix_hits=0, connector_queries=0,
                               connector_hits=0, preempted_requests=0)
            self.kv_connector_stats = None
            Totals.instances.append(self)

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            t = self.totals
            if iteration_stats is not None:
                p = iteration_stats.prompt_token_stats
                t["computed"] += p.computed
                t["local_cache_hit"] += p.local_cache_hit
                t["external_kv_transfer"] += p.external_kv_transfer
                t["preempted_requests"] += iteration_stats.num_preempted_reqs
            if scheduler_stats is not None:
                t["prefix_queries"] += scheduler_stats.prefix_cache_stats.queries
                t["prefix_hits"] += scheduler_stats.prefix_cache_stats.hits
                c = scheduler_stats.connector_prefix_cache_stats
                if c is not None:
                    t["connector_queries"] += c.queries
                    t["connector_hits"] += c.hits
                # Each report covers one interval: sum the numeric counters.
                for name, value in (scheduler_stats.kv_connector_stats or {}).items():
                    if isinstance(value, (int, float)):
                        totals = self.kv_connector_stats = self.kv_connector_stats or {}
                        totals[name] = totals.get(name, 0) + value

        def log_engine_initialized(self):
            pass

    return Totals


def _connector_stats(config, logger):
    """Collect EMS statistics for the report, or None in a pass without the connector.

    `pool` is `ems.Pool.attach(pool_name).stats()` read while the engine still runs (the
    worker process owns the pool). `kv_connector_stats` sums over the pass the counters that
    vLLM passed on from the connector's `get_kv_connector_stats()`, if it implements it.
    """
    transfer = config.get("kv_transfer_config")
    if not transfer:
        return None
    out = {}
    name = transfer.get("kv_connector_extra_config", {}).get("pool_name")
    if name:
        import ems
        try:
            with ems.Pool.attach(name) as pool:
                out["pool"] = _plain(pool.stats())
        except ems.errors.EMSError as exc:
            out["pool_error"] = repr(exc)
    if logger.kv_connector_stats:
        out["kv_connector_stats"] = _plain(logger.kv_connector_stats)
    return out


def _engine_times(metrics):
    """Split vLLM's request timestamps (seconds) into TTFT, queueing and first-step time.

    preemptions counts how often vLLM preempted the request. A preempted request recomputes
    its prompt and the tokens generated so far as one prefill, which in float32 can round
    differently from step-by-step decoding.

    queue_s: queued until first scheduled. prefill_s: first scheduled until the step that
    produced the first token, so it includes the compute of requests batched alongside.
    """
    if metrics is None:
        return dict(ttft_engine_s=None, queue_s=None, prefill_s=None, preemptions=None)
    return dict(ttft_engine_s=metrics.first_token_latency,
                queue_s=metrics.scheduled_ts - metrics.queued_ts,
                prefill_s=metrics.first_token_ts - metrics.scheduled_ts,
                preemptions=metrics.num_preemptions)


def _digest(ids):
    """Return a short hex digest of token ids, to check that passes sent the same prompts."""
    return hashlib.blake2b(repr(ids).encode(), digest_size=8).hexdigest()


def _plain(value):
    """Return `value` in JSON-serialisable form (other objects become their repr)."""
    return json.loads(json.dumps(value, default=repr))


async def _serve(engine, config, sessions, progress):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=config["max_tokens"], ignore_eos=True)
    records, queue, prompts = [], list(reversed(sessions)), {}
    started = time.perf_counter()

    async def one(prompt_ids, request_id):
        t0 = time.perf_counter()
        ttft = last = None
        async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params,
                                         request_id):
            if ttft is None:
                ttft = time.perf_counter() - t0
            last = out
        return t0, ttft, time.perf_counter() - t0, last

    async def worker():
        while queue:
            session = queue.pop()
            history = []        # token ids the engine has processed in this session
            for turn in session.turns:
                if turn.think_s > 0:
                    await asyncio.sleep(turn.think_s)
                prompt = history + turn.new_ids
                prompts[(session.uuid, turn.index)] = prompt
                t0, ttft, e2e, out = await one(prompt, f"{session.uuid}-{turn.index}")
                output_ids = list(out.outputs[0].token_ids)
                records.append(dict(
                    session=session.uuid, turn=turn.index, history_tokens=len(history),
                    prompt_tokens=len(prompt), prompt_digest=_digest(prompt),
                    cached_tokens=out.num_cached_tokens,
                    computed_tokens=len(prompt) - out.num_cached_tokens,
                    ttft_s=ttft, e2e_s=e2e, start_s=t0 - started, output_ids=output_ids,
                    **_engine_times(out.metrics)))
                history = prompt + (output_ids if session.history == "generated" else [])
            progress(session, records, time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(config["in_flight"])))
    return records, prompts, time.perf_counter() - started


def probe_keys(records, min_history, count):
    """Pick up to `count` requests with history >= min_history, evenly spread, in key order.

    The choice depends only on the keys and history lengths, so passes that sent the same
    prompts probe the same requests.
    """
    keys = sorted((r["session"], r["turn"]) for r in records
                  if r["history_tokens"] >= min_history)
    if len(keys) <= count:
        return keys
    return [keys[i * len(keys) // count] for i in range(count)]


async def _probe(engine, config, prompts, keys):
    """Time each chosen prompt alone (one request in the engine, max_tokens 1), after the replay.

    config["probe"] "reset" empties vLLM's prefix cache before each prompt, so the vllm pass
    recomputes the prompt and the ems pass loads it from EMS (the connector keeps its blocks).
    "keep" leaves the cache as the replay left it: the native pass finds the prompt in its own
    prefix cache. Each probe measures one request without queueing or batching.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=1)
    out = []
    for session, turn in keys:
        if config["probe"] == "reset" and not await engine.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache before a probe")
        prompt = prompts[(session, turn)]
        t0 = time.perf_counter()
        async for result in engine.generate(TokensPrompt(prompt_token_ids=prompt), params,
                                            f"probe-{session}-{turn}"):
            pass
        out.append(dict(session=session, turn=turn, prompt_tokens=len(prompt),
                        cached_tokens=result.num_cached_tokens,
                        ttft_s=time.perf_counter() - t0,
                        first_id=list(result.outputs[0].token_ids)[:1]))
    return out


async def _warmup(engine):
    """Send two requests whose prompts share no block with a session (they lack `<s>`)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i in range(2):
        ids = [3 + i] + [7 + (j * 31 + i) % 50 for j in range(WARMUP_TOKENS - 1)]
        async for _ in engine.generate(TokensPrompt(prompt_token_ids=ids), params, f"warm{i}"):
            pass


def run_pass(config, sessions):
    """Serve `sessions` on a new engine built from `config` and return the pass record.

    config keys: label, model, dtype, max_model_len, kv_cache_bytes, in_flight, max_tokens,
    kv_transfer_config (dict or None), probe ("reset" or "keep"), probe_min_history,
    probe_count, verbose.
    """
    set_engine_env(config.get("verbose", False))
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    totals_cls = _stat_logger_class()
    args = AsyncEngineArgs(model=config["model"], dtype=config["dtype"],
                           max_model_len=config["max_model_len"], enforce_eager=True,
                           kv_cache_memory_bytes=config["kv_cache_bytes"], seed=0,
                           disable_log_stats=False,
                           kv_transfer_config=config.get("kv_transfer_config"))
    label = config["label"]
    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(args, stat_loggers=[totals_cls])
    startup = time.perf_counter() - t0
    finished = []

    def progress(session, records, elapsed):
        finished.append(session.uuid)
        print(f"[{label}] session {len(finished)}/{len(sessions)} done "
              f"({len(session.turns)} turns), {len(records)} requests, {elapsed:.1f} s",
              flush=True)

    async def main(engine):
        w0 = time.perf_counter()
        await _warmup(engine)
        warm = time.perf_counter() - w0
        records, prompts, wall = await _serve(engine, config, sessions, progress)
        keys = probe_keys(records, config["probe_min_history"], config["probe_count"])
        probes = await _probe(engine, config, prompts, keys)
        return warm, records, wall, probes

    try:
        warm, records, wall, probes = asyncio.run(main(engine))
        logger = totals_cls.instances[-1]
        ems_stats = _connector_stats(config, logger)
        return dict(label=label, config={k: v for k, v in config.items() if k != "verbose"},
                    startup_s=startup, warmup_s=warm, wall_s=wall,
                    requests_per_s=len(records) / wall, records=records, probes=probes,
                    prompt_tokens_by_source=logger.totals, ems=ems_stats)
    finally:
        engine.shutdown()
        del engine     # its __del__ shuts down again; at interpreter exit that raises TypeError


def _child(config, sessions, path):
    result = run_pass(config, sessions)
    with open(path, "w") as f:
        json.dump(result, f)


def _busy_cpu_seconds():
    """Return the CPU seconds the machine has spent busy since boot (/proc/stat, all CPUs)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]              # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_pass_in_child(config, sessions, path):
    """Run `run_pass` in a fresh spawned process and return its record, passed through `path`.

    The record gets `other_cpu_s`: CPU seconds that processes outside this pass used while it
    ran (machine-wide busy time minus the pass's own processes, which are all reaped by then).
    Timings are comparable only when that is near zero.
    """
    busy0, own0, wall0 = _busy_cpu_seconds(), _children_cpu_seconds(), time.time()
    proc = multiprocessing.get_context("spawn").Process(target=_child,
                                                        args=(config, sessions, path))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"pass {config['label']!r} failed with exit code {proc.exitcode}")
    with open(path) as f:
        result = json.load(f)
    own = _children_cpu_seconds() - own0
    result["pass_wall_s"] = time.time() - wall0
    result["pass_cpu_s"] = own
    result["other_cpu_s"] = max(0.0, _busy_cpu_seconds() - busy0 - own)
    return result
