r"""finetune_dolly.py: instruction finetuning on databricks-dolly-15k, the nano-gpt guide's finetuning stage (stage 4).
in:  --pretrained_checkpoint (a ckpt file, run folder or stage name: base, mid, sft, dolly);
     "" = the newest SFT run, else the newest mid run, else the newest base run
out: $NANOCHAT_BASE_DIR/dolly_checkpoints/<run>/: checkpoints, checkpoints.json (which one is best and why),
     train.log, metrics.jsonl, generations_<step>.jsonl (held-out prompts, references and the model's answers)
CPU smoke (a depth-2 base run; a model this small needs more than the guide's 3e-5, hence max_lr=1e-3):
            python finetune_dolly.py --pretrained_checkpoint=base --dolly_path=../shared/data/dolly15k_head.jsonl \
                --device=cpu --compile=False --max_steps=40 --warmup_steps=4 --max_lr=1e-3 --eval_every=10 \
                --max_seq_len=256 --device_batch_size=4 --target_examples_per_step=8 --gen_eval_examples=16 \
                --gen_max_tokens=48
4x T4:      torchrun --standalone --nproc_per_node=4 finetune_dolly.py --pretrained_checkpoint=sft
Resume:     python finetune_dolly.py --auto_resume=True          (or --resume=True --checkpoint_path=<ckpt or run>)
Data:       databricks-dolly-15k JSONL (instruction, context, response, category), one object per line.
            prompt_format=chat renders it with the chat template (an SFT model keeps chatting); alpaca with the
            Stanford Alpaca plain-text template (a base model never saw the chat tokens); auto picks alpaca for a
            base checkpoint and chat for any other. The loss is on the response only.
"""
import json
import math
import zlib
from pathlib import Path

import numpy as np

import common
from checkpoint import atomic_write_text
from common import UserError, print0
from conversation_loader import ConversationBatchLoader
from evaluate import check_metric_packages, eval_loss, generate_answers, text_metrics
from trainer import Trainer

# ---- config (module globals; override with config files or --key=value) ----------------------------------
# the settings every stage shares (device, dtype, compile, grad_clip, checkpoint rotation, logging, ...) are
# in defaults.py; declare one here to change it for this stage. -h lists them all.
# where the run starts
pretrained_checkpoint = ""    # where to start: a file, a run folder or a stage name; "" = newest sft, else mid, else base
# data
dolly_path = ""               # Dolly JSONL; "" = $NANOCHAT_BASE_DIR/data/databricks-dolly-15k.jsonl
prompt_format = "auto"        # chat | alpaca | auto (alpaca for a base checkpoint, chat for mid/sft/dolly)
val_fraction = 0.05           # held out per category for validation (fixed by seed and file name, any world size)
max_seq_len = 1024            # tokens; a longer row keeps the start of its response, one with no room for any is dropped
seed = 42                     # init, data order and the held-out split (the same on every GPU)
# batch: target_examples_per_step = device_batch_size * world_size * accumulation (SFT's batch)
device_batch_size = 8         # rows per GPU per micro-step (the nano-gpt guide's batch_size 8)
target_examples_per_step = 32  # rows per optimizer step over all GPUs
# horizon (the nano-gpt guide: 1750 steps, 100 of warmup)
max_steps = 1750              # optimizer steps; -1 = use num_epochs
num_epochs = -1.0             # passes over the training part; -1 = use max_steps
# learning rates and schedule: cosine from max_lr to min_lr (AdamW, below)
max_lr = 3e-5                 # peak learning rate (the guide: 3e-5 to 5e-5 for finetuning, 10x below pretraining)
matrix_lr = 1.5e-4            # peak learning rate of the Muon matrices; follows max_lr in proportion unless set
min_lr = -1.0                 # final learning rate; -1 = max_lr / 10 (wsd: max_lr * 0.05)
warmup_steps = 100            # linear warmup steps; -1 = use warmup_ratio
warmup_ratio = -1.0           # warmup as a fraction of max_steps; -1 = use warmup_steps
lr_scheduler = "cosine"       # cosine | linear | constant | cosine_with_restarts | wsd
lr_reference_examples = -1    # rows per step lr_scaling compares with; -1 = target_examples_per_step
# optimizer: main() builds it (model.configure_optimizers, or any torch.optim.Optimizer)
optimizer = "adamw"           # adamw | muon
weight_decay = 0.0            # decoupled weight decay (AdamW: 2-D weights only; Muon: its matrices)
# evaluation and checkpoints
eval_every = 50               # steps between validation-loss passes (the guide's eval_interval 50); -1 = only at the end
checkpoint_interval = 500     # -1 = only at the end
gen_eval_every = -1           # steps between BLEU-4/ROUGE-L generation evals (a multiple of eval_every); -1 = only at the end
gen_eval_examples = 64        # held-out prompts answered greedily for BLEU-4/ROUGE-L (categories in turn); 0 = off
gen_max_tokens = 128          # longest generated answer in tokens
_DEFAULT_FILE = "databricks-dolly-15k.jsonl"
INIT_STAGES = ("sft", "mid", "base")  # the default starting point: the newest run of the first with a checkpoint
# -----------------------------------------------------------------------------------------------------------


