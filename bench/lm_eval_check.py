"""bench/lm_eval_check.py: eval.py's ARC-Easy, PIQA and Winogrande scores against lm-evaluation-harness's own.
in:  --checkpoint (a ckpt_*.pt, a run folder, or a stage name; "" = the newest base run, else mid, sft, dolly)
     the task files under --eval_data_dir (python prepare_data.py --what=eval fetches them)
out: a table on stdout (task, metric, eval.py, lm-eval, difference, items whose pick differs, of those the
     floating-point ties, and eval.py's closest call: the smallest margin between an item's two best choices);
     exit 1 when the two disagree beyond floating-point ties, 0 when they agree
     python bench/lm_eval_check.py --checkpoint=base --limit=500 --eval_data_dir=../shared/data/eval
needs: pip install "lm-eval[hf]"   (lm-eval and accelerate; only this check uses them, so requirements.txt does not)

The checkpoint goes out through export_hf.py as a float32 LlamaForCausalLM folder. lm-evaluation-harness then
scores that folder with its own `hf` model (pretrained=<folder>,dtype=float32,add_bos_token=True) on tasks we
write into a temporary folder: the harness's own arc_easy and piqa configs (the same doc_to_text, doc_to_target,
doc_to_choice and metrics, word for word) over the local files, whose fields a process_docs maps back to the
names those configs read, and Winogrande in the harness's partial-scoring form (doc_to_text gives the gold index,
doc_to_choice the sentence filled in with each option, doc_to_target the ending). eval.py's own scorer
(load_task, loglikelihoods, score) runs on the checkpoint and the same first --limit items. Before any score is
compared we check that both sides built the same (context, continuation) strings and the same token ids, bos
first. Everything runs offline; the export and the task folder are deleted at the end.
"""
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repo's modules: this script lives one folder down

import common  # noqa: E402  (after the path: these are the repo's modules)
from common import UserError  # noqa: E402
from configurator import apply_overrides  # noqa: E402

# ---- config (module globals; override with --key=value; -h lists them) -----------------------------------------
checkpoint = ""               # a ckpt_*.pt, a run folder, or a stage name; "" = newest base, else mid, sft, dolly
eval_data_dir = ""            # the task files; "" = $NANOCHAT_BASE_DIR/eval_data
limit = 500                   # items per task (the first ones, in file order); -1 = all
tasks = "arc_easy,piqa,winogrande"  # any of these three
batch_size = 16               # sequences per forward pass, on both sides (scores do not depend on it beyond rounding)
device = "cpu"                # both sides run float32 on it
tie_tol = 1e-3                # nats: a differing pick is a rounding tie when flipping it took less (see compare())
keep = ""                     # keep the export and the task folder here (for a look or a rerun); "" = a temp folder
# ------------------------------------------------------------------------------------------------------------------

TASKS = ("arc_easy", "piqa", "winogrande")

# The harness's task configs (lm_eval/tasks/arc/arc_easy.yaml, piqa/piqa.yaml), with only the dataset lines
# changed: the local file as the test split, and a process_docs that gives its rows the original fields.
# check() finds every doc_to_* line against the installed harness's file, so a harness that changes its prompt
# shows up here rather than as a silent difference.
HARNESS_LINES = {
    "arc_easy": ("arc/arc_easy.yaml", [
        'doc_to_text: "Question: {{question}}\\nAnswer:"',
        'doc_to_target: "{{choices.label.index(answerKey)}}"',
        'doc_to_choice: "{{choices.text}}"']),
    "piqa": ("piqa/piqa.yaml", [
        'doc_to_text: "Question: {{goal}}\\nAnswer:"',
        "doc_to_target: label",
        'doc_to_choice: "{{[sol1, sol2]}}"']),
    # winogrande/default.yaml points at preprocess_winogrande.py, which reads the original sentence with its
    # blank; our file has the sentence already split, so utils.py below plays that module's part
    "winogrande": ("winogrande/default.yaml", [
        "doc_to_text: !function utils.winogrande_gold",
        "doc_to_target: !function utils.winogrande_ending",
        "doc_to_choice: !function utils.winogrande_contexts"]),
}
METRICS = {"arc_easy": ("acc", "acc_norm"), "piqa": ("acc", "acc_norm"), "winogrande": ("acc",)}
PROCESS_DOCS = {"arc_easy": "utils.arc_docs", "piqa": "utils.piqa_docs", "winogrande": None}

