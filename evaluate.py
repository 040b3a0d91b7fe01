"""evaluate.py: what the stages (and the coming eval.py) measure, written once.

    eval_loss(model, loader, n_batches, token_bytes=...)   # validation loss (nats / trained token) and bits per byte
    task_accuracy(model, tok, items)                       # exact-match accuracy of greedy answers (tasks.py items)
    chat_eval(model, tok, loader, n_batches, items)        # the two together: what mid and SFT report
    generate_answers(model, tok, prompts, ...)             # greedy answers to a fixed prompt list, in order
    text_metrics(rows)                                     # BLEU-4 (sacrebleu) and ROUGE-L (rouge-score) per category

Under torchrun every rank takes a share (items i = rank, rank + W, ...) and the results are summed or gathered
back in order, so a score does not depend on the number of processes. Nothing here knows a stage, a config or a
run folder: the callers pass the model, the data and the autocast context, and decide where results go.
"""
import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist

from common import all_reduce, print0
from configurator import UserError


def rank_and_world():
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_dtype(device):
    # float64 so millions of per-token losses sum exactly; MPS has no float64, float32 there
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def gather(objs: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (the list itself without DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return objs
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, objs)
    return [o for p in parts for o in p]


# ---- loss ----

@torch.no_grad()
def eval_loss(model, loader, n_batches, *, token_bytes=None, autocast=None):
    """Mean loss over the trained tokens (targets != -1) of n_batches from `loader` (reset first, so every eval
    sees the same data), summed over ranks; plus bits-per-byte ('val_bpb') when token_bytes (bytes per token id,
    tokenizer.token_bytes()) is given."""
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader.reset()
    sums = torch.zeros(3, dtype=_sum_dtype(device), device=device)  # loss (nats), tokens, bytes
    for _ in range(max(1, n_batches)):
        x, y = loader.next_batch()
        with autocast:
            losses = model(x, y, reduction="none").float()
        if token_bytes is None:
            counted = y != -1
            nbytes = counted
        else:
            nbytes = token_bytes[y.clamp(min=0)] * (y != -1)
            counted = nbytes > 0  # specials (bos) carry no bytes: left out of bpb, as nanochat does
        sums += torch.stack([t.sum().to(sums.dtype) for t in (losses * counted, counted, nbytes)])
    all_reduce(sums)
    model.train(was_training)
    if sums[1] == 0:
        # nothing to average: every validation example lost its trained tokens (an SFT reply cut off by
        # max_seq_len, say). nan, not 0.0, so it can never pass for a perfect model or become the "best" one
        print0(f"warning: the {n_batches} validation batch(es) hold no trained token, so there is no val loss "
               f"(nan). Raise max_seq_len, or check that the validation data has assistant replies")
        out = {"val_loss": float("nan")}
    else:
        out = {"val_loss": (sums[0] / sums[1]).item()}
    if token_bytes is not None:
        out["val_bpb"] = (sums[0] / (math.log(2) * sums[2])).item() if sums[2] > 0 else float("nan")
    return out


# ---- generation ----

@torch.no_grad()
def generate_answers(model, tok, prompts, *, max_tokens, stop_ids, autocast=None) -> list:
    """Greedy answers to `prompts` (lists of ids), as [(text, finish reason), ...] in the prompts' order on every
    rank; each rank generates a share."""
    from engine import generate
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    mine = []
    for i in range(rank, len(prompts), world):
        ids, finish = generate(model, tok, prompts[i], max_tokens=max_tokens, temperature=0.0, stop_ids=stop_ids,
                               autocast=autocast)
        mine.append((i, tok.decode(ids), finish))
    model.train(was_training)
    return [(text, finish) for _, text, finish in sorted(gather(mine))]


def answer_items(model, tok, items, *, max_tokens, autocast=None) -> list:
    """Greedy chat answers to (task, messages) items whose last message is the reference: [(task, messages, reply)]
    for the items whose prompt fits the model's max_seq_len with room for max_tokens (the others are left out)."""
    fmt, limit = tok.chat_format, model.config.max_seq_len
    kept, prompts = [], []
    for task, messages in items:
        try:
            prompts.append(fmt.render_prompt(messages[:-1], max_seq_len=limit - max_tokens))
            kept.append((task, messages))
        except UserError:
            continue  # a prompt too long for the model: not answerable, not counted
    answers = generate_answers(model, tok, prompts, max_tokens=max_tokens, stop_ids=fmt.stop_ids(), autocast=autocast)
    return [(task, messages, text) for (task, messages), (text, _) in zip(kept, answers)]


def task_accuracy(model, tok, items, *, max_new_tokens=64, autocast=None) -> dict:
    """Exact-match accuracy of greedy answers (tasks.check_answer): items are (task, messages) whose last message
    is the reference answer. Returns {'acc_<task>': ..., 'acc': overall}; a task none of whose prompts fits in
    the model's max_seq_len is left out rather than reported as 0 %."""
    from tasks import check_answer
    counts = {}
    for task, messages, text in answer_items(model, tok, items, max_tokens=max_new_tokens, autocast=autocast):
        right, total = counts.get(task, (0, 0))
        counts[task] = (right + check_answer(task, messages, text), total + 1)
    out = {f"acc_{t}": right / total for t, (right, total) in sorted(counts.items())}
    out["acc"] = sum(r for r, _ in counts.values()) / max(1, sum(n for _, n in counts.values()))
    return out


def chat_eval(model, tok, loader, n_batches, items, *, autocast=None) -> dict:
    """What the chat stages (mid, SFT) report at every eval: the validation loss on the assistant tokens, and the
    exact-match accuracy of greedy answers to the held-out task items (when there are any)."""
    out = eval_loss(model, loader, n_batches, autocast=autocast)
    return out | (task_accuracy(model, tok, items, autocast=autocast) if items else {})


# ---- text overlap: BLEU-4 and ROUGE-L ----

def check_metric_packages():
    """At start-up, not after 1750 steps: the metrics need sacrebleu and rouge-score (requirements.txt)."""
    import importlib.util
    missing = [p for p, m in (("sacrebleu", "sacrebleu"), ("rouge-score", "rouge_score"))
               if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"BLEU-4/ROUGE-L need {' and '.join(missing)}: pip install -r requirements.txt "
                        f"(or pass --gen_eval_examples=0 to skip the generation eval)")


def text_metrics(rows) -> dict:
    """{category: {'n', 'bleu4', 'rougeL'}, ..., 'all': {...}} for rows with category/reference/generation.
    BLEU-4: sacrebleu's corpus BLEU (its default 13a tokenizer and exp smoothing); ROUGE-L: the mean F-measure of
    Google's rouge-score with the Porter stemmer (how ROUGE-L is usually reported); both on a 0-100 scale."""
    import sacrebleu  # lazily: a stage script should start without paying for these imports
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
