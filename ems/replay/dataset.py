"""Sessions for the replay benchmark, built from real chats of the `chitchat-dataset` wheel.

One conversation is one session. Turns alternate between two people: the first speaker plays
`user` and the other `assistant`, and consecutive turns by the same sender are merged. Each user
turn is one request, whose prompt is the chat-template rendering of every earlier message plus
the new user message and the generation prompt. Each prompt extends the previous prompt of its
session token for token, which build_session checks for every turn.

A turn's history is everything before its new tokens: the previous prompt, plus the previous
reply in "generated" mode. Those are the tokens a KV cache can hold. The new tokens are the
user's message, plus the dataset's assistant reply in "dataset" mode.

Think time before a request is the real gap, in seconds, between the other side's last
utterance and the user's next one, times a scale factor. The runner sleeps that long after the
previous reply.
"""
import dataclasses
import datetime

from ems.tools.build_model import render_ids


@dataclasses.dataclass
class Turn:
    index: int              # 0-based request index within the session
    new_ids: list           # token ids appended after the previous prompt (and its reply)
    think_s: float          # seconds to wait after the previous reply (0 for the first)


@dataclasses.dataclass
class Session:
    uuid: str
    history: str            # "dataset" or "generated", see build_session
    turns: list


def _seconds(stamp):
    """Return the POSIX seconds of an ISO-8601 UTC stamp such as 2018-05-02T19:38:15Z."""
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _messages(conversation):
    """Return [(role, text, first_ts, last_ts)], same-sender turns merged, roles alternating."""
    merged = []
    for turn in conversation["messages"]:
        sender = turn[0]["sender"]
        text = "\n".join(u["text"] for u in turn)
        first, last = _seconds(turn[0]["timestamp"]), _seconds(turn[-1]["timestamp"])
        if merged and merged[-1][0] == sender:
            s, t, f, _ = merged[-1]
            merged[-1] = (s, t + "\n" + text, f, last)
        else:
            merged.append((sender, text, first, last))
    return [("user" if i % 2 == 0 else "assistant", text, first, last)
            for i, (_, text, first, last) in enumerate(merged)]


def _rank(data, max_requests, history):
    """Rank conversation uuids by words in their first 2*max_requests turns, most first.

    Long histories are what the benchmark is about, and most chitchat conversations are short
    (median 2 turns), so the ranking favours those with the most text early on. In "generated"
    mode only the user's turns (even positions) reach the prompts, so only they count. Ties go
    to the smaller uuid.
    """
    scored = []
    for uuid, conversation in data.items():
        turns = conversation["messages"][:2 * max_requests]
        if len(turns) < 3:
            continue
        if history == "generated":
            turns = turns[::2]
        words = sum(len(u["text"].split()) for turn in turns for u in turn)
        scored.append((-words, uuid))
    return [uuid for _, uuid in sorted(scored)]


def build_session(uuid, conversation, tokenizer, history, max_requests, max_prompt_tokens,
                  max_tokens, think_scale):
    """Build the session's turns, stopping before the first prompt over max_prompt_tokens.

    history "dataset": the assistant messages in later prompts are the dataset's replies, so
    every pass sends the same prompts. history "generated": they are the engine's own reply
    tokens (max_tokens each), appended by the runner at the token level, as a chat client
    does when the server's tokenizer round-trips the reply text.
    """
    messages = _messages(conversation)
    turns, previous = [], []
    length = 0          # prompt length of the turn being built, replies included
    for end in range(1, len(messages) + 1, 2):
        if len(turns) == max_requests:
            break
        shown = [{"role": role, "content": text if role == "user" or history == "dataset"
                  else ""} for role, text, _, _ in messages[:end]]
        ids = render_ids(tokenizer, shown)
        new_ids = ids[len(previous):]
        length += len(new_ids) + (max_tokens if turns and history == "generated" else 0)
        if length > max_prompt_tokens:
            break
        think = 0.0
        if end > 1:
            think = max(0.0, messages[end - 1][2] - messages[end - 2][3]) * think_scale
        if ids[:len(previous)] != previous:
            raise ValueError(f"chat template is not prefix-stable for session {uuid} turn "
                             f"{len(turns)}: the prompt does not extend the previous one")
        turns.append(Turn(index=len(turns), new_ids=new_ids, think_s=think))
        previous = ids
    return Session(uuid=uuid, history=history, turns=turns)


MIN_REQUESTS = 4    # a session needs this many requests to count as multi-turn


def load_sessions(tokenizer, num_sessions, history, max_requests, max_prompt_tokens, max_tokens,
                  think_scale):
    """Return `num_sessions` sessions of MIN_REQUESTS or more requests each.

    The same arguments give the same sessions.
    """
    import chitchat_dataset

    data = chitchat_dataset.Dataset()
    sessions = []
    for uuid in _rank(data, max_requests, history):
        if len(sessions) >= num_sessions:
            break
        session = build_session(uuid, data[uuid], tokenizer, history, max_requests,
                                max_prompt_tokens, max_tokens, think_scale)
        if len(session.turns) >= MIN_REQUESTS:
            sessions.append(session)
    return sessions