# llm-foundry's rows -> the fields of the harness's datasets (allenai/ai2_arc, baber/piqa). The query keeps
# "Question: " (and PIQA's its "\n"): we take the question back out, so the harness's own doc_to_text puts the
# same words around it. eval.py's _answer_prompt builds its prompt from the same query, and check() compares the
# two sides' strings item by item.
UTILS_PY = '''\
def _question(query):
    if not query.startswith("Question: "):
        raise ValueError(f"query does not start with 'Question: ': {query[:60]!r}")
    query = query[len("Question: "):]
    return query[:-1] if query.endswith("\\n") else query  # PIQA's one newline; the harness adds "\\nAnswer:"


def arc_docs(dataset):
    def fields(doc):
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        return {"question": _question(doc["query"]), "choices": {"text": doc["choices"], "label": labels},
                "answerKey": labels[doc["gold"]]}
    return dataset.map(fields, remove_columns=["query", "gold"])


def piqa_docs(dataset):
    def fields(doc):
        return {"goal": _question(doc["query"]), "sol1": doc["choices"][0], "sol2": doc["choices"][1],
                "label": doc["gold"]}
    return dataset.map(fields, remove_columns=["query", "choices", "gold"])


# Winogrande, as preprocess_winogrande.py in the harness: the gold index as the "text" (which makes the task
# multiple-input: one context per option, one shared continuation), the sentence up to the blank with each
# option filled in as the choices, and the rest of the sentence, stripped, as the target
def winogrande_gold(doc):
    return int(doc["gold"])


def winogrande_contexts(doc):
    return list(doc["context_options"])


def winogrande_ending(doc):
    return doc["continuation"].strip()
'''


def task_yaml(name, data_file) -> str:
    _, lines = HARNESS_LINES[name]
    process = f"process_docs: !function {PROCESS_DOCS[name]}\n" if PROCESS_DOCS[name] else ""
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in METRICS[name])
    return (f"task: t4chat_{name}\n"
            f"dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
            f"output_type: multiple_choice\n"
            f"test_split: test\n{process}" + "\n".join(lines) + "\nmetric_list:\n" + metrics
            + "metadata:\n  version: 1.0\n")


def write_task_folder(folder: Path, names, data_dir: Path):
    import eval as ev
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(UTILS_PY, encoding="utf-8")
    for name in names:
        (folder / f"t4chat_{name}.yaml").write_text(task_yaml(name, ev.task_file(name, data_dir).resolve()),
                                                    encoding="utf-8")


def check_harness_lines(names) -> list:
    """Our doc_to_* lines that the installed harness's own config lacks (ARC and PIQA; Winogrande's are ours)."""
    import lm_eval
    root = Path(lm_eval.__file__).parent / "tasks"
    missing = []
    for name in names:
        if name == "winogrande":
            continue
        path, lines = HARNESS_LINES[name]
        text = (root / path).read_text(encoding="utf-8")
        missing += [f"{path}: {line}" for line in lines if line not in text.splitlines()]
    return missing


# ---- the two sides ----

def export(spec_path: Path, folder: Path):
    """export_hf.py's own path, float32: the weights as trained, and transformers' logits checked against ours."""
    import export_hf
    export_hf.main([f"--checkpoint={spec_path}", f"--out={folder}", "--dtype=float32", "--overwrite=True"])


def harness_model(folder: Path):
    """The harness's `hf` model, built the way simple_evaluate builds it from model="hf" and model_args. We build
    it here rather than pass the string so that same_inputs() can ask it how it encodes each pair."""
    from lm_eval.api.registry import get_model
    # add_bos_token=True: eval.py puts bos first, as training saw every document. The export's tokenizer_config
    # says add_bos_token false (our encode() adds nothing), so without this argument the harness scores the same
    # strings with no bos in front: a different model input, and same_inputs() stops the check
    args = f"pretrained={folder},dtype=float32,add_bos_token=True"
    print(f"lm-eval model: hf, model_args {args}, batch_size {batch_size}, device {device}")
    return get_model("hf").create_from_arg_string(args, {"batch_size": batch_size, "device": device})


def run_harness(lm, names, task_folder: Path) -> dict:
    """{task: (aggregate metrics, logged samples in doc order)} from lm_eval.simple_evaluate."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"t4chat_{n}" for n in names], task_manager=manager,
                                  limit=limit if limit > 0 else None, log_samples=True, bootstrap_iters=0)
    return {n: (out["results"][f"t4chat_{n}"], sorted(out["samples"][f"t4chat_{n}"], key=lambda s: s["doc_id"]))
            for n in names}


def run_ours(model, tok, name, data_dir):
    """eval.py's scorer, as run_task runs it, keeping the per-pair log-likelihoods for the item-by-item look."""
    import eval as ev
    items = ev.load_task(name, data_dir, limit)
    pairs = [(c, t) for it in items for c, t in zip(it["contexts"], it["continuations"])]
    results = ev.loglikelihoods(model, tok, pairs, batch_size=batch_size, label=name)
    return items, pairs, results, ev.score(name, items, results)


