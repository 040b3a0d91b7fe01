"""engine.py: generation, the one place that turns a model and a prompt into tokens.

Sampling (temperature, top-k, top-p, repetition penalty), KV-cache streaming generation and incremental
UTF-8 decoding. chat.py, evaluate.py, train_base.py's samples and the later faces (serve, eval) all call these;
none of them re-implements a sampling loop. One sampling vocabulary everywhere: max_tokens, temperature
(0 = greedy), top_k (0 = off), top_p (1 = off), repetition_penalty (1 = off). What ends an answer comes from the
tokenizer's chat format (tok.chat_format.stop_ids()).
"""
import codecs
import contextlib

import torch

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
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th stay in
    logits = top_p_filter(logits, top_p)
    # a caller-owned generator: reproducible answers without touching the global RNG
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


def check_sampling(*, max_tokens, temperature, top_k, top_p, repetition_penalty):
    """ValueError naming the bad setting and its allowed range."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off)")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (1 = off; 1.1 to 1.3 against loops)")


# -----------------------------------------------------------------------------
# generation: prefill once, then one token per step through the KV cache


def generate_stream(model, tok, ids, *, max_tokens, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                    stop_ids=(), generator=None, autocast=None):
    """Yield the ids of an answer to the prompt `ids` (a list of ints) one at a time, as they are sampled.

    The prompt runs through the model once (prefill into a KV cache); each later step feeds only the
    token just sampled. A stop token ends the answer and is not yielded. The generator's return value
    (StopIteration.value; see `consume`) says why it ended: 'stop' (a stop token), 'length' (max_tokens)
    or 'context' (the model's max_seq_len is full: no position is left to feed another token). Padding ids
    of the vocabulary (>= tok.n_tokens) are never sampled. The repetition penalty covers the prompt and the
    answer, except the stop tokens: penalising <|assistant_end|> because earlier turns ended with it would
    make answers run on, the very thing the penalty is meant to cure.
    """
    check_sampling(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty)
    limit = model.config.max_seq_len
    if not 0 < len(ids) <= limit:
        raise ValueError(f"the prompt is {len(ids)} tokens; the model takes 1 to max_seq_len={limit}")
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    dev = model.lm_head.weight.device
    stop_ids = set(stop_ids)
    # positions fed to the model: the prompt, then every answer token but the last
    cache = KVCache(model.config.depth, min(limit, len(ids) + max_tokens - 1))
    seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=dev)
    seen[torch.tensor(ids, device=dev)] = True
    seen[torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)] = False  # a stop ends the loop: never re-added
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    n = 0
    while True:
        with torch.no_grad(), autocast:
            logits = model.last_logits(x, cache)
        logits[:, tok.n_tokens:] = float("-inf")  # padding rows of the embedding: never trained, never text
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        token = sample_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        t = token.item()
        if t in stop_ids:
            return "stop"
        yield t
        n += 1
        if n >= max_tokens:
            return "length"
        if cache.pos >= limit:
            return "context"
        seen[t] = True
        x = token.view(1, 1)


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
