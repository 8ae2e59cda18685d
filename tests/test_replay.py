"""ems.replay without an engine: sessions, report, the runner's pure helpers and the CLI.

Sessions come from the real chitchat-dataset and from small hand-made conversations whose
think times and lengths are known. Report inputs are hand-made pass records whose
percentiles are worked out in the comments. The CLI test replaces `run_pass_in_child` with a
function that returns such records, so no vLLM engine starts.
"""
import dataclasses
import datetime
import json
import os
import random
import statistics
import types

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
chitchat_dataset = pytest.importorskip("chitchat_dataset")

import ems.replay.__main__ as cli  # noqa: E402
import tiny_model  # noqa: E402
from ems.replay import dataset as ds  # noqa: E402
from ems.replay import report as rep  # noqa: E402
from ems.replay import runner  # noqa: E402
from ems.tools.build_model import render_ids  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPOCH = datetime.datetime(2018, 5, 2, tzinfo=datetime.timezone.utc)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tiny_model.tiny_model(tmp_path_factory)[0]


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


# ---------------------------------------------------------------------------------------------
# Hand-made conversations in the chitchat-dataset layout

def stamp(seconds):
    """Return the dataset's ISO-8601 UTC stamp `seconds` after EPOCH."""
    moment = EPOCH + datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_conversation(*turns):
    """Build a conversation from (sender, [(text, seconds), ...]) turns."""
    return {"messages": [[{"text": text, "timestamp": stamp(seconds), "sender": sender}
                          for text, seconds in utterances]
                         for sender, utterances in turns]}


def make_chat(messages, words, start=0):
    """Build `messages` alternating turns of `words` words each, 10 s apart."""
    turns = []
    for i in range(messages):
        sender = "a" if i % 2 == 0 else "b"
        text = " ".join(f"w{start + i}x{j}" for j in range(words))
        turns.append((sender, [(text, 10 * i)]))
    return make_conversation(*turns)


# Think time is the user's first utterance minus the other side's last one:
#   turn 1: 100 - 30 = 70 s
#   turn 2: 125 - 130 < 0, so 0 s
#   turn 3: 200 - 140 = 60 s
GAPS = [0.0, 70.0, 0.0, 60.0]
TIMED = make_conversation(
    ("a", [("hello there", 0), ("are you around?", 5)]),
    ("b", [("yes I am", 20), ("what's up", 30)]),
    ("a", [("not much, just bored", 100)]),
    ("b", [("same here honestly", 110), ("it is raining", 130)]),
    ("a", [("do you like rain", 125)]),
    ("b", [("not really", 140)]),
    ("a", [("me neither", 200)]),
)


def rendered_messages(conversation, history):
    """Return the message dicts build_session renders for `conversation` in mode `history`."""
    return [{"role": role, "content": text if role == "user" or history == "dataset" else ""}
            for role, text, _, _ in ds._messages(conversation)]


def prompt_lengths(tokenizer, conversation, history, max_tokens):
    """Return each turn's prompt length as the runner sends it, replies included."""
    messages = rendered_messages(conversation, history)
    out = []
    for k, end in enumerate(range(1, len(messages) + 1, 2)):
        replies = k * max_tokens if history == "generated" else 0
        out.append(len(render_ids(tokenizer, messages[:end])) + replies)
    return out


# ---------------------------------------------------------------------------------------------
# dataset.py

def test_messages_merge_same_sender():
    conversation = make_conversation(("a", [("one", 0)]), ("b", [("two", 10)]),
                        ("b", [("three", 20), ("four", 25)]), ("a", [("five", 40)]))
    messages = ds._messages(conversation)
    assert [m[0] for m in messages] == ["user", "assistant", "user"]
    assert messages[1][1] == "two\nthree\nfour"
    assert messages[1][2] == pytest.approx(EPOCH.timestamp() + 10)
    assert messages[1][3] == pytest.approx(EPOCH.timestamp() + 25)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.001])
def test_session_think_times_scaled(tokenizer, scale):
    session = ds.build_session("t", TIMED, tokenizer, "dataset", 10, 10_000, 16, scale)
    assert [t.index for t in session.turns] == [0, 1, 2, 3]
    for turn, gap in zip(session.turns, GAPS):
        assert turn.think_s >= 0
        assert turn.think_s == pytest.approx(gap * scale)


