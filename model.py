"""model.py: the t4chat GPT, a Llama-shaped decoder.

Read top to bottom: the config, the building blocks (RMSNorm, RoPE, KV cache, attention, SwiGLU MLP, block),
the GPT itself, and last the chunked cross-entropy its forward() uses for the loss. The optimizer (Muon +
AdamW) is in optim.py, generation in engine.py. Pure torch: no I/O, no globals, no device logic. Module names
follow Hugging Face's LlamaForCausalLM one-to-one (HF key = "model." + our key, except lm_head), so export is a
rename (hf.py).
"""
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from optim import MuonAdamW

# -----------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    depth: int = 12              # the one size dial: n_layer
    n_embd: int = -1             # -1 = depth * 64
    n_head: int = -1             # -1 = n_embd // 128 (at least 1), lowered until it divides n_embd
    n_kv_head: int = -1          # -1 = n_head; smaller = grouped-query attention (must divide n_head)
    mlp_hidden: int = -1         # -1 = 8/3 * n_embd rounded UP to a multiple of 64 (SwiGLU, ~same params as 4x GELU)
    vocab_size: int = 50304
    max_seq_len: int = 1024      # RoPE table length (generation may not exceed it)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # lm_head shares embed_tokens' weight (SmolLM2, GPT-2); False = Llama's two matrices

    def resolved(self) -> "GPTConfig":
        """A copy with every -1 filled in; ValueError if the fields do not fit together."""
        c = replace(self)  # a copy: the user's config object keeps its -1s (it is what they typed)
        if c.depth < 1:
            raise ValueError(f"depth={c.depth} must be >= 1")
        c.n_embd = c.depth * 64 if c.n_embd == -1 else c.n_embd
        if c.n_head == -1:
            # head_dim ~128 (nanochat's choice): few, wide heads keep the attention matmuls efficient.
            # n_embd // 128 heads, lowered until they divide n_embd (depth 7: 448 -> 2 heads of 224)
            c.n_head = max(1, c.n_embd // 128)
            while c.n_embd % c.n_head or (c.n_embd // c.n_head) % 2:
                c.n_head -= 1
        c.n_kv_head = c.n_head if c.n_kv_head == -1 else c.n_kv_head
        # ceil(8/3 * n / 64) * 64 == ceil(n / 24) * 64; a multiple of 64 keeps matmuls aligned
        c.mlp_hidden = -(-c.n_embd // 24) * 64 if c.mlp_hidden == -1 else c.mlp_hidden
        for name in ("n_embd", "n_head", "n_kv_head", "mlp_hidden", "vocab_size", "max_seq_len"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name}={getattr(c, name)} must be >= 1 (or -1 for the default)")
        if c.n_embd % c.n_head:
            ok = [h for h in range(1, c.n_embd + 1) if c.n_embd % h == 0 and (c.n_embd // h) % 2 == 0]
            raise ValueError(f"n_embd={c.n_embd} is not divisible by n_head={c.n_head}; pick n_head among {ok}")
        if (c.n_embd // c.n_head) % 2:
            raise ValueError(f"head_dim={c.n_embd // c.n_head} (n_embd/n_head) must be even for RoPE")
        if c.n_head % c.n_kv_head:
            raise ValueError(f"n_kv_head={c.n_kv_head} must divide n_head={c.n_head}")
        if c.rope_theta <= 0 or c.norm_eps <= 0:
            raise ValueError(f"rope_theta={c.rope_theta} and norm_eps={c.norm_eps} must be > 0")
        return c

    def arch_dict(self) -> dict:
        """Resolved fields: stored in checkpoints and compared on load."""
        return asdict(self.resolved())


# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """HF Llama's RMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast back, then * weight."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # under autocast the residual stream stays float32 (only matmul outputs are half), so
        # training takes the first branch; the second serves models cast to half for inference
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # already float32: the fused kernel does exactly the HF math in one pass
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        return self.weight * y.to(x.dtype)


def rope_table(head_dim, max_seq_len, theta, device=None):
    """cos/sin (max_seq_len, head_dim/2) in float32, built once per model."""
    # frequency i pairs channel i with channel i + D/2 (HF's layout), theta^(-2i/D) as in Llama
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rotary(x, cos, sin):
    """HF's rotate_half RoPE (pairs (i, i + D/2), not interleaved) on x (B, T, H, D).

    HF computes x * cat(cos, cos) + rotate_half(x) * cat(sin, sin); we do the same math on the
    two halves, which saves the duplicated tables and one full-size temporary.
    """
    # (T, D/2) -> (T, 1, D/2), or per-row tables (B, T, D/2) -> (B, T, 1, D/2): broadcast over heads
    cos, sin = cos.to(x.dtype).unsqueeze(-2), sin.to(x.dtype).unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Keys/values of every layer for incremental decoding, preallocated to max_len positions.

    `pos` is how many positions are filled; GPT.forward advances it after the last layer, so
    the next call's tokens get RoPE positions pos, pos+1, ...
    """

    def __init__(self, n_layer, max_len):
        self.max_len, self.pos = max_len, 0
        self.k, self.v = [None] * n_layer, [None] * n_layer

    def update(self, layer_idx, k, v):
        """Store k, v (B, n_kv_head, T, D) after the filled part; return keys/values so far."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} requested")
        if self.k[layer_idx] is None:  # allocate lazily: we learn batch, dtype and device here
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k[layer_idx] = k.new_empty(shape)
            self.v[layer_idx] = v.new_empty(shape)
        self.k[layer_idx][:, :, self.pos:end] = k
        self.v[layer_idx][:, :, self.pos:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, self.n_head * self.head_dim, bias=False)
        # with GQA, k/v have fewer heads: smaller projections and a smaller KV cache
        self.k_proj = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        # rotate before caching: cached keys keep their own positions, so a step only rotates itself
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if isinstance(kv_cache, list):
            # each row is its own sequence with its own cache and length (batched serving): every row attends to
            # exactly its own keys, with the shapes it would have alone. One padded, masked SDPA over the batch
            # would change the last bits of a row's softmax sums with the other rows' lengths.
            y = torch.cat([self._attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], c) for b, c in enumerate(kv_cache)])
        else:
            y = self._attend(q, k, v, kv_cache)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def _attend(self, q, k, v, kv_cache):
        T = q.size(2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        # SDPA repeats each kv head for its group of query heads (same grouping as HF's repeat_kv)
        gqa = self.n_kv_head != self.n_head
        T_k = k.size(2)
        if T_k == T:    # no prefix: plain causal attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if T == 1:      # one new token after a cached prefix sees everything
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        # several new tokens after a prefix: is_causal would align the mask top-left (query i
        # sees keys <= i), but query i sits at position T_k - T + i, so we build the mask
        mask = torch.ones(T, T_k, dtype=torch.bool, device=q.device).tril(diagonal=T_k - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache=None):
        # pre-norm residual block: the residual stream itself is never normalised, as in Llama
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config.resolved()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.depth)])
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied by default, as in Llama
        if cfg.tie_embeddings:
            # one Parameter under two names: state_dict() keeps both keys (so the layout matches HF's), while
            # parameters() and named_parameters() list it once, so optimizers and num_params() see one matrix
            self.lm_head.weight = self.embed_tokens.weight
        # non-persistent: the state_dict holds exactly HF's keys; the table is rebuilt from config
        cos, sin = rope_table(cfg.n_embd // cfg.n_head, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False  # the trainer flips this; see _hidden
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """nanochat's scheme, which suits RMSNorm + Muon.

        - embed_tokens ~ N(0, 1): an RMSNorm reads it first, so its scale only sets how strongly the
          token identity stands in the residual stream next to the blocks' outputs.
        - q/k/v/gate/up ~ N(0, 1/sqrt(n_embd)): unit-variance outputs for unit-RMS inputs.
        - o_proj, down_proj = 0: every block starts as the identity; their gradients are non-zero
          from step one, and the other matrices start learning once these move.
        - lm_head ~ N(0, 0.001): logits start near 0, so the initial loss is ln(vocab_size).
        - tied: the shared matrix ends with lm_head's N(0, 0.001) (it is initialised last). N(0, 1) would make each
          token's own logit ~n_embd at the start (its embedding dotted with itself), far above ln(vocab_size); the
          first RMSNorm does not care about the embedding's scale.
        """
        cfg = self.config
        nn.init.normal_(self.embed_tokens.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for layer in self.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj):
                nn.init.normal_(lin.weight, std=cfg.n_embd ** -0.5)
            nn.init.zeros_(layer.self_attn.o_proj.weight)
            nn.init.zeros_(layer.mlp.down_proj.weight)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def _apply(self, fn, recurse=True):
        # .half()/.to(bfloat16) would round the RoPE table and to_empty() (meta-device builds) would
        # leave it uninitialised; the table is tiny, so after any such move we rebuild it in float32
        super()._apply(fn, recurse)
        cfg = self.config
        self.rope_cos, self.rope_sin = rope_table(cfg.n_embd // cfg.n_head, cfg.max_seq_len,
                                                  cfg.rope_theta, device=self.rope_cos.device)
        return self

    def _hidden(self, idx, kv_cache=None, pos_offset=0):
        """Final-norm hidden states (B, T, C) for tokens at positions start .. start+T-1.
        kv_cache: one KVCache for the whole batch, or a list with one per row (a row's sequence continues from its
        own cache.pos; None = a row that stands alone at position 0, e.g. padding)."""
        T = idx.size(1)
        if isinstance(kv_cache, list):
            starts = [c.pos if c is not None else 0 for c in kv_cache]
            start = max(starts)  # the range check below is the longest row's
            # (B, T) positions: the RoPE tables below become (B, T, D/2), each row rotated at its own positions
            pos = torch.tensor(starts, device=idx.device)[:, None] + torch.arange(T, device=idx.device)
        else:
            start = kv_cache.pos if kv_cache is not None else pos_offset
            pos = slice(start, start + T)
        if start + T > self.config.max_seq_len:
            raise ValueError(f"positions {start}..{start + T - 1} exceed max_seq_len={self.config.max_seq_len} "
                             f"(the RoPE table); use shorter inputs or a model with a larger max_seq_len")
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        x = self.embed_tokens(idx)  # float32 even under autocast (embedding is not autocast)
        # recompute each block in backward instead of storing its activations (memory for time)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_ckpt and kv_cache is None:
                # non-reentrant: works with DDP and with inputs that do not require grad
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv_cache)
        for c in kv_cache if isinstance(kv_cache, list) else [kv_cache]:
            if c is not None:
                c.pos += T
        return self.norm(x)

    def forward(self, idx, targets=None, *, reduction="mean", loss_chunk_size=None, kv_cache=None, pos_offset=0):
        """targets None -> float32 logits (B, T, V); else the loss ('mean' over non-ignored tokens,
        'sum', or 'none' -> (B, T) with 0 at ignored positions). targets == -1 is ignored.
        With a kv_cache, positions continue from kv_cache.pos and pos_offset is not used.
        loss_chunk_size: rows of the flattened (B*T) batch per loss chunk (None = ~64 MB of float32 logits per chunk).
        """
        h = self._hidden(idx, kv_cache, pos_offset)
        if targets is None:  # inference / analysis: the caller asked for the full logits
            return self.lm_head(h).float()
        loss = chunked_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.reshape(-1),
                                     reduction, loss_chunk_size)
        return loss.view(targets.shape) if reduction == "none" else loss

    def last_logits(self, idx, kv_cache=None):
        """float32 logits (B, V) of the last position only: what generation samples from. A 2048-token prefill
        through forward() would build a (2048, 50304) float32 tensor (400 MB) for the one row it needs."""
        return self.lm_head(self._hidden(idx, kv_cache)[:, -1]).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops_per_token(self) -> float:
        """nanochat's estimate: 6 per weight that multiplies (the embedding is a lookup, lm_head counts)
        plus 12 * L * H * head_dim * T for the attention scores and weighted sum at T = max_seq_len."""
        cfg = self.config
        # tied, num_params() counts the shared matrix once, and it is lm_head's matmul that costs FLOPs
        lookup = 0 if cfg.tie_embeddings else self.embed_tokens.weight.numel()
        n_matmul = self.num_params() - lookup
        attn = 12 * cfg.depth * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.max_seq_len
        return float(6 * n_matmul + attn)

    # -------------------------------------------------------------------------
    # optimizer

    def configure_optimizers(self, optimizer="muon", max_lr=0.004, matrix_lr=0.02, weight_decay=0.0,
                             betas=(0.9, 0.95), eps=1e-8, muon_momentum=0.95, ns_dtype=torch.float32):
        """One torch.optim.Optimizer (optim.MuonAdamW, or torch's AdamW); every group carries 'base_lr', its
        peak rate (the trainer sets group['lr'] = group['base_lr'] * the schedule's multiplier each step).

        'muon': Muon (lr matrix_lr, weight_decay) for the attention/MLP matrices; AdamW (no weight
        decay) for the rest, at max_lr * multiplier * (n_embd/768)^-0.5 (nanochat's rule: its LRs were
        tuned at width 768, AdamW steps shrink as 1/sqrt(width)). Multipliers: lm_head 1, norms 1,
        embed_tokens 50 (at max_lr 0.004 and width 768 that is nanochat's 0.004 and 0.2); tied, the shared
        matrix takes lm_head's.
        'adamw': torch AdamW at max_lr everywhere, weight decay on 2-D weights only.
        """
        named = list(self.named_parameters())  # a fixed order: optimizer state is saved by position
        if optimizer == "adamw":
            decay = [p for _, p in named if p.dim() >= 2]
            no_decay = [p for _, p in named if p.dim() < 2]
            groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
            for g in groups:
                g.update(lr=max_lr, base_lr=max_lr)
            # fused: one pass per tensor; on 2 CPU cores ~10x faster than the default for-loop
            # (10 ms vs 100 ms per step at depth 4 / vocab 50304), same math, deterministic
            fused = all(p.device.type in ("cpu", "cuda") for _, p in named)
            return torch.optim.AdamW(groups, lr=max_lr, betas=betas, eps=eps, fused=fused)
        if optimizer != "muon":
            raise ValueError(f"optimizer={optimizer!r} is not known; use 'muon' or 'adamw'")
        width_scale = (self.config.n_embd / 768) ** -0.5
        # Muon is for hidden matrices only: for the embedding (a lookup) and lm_head (a classifier)
        # Keller Jordan and nanochat found AdamW works better
        matrices = [p for n, p in named if n.startswith("layers.") and p.dim() == 2]
        norms = [p for n, p in named if p.dim() == 1]
        adam = dict(kind="adamw", betas=betas, eps=eps, weight_decay=0.0)
        groups = [
            dict(kind="muon", params=matrices, base_lr=matrix_lr, momentum=muon_momentum,
                 weight_decay=weight_decay),
            dict(adam, params=[self.lm_head.weight], base_lr=max_lr * width_scale),
            dict(adam, params=[self.embed_tokens.weight], base_lr=max_lr * 50 * width_scale),
            dict(adam, params=norms, base_lr=max_lr * width_scale),
        ]
        if self.config.tie_embeddings:
            # one matrix may sit in one group only (torch refuses duplicates): the classifier's rate, since the
            # lookup's 50x would move the logits 50x too fast
            del groups[2]
        for g in groups:
            g["lr"] = g["base_lr"]
        # a parameter missing from every group would silently never train
        n_grouped = sum(len(g["params"]) for g in groups)
        assert n_grouped == len(named), f"optimizer groups hold {n_grouped} of {len(named)} parameters"
        return MuonAdamW(groups, ns_dtype=ns_dtype)

