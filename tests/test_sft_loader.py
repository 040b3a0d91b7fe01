"""Conversation loaders (packed mid-training, padded SFT): rank sharding, exact resume, masks, long conversations.
Run: python -m pytest -q tests/test_sft_loader.py"""
import numpy as np
import pytest
import torch

from configurator import UserError
from conftest import SHARED, needs_shared
from conversations import Record, read_records
from tasks import builtin_examples
from conversation_loader import ConversationBatchLoader, ConversationPackLoader
from tokenizer import get_tokenizer

TOK = get_tokenizer("bytes")
AEND = TOK.special_id("<|assistant_end|>")


def msg(role, content):
    return {"role": role, "content": content}


def examples(n=24, seed=0):
    """Numbered conversations of varied length: 'n<k>' in the first user turn identifies each."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        conv = [msg("user", f"n{k}:" + "u" * int(rng.integers(0, 12)))]
        conv.append(msg("assistant", "a" * int(rng.integers(1, 15))))
        if k % 3 == 0:
            conv = [msg("system", "sys")] + conv + [msg("user", "more?"), msg("assistant", "yes " * int(rng.integers(1, 4)))]
        out.append(Record(conv, {"k": k}))
    return out


def number(row_x):
    """The example number of a padded SFT row (its first user turn starts with 'n<k>:')."""
    text = TOK.decode([t for t in row_x.tolist() if t < 256])
    return int(text[text.index("n") + 1:text.index(":")])


def sft(exs, **kw):
    kw.setdefault("device_batch_size", 2)
    kw.setdefault("max_seq_len", 64)
    return ConversationBatchLoader(exs, TOK, **kw)


def pack(exs, **kw):
    kw.setdefault("device_batch_size", 2)
    kw.setdefault("max_seq_len", 16)
    return ConversationPackLoader(exs, TOK, **kw)


def global_batches(make, world_size, calls, state=None):
    """The global batch of each call: ranks' rows stacked in rank order, padded to a common width."""
    loaders = [make(rank=r, world_size=world_size) for r in range(world_size)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    out = []
    for _ in range(calls):
        parts = [ld.next_batch() for ld in loaders]
        T = max(x.shape[1] for x, _ in parts)
        xs = [torch.nn.functional.pad(x, (0, T - x.shape[1]), value=TOK.bos_id) for x, _ in parts]
        ys = [torch.nn.functional.pad(y, (0, T - y.shape[1]), value=-1) for _, y in parts]
        out.append((torch.cat(xs), torch.cat(ys)))
    states = {str(ld.state_dict()) for ld in loaders}
    assert len(states) == 1, "every rank must report the same state"
    return out, loaders[0].state_dict()


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


# ---- padded SFT batches ----

def test_sft_ranks_are_disjoint_and_cover_the_global_batch():
    exs = examples(24)
    one, _ = global_batches(lambda **kw: sft(exs, device_batch_size=4, seed=5, **kw), 1, 9)
    two, _ = global_batches(lambda **kw: sft(exs, device_batch_size=2, seed=5, **kw), 2, 9)
    four, _ = global_batches(lambda **kw: sft(exs, device_batch_size=1, seed=5, **kw), 4, 9)
    assert same(one, two) and same(one, four)
    # one epoch (6 calls of 4) visits every example exactly once; the next epoch in another order
    seen = [number(row) for x, _ in one for row in x]
    assert sorted(seen[:24]) == list(range(24)) and seen[24:] != seen[:12]


def test_sft_targets_are_minus_one_at_pads_and_untrained_tokens():
    exs = examples(12)
    ld = sft(exs, device_batch_size=4, shuffle=False)
    for call in range(3):
        x, y = ld.next_batch()
        for i in range(4):
            ids, mask = TOK.chat_format.render(exs[call * 4 + i].messages, max_seq_len=64)
            n = len(ids) - 1
            assert x[i, :n].tolist() == ids[:-1] and y[i, :n].tolist() == [
                t if m else -1 for t, m in zip(ids[1:], mask[1:])]
            assert (x[i, n:] == TOK.bos_id).all() and (y[i, n:] == -1).all()  # padding
        assert x.shape[1] == max(len(TOK.chat_format.render(e.messages)[0]) - 1 for e in exs[call * 4:call * 4 + 4])


def test_sft_state_round_trip_exact_and_across_world_sizes():
    exs = examples(10)  # 10 examples, 4 a call: calls straddle epochs
    make2 = lambda **kw: sft(exs, device_batch_size=2, seed=1, **kw)  # noqa: E731
    make1 = lambda **kw: sft(exs, device_batch_size=4, seed=1, **kw)  # noqa: E731
    straight, _ = global_batches(make2, 2, 12)
    first, state = global_batches(make2, 2, 5)
    assert state == {"epoch": 2, "position": 0, "num_examples": 10} and all(type(v) is int for v in state.values())
    rest2, _ = global_batches(make2, 2, 7, state=state)
    rest1, _ = global_batches(make1, 1, 7, state=state)  # saved on 2 ranks, resumed on 1
    assert same(first + rest2, straight) and same(first + rest1, straight)
    ld = make1()
    for _ in range(3):
        ld.next_batch()
    assert ld.epoch == 1 and ld.state_dict()["position"] == 2
    with pytest.raises(UserError, match="data or mixture changed"):
        sft(examples(11)).load_state_dict(state)
    with pytest.raises(UserError, match="lacks"):
        ld.load_state_dict({"epoch": 0})


def test_sft_long_conversations_at_256_are_cut_or_dropped_and_counted():
    long_answer = "word " * 400                      # ~2000 tokens with the byte tokenizer
    exs = [Record([msg("user", "short question"), msg("assistant", long_answer)]),                 # cut mid-answer
           Record([msg("user", "x" * 1000), msg("assistant", "never reached")]),                   # dropped
           Record([msg("user", "q1"), msg("assistant", "a1"), msg("user", "q2"), msg("assistant", long_answer)]),
           Record([msg("user", "hi"), msg("assistant", "hello")])] * 4
    ld = sft(exs, device_batch_size=4, max_seq_len=256, shuffle=False)
    for _ in range(4):
        x, y = ld.next_batch()
        assert x.shape == y.shape and x.shape[1] <= 256
        trained = (y != -1).sum(1).tolist()
        assert trained[0] > 200 and trained[1] == 0 and trained[3] == 6  # 'hello' + <|assistant_end|>
        # the third is cut at the turn boundary: only the first exchange, ending in <|assistant_end|>
        assert trained[2] == 3 and y[2][y[2] != -1].tolist()[-1] == AEND
    assert (ld.dropped, ld.rendered) == (4, 16)


@needs_shared
def test_sft_real_sharegpt_at_256_tokens():
    records, _ = read_records(SHARED / "data" / "sharegpt_v3_subset.jsonl")
    subset = [records[i] for i in range(0, 3366, 53)]  # 64 conversations, many far longer than 256 tokens
    ld = ConversationBatchLoader(subset, get_tokenizer("gpt2"), device_batch_size=8, max_seq_len=256, max_rounds=6)
    rows_with_targets = 0
    for _ in range(8):
        x, y = ld.next_batch()
        assert x.shape[1] <= 256 and x.dtype == torch.long
        rows_with_targets += int(((y != -1).sum(1) > 0).sum())
    assert rows_with_targets + ld.dropped == 64 and rows_with_targets > 48


def test_sft_pad_to_multiple_and_custom_render():
    exs = examples(8)
    x, y = sft(exs, device_batch_size=4, pad_to_multiple=32).next_batch()
    assert x.shape[1] % 32 == 0 and (y[:, -1] == -1).all()
    fixed = lambda ex, limit: ([TOK.bos_id, 1, 2, 3], [0, 0, 1, 1])  # noqa: E731
    x, y = sft(exs, device_batch_size=2, render=fixed).next_batch()
    assert x.tolist() == [[TOK.bos_id, 1, 2]] * 2 and y.tolist() == [[-1, 2, 3]] * 2


def test_loaders_reject_bad_arguments():
    for kw in ({"device_batch_size": 0}, {"rank": 2, "world_size": 2}, {"max_seq_len": -1}):
        with pytest.raises(UserError):
            sft(examples(4), **kw)
        with pytest.raises(UserError):
            pack(examples(4), **kw)
    with pytest.raises(UserError, match="no examples"):
        sft([])


# ---- packed mid-training windows ----

def test_pack_stream_is_the_concatenated_renders_cut_into_windows():
    exs = examples(7)
    ld = pack(exs, device_batch_size=3, max_seq_len=16, shuffle=False)
    ids = np.concatenate([TOK.chat_format.render(e.messages)[0] for e in exs] * 4)
    mask = np.concatenate([TOK.chat_format.render(e.messages)[1] for e in exs] * 4)
    span = 17
    for call in range(6):
        x, y = ld.next_batch()
        assert x.shape == y.shape == (3, 16)
        for i in range(3):
            w = (call * 3 + i) * span
            assert x[i].tolist() == ids[w:w + 16].tolist()
            assert y[i].tolist() == np.where(mask[w + 1:w + span] == 1, ids[w + 1:w + span], -1).tolist()
    assert ld.epoch >= 1 and ld.state_dict()["windows"] == 18


def test_pack_ranks_disjoint_covering_and_state_round_trip():
    exs = examples(9)
    make = lambda B: (lambda **kw: pack(exs, device_batch_size=B, seed=7, **kw))  # noqa: E731
    one, _ = global_batches(make(4), 1, 10)
    two, _ = global_batches(make(2), 2, 10)
    assert same(one, two)
    first, state = global_batches(make(2), 2, 3)
    assert state["token_offset"] > 0 and all(type(v) is int for v in state.values())  # resumes mid-conversation
    rest1, _ = global_batches(make(4), 1, 7, state=state)
    rest2, _ = global_batches(make(2), 2, 7, state=state)
    assert same(first + rest1, one) and same(first + rest2, one)
    # epochs are permuted: the stream of epoch 2 differs from epoch 1's
    ld = make(1)()
    ld.load_state_dict({"epoch": 1, "conversation": 0, "token_offset": 0, "windows": 0, "num_examples": 9})
    assert not torch.equal(ld.next_batch()[0], make(1)().next_batch()[0])
    with pytest.raises(UserError, match="data or mixture changed"):
        ld.load_state_dict(dict(state, num_examples=5))
    bad = pack(exs)
    bad.load_state_dict(dict(state, token_offset=10_000))
    with pytest.raises(UserError, match="past the end"):
        bad.next_batch()


def test_pack_tiny_data_and_builtin_tasks():
    # one short conversation and a big batch: the stream wraps many epochs inside one call, without hanging
    ld = pack([Record([msg("user", "q"), msg("assistant", "a")])], device_batch_size=8, max_seq_len=32)
    x, y = ld.next_batch()
    assert x.shape == (8, 32) and ld.epoch > 10 and (y == ord("a")).any()
    convs = builtin_examples("arithmetic", 50, 0, "train")
    x, y = pack(convs, device_batch_size=4, max_seq_len=64).next_batch()  # plain message lists work too
    assert (y != -1).float().mean() > 0.1
    # no trainable token anywhere is an error, not an endless loop
    with pytest.raises(UserError, match="has a trained"):
        pack([Record([msg("user", "q"), msg("assistant", "a")])], render=lambda ex, limit: None).next_batch()
    # but every other example without one is fine, however long the window (the count is of drops in a row)
    half = [Record([msg("user", f"q{k}"), msg("assistant", "a")] if k % 2 == 0 else [msg("user", "no reply")])
            for k in range(10)]
    x, y = pack(half, device_batch_size=1, max_seq_len=127).next_batch()
    assert (y != -1).any()


def test_sft_validation_pass_sees_every_example_once():
    exs = examples(10)
    for world_size, B in ((1, 4), (2, 2), (3, 1)):
        loaders = [sft(exs, device_batch_size=B, rank=r, world_size=world_size, shuffle=False, wrap=False)
                   for r in range(world_size)]
        seen = []
        for _ in range(loaders[0].batches_per_epoch):
            for ld in loaders:
                x, y = ld.next_batch()
                seen += [number(row) for row, t in zip(x, y) if (t != -1).any()]
        assert sorted(seen) == list(range(10)), world_size
        assert loaders[0].state_dict() == {"epoch": 1, "position": 0, "num_examples": 10}
        loaders[0].reset()
        assert loaders[0].state_dict()["epoch"] == 0