@pytest.mark.parametrize("history", ["dataset", "generated"])
def test_session_ids_extend_prompts(tokenizer, history):
    session = ds.build_session("t", TIMED, tokenizer, history, 10, 10_000, 16, 1.0)
    messages = rendered_messages(TIMED, history)
    assert session.history == history

    prompt = []
    for turn, end in zip(session.turns, range(1, len(messages) + 1, 2)):
        assert turn.new_ids
        assert all(0 <= i < len(tokenizer) for i in turn.new_ids)
        prompt += turn.new_ids
        assert prompt == render_ids(tokenizer, messages[:end])
        text = tokenizer.apply_chat_template(messages[:end], tokenize=False,
                                             add_generation_prompt=True)
        assert tokenizer.decode(prompt) == text

    decoded = tokenizer.decode(prompt)
    assert "me neither" in decoded
    # The dataset's replies reach the prompts only in "dataset" mode.
    assert ("it is raining" in decoded) == (history == "dataset")


def test_session_stops_at_max_requests(tokenizer):
    for limit in (1, 2, 3):
        session = ds.build_session("t", TIMED, tokenizer, "dataset", limit, 10_000, 16, 1.0)
        assert len(session.turns) == limit


@pytest.mark.parametrize("history", ["dataset", "generated"])
def test_session_stops_at_max_prompt_tokens(tokenizer, history):
    lengths = prompt_lengths(tokenizer, TIMED, history, 16)
    assert all(a < b for a, b in zip(lengths, lengths[1:]))
    for k, length in enumerate(lengths):
        fits = ds.build_session("t", TIMED, tokenizer, history, 10, length, 16, 1.0)
        assert len(fits.turns) == k + 1
        short = ds.build_session("t", TIMED, tokenizer, history, 10, length - 1, 16, 1.0)
        assert len(short.turns) == k


def use_dataset(monkeypatch, data):
    monkeypatch.setattr(chitchat_dataset, "Dataset", lambda: data)


def test_load_sessions_ranks_and_filters(tokenizer, monkeypatch):
    data = {
        "few-words": make_chat(12, 3, start=0),
        "many-words": make_chat(12, 9, start=100),
        "mid-words": make_chat(12, 6, start=200),
        "too-short": make_chat(5, 30, start=300),        # 3 requests, under MIN_REQUESTS
    }
    use_dataset(monkeypatch, data)
    sessions = ds.load_sessions(tokenizer, 5, "dataset", 5, 10_000, 16, 1.0)
    assert [s.uuid for s in sessions] == ["many-words", "mid-words", "few-words"]
    assert all(len(s.turns) == 5 for s in sessions)

    two = ds.load_sessions(tokenizer, 2, "dataset", 5, 10_000, 16, 1.0)
    assert [s.uuid for s in two] == ["many-words", "mid-words"]


@pytest.mark.parametrize("count", [0, -1])
def test_load_sessions_zero_count(tokenizer, monkeypatch, count):
    use_dataset(monkeypatch, {f"c{i}": make_chat(10, 4, start=10 * i) for i in range(3)})
    assert ds.load_sessions(tokenizer, count, "dataset", 5, 10_000, 16, 1.0) == []


def test_load_sessions_chitchat(tokenizer):
    args = dict(num_sessions=3, history="generated", max_requests=6, max_prompt_tokens=2032,
                max_tokens=16)
    sessions = ds.load_sessions(tokenizer, think_scale=0.001, **args)
    again = ds.load_sessions(tokenizer, think_scale=0.001, **args)
    slow = ds.load_sessions(tokenizer, think_scale=1.0, **args)
    assert sessions == again

    assert len(sessions) == 3
    assert len({s.uuid for s in sessions}) == 3
    for session in sessions:
        assert session.history == "generated"
        assert ds.MIN_REQUESTS <= len(session.turns) <= 6
        total = sum(len(t.new_ids) for t in session.turns) + 16 * (len(session.turns) - 1)
        assert total <= 2032
        assert session.turns[0].think_s == 0
        for turn in session.turns:
            assert turn.think_s >= 0
            assert all(0 <= i < len(tokenizer) for i in turn.new_ids)

    # The scale changes the think times only, in proportion.
    assert [s.uuid for s in slow] == [s.uuid for s in sessions]
    thinks = 0
    for fast_s, slow_s in zip(sessions, slow):
        for fast_t, slow_t in zip(fast_s.turns, slow_s.turns, strict=True):
            assert fast_t.new_ids == slow_t.new_ids
            assert fast_t.think_s == pytest.approx(slow_t.think_s * 0.001)
            thinks += slow_t.think_s > 0
    assert thinks > 0


