"""Run multi-turn sessions through a real vLLM LLM (CPU) and print the results as JSON.

Started by tests/test_vllm_e2e.py in a subprocess, so vLLM's engine and worker processes
never share state with pytest. Usage:

    python tests/vllm_e2e_run.py '{"model": DIR, "pool_name": NAME or null, ...}'

The JSON object has these fields. model: the model directory. pool_name: the EMS pool name,
or null to run without the connector. sessions: per session and turn, the new token ids of
that turn. max_tokens: tokens generated per turn. extra (optional): connector settings
that replace the embedded-pool ones (for the daemon modes).

Each turn's prompt is the previous prompt, the previous output and the turn's new tokens.
All sessions of one turn go in one generate call, and vLLM's prefix cache is reset between
turns, so any cached token of a later turn came from the connector. The last stdout line
is `E2E_RESULT {json}`.
"""
import json
import sys
import time


def main():
    args = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=args["model"], dtype="float32", enforce_eager=True, max_model_len=2048,
                  seed=0)
    if args["pool_name"]:
        kwargs["kv_transfer_config"] = {
            "kv_connector": "EMSConnector",
            "kv_connector_module_path": "ems.integrations.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": args.get("extra") or {
                "pool_name": args["pool_name"], "pool_capacity_bytes": 256 << 20,
                "pool_pages": "small"},
        }
    started = time.monotonic()
    llm = LLM(**kwargs)
    startup_s = time.monotonic() - started
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], ignore_eos=True)

    sessions = args["sessions"]
    histories = [[] for _ in sessions]
    turns = []
    for turn in range(len(sessions[0])):
        prompts = [history + session[turn] for history, session in zip(histories, sessions)]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                               use_tqdm=False)
        records = []
        for i, (prompt, output) in enumerate(zip(prompts, outputs)):
            tokens = list(output.outputs[0].token_ids)
            records.append({"prompt_len": len(prompt), "cached": output.num_cached_tokens,
                            "tokens": tokens,
                            "finish_reason": output.outputs[0].finish_reason})
            histories[i] = prompt + tokens
        turns.append(records)
        llm.reset_prefix_cache()
        if (args.get("extra") or {}).get("spill_dir"):
            wait_spill_settled(args["extra"]["spill_dir"])

    stats = spill = None
    extra = args.get("extra") or {}
    if args["pool_name"] and (not extra or extra.get("pool_name")):
        import ems

        reader = ems.Pool.attach(args["pool_name"])
        stats = {k: v for k, v in reader.stats().items() if isinstance(v, (int, float, str))}
        reader.close()
    if extra.get("spill_dir"):
        from ems.tiering.store import SpillStore
        from ems.tiering.tier import IDLE_PUBLISH_S

        time.sleep(2 * IDLE_PUBLISH_S)   # the worker publishes an idle segment by then
        with SpillStore(extra["spill_dir"], 1 << 62, read_only=True) as store:
            spill = store.stats()
    result = {"block_size": block_size, "turns": turns, "stats": stats, "spill": spill,
              "startup_s": round(startup_s, 1),
              "total_s": round(time.monotonic() - started, 1)}
    print("E2E_RESULT " + json.dumps(result), flush=True)


def wait_spill_settled(directory: str, quiet_s: float = 0.5, timeout_s: float = 15.0) -> None:
    """Wait until the spill directory has not grown for quiet_s, as a user's think time
    between turns would. Blocks that the worker is still writing from DRAM to disk when the
    next turn is scheduled are misses by design. This run checks that written ones are
    found."""
    from ems.tiering.view import SpillView

    view = SpillView(directory)
    try:
        count, changed = view.count(), time.monotonic()
        deadline = changed + timeout_s
        while time.monotonic() < deadline and time.monotonic() - changed < quiet_s:
            time.sleep(0.1)
            now = view.count()
            if now != count:
                count, changed = now, time.monotonic()
    finally:
        view.close()


if __name__ == "__main__":
    main()
