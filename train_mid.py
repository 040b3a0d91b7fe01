"""train_mid.py: mid-training, a base model continued on conversations packed like pretraining (stage 2).
in:  newest base checkpoint (or pretrained_checkpoint)      out: $NANOCHAT_BASE_DIR/mid_checkpoints/<run>/
CPU smoke:  python train_mid.py --device=cpu --compile=False --max_steps=20 --device_batch_size=4 \
                --max_seq_len=256 --total_batch_size=2048
4x T4:      torchrun --standalone --nproc_per_node=4 train_mid.py
Data:       --mixture="path[:weight[:epochs]],..." (chat/ShareGPT/Alpaca/Dolly/GSM8K JSONL or parquet, or the
            built-in tasks: spelling, count, arithmetic, identity, builtin); "" = the built-in tasks
"""
import math

import common
from common import print0
from training import Stage

# ---- config (module globals; override with config files or --key=value) ----------------------------------
# data
mixture = ""                  # sources "path[:weight[:epochs]],..."; "" = the built-in offline tasks
val_fraction = 0.05           # held out of every source for validation (fixed by seed, any world size)
max_rounds = -1               # keep the first N user/assistant exchanges of a conversation; -1 = all
max_seq_len = 1024            # tokens per packed sequence (a warning if above what the base run used)
# batch: total_batch_size = device_batch_size * max_seq_len * world_size * grad_accum_steps
device_batch_size = 2         # sequences per GPU per micro-step (the T4 guide: 2)
total_batch_size = 65536      # tokens per optimizer step over all GPUs (the T4 guide: 65,536); -1 = grad_accum_steps
grad_accum_steps = -1         # micro-steps per optimizer step per GPU; -1 = derived from total_batch_size
# horizon
max_steps = -1                # optimizer steps; -1 = num_epochs over the mixture
num_epochs = 1.0              # passes over the mixture's training part; -1 = use max_steps
# optimizer and schedule (the base run's learning rates, decayed to zero: nanochat's mid-training recipe)
optimizer = "muon"            # muon | adamw
max_lr = 0.004                # peak learning rate of the AdamW parameters (embeddings, head, norms)
matrix_lr = 0.02              # peak learning rate of the Muon matrices; follows max_lr in proportion unless set
min_lr = 0.0                  # final learning rate; -1 = max_lr / 10
warmup_steps = 0              # linear warmup steps; -1 = use warmup_ratio
warmup_ratio = -1.0           # warmup as a fraction of max_steps; -1 = use warmup_steps
lr_scheduler = "linear"       # cosine | linear | constant | cosine_with_restarts
lr_restarts = 1               # cycles of cosine_with_restarts
decay_lr = True               # False = constant after warmup
lr_scaling = "none"           # none | linear | sqrt (scale max_lr with the global batch / lr_reference_batch)
lr_reference_batch = -1       # tokens; -1 = one process's batch
weight_decay = 0.0
grad_clip = 1.0               # 0 = off
# evaluation
eval_every = 75               # steps between evaluations (the T4 guide: 75); -1 = only at the end
eval_tokens = -1              # validation tokens per evaluation; -1 = 10 x total_batch_size, at most 524288
eval_examples_per_task = 20   # held-out items per task for exact-match accuracy; 0 = off
gsm8k_test = ""               # GSM8K test JSONL for accuracy; "" = $NANOCHAT_BASE_DIR/data/gsm8k_test.jsonl if present
log_every = 1
log_gradients = False
# checkpoints
checkpoint_interval = 500     # -1 = only at the end
keep_last_n_checkpoints = 5   # -1 = keep all
permanent_checkpoints = ""    # steps never deleted, e.g. "500,1000"
keep_best_n = 0               # also keep the n checkpoints with the lowest val loss
auto_resume = False
resume = False
checkpoint_path = ""          # the checkpoint to resume
pretrained_checkpoint = ""    # where to start: a file, a run folder or a stage name; "" = the newest base run
out_dir = ""                  # "" = $NANOCHAT_BASE_DIR/mid_checkpoints/<run_name>
run_name = ""                 # "" = the name of the base run it starts from (d12 -> d12)
log_dir = ""                  # "" = the run's checkpoint folder
# runtime
device = "auto"
dtype = "auto"                # auto (bf16 on sm>=8.0, fp16+GradScaler below, fp32 on CPU) | float32 | float16 | bfloat16
compile = None                # None = auto (CUDA sm>=7.0, not Windows)
gradient_checkpointing = False
peak_flops = None             # peak FLOP/s of one GPU for MFU when it is not in our table
seed = 42
wandb_log = False
wandb_project = "t4chat"
_types = {"compile": bool, "peak_flops": float}
# -----------------------------------------------------------------------------------------------------------


