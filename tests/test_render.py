"""Chat rendering: ids + loss mask, max_rounds, truncation, the generation prompt. Run: python -m pytest -q tests/test_render.py"""
import pytest

from configurator import UserError
from tokenizer import get_tokenizer

TOK = get_tokenizer("bytes")  # token = UTF-8 byte, so expected ids can be written down by hand
SP = {name: TOK.special_id(name) for name in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                                              "<|assistant_end|>", "<|system_start|>", "<|system_end|>")}


def msg(role, content):
    return {"role": role, "content": content}


CONV = [msg("system", "Be brief."),
        msg("user", "Hi"), msg("assistant", "Hello!"),
        msg("user", "2+2?"), msg("assistant", "4"),
        msg("user", "你好"), msg("assistant", "你好！")]


def expected(conv):
    """The layout written out by hand, independently of tokenizer.py's code."""
    ids, mask = [SP["<|bos|>"]], [0]
    for m in conv:
        body = list(m["content"].encode("utf-8"))
        if m["role"] == "system":
            part, trained = [SP["<|system_start|>"]] + body + [SP["<|system_end|>"]], 0
        elif m["role"] == "user":
            part, trained = [SP["<|user_start|>"]] + body + [SP["<|user_end|>"], SP["<|assistant_start|>"]], 0
        else:
            part, trained = body + [SP["<|assistant_end|>"]], 1
        ids += part
        mask += [trained] * len(part)
    return ids, mask


def trained_spans(ids, mask):
    """Maximal runs of trained tokens, as id lists."""
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def test_mask_is_exactly_the_assistant_spans_and_their_end_tokens():
    ids, mask = TOK.chat_format.render(CONV)
    assert (ids, mask) == expected(CONV)
    assert ids[0] == TOK.bos_id and mask[0] == 0
    answers = [m["content"] for m in CONV if m["role"] == "assistant"]
    spans = trained_spans(ids, mask)
    assert [TOK.decode(s[:-1]) for s in spans] == answers
    assert all(s[-1] == SP["<|assistant_end|>"] for s in spans)
    # nothing else is trained: not the specials of other turns, not <|assistant_start|>
    for i, m in zip(ids, mask):
        if i in (SP["<|bos|>"], SP["<|user_start|>"], SP["<|user_end|>"], SP["<|assistant_start|>"],
                 SP["<|system_start|>"], SP["<|system_end|>"]):
            assert m == 0
    assert sum(mask) == sum(len(a.encode("utf-8")) + 1 for a in answers)


def test_system_message_is_rendered_but_never_trained():
    conv = [msg("system", "SECRET"), msg("user", "u"), msg("assistant", "SECRET")]
    ids, mask = TOK.chat_format.render(conv)
    s0, s1 = ids.index(SP["<|system_start|>"]), ids.index(SP["<|system_end|>"])
    assert s0 == 1 and TOK.decode(ids[s0 + 1:s1]) == "SECRET"
    assert not any(mask[:s1 + 1])
    assert [TOK.decode(s[:-1]) for s in trained_spans(ids, mask)] == ["SECRET"]  # the assistant's copy only
    # without a system message there is no system block at all
    ids2, _ = TOK.chat_format.render(conv[1:])
    assert SP["<|system_start|>"] not in ids2 and ids2[1] == SP["<|user_start|>"]


def test_max_rounds_keeps_the_first_exchanges():
    assert TOK.chat_format.render(CONV, max_rounds=1) == expected(CONV[:3])
    assert TOK.chat_format.render(CONV, max_rounds=2) == expected(CONV[:5])
    assert TOK.chat_format.render(CONV, max_rounds=3) == TOK.chat_format.render(CONV, max_rounds=-1)
    assert TOK.chat_format.render(CONV, max_rounds=99) == expected(CONV)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="max_rounds"):
            TOK.chat_format.render(CONV, max_rounds=bad)


def test_truncation_drops_whole_later_exchanges():
    full, _ = expected(CONV)
    two, _ = expected(CONV[:5])
    for max_seq_len in (len(two) - 1, len(full) - 2):  # room for exactly two exchanges, and for almost three
        ids, mask = TOK.chat_format.render(CONV, max_seq_len=max_seq_len)
        assert (ids, mask) == expected(CONV[:5])
        assert len(ids) <= max_seq_len + 1
    # the limit is max_seq_len + 1 tokens (one window x = ids[:-1], y = ids[1:]): the full length fits exactly
    assert TOK.chat_format.render(CONV, max_seq_len=len(full) - 1) == expected(CONV)