# ---------------------------------------------------------------------------------------------
# report.py

def record(session, turn, ttft, history=0, prompt=None, cached=0, output=(5, 6), digest=None,
           engine=None, prefill=None):
    """Build a request record with the fields runner._serve writes."""
    prompt = history + 10 if prompt is None else prompt
    return dict(session=session, turn=turn, ttft_s=ttft, ttft_engine_s=engine, prefill_s=prefill,
                queue_s=None, preemptions=0, history_tokens=history, prompt_tokens=prompt,
                cached_tokens=cached, computed_tokens=prompt - cached, output_ids=list(output),
                prompt_digest=digest or f"{session}/{turn}")


def make_pass(label, records, probes=()):
    """Build a pass record as run_pass_in_child returns it."""
    return dict(label=label, records=records, probes=list(probes), requests_per_s=2.0,
                wall_s=len(records) / 2.0, startup_s=1.0, warmup_s=0.5, pass_wall_s=5.0,
                pass_cpu_s=3.0, other_cpu_s=0.0, prompt_tokens_by_source={"computed": 1},
                ems=None, config={"label": label})


def test_summary_percentiles_interpolate():
    # numpy's linear rule: p50 of 0.1..0.4 sits halfway between 0.2 and 0.3 = 0.25, and
    # p90 sits at rank 0.9 * 3 = 2.7, so 0.3 + 0.7 * 0.1 = 0.37.
    records = [record("s", 0, 0.4, engine=0.07, prefill=0.01), record("s", 1, 0.1),
               record("s", 2, 0.3, engine=0.05), record("s", 3, 0.2, prefill=0.03)]
    summary = rep._summary(records)
    assert summary["n"] == 4
    assert summary["ttft_p50_s"] == pytest.approx(0.25)
    assert summary["ttft_p90_s"] == pytest.approx(0.37)
    # Records without engine metrics are left out: p50 of 0.05 and 0.07, and of 0.01 and 0.03.
    assert summary["ttft_engine_p50_s"] == pytest.approx(0.06)
    assert summary["prefill_p50_s"] == pytest.approx(0.02)


def test_summary_odd_count_picks_ranks():
    # 11 values: p50 is the 6th smallest and p90 the 10th, with no interpolation.
    ttfts = [0.07, 0.11, 0.01, 0.05, 0.09, 0.03, 0.10, 0.02, 0.08, 0.04, 0.06]
    summary = rep._summary([record("s", i, t) for i, t in enumerate(ttfts)])
    assert summary["ttft_p50_s"] == pytest.approx(0.06)
    assert summary["ttft_p90_s"] == pytest.approx(0.10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.001, 10.0), min_size=2, max_size=40))
def test_summary_percentiles_match_statistics(ttfts):
    summary = rep._summary([record("s", i, t) for i, t in enumerate(ttfts)])
    deciles = statistics.quantiles(ttfts, n=10, method="inclusive")
    assert summary["ttft_p50_s"] == pytest.approx(deciles[4])
    assert summary["ttft_p90_s"] == pytest.approx(deciles[8])


def test_summary_tokens_and_hit_rate():
    records = [record("s", 0, 0.1, history=0, prompt=300, cached=0),
               record("s", 1, 0.1, history=316, prompt=400, cached=256),
               record("s", 2, 0.1, history=416, prompt=500, cached=384)]
    summary = rep._summary(records)
    assert summary["prompt_tokens"] == 1200
    assert summary["cached_tokens"] == 640
    assert summary["computed_tokens"] == 560
    assert summary["hit_rate"] == pytest.approx(640 / 1200)
    assert summary["mean_history_tokens"] == pytest.approx((316 + 416) / 3)

    empty = rep._summary([])
    assert empty["n"] == 0
    assert empty["ttft_p50_s"] is None
    assert empty["hit_rate"] is None


