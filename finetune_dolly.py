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
import importlib.util
import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

import common
from checkpoint import resolve_checkpoint
from common import UserError, print0
from training import Stage

# ---- config (module globals; override with config files or --key=value) ----------------------------------
# data
dolly_path = ""               # Dolly JSONL; "" = $NANOCHAT_BASE_DIR/data/databricks-dolly-15k.jsonl
prompt_format = "auto"        # chat | alpaca | auto (alpaca for a base checkpoint, chat for mid/sft/dolly)
val_fraction = 0.05           # held out per category for validation (fixed by seed and file name, any world size)
max_seq_len = 1024            # tokens; a longer row keeps the start of its response, one with no room for any is dropped
# batch: target_examples_per_step = device_batch_size * world_size * accumulation (SFT's batch)
device_batch_size = 8         # rows per GPU per micro-step (the nano-gpt guide's batch_size 8)
target_examples_per_step = 32  # rows per optimizer step over all GPUs
# horizon (the nano-gpt guide: 1750 steps, 100 of warmup)
max_steps = 1750              # optimizer steps; -1 = use num_epochs
num_epochs = -1.0             # passes over the training part; -1 = use max_steps
# optimizer and schedule: AdamW, cosine from max_lr to min_lr
optimizer = "adamw"           # adamw | muon
max_lr = 3e-5                 # peak learning rate (the guide: 3e-5 to 5e-5 for finetuning, 10x below pretraining)
matrix_lr = 1.5e-4            # peak learning rate of the Muon matrices; follows max_lr in proportion unless set
min_lr = -1.0                 # final learning rate; -1 = max_lr / 10
warmup_steps = 100            # linear warmup steps; -1 = use warmup_ratio
warmup_ratio = -1.0           # warmup as a fraction of max_steps; -1 = use warmup_steps
lr_scheduler = "cosine"       # cosine | linear | constant | cosine_with_restarts
lr_restarts = 1               # cycles of cosine_with_restarts
decay_lr = True               # False = constant after warmup
lr_scaling = "none"           # none | linear | sqrt (scale max_lr with the global batch / lr_reference_batch)
lr_reference_batch = -1       # rows; -1 = target_examples_per_step
weight_decay = 0.0
grad_clip = 1.0               # 0 = off
# evaluation
eval_every = 50               # steps between validation-loss passes (the guide's eval_interval 50); -1 = only at the end
gen_eval_every = -1           # steps between BLEU-4/ROUGE-L generation evals (a multiple of eval_every); -1 = only at the end
gen_eval_examples = 64        # held-out prompts answered greedily for BLEU-4/ROUGE-L (categories in turn); 0 = off
gen_max_tokens = 128          # longest generated answer in tokens
log_every = 1
log_gradients = False
# checkpoints (the nano-gpt guide's workflow)
checkpoint_interval = 500     # -1 = only at the end
keep_last_n_checkpoints = 5   # -1 = keep all
permanent_checkpoints = ""    # steps never deleted, e.g. "500,1000"
keep_best_n = 0               # also keep the n checkpoints with the lowest val loss (then every checkpoint is evaluated)
auto_resume = False
resume = False
checkpoint_path = ""          # the checkpoint to resume
pretrained_checkpoint = ""    # where to start: a file, a run folder or a stage name; "" = newest sft, else mid, else base
out_dir = ""                  # "" = $NANOCHAT_BASE_DIR/dolly_checkpoints/<run_name>
run_name = ""                 # "" = the name of the run it starts from
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
_DEFAULT_FILE = "databricks-dolly-15k.jsonl"
_INIT_STAGES = ("sft", "mid", "base")  # the default starting point: the first of these with a checkpoint
# -----------------------------------------------------------------------------------------------------------


# ---- where we start and how we render ----

def default_init_stage() -> str:
    """The stage whose newest run we start from when --pretrained_checkpoint is empty: an SFT model is the
    natural start (it already chats), but a user following the nano-gpt guide may only have a base model."""
    for stage in _INIT_STAGES:
        try:
            resolve_checkpoint(stage)
            return stage
        except UserError:
            continue
    return _INIT_STAGES[0]  # none at all: Stage's error then names the sft folder and --pretrained_checkpoint


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
    from tokenizer import render_conversation, render_plain

    def render(record, limit):
        if fmt == "chat":
            return render_conversation(tok, record.messages, max_seq_len=limit)
        return render_plain(tok, *plain_prompt(record), max_seq_len=limit)
    return render


def prompt_ids(tok, record, fmt) -> list:
    """The generation prompt of a record: the same prefix the training rendering puts before the response."""
    from conversations import plain_prompt
    from tokenizer import render_for_completion, render_plain_prompt
    if fmt == "chat":
        return render_for_completion(tok, record.messages[:-1])
    return render_plain_prompt(tok, plain_prompt(record)[0])


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


