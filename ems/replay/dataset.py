"""Sessions for the replay benchmark, built from real chats of the `chitchat-dataset` wheel.

One conversation is one session. Turns alternate between two people; the first speaker plays
`user` and the other `assistant`, and consecutive turns by the same sender are merged. Each user
turn is one request: the chat-template rendering of every earlier message (the dataset's own
text for both roles) plus the new user message and the generation prompt. The engine's reply
is not fed back, so both passes of a benchmark send exactly the same prompts whatever they
generate, and each prompt starts with the previous prompt of its session (the dataset's
assistant text follows the previous generation prompt).

Think time before a request is the real gap, in seconds, between the other side's last
utterance and the user's next one, times a scale factor; the runner sleeps that long after the
previous reply.
"""
import dataclasses
import datetime

from ems.tools.build_model import render_ids


@dataclasses.dataclass
class Turn:
    index: int              # 0-based request index within the session
    prompt_ids: list        # token ids sent to the engine
    think_s: float          # seconds to wait after the previous reply (0 for the first)


@dataclasses.dataclass
class Session:
    uuid: str
    turns: list


def _seconds(stamp):
    """POSIX seconds of an ISO-8601 UTC stamp such as 2018-05-02T19:38:15Z."""
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _messages(conversation):
    """[(role, text, first_ts, last_ts)] with same-sender turns merged, roles alternating."""
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


def _rank(data, max_requests):
    """Conversation uuids, most words in the first 2*max_requests turns first (uuid breaks ties).

    Long histories are what the benchmark is about, and most chitchat conversations are short
    (median 2 turns), so the ranking favours those with the most text early on.
    """
    scored = []
    for uuid, conversation in data.items():
        turns = conversation["messages"][:2 * max_requests]
        if len(turns) < 3:
            continue
        words = sum(len(u["text"].split()) for turn in turns for u in turn)
        scored.append((-words, uuid))
    return [uuid for _, uuid in sorted(scored)]


def build_session(uuid, conversation, tokenizer, max_requests, max_prompt_tokens, think_scale):
    """The session's requests, stopping before the first prompt longer than max_prompt_tokens."""
    messages = _messages(conversation)
    turns = []
    for end in range(1, len(messages) + 1, 2):
        if len(turns) == max_requests:
            break
        history = [{"role": role, "content": text} for role, text, _, _ in messages[:end]]
        ids = render_ids(tokenizer, history)
        if len(ids) > max_prompt_tokens:
            break
        think = 0.0
        if end > 1:
            think = max(0.0, messages[end - 1][2] - messages[end - 2][3]) * think_scale
        turns.append(Turn(index=len(turns), prompt_ids=ids, think_s=think))
    return Session(uuid=uuid, turns=turns)


def load_sessions(tokenizer, num_sessions, max_requests, max_prompt_tokens, think_scale):
    """`num_sessions` sessions with at least 2 requests each, deterministic for given arguments."""
    import chitchat_dataset

    data = chitchat_dataset.Dataset()
    sessions = []
    for uuid in _rank(data, max_requests):
        session = build_session(uuid, data[uuid], tokenizer, max_requests, max_prompt_tokens,
                                think_scale)
        if len(session.turns) >= 2:
            sessions.append(session)
        if len(sessions) == num_sessions:
            break
    return sessions


def prefix_violations(sessions):
    """Requests whose prompt ids do not start with the previous request's ids (expected 0)."""
    return sum(b.prompt_ids[:len(a.prompt_ids)] != a.prompt_ids
               for s in sessions for a, b in zip(s.turns, s.turns[1:]))
