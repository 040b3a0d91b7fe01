"""conversation_loader.py: batches of conversations for mid-training (packed) and SFT / Dolly (padded).

Both read a sequence of examples (conversations.Mixture's .train / .val, a Records, or plain message lists),
render each with the tokenizer's chat format (tok.chat_format.render: ids + loss mask) and turn mask 0 into
target -1. Like PretrainLoader, the global stream depends on the seed and the position only: call i covers the
global items [i*W*B, (i+1)*W*B) (windows when packed, conversations when padded) and rank r keeps [i*W*B + r*B,
+B). Each epoch visits the examples in a permutation seeded by (seed, epoch); the stream runs on across epochs,
so one call may take its items from two. state_dict() is plain ints, the same on every rank.
They render synchronously on the calling thread: a step needs a few hundred conversations (tens of ms with
tiktoken), small next to a step, and no thread keeps resume simple.
"""
from collections import deque

import numpy as np
import torch

from configurator import UserError


def _check_loader_args(what, examples, device_batch_size, max_seq_len, rank, world_size, device):
    for name, value in (("device_batch_size", device_batch_size), ("max_seq_len", max_seq_len),
                        ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{what}: {name} must be a positive int, got {value!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise UserError(f"{what}: rank must be in [0, {world_size}), got {rank!r}")
    if len(examples) == 0:
        raise UserError(f"{what}: no examples to load (an empty mixture split? with val_fraction=0 there is "
                        f"no validation part)")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{what}: device={str(device)!r} but CUDA is not available; pass --device=cpu")
    return device


def messages_of(example):
    """A Record (conversations.py) or a bare list of messages."""
    return example.messages if hasattr(example, "messages") else example


class _EpochOrder:
    """Example index at a global stream position g = epoch * N + i: the i-th of epoch's seeded permutation.
    Two permutations are cached (a call may straddle an epoch boundary): 8 bytes an example each."""

    def __init__(self, n, seed, shuffle):
        self.n, self.seed, self.shuffle, self._cache = n, seed, shuffle, {}

    def __call__(self, g) -> int:
        epoch, i = divmod(g, self.n)
        if not self.shuffle:
            return i
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = np.random.default_rng([int(self.seed), epoch]).permutation(self.n)
        return int(self._cache[epoch][i])


def _to_device(t, device):
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _targets(ids, mask):
    """(x, y) of one window or conversation: y = next token where it is trained, else -1."""
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(mask, dtype=bool)
    return ids[:-1], np.where(mask[1:], ids[1:], -1)


class ConversationBatchLoader:
    """SFT / Dolly batches: whole conversations, right-padded to the longest of the micro-batch.

    next_batch() -> (x, y) LongTensors (device_batch_size, T), T <= max_seq_len; padding is x = bos, y = -1.
    A conversation longer than max_seq_len is cut at a turn boundary (ChatFormat.render); one with no
    trained token left keeps its slot as an all -1 row and is counted in `dropped` (this rank's count since
    construction): skipping it instead would let one rank's data change every rank's stream.
    `render(example, max_seq_len) -> (ids, mask) | None` replaces the chat template (finetune_dolly's plain
    prompt format); `pad_to_multiple` rounds T up (fewer distinct shapes for torch.compile).
    wrap=False (for validation): a call never crosses an epoch's end; the slots past it are all -1 rows, so
    reset() then `batches_per_epoch` calls see every example exactly once over all ranks.
    """

    def __init__(self, examples, tokenizer, *, device_batch_size, max_seq_len, rank=0, world_size=1, device="cpu",
                 seed=0, max_rounds=-1, shuffle=True, split="train", render=None, pad_to_multiple=1, wrap=True):
        self.device = _check_loader_args("ConversationBatchLoader", examples, device_batch_size, max_seq_len, rank,
                                         world_size, device)
        self.examples, self.tokenizer = examples, tokenizer
        self.batch_size, self.max_seq_len, self.rank, self.world_size = device_batch_size, max_seq_len, rank, world_size
        self.num_examples, self.split, self.pad_to_multiple = len(examples), split, max(1, int(pad_to_multiple))
        self.wrap = wrap
        self.batches_per_epoch = -(-self.num_examples // (device_batch_size * world_size))  # next_batch() calls
        self._order = _EpochOrder(self.num_examples, seed, shuffle)
        if render is None:
            def render(example, limit):
                return tokenizer.chat_format.render(messages_of(example), max_seq_len=limit, max_rounds=max_rounds)
        self._render = render
        self.dropped = 0    # conversations of this rank with nothing trainable after truncation
        self.rendered = 0   # conversations of this rank rendered
        self.reset()

    def state_dict(self) -> dict:
        """The next global example no rank has been given: plain ints, the same on every rank."""
        return {"epoch": self.epoch, "position": self.position, "num_examples": self.num_examples}

    def load_state_dict(self, sd: dict):
        try:
            epoch, position, n = int(sd["epoch"]), int(sd["position"]), int(sd["num_examples"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"conversation loader state {sd!r} lacks epoch/position/num_examples ({e!r}); it was not "
                            f"written by ConversationBatchLoader.state_dict()") from e
        if n != self.num_examples or epoch < 0 or not 0 <= position < n:
            raise UserError(f"conversation loader state {sd} does not fit this {self.split} data "
                            f"({self.num_examples} examples); the data or mixture changed since the checkpoint: "
                            f"resume with the same mixture, seed and val_fraction, or start fresh")
        self.epoch, self.position = epoch, position

    def reset(self):
        self.epoch, self.position = 0, 0

    def next_batch(self):
        B, W, n = self.batch_size, self.world_size, self.num_examples
        start = self.epoch * n + self.position
        end = start + W * B if self.wrap else min(start + W * B, (self.epoch + 1) * n)
        rows = []
        for g in range(start + self.rank * B, start + (self.rank + 1) * B):
            if g >= end:  # wrap=False: past the end of the epoch
                rows.append(None)
                continue
            out = self._render(self.examples[self._order(g)], self.max_seq_len)
            self.rendered += 1
            if out is None:
                self.dropped += 1
            # a custom render may ignore the limit; the batch shape may not
            rows.append(None if out is None else _targets(out[0][:self.max_seq_len + 1], out[1][:self.max_seq_len + 1]))
        T = max([len(r[0]) for r in rows if r is not None] + [1])
        T = -(-T // self.pad_to_multiple) * self.pad_to_multiple
        x = torch.full((B, T), self.tokenizer.bos_id, dtype=torch.long)
        y = torch.full((B, T), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            if row is not None:
                x[i, :len(row[0])] = torch.from_numpy(row[0])
                y[i, :len(row[1])] = torch.from_numpy(row[1])
        epoch, self.position = divmod(end, n)
        if epoch > self.epoch and self.rank == 0 and self.wrap:  # a validation pass (wrap=False) just ends
            print(f"dataloader: {self.split} conversations: epoch {epoch + 1} begins (loader.epoch={epoch})",
                  flush=True)
        self.epoch = epoch
        return _to_device(x, self.device), _to_device(y, self.device)


class ConversationPackLoader:
    """Mid-training batches: rendered conversations back to back, cut into windows of max_seq_len + 1 tokens
    exactly like pretraining (a conversation may span windows), with target -1 where the mask is 0.

    next_batch() -> (x, y) LongTensors (device_batch_size, max_seq_len). The state is the position of the
    next unconsumed window's first token: (epoch, conversation within the epoch's order, token offset in its
    rendering) plus `windows` consumed. Every rank renders every conversation up to its windows (as every
    rank of PretrainLoader tokenises every row group): the price of a stream that does not depend on W.
    """

    STATE_KEYS = ("epoch", "conversation", "token_offset", "windows", "num_examples")

    def __init__(self, examples, tokenizer, *, device_batch_size, max_seq_len, rank=0, world_size=1, device="cpu",
                 seed=0, max_rounds=-1, shuffle=True, split="train", render=None):
        self.device = _check_loader_args("ConversationPackLoader", examples, device_batch_size, max_seq_len, rank,
                                         world_size, device)
        self.examples, self.tokenizer = examples, tokenizer
        self.batch_size, self.max_seq_len, self.rank, self.world_size = device_batch_size, max_seq_len, rank, world_size
        self.num_examples, self.split = len(examples), split
        self._order = _EpochOrder(self.num_examples, seed, shuffle)
        if render is None:
            def render(example, limit):
                return tokenizer.chat_format.render(messages_of(example), max_seq_len=limit, max_rounds=max_rounds)
        self._render = render
        self.dropped = 0  # conversations with no trained token (skipped in the stream; the same on every rank)
        self.reset()

    def state_dict(self) -> dict:
        if self._pieces:
            first = self._pieces[0]
            position = (first[0] // self.num_examples, first[0] % self.num_examples, first[3])
        else:
            position = (*divmod(self._next, self.num_examples), self._offset)
        return dict(zip(self.STATE_KEYS, (*position, self._windows, self.num_examples)))

    def load_state_dict(self, sd: dict):
        try:
            state = {k: int(sd[k]) for k in self.STATE_KEYS}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"packed conversation loader state {sd!r} lacks {self.STATE_KEYS} ({e!r}); it was not "
                            f"written by ConversationPackLoader.state_dict()") from e
        if (state["num_examples"] != self.num_examples or min(state.values()) < 0
                or state["conversation"] >= self.num_examples):
            raise UserError(f"packed conversation loader state {state} does not fit this {self.split} data "
                            f"({self.num_examples} examples); the data or mixture changed since the checkpoint: "
                            f"resume with the same mixture, seed and val_fraction, or start fresh")
        # _next: global stream index (epoch * N + i) of the next conversation to render; _offset: tokens of it
        # already consumed (only the first one rendered after a resume starts mid-conversation)
        self._next = state["epoch"] * self.num_examples + state["conversation"]
        self._offset, self._windows = state["token_offset"], state["windows"]
        self._pieces, self._buffered = deque(), 0  # [g, ids, mask, start]: rendered, not yet consumed
        self.epoch = state["epoch"]

    def reset(self):
        self.load_state_dict(dict.fromkeys(self.STATE_KEYS, 0) | {"num_examples": self.num_examples})

    def _fill(self, need):
        empty = 0  # conversations in a row with nothing trained: a whole epoch of them would loop forever
        while self._buffered < need:
            g = self._next
            out = self._render(self.examples[self._order(g)], None)
            self._next += 1
            if out is None:
                self.dropped += 1
                empty += 1
                if empty > self.num_examples:
                    raise UserError(f"packed conversation loader: none of the {self.num_examples} {self.split} "
                                    f"examples has a trained (assistant) token")
                continue
            empty = 0
            ids, mask = np.asarray(out[0], dtype=np.int64), np.asarray(out[1], dtype=bool)
            start, self._offset = self._offset, 0
            if start > len(ids):
                raise UserError(f"packed conversation loader: resume offset {start} is past the end of conversation "
                                f"{g % self.num_examples} ({len(ids)} tokens); the data, tokenizer or max_rounds "
                                f"changed since the checkpoint")
            if start < len(ids):
                self._pieces.append([g, ids, mask, start])
                self._buffered += len(ids) - start

    def _take(self, n, keep):
        """Consume n tokens; their (ids, mask) when keep, else None (other ranks' windows)."""
        self._fill(n)
        parts, left = [], n
        while left:
            piece = self._pieces[0]
            g, ids, mask, start = piece
            k = min(left, len(ids) - start)
            if keep:
                parts.append((ids[start:start + k], mask[start:start + k]))
            piece[3] += k
            left -= k
            if piece[3] == len(ids):
                self._pieces.popleft()
        self._buffered -= n
        if keep:
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return None

    def next_batch(self):
        B, W, span = self.batch_size, self.world_size, self.max_seq_len + 1
        x = torch.empty((B, span - 1), dtype=torch.long)
        y = torch.empty((B, span - 1), dtype=torch.long)
        for j in range(W * B):
            mine = self.rank * B <= j < (self.rank + 1) * B
            window = self._take(span, keep=mine)
            if mine:
                wx, wy = _targets(*window)
                x[j - self.rank * B] = torch.from_numpy(wx)
                y[j - self.rank * B] = torch.from_numpy(wy)
        self._windows += W * B
        epoch = self.state_dict()["epoch"]
        if epoch > self.epoch and self.rank == 0:
            print(f"dataloader: {self.split} conversations: epoch {epoch + 1} begins after {self._windows:,} windows "
                  f"(loader.epoch={epoch})", flush=True)
        self.epoch = epoch
        return _to_device(x, self.device), _to_device(y, self.device)


def pass_tokens(examples, tokenizer, *, max_seq_len, max_rounds=-1, sample=500) -> float:
    """Tokens of one pass over `examples`, from the mean rendered length of a fixed, evenly spaced sample of up
    to `sample` of them (train_mid.py's num_epochs -> max_steps)."""
    picked = [examples[i] for i in range(0, len(examples), max(1, len(examples) // sample))]
    lengths = [len(r[0]) for r in (tokenizer.chat_format.render(messages_of(e), max_seq_len=max_seq_len,
                                                                max_rounds=max_rounds) for e in picked) if r]
    return len(examples) * sum(lengths) / max(1, len(lengths))