# ---- comparing ----

def same_inputs(lm, tok, pairs, samples) -> list:
    """Problems (empty: none) with what both sides score: the same (context, continuation) strings, item by item,
    and the same token ids for them, the harness's bos first exactly where eval.py puts ours."""
    import eval as ev
    theirs = [tuple(a[:2]) for s in samples for a in s["arguments"]]
    if len(theirs) != len(pairs):
        return [f"{len(pairs)} pairs here, {len(theirs)} in lm-eval"]
    problems = []
    for i, (mine, other) in enumerate(zip(pairs, theirs)):
        if mine != other:
            problems.append(f"pair {i}: eval.py scores {mine!r}, lm-eval {other!r}")
        elif lm._encode_pair(*mine) != ev.encode_pair(tok, *mine):
            (a, b), (c, d) = ev.encode_pair(tok, *mine), lm._encode_pair(*mine)
            problems.append(f"pair {i}: token ids differ: eval.py context {a[:6]}... ({len(a)}) continuation "
                            f"{b[:6]}... ({len(b)}), lm-eval context {c[:6]}... ({len(c)}) continuation {d[:6]}... "
                            f"({len(d)})")
    return problems


def _pick(scores):
    return max(range(len(scores)), key=lambda j: scores[j])  # the first of equal scores, as np.argmax