# ---- how we render ----

def resolve_prompt_format(requested, init_ckpt, resume_ckpt) -> tuple:
    """(format, why). A resumed run keeps the format its checkpoint recorded: the data it was trained on."""
    if requested not in ("auto", "chat", "alpaca"):
        raise UserError(f"prompt_format={requested!r} is not one of auto, chat, alpaca")
    trained = (resume_ckpt or {}).get("config", {}).get("prompt_format")
    if trained in ("chat", "alpaca"):
        if requested not in ("auto", trained):
            raise UserError(f"prompt_format={requested} but the checkpoint to resume was trained with "
                            f"prompt_format={trained}; drop --prompt_format (or start a new run with --run_name)")
        return trained, "the resumed checkpoint's"
    if requested != "auto":
        return requested, "given"
    stage = (init_ckpt or {}).get("stage")
    if stage == "base":
        return "alpaca", "auto: a base checkpoint has never seen the chat tokens"
    return "chat", f"auto: a {stage or 'chat'} checkpoint knows the chat template"


def make_render(tok, fmt):
    """render(record, max_seq_len) -> (ids, mask) | None: what ConversationBatchLoader trains on (and what
    keep_trainable checks). Both templates keep the start of a response that does not fit."""
    from conversations import plain_prompt

    def render(record, limit):
        if fmt == "chat":
            return tok.chat_format.render(record.messages, max_seq_len=limit)
        return tok.chat_format.render_plain(*plain_prompt(record), max_seq_len=limit)
    return render


def prompt_ids(tok, record, fmt) -> list:
    """The generation prompt of a record: the same prefix the training rendering puts before the response."""
    from conversations import plain_prompt
    if fmt == "chat":
        return tok.chat_format.render_prompt(record.messages[:-1])
    return tok.chat_format.render_plain_prompt(plain_prompt(record)[0])


# ---- data: the file, the split, the rows that fit ----

def dolly_file(spec) -> Path:
    """dolly_path -> an existing, non-empty file: as given (absolute or relative to the current folder), else
    under $NANOCHAT_BASE_DIR/data/."""
    data_dir = common.base_dir() / "data"
    path = Path(spec).expanduser() if spec else data_dir / _DEFAULT_FILE
    if spec and not path.is_absolute() and not path.exists() and (data_dir / path).exists():
        path = data_dir / path
    if not path.is_file():
        raise UserError(f"dolly_path: no file at {path}. Put databricks-dolly-15k.jsonl (Hugging Face: "
                        f"databricks/databricks-dolly-15k) at {data_dir / _DEFAULT_FILE}, or pass --dolly_path=<file>")
    with open(path, "rb") as f:
        if not any(line.strip() for line in f):  # stops at the first non-blank line
            raise UserError(f"dolly_path={path} is empty: expected databricks-dolly-15k JSONL, one object per line "
                            f"with instruction, context, response and category")
    return path


def load_dolly(path, seed, val_fraction, log=None):
    """The split: a conversations.Mixture over the one file. Its validation part is round(n_c * val_fraction) rows
    of every category c, drawn with a generator seeded by (seed, file name, category) only, so it is the same in
    every run and for any number of processes (world size and rank choose each rank's share later, in the
    loaders). Bad lines are skipped and counted; no good row, or more than 10 % bad ones, is a UserError."""
    from conversations import Mixture, Source
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction} must be in (0, 1): the held-out rows give the validation loss, "
                        f"keep_best_n's ranking and the BLEU-4/ROUGE-L prompts")
    path = Path(path)
    mix = Mixture([Source(str(path), path, None)], seed=seed, val_fraction=val_fraction, log=log)
    fmt = mix.reports[0].fmt
    if fmt != "dolly":
        raise UserError(f"{path} reads as {fmt!r} rows, not Dolly's (instruction, context, response, category); "
                        f"for other conversation files use train_sft.py --mixture={path}")
    return mix


