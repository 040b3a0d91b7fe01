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
import conversations
from common import print0
from conversation_loader import ConversationPackLoader, pass_tokens
from evaluate import chat_eval
from tasks import eval_items
from trainer import Trainer

# ---- config (module globals; override with config files or --key=value) ----------------------------------
# the settings every stage shares (device, dtype, compile, grad_clip, checkpoint rotation, logging, ...) are
# in defaults.py; declare one here to change it for this stage. -h lists them all.
# where the run starts
pretrained_checkpoint = ""    # where to start: a file, a run folder or a stage name; "" = the newest base run
# data
mixture = ""                  # sources "path[:weight[:epochs]],..."; "" = the built-in offline tasks
val_fraction = 0.05           # held out of every source for validation (fixed by seed, any world size)
max_rounds = -1               # keep the first N user/assistant exchanges of a conversation; -1 = all
max_seq_len = 1024            # tokens per packed sequence (a warning if above what the base run used)
seed = 42                     # init, data order and the held-out split (the same on every GPU)
# batch: total_batch_size = device_batch_size * max_seq_len * world_size * grad_accum_steps
device_batch_size = 2         # sequences per GPU per micro-step (the T4 guide: 2)
total_batch_size = 65536      # tokens per optimizer step over all GPUs (the T4 guide: 65,536); -1 = grad_accum_steps
grad_accum_steps = -1         # micro-steps per optimizer step per GPU; -1 = derived from total_batch_size
# horizon
max_steps = -1                # optimizer steps; -1 = num_epochs over the mixture
num_epochs = 1.0              # passes over the mixture's training part; -1 = use max_steps
# learning rates and schedule (the base run's learning rates, decayed to zero: nanochat's mid-training recipe)
max_lr = 0.004                # peak learning rate of the AdamW parameters (embeddings, head, norms)
matrix_lr = 0.02              # peak learning rate of the Muon matrices; follows max_lr in proportion unless set
min_lr = 0.0                  # final learning rate; -1 = max_lr / 10 (wsd: max_lr * 0.05)
warmup_steps = 0              # linear warmup steps; -1 = use warmup_ratio
warmup_ratio = -1.0           # warmup as a fraction of max_steps; -1 = use warmup_steps
lr_scheduler = "linear"       # cosine | linear | constant | cosine_with_restarts | wsd
lr_reference_batch = -1       # tokens; -1 = one process's batch
# optimizer: main() builds it (model.configure_optimizers, or any torch.optim.Optimizer)
optimizer = "muon"            # muon | adamw
weight_decay = 0.0            # decoupled weight decay (AdamW: 2-D weights only; Muon: its matrices)
# evaluation and checkpoints
eval_every = 75               # steps between evaluations (the T4 guide: 75); -1 = only at the end
checkpoint_interval = 500     # -1 = only at the end
eval_tokens = -1              # validation tokens per evaluation; -1 = 10 x total_batch_size, at most 524288
eval_examples_per_task = 20   # held-out items per task for exact-match accuracy; 0 = off
gsm8k_test = ""               # GSM8K test file for accuracy; "" = $NANOCHAT_BASE_DIR/data/gsm8k_test.jsonl or .parquet
# -----------------------------------------------------------------------------------------------------------


def main():
    tr = Trainer(globals(), "mid", init_stage="base")
    total, accum = common.resolve_batch(total_batch_size=total_batch_size, grad_accum_steps=grad_accum_steps,
                                        device_batch_size=device_batch_size, max_seq_len=max_seq_len,
                                        world_size=tr.world_size, user_set=tr.user_set)
    mix = conversations.Mixture(mixture, seed=seed, val_fraction=val_fraction, log=print0)
    items = eval_items(eval_examples_per_task, seed, gsm8k_test) if eval_examples_per_task > 0 else []

    tr.setup()
    model = tr.build_model()

    def steps_per_epoch():
        # tokens of one pass over the mixture, from the mean rendered length of a fixed sample
        tokens = pass_tokens(mix.train, tr.tok, max_seq_len=max_seq_len, max_rounds=max_rounds)
        print0(f"num_epochs: one pass ~ {tokens:,.0f} tokens ({len(mix.train):,} conversations x mean "
               f"{tokens / max(1, len(mix.train)):.0f} tokens, from a fixed sample)")
        return tokens / total
    reference = total // tr.world_size if "grad_accum_steps" in tr.user_set else total
    sched = tr.schedule(steps_per_epoch=steps_per_epoch, default_steps=lambda: math.ceil(steps_per_epoch()),
                        global_batch=total, reference_batch=reference)
    # any torch.optim.Optimizer works here, and tr.fit(..., loss_fn=...) any loss (README: How to hack a stage)
    opt = model.configure_optimizers(optimizer=optimizer, max_lr=sched.peak_lr, matrix_lr=sched.matrix_lr,
                                     weight_decay=weight_decay, ns_dtype=tr.ns_dtype)

    # conversations packed back to back into windows, like pretraining (loss on assistant tokens only); the
    # validation windows are shuffled too (seeded, so every eval reads the same ones): mix.val is in source
    # order, and eval_tokens may cover only a prefix of it
    args = tr.loader_args(seed=seed, max_rounds=max_rounds)
    train_loader = ConversationPackLoader(mix.train, tr.tok, split="train", **args)
    val_loader = ConversationPackLoader(mix.val, tr.tok, split="val", **args)
    n_eval = (eval_tokens if eval_tokens > 0 else min(10 * total, 524288)) // (device_batch_size * max_seq_len *
                                                                                 tr.world_size)

    def evaluate(m, step):  # validation loss, and the held-out tasks' accuracy
        return chat_eval(m, tr.tok, val_loader, n_eval, items, autocast=tr.autocast)

    tr.fit(model, opt, train_loader, accum=accum, schedule=sched, evaluate=evaluate)


if __name__ == "__main__":
    common.run(main)
