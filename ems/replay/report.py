"""Statistics, comparison, plot and table for the passes of one replay.

Pass labels (see __main__.py):
  vllm    vLLM with its own prefix cache only, in a KV space smaller than the working set, so
          evicted history is recomputed;
  ems     the same engine settings plus the EMS connector;
  native  vLLM with a KV space large enough for every session, so it hits its prefix cache
          wherever possible: the baseline for "as fast as a local hit".
Times in the record are seconds; the table and the plot show milliseconds.
"""
import numpy as np

LONG_HISTORY = 1024      # tokens; the TTFT ratios are taken over turns with at least this history
TARGET_VS_RECOMPUTE = 0.15
GOAL_VS_NATIVE = 1.5


def _pct(values, q):
    return float(np.percentile(values, q)) if len(values) else None


def _summary(records):
    """Return TTFT percentiles (s) and token counts of a list of request records."""
    ttft = [r["ttft_s"] for r in records]
    engine = [r["ttft_engine_s"] for r in records if r["ttft_engine_s"] is not None]
    prefill = [r["prefill_s"] for r in records if r.get("prefill_s") is not None]
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["cached_tokens"] for r in records)
    return dict(n=len(records), ttft_p50_s=_pct(ttft, 50), ttft_p90_s=_pct(ttft, 90),
                ttft_engine_p50_s=_pct(engine, 50), prefill_p50_s=_pct(prefill, 50),
                prompt_tokens=prompt, cached_tokens=cached,
                computed_tokens=prompt - cached, hit_rate=cached / prompt if prompt else None,
                mean_history_tokens=float(np.mean([r["history_tokens"] for r in records]))
                if records else None)


def _by_key(records):
    return {(r["session"], r["turn"]): r for r in records}


def mismatches(a, b):
    """Compare passes a and b request by request, by output token ids and prompt digests.

    With history "generated", one mismatched reply changes every later prompt of its session,
    so prompts_differ shows how far a mismatch spread. first_mismatches lists replies that
    differ although their prompts were the same: the origins of the differences.
    """
    ra, rb = _by_key(a["records"]), _by_key(b["records"])
    common = sorted(set(ra) & set(rb))
    bad = [k for k in common if ra[k]["output_ids"] != rb[k]["output_ids"]]
    prompts = [k for k in common if ra[k]["prompt_digest"] != rb[k]["prompt_digest"]]
    return dict(compared=len(common), mismatched=len(bad), prompts_differ=len(prompts),
                first_mismatches=[dict(session=s, turn=t, a=ra[(s, t)]["output_ids"],
                                       b=rb[(s, t)]["output_ids"],
                                       preemptions_a=ra[(s, t)].get("preemptions"),
                                       preemptions_b=rb[(s, t)].get("preemptions"))
                                  for s, t in bad if ra[(s, t)]["prompt_digest"]
                                  == rb[(s, t)]["prompt_digest"]][:5])


def _ratio(x, y):
    return x / y if x is not None and y else None


def long_history(passes):
    """Return TTFT p50 over turns with history >= LONG_HISTORY tokens and EMS's ratios.

    `recomputed` restricts the set to turns where the vllm pass found less than half of the
    history in its prefix cache: there the vllm TTFT is a recompute.
    """
    out = {}
    vllm = _by_key(passes["vllm"]["records"]) if "vllm" in passes else {}
    for subset in ("all", "recomputed"):
        keys = {k for k, r in vllm.items() if r["history_tokens"] >= LONG_HISTORY
                and (subset == "all" or r["cached_tokens"] < r["history_tokens"] / 2)}
        row = {"n": len(keys)}
        for label, p in passes.items():
            recs = [r for k, r in _by_key(p["records"]).items() if k in keys]
            row[label] = _summary(recs)
        ems_p50 = row.get("ems", {}).get("ttft_p50_s")
        row["ems_over_recompute"] = _ratio(ems_p50, row.get("vllm", {}).get("ttft_p50_s"))
        row["ems_over_native"] = _ratio(ems_p50, row.get("native", {}).get("ttft_p50_s"))
        ems_prefill = row.get("ems", {}).get("prefill_p50_s")
        row["prefill_ems_over_recompute"] = _ratio(
            ems_prefill, row.get("vllm", {}).get("prefill_p50_s"))
        row["prefill_ems_over_native"] = _ratio(
            ems_prefill, row.get("native", {}).get("prefill_p50_s"))
        out[subset] = row
    out["target_ems_over_recompute"] = TARGET_VS_RECOMPUTE
    out["goal_ems_over_native"] = GOAL_VS_NATIVE
    return out


