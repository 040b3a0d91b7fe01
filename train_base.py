"""train_base.py: pretrain a base model on parquet text (stage 1 of the T4 guide).
in:  parquet shards under data_root      out: $NANOCHAT_BASE_DIR/checkpoints/<run_name or d<depth>>/
CPU smoke:  python train_base.py --depth=2 --max_seq_len=128 --device_batch_size=4 --total_batch_size=1024 \
                --max_steps=60 --eval_every=20 --data_root=../shared/data/pretrain --device=cpu --compile=False
4x T4:      torchrun --standalone --nproc_per_node=4 train_base.py
Overrides:  python train_base.py config/t4.py --depth=8   (config files: .py, .json, .yaml; -h lists every key)
"""
import torch

import common
import dataloader
from common import print0
from evaluate import eval_loss
from trainer import Trainer

# ---- config (module globals; override with config files or --key=value) ----------------------------------
# the settings every stage shares (device, dtype, compile, grad_clip, checkpoint rotation, logging, ...) are
# in defaults.py; declare one here to change it for this stage. -h lists them all.
# where the run starts
pretrained_checkpoint = ""    # start from these weights (file, run folder, or stage name); "" = from scratch
# model
depth = 12                    # number of transformer layers: the one size dial (width = 64 * depth)
n_embd = -1                   # model width; -1 = 64 * depth
n_head = -1                   # attention heads; -1 = width / 128
n_kv_head = -1                # key/value heads (grouped-query attention when < n_head); -1 = n_head
tie_embeddings = False        # lm_head shares the embedding matrix (GPT-2, SmolLM2): fewer weights, same export
max_seq_len = 1024            # tokens per sequence (the T4 guide: 1024; lower it first when out of memory)
tokenizer = "gpt2"            # gpt2 | bytes (tiny smoke tests) | a folder from train_tokenizer.py
# data
data_root = ""                # folder of parquet shards; "" = $NANOCHAT_BASE_DIR/base_data
val_files = ""                # comma-separated shard names for validation; "" = the last shard
seed = 42                     # weight init (the same on every GPU)
# batch: total_batch_size = device_batch_size * max_seq_len * world_size * grad_accum_steps
device_batch_size = 4         # sequences per GPU per micro-step
total_batch_size = 131072     # tokens per optimizer step over all GPUs; -1 = use grad_accum_steps
grad_accum_steps = -1         # micro-steps per optimizer step per GPU; -1 = derived from total_batch_size
# horizon
max_steps = -1                # optimizer steps; -1 = from num_epochs, else from target_param_data_ratio
num_epochs = -1.0             # passes over the training shards; -1 = use max_steps
target_param_data_ratio = 20  # tokens per parameter when max_steps and num_epochs are -1 (Chinchilla: 20)
# learning rates and schedule: chosen by a sweep (BENCHMARKS.md, "Default recipe"): warmup, a flat peak, then a
# linear warmdown over the last 65 % of the steps; Muon's momentum warms up; its weight decay falls to 0 on a cosine
max_lr = 0.004                # peak learning rate of the AdamW parameters (embeddings, head, norms)
matrix_lr = 0.02              # peak learning rate of the Muon matrices; follows max_lr in proportion unless set
min_lr = -1.0                 # final learning rate; -1 = max_lr * 0.05 for wsd, max_lr / 10 for the others
warmup_steps = 40             # linear warmup steps; -1 = use warmup_ratio
warmup_ratio = -1.0           # warmup as a fraction of max_steps (the guides' key); -1 = use warmup_steps
lr_scheduler = "wsd"          # wsd (warmup, stable, warmdown) | cosine | linear | constant | cosine_with_restarts
warmdown_ratio = 0.65         # wsd: the last fraction of the steps, where the rate falls linearly to the final one
muon_momentum = 0.97          # Muon's momentum after its warm-up
muon_momentum_start = 0.85    # ... at step 0, rising linearly over muon_momentum_warmup_steps; -1 = no warm-up
muon_momentum_warmup_steps = 400  # steps of that rise (a fixed count, as nanochat)
muon_momentum_warmdown = 0.9  # wsd: the momentum at the end of the warmdown; -1 = unchanged
lr_reference_batch = -1       # tokens; -1 = one process's batch (so scaling follows the GPU count)
# optimizer: main() builds it (model.configure_optimizers, or any torch.optim.Optimizer)
optimizer = "muon"            # muon (Muon for the hidden matrices + AdamW for the rest) | adamw
weight_decay = 0.28           # decoupled weight decay (Muon: its matrices; AdamW: 2-D weights), tuned at 400 steps
weight_decay_schedule = "cosine"  # constant | linear | cosine: the decay's scale over the run (both end at 0)
weight_decay_horizon = 400    # runs over 400 steps get weight_decay * 400 / max_steps; -1 (or --weight_decay) = off
cautious_weight_decay = False  # Muon: decay a weight only where the update also shrinks it
# evaluation and checkpoints
eval_every = 100              # steps between validation loss / bpb; -1 = only at the end
checkpoint_interval = 1000    # steps between checkpoints; -1 = only at the end
eval_tokens = -1              # validation tokens per evaluation (all GPUs); -1 = 10 x total_batch_size, at most 524288
sample_every = 500            # steps between sampled completions; -1 = off
# -----------------------------------------------------------------------------------------------------------


