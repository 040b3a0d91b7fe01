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
import conversations
from common import print0
from conversation_loader import ConversationBatchLoader
from evaluate import chat_eval
from tasks import eval_items
from trainer import Trainer

# ---- config (module globals; override with config files or --key=value) ----------------------------------
# the settings every stage shares (device, dtype, compile, grad_clip, checkpoint rotation, logging, ...) are
# in defaults.py; declare one here to change it for this stage. -h lists them all.
# where the run starts
pretrained_checkpoint = ""    # where to start: a file, a run folder or a stage name; "" = the newest mid run
# data
mixture = ""                  # sources "path[:weight[:epochs]],..."; "" = the built-in offline tasks
val_fraction = 0.05           # held out of every source for validation (fixed by seed, any world size)
max_rounds = -1               # keep the first N user/assistant exchanges (the 8 GB guide: 6-8); -1 = all
max_seq_len = 1024            # longest conversation in tokens; longer ones are cut at a turn boundary
seed = 42                     # init, data order and the held-out split (the same on every GPU)
# batch: target_examples_per_step = device_batch_size * world_size * accumulation
device_batch_size = 1         # conversations per GPU per micro-step (the T4 guide: 1)
target_examples_per_step = 8  # conversations per optimizer step over all GPUs (the T4 guide: 8)
# horizon
max_steps = -1                # optimizer steps; -1 = num_epochs over the mixture
num_epochs = 1.0              # passes over the mixture's training part; -1 = use max_steps
# learning rates and schedule: a fifth of mid-training's learning rates, decayed to zero
max_lr = 0.0008               # peak learning rate of the AdamW parameters (embeddings, head, norms)
matrix_lr = 0.004             # peak learning rate of the Muon matrices; follows max_lr in proportion unless set
min_lr = 0.0                  # final learning rate; -1 = max_lr / 10 (wsd: max_lr * 0.05)
warmup_steps = -1             # linear warmup steps; -1 = use warmup_ratio
warmup_ratio = 0.0            # warmup as a fraction of max_steps (the 8 GB guide: 0.2); -1 = use warmup_steps
lr_scheduler = "linear"       # cosine | linear | constant | cosine_with_restarts | wsd
lr_reference_examples = -1    # conversations per step lr_scaling compares with; -1 = target_examples_per_step
# optimizer: main() builds it (model.configure_optimizers, or any torch.optim.Optimizer)
optimizer = "muon"            # muon | adamw
weight_decay = 0.0            # decoupled weight decay (AdamW: 2-D weights only; Muon: its matrices)
# evaluation and checkpoints
eval_every = 50               # steps between evaluations (the T4 guide: 50); -1 = only at the end
checkpoint_interval = 200     # -1 = only at the end
eval_examples_per_task = 20   # held-out items per task for exact-match accuracy; 0 = off
gsm8k_test = ""               # GSM8K test file for accuracy; "" = $NANOCHAT_BASE_DIR/data/gsm8k_test.jsonl or .parquet
# -----------------------------------------------------------------------------------------------------------


def main():
    tr = Trainer(globals(), "sft", init_stage="mid")
    accum = common.resolve_examples(target_examples_per_step=target_examples_per_step,
                                    device_batch_size=device_batch_size, world_size=tr.world_size)
    mix = conversations.Mixture(mixture, seed=seed, val_fraction=val_fraction, log=print0)
    items = eval_items(eval_examples_per_task, seed, gsm8k_test) if eval_examples_per_task > 0 else []

    tr.setup()
    model = tr.build_model()
    sched = tr.schedule(steps_per_epoch=lambda: len(mix.train) / target_examples_per_step,
                        default_steps=lambda: math.ceil(len(mix.train) / target_examples_per_step),
                        global_batch=target_examples_per_step, reference_batch=target_examples_per_step)
    # any torch.optim.Optimizer works here, and tr.fit(..., loss_fn=...) any loss (README: How to hack a stage)
    opt = model.configure_optimizers(optimizer=optimizer, max_lr=sched.peak_lr, matrix_lr=sched.matrix_lr,
                                     weight_decay=weight_decay, ns_dtype=tr.ns_dtype)

    # whole conversations, padded (not packed); the loss of a step is the mean over all its assistant tokens
    # across micro-batches and ranks (Trainer.fit counts them first), so 1 and N processes train identically
    args = tr.loader_args(seed=seed, max_rounds=max_rounds)
    train_loader = ConversationBatchLoader(mix.train, tr.tok, split="train", **args)
    val_loader = ConversationBatchLoader(mix.val, tr.tok, split="val", shuffle=False, wrap=False, **args)

    def evaluate(m, step):  # validation loss over every held-out conversation, and the tasks' accuracy
        return chat_eval(m, tr.tok, val_loader, val_loader.batches_per_epoch, items, autocast=tr.autocast)

    tr.fit(model, opt, train_loader, accum=accum, schedule=sched, evaluate=evaluate)


if __name__ == "__main__":
    common.run(main)