def split_fingerprint(examples) -> str:
    """crc32 of the validation rows (file lines): equal fingerprints = the same split. Printed in the header."""
    lines = ",".join(str(r.meta["line"]) for r in examples)
    return f"{zlib.crc32(lines.encode()):08x}"


def keep_trainable(mix, examples, render, limit):
    """(examples without the rows whose prompt leaves no response token within `limit`, how many were dropped).
    Dropping them here, the same way on every rank, keeps every batch slot a trained one."""
    from conversations import Examples
    keep = np.fromiter((render(examples[i], limit) is not None for i in range(len(examples))), dtype=bool,
                       count=len(examples))
    return Examples(mix.records, examples.source_ids[keep], examples.rows[keep]), int((~keep).sum())


def generation_prompts(examples, tok, fmt, n, seed, room) -> list:
    """A fixed subset of held-out prompts for BLEU-4/ROUGE-L: categories take turns (sorted by name), each in an
    order seeded by `seed` alone; a prompt longer than `room` tokens (no space left to answer) is passed over."""
    order = np.random.default_rng([int(seed), zlib.crc32(b"dolly-gen-eval")]).permutation(len(examples))
    queues = {}
    for i in order.tolist():
        queues.setdefault(examples[i].meta["category"], []).append(i)
    queues = [queues[c] for c in sorted(queues)]
    items = []
    while len(items) < n and any(queues):
        for q in queues:
            while q and len(items) < n:
                rec = examples[q.pop(0)]
                ids = prompt_ids(tok, rec, fmt)
                if len(ids) <= room:
                    items.append({"category": rec.meta["category"], "line": rec.meta["line"],
                                  "instruction": rec.meta["instruction"], "context": rec.meta["context"],
                                  "reference": rec.messages[-1]["content"], "ids": ids})
                    break
    return items


# ---- generation eval: BLEU-4 and ROUGE-L ----

def generation_eval(tr, model, items, step, fmt, max_tokens) -> dict:
    """Greedy answers to the fixed held-out prompts (each rank a share), BLEU-4/ROUGE-L per category and overall,
    the answers written to <run>/generations_<step>.jsonl. Returns the overall figures for the eval line."""
    # chat: the end of the turn stops an answer; alpaca: bos, what ends a document
    answers = generate_answers(model, tr.tok, [it["ids"] for it in items], max_tokens=max_tokens,
                               stop_ids=tr.tok.chat_format.stop_ids(chat=fmt == "chat"), autocast=tr.autocast)
    rows = [{"step": step, **{k: v for k, v in it.items() if k != "ids"}, "generation": text, "finish": finish}
            for it, (text, finish) in zip(items, answers)]
    scores = text_metrics(rows)
    path = tr.ckpt_dir / f"generations_{step:06d}.jsonl"
    if tr.is_master:
        tr.ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    lines = [f"generation eval at step {step}: {len(rows)} held-out prompts, greedy, <= {max_tokens} tokens "
             f"-> {path}", f"  {'category':<24}{'n':>4}{'BLEU-4':>9}{'ROUGE-L':>9}"]
    for name, s in scores.items():
        if name != "signature":
            lines.append(f"  {name:<24}{s['n']:>4}{s['bleu4']:>9.2f}{s['rougeL']:>9.2f}")
    lines.append(f"  (BLEU: sacrebleu {scores['signature']}; ROUGE-L: rouge-score F-measure, stemmed; 0-100)")
    tr.logger.print("\n".join(lines))
    tr.logger.record("gen_eval", step, {f"{m}/{name}": s[m] for name, s in scores.items() if name != "signature"
                                        for m in ("bleu4", "rougeL", "n")})
    return {"bleu4": scores["all"]["bleu4"], "rougeL": scores["all"]["rougeL"]}


# ---- the stage ----

