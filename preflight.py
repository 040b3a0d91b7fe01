"""preflight.py: will it fit, and how long will it take? Memory per device and run time for a stage's settings on a
named GPU, printed before any step is trained (every stage takes --preflight=True, and --gpu=<name>):

    python train_base.py --preflight=True --gpu=4xT4                # the T4 guide's settings on 4 T4s
    python train_sft.py --preflight=True --gpu=RTX4060_8GB --dtype=float16 --gradient_checkpointing=True
    python preflight.py                                             # estimate against measurement on this CPU

Memory: weights, gradients and optimizer state from the model and the optimizer the stage built; activations
measured, not guessed: one small forward pass records every tensor autograd saves for backward (under the
precision the GPU would use, with and without gradient checkpointing), at two lengths, which gives the bytes per
token (attention is flash/memory-efficient, so linear in the sequence) and per pass (autocast's half-precision
weight copies); the chunked loss adds its float32 gradients and one 64 MB chunk of logits. Time: FLOPs per token x
tokens / (the GPU's peak x the MFU we expect there x GPUs). The expected MFU is an assumption until measured on
that card (BENCHMARKS.md has the measured ones).
"""
import os
import re
import sys

import torch

# name: (memory in GiB, compute capability, common.PEAK_FLOPS name, expected MFU). Memory is what torch sees on
# the card (a "16 GB" T4 has 15,360 MiB); we keep
# 0.5 GiB for the CUDA context and allocator slack. The expected MFU of a ~100 M-parameter model at these batch
# sizes (our assumption, to be replaced by measurements): Turing 30 %, Ampere/Ada 35 %, Hopper 40 %.
GPUS = {
    "T4": (15, (7, 5), "t4", 0.30), "V100_16GB": (16, (7, 0), "v100", 0.30), "V100_32GB": (32, (7, 0), "v100", 0.30),
    "RTX2080TI": (11, (7, 5), "2080", 0.30), "RTX3060_12GB": (12, (8, 6), "3060", 0.35),
    "RTX3080_10GB": (10, (8, 6), "3080", 0.35), "RTX3080_20GB": (20, (8, 6), "3080", 0.35),
    "RTX3090": (24, (8, 6), "3090", 0.35), "RTX4060_8GB": (8, (8, 9), "4060 laptop", 0.35),
    "RTX4090": (24, (8, 9), "4090", 0.35), "A10G": (24, (8, 6), "a10g", 0.35), "L4": (24, (8, 9), "l4", 0.35),
    "A100_40GB": (40, (8, 0), "a100", 0.40), "A100_80GB": (80, (8, 0), "a100", 0.40),
    "H100_80GB": (80, (9, 0), "h100", 0.40),
}
RESERVED_GIB = 0.5
GIB = 2 ** 30


def gpu_spec(name, device):
    """(label, memory bytes, capability, PEAK_FLOPS name, expected MFU) of --gpu=name, or of the local GPU."""
    import common
    if not name:
        if device.type != "cuda":
            raise common.UserError("preflight needs --gpu=<name> on a machine without a GPU; one of " + ", ".join(GPUS))
        props = torch.cuda.get_device_properties(device)
        cap = (props.major, props.minor)
        return props.name, props.total_memory, cap, props.name, 0.30 if cap < (8, 0) else 0.35
    key = next((k for k in GPUS if k.lower() == name.lower()), None)
    if key is None:
        raise common.UserError(f"--gpu={name!r} is not one we know; use one of {', '.join(GPUS)}")
    mem, cap, table_name, mfu = GPUS[key]
    return key, mem * GIB, cap, table_name, mfu


