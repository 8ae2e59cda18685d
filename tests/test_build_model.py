"""ems.tools.build_model: the tiny preset's files, seeds, tokenizer, chat template and weights.

The `tiny` model is built once per session (a few seconds). The seed tests build two more.
"""
import hashlib
import itertools
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
chitchat_dataset = pytest.importorskip("chitchat_dataset")

from safetensors.torch import load_file  # noqa: E402

import tiny_model  # noqa: E402
from ems.tools import build_model as bm  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_model.tiny_model(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_dir(tiny):
    return tiny[0]


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def conversations():
    """The 20 longest chitchat conversations as user/assistant message lists."""
    return bm._sample_conversations(20)


def file_digests(directory):
    """Return {file name: sha256 hex} for every file in `directory`."""
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def greedy(model, ids, steps=8):
    """Return `steps` greedy next-token ids after `ids`, recomputing the prefix each step."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


def test_build_writes_loadable_config(tiny, tokenizer):
    outdir, info = tiny
    for name in ("config.json", "model.safetensors") + TOKENIZER_FILES:
        assert os.path.isfile(os.path.join(outdir, name)), name

    config = transformers.AutoConfig.from_pretrained(outdir)
    assert config.model_type == "llama"
    shape = {k: v for k, v in bm.PRESETS["tiny"].items() if k not in ("save_dtype", "text_convs")}
    shape.pop("vocab_size")
    for key, value in shape.items():
        assert getattr(config, key) == value, key
    assert config.vocab_size == len(tokenizer)
    assert config.initializer_range == bm.INITIALIZER_RANGE
    assert config.tie_word_embeddings is False
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.eos_token_id == tokenizer.eos_token_id

    assert info["vocab_size"] == len(tokenizer)
    assert info["save_dtype"] == bm.PRESETS["tiny"]["save_dtype"]
    assert info["prefix_stable_turns"] > 0


def test_build_weights_scaled_and_typed(tiny):
    outdir, info = tiny
    weights = load_file(os.path.join(outdir, "model.safetensors"))
    dtype = getattr(torch, bm.PRESETS["tiny"]["save_dtype"])
    assert all(t.dtype == dtype for t in weights.values())
    assert sum(t.numel() for t in weights.values()) == info["params"]

    # Random matrices are drawn with std initializer_range. Norm weights start at 1.
    projections = [n for n in weights if n.endswith("proj.weight")]
    assert projections
    for name in projections:
        std = float(weights[name].float().std())
        assert std == pytest.approx(bm.INITIALIZER_RANGE, rel=0.05), name


def test_build_same_seed_same_files(tiny_dir, tmp_path, capsys):
    again = str(tmp_path / "again")
    assert bm.main([again, "--preset", "tiny", "--seed", "0"]) == 0
    assert f"outdir={again}" in capsys.readouterr().out

    first, second = file_digests(tiny_dir), file_digests(again)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], name


def test_build_other_seed_other_weights(tiny_dir, tmp_path):
    other = str(tmp_path / "seed1")
    bm.build(other, preset="tiny", seed=1)

    first, second = file_digests(tiny_dir), file_digests(other)
    assert first["model.safetensors"] != second["model.safetensors"]
    # The tokenizer does not depend on the seed.
    for name in TOKENIZER_FILES:
        assert first[name] == second[name], name

    a = load_file(os.path.join(tiny_dir, "model.safetensors"))
    b = load_file(os.path.join(other, "model.safetensors"))
    assert sorted(a) == sorted(b)
    random_tensors = [n for n in a if a[n].float().std() > 0]
    assert random_tensors
    for name in random_tensors:
        assert not torch.equal(a[name], b[name]), name


def test_tokenizer_special_tokens_single_ids(tokenizer):
    for token in bm.SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
    assert tokenizer.chat_template == bm.CHAT_TEMPLATE


def test_tokenizer_round_trips_chitchat(tokenizer):
    data = chitchat_dataset.Dataset()
    uuids = sorted(data)
    trained = bm.PRESETS["tiny"]["text_convs"]
    # Conversations from the training text and from after it.
    texts = [u["text"] for uuid in uuids[:50] + uuids[trained:trained + 150]
             for turn in data[uuid]["messages"] for u in turn]
    assert len(texts) > 1000
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_chat_template_prefix_stable(tokenizer, conversations):
    checked = 0
    for messages in conversations:
        # Turn k's prompt: messages up to its user message plus the generation prompt.
        prompts = [bm.render_ids(tokenizer, messages[:end])
                   for end in range(1, len(messages) + 1, 2)]
        for shorter, longer in zip(prompts, prompts[1:]):
            assert longer[:len(shorter)] == shorter
            assert len(longer) > len(shorter)
            checked += 1

        # Without the generation prompt every message boundary is stable as well.
        plain = [bm.render_ids(tokenizer, messages[:end], add_generation_prompt=False)
                 for end in range(1, len(messages) + 1)]
        for shorter, longer in zip(plain, plain[1:]):
            assert longer[:len(shorter)] == shorter
    assert checked >= 100
    assert bm.check_prefix_stable(tokenizer, conversations) == (checked, 0)


UNSTABLE_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                     "{% if loop.last %}<|end|>{% endif %}{{ message['content'] }}"
                     "{% endfor %}")


def test_check_prefix_stable_counts_violations(tiny_dir, conversations):
    broken = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    broken.chat_template = UNSTABLE_TEMPLATE
    checked, bad = bm.check_prefix_stable(broken, conversations[:3])
    assert checked > 0
    assert bad == checked


def test_build_rejects_unstable_template(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "CHAT_TEMPLATE", UNSTABLE_TEMPLATE)
    monkeypatch.setattr(bm, "PREFIX_CHECKS", 2)
    monkeypatch.setitem(bm.PRESETS, "tiny", dict(bm.PRESETS["tiny"], text_convs=50))
    with pytest.raises(RuntimeError, match="not prefix-stable"):
        bm.build(str(tmp_path / "unstable"), preset="tiny", seed=0)
    assert not (tmp_path / "unstable" / "config.json").exists()
    assert os.listdir(tmp_path) == []      # no partial build left behind


def test_greedy_output_depends_on_context(tiny_dir, tokenizer):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).float().eval()
    contexts = [
        [{"role": "user", "content": "hi there, how are you doing today?"}],
        [{"role": "user", "content": "what is your favourite movie"}],
        [{"role": "user", "content": "I like to go hiking in the mountains"}],
    ]
    outputs = [greedy(model, bm.render_ids(tokenizer, c)) for c in contexts]
    for out in outputs:
        assert len(out) == 8
        assert len(set(out)) > 1, out
    for a, b in itertools.combinations(outputs, 2):
        assert a != b

    # Only the first exchange differs. The last three messages and the generation prompt
    # (30 tokens or more) are the same.
    tail = [{"role": "user", "content": "anyway, what did you do at the weekend?"},
            {"role": "assistant", "content": "I went to see my parents and we cooked"},
            {"role": "user", "content": "that sounds nice, what did you cook"}]
    first = [{"role": "user", "content": "I like dogs a lot"},
             {"role": "assistant", "content": "me too"}]
    other = [{"role": "user", "content": "the weather was terrible"},
             {"role": "assistant", "content": "it rained"}]
    near, far = (bm.render_ids(tokenizer, head + tail) for head in (first, other))
    shared = len(bm.render_ids(tokenizer, tail, add_generation_prompt=True)) - 1  # minus <s>
    assert near[-shared:] == far[-shared:]
    assert shared >= 30
    assert greedy(model, near) != greedy(model, far)


def test_main_rejects_unknown_preset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bm.main([str(tmp_path / "x"), "--preset", "huge"])
    assert exit_info.value.code == 2
    assert "huge" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