def load_dolly(path, seed, val_fraction, verbose=False):
    """The split: a conversations.Mixture over the one file. Its validation part is round(n_c * val_fraction) rows
    of every category c, drawn with a generator seeded by (seed, file name, category) only, so it is the same in
    every run and for any number of processes (world size and rank choose each rank's share later, in the
    loaders). Bad lines are skipped and counted; no good row, or more than 10 % bad ones, is a UserError."""
    from conversations import Mixture, Source
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction} must be in (0, 1): the held-out rows give the validation loss, "
                        f"keep_best_n's ranking and the BLEU-4/ROUGE-L prompts")
    path = Path(path)
    mix = Mixture([Source(str(path), path, None)], seed=seed, val_fraction=val_fraction, verbose=verbose)
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

def check_metric_packages():
    """At start-up, not after 1750 steps: the metrics need sacrebleu and rouge-score (requirements.txt)."""
    missing = [p for p, m in (("sacrebleu", "sacrebleu"), ("rouge-score", "rouge_score"))
               if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"BLEU-4/ROUGE-L need {' and '.join(missing)}: pip install -r requirements.txt "
                        f"(or pass --gen_eval_examples=0 to skip the generation eval)")


def text_metrics(rows) -> dict:
    """{category: {'n', 'bleu4', 'rougeL'}, ..., 'all': {...}} for rows with category/reference/generation.
    BLEU-4: sacrebleu's corpus BLEU (its default 13a tokenizer and exp smoothing); ROUGE-L: the mean F-measure of
    Google's rouge-score with the Porter stemmer (how ROUGE-L is usually reported); both on a 0-100 scale."""
    import sacrebleu  # lazily: the script should start without paying for these imports
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    bleu = sacrebleu.metrics.BLEU()
    rouge = [scorer.score(r["reference"], r["generation"])["rougeL"].fmeasure for r in rows]
    groups = {c: [i for i, r in enumerate(rows) if r["category"] == c] for c in sorted({r["category"] for r in rows})}
    groups["all"] = list(range(len(rows)))
    out = {}
    for name, idx in groups.items():
        score = bleu.corpus_score([rows[i]["generation"] for i in idx], [[rows[i]["reference"] for i in idx]])
        out[name] = {"n": len(idx), "bleu4": score.score, "rougeL": 100 * float(np.mean([rouge[i] for i in idx]))}
    out["signature"] = str(bleu.get_signature())
    return out