def test_report_per_turn():
    records = [record("a", 0, 0.1, prompt=100, cached=0),
               record("b", 0, 0.3, prompt=100, cached=0),
               record("a", 1, 0.5, prompt=200, cached=100),
               record("b", 1, 0.7, prompt=200, cached=50)]
    report = rep.build_report({"vllm": make_pass("vllm", records)})
    per_turn = report["per_turn"]["vllm"]
    assert sorted(per_turn) == [0, 1]
    assert per_turn[0]["n"] == 2
    assert per_turn[0]["ttft_p50_s"] == pytest.approx(0.2)
    assert per_turn[0]["hit_rate"] == 0
    assert per_turn[1]["ttft_p50_s"] == pytest.approx(0.6)
    assert per_turn[1]["hit_rate"] == pytest.approx(150 / 400)
    assert report["passes"]["vllm"]["overall"]["n"] == 4
    assert report["passes"]["vllm"]["requests_per_s"] == 2.0


# Long-history records: (history, cached by the vllm pass, TTFT and prefill per pass).
# Keys k0 and k1 have less than half of their history cached in the vllm pass, so they are
# the "recomputed" subset. Four more requests sit one token under LONG_HISTORY with a TTFT
# of 50 s, which would move every p50 if the filter let them in.
LONG = [
    # history, cached, vllm (ttft, prefill), ems (ttft, prefill), native (ttft, prefill)
    (1024, 0, (0.30, 0.20), (0.03, 0.02), (0.02, 0.010)),
    (1500, 100, (0.50, 0.40), (0.06, 0.04), (0.03, 0.020)),
    (2000, 1500, (0.40, 0.30), (0.05, 0.03), (0.02, 0.015)),
]


def long_history_passes():
    passes = {}
    for p, label in enumerate(("vllm", "ems", "native")):
        records = []
        for i, (history, cached, *timings) in enumerate(LONG):
            ttft, prefill = timings[p]
            records.append(record(f"k{i}", 3, ttft, history=history, cached=cached,
                               prefill=prefill))
        for i in range(4):
            records.append(record(f"short{i}", 3, 50.0, history=1023, prefill=40.0))
        passes[label] = make_pass(label, records)
    return passes


def test_long_history_filter_and_ratios():
    assert rep.LONG_HISTORY == 1024
    result = rep.long_history(long_history_passes())

    full = result["all"]
    assert full["n"] == 3
    # p50 of three values is the middle one.
    assert full["vllm"]["ttft_p50_s"] == pytest.approx(0.40)
    assert full["ems"]["ttft_p50_s"] == pytest.approx(0.05)
    assert full["native"]["ttft_p50_s"] == pytest.approx(0.02)
    assert full["ems_over_recompute"] == pytest.approx(0.05 / 0.40)
    assert full["ems_over_native"] == pytest.approx(0.05 / 0.02)
    assert full["prefill_ems_over_recompute"] == pytest.approx(0.03 / 0.30)
    assert full["prefill_ems_over_native"] == pytest.approx(0.03 / 0.015)

    recomputed = result["recomputed"]
    assert recomputed["n"] == 2
    assert recomputed["vllm"]["ttft_p50_s"] == pytest.approx(0.40)       # 0.30, 0.50
    assert recomputed["ems"]["ttft_p50_s"] == pytest.approx(0.045)       # 0.03, 0.06
    assert recomputed["native"]["ttft_p50_s"] == pytest.approx(0.025)    # 0.02, 0.03
    assert recomputed["ems_over_recompute"] == pytest.approx(0.045 / 0.40)
    assert recomputed["ems_over_native"] == pytest.approx(0.045 / 0.025)

    assert result["target_ems_over_recompute"] == rep.TARGET_VS_RECOMPUTE
    assert result["goal_ems_over_native"] == rep.GOAL_VS_NATIVE