# -----------------------------------------------------------------------------
# chunked cross-entropy: the full (B*T, vocab) logits never exist at once

# Default rows per chunk: 2**24 logits = 64 MB in float32 (333 rows at vocab 50304). Timed on
# 2 CPU cores, chunks of 256+ rows run at full matmul speed while ~80 rows lose ~10%; larger
# chunks only cost memory.
CHUNK_LOGITS = 2 ** 24


def default_chunk_rows(vocab_size):
    return max(64, CHUNK_LOGITS // vocab_size)


def _chunk_softmax(hc, wc, tc, buf, want_grad):
    """Loss per row of one chunk and, if want_grad, d(loss)/d(logits) = softmax - onehot.

    The logits go into `buf` (float32, reused across chunks: fresh 64 MB tensors per chunk cost
    page faults on CPU) and are turned into the softmax in place, so one chunk-sized buffer is
    all the memory this needs.
    """
    logits = buf[:hc.size(0)]
    if wc.dtype == torch.float32:
        torch.mm(hc, wc.t(), out=logits)
    else:
        logits.copy_(hc @ wc.t())      # half-precision matmul, float32 softmax
    target_logit = logits.gather(1, tc[:, None]).squeeze(1)
    # torch's softmax kernel, in place, makes fewer passes over the chunk than sub/exp/sum/div did.
    # It does not return the logsumexp, but the largest logit m has probability exp(m - m) / s = 1/s,
    # the largest in its row, so logsumexp = m + log(s) = m - log(max p); max p >= 1/vocab never
    # underflows. amax, not max: max also returns indices and runs ~10x slower on CPU.
    m = logits.amax(dim=-1)
    p = torch.softmax(logits, dim=-1, out=logits)
    loss = m - p.amax(dim=-1).log() - target_logit   # logsumexp - target logit
    if not want_grad:
        return loss, None
    p.scatter_add_(1, tc[:, None], p.new_full((tc.numel(), 1), -1.0))   # softmax - onehot
    return loss, p


def _accumulate_grads(g, hc, wc, gh_out, gw, first):
    """gh_out = g @ W and gw (+)= g^T @ h, the matmuls in the compute dtype of hc/wc."""
    if wc.dtype == torch.float32:
        torch.mm(g, wc, out=gh_out)
        gw.addmm_(g.t(), hc, beta=0.0 if first else 1.0)  # in place; beta=0 ignores the empty init
    else:
        g = g.to(wc.dtype)
        gh_out.copy_(g @ wc)
        gw.add_(g.t() @ hc)   # float32 accumulation across chunks


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (h @ W^T) against targets, chunk by chunk over the rows of h.

    For 'mean'/'sum' the upstream gradient is a scalar, so we compute the gradients w.r.t. h and W
    in forward (softmax - onehot per chunk) and keep only those: memory is N x C + V x C instead
    of N x V, and backward is one multiply. For 'none' (per-token losses, mostly eval) the
    upstream gradient differs per row, so backward recomputes each chunk's logits instead.
    Softmax math is float32; matmuls run in `compute_dtype` (the autocast dtype, or the input's).
    Rows whose target is -1 are dropped up front, which also makes sparse SFT masks cheap.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, reduction, chunk_rows, compute_dtype, need_grad):
        with torch.autocast(h.device.type, enabled=False):  # we pick every dtype ourselves
            # one host sync per call (the count of valid rows); pretraining batches are all valid
            # and skip the gather, SFT batches only pay the lm_head matmuls for answer tokens
            rows = (targets != -1).nonzero().squeeze(1)
            all_valid = rows.numel() == targets.numel()
            hv, tv = (h, targets) if all_valid else (h[rows], targets[rows])
            precompute = need_grad and reduction != "none"
            losses, gh, gw = _chunked_forward(hv, weight, tv, chunk_rows, compute_dtype, precompute)
        ctx.reduction = reduction
        if reduction == "none":
            if need_grad:
                ctx.save_for_backward(h, weight, targets)
                ctx.chunk_rows, ctx.compute_dtype = chunk_rows, compute_dtype
            return losses if all_valid else losses.new_zeros(h.size(0)).index_copy_(0, rows, losses)
        # mean over valid tokens; with none valid the sum is 0 and so is the mean (never 0/0 = NaN)
        scale = 1.0 / max(rows.numel(), 1) if reduction == "mean" else 1.0
        if precompute:
            gh = gh.mul_(scale) if all_valid else gh.new_zeros(h.shape).index_copy_(0, rows, gh.mul_(scale))
            # kept on ctx, not saved tensors, so backward can scale them in place and let go of them
            ctx.grads = (gh.to(h.dtype), gw.mul_(scale).to(weight.dtype))
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction != "none":
            if ctx.grads is None:
                raise RuntimeError("ChunkedCrossEntropy: backward ran twice on one loss (retain_graph "
                                   "is not supported: the gradients were consumed in place)")
            gh, gw = ctx.grads
            ctx.grads = None
            # grad_out is 1, 1/grad_accum or the GradScaler's scale: in place, no second V x C buffer
            gh, gw = gh.mul_(grad_out.to(gh.dtype)), gw.mul_(grad_out.to(gw.dtype))
        else:
            with torch.autocast(grad_out.device.type, enabled=False):
                gh, gw = _chunked_backward_none(ctx, grad_out)
        # autograd wants None for inputs that do not require grad
        gh = gh if ctx.needs_input_grad[0] else None
        gw = gw if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None


def _chunked_forward(h, weight, targets, chunk_rows, cdt, want_grad):
    """Per-row losses (float32) and, if want_grad, float32 grads w.r.t. h and weight of their sum."""
    n, dev = h.size(0), h.device
    wc = weight.to(cdt)  # no copy unless autocast runs the matmuls in half precision
    buf = torch.empty(min(chunk_rows, n), weight.size(0), dtype=torch.float32, device=dev)
    losses = torch.empty(n, dtype=torch.float32, device=dev)
    gh = gw = None
    if want_grad:
        gh = torch.empty(n, h.size(1), dtype=torch.float32, device=dev)
        gw = (torch.empty if cdt == torch.float32 else torch.zeros)(weight.shape, dtype=torch.float32, device=dev)
    for s in range(0, n, chunk_rows):
        hc, tc = h[s:s + chunk_rows].to(cdt), targets[s:s + chunk_rows]
        losses[s:s + chunk_rows], g = _chunk_softmax(hc, wc, tc, buf, want_grad)
        if want_grad:
            _accumulate_grads(g, hc, wc, gh[s:s + chunk_rows], gw, first=s == 0)
    if want_grad and n == 0:
        gw.zero_()  # no chunk ran, so nothing overwrote the empty init
    return losses, gh, gw


def _chunked_backward_none(ctx, grad_out):
    """Backward of reduction='none': recompute each chunk, weight its rows by grad_out."""
    h, weight, targets = ctx.saved_tensors
    cdt, chunk_rows = ctx.compute_dtype, ctx.chunk_rows
    grad_out = grad_out.reshape(-1).float() * (targets != -1)  # ignored rows get no gradient
    wc = weight.to(cdt)
    buf = torch.empty(min(chunk_rows, h.size(0)), weight.size(0), dtype=torch.float32, device=h.device)
    gh = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
    for s in range(0, h.size(0), chunk_rows):
        hc, tc = h[s:s + chunk_rows].to(cdt), targets[s:s + chunk_rows].clamp(min=0)
        _, g = _chunk_softmax(hc, wc, tc, buf, want_grad=True)
        g.mul_(grad_out[s:s + chunk_rows, None])
        _accumulate_grads(g, hc, wc, gh[s:s + chunk_rows], gw, first=False)
    return gh.to(h.dtype), gw.to(weight.dtype)


def chunked_cross_entropy(h, weight, targets, reduction="mean", chunk_rows=None):
    """Loss of the logits h @ weight^T without materialising them. h (N, C), targets (N,), -1 = ignore."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: use 'mean', 'sum' or 'none'")
    chunk_rows = default_chunk_rows(weight.size(0)) if chunk_rows is None else int(chunk_rows)
    if chunk_rows < 1:
        raise ValueError(f"loss_chunk_size={chunk_rows} must be >= 1 (or None for the default)")
    dev = h.device.type
    # we compute these outside the Function: inside forward, grad mode is always off
    # under autocast the matmuls run in the autocast dtype, like nn.Linear would
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return ChunkedCrossEntropy.apply(h, weight, targets, reduction, chunk_rows, compute_dtype, need_grad)
