"""train_base.py: pretrain a base model on parquet text (stage 1 of the T4 guide).
in:  parquet shards under data_root      out: $NANOCHAT_BASE_DIR/checkpoints/<run_name or d<depth>>/
CPU smoke:  python train_base.py --depth=2 --max_seq_len=128 --device_batch_size=4 --total_batch_size=1024 \
                --max_steps=60 --eval_every=20 --data_root=../shared/data/pretrain --device=cpu --compile=False
4x T4:      torchrun --standalone --nproc_per_node=4 train_base.py
Overrides:  python train_base.py config/t4.py --depth=8   (config files: .py, .json, .yaml; -h lists every key)
"""
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from checkpoint import CheckpointManager, check_arch, load_checkpoint, resolve_checkpoint, rng_state, \
    set_rng_state, unwrap, STAGE_DIRS
from common import UserError, print0

# ---- config (module globals; override with config files or --key=value) ----------------------------------
# model
depth = 12                    # number of transformer layers: the one size dial (width = 64 * depth)
n_embd = -1                   # model width; -1 = 64 * depth
n_head = -1                   # attention heads; -1 = width / 128
n_kv_head = -1                # key/value heads (grouped-query attention when < n_head); -1 = n_head
max_seq_len = 1024            # tokens per sequence (the T4 guide: 1024; lower it first when out of memory)
tokenizer = "gpt2"            # gpt2 | bytes (tiny smoke tests) | <path to a trained BPE>
gradient_checkpointing = False  # recompute activations in backward: less memory, ~30% more compute
# data
data_root = ""                # folder of parquet shards; "" = $NANOCHAT_BASE_DIR/base_data
val_files = ""                # comma-separated shard names for validation; "" = the last shard
# batch: total_batch_size = device_batch_size * max_seq_len * world_size * grad_accum_steps
device_batch_size = 4         # sequences per GPU per micro-step
total_batch_size = 131072     # tokens per optimizer step over all GPUs; -1 = use grad_accum_steps
grad_accum_steps = -1         # micro-steps per optimizer step per GPU; -1 = derived from total_batch_size
# horizon
max_steps = -1                # optimizer steps; -1 = from num_epochs, else from target_param_data_ratio
num_epochs = -1.0             # passes over the training shards; -1 = use max_steps
target_param_data_ratio = 20  # tokens per parameter when max_steps and num_epochs are -1 (Chinchilla: 20)
# optimizer and schedule
optimizer = "muon"            # muon (Muon for hidden matrices + AdamW for the rest) | adamw
max_lr = 0.004                # peak learning rate of the AdamW parameters (embeddings, head, norms)
matrix_lr = 0.02              # peak learning rate of the Muon matrices (optimizer=muon only)
min_lr = -1.0                 # final learning rate; -1 = max_lr / 10 (scaled alike for matrix_lr)
warmup_steps = -1             # linear warmup steps; -1 = use warmup_ratio
warmup_ratio = 0.0            # warmup as a fraction of max_steps; -1 = use warmup_steps
lr_scheduler = "cosine"       # cosine | linear | constant | cosine_with_restarts
lr_restarts = 1               # cycles of cosine_with_restarts
decay_lr = True               # False = constant after warmup
lr_scaling = "none"           # none | linear | sqrt: scale max_lr with the global batch / lr_reference_batch
lr_reference_batch = -1       # tokens; -1 = one process's batch (so scaling follows the GPU count)
weight_decay = 0.0            # AdamW weight decay on 2-D weights
grad_clip = 1.0               # clip the global gradient norm; 0 = off
# evaluation and sampling
eval_every = 100              # steps between validation loss / bpb; -1 = only at the end
eval_tokens = 524288          # validation tokens per evaluation (over all GPUs)
sample_every = 500            # steps between sampled completions; -1 = off
log_every = 1                 # steps between log lines
log_gradients = False         # add per-layer gradient norms to the metrics
# checkpoints
checkpoint_interval = 1000    # steps between checkpoints; -1 = only at the end
keep_last_n_checkpoints = 5   # rotation: keep this many newest; -1 = keep all
permanent_checkpoints = ""    # steps never deleted, e.g. "10000,20000"
keep_best_n = 0               # also keep the n checkpoints with the lowest val loss
auto_resume = False           # continue from the newest complete checkpoint of this run
resume = False                # continue from checkpoint_path (--resume=<path> sets both)
checkpoint_path = ""          # the checkpoint to resume (a ckpt_*.pt or a run folder)
pretrained_checkpoint = ""    # start from these weights (file, run folder, or stage name); "" = from scratch
out_dir = ""                  # "" = $NANOCHAT_BASE_DIR/checkpoints/<run_name>
run_name = ""                 # "" = d<depth>
log_dir = ""                  # train.log + metrics.jsonl; "" = the run's checkpoint folder
# runtime
device = "auto"               # auto | cpu | cuda | cuda:N
dtype = "auto"                # auto (bf16 on sm>=8.0, fp16+GradScaler below, fp32 on CPU) | float32 | float16 | bfloat16
compile = None                # torch.compile; None = auto (CUDA sm>=7.0, not Windows)
peak_flops = None             # peak FLOP/s of one GPU for MFU when it is not in our table
seed = 42
wandb_log = False             # log to Weights & Biases (WANDB_MODE=offline works)
wandb_project = "t4chat"
max_nonfinite = 10            # stop after this many non-finite losses in a row
_types = {"compile": bool, "peak_flops": float}
_STAGE = "base"  # which $NANOCHAT_BASE_DIR folder (checkpoint.STAGE_DIRS) this script writes
# -----------------------------------------------------------------------------------------------------------


