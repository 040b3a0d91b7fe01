"""model.py: HF parity, chunked loss, KV cache, optimizers. Run: python -m pytest -q tests/test_model.py"""
import io
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache
from optim import zeropower_via_newtonschulz5

V, T = 320, 32  # the byte tokenizer's padded vocab; a short context keeps every test tiny


def tiny(seed=0, randomize=False, **kw):
    """depth 2, width 64 model. randomize=True replaces the zero-init projections (o_proj,
    down_proj) with noise, so every weight gets a non-trivial gradient."""
    torch.manual_seed(seed)
    cfg = dict(depth=2, n_embd=64, vocab_size=V, max_seq_len=T)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model


def batch(seed=1, B=2, n_ignored=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y.view(-1)[:n_ignored] = -1  # an SFT-style mask over the first tokens
    return x, y


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# -----------------------------------------------------------------------------
# config and naming


def test_config_resolves_defaults_and_rejects_inconsistent_fields():
    c = GPTConfig(depth=4).resolved()
    assert (c.n_embd, c.n_head, c.n_kv_head, c.mlp_hidden) == (256, 2, 2, 704)
    c = GPTConfig(depth=12).resolved()
    assert (c.n_embd, c.n_head, c.mlp_hidden) == (768, 6, 2048)
    assert GPTConfig(depth=1).resolved().n_head == 1  # width 64 still gets one head
    for depth in range(1, 33):  # every default depth resolves (448 = 7 * 64 is not divisible by 3)
        c = GPTConfig(depth=depth).resolved()
        assert c.n_embd % c.n_head == 0 and (c.n_embd // c.n_head) % 2 == 0, depth
    assert -1 not in GPTConfig(depth=2).arch_dict().values()
    for bad in (dict(n_embd=100, n_head=3), dict(n_embd=64, n_head=4, n_kv_head=3), dict(depth=0),
                dict(n_embd=60, n_head=4)):  # head_dim 15 is odd: RoPE needs pairs
        with pytest.raises(ValueError):
            GPTConfig(**bad).resolved()


def test_state_dict_keys_are_hf_llama_names():
    model = tiny(n_head=4, n_kv_head=2)
    hf = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        hf |= {p + s + ".weight" for s in ("input_layernorm", "post_attention_layernorm",
                                            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    ours = {k if k.startswith("lm_head") else "model." + k for k in model.state_dict()}
    assert ours == hf  # no RoPE buffers, no extra keys
    assert model.state_dict()["layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)  # GQA


def hf_llama_logits(sd, cfg, idx):
    """Hugging Face LlamaForCausalLM's forward written out from its modeling code (rotate_half RoPE,
    repeat_kv, eager softmax attention), reading our weights under HF's key names."""
    H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
    B, S = idx.shape

    def rms(x, w):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).to(x.dtype)

    def rotate_half(x):
        return torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1)

    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([torch.outer(torch.arange(S).float(), inv_freq)] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x = sd["model.embed_tokens.weight"][idx]
    for i in range(cfg.depth):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(B, S, H, D).transpose(1, 2)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(B, S, KV, D).transpose(1, 2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(B, S, KV, D).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k[:, :, None].expand(B, KV, H // KV, S, D).reshape(B, H, S, D)  # repeat_kv
        v = v[:, :, None].expand(B, KV, H // KV, S, D).reshape(B, H, S, D)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, H * D)
        x = x + a @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("heads", [(1, 1), (4, 2)])
def test_forward_matches_hf_llama_math(heads):
    model = tiny(randomize=True, n_head=heads[0], n_kv_head=heads[1])
    sd = {k if k.startswith("lm_head") else "model." + k: v for k, v in model.state_dict().items()}
    x, _ = batch()
    with torch.no_grad():
        ours, ref = model(x), hf_llama_logits(sd, model.config, x)
    assert ours.dtype == torch.float32 and ours.shape == (2, T, V)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# -----------------------------------------------------------------------------
# loss


def test_init_loss_is_near_ln_vocab():
    # a uniform guess scores ln(V); much higher means a bad init (large logits) that wastes steps
    model = tiny()
    x, y = batch(B=4)
    with torch.no_grad():
        loss = model(x, y).item()
    assert abs(loss - math.log(V)) < 0.05, (loss, math.log(V))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_loss_and_grads_match_full_cross_entropy(reduction):
    model = tiny(randomize=True)
    x, y = batch(n_ignored=11)
    # chunk of 7 rows does not divide B*T = 64, and the ignored rows span a chunk boundary
    loss = model(x, y, reduction=reduction, loss_chunk_size=7)
    (loss * torch.linspace(0.5, 2, loss.numel()).view(loss.shape)).sum().backward()  # non-uniform upstream grad
    chunked = grads(model)
    model.zero_grad()
    ref = F.cross_entropy(model(x).view(-1, V), y.view(-1), ignore_index=-1, reduction=reduction)
    ref = ref.view(loss.shape)
    (ref * torch.linspace(0.5, 2, ref.numel()).view(ref.shape)).sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    if reduction == "none":
        assert loss.shape == (2, T) and (loss.view(-1)[:11] == 0).all()
    for name, g in grads(model).items():
        # Both paths sum the same float32 products in another order (chunks of 7 rows against one matmul; the
        # CPU's vector width, AVX2 or AVX-512, reorders them again), so an entry's rounding error follows the
        # size of the terms summed into it, not its own size: entries near zero may be off by ~1e-6 of the
        # largest gradient. The absolute tolerance therefore scales with the tensor's largest entry.
        scale = g.abs().max().item()
        torch.testing.assert_close(chunked[name], g, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name, scale=scale: f"{name} (largest |grad| {scale:.3g}): {m}")


def test_loss_with_no_valid_target_is_zero_not_nan():
    # an SFT micro-batch whose answers were all truncated away must not poison the step with NaN
    model = tiny()
    x, _ = batch()
    y = torch.full_like(x, -1)
    for reduction in ("mean", "sum"):
        model.zero_grad()
        loss = model(x, y, reduction=reduction)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters())
    assert not model(x, y, reduction="none").detach().any()


def test_eval_loss_without_grad_matches_training_loss():
    model = tiny(randomize=True)
    x, y = batch(n_ignored=5)
    with torch.no_grad():
        per_token = model(x, y, reduction="none", loss_chunk_size=10)
        mean = model(x, y)
    torch.testing.assert_close(mean, model(x, y).detach())
    torch.testing.assert_close(per_token.sum() / (y != -1).sum(), mean)


def test_backward_twice_is_refused():
    # the precomputed gradients are scaled in place by the first backward: a second one must fail loudly
    model = tiny()
    loss = model(*batch())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_fp16_cpu_autocast_runs_and_matches_fp32():
    # stands in for fp16 autocast on a T4: same code path, half-precision matmuls, float32 softmax
    model = tiny(randomize=True, n_head=4, n_kv_head=2)
    x, y = batch(n_ignored=3)
    loss32 = model(x, y)
    loss32.backward()
    g32 = grads(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss16 = model(x, y, loss_chunk_size=13)
        logits = model(x)
    loss16.backward()
    assert loss16.dtype == torch.float32 and logits.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 1e-2
    for name, g in grads(model).items():
        assert g.dtype == torch.float32, name  # master weights stay float32
        assert ((g - g32[name]).norm() / g32[name].norm()).item() < 2e-2, name


# -----------------------------------------------------------------------------
# positions, KV cache, generation


def test_rope_is_relative_and_table_stays_float32():
    model = tiny(randomize=True)
    x, _ = batch()
    x = x[:, :20]
    with torch.no_grad():  # attention only sees position differences, so an offset changes nothing
        torch.testing.assert_close(model(x, pos_offset=12), model(x), rtol=1e-4, atol=1e-4)
    cos = model.rope_cos.clone()
    model.to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and torch.equal(model.rope_cos, cos)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(x, pos_offset=T - 5)


def test_kv_cache_prefill_in_pieces_matches_full_forward():
    # chat feeds a conversation turn by turn: multi-token steps after a prefix, and single tokens
    model = tiny(randomize=True, n_head=4, n_kv_head=2)
    x, _ = batch()
    cache = KVCache(n_layer=2, max_len=T)
    with torch.no_grad():
        full = model(x)
        # several tokens after a cached prefix need the offset causal mask
        pieces = [model(x[:, a:b], kv_cache=cache) for a, b in ((0, 9), (9, 10), (10, 25), (25, T))]
    assert cache.pos == T
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(top_k=1), dict(temperature=0.9, top_k=40)])
def test_generate_with_cache_equals_without(kw):
    # same seed, same tokens: the cache may only change speed, never the samples. Generation lives in
    # engine.py (the one sampling loop); the reference runs the whole sequence through forward() every step.
    import engine
    from tokenizer import get_tokenizer
    tok = get_tokenizer("bytes")  # n_tokens 263 < V: the engine never samples the padding rows, nor may we
    model = tiny(randomize=True, n_head=4, n_kv_head=2).eval()
    kw = {"temperature": 1.0, **kw}
    for prompt in batch(B=3)[0][:, :5].tolist():
        gen = torch.Generator().manual_seed(123)
        cached, _ = engine.generate(model, tok, prompt, max_tokens=20, generator=gen, **kw)
        gen, ids = torch.Generator().manual_seed(123), list(prompt)
        with torch.no_grad():
            for _ in range(20):
                logits = model(torch.tensor([ids]))[:, -1].clone()
                logits[:, tok.n_tokens:] = float("-inf")
                ids.append(engine.sample_token(logits, generator=gen, **kw).item())
        assert len(cached) == 20 and cached == ids[5:]
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate(model, tok, list(range(T + 1)), max_tokens=1)


# -----------------------------------------------------------------------------
# gradient checkpointing, FLOPs


def test_gradient_checkpointing_gives_same_grads():
    model = tiny(randomize=True)
    x, y = batch(n_ignored=4)
    model(x, y).backward()
    plain = grads(model)
    model.zero_grad()
    model.gradient_checkpointing = True
    saved = []  # count what autograd keeps for backward: checkpointing must keep less
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model(x, y)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(-t.numel()) or t, lambda t: t):
        model.gradient_checkpointing = False
        model(x, y)
    assert sum(n for n in saved if n > 0) < 0.5 * -sum(n for n in saved if n < 0)
    loss.backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(g, plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_flops_per_token_positive_and_grows_with_depth():
    # MFU divides by this: it must count every matmul weight (lm_head too) but not the embedding lookup
    f2, f4 = tiny().estimate_flops_per_token(), tiny(depth=4, n_embd=64).estimate_flops_per_token()
    assert 0 < f2 < f4
    m = tiny()  # 1 head of 64 at T = 32 for the attention term
    assert f2 == 6 * (m.num_params() - V * 64) + 12 * 2 * 1 * 64 * T


# -----------------------------------------------------------------------------
# optimizers


def train(model, opt, steps, x, y, scaler=None):
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
            loss = model(x, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_optimizer_reduces_loss_on_fixed_batch(kind):
    model = tiny()
    opt = model.configure_optimizers(kind, max_lr=0.004, weight_decay=0.01)
    assert all("base_lr" in g and g["lr"] == g["base_lr"] for g in opt.param_groups)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))
    losses = train(model, opt, 30, *batch(B=4))
    assert losses[-1] < 0.6 * losses[0], losses


def test_muon_groups_split_matrices_from_embeddings_and_norms():
    model = tiny()
    opt = model.configure_optimizers("muon", max_lr=0.01, matrix_lr=0.03)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert len(muon) == 1 and muon[0]["base_lr"] == 0.03
    assert len(muon[0]["params"]) == 2 * 7  # q, k, v, o, gate, up, down per layer
    ids = {id(p) for p in muon[0]["params"]}
    assert id(model.embed_tokens.weight) not in ids and id(model.lm_head.weight) not in ids
    with pytest.raises(ValueError, match="muon"):
        model.configure_optimizers("sgd")


def test_muon_update_has_unit_spectral_scale():
    model = tiny()
    opt = model.configure_optimizers("muon", matrix_lr=0.01)
    mats = {"square": model.layers[0].self_attn.q_proj.weight, "tall": model.layers[0].mlp.gate_proj.weight}
    before = {k: p.detach().clone() for k, p in mats.items()}
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    for k, p in mats.items():
        s = torch.linalg.svdvals(p.detach() - before[k]) / 0.01
        # orthogonalised step of size lr; tall (192 x 64) matrices get sqrt(rows/cols) more.
        # 5 NS steps leave the few tiniest singular values of a random square matrix low: use the median
        expect = 1.0 if k == "square" else math.sqrt(192 / 64)
        assert 0.6 * expect < s.median() and s.max() < 1.3 * expect, (k, s)


def test_newton_schulz_orthogonalises():
    G = torch.randn(48, 24, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(G))
    assert s.min() > 0.5 and s.max() < 1.3, s  # ~1 each: an approximate U V^T


# the resume test of the trainer relies on this: saving and loading mid-run must not change the run
@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_optimizer_state_dict_round_trip_is_bitwise(kind):
    x, y = batch(B=2)
    model = tiny()
    opt = model.configure_optimizers(kind)
    train(model, opt, 3, x, y)
    # through bytes with weights_only=True, as a checkpoint would be stored and read
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    continued = train(model, opt, 3, x, y)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = tiny(seed=99)  # different init: everything must come from the checkpoint
    model2.load_state_dict(ck["model"])
    opt2 = model2.configure_optimizers(kind)
    opt2.load_state_dict(ck["opt"])
    assert train(model2, opt2, 3, x, y) == continued
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), n


def test_muon_training_is_deterministic():
    x, y = batch(B=2)
    params = []
    for _ in range(2):
        model = tiny()
        train(model, model.configure_optimizers("muon"), 4, x, y)
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_grad_scaler_with_fp16_autocast(kind):
    # GradScaler must be able to unscale and skip steps on our one optimizer object (no unscale_
    # call here: scaler.step does it, or hands the scale to the fused AdamW kernel)
    model = tiny()
    opt = model.configure_optimizers(kind)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    losses = train(model, opt, 12, *batch(B=2), scaler=scaler)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert scaler.get_scale() > 0