def _gather(objs: list) -> list:
    """Every rank's list, concatenated, on every rank (a plain list without DDP)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return objs
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, objs)
    return [o for p in parts for o in p]


@torch.no_grad()
def generation_eval(st, model, items, step, fmt, max_tokens) -> dict:
    """Greedy answers to the fixed held-out prompts (each rank a share), BLEU-4/ROUGE-L per category and overall,
    the answers written to <run>/generations_<step>.jsonl. Returns the overall figures for the eval line."""
    from engine import consume, generate_stream, stop_ids_for
    was_training = model.training
    model.eval()
    stop = stop_ids_for(st.tok, fmt == "chat")  # chat: end of turn; alpaca: bos, what ends a document
    mine = []
    for i in range(st.rank, len(items), st.world_size):
        out = []
        finish = consume(generate_stream(model, st.tok, items[i]["ids"], max_tokens=max_tokens, temperature=0.0,
                                         stop_ids=stop, autocast=st.autocast), out.append)
        mine.append((i, st.tok.decode(out), finish))
    model.train(was_training)
    rows = [{"step": step, **{k: v for k, v in items[i].items() if k != "ids"}, "generation": text, "finish": finish}
            for i, text, finish in sorted(_gather(mine))]
    scores = text_metrics(rows)
    path = st.ckpt_dir / f"generations_{step:06d}.jsonl"
    if st.is_master:
        st.ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")  # a kill mid-write leaves the old file, not half of a new one
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
    lines = [f"generation eval at step {step}: {len(rows)} held-out prompts, greedy, <= {max_tokens} tokens "
             f"-> {path}", f"  {'category':<24}{'n':>4}{'BLEU-4':>9}{'ROUGE-L':>9}"]
    for name, s in scores.items():
        if name != "signature":
            lines.append(f"  {name:<24}{s['n']:>4}{s['bleu4']:>9.2f}{s['rougeL']:>9.2f}")
    lines.append(f"  (BLEU: sacrebleu {scores['signature']}; ROUGE-L: rouge-score F-measure, stemmed; 0-100)")
    st.logger.print("\n".join(lines))
    st.logger.record("gen_eval", step, {f"{m}/{name}": s[m] for name, s in scores.items() if name != "signature"
                                        for m in ("bleu4", "rougeL", "n")})
    return {"bleu4": scores["all"]["bleu4"], "rougeL": scores["all"]["rougeL"]}


# ---- the stage ----

def main():
    import dataloader
    st = Stage(globals(), "dolly", init_stage=default_init_stage())
    fmt, why = resolve_prompt_format(prompt_format, st.init_ckpt, st.resume_ckpt)
    st.config["prompt_format"] = fmt  # the checkpoints record what the run trained on, not 'auto'
    accum = common.resolve_examples(target_examples_per_step=target_examples_per_step,
                                    device_batch_size=device_batch_size, world_size=st.world_size)
    if gen_eval_every > 0 and (eval_every <= 0 or gen_eval_every % eval_every):
        raise UserError(f"gen_eval_every={gen_eval_every} must be a multiple of eval_every={eval_every} (the "
                        f"generation eval runs with a validation pass), or -1 for only at the end")
    if gen_eval_examples > 0:
        check_metric_packages()
        if gen_max_tokens < 1 or gen_max_tokens >= max_seq_len:
            raise UserError(f"gen_max_tokens={gen_max_tokens} must be in [1, max_seq_len={max_seq_len}): the prompt "
                            f"and the answer share the model's max_seq_len")

    # the data, checked and split before any process group, so a bad file fails on every rank alike
    mix = load_dolly(dolly_file(dolly_path), seed, val_fraction, verbose=st.is_master)
    render = make_render(st.tok, fmt)
    train, dropped_train = keep_trainable(mix, mix.train, render, max_seq_len)
    val, dropped_val = keep_trainable(mix, mix.val, render, max_seq_len)
    if dropped_train or dropped_val:
        print0(f"max_seq_len={max_seq_len}: dropped {dropped_train:,} training and {dropped_val:,} validation rows "
               f"whose prompt leaves no room for a response token")
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"no training or validation row fits max_seq_len={max_seq_len} ({len(train)} / {len(val)} "
                        f"left); raise --max_seq_len")
    items = generation_prompts(val, st.tok, fmt, gen_eval_examples, seed, max_seq_len - gen_max_tokens)
    if gen_eval_examples > 0 and len(items) < gen_eval_examples:
        print0(f"generation eval: only {len(items)} of the {len(val)} held-out prompts fit in max_seq_len - "
               f"gen_max_tokens = {max_seq_len - gen_max_tokens} tokens (asked for {gen_eval_examples})")

    st.setup()
    model = st.build_model()
    steps, warmup, peak_lr, final_lr = st.schedule(
        model, steps_per_epoch=lambda: len(train) / target_examples_per_step,
        default_steps=lambda: math.ceil(len(train) / target_examples_per_step),
        global_batch=target_examples_per_step, reference_batch=target_examples_per_step)

    # whole rows, padded (not packed); the loss of a step is the mean over all its response tokens across
    # micro-batches and ranks (Stage.fit counts them first), so 1 and N processes train identically
    args = dict(device_batch_size=device_batch_size, max_seq_len=max_seq_len, rank=st.rank, world_size=st.world_size,
                device=st.device, seed=seed, render=render)
    train_loader = dataloader.ConversationBatchLoader(train, st.tok, split="train", **args)
    val_loader = dataloader.ConversationBatchLoader(val, st.tok, split="val", shuffle=False, wrap=False, **args)

    def evaluate(m, step):
        out = st.eval_loss(m, val_loader, val_loader.batches_per_epoch)
        if items and (step == steps or (gen_eval_every > 0 and step % gen_eval_every == 0)):
            out.update(generation_eval(st, m, items, step, fmt, gen_max_tokens))
        return out

    st.fit(model, train_loader, accum=accum, steps=steps, warmup=warmup, peak_lr=peak_lr, final_lr=final_lr,
           evaluate=evaluate, header={
               "data": mix.summary().replace("\n", "; "),
               "split": f"{len(train):,} train / {len(val):,} val rows, val_fraction {val_fraction} per category, "
                        f"seed {seed}, fingerprint {split_fingerprint(val)}; dropped {dropped_train:,} / "
                        f"{dropped_val:,} rows with no room for a response at max_seq_len={max_seq_len}",
               "prompt format": f"{fmt} ({why})",
               "batch": f"{target_examples_per_step} rows/step = {device_batch_size} x {st.world_size} GPUs x "
                        f"{accum} accumulation",
               "generation eval": (f"{len(items)} held-out prompts at the end" +
                                   (f" and every {gen_eval_every} steps" if gen_eval_every > 0 else "")
                                   if items else "off")})


if __name__ == "__main__":
    common.run(main)