def main():
    tr = Trainer(globals(), "dolly", init_stage=INIT_STAGES)
    fmt, why = resolve_prompt_format(prompt_format, tr.init_ckpt, tr.resume_ckpt)
    tr.config["prompt_format"] = fmt  # the checkpoints record what the run trained on, not 'auto'
    accum = common.resolve_examples(target_examples_per_step=target_examples_per_step,
                                    device_batch_size=device_batch_size, world_size=tr.world_size)
    if gen_eval_every > 0 and (eval_every <= 0 or gen_eval_every % eval_every):
        raise UserError(f"gen_eval_every={gen_eval_every} must be a multiple of eval_every={eval_every} (the "
                        f"generation eval runs with a validation pass), or -1 for only at the end")
    if gen_eval_examples > 0:
        check_metric_packages()
        if gen_max_tokens < 1 or gen_max_tokens >= max_seq_len:
            raise UserError(f"gen_max_tokens={gen_max_tokens} must be in [1, max_seq_len={max_seq_len}): the prompt "
                            f"and the answer share the model's max_seq_len")

    # the data, checked and split before any process group, so a bad file fails on every rank alike
    mix = load_dolly(dolly_file(dolly_path), seed, val_fraction, log=print0)
    render = make_render(tr.tok, fmt)
    train, dropped_train = keep_trainable(mix, mix.train, render, max_seq_len)
    val, dropped_val = keep_trainable(mix, mix.val, render, max_seq_len)
    if dropped_train or dropped_val:
        print0(f"max_seq_len={max_seq_len}: dropped {dropped_train:,} training and {dropped_val:,} validation rows "
               f"whose prompt leaves no room for a response token")
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"no training or validation row fits max_seq_len={max_seq_len} ({len(train)} / {len(val)} "
                        f"left); raise --max_seq_len")
    items = generation_prompts(val, tr.tok, fmt, gen_eval_examples, seed, max_seq_len - gen_max_tokens)
    if gen_eval_examples > 0 and len(items) < gen_eval_examples:
        print0(f"generation eval: only {len(items)} of the {len(val)} held-out prompts fit in max_seq_len - "
               f"gen_max_tokens = {max_seq_len - gen_max_tokens} tokens (asked for {gen_eval_examples})")

    tr.setup()
    model = tr.build_model()
    sched = tr.schedule(steps_per_epoch=lambda: len(train) / target_examples_per_step,
                        default_steps=lambda: math.ceil(len(train) / target_examples_per_step),
                        global_batch=target_examples_per_step, reference_batch=target_examples_per_step)
    # any torch.optim.Optimizer works here, and tr.fit(..., loss_fn=...) any loss (README: How to hack a stage)
    opt = model.configure_optimizers(optimizer=optimizer, max_lr=sched.peak_lr, matrix_lr=sched.matrix_lr,
                                     weight_decay=weight_decay, ns_dtype=tr.ns_dtype)

    # whole rows, padded (not packed); the loss of a step is the mean over all its response tokens across
    # micro-batches and ranks (Trainer.fit counts them first), so 1 and N processes train identically
    args = tr.loader_args(seed=seed, render=render)
    train_loader = ConversationBatchLoader(train, tr.tok, split="train", **args)
    val_loader = ConversationBatchLoader(val, tr.tok, split="val", shuffle=False, wrap=False, **args)

    def evaluate(m, step):
        out = eval_loss(m, val_loader, val_loader.batches_per_epoch, autocast=tr.autocast)
        if items and (step == sched.steps or (gen_eval_every > 0 and step % gen_eval_every == 0)):
            out.update(generation_eval(tr, m, items, step, fmt, gen_max_tokens))
        return out

    tr.fit(model, opt, train_loader, accum=accum, schedule=sched, evaluate=evaluate, header={
        "data": mix.summary().replace("\n", "; "),
        "split": f"{len(train):,} train / {len(val):,} val rows, val_fraction {val_fraction} per category, "
                 f"seed {seed}, fingerprint {split_fingerprint(val)}; dropped {dropped_train:,} / "
                 f"{dropped_val:,} rows with no room for a response at max_seq_len={max_seq_len}",
        "prompt format": f"{fmt} ({why})",
        "generation eval": (f"{len(items)} held-out prompts at the end" +
                            (f" and every {gen_eval_every} steps" if gen_eval_every > 0 else "")
                            if items else "off")})


if __name__ == "__main__":
    common.run(main)