def main():
    tr = Trainer(globals(), "base")

    # ---- batch and data: validated before any process group or compile ----
    total, accum = common.resolve_batch(total_batch_size=total_batch_size, grad_accum_steps=grad_accum_steps,
                                        device_batch_size=device_batch_size, max_seq_len=max_seq_len,
                                        world_size=tr.world_size, user_set=tr.user_set)
    root = data_root or str(common.base_dir() / "base_data")
    train_shards = dataloader.list_shards(root, "train", val_files)
    val_shards = dataloader.list_shards(root, "val", val_files)

    # ---- setup and model ----
    tr.setup()
    model = tr.build_model()
    tok, dev = tr.tok, tr.device

    # ---- horizon: max_steps, or num_epochs over the training shards, or target_param_data_ratio tokens/param ----
    def steps_per_epoch():
        tokens, how = dataloader.estimate_tokens(train_shards, tok)
        print0(f"num_epochs: {how}; one epoch = {tokens:,} tokens / {total:,} per step")
        return tokens / total
    # lr_scaling reference: with grad_accum_steps given per GPU, the global batch grows with the GPU count and the
    # LR follows it (the multi-GPU guide's automatic scaling); with total_batch_size fixed the factor is 1
    reference = total // tr.world_size if "grad_accum_steps" in tr.user_set else total
    sched = tr.schedule(steps_per_epoch=steps_per_epoch, global_batch=total, reference_batch=reference,
                        default_steps=lambda: max(1, target_param_data_ratio * model.num_params() // total))

    # ---- optimizer: Muon for the hidden matrices + AdamW for the rest (any torch.optim.Optimizer works) ----
    opt = model.configure_optimizers(optimizer=optimizer, max_lr=sched.peak_lr, matrix_lr=sched.matrix_lr,
                                     weight_decay=weight_decay, ns_dtype=tr.ns_dtype)

    # ---- data ----
    train_loader = dataloader.PretrainLoader(root, tok, split="train", **tr.loader_args(val_files=val_files))
    val_loader = dataloader.PretrainLoader(root, tok, split="val", **tr.loader_args(val_files=val_files))
    n_eval = (eval_tokens if eval_tokens > 0 else min(10 * total, 524288)) // (device_batch_size * max_seq_len *
                                                                                 tr.world_size)
    token_bytes = tok.token_bytes().to(dev)

    def evaluate(m, step):
        return eval_loss(m, val_loader, n_eval, token_bytes=token_bytes, autocast=tr.autocast)

    def sample(m):
        """A few completions so a human sees what the model learned. A private generator keeps the training
        RNG untouched (exact resume)."""
        from engine import generate
        gen = torch.Generator(device=dev).manual_seed(0)
        for prompt in ("The capital of France is", "The meaning of life is", "中国的首都是"):
            ids = tok.chat_format.render_plain_prompt(prompt)
            if len(ids) >= max_seq_len:  # a tiny smoke-test context: no room to say anything
                continue
            out, _ = generate(m, tok, ids, max_tokens=min(24, max_seq_len - len(ids)), temperature=0.7, top_k=50,
                              stop_ids=tok.chat_format.stop_ids(chat=False), generator=gen, autocast=tr.autocast)
            tr.logger.print(f"sample: {tok.decode(ids[1:] + out)!r}")

    def names(paths):  # every *.parquet in data_root trains unless it is validation: say which ones, in the log
        return ", ".join(p.name for p in paths) if len(paths) <= 4 else f"{paths[0].name} .. {paths[-1].name}"

    # ---- loop ----
    try:
        tr.fit(model, opt, train_loader, accum=accum, schedule=sched, evaluate=evaluate, sample=sample,
               header={"tokens": f"{sched.steps * total:,} in {sched.steps} steps",
                       "data": f"{root}: train {len(train_shards)} shard(s) ({names(train_shards)}); "
                               f"val {len(val_shards)} ({names(val_shards)})"})
    finally:
        train_loader.close()
        val_loader.close()


if __name__ == "__main__":
    common.run(main)