def test_long_history_without_ems():
    passes = long_history_passes()
    del passes["ems"]
    result = rep.long_history(passes)
    assert result["all"]["n"] == 3
    assert result["all"]["ems_over_recompute"] is None
    assert result["all"]["ems_over_native"] is None


def test_mismatches_counted():
    a = [record("s", 0, 0.1, output=[1, 2]),                   # same reply, same prompt
         record("s", 1, 0.1, output=[3, 4]),                   # reply differs, same prompt
         record("s", 2, 0.1, output=[5, 6], digest="x"),       # reply and prompt differ
         record("s", 3, 0.1, output=[7, 8], digest="y"),       # prompt differs only
         record("only-a", 0, 0.1)]                             # not in b
    b = [record("s", 0, 0.2, output=[1, 2]),
         record("s", 1, 0.2, output=[3, 9]),
         record("s", 2, 0.2, output=[5, 7], digest="x2"),
         record("s", 3, 0.2, output=[7, 8], digest="y2")]
    result = rep.mismatches(make_pass("vllm", a), make_pass("ems", b))
    assert result["compared"] == 4
    assert result["mismatched"] == 2
    assert result["prompts_differ"] == 2
    assert len(result["first_mismatches"]) == 1
    first = result["first_mismatches"][0]
    assert (first["session"], first["turn"]) == ("s", 1)
    assert first["a"] == [3, 4]
    assert first["b"] == [3, 9]


def test_mismatches_lists_five_origins():
    a = [record(f"s{i}", 0, 0.1, output=[1]) for i in range(7)]
    b = [record(f"s{i}", 0, 0.1, output=[2]) for i in range(7)]
    result = rep.mismatches(make_pass("vllm", a), make_pass("ems", b))
    assert result["mismatched"] == 7
    assert len(result["first_mismatches"]) == 5


def test_report_compares_present_passes():
    same = [record("s", 0, 0.1, output=[1])]
    other = [record("s", 0, 0.1, output=[2])]
    report = rep.build_report({"vllm": make_pass("vllm", same), "ems": make_pass("ems", other)})
    assert report["mismatches_vllm_vs_ems"]["mismatched"] == 1
    assert "mismatches_vllm_vs_native" not in report
    assert "mismatches_vllm_vs_ems: 1 of 1 replies differ" in rep.table(report)

    alone = rep.build_report({"native": make_pass("native", same)})
    assert not any(key.startswith("mismatches") for key in alone)


def test_isolated_probes():
    records = [record("s", t, 0.1, history=1100 * t, output=[10 + t, 99]) for t in range(1, 4)]
    probes = {
        "vllm": [dict(session="s", turn=t, ttft_s=0.1 * t, cached_tokens=0, prompt_tokens=1200,
                      first_id=[10 + t]) for t in range(1, 4)],
        "ems": [dict(session="s", turn=t, ttft_s=0.01 * t, cached_tokens=1024,
                     prompt_tokens=1200, first_id=[10 + t if t != 2 else 77])
                for t in range(1, 4)],
    }
    passes = {label: make_pass(label, records, probes[label]) for label in probes}
    passes["native"] = make_pass("native", records)        # a pass without probes
    result = rep.isolated(passes)

    assert result["vllm"]["n"] == 3
    assert result["vllm"]["ttft_p50_s"] == pytest.approx(0.2)
    assert result["vllm"]["ttft_p90_s"] == pytest.approx(0.28)     # 0.2 + 0.8 * 0.1
    assert result["vllm"]["first_token_differs"] == 0
    assert result["ems"]["first_token_differs"] == 1
    assert result["ems"]["mean_cached_tokens"] == 1024
    assert result["ems"]["mean_prompt_tokens"] == 1200
    assert result["ems_over_recompute"] == pytest.approx(0.1)
    assert result["native"]["n"] == 0
    assert result["ems_over_native"] is None


def test_report_json_ready():
    report = rep.build_report(long_history_passes())
    decoded = json.loads(json.dumps(report))
    assert set(decoded) == set(report)
    assert decoded["long_history"]["all"]["n"] == 3
    # JSON object keys are strings, so turn indexes come back as "3".
    assert set(decoded["per_turn"]["vllm"]) == {"3"}


