"""engine.py: generation, the one place that turns a model and a prompt into tokens.

Sampling (temperature, top-k, top-p, repetition, frequency and presence penalties), batched KV-cache decoding
(BatchedGenerator: many sequences of different lengths, one forward per step), streaming generation of one
answer on top of it, incremental UTF-8 decoding and stop strings. chat.py, serve.py, evaluate.py, train_base.py's
samples and eval all call these; none of them re-implements a sampling loop. One sampling vocabulary everywhere:
max_tokens, temperature (0 = greedy), top_k (0 = off), top_p (1 = off), repetition_penalty (1 = off),
frequency_penalty and presence_penalty (0 = off). What ends an answer comes from the tokenizer's chat format
(tok.chat_format.stop_ids()).
"""
import codecs
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UserError
from model import KVCache

# -----------------------------------------------------------------------------
# sampling: one token from the logits of the last position


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL (Keskar et al. 2019), as in Hugging Face's RepetitionPenaltyLogitsProcessor: the logit of every
    token already in the context is divided by `penalty` when positive and multiplied when negative, so
    its probability drops either way. logits (B, V), seen (V,) bool."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)  # seen (V,) broadcasts over the rows


def apply_penalties(logits, counts, frequency_penalty, presence_penalty):
    """OpenAI's frequency and presence penalties: logits -= count * frequency_penalty + (count > 0) *
    presence_penalty, counts (V,) being how often each token occurs in the answer so far. Negative values
    encourage repetition. Additive, unlike the repetition penalty's division."""
    return logits - counts * frequency_penalty - (counts > 0).to(logits.dtype) * presence_penalty


def top_p_filter(logits, top_p):
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches top_p
    (the most likely token always stays); the others get -inf. logits (B, V) -> (B, V)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # a token goes when the tokens ranked above it already reach top_p
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample_token(logits, *, temperature, top_k=0, top_p=1.0, generator=None):
    """One id per row of logits (B, V) -> (B, 1), after the penalty. Order as in HF's samplers:
    temperature, then top-k, then top-p. temperature 0 is greedy (top-k/top-p change nothing then)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # from the row's maximum: a tiny temperature then sends the others to -inf, never the maximum to inf (nan)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th stay in
    logits = top_p_filter(logits, top_p)
    # a caller-owned generator: reproducible answers without touching the global RNG
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


def check_sampling(*, max_tokens, temperature, top_k, top_p, repetition_penalty, frequency_penalty=0.0,
                   presence_penalty=0.0):
    """ValueError naming the bad setting and its allowed range."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off)")
    if repetition_penalty < 0.01:  # below it, dividing a logit by it overflows to inf: no longer a penalty
        raise ValueError(f"repetition_penalty={repetition_penalty} must be >= 0.01 (1 = off; 1.1 to 1.3 against "
                         f"loops)")
    for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if not -2 <= value <= 2:  # OpenAI's range
            raise ValueError(f"{name}={value} must be in [-2, 2] (0 = off)")


# -----------------------------------------------------------------------------
# prompts


def build_prompt(tok, history, user_text, *, system_prompt="", max_seq_len, reserve):
    """(prompt ids, number of leading history messages left out) for the next answer.

    history holds the earlier turns, [user, assistant, user, assistant, ...]. The tokenizer's chat format (the one
    rendering code path, the same SFT trains on) drops the oldest exchanges until the prompt leaves
    `reserve` positions for the answer; the system prompt and the new message always stay. When the new
    message alone leaves less than `reserve`, it gets whatever room there is; when it does not fit at all,
    that is a UserError naming the sizes.
    """
    fmt = tok.chat_format
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    new = [{"role": "user", "content": user_text}]
    try:
        ids = fmt.render_prompt(system + list(history) + new, max_seq_len=max_seq_len - reserve)
    except UserError:
        ids = fmt.render_prompt(system + new, max_seq_len=max_seq_len)
    kept = fmt.user_turns(ids) - 1  # the exchanges that were kept (the new message is a user turn too)
    return ids, len(history) - 2 * kept


# -----------------------------------------------------------------------------
# batched decoding: every running sequence advances by one token per forward


