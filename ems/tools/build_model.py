"""Build a Llama-shaped model with random weights and a locally trained chat tokenizer.

    python -m ems.tools.build_model OUTDIR [--preset tiny|bench] [--seed 0]

Nothing is downloaded. The tokenizer is a byte-level BPE trained with `tokenizers` on
conversation text from the `chitchat-dataset` wheel. The weights come from
`LlamaForCausalLM(config)` after `torch.manual_seed(seed)`, so one seed gives the same files
(checked: two builds of `bench` had the same safetensors digest). The directory is in Hugging
Face format and loads in vLLM and transformers.

Weights use initializer_range 0.1 (five times the Llama default): with the default, greedy
outputs of a random model hardly depend on distant context, and a wrong KV load could go
unnoticed (notes/vllm.md, section 2).

Chat template: `<s>` then, per message, `<|role|>content<|end|>`; the generation prompt is
`<|assistant|>`. The role markers and `<|end|>` are special tokens, so the tokenizer splits the
text at them before BPE runs. Hence the token ids of a rendered history are a prefix of the ids
of the same history with more messages appended. `check_prefix_stable` tests that property.
"""
import argparse
import os
import sys
import tempfile
import time

# Shapes. tiny is a few MB, for tests. bench has 51M parameters (103 MB on disk in bfloat16).
# Its 2 KV heads of 128 serve 8 query heads, so its KV is small (12 KiB per token in float32)
# while its prefill is heavy, and loading a cached prefix costs far less than recomputing it.
# Measured on this project's 2-core machine in float32, where vLLM runs the model on one core:
# a 1,500-token prompt takes 1.06 s cold and 0.10 s with its first 1,408 tokens in vLLM's
# prefix cache. 8 layers of 1024 took 1.35 s and 10 layers with a 2816-wide MLP took 2.9 s,
# both over the 0.5-1 s aimed for.
PRESETS = {
    "tiny": dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 max_position_embeddings=4096, save_dtype="float32", text_convs=1500),
    "bench": dict(vocab_size=8192, hidden_size=1024, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                  max_position_embeddings=4096, save_dtype="bfloat16", text_convs=4000),
}
INITIALIZER_RANGE = 0.1
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def training_text(num_conversations):
    """Yield the utterances of the first `num_conversations` conversations in uuid order."""
    import chitchat_dataset

    data = chitchat_dataset.Dataset()
    for uuid in sorted(data)[:num_conversations]:
        for turn in data[uuid]["messages"]:
            for utterance in turn:
                yield utterance["text"]


def build_tokenizer(vocab_size, num_conversations):
    """Train a byte-level BPE with the chat special tokens and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_text(num_conversations), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def render_ids(tokenizer, messages, add_generation_prompt=True):
    """Render `messages` with the chat template and tokenize them (the template adds `<s>`)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_prefix_stable(tokenizer, conversations):
    """Count turns whose prompt ids do not start with the previous turn's prompt ids.

    conversations: lists of message dicts alternating user/assistant, starting with user.
    Returns (turns checked, violations).
    """
    checked = bad = 0
    for messages in conversations:
        previous = None
        for end in range(1, len(messages) + 1, 2):
            ids = render_ids(tokenizer, messages[:end])
            if previous is not None:
                checked += 1
                bad += ids[:len(previous)] != previous
            previous = ids
    return checked, bad


PREFIX_CHECKS = 100            # conversations build() checks for prefix stability
PREFIX_CHECK_MESSAGES = 40     # leading messages checked per conversation


def _sample_conversations(count):
    """Return the `count` conversations with the most turns as user/assistant message lists.

    Each list keeps its first PREFIX_CHECK_MESSAGES messages.
    """
    import chitchat_dataset

    from ems.replay.dataset import _messages

    data = chitchat_dataset.Dataset()
    longest = sorted(data, key=lambda uuid: (-len(data[uuid]["messages"]), uuid))[:count]
    return [[{"role": role, "content": text}
             for role, text, _, _ in _messages(data[uuid])[:PREFIX_CHECK_MESSAGES]]
            for uuid in longest]


def build(outdir, preset="tiny", seed=0):
    """Write the model and tokenizer to `outdir` and return a dict describing them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(PRESETS[preset])
    save_dtype = shape.pop("save_dtype")
    text_convs = shape.pop("text_convs")
    t0 = time.time()
    tokenizer = build_tokenizer(shape["vocab_size"], text_convs)
    checked, violations = check_prefix_stable(tokenizer, _sample_conversations(PREFIX_CHECKS))
    if violations:
        raise RuntimeError(f"chat template is not prefix-stable at the token level: "
                           f"{violations} of {checked} turns")

    # A new directory appears whole, by rename, so an interrupted build never leaves a
    # config.json behind (make treats that file as the finished model).
    final_dir = outdir
    if not os.path.isdir(outdir) or not os.listdir(outdir):
        parent = os.path.dirname(os.path.abspath(outdir))
        os.makedirs(parent, exist_ok=True)
        outdir = tempfile.mkdtemp(prefix=".build-", dir=parent)
    tokenizer.save_pretrained(outdir)
    shape["vocab_size"] = len(tokenizer)
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
                         initializer_range=INITIALIZER_RANGE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, save_dtype))
    model.save_pretrained(outdir, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    if outdir != final_dir:
        if os.path.isdir(final_dir):
            os.rmdir(final_dir)          # empty, checked above
        os.rename(outdir, final_dir)
    return dict(outdir=final_dir, preset=preset, seed=seed, params=params,
                vocab_size=shape["vocab_size"], save_dtype=save_dtype,
                prefix_stable_turns=checked, seconds=round(time.time() - t0, 1))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ems.tools.build_model",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = build(args.outdir, args.preset, args.seed)
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