def test_table_lists_passes_and_turns():
    passes = long_history_passes()
    passes["vllm"]["records"].append(record("k0", 4, 0.2, history=500))
    report = rep.build_report(passes)
    text = rep.table(report)
    lines = text.splitlines()

    header = lines[0].split()
    for label in ("vllm", "ems", "native"):
        assert header.count(label) == 2, label         # a TTFT and a hit-rate column each
    turn_rows = [line.split()[0] for line in lines[2:] if line.split()[0].isdigit()]
    assert turn_rows == ["3", "4"]
    assert any(line.startswith(" all") for line in lines)
    assert any(line.split()[:1] == ["p90"] for line in lines)
    assert f"history >= {rep.LONG_HISTORY} tokens, all (n=3)" in text
    assert f"EMS/recompute {0.05 / 0.40:.3f}" in text
    assert "mismatches_vllm_vs_native" in text


def test_table_pass_without_requests():
    report = rep.build_report({"vllm": make_pass("vllm", [])})
    assert "vllm" in rep.table(report)


def test_plot_writes_png(tmp_path):
    path = tmp_path / "replay.png"
    rep.plot(long_history_passes(), str(path))
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1000


# ---------------------------------------------------------------------------------------------
# runner.py

def history_records(histories):
    return [dict(session=f"s{i % 5}", turn=i, history_tokens=h) for i, h in enumerate(histories)]


def test_probe_keys_spread():
    records = history_records([2000] * 10 + [10] * 6)
    eligible = sorted((r["session"], r["turn"]) for r in records if r["history_tokens"] >= 1024)
    keys = runner.probe_keys(records, 1024, 4)
    # Indexes i * 10 // 4 for i = 0..3.
    assert keys == [eligible[0], eligible[2], eligible[5], eligible[7]]
    assert runner.probe_keys(records, 1024, 10) == eligible
    assert runner.probe_keys(records, 1024, 50) == eligible
    assert runner.probe_keys(records, 1024, 0) == []
    assert runner.probe_keys(records, 5000, 4) == []


@settings(max_examples=100, deadline=None)
@given(histories=st.lists(st.integers(0, 3000), max_size=60), min_history=st.integers(0, 3000),
       count=st.integers(1, 20), seed=st.randoms(use_true_random=False))