class Sequence:
    """One answer being generated: its prompt, sampling settings, KV cache and progress (BatchedGenerator.add makes
    it). finish_reason is None while it runs, then 'stop' (a stop token, not emitted), 'length' (max_tokens),
    'context' (the model's max_seq_len is full: no position is left to feed another token) or 'cancelled'.
    Padding ids of the vocabulary (>= tok.n_tokens) are never sampled. The repetition penalty covers the prompt
    and the answer, except the stop tokens: penalising <|assistant_end|> because earlier turns ended with it would
    make answers run on, the very thing the penalty is meant to cure. The frequency and presence penalties count
    the answer only, as OpenAI's do."""

    def __init__(self, model, ids, *, max_tokens, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                 frequency_penalty=0.0, presence_penalty=0.0, stop_ids=(), generator=None):
        check_sampling(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                       presence_penalty=presence_penalty)
        limit = model.config.max_seq_len
        if not 0 < len(ids) <= limit:
            raise ValueError(f"the prompt is {len(ids)} tokens; the model takes 1 to max_seq_len={limit}")
        self.max_tokens, self.limit = max_tokens, limit
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        self.repetition_penalty = repetition_penalty
        self.frequency_penalty, self.presence_penalty = frequency_penalty, presence_penalty
        self.stop_ids = set(stop_ids)
        dev, vocab = model.lm_head.weight.device, model.config.vocab_size
        # positions fed to the model: the prompt, then every answer token but the last
        self.cache = KVCache(model.config.depth, min(limit, len(ids) + max_tokens - 1))
        self.seen = self.counts = None
        if repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=dev)
            self.seen[torch.tensor(ids, device=dev)] = True
            # a stop ends the answer, so it is never added back once it is cleared here
            self.seen[torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=dev)] = False
        if frequency_penalty or presence_penalty:
            self.counts = torch.zeros(vocab, device=dev)
        self.feed = list(ids)  # what the next forward reads: the prompt, then the last answer token
        self.n = 0             # answer tokens so far
        self.finish_reason = None
        self.job = None        # the caller's own handle (serve.py keeps its request here)

    def sample(self, logits):
        """The next id from this sequence's logits (1, V), after its penalties."""
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.repetition_penalty)
        if self.counts is not None:
            logits = apply_penalties(logits, self.counts, self.frequency_penalty, self.presence_penalty)
        return sample_token(logits, **self.sampling)

    def advance(self, t):
        """Book the sampled id t; returns it, or None when it was a stop (then the answer is over)."""
        if t in self.stop_ids:
            self.finish_reason = "stop"
            return None
        self.n += 1
        if self.n >= self.max_tokens:
            self.finish_reason = "length"
        elif self.cache.pos >= self.limit:
            self.finish_reason = "context"
        else:
            if self.seen is not None:
                self.seen[t] = True
            if self.counts is not None:
                self.counts[t] += 1
            self.feed = [t]
        return t


class BatchedGenerator:
    """Decodes many sequences at once: a sequence joins with add() and leaves when it finishes or is removed, and
    each step() advances every running sequence by one token.

    A sequence that just joined gets its prompt through the model alone (prefill: its own forward, as long as the
    prompt); all the others go through one forward together, one row each, each row with its own KV cache, length
    and sampling settings (model.GPT takes a list of caches: attention runs row by row on exactly each row's keys,
    and only the matmuls are shared). A sequence's numbers do not depend on what else is in the batch as long as
    the matmul kernels give each row the same result whatever the row count; on the CPU pack_linears() makes it so,
    and we never give them a single row (MKL and oneDNN take another code path, with other rounding, for one row:
    a lone sequence gets a padding row). Greedy answers are then identical alone and in any batch, and identical
    to chat.py's (generate_stream runs here too, as a batch of one).
    """

    def __init__(self, model, tok, autocast=None):
        self.model, self.tok = model, tok
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self.running = []

    def add(self, ids, **settings) -> Sequence:
        """Queue the prompt ids (a list of ints) for the next step; settings as Sequence takes them (ValueError if
        one is out of range or the prompt does not fit)."""
        seq = Sequence(self.model, ids, **settings)
        self.running.append(seq)
        return seq

    def remove(self, seq, reason="cancelled"):
        """Take a sequence out before it finished (the client went away, its time ran out)."""
        if seq in self.running:
            self.running.remove(seq)
            seq.finish_reason = seq.finish_reason or reason

    @torch.no_grad()
    def step(self) -> list:
        """One token for every running sequence: [(sequence, id or None)], None when it stopped at a stop token.
        Sequences that finished (finish_reason set) have left the batch when this returns."""
        fresh = [s for s in self.running if s.cache.pos == 0]
        old = [s for s in self.running if s.cache.pos > 0]
        rows = [(s, self._logits([s.feed], s.cache)) for s in fresh]
        if old:
            feed, caches = [s.feed for s in old], [s.cache for s in old]
            if len(old) == 1:  # a padding row: see the class docstring
                feed, caches = feed + [[0]], caches + [None]
            logits = self._logits(feed, caches)
            rows += [(s, logits[i:i + 1]) for i, s in enumerate(old)]
        if not rows:
            return []
        ids = torch.cat([s.sample(lg) for s, lg in rows]).view(-1).tolist()  # one host sync for the whole batch
        events = [(s, s.advance(t)) for (s, _), t in zip(rows, ids)]
        self.running = [s for s in self.running if s.finish_reason is None]
        return events

    def _logits(self, feed, cache):
        """Last-position logits (rows, V) of feed (rows of ids); cache: one KVCache (a prefill) or one per row."""
        x = torch.tensor(feed, dtype=torch.long, device=self.model.lm_head.weight.device)
        with self.autocast:
            logits = self.model.last_logits(x, cache)
        logits[:, self.tok.n_tokens:] = float("-inf")  # padding rows of the embedding: never trained, never text
        return logits


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is also kept prepacked in oneDNN's blocked layout, for inference on the CPU.

    Two reasons. Speed: MKL packs the weight anew in every matmul of more than a few rows, so a depth-12 decode
    step of 8 rows took 2.6x the time of one row; prepacked, 1.5x (one thread on this 2-core CPU). Exactness:
    oneDNN gives each row the same bits for any row count from 2 up, where MKL changes kernels at row counts that
    depend on the matrix shape (a row's logits would depend on how many others share the batch). The weight
    Parameter itself stays (state_dict keys, tied embeddings and .device are unchanged); when it changes in
    place, or autograd is on, this falls back to F.linear."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
        self._version = self.weight._version

    def forward(self, x):
        if torch.is_grad_enabled() or x.dtype != torch.float32 or self.weight._version != self._version:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._packed, None, "none", [], "")


