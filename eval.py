"""eval.py: score a checkpoint on standard benchmarks, the way lm-evaluation-harness scores them.
in:  --checkpoint (a ckpt_*.pt, a run folder, or a stage name: base, mid, sft, dolly; "" = the newest SFT run, else ...)
     the task files under eval_data_dir (python prepare_data.py --what=eval fetches them)
out: a table on stdout, and eval_<step>.json beside the checkpoint (never ckpt_<step>.json: that is its marker)
     python eval.py --checkpoint=base --tasks=arc_easy,piqa --limit=200
     torchrun --standalone --nproc_per_node=4 eval.py --checkpoint=sft     # items shared out, scores unchanged

Log-likelihood tasks (base models; lm-evaluation-harness's prompts and metrics): arc_easy, arc_challenge ("Question:
...\\nAnswer:" and " <choice>"; acc, and acc_norm = argmax of the log-likelihood per character of the choice),
piqa (the same), winogrande (partial scoring: the ending's log-likelihood after each filled-in option), lambada
(acc = the last word greedy-decoded exactly, and perplexity), mmlu (5-shot from the dev split, " A".." D"; acc per
subject and over all questions), val_bpb (bits per byte on the pretraining data's validation shard, the run's own
unless --data_root; n = sequences). Context and continuation are encoded as the harness encodes them (trailing spaces
of the context move to the continuation); a prompt longer than the model's max_seq_len loses its oldest tokens.
Chat models answer in words (greedy, with the chat template): gsm8k (the final number, exact), arc_easy_mc,
arc_challenge_mc and mmlu_mc (the choices listed with letters; the reply's first standalone letter), builtin (the
built-in tasks' held-out items), ifeval (IFEval's 541 prompts, checked by lm-evaluation-harness's own IFEval
checkers: prompt- and instruction-level accuracy, strict and loose); the default set is these for a chat
checkpoint, the log-likelihood ones for base.
Every score comes with its standard error and the number of items. Items are scored in fixed global batches, so
1 and N processes see the same padding and give the same numbers.
"""
import contextlib
import csv
import json
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from common import UserError, print0
from configurator import apply_overrides

# ---- config (module globals; override with --key=value; -h lists them) -----------------------------------------
checkpoint = ""               # a ckpt_*.pt, a run folder, or a stage name; "" = newest sft, else dolly, mid, base
tasks = ""                    # comma-separated; "" = the set for the stage (base: log-likelihood; chat: answers)
all_checkpoints = False       # evaluate every checkpoint of the run (the 8 GB guide: the best is often not the last)
eval_data_dir = ""            # the task files; "" = $NANOCHAT_BASE_DIR/eval_data
limit = -1                    # items per task (the first ones, in file order); -1 = all
batch_size = 16               # sequences per forward pass (fixed globally: the scores do not depend on it per rank)
data_root = ""                # val_bpb: the pretraining shards; "" = the ones the checkpoint's run trained on
eval_tokens = 1048576         # val_bpb: validation tokens scored (--limit=N: N sequences of max_seq_len instead)
device = "auto"
dtype = "auto"
# ------------------------------------------------------------------------------------------------------------------

LL_TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "lambada", "mmlu", "val_bpb")
# chat models answer in words: GSM8K (the final number), ARC and MMLU as letter answers, the built-in tasks, and
# IFEval (instructions whose following a program checks)
GEN_TASKS = ("gsm8k", "arc_easy_mc", "arc_challenge_mc", "mmlu_mc", "builtin", "ifeval")
FILES = {"arc_easy": "arc_easy_test.jsonl", "arc_challenge": "arc_challenge_test.jsonl", "piqa": "piqa_val.jsonl",
         "winogrande": "winogrande_dev.jsonl", "lambada": "lambada_openai.jsonl", "mmlu": "mmlu_test.csv",
         "gsm8k": "gsm8k_test.jsonl", "arc_easy_mc": "arc_easy_test.jsonl",
         "arc_challenge_mc": "arc_challenge_test.jsonl", "mmlu_mc": "mmlu_test.csv", "ifeval": "ifeval_input_data.jsonl"}