@example(histories=[2000] * 12 + [0] * 3, min_history=1024, count=3, seed=random.Random(1))
def test_probe_keys_properties(histories, min_history, count, seed):
    records = history_records(histories)
    eligible = sorted((r["session"], r["turn"]) for r in records
                      if r["history_tokens"] >= min_history)
    keys = runner.probe_keys(records, min_history, count)

    assert len(keys) == min(count, len(eligible))
    assert keys == sorted(set(keys))
    assert set(keys) <= set(eligible)
    # The picks span the list: the first key, and a last one among the final
    # ceil(len(eligible) / count) keys.
    if keys:
        assert keys[0] == eligible[0]
        assert eligible.index(keys[-1]) >= len(eligible) - -(-len(eligible) // count)
    # Evenly spread: neighbouring picks lie floor or ceil of len(eligible) / count apart.
    positions = [eligible.index(k) for k in keys]
    steps = {b - a for a, b in zip(positions, positions[1:])}
    assert steps <= {len(eligible) // count, -(-len(eligible) // count)}

    # Record order and unrelated fields do not change the choice.
    shuffled = [dict(r, ttft_s=seed.random()) for r in records]
    seed.shuffle(shuffled)
    assert runner.probe_keys(shuffled, min_history, count) == keys


@dataclasses.dataclass
class Metrics:
    """The fields of vLLM's RequestStateStats that _engine_times reads."""
    queued_ts: float
    scheduled_ts: float
    first_token_ts: float
    first_token_latency: float
    num_preemptions: int


def test_engine_times_none():
    times = runner._engine_times(None)
    assert set(times) == {"ttft_engine_s", "queue_s", "prefill_s", "preemptions"}
    assert all(v is None for v in times.values())


def test_engine_times_split():
    metrics = Metrics(queued_ts=100.0, scheduled_ts=100.25, first_token_ts=100.75,
                      first_token_latency=0.9, num_preemptions=2)
    times = runner._engine_times(metrics)
    assert times["queue_s"] == pytest.approx(0.25)
    assert times["prefill_s"] == pytest.approx(0.5)
    assert times["ttft_engine_s"] == 0.9
    assert times["preemptions"] == 2


def test_engine_times_fields_exist_in_vllm():
    """The installed vLLM's RequestStateStats declares every field _engine_times reads."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vllm is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "v1", "metrics", "stats.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    classes = [n for n in tree.body
               if isinstance(n, ast.ClassDef) and n.name == "RequestStateStats"]
    assert len(classes) == 1
    fields = {n.target.id for n in classes[0].body if isinstance(n, ast.AnnAssign)}
    assert {f.name for f in dataclasses.fields(Metrics)} <= fields


def test_digest_distinguishes_ids():
    ids = list(range(100, 600))
    assert runner._digest(ids) == runner._digest(list(ids))
    assert len(runner._digest(ids)) == 16
    assert runner._digest(ids) != runner._digest(ids[:-1])
    assert runner._digest(ids) != runner._digest(ids[:-1] + [ids[-1] + 1])
    assert runner._digest([1, 2]) != runner._digest([12])
    assert runner._digest([]) != runner._digest([0])


def test_plain_json_ready():
    value = {"pool": {"bytes": 5, "tiers": (1, 2)}, 3: types.SimpleNamespace(x=1), "f": 0.5}
    plain = runner._plain(value)
    assert plain["pool"] == {"bytes": 5, "tiers": [1, 2]}
    assert plain["3"] == repr(types.SimpleNamespace(x=1))
    assert plain["f"] == 0.5
    assert json.loads(json.dumps(plain)) == plain


def test_set_engine_env(monkeypatch):
    # setenv first, so monkeypatch restores each variable, including absent ones.
    for name in list(runner.ENGINE_ENV) + ["VLLM_LOGGING_LEVEL"]:
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    runner.set_engine_env()
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    assert os.environ["VLLM_HOST_IP"] == "127.0.0.1"
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"

    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    runner.set_engine_env(verbose=True)
    assert "VLLM_LOGGING_LEVEL" not in os.environ


# ---------------------------------------------------------------------------------------------
# __main__.py

def test_parse_args_defaults():
    args = cli.parse_args(["--model", "m"])
    assert args.model == "m"
    assert args.sessions > 0
    assert args.max_turns >= ds.MIN_REQUESTS
    assert args.in_flight > 0
    assert args.think_scale >= 0
    assert 0 < args.max_tokens < args.max_model_len
    assert args.kv_tokens >= args.max_model_len
    assert args.pool_bytes is None
    assert args.probes > 0
    assert args.dtype in cli.DTYPE_BYTES
    assert args.history in ("generated", "dataset")
    assert args.passes.split(",") == list(cli.PASSES)


@pytest.mark.parametrize("argv, value", [
    ([], "--model"),
    (["--model", "m", "--dtype", "int8"], "int8"),
    (["--model", "m", "--history", "replies"], "replies"),
    (["--model", "m", "--sessions", "many"], "many"),
])
def test_parse_args_rejects(argv, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    assert value in capsys.readouterr().err


# Values that parse_args accepts although the replay cannot run with them.
OUT_OF_RANGE = [
    (["--in-flight", "0"], "0"),            # no session worker would run
    (["--sessions", "0"], "0"),
    (["--sessions", "-1"], "-1"),
    (["--max-turns", "3"], "3"),            # under MIN_REQUESTS: no session qualifies
    (["--max-tokens", "0"], "0"),           # vLLM rejects max_tokens 0 after the engine starts
    (["--think-scale", "-1"], "-1"),        # negative think times
    (["--probes", "-1"], "-1"),
    (["--in-flight", "two"], "two"),
]


@pytest.mark.parametrize("extra, value", OUT_OF_RANGE)
def test_parse_args_rejects_range(extra, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--model", "m"] + extra)
    assert exit_info.value.code == 2
    assert value in capsys.readouterr().err


def test_main_rejects_unknown_pass(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(tmp_path / "missing"), "--passes", "vllm,bogus"])
    assert "bogus" in str(exit_info.value.code)


def test_main_rejects_empty_passes(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(tmp_path / "missing"), "--passes", ",",
                  "--out", str(tmp_path / "out")])
    assert "--passes" in str(exit_info.value.code)


def test_main_rejects_small_kv(tiny_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", tiny_dir, "--sessions", "1", "--max-turns", "4",
                  "--kv-tokens", "1000", "--max-model-len", "2048",
                  "--out", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert "--kv-tokens 1000" in message
    assert "2048" in message


def write_config(tmp_path, **fields):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    return str(tmp_path)


def test_kv_bytes_per_token(tmp_path):
    # 3 layers * (K and V) * 2 KV heads * 16 dims * 2 bytes = 384.
    model = write_config(tmp_path, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                         hidden_size=1024, num_attention_heads=8)
    assert cli.kv_bytes_per_token(model, "bfloat16") == 384
    assert cli.kv_bytes_per_token(model, "float32") == 768
    # Without head_dim: hidden_size / num_attention_heads = 128, so 3 * 2 * 2 * 128 * 4.
    model = write_config(tmp_path, num_hidden_layers=3, num_key_value_heads=2, head_dim=None,
                         hidden_size=1024, num_attention_heads=8)
    assert cli.kv_bytes_per_token(model, "float32") == 6144


def fake_pass_runner(calls):
    """Return a stand-in for run_pass_in_child that records its calls and times nothing."""
    def run(config, sessions, path):
        label = config["label"]
        calls.append((config, sessions))
        records = []
        for session in sessions:
            history = 0
            for turn in session.turns:
                prompt = history + len(turn.new_ids)
                ttft = {"vllm": 0.1, "ems": 0.02, "native": 0.01}[label] + history * 1e-5
                records.append(record(session.uuid, turn.index, ttft, history=history,
                                   prompt=prompt, cached=history if label != "vllm" else 0,
                                   output=[7] * config["max_tokens"]))
                history = prompt + config["max_tokens"]
        return make_pass(label, records)
    return run


def test_main_writes_outputs(tiny_dir, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "run_pass_in_child", fake_pass_runner(calls))
    out = str(tmp_path / "results" / "replay")
    assert cli.main(["--model", tiny_dir, "--sessions", "2", "--max-turns", "5",
                     "--max-tokens", "8", "--out", out]) == 0

    assert [config["label"] for config, _ in calls] == list(cli.PASSES)
    assert all(sessions == calls[0][1] for _, sessions in calls)
    configs = {config["label"]: config for config, _ in calls}
    assert configs["vllm"]["kv_cache_bytes"] == configs["ems"]["kv_cache_bytes"]
    assert configs["native"]["kv_cache_bytes"] > configs["vllm"]["kv_cache_bytes"]
    assert configs["vllm"]["kv_transfer_config"] is None
    assert configs["ems"]["kv_transfer_config"]["kv_connector"] == "EMSConnector"
    assert (configs["vllm"]["probe"], configs["native"]["probe"]) == ("reset", "keep")

    with open(out + ".json") as f:
        written = json.load(f)
    sessions = calls[0][1]
    assert written["meta"]["sessions"] == [s.uuid for s in sessions]
    assert written["meta"]["requests"] == sum(len(s.turns) for s in sessions)
    assert set(written["passes"]) == set(cli.PASSES)
    assert set(written["report"]["passes"]) == set(cli.PASSES)
    assert written["report"]["mismatches_vllm_vs_ems"]["mismatched"] == 0
    with open(out + ".png", "rb") as f:
        assert f.read(8) == PNG_SIGNATURE

    printed = capsys.readouterr().out
    assert f"wrote {out}.json and {out}.png" in printed
    table_header = [line for line in printed.splitlines() if line.lstrip().startswith("turn")]
    assert len(table_header) == 1
    for label in cli.PASSES:
        assert label in table_header[0]


def test_main_rejects_no_sessions(tiny_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "run_pass_in_child", fake_pass_runner(calls))
    # 6 messages make 3 requests, under MIN_REQUESTS (4)
    use_dataset(monkeypatch, {f"c{i}": make_chat(6, 4, start=20 * i) for i in range(3)})
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", tiny_dir, "--out", str(tmp_path / "out")])
    assert "no conversation" in str(exit_info.value.code)
    assert calls == []