def pack_linears(model, dtype=torch.float32) -> bool:
    """Swap every bias-free nn.Linear of an inference model for a PackedLinear, in place, when the model runs on
    the CPU in float32 and torch has oneDNN; True if it did. Only for models that serve answers (chat.py,
    serve.py): a model being trained keeps plain Linears."""
    if model.lm_head.weight.device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:  # private ops (the ones Inductor's CPU weight freezing uses): a torch without them serves unpacked
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 8))
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8), w, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.bias is None and child.weight.dtype == torch.float32:
                setattr(module, name, PackedLinear(child))
    return True


# -----------------------------------------------------------------------------
# generation of one answer: a batch of one


def generate_stream(model, tok, ids, *, max_tokens, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                    frequency_penalty=0.0, presence_penalty=0.0, stop_ids=(), generator=None, autocast=None):
    """Yield the ids of an answer to the prompt `ids` (a list of ints) one at a time, as they are sampled.

    The prompt runs through the model once (prefill into a KV cache); each later step feeds only the token just
    sampled. A stop token ends the answer and is not yielded. The generator's return value (StopIteration.value;
    see `consume`) says why it ended: 'stop', 'length' or 'context' (see Sequence).
    """
    batch = BatchedGenerator(model, tok, autocast=autocast)
    seq = batch.add(ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                    presence_penalty=presence_penalty, stop_ids=stop_ids, generator=generator)
    while seq.finish_reason is None:
        for _, t in batch.step():
            if t is not None:
                yield t
    return seq.finish_reason


def generate(model, tok, ids, **kw) -> tuple:
    """(answer ids, finish reason): generate_stream run to its end, for callers that need no streaming."""
    out = []
    return out, consume(generate_stream(model, tok, ids, **kw), out.append)


def consume(stream, on_token) -> str:
    """Drive a generate_stream, calling on_token(id) for each id; returns the finish reason."""
    while True:
        try:
            on_token(next(stream))
        except StopIteration as e:
            return e.value


class StreamDecoder:
    """Token ids -> text, piece by piece. A byte-level token may hold part of a UTF-8 character (a Chinese
    character is 3 bytes, often split over 2-3 tokens); the incremental decoder keeps such a partial
    character until its last byte arrives, so a stream never shows U+FFFD for it. Only bytes that can
    never become valid UTF-8 turn into U+FFFD (the same text tok.decode() gives for the whole answer)."""

    def __init__(self, tok):
        self.tok = tok
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._decoder.decode(self.tok.decode_bytes([token_id]))

    def flush(self) -> str:
        """What is left at the end: an incomplete character decodes to U+FFFD here (the answer was cut)."""
        return self._decoder.decode(b"", final=True)


class StopStrings:
    """Text in, text safe to show out, for the caller's stop strings: a stop string never appears in what comes out,
    and text that may be the start of one is held back until later text settles it. feed() returns the text to
    show now; `stopped` turns True at the first stop string (the text before it has been returned)."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        text = self.held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        # the longest end of the text that is the beginning of a stop string waits for the next piece
        keep = max([k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])] or [0])
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        """What was held back when the answer ended without completing a stop string."""
        out, self.held = self.held, ""
        return out