def saved_bytes(model, batch, seq_len, dtype):
    """Bytes autograd keeps for backward over one forward pass of (batch, seq_len), parameters excluded; each
    storage counted once. Under autocast in `dtype` (on a CPU, autocast runs the GPU's half-precision casts)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    device = next(model.parameters()).device
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    ctx = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    was = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(x, x, reduction="sum")  # no backward: the chunked loss's own buffers are counted by loss_bytes
    model.train(was)
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def activation_model(model, dtype, gradient_checkpointing, probe=64):
    """(bytes per token, bytes per forward pass) of the saved activations, from two probe lengths."""
    probe = max(1, min(probe, model.config.max_seq_len // 2))  # both lengths within the RoPE table
    flag = model.gradient_checkpointing
    model.gradient_checkpointing = gradient_checkpointing
    try:
        a, b = (saved_bytes(model, 1, t, dtype) for t in (probe, 2 * probe))
    finally:
        model.gradient_checkpointing = flag
    per_token = (b - a) / probe
    return per_token, max(0.0, a - per_token * probe)


def loss_bytes(model, tokens):
    """The chunked cross-entropy keeps float32 gradients for the hidden states (tokens x width) and lm_head
    (vocab x width) from forward to backward, and one chunk of float32 logits while it runs."""
    from model import default_chunk_rows
    c, v = model.config.n_embd, model.config.vocab_size
    return 4 * (tokens * c + v * c + min(tokens, default_chunk_rows(v)) * v)


def optimizer_bytes(optimizer):
    """State the optimizer will hold: 2 buffers per AdamW parameter, 1 per Muon or SGD-with-momentum parameter."""
    total = 0
    for g in optimizer.param_groups:
        n = sum(p.numel() * p.element_size() for p in g["params"])
        if g.get("kind") == "muon" or (isinstance(optimizer, torch.optim.SGD) and g.get("momentum")):
            total += n
        elif g.get("kind") == "adamw" or isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            total += 2 * n
    return total


def estimate(model, optimizer, *, device_batch_size, seq_len, dtype, gradient_checkpointing):
    """Bytes per device at the peak of a training step, by part."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token, per_pass = activation_model(model, dtype, gradient_checkpointing)
    if gradient_checkpointing:  # backward recomputes one block at a time: its full activations exist meanwhile
        per_token += activation_model(model, dtype, False)[0] / model.config.depth
    tokens = device_batch_size * seq_len
    return {"weights": weights, "gradients": weights, "optimizer state": optimizer_bytes(optimizer),
            "activations": per_token * tokens + per_pass, "logits and loss": loss_bytes(model, tokens),
            "per_token": per_token, "per_pass": per_pass}