def test_truncation_inside_the_first_exchange_and_the_drop():
    conv = [msg("user", "question"), msg("assistant", "a long answer " * 20), msg("user", "more"), msg("assistant", "x")]
    prompt_len = 1 + 1 + len("question") + 2  # bos, user_start, text, user_end, assistant_start
    ids, mask = TOK.chat_format.render(conv, max_seq_len=prompt_len + 4)
    assert len(ids) == prompt_len + 5 and sum(mask) == 5  # cut mid-answer: no exchange fits whole
    assert TOK.decode(ids[prompt_len:]) == "a lon"
    # the prompt alone fills the limit: nothing trainable left, so None (the caller counts a drop)
    assert TOK.chat_format.render(conv, max_seq_len=prompt_len - 1) is None
    assert TOK.chat_format.render(conv, max_seq_len=3) is None
    # exactly one trained token left is still a conversation
    ids, mask = TOK.chat_format.render(conv, max_seq_len=prompt_len)
    assert sum(mask) == 1 and mask[-1] == 1


def test_trailing_user_message_is_ignored_for_training():
    assert TOK.chat_format.render(CONV + [msg("user", "unanswered")]) == expected(CONV)
    assert TOK.chat_format.render([msg("user", "only a question")]) is None


def test_bad_role_order_is_an_error():
    for conv in ([msg("assistant", "a")], [msg("user", "u"), msg("user", "u")],
                 [msg("user", "u"), msg("assistant", "a"), msg("system", "late")], [msg("tool", "x")],
                 [{"role": "user", "content": 3}]):
        with pytest.raises(ValueError):
            TOK.chat_format.render(conv)


def test_completion_prompt_is_the_prefix_of_the_training_render():
    ids, _ = TOK.chat_format.render(CONV)
    for k in (2, 4, 6):  # CONV[:k] ends with the user turn of exchange k/2
        prompt = TOK.chat_format.render_prompt(CONV[:k])
        assert prompt[-1] == SP["<|assistant_start|>"]
        assert ids[:len(prompt)] == prompt
        # and the answer that follows in the training render is exactly that exchange's assistant turn
        answer = CONV[k]["content"]
        assert TOK.decode(ids[len(prompt):len(prompt) + len(answer.encode())]) == answer
    with pytest.raises(ValueError, match="last message"):
        TOK.chat_format.render_prompt(CONV)


def test_completion_prompt_drops_the_oldest_exchanges_to_fit():
    prompt = TOK.chat_format.render_prompt(CONV[:6])
    header = [SP["<|bos|>"], SP["<|system_start|>"]] + list(b"Be brief.") + [SP["<|system_end|>"]]
    assert TOK.chat_format.render_prompt(CONV[:6], max_seq_len=len(prompt)) == prompt
    shorter = TOK.chat_format.render_prompt(CONV[:6], max_seq_len=len(prompt) - 1)
    # the first exchange is gone, the system message and the rest stay, token for token
    assert shorter[:len(header)] == header
    assert shorter == header + TOK.chat_format.render_prompt(CONV[3:6])[1:]
    last_only = header + TOK.chat_format.render_prompt(CONV[5:6])[1:]
    assert TOK.chat_format.render_prompt(CONV[:6], max_seq_len=len(last_only)) == last_only
    with pytest.raises(UserError, match="prompt is"):
        TOK.chat_format.render_prompt(CONV[:6], max_seq_len=len(last_only) - 1)


def test_plain_template_render():
    ids, mask = TOK.chat_format.render_plain("Q: 1+1\nA:", " 2")
    assert ids == TOK.chat_format.render_plain_prompt("Q: 1+1\nA:") + list(b" 2") + [TOK.bos_id]
    assert mask == [0] * (1 + len("Q: 1+1\nA:")) + [1, 1, 1]
    ids, mask = TOK.chat_format.render_plain("prompt", "response", max_seq_len=8)
    assert len(ids) == 9 and sum(mask) == 2
    assert TOK.chat_format.render_plain("prompt", "response", max_seq_len=6) is None


def test_gpt2_render_decodes_back():
    tok = get_tokenizer("gpt2")
    ids, mask = tok.chat_format.render(CONV)
    assert ids[0] == tok.bos_id == 50256
    answers = [m["content"] for m in CONV if m["role"] == "assistant"]
    assert [tok.decode(s[:-1]) for s in trained_spans(ids, mask)] == answers
    prompt = tok.chat_format.render_prompt(CONV[:6])
    assert ids[:len(prompt)] == prompt