def _margin(item, scores) -> float:
    """How far an item's best choice is ahead of the next: how near eval.py came to a tie, what the check was up
    against. A choice that repeats another word for word (ARC has a few) ties with it exactly on both sides, and
    both take the first, so repeats count once."""
    distinct = {(c, t): v for c, t, v in zip(item["contexts"], item["continuations"], scores)}
    top = sorted(distinct.values(), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def compare(name, items, results, samples) -> dict:
    """Per metric: items whose pick differs, and of those the floating-point ties.

    The rule for ties: eval.py picks A with score margin m1 over B; lm-eval picks B with margin m2 over A. Their
    score difference A - B has moved by m1 + m2 between the two sides, which rounding can do only when the two
    scores of each choice agree to within about (m1 + m2) / 2. So a differing pick with m1 + m2 <= tie_tol is a
    tie that rounding flipped, and it can move the accuracy by one item. A differing pick with a larger move, or an
    accuracy gap larger than the number of ties, means the two sides score differently: the check fails."""
    out, k = {}, 0
    lls_ours, lls_theirs = [], []
    for item, s in zip(items, samples):
        m = len(item["continuations"])
        lls_ours.append([r[0] for r in results[k:k + m]])
        lls_theirs.append([float(r[0]) for r in s["filtered_resps"]])
        k += m
    max_diff = max(abs(a - b) for x, y in zip(lls_ours, lls_theirs) for a, b in zip(x, y))
    for metric in METRICS[name]:
        differ, ties, right_ours, right_theirs, own_metric_disagrees, closest = [], 0, 0, 0, 0, float("inf")
        for i, (item, s) in enumerate(zip(items, samples)):
            lengths = item.get("lengths") if metric == "acc_norm" else None
            norm = [max(1, n) for n in lengths] if lengths else [1] * len(item["continuations"])
            ours = [ll / n for ll, n in zip(lls_ours[i], norm)]
            theirs = [ll / n for ll, n in zip(lls_theirs[i], norm)]
            a, b = _pick(ours), _pick(theirs)
            closest = min(closest, _margin(item, ours))
            right_ours += a == item["gold"]
            right_theirs += b == item["gold"]
            own_metric_disagrees += float(b == item["gold"]) != float(s[metric])  # our reading of its scores
            if a != b:
                move = (ours[a] - ours[b]) + (theirs[b] - theirs[a])
                ties += move <= tie_tol
                differ.append((i, move))
        out[metric] = {"differ": differ, "ties": ties, "right_ours": right_ours, "right_theirs": right_theirs,
                       "misread": own_metric_disagrees, "closest": closest}
    out["max_ll_diff"] = max_diff
    return out


def verdict(cmp) -> list:
    """Failures (empty: the accuracies agree up to ties)."""
    bad = []
    for metric, c in cmp.items():
        if metric == "max_ll_diff":
            continue
        gap = abs(c["right_ours"] - c["right_theirs"])
        if c["misread"]:
            bad.append(f"{metric}: {c['misread']} items where lm-eval's own per-item {metric} is not the pick its "
                       f"log-likelihoods give (our reading of its samples is off)")
        if gap > c["ties"]:
            bad.append(f"{metric}: {gap} items apart, only {c['ties']} ties could explain that")
        for i, move in c["differ"]:
            if move > tie_tol:
                bad.append(f"{metric}: item {i} picks differently and no tie (margins sum to {move:.3g} nats)")
    return bad


def table(rows) -> str:
    """closest call: eval.py's smallest margin between an item's two best distinct choices, in the metric's own
    units (nats; acc_norm: nats per character)."""
    lines = [f"{'task':<12}{'metric':<10}{'n':>5}{'eval.py':>10}{'lm-eval':>10}{'diff':>10}{'picks differ':>14}"
             f"{'of them ties':>14}{'closest call':>14}"]
    for name, metric, n, a, b, differ, ties, closest in rows:
        lines.append(f"{name:<12}{metric:<10}{n:>5}{a:>10.4f}{b:>10.4f}{a - b:>+10.4f}{differ:>14}{ties:>14}"
                     f"{closest:>14.2g}")
    return "\n".join(lines)


def main(argv=None):
    apply_overrides(globals(), sys.argv[1:] if argv is None else argv)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names or set(names) - set(TASKS):
        raise UserError(f"tasks={tasks!r}: pick from {', '.join(TASKS)}")
    data_dir = Path(eval_data_dir).expanduser() if eval_data_dir else common.base_dir() / "eval_data"
    import eval as ev
    for name in names:  # a missing file stops us now, not after the export
        ev.task_file(name, data_dir)
    work = Path(keep).expanduser().resolve() if keep else Path(tempfile.mkdtemp(prefix="lm_eval_check."))
    # offline: the export is a local folder, the tasks local json files; datasets caches beside them, not in ~
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ["HF_DATASETS_CACHE"] = str(work / "datasets_cache")
    # before any work: a missing package is a one-line message (the harness's hf model imports accelerate)
    missing = [m for m in ("lm_eval", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not installed; this check needs pip install \"lm-eval[hf]\"")
    try:
        check(names, data_dir, work)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def check(names, data_dir, work: Path):
    from checkpoint import load_model
    t0 = time.time()
    model, tok, meta = load_model(checkpoint, device, default_stage=("base", "mid", "sft", "dolly"))
    for note in meta["notes"]:
        print(note)
    print(f"checkpoint {meta['path']} (stage {meta['stage']}, step {meta['step']}), tasks {', '.join(names)}, "
          f"first {limit if limit > 0 else 'all'} items each")
    stale = check_harness_lines(names)
    if stale:
        raise UserError("the installed lm-eval's task configs no longer have these lines, which ours copy; update "
                        "HARNESS_LINES to the harness's prompts:\n  " + "\n  ".join(stale))
    export(Path(meta["path"]), work / "export")
    write_task_folder(work / "tasks", names, data_dir)
    lm = harness_model(work / "export")
    # the harness's max_length is what it truncates to (oldest tokens first, as eval.py): it must be ours
    if lm.max_length != model.config.max_seq_len:
        raise UserError(f"lm-eval's max_length is {lm.max_length}, the model's max_seq_len {model.config.max_seq_len}")
    t1 = time.time()
    harness = run_harness(lm, names, work / "tasks")
    t2 = time.time()
    rows, failures, notes = [], [], []
    for name in names:
        items, pairs, results, ours = run_ours(model, tok, name, data_dir)
        agg, samples = harness[name]
        problems = same_inputs(lm, tok, pairs, samples)
        failures += [f"{name}: {p}" for p in problems[:5]]
        if len(problems) > 5:
            failures.append(f"{name}: ... {len(problems) - 5} more input differences")
        if problems:
            continue
        cmp = compare(name, items, results, samples)
        notes.append(f"{name}: {len(pairs)} (context, continuation) pairs, identical strings and token ids on both "
                     f"sides (bos {tok.bos_id} first); log-likelihoods differ by at most {cmp['max_ll_diff']:.2g} "
                     f"nats")
        failures += [f"{name} {b}" for b in verdict(cmp)]
        for metric in METRICS[name]:
            c = cmp[metric]
            rows.append((name, metric, ours["n"], ours[metric][0], agg[f"{metric},none"], len(c["differ"]),
                         c["ties"], c["closest"]))
    t3 = time.time()
    print("\n".join(notes + [table(rows)]))
    print(f"time: export and load {t1 - t0:.0f} s, lm-eval {t2 - t1:.0f} s, eval.py and comparison {t3 - t2:.0f} s")
    if failures:
        print("DISAGREE:\n  " + "\n  ".join(failures))
        raise SystemExit(1)
    print(f"agree: every accuracy is the same up to floating-point ties (tie_tol {tie_tol:g} nats)")


if __name__ == "__main__":
    common.run(main)