def isolated(passes):
    """Summarise the probes: long-history prompts timed alone after each replay.

    Per pass: TTFT p50 (s), mean cached tokens, and how many probes' first token differs from
    the reply the same request got during the replay (expected 0). Ratios use the p50s of
    the same prompts in each pass.
    """
    out = {}
    for label, p in passes.items():
        probes = p.get("probes") or []
        replies = _by_key(p["records"])
        differ = sum(q["first_id"] != replies[(q["session"], q["turn"])]["output_ids"][:1]
                     for q in probes)
        out[label] = dict(n=len(probes), ttft_p50_s=_pct([q["ttft_s"] for q in probes], 50),
                          ttft_p90_s=_pct([q["ttft_s"] for q in probes], 90),
                          mean_cached_tokens=float(np.mean([q["cached_tokens"] for q in probes]))
                          if probes else None,
                          mean_prompt_tokens=float(np.mean([q["prompt_tokens"] for q in probes]))
                          if probes else None,
                          first_token_differs=differ)
    ems_p50 = out.get("ems", {}).get("ttft_p50_s")
    out["ems_over_recompute"] = _ratio(ems_p50, out.get("vllm", {}).get("ttft_p50_s"))
    out["ems_over_native"] = _ratio(ems_p50, out.get("native", {}).get("ttft_p50_s"))
    return out


def build_report(passes):
    """Build the JSON-ready report: per pass and per turn index, mismatches, long history."""
    report = {"passes": {}, "per_turn": {}}
    for label, p in passes.items():
        recs = p["records"]
        report["passes"][label] = dict(
            overall=_summary(recs), requests_per_s=p["requests_per_s"], wall_s=p["wall_s"],
            startup_s=p["startup_s"], warmup_s=p["warmup_s"], pass_cpu_s=p["pass_cpu_s"],
            other_cpu_s=p["other_cpu_s"],
            prompt_tokens_by_source=p["prompt_tokens_by_source"], ems=p["ems"],
            config=p["config"])
        turns = sorted({r["turn"] for r in recs})
        report["per_turn"][label] = {t: _summary([r for r in recs if r["turn"] == t])
                                     for t in turns}
    if "vllm" in passes and "ems" in passes:
        report["mismatches_vllm_vs_ems"] = mismatches(passes["vllm"], passes["ems"])
    if "vllm" in passes and "native" in passes:
        report["mismatches_vllm_vs_native"] = mismatches(passes["vllm"], passes["native"])
    report["long_history"] = long_history(passes)
    report["isolated"] = isolated(passes)
    return report


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _pct_str(rate):
    return "-" if rate is None else f"{rate * 100:.0f}"


def _row(head, cells_ms, rates):
    line = f"{head} | " + " ".join(f"{c:>7}" for c in cells_ms)
    if rates is not None:
        line += " | " + " ".join(f"{r:>6}" for r in rates)
    return line


def _tokens(value):
    """Format a mean token count in 5 columns, or '-' when there were no requests."""
    return f"{'-':>5}" if value is None else f"{value:>5.0f}"