def main():
    import conversations
    import dataloader
    st = Stage(globals(), "mid", init_stage="base")
    c = st.config
    total, accum = common.resolve_batch(total_batch_size=c["total_batch_size"], grad_accum_steps=c["grad_accum_steps"],
                                        device_batch_size=device_batch_size, max_seq_len=max_seq_len,
                                        world_size=st.world_size, user_set=st.user_set)
    mix = conversations.Mixture(mixture, seed=seed, val_fraction=val_fraction, verbose=st.is_master)
    items = conversations.eval_items(eval_examples_per_task, seed, gsm8k_test) if eval_examples_per_task > 0 else []

    st.setup()
    model = st.build_model()
    tok, dev = st.tok, st.device

    def steps_per_epoch():
        # tokens of one pass over the mixture, from the mean rendered length of a fixed sample
        from tokenizer import render_conversation
        sample = [mix.train[i] for i in range(0, len(mix.train), max(1, len(mix.train) // 500))]
        lengths = [len(r[0]) for r in (render_conversation(tok, dataloader._messages(e), max_seq_len=max_seq_len,
                                                           max_rounds=max_rounds) for e in sample) if r]
        tokens = len(mix.train) * sum(lengths) / max(1, len(lengths))
        print0(f"num_epochs: one pass ~ {tokens:,.0f} tokens ({len(mix.train):,} conversations x mean "
               f"{tokens / max(1, len(mix.train)):.0f} tokens from a {len(lengths)}-conversation sample)")
        return tokens / total
    reference = total // st.world_size if "grad_accum_steps" in st.user_set else total
    steps, warmup, peak_lr, final_lr = st.schedule(model, steps_per_epoch=steps_per_epoch,
                                                   default_steps=lambda: math.ceil(steps_per_epoch()),
                                                   global_batch=total, reference_batch=reference)

    args = dict(device_batch_size=device_batch_size, max_seq_len=max_seq_len, rank=st.rank, world_size=st.world_size,
                device=dev, seed=seed, max_rounds=max_rounds)
    train_loader = dataloader.ConversationPackLoader(mix.train, tok, split="train", **args)
    # shuffled (seeded, so every eval reads the same windows): mix.val is in source order, and eval_tokens
    # may cover only a prefix of it
    val_loader = dataloader.ConversationPackLoader(mix.val, tok, split="val", **args)
    n_eval = (eval_tokens if eval_tokens > 0 else min(10 * total, 524288)) // (device_batch_size * max_seq_len *
                                                                                 st.world_size)

    def evaluate(m, step):
        out = st.eval_loss(m, val_loader, n_eval)
        if items:
            out.update(st.task_accuracy(m, items))
        return out

    st.fit(model, train_loader, accum=accum, steps=steps, warmup=warmup, peak_lr=peak_lr, final_lr=final_lr,
           evaluate=evaluate, header={"mixture": mix.summary().replace("\n", "; "),
                                      "batch": f"{total:,} tokens/step = {device_batch_size} seqs x {max_seq_len} tokens"
                                               f" x {st.world_size} GPUs x {accum} accumulation"})


if __name__ == "__main__":
    common.run(main)
