"""train_sft.py: chat SFT, whole conversations with the loss on assistant tokens only (stage 3).
in:  newest mid checkpoint (or pretrained_checkpoint)      out: $NANOCHAT_BASE_DIR/chatsft_checkpoints/<run>/
CPU smoke:  python train_sft.py --device=cpu --compile=False --max_steps=20 --max_seq_len=256
4x T4:      torchrun --standalone --nproc_per_node=4 train_sft.py
8 GB laptop (the RTX 4060 guide): python train_sft.py --dtype=float16 --gradient_checkpointing=True \
                --device_batch_size=1 --target_examples_per_step=64 --num_epochs=5 --warmup_ratio=0.2 --max_rounds=6
Data:       --mixture as in train_mid.py; "" = the built-in tasks
"""
import math

import common
from training import Stage

# ---- config (module globals; override with config files or --key=value) ----------------------------------
# data
mixture = ""                  # sources "path[:weight[:epochs]],..."; "" = the built-in offline tasks
val_fraction = 0.05           # held out of every source for validation (fixed by seed, any world size)
max_rounds = -1               # keep the first N user/assistant exchanges (the 8 GB guide: 6-8); -1 = all
max_seq_len = 1024            # longest conversation in tokens; longer ones are cut at a turn boundary
# batch: target_examples_per_step = device_batch_size * world_size * accumulation
device_batch_size = 1         # conversations per GPU per micro-step (the T4 guide: 1)
target_examples_per_step = 8  # conversations per optimizer step over all GPUs (the T4 guide: 8)
# horizon
max_steps = -1                # optimizer steps; -1 = num_epochs over the mixture
num_epochs = 1.0              # passes over the mixture's training part; -1 = use max_steps
# optimizer and schedule: a fifth of mid-training's learning rates, decayed to zero
optimizer = "muon"            # muon | adamw
max_lr = 0.0008               # peak learning rate of the AdamW parameters (embeddings, head, norms)
matrix_lr = 0.004             # peak learning rate of the Muon matrices; follows max_lr in proportion unless set
min_lr = 0.0                  # final learning rate; -1 = max_lr / 10
warmup_steps = -1             # linear warmup steps; -1 = use warmup_ratio
warmup_ratio = 0.0            # warmup as a fraction of max_steps (the 8 GB guide: 0.2); -1 = use warmup_steps
lr_scheduler = "linear"       # cosine | linear | constant | cosine_with_restarts
lr_restarts = 1               # cycles of cosine_with_restarts
decay_lr = True               # False = constant after warmup
lr_scaling = "none"           # none | linear | sqrt (scale max_lr with the global batch / lr_reference_batch)
lr_reference_batch = -1       # conversations; -1 = target_examples_per_step
weight_decay = 0.0
grad_clip = 1.0               # 0 = off
# evaluation
eval_every = 50               # steps between evaluations (the T4 guide: 50); -1 = only at the end
eval_examples_per_task = 20   # held-out items per task for exact-match accuracy; 0 = off
gsm8k_test = ""               # GSM8K test JSONL for accuracy; "" = $NANOCHAT_BASE_DIR/data/gsm8k_test.jsonl if present
log_every = 1
log_gradients = False
# checkpoints
checkpoint_interval = 200     # -1 = only at the end
keep_last_n_checkpoints = 5   # -1 = keep all
permanent_checkpoints = ""    # steps never deleted, e.g. "100,200"
keep_best_n = 0               # also keep the n checkpoints with the lowest val loss
auto_resume = False
resume = False
checkpoint_path = ""          # the checkpoint to resume
pretrained_checkpoint = ""    # where to start: a file, a run folder or a stage name; "" = the newest mid run
out_dir = ""                  # "" = $NANOCHAT_BASE_DIR/chatsft_checkpoints/<run_name>
run_name = ""                 # "" = the name of the run it starts from
log_dir = ""                  # "" = the run's checkpoint folder
# runtime
device = "auto"
dtype = "auto"                # auto (bf16 on sm>=8.0, fp16+GradScaler below, fp32 on CPU) | float32 | float16 | bfloat16
compile = None                # None = auto (CUDA sm>=7.0, not Windows)
gradient_checkpointing = False  # the 8 GB guide's first memory saver
peak_flops = None             # peak FLOP/s of one GPU for MFU when it is not in our table
seed = 42
wandb_log = False
wandb_project = "t4chat"
_types = {"compile": bool, "peak_flops": float}
# -----------------------------------------------------------------------------------------------------------


def main():
    import conversations
    import dataloader
    st = Stage(globals(), "sft", init_stage="mid")
    accum = common.resolve_examples(target_examples_per_step=target_examples_per_step,
                                    device_batch_size=device_batch_size, world_size=st.world_size)
    mix = conversations.Mixture(mixture, seed=seed, val_fraction=val_fraction, verbose=st.is_master)
    items = conversations.eval_items(eval_examples_per_task, seed, gsm8k_test) if eval_examples_per_task > 0 else []

    st.setup()
    model = st.build_model()
    steps, warmup, peak_lr, final_lr = st.schedule(
        model, steps_per_epoch=lambda: len(mix.train) / target_examples_per_step,
        default_steps=lambda: math.ceil(len(mix.train) / target_examples_per_step),
        global_batch=target_examples_per_step, reference_batch=target_examples_per_step)

    # whole conversations, padded (not packed); the loss of a step is the mean over all its assistant tokens
    # across micro-batches and ranks (Stage.fit counts them first), so 1 and N processes train identically
    args = dict(device_batch_size=device_batch_size, max_seq_len=max_seq_len, rank=st.rank, world_size=st.world_size,
                device=st.device, seed=seed, max_rounds=max_rounds)
    train_loader = dataloader.ConversationBatchLoader(mix.train, st.tok, split="train", **args)
    val_loader = dataloader.ConversationBatchLoader(mix.val, st.tok, split="val", shuffle=False, wrap=False, **args)

    def evaluate(m, step):
        out = st.eval_loss(m, val_loader, val_loader.batches_per_epoch)
        if items:
            out.update(st.task_accuracy(m, items))
        return out

    st.fit(model, train_loader, accum=accum, steps=steps, warmup=warmup, peak_lr=peak_lr, final_lr=final_lr,
           evaluate=evaluate, header={"mixture": mix.summary().replace("\n", "; "),
                                      "batch": f"{target_examples_per_step} conversations/step = {device_batch_size} x "
                                               f"{st.world_size} GPUs x {accum} accumulation"})


if __name__ == "__main__":
    common.run(main)