# a worked answer for GSM8K; a letter (or "The answer is B.") for the choices; the built-in answers are short
# IFEval's 1,280 is lm-evaluation-harness's max_gen_toks (its essays ask for 300+ words)
GEN_MAX_TOKENS = {"gsm8k": 256, "arc_easy_mc": 16, "arc_challenge_mc": 16, "mmlu_mc": 16, "builtin": 32,
                  "ifeval": 1280}


# ---- items: (contexts, continuations, gold) per question, as the harness builds them ----

def _jsonl(path, n):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if 0 < n <= len(rows):
                    break
    return rows


def _answer_prompt(query):
    # the files keep "Question: ..." (PIQA's with its newline); the harness's prompt ends "\nAnswer:"
    return query + ("Answer:" if query.endswith("\n") else "\nAnswer:")


def task_file(name, folder) -> Path:
    path = Path(folder) / FILES[name]
    if not path.is_file():
        raise UserError(f"task {name}: no file at {path}. Fetch the evaluation files (python prepare_data.py "
                        f"--what=eval, into $NANOCHAT_BASE_DIR/eval_data), or pass --eval_data_dir=<folder>")
    return path


def load_task(name, folder, n=-1) -> list:
    """[{'contexts': [str], 'continuations': [str], 'gold': int, 'subject'?}] for a task: one context per choice
    (Winogrande: the options filled in) or one shared context, and one continuation per choice."""
    path = task_file(name, folder)
    if name in ("arc_easy", "arc_challenge", "piqa"):
        return [{"contexts": [_answer_prompt(r["query"])] * len(r["choices"]),
                 "continuations": [" " + c for c in r["choices"]], "gold": int(r["gold"]),
                 "lengths": [len(c) for c in r["choices"]]} for r in _jsonl(path, n)]
    if name == "winogrande":
        return [{"contexts": list(r["context_options"]), "continuations": [" " + r["continuation"]] * 2,
                 "gold": int(r["gold"])} for r in _jsonl(path, n)]
    if name == "lambada":
        return [{"contexts": [r["context"]], "continuations": [" " + r["continuation"].strip()], "gold": 0}
                for r in _jsonl(path, n)]
    return _mmlu(path, Path(folder) / "mmlu_dev.csv", n)


def _csv_rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _mmlu(test_path, dev_path, n):
    """5-shot: the subject's first five dev questions with their answers, then the question; choices ' A'..' D'."""

    def block(r, answer=True):
        text = r["question"].strip() + "".join(f"\n{k}. {r[k]}" for k in "ABCD") + "\nAnswer:"
        return text + (f" {r['answer']}\n\n" if answer else "")
    shots = {}
    for r in _csv_rows(dev_path):
        shots.setdefault(r["subject"], []).append(r)
    items = []
    for r in _csv_rows(test_path):
        head = f"The following are multiple choice questions (with answers) about {r['subject'].replace('_', ' ')}.\n\n"
        context = head + "".join(block(s) for s in shots.get(r["subject"], [])[:5]) + block(r, answer=False)
        items.append({"contexts": [context] * 4, "continuations": [f" {k}" for k in "ABCD"],
                      "gold": "ABCD".index(r["answer"]), "subject": r["subject"]})
        if 0 < n <= len(items):
            break
    return items


# ---- scoring ----