def main():
    import dataloader
    from model import GPT, GPTConfig
    from tokenizer import get_tokenizer, check_compatible
    config, user_set = common.load_config(globals())
    g = globals()

    # ---- derived values, validated before any process group or compile ----
    rank, _, world_size = common.dist_env()
    total, accum = common.resolve_batch(total_batch_size=total_batch_size, grad_accum_steps=grad_accum_steps,
                                        device_batch_size=device_batch_size, max_seq_len=max_seq_len,
                                        world_size=world_size, user_set=user_set)
    tok = get_tokenizer(tokenizer)
    root = data_root or str(common.base_dir() / "base_data")
    train_shards = dataloader.list_shards(root, "train", val_files)
    val_shards = dataloader.list_shards(root, "val", val_files)
    run = run_name or f"d{depth}"
    ckpt_dir = out_dir or str(common.base_dir() / STAGE_DIRS[_STAGE] / run)
    ckpts = CheckpointManager(ckpt_dir, keep_last_n=keep_last_n_checkpoints, permanent=permanent_checkpoints,
                              keep_best_n=keep_best_n, is_master=rank == 0)
    resume_from = None
    if resume:
        if not checkpoint_path:
            raise UserError("resume=True needs --checkpoint_path=<ckpt file or run folder> (or --resume=<path>)")
        resume_from = resolve_checkpoint(checkpoint_path)
    elif auto_resume:
        resume_from = ckpts.latest()
    elif ckpts.latest() is not None:
        raise UserError(f"{ckpt_dir} already holds checkpoints of an earlier run (newest: {ckpts.latest().name}). "
                        f"Continue it with --auto_resume=True, or start another run with --run_name=<new name>")

    # ---- setup ----
    dist_info = common.setup_distributed(device)
    dev = dist_info.device
    ptdtype, dtype_reason = common.pick_dtype(dev, dtype)
    autocast, scaler = common.make_autocast_and_scaler(dev, ptdtype)
    common.seed_everything(seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores where they exist (sm>=8.0)
        torch.backends.cudnn.allow_tf32 = True

    # ---- model ----
    model_config = GPTConfig(depth=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head,
                             vocab_size=tok.vocab_size, max_seq_len=max_seq_len)
    try:
        model = GPT(model_config)
    except ValueError as e:
        raise UserError(f"model shape: {e}") from None
    arch = model.config.arch_dict()
    ckpt = None
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        check_arch(ckpt["arch"], arch, resume_from, "Resume with the same depth/width/max_seq_len/tokenizer "
                                                      "as that run, or start another run with --run_name=<new name>")
        check_compatible(ckpt["tokenizer"], tok, str(resume_from))
        model.load_state_dict(ckpt["model"])
    elif pretrained_checkpoint:
        src = resolve_checkpoint(pretrained_checkpoint)
        init = load_checkpoint(src)
        check_arch(init["arch"], arch, src, "Set --depth/--n_embd/--max_seq_len to match it")
        check_compatible(init["tokenizer"], tok, str(src))
        model.load_state_dict(init["model"])
        del init
    model.to(dev)
    model.gradient_checkpointing = gradient_checkpointing
    raw_model = model
    num_params = raw_model.num_params()
    flops_per_token = raw_model.estimate_flops_per_token()

    # ---- horizon and schedule ----
    steps, warmup = common.resolve_schedule(
        max_steps=max_steps, num_epochs=num_epochs, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio,
        user_set=user_set, steps_per_epoch=lambda: _steps_per_epoch(dataloader, train_shards, tok, total),
        default_steps=lambda: max(1, target_param_data_ratio * num_params // total))
    scale_ref = lr_reference_batch if lr_reference_batch > 0 else (
        total // world_size if "grad_accum_steps" in user_set else total)
    peak_lr = common.scale_lr(max_lr, mode=lr_scaling, global_batch=total, reference_batch=scale_ref)
    final_lr = (min_lr if min_lr >= 0 else peak_lr / 10)
    optim = raw_model.configure_optimizers(optimizer=optimizer, max_lr=peak_lr,
                                           matrix_lr=matrix_lr * peak_lr / max_lr, weight_decay=weight_decay,
                                           ns_dtype=common.muon_ns_dtype(dev, ptdtype))

    # ---- data ----
    train_loader = dataloader.PretrainLoader(root, tok, split="train", device_batch_size=device_batch_size,
                                             max_seq_len=max_seq_len, rank=dist_info.rank,
                                             world_size=dist_info.world_size, val_files=val_files, device=dev)
    val_loader = dataloader.PretrainLoader(root, tok, split="val", device_batch_size=device_batch_size,
                                           max_seq_len=max_seq_len, rank=dist_info.rank,
                                           world_size=dist_info.world_size, val_files=val_files, device=dev)

    start_step = 0
    if ckpt is not None:
        optim.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        train_loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        start_step = ckpt["step"]
        if ckpt.get("world_size") != world_size:
            print0(f"resuming a {ckpt.get('world_size')}-process checkpoint on {world_size} process(es): the data "
                   f"stream and global batch are unchanged, gradient accumulation is now {accum}")
        del ckpt

    # ---- compile and DDP ----
    use_compile = compile if compile is not None else common.compile_default(dev)
    if use_compile:
        model = common.try_compile(model, dev, autocast, device_batch_size, max_seq_len)
    if dist_info.ddp:
        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    logger = common.RunLogger(dist_info, log_dir or ckpt_dir, config, run_name=run, wandb_log=wandb_log,
                              wandb_project=wandb_project, resume_step=start_step if start_step else None,
                              header={"stage": _STAGE, "device": common.device_name(dev),
                                      "world_size": world_size, "dtype": f"{ptdtype} ({dtype_reason})",
                                      "tokenizer": tok.describe(), "parameters": f"{num_params:,}",
                                      "flops/token": f"{flops_per_token:.3e}",
                                      "batch": f"{total:,} tokens/step = {device_batch_size} seqs x {max_seq_len} "
                                               f"tokens x {world_size} GPUs x {accum} accumulation",
                                      "horizon": f"{steps} steps ({steps * total:,} tokens), warmup {warmup}, "
                                                 f"lr {peak_lr:g} -> {final_lr:g} ({lr_scheduler})",
                                      "checkpoints": ckpt_dir,
                                      "resume": f"from {resume_from} at step {start_step}" if resume_from else "no"})
    peak = common.peak_flops(common.device_name(dev), ptdtype, peak_flops)
    token_bytes = tok.token_bytes().to(dev)
    stopper = common.StopSignal()

    def evaluate():
        """Validation loss and bits-per-byte over eval_tokens, every rank a share, summed over ranks."""
        model.eval()
        val_loader.reset()
        n_batches = max(1, eval_tokens // (device_batch_size * max_seq_len * world_size))
        sums = torch.zeros(3, dtype=torch.float64, device=dev)  # loss (nats), tokens, bytes
        with torch.no_grad():
            for _ in range(n_batches):
                x, y = val_loader.next_batch()
                with autocast:
                    losses = raw_model(x, y, reduction="none").float()
                nbytes = token_bytes[y]
                counted = nbytes > 0  # specials (bos) carry no bytes: left out of bpb, as nanochat does
                sums += torch.stack([(losses * counted).sum().double(), counted.sum().double(),
                                     nbytes.sum().double()])
        common.all_reduce(sums)
        model.train()
        val_loss = (sums[0] / sums[1].clamp(min=1)).item()
        return {"val_loss": val_loss, "val_bpb": (sums[0] / (math.log(2) * sums[2].clamp(min=1))).item()}

    def save(step, last_loss, val=None):
        state = {"model": raw_model.state_dict(), "optimizer": optim.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "step": step,
                 "config": config, "arch": arch, "tokenizer": tok.describe(), "stage": _STAGE,
                 "world_size": world_size, "rng": rng_state(), "loader": train_loader.state_dict()}
        meta = {"stage": _STAGE, "loss": last_loss, "final": step == steps, "world_size": world_size,
                "arch": arch, **(val or {})}
        ckpts.save(step, state, meta)
        logger.print(f"saved checkpoint {ckpt_dir}/ckpt_{step:06d}.pt")

    # ---- loop ----
    # eval and checkpoint sit at the top and we run steps+1 iterations, so the final step evaluates and
    # saves through the same code (nanochat / llm.c layout). A checkpoint at `step` holds the state after
    # `step` optimizer updates, so resuming continues with iteration `step` exactly.
    logger.print(f"training {steps} steps from step {start_step}")
    lossf, nonfinite = float("nan"), 0
    for step in range(start_step, steps + 1):
        last = step == steps
        stop = stopper.should_stop(dev)
        val = None
        if (eval_every > 0 and step % eval_every == 0) or last or (keep_best_n > 0 and step > start_step and
                                                                   checkpoint_interval > 0 and
                                                                   step % checkpoint_interval == 0):
            val = evaluate()
            logger.print(f"step {step} | val loss {val['val_loss']:.4f} | val bpb {val['val_bpb']:.4f}")
            logger.record("eval", step, val)
        if sample_every > 0 and step > 0 and (step % sample_every == 0 or last) and dist_info.is_master:
            _sample(raw_model, tok, dev, autocast, logger)
        if step > start_step and (last or stop or (checkpoint_interval > 0 and step % checkpoint_interval == 0)):
            if math.isfinite(lossf):
                save(step, lossf, val)
            else:  # never checkpoint a diverged model: rotation would delete the good ones
                logger.print(f"step {step}: loss is not finite, checkpoint skipped (last good one kept)")
        if last or stop:
            if stop and not last:
                logger.print(f"{stopper.requested} received: stopped at step {step}; resume with --auto_resume=True")
            break

        # one optimizer step: accum micro-steps, gradients synced only on the last (no_sync), since PCIe-only
        # T4 boxes otherwise spend more time all-reducing than computing
        t0 = time.time()
        lr = common.get_lr(step, max_lr=peak_lr, min_lr=final_lr, warmup_steps=warmup, max_steps=steps,
                           scheduler=lr_scheduler, decay_lr=decay_lr, restarts=lr_restarts)
        for group in optim.param_groups:
            group["lr"] = group["base_lr"] * lr / peak_lr
        loss_sum = torch.zeros((), device=dev)
        for micro in range(accum):
            x, y = train_loader.next_batch()
            sync = micro == accum - 1
            with (model.no_sync() if dist_info.ddp and not sync else nullcontext()):
                with autocast:
                    loss = model(x, y) / accum
                loss_sum += loss.detach()
                (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum = common.all_reduce(loss_sum) / world_size
        lossf = loss_sum.item()
        if scaler is not None:
            scaler.unscale_(optim)  # clip and report the true gradient norm, not the scaled one
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                   grad_clip if grad_clip > 0 else float("inf")).item()
        skipped = False
        if math.isfinite(lossf):
            nonfinite = 0
            if scaler is not None:
                scale = scaler.get_scale()
                scaler.step(optim)  # skips the update itself when the fp16 gradients overflowed
                scaler.update()
                skipped = scaler.get_scale() < scale  # the scale backs off exactly when a step was skipped
            else:
                optim.step()
        else:
            nonfinite += 1
            if scaler is not None:
                scaler.update()  # record the overflow so the scale backs off
            if nonfinite >= max_nonfinite:
                raise UserError(f"the loss was not finite for {nonfinite} steps in a row (step {step}); the weights "
                                f"were not updated and the last good checkpoint in {ckpt_dir} is intact. Lower "
                                f"--max_lr, raise --warmup_steps, or use --dtype=float32 to find the cause, then "
                                f"resume with --auto_resume=True")
        optim.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0

        if step % log_every == 0 or step == steps - 1:
            tok_per_s = total / dt
            mfu = flops_per_token * tok_per_s / (peak * world_size) if peak else None
            extra = {"skipped": "non-finite loss"} if not math.isfinite(lossf) else (
                {"skipped": "fp16 overflow"} if skipped else None)
            if scaler is not None:
                extra = {**(extra or {}), "scale": f"{scaler.get_scale():.0f}"}
            if log_gradients:
                extra = {**(extra or {}), **_layer_grad_norms(raw_model)}
            logger.step(step, steps, loss=lossf, lr=lr, dt=dt, tok_per_s=tok_per_s, mfu=mfu, grad_norm=grad_norm,
                        mem=common.memory_stats(dev), extra=extra)

    train_loader.close()
    val_loader.close()
    logger.close()


def _steps_per_epoch(dataloader, shards, tok, total):
    tokens, how = dataloader.estimate_tokens(shards, tok)
    print0(f"num_epochs: {how}; one epoch = {tokens:,} tokens / {total:,} per step")
    return tokens / total


def _layer_grad_norms(model):
    """Per-layer gradient norms (log_gradients=True): the first thing to look at when a run diverges."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None and name.endswith("weight"):
            out[f"gn/{name.removesuffix('.weight')}"] = round(p.grad.float().norm().item(), 4)
    return out


def _sample(model, tok, dev, autocast, logger):
    """A few greedy-ish completions so a human sees what the model learned. A private generator keeps the
    training RNG untouched (exact resume)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    model.eval()
    for prompt in ("The capital of France is", "The meaning of life is", "中国的首都是"):
        ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)], device=dev)
        with torch.no_grad(), autocast:
            out = model.generate(ids, max_new_tokens=24, temperature=0.7, top_k=50, generator=gen)
        logger.print(f"sample: {tok.decode(out[0, 1:].tolist())!r}")
    model.train()


if __name__ == "__main__":
    common.run(main)