def report(model, optimizer, *, c, schedule, world_size, accum, tokens_per_step, device, print0):
    """The preflight table for a stage about to train, and the largest device_batch_size that fits."""
    import common
    from model import default_chunk_rows
    m = re.fullmatch(r"(\d+)[xX](.+)", c.get("gpu", ""))
    name = m.group(2) if m else c.get("gpu", "")
    if m:  # --gpu=4xT4: the same global batch on 4 GPUs, so the accumulation per GPU changes (unless the user
        # gave grad_accum_steps, which is per GPU: then the global batch grows instead)
        if c.get("grad_accum_steps", -1) <= 0:
            accum = accum * world_size / int(m.group(1))
            accum = int(accum) if accum == int(accum) else f"{accum:.2f} (not a whole number: change the batch)"
        world_size = int(m.group(1))
    label, memory, cap, peak_name, mfu = gpu_spec(name, device)
    dtype, why = common.pick_dtype(torch.device("cuda"), c.get("dtype", "auto"), capability=cap)
    seq, batch = c["max_seq_len"], c["device_batch_size"]
    usable = memory - RESERVED_GIB * GIB
    lines = [f"preflight for {label} ({memory / GIB:.0f} GiB, compute capability {cap[0]}.{cap[1]}, "
             f"{str(dtype).removeprefix('torch.')}: {why}), {world_size} GPU(s) x {batch} sequences of {seq} tokens "
             f"x {accum} accumulation:"]
    fits = {}
    for ckpt in (False, True):
        est = estimate(model, optimizer, device_batch_size=batch, seq_len=seq, dtype=dtype,
                       gradient_checkpointing=ckpt)
        if world_size > 1:  # DDP all-reduces through buckets of its own: another copy of the gradients
            est["DDP buckets"] = est["gradients"]
        total = sum(v for k, v in est.items() if k not in ("per_token", "per_pass"))
        # linear in the batch: activations and the loss's hidden-state gradients (4 bytes x width per token);
        # fixed: weights, gradients, optimizer state, DDP buckets, the per-pass activations, and the loss's
        # lm_head gradient and logits chunk, the chunk taken at its largest
        c_, v_ = model.config.n_embd, model.config.vocab_size
        per_seq = (est["per_token"] + 4 * c_) * seq
        fixed = total - est["activations"] - est["logits and loss"] + est["per_pass"] + \
            4 * (v_ * c_ + default_chunk_rows(v_) * v_)
        fits[ckpt] = max(0, int((usable - fixed) // per_seq))
        lines.append(f"  gradient_checkpointing={ckpt}: " + ", ".join(
            f"{k} {v / GIB:.2f}" for k, v in est.items() if k not in ("per_token", "per_pass"))
            + f" GiB; total {total / GIB:.2f} of {usable / GIB:.1f} GiB usable: "
            + ("fits" if total <= usable else "DOES NOT FIT") + f"; largest device_batch_size that fits: {fits[ckpt]}")
    mine = bool(c.get("gradient_checkpointing"))
    if fits[mine] < batch:
        lines.append(f"  -> lower --device_batch_size to {fits[mine]} (accumulation grows, the global batch stays)"
                     + ("" if mine else ", or --gradient_checkpointing=True") if fits[mine] or fits[True] else
                     "  -> even one sequence does not fit: lower --max_seq_len or --depth")
    peak = common.peak_flops(peak_name, dtype)
    flops = model.estimate_flops_per_token() * tokens_per_step * schedule.steps
    if peak:
        hours = flops / (peak * mfu * world_size) / 3600
        lines.append(f"  time: {schedule.steps:,} steps x {tokens_per_step:,} tokens x "
                     f"{model.estimate_flops_per_token():.3g} FLOPs/token at an expected {100 * mfu:.0f} % MFU of "
                     f"{peak / 1e12:.0f} TFLOP/s x {world_size} GPU(s): about {hours:.1f} h of training "
                     f"(evaluation and checkpoints come on top)")
    print0("\n".join(lines))
    return fits


def measure_cpu(depth, n_embd, batch, seq_len, vocab=50304):
    """(estimated, measured) bytes of one fp32 training step's growth on this CPU: peak RSS during the first
    step (gradients, optimizer state, activations, loss buffers) minus RSS before it."""
    import gc
    import resource
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=depth, n_embd=n_embd, vocab_size=vocab, max_seq_len=seq_len))
    opt = model.configure_optimizers("muon")
    est = estimate(model, opt, device_batch_size=batch, seq_len=seq_len, dtype=torch.float32,
                   gradient_checkpointing=False)
    want = sum(v for k, v in est.items() if k not in ("weights", "per_token", "per_pass"))
    x = torch.randint(0, vocab, (batch, seq_len))
    gc.collect()
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * 4096
    loss = model(x, x, reduction="sum")
    loss.backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return want, peak - before


def main():
    """Estimate against measurement on this CPU at two sizes whose activations exceed 1 GB (one process each:
    peak RSS only grows)."""
    import json
    import subprocess
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        print(json.dumps(measure_cpu(*map(int, sys.argv[2:]))))
        return
    print(f"{'model':<26}{'tokens':>8}{'estimate':>11}{'measured':>11}{'ratio':>8}")
    for depth, width, batch, seq in ((4, 256, 16, 1024), (6, 384, 16, 1024)):
        out = subprocess.run([sys.executable, __file__, "--measure", str(depth), str(width), str(batch), str(seq)],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        want, got = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{f'depth {depth} width {width}':<26}{batch * seq:>8,}{want / GIB:>10.2f}G{got / GIB:>10.2f}G"
              f"{want / got:>8.2f}")


if __name__ == "__main__":
    main()