def encode_pair(tok, context, continuation):
    """(context ids, continuation ids) as lm-evaluation-harness encodes them: spaces that end the context go to the
    continuation, the whole string is encoded once and split where the context's own encoding ends; bos first."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return [tok.bos_id] + ctx, whole[len(ctx):]


class _Progress:
    """`label: done/total` on stderr, at most once a second, from rank 0 only."""

    def __init__(self, label, total, show, unit="batches"):
        self.label, self.total, self.show, self.unit, self.last = label, total, show, unit, 0.0

    def __call__(self, done):
        import time
        if self.show and (time.time() - self.last > 1 or done == self.total):
            self.last = time.time()
            sys.stderr.write(f"\r  {self.label}: {done}/{self.total} {self.unit}"
                             + ("\n" if done == self.total else ""))
            sys.stderr.flush()


@torch.no_grad()
def loglikelihoods(model, tok, pairs, *, batch_size=16, autocast=None, label=""):
    """[(sum of log p(continuation | context), all continuation tokens greedy)] for (context, continuation) pairs.
    Global batches of `batch_size` pairs in order, batch i on rank i % W, each padded to its own longest sequence:
    the same batches, padding and numbers for any number of processes. Too long: the oldest tokens go (left)."""
    from evaluate import gather, rank_and_world
    rank, world = rank_and_world()
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    dev, limit = next(model.parameters()).device, model.config.max_seq_len
    was = model.training
    model.eval()
    mine, n_batches = [], math.ceil(len(pairs) / batch_size)
    progress = _Progress(label or "scoring", n_batches, rank == 0 and bool(label))
    for b in range(rank, n_batches, world):
        progress(min(n_batches, b + world))
        seqs = []
        for context, continuation in pairs[b * batch_size:(b + 1) * batch_size]:
            ctx, cont = encode_pair(tok, context, continuation)
            seq = (ctx + cont)[-(limit + 1):]  # left truncation; a continuation longer than the model's
            seqs.append((seq, min(len(cont), len(seq) - 1)))  # context is scored on the tokens that fit
        T = max(len(s) for s, _ in seqs) - 1
        x = torch.full((len(seqs), T), tok.bos_id, dtype=torch.long)
        for i, (s, _) in enumerate(seqs):
            x[i, :len(s) - 1] = torch.tensor(s[:-1])
        with autocast:
            logp = F.log_softmax(model(x.to(dev)).float(), dim=-1).cpu()
        for i, (s, k) in enumerate(seqs):
            target = torch.tensor(s[-k:])
            rows = logp[i, len(s) - 1 - k:len(s) - 1]
            mine.append((b * batch_size + i, rows.gather(1, target[:, None]).sum().item(),
                         bool((rows.argmax(-1) == target).all())))
    model.train(was)
    return [(ll, greedy) for _, ll, greedy in sorted(gather(mine))]


def _stderr(values):
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score(name, items, results) -> dict:
    """Metrics of one task from the per-pair results, in item order: {metric: (value, stderr)} and 'n'."""
    out, k = {}, 0
    acc, acc_norm, lls, per_subject = [], [], [], {}
    for item in items:
        m = len(item["continuations"])
        res = results[k:k + m]
        k += m
        ll = [r[0] for r in res]
        if name == "lambada":
            acc.append(float(res[0][1]))
            lls.append(ll[0])
            continue
        pick = max(range(m), key=lambda j: ll[j])
        acc.append(float(pick == item["gold"]))
        if "lengths" in item:  # acc_norm: log-likelihood per character of the choice (the harness's)
            norm = max(range(m), key=lambda j: ll[j] / max(1, item["lengths"][j]))
            acc_norm.append(float(norm == item["gold"]))
        if "subject" in item:
            per_subject.setdefault(item["subject"], []).append(acc[-1])
    out["acc"] = (sum(acc) / len(acc), _stderr(acc))
    if acc_norm:
        out["acc_norm"] = (sum(acc_norm) / len(acc_norm), _stderr(acc_norm))
    if lls:
        mean_ll = sum(lls) / len(lls)
        out["perplexity"] = (math.exp(-mean_ll), math.exp(-mean_ll) * _stderr(lls))
    for s, v in sorted(per_subject.items()):
        out[f"acc/{s}"] = (sum(v) / len(v), _stderr(v))
    out["n"] = len(items)
    return out


def run_val_bpb(model, tok, config, *, n=-1, autocast=None) -> dict:
    """Bits per byte on the validation shard(s) of the pretraining data: the number that compares models across
    tokenizers (nats per token do not). The data is --data_root, else the run's own data_root and val_files."""
    import dataloader
    import evaluate
    rank, world = evaluate.rank_and_world()
    root = data_root or config.get("data_root") or str(common.base_dir() / "base_data")
    seq = model.config.max_seq_len
    sequences = n if n > 0 else max(1, eval_tokens // seq)
    # a fixed global batch, shared out: the same sequences are scored on 1 or N processes (up to N - 1 more at
    # the end, when N does not divide the count)
    rows = max(1, math.ceil(min(batch_size, sequences) / world))
    n_batches = max(1, math.ceil(sequences / (rows * world)))
    device = next(model.parameters()).device
    loader = dataloader.PretrainLoader(root, tok, split="val", device_batch_size=rows, max_seq_len=seq,
                                       rank=rank, world_size=world, val_files=config.get("val_files", ""),
                                       device=device)
    try:
        out = evaluate.eval_loss(model, loader, n_batches, token_bytes=tok.token_bytes().to(device),
                                 autocast=autocast, stderr=True)
    finally:
        loader.close()
    return {"bpb": (out["val_bpb"], out["val_bpb_stderr"]), "n": n_batches * rows * world}


def run_task(model, tok, name, folder, *, n=-1, batch_size=16, autocast=None, progress=False) -> dict:
    items = load_task(name, folder, n)
    pairs = [(c, t) for it in items for c, t in zip(it["contexts"], it["continuations"])]
    return score(name, items, loglikelihoods(model, tok, pairs, batch_size=batch_size, autocast=autocast,
                                             label=name if progress else ""))


# ---- generative tasks (chat models) ----

def load_gen_task(name, folder, n=-1) -> list:
    """[(checker task, conversation whose last message is the reference)] in the shape tasks.check_answer reads."""
    if name == "builtin":
        return _builtin_items(n)
    path = task_file(name, folder)
    if name == "gsm8k":
        return [("gsm8k", [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}])
                for r in _jsonl(path, n)]
    if name == "ifeval":  # no reference answer: the row itself rides along for the checkers
        return [("ifeval", [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": "", "doc": r}])
                for r in _jsonl(path, n)]
    if name == "mmlu_mc":
        rows = _csv_rows(path)[:n if n > 0 else None]
        return [("letter", _letter_question(r["question"], [r[k] for k in "ABCD"], "ABCD".index(r["answer"]),
                                            f"about {r['subject'].replace('_', ' ')}")) for r in rows]
    return [("letter", _letter_question(r["query"].removeprefix("Question: ").strip(), r["choices"], int(r["gold"])))
            for r in _jsonl(path, n)]


def _builtin_items(n):
    from tasks import BUILTIN_TASKS, builtin_examples
    per_task = n if n > 0 else 20
    return [(t, conv) for t in BUILTIN_TASKS for conv in builtin_examples(t, per_task, 0, "val")]


def _letter_question(question, choices, gold, about=""):
    letters = "ABCDEFGH"[:len(choices)]
    text = (f"{question}\n" + "".join(f"\n{k}. {c}" for k, c in zip(letters, choices))
            + f"\n\nAnswer{' this question ' + about if about else ''} with the letter of the correct choice.")
    return [{"role": "user", "content": text}, {"role": "assistant", "content": letters[gold]}]


def letter_of(reply: str):
    """The answer letter of a reply: the first A-H standing alone ('B', 'B.', '(B)', 'The answer is B')."""
    m = re.search(r"(?<![A-Za-z])([A-H])(?![A-Za-z])", reply)
    return m.group(1) if m else None


def check(kind, conversation, reply) -> bool:
    if kind == "letter":
        return letter_of(reply) == conversation[-1]["content"]
    from tasks import check_answer
    return check_answer(kind, conversation, reply)


def run_gen_task(model, tok, name, folder, *, n=-1, autocast=None) -> dict:
    """Greedy answers to the chat prompts (each rank a share, gathered in order), checked; acc with its stderr."""
    import evaluate
    items = load_gen_task(name, folder, n)
    max_tokens = min(GEN_MAX_TOKENS.get(name, 32), model.config.max_seq_len // 2)
    rank, _ = evaluate.rank_and_world()
    answered = evaluate.answer_items(model, tok, items, max_tokens=max_tokens, autocast=autocast,
                                     progress=lambda total: _Progress(name, total, rank == 0, "answers"))
    if not answered:
        raise UserError(f"task {name}: no question fits the model's max_seq_len={model.config.max_seq_len}")
    if name == "ifeval":
        checked = evaluate.ifeval_results([conv[-1]["doc"] for _, conv, _ in answered], [t for _, _, t in answered])
        out = {}
        for metric in evaluate.IFEVAL_METRICS:  # prompt level: one 0/1 per prompt; instruction level: one per check
            values = [float(v) for r in checked for v in (r[metric] if metric.startswith("inst") else [r[metric]])]
            out[metric] = (sum(values) / len(values), _stderr(values))
        return out | {"n": len(checked)}
    right = [float(check(kind, conv, text)) for kind, conv, text in answered]
    return {"acc": (sum(right) / len(right), _stderr(right)), "n": len(right)}


def headline(res) -> float:
    """The one number of a task: acc, IFEval's prompt-level strict accuracy (the harness's first metric: every
    instruction of the prompt followed, the reply taken as it is), or bits per byte."""
    return next(res[k][0] for k in ("acc", "prompt_level_strict_acc", "bpb") if k in res)


def rank_value(results) -> float:
    """What --all_checkpoints ranks by (higher is better): the mean headline accuracy over the tasks, or, with
    val_bpb the only task, minus the bits per byte."""
    accs = [headline(r) for r in results.values() if "bpb" not in r]
    return sum(accs) / len(accs) if accs else -results["val_bpb"]["bpb"][0]


def table(results) -> str:
    lines = [f"{'task':<18}{'metric':<24}{'value':>9}{'stderr':>9}{'n':>7}"]
    for name, res in results.items():
        for metric, v in res.items():
            if metric == "n" or metric.startswith("acc/"):
                continue
            lines.append(f"{name:<18}{metric:<24}{v[0]:>9.4g}{v[1]:>9.4g}{res['n']:>7}")
    return "\n".join(lines)


def default_tasks(stage, folder) -> list:
    """The set that fits the model: log-likelihood tasks for a base model, answers for a chat model (mid, SFT,
    Dolly); of those, the ones whose file is in the folder (the built-in tasks and val_bpb need none)."""
    names = LL_TASKS if stage == "base" else GEN_TASKS
    present = [t for t in names if t not in FILES or (Path(folder) / FILES[t]).is_file()]
    missing = [t for t in names if t not in present]
    if missing:
        print0(f"no file for {', '.join(missing)} in {folder}: left out (python prepare_data.py --what=eval "
               f"fetches them)")
    if not present:
        raise UserError(f"no evaluation file in {folder}; fetch them (python prepare_data.py --what=eval) or "
                        f"pass --eval_data_dir=<folder>")
    return present


def evaluate_checkpoint(spec, names, folder, d, autocast, default_stage=("sft", "dolly", "mid", "base")) -> tuple:
    """(meta, results) for one checkpoint; the results also go to eval_<step>.json beside it."""
    from checkpoint import load_model
    model, tok, meta = load_model(spec, d.device, default_stage=default_stage)
    for note in meta["notes"]:
        print0(note)
    asked = bool(names)
    names = names or default_tasks(meta["stage"], folder)
    if "ifeval" in names:  # before the other tasks' answers, not after them
        import evaluate
        evaluate.check_ifeval_packages()
    print0(f"evaluating {meta['path']} (stage {meta['stage']}, step {meta['step']}) on {', '.join(names)}"
           + (f", {limit} items each" if limit > 0 else ""))
    results = {}
    for name in names:
        if name == "val_bpb":
            try:
                results[name] = run_val_bpb(model, tok, meta["config"], n=limit, autocast=autocast)
            except UserError as e:
                if asked:
                    raise
                print0(f"val_bpb left out: {str(e).splitlines()[0]} (--data_root=<shards> scores it)")
        elif name in GEN_TASKS:
            results[name] = run_gen_task(model, tok, name, folder, n=limit, autocast=autocast)
        else:
            results[name] = run_task(model, tok, name, folder, n=limit, batch_size=batch_size, autocast=autocast,
                                     progress=True)
    print0(table(results))
    if d.is_master:
        from checkpoint import atomic_write_text
        where = Path(meta["path"])  # a ckpt_*.pt, or a Hugging Face folder (hf:<folder>): its results go inside it
        path = where / "eval_000000.json" if where.is_dir() else where.with_name(f"eval_{meta['step']:06d}.json")
        atomic_write_text(path, json.dumps({"checkpoint": str(meta["path"]), "step": meta["step"], "limit": limit,
                                            "results": {t: {k: (v if k == "n" else {"value": v[0], "stderr": v[1]})
                                                            for k, v in r.items()} for t, r in results.items()}},
                                           indent=2))
        print0(f"saved {path}")
    return meta, results


def main(argv=None):
    apply_overrides(globals(), sys.argv[1:] if argv is None else argv)
    from checkpoint import CheckpointManager, resolve_checkpoint
    d = common.setup_distributed(device)
    ptdtype, _ = common.pick_dtype(d.device, dtype)
    autocast, _ = common.make_autocast_and_scaler(d.device, ptdtype)
    folder = Path(eval_data_dir).expanduser() if eval_data_dir else common.base_dir() / "eval_data"
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in LL_TASKS + GEN_TASKS]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(LL_TASKS + GEN_TASKS)}")
    if not all_checkpoints:
        evaluate_checkpoint(checkpoint, names, folder, d, autocast)
        return
    # every complete checkpoint of the run, oldest first, and the best by the mean accuracy over the tasks
    if checkpoint.strip().startswith("hf:"):
        raise UserError("--all_checkpoints=True scores the checkpoints of a t4chat run; a Hugging Face folder is one "
                        "model: leave out --all_checkpoints")
    run = resolve_checkpoint(checkpoint, default_stage=("sft", "dolly", "mid", "base"), key="checkpoint").parent
    scores = []
    for step, path in CheckpointManager(run).complete().items():
        _, results = evaluate_checkpoint(str(path), names, folder, d, autocast)
        scores.append((rank_value(results), step, results))
    if not scores:
        raise UserError(f"no complete checkpoint in {run}; --all_checkpoints=True needs a run folder")
    best = max(scores)[1]
    cols = list(scores[0][2])
    lines = [f"{'step':>8}" + "".join(f"{t:>15}" for t in cols) + f"{'mean acc':>10}"]
    for value, step, results in scores:
        mean = f"{value:>10.4f}" if any("bpb" not in r for r in results.values()) else f"{'':>10}"
        lines.append(f"{step:>8}" + "".join(f"{headline(results[t]):>15.4f}" for t in cols) + mean
                     + ("  <- best" if step == best else ""))
    print0(f"all checkpoints of {run} (acc; IFEval: prompt-level strict; val_bpb: bits per byte, the best is the "
           f"lowest when it is the only task):\n" + "\n".join(lines))

if __name__ == "__main__":
    common.run(main)