def table(report):
    """Format TTFT p50 (ms) and cache hit rate per turn index and overall as a text table."""
    labels = list(report["passes"])
    first = report["per_turn"][labels[0]]
    lines = [_row(f"{'turn':>4} {'n':>4} {'hist':>5} {'TTFT':>4}", labels, labels)]
    lines.append("-" * len(lines[0]))

    for t in first:
        rows = [report["per_turn"][l].get(t) for l in labels]
        head = f"{t:>4} {first[t]['n']:>4} {_tokens(first[t]['mean_history_tokens'])} {'p50':>4}"
        lines.append(_row(head, [_ms(r and r["ttft_p50_s"]) for r in rows],
                          [_pct_str(r and r["hit_rate"]) for r in rows]))

    overall = [report["passes"][l]["overall"] for l in labels]
    lines.append("-" * len(lines[0]))
    head = f"{'all':>4} {overall[0]['n']:>4} {_tokens(overall[0]['mean_history_tokens'])}"
    lines.append(_row(head + f" {'p50':>4}", [_ms(o["ttft_p50_s"]) for o in overall],
                      [_pct_str(o["hit_rate"]) for o in overall]))
    lines.append(_row(f"{'':15} {'p90':>4}", [_ms(o["ttft_p90_s"]) for o in overall], None))
    lines.append("columns: TTFT in ms, then prompt tokens found cached in %; hist = mean "
                 "history tokens")
    lines.append("requests/s: " + ", ".join(
        f"{l} {report['passes'][l]['requests_per_s']:.2f}" for l in labels))

    for label in labels:
        counters = (report["passes"][label]["ems"] or {}).get("kv_connector_stats") or {}
        if "disk_reads" in counters:
            lines.append(_tier_line(label, counters))

    for subset, lh in report["long_history"].items():
        if not isinstance(lh, dict) or not lh["n"]:
            continue
        present = [l for l in labels if l in lh]
        p50 = ", ".join(f"{l} {_ms(lh[l]['ttft_p50_s'])}" for l in present)
        prefill = ", ".join(f"{l} {_ms(lh[l]['prefill_p50_s'])}" for l in present)
        lines.append(f"history >= {LONG_HISTORY} tokens, {subset} (n={lh['n']}): TTFT p50 ms "
                     f"{p50}; prefill p50 ms (no queueing) {prefill}")
        lines.append(f"  EMS/recompute {_fmt(lh['ems_over_recompute'])} (target <= "
                     f"{TARGET_VS_RECOMPUTE}; prefill {_fmt(lh['prefill_ems_over_recompute'])}),"
                     f" EMS/native {_fmt(lh['ems_over_native'])} (goal <= {GOAL_VS_NATIVE}; "
                     f"prefill {_fmt(lh['prefill_ems_over_native'])})")

    iso = report["isolated"]
    present = [l for l in labels if iso[l]["n"]]
    if present:
        lines.append(f"history >= {LONG_HISTORY} tokens, each prompt alone (n={iso[present[0]]['n']}"
                     "): TTFT p50 ms " + ", ".join(
                         f"{l} {_ms(iso[l]['ttft_p50_s'])} (cached {iso[l]['mean_cached_tokens']:.0f}"
                         f"/{iso[l]['mean_prompt_tokens']:.0f})" for l in present))
        lines.append(f"  EMS/recompute {_fmt(iso['ems_over_recompute'])} (target <= "
                     f"{TARGET_VS_RECOMPUTE}), EMS/native {_fmt(iso['ems_over_native'])} (goal <= "
                     f"{GOAL_VS_NATIVE}); first tokens differing from the replay: "
                     + ", ".join(f"{l} {iso[l]['first_token_differs']}" for l in present))

    for name in ("mismatches_vllm_vs_ems", "mismatches_vllm_vs_native"):
        if name in report:
            m = report[name]
            lines.append(f"{name}: {m['mismatched']} of {m['compared']} replies differ "
                         f"({m['prompts_differ']} prompts differ)")
    return "\n".join(lines)


def _tier_line(label, counters):
    """Format where an EMS pass's loads came from (counts are EMS blocks, one per layer)."""
    loaded = counters.get("blocks_loaded", 0)
    return (f"{label}: {loaded} vLLM blocks loaded from EMS, {counters['disk_reads']} block "
            f"layers read from disk on load, {counters.get('prefetched', 0)} prefetched, "
            f"{counters.get('spills', 0)} spilled, {counters.get('spill_dropped', 0)} "
            "evictions not spilled")


def _fmt(x):
    return "-" if x is None else f"{x:.3f}"


def plot(passes, path):
    """Plot TTFT (ms, log scale) against history length (tokens), one series per pass."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, p in passes.items():
        recs = p["records"]
        ax.scatter([r["history_tokens"] for r in recs], [r["ttft_s"] * 1000 for r in recs],
                   s=12, alpha=0.7, label=label)
    ax.set_xlabel("history length (tokens)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_yscale("log")
    ax.axvline(LONG_HISTORY, color="grey", linewidth=0.8, linestyle=":")
    ax.legend()
    ax.set_title("Time to first token per request")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
