"""finetune_dolly.py: retention, exact resume after SIGKILL, bad Dolly files, a world-size-free split, BLEU/ROUGE.
python -m pytest -q tests/test_dolly.py"""
import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter

import pytest
import torch

from conftest import REPO, SHARED, TINY, latest_step, needs_shared, read_metrics, run_script, start_script, wait_for_checkpoint

# ---- a tiny base checkpoint and a synthetic Dolly file: the fixtures every run below starts from ----

CATEGORIES = ("open_qa", "classification", "brainstorming", "closed_qa")
_THINGS = ["sky", "grass", "snow", "sun", "sea", "coal", "rose", "lemon"]
_COLOURS = ["blue", "green", "white", "yellow", "blue", "black", "red", "yellow"]


def dolly_row(k, rng):
    """Short rows with a pattern a byte-level 2-layer model picks up in a few steps."""
    cat = CATEGORIES[k % len(CATEGORIES)]
    i = rng.randrange(len(_THINGS))
    thing, colour = _THINGS[i], _COLOURS[i]
    if cat == "open_qa":
        return {"instruction": f"What colour is the {thing}?", "context": "", "response": f"The {thing} is {colour}.",
                "category": cat}
    if cat == "classification":
        return {"instruction": f"Is {colour} a colour or an animal?", "context": "", "response": f"{colour} is a colour.",
                "category": cat}
    if cat == "brainstorming":
        return {"instruction": f"Name things that are {colour}.", "context": "", "response": f"The {thing}.",
                "category": cat}
    return {"instruction": "What colour is it?", "context": f"The {thing} is {colour}.", "response": f"It is {colour}.",
            "category": cat}


def write_dolly(path, n=160, seed=0, extra_lines=()):
    rng = random.Random(seed)
    lines = [json.dumps(dolly_row(k, rng)) for k in range(n)] + list(extra_lines)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_memo(path, n=24, seed=1):
    """Rows whose answers are random letters: the model learns the 'Answer: ' template, then memorises the
    training answers, so the validation loss turns up within 30 steps and the best checkpoint is one in the
    middle that neither keep_last_n nor permanent_checkpoints would keep (step 15 on our CPU)."""
    rng = random.Random(seed)
    rows = [{"instruction": f"Item {k}?", "context": "", "category": "ab"[k % 2],
             "response": "Answer: " + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(12))}
            for k in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A 10-step byte-level base run (train_base.py, the real pipeline) to finetune from."""
    from conftest import make_corpus
    root = tmp_path_factory.mktemp("dolly_base")
    corpus = make_corpus(root / "corpus", n_shards=2, docs_per_shard=100)
    out = root / "base"
    run_script("train_base.py", *TINY, f"--data_root={corpus}", f"--out_dir={out}", "--max_steps=10",
               "--total_batch_size=1024", "--eval_every=-1", "--checkpoint_interval=-1", "--max_lr=0.01",
               "--max_seq_len=128")
    return out


@pytest.fixture(scope="module")
def memo_file(tmp_path_factory):
    return write_memo(tmp_path_factory.mktemp("dolly_data") / "memo.jsonl")


def _args(base, data, out, *extra, steps=30):
    """The tiny finetuning command: chat template (short prompts), 8 rows a step as 4 x 2 accumulation."""
    return [f"--pretrained_checkpoint={base}", f"--dolly_path={data}", f"--out_dir={out}", f"--max_steps={steps}",
            "--device=cpu", "--compile=False", "--dtype=float32", "--max_seq_len=96", "--device_batch_size=4",
            "--target_examples_per_step=8", "--max_lr=3e-3", "--warmup_steps=2", "--prompt_format=chat",
            "--gen_eval_examples=4", "--gen_max_tokens=16", *extra]


# retention: checkpoints at 5, 10, ..., 30; keep the last 2, step 10 for good and the best 1 by val loss
RETENTION = ["--checkpoint_interval=5", "--keep_last_n_checkpoints=2", "--permanent_checkpoints=10",
             "--keep_best_n=1", "--eval_every=-1", "--val_fraction=0.25", "--max_lr=1.5e-2", "--lr_scheduler=constant"]


@pytest.fixture(scope="module")
def retention_run(tiny_base, memo_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("retention") / "run"
    p = run_script("finetune_dolly.py", *_args(tiny_base, memo_file, out, *RETENTION))
    return out, p


def _kept_steps(run_dir):
    return sorted(int(f.name[5:11]) for f in run_dir.glob("ckpt_*.pt"))


def _assert_retention(run_dir):
    evals = read_metrics(run_dir, "eval")
    # keep_best_n > 0: every checkpoint was evaluated, so each has a score; none at step 0
    assert set(range(5, 31, 5)) <= set(evals), sorted(evals)
    best = min(range(5, 31, 5), key=lambda s: evals[s]["val_loss"])
    assert _kept_steps(run_dir) == sorted({10, 25, 30, best})
    index = json.loads((run_dir / "checkpoints.json").read_text(encoding="utf-8"))
    assert index["best"]["step"] == best and index["best"]["val_loss"] == evals[best]["val_loss"]
    assert "validation loss" in index["best"]["why"]
    assert index["latest"] == "ckpt_000030.pt"
    assert [c["step"] for c in index["checkpoints"]] == sorted({10, 25, 30, best})
    return best


def test_retention_keeps_last_permanent_best_and_final(retention_run):
    run_dir, p = retention_run
    best = _assert_retention(run_dir)
    # the run itself: the split and format are announced, the loss falls, BLEU-4/ROUGE-L printed and kept
    assert "prompt format: chat (given)" in p.stdout and "fingerprint" in p.stdout
    train, evals = read_metrics(run_dir), read_metrics(run_dir, "eval")
    assert evals[best]["val_loss"] < evals[5]["val_loss"]
    assert sum(train[s]["loss"] for s in range(25, 30)) < sum(train[s]["loss"] for s in range(5))
    assert "BLEU-4" in p.stdout and "ROUGE-L" in p.stdout and {"bleu4", "rougeL"} <= set(evals[30])
    gens = [json.loads(line) for line in (run_dir / "generations_000030.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [g["category"] for g in gens] == ["a", "b", "a", "b"]  # the categories take turns
    assert all({"instruction", "context", "reference", "generation", "finish"} <= set(g) for g in gens)
    gen_metrics = read_metrics(run_dir, "gen_eval")[30]
    assert gen_metrics["n/all"] == 4 and gen_metrics["n/a"] == 2 and "rougeL/b" in gen_metrics


@pytest.mark.slow
def test_sigkill_then_auto_resume_is_bitwise_identical(tiny_base, memo_file, tmp_path, retention_run):
    reference, _ = retention_run
    out = tmp_path / "run"
    args = _args(tiny_base, memo_file, out, *RETENTION)
    proc = start_script("finetune_dolly.py", *args)
    wait_for_checkpoint(proc, out, 10)
    proc.kill()  # SIGKILL: no handler runs, exactly like a power cut or the OOM killer
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert latest_step(out) < 30, "the run finished before the kill; the test proves nothing"
    p = run_script("finetune_dolly.py", *args, "--auto_resume=True")
    assert "(resume, step " in p.stdout
    ca = torch.load(reference / "ckpt_000030.pt", map_location="cpu", weights_only=True)
    cb = torch.load(out / "ckpt_000030.pt", map_location="cpu", weights_only=True)
    assert ca["step"] == cb["step"] == 30
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), f"weights differ at {k}"
    for k, v in ca["optimizer"]["state"].items():
        assert all(torch.equal(v[n], cb["optimizer"]["state"][k][n]) for n in v), f"optimizer state differs at {k}"
    la, lb = read_metrics(reference), read_metrics(out)
    assert sorted(la) == sorted(lb) == list(range(30))
    assert [la[s]["loss"] for s in la] == [lb[s]["loss"] for s in la]
    # the same checkpoints remain, with the same scores, and the final answers are the same text. (Not
    # _assert_retention(out): a resume drops metrics.jsonl records from its step on, and the eval at the resume
    # step itself is not redone when eval_every does not divide it, so metrics.jsonl lacks that one score.)
    assert _kept_steps(out) == _kept_steps(reference)
    assert (out / "checkpoints.json").read_bytes() == (reference / "checkpoints.json").read_bytes()
    assert (reference / "generations_000030.jsonl").read_bytes() == (out / "generations_000030.jsonl").read_bytes()


@pytest.mark.slow
def test_two_processes_match_one(tiny_base, tmp_path):
    """torchrun with 2 gloo processes: the same split, losses, validation loss and generated answers as 1."""
    data = write_dolly(tmp_path / "d.jsonl")
    args = ["--device_batch_size=2", "--eval_every=3", "--gen_eval_every=3", "--checkpoint_interval=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = run_script("finetune_dolly.py", *_args(tiny_base, data, one, *args, steps=6))
    p2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         str(REPO / "finetune_dolly.py"), *_args(tiny_base, data, two, *args, steps=6)], cwd=REPO,
                        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}, capture_output=True,
                        text=True, timeout=300)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    split = [line for line in p1.stdout.splitlines() if line.startswith("split:")]
    assert split and split == [line for line in p2.stdout.splitlines() if line.startswith("split:")]
    assert "2 x 2 GPUs x 2 accumulation" in p2.stdout and "2 x 1 GPUs x 4 accumulation" in p1.stdout
    l1, l2 = read_metrics(one), read_metrics(two)
    assert sorted(l1) == sorted(l2) == list(range(6))
    assert all(l2[s]["loss"] == pytest.approx(l1[s]["loss"], rel=1e-4) for s in range(6))
    e1, e2 = read_metrics(one, "eval"), read_metrics(two, "eval")
    assert all(e2[s]["val_loss"] == pytest.approx(e1[s]["val_loss"], rel=1e-4) for s in (0, 3, 6))
    # step 0: the same weights, so greedy answers to the same prompts are the same text (gathered from 2 ranks)
    assert (one / "generations_000000.jsonl").read_bytes() == (two / "generations_000000.jsonl").read_bytes()


# ---- bad Dolly files: skipped and counted, or one clear error and exit 2 ----

def test_broken_line_is_skipped_and_counted(tiny_base, tmp_path):
    data = write_dolly(tmp_path / "one_broken.jsonl", n=40, extra_lines=['{"instruction": "cut off', ])
    p = run_script("finetune_dolly.py", *_args(tiny_base, data, tmp_path / "run", "--eval_every=-1",
                                               "--gen_eval_examples=0", steps=1))
    assert "40 of 41 rows used, 1 skipped (first at line 41: bad JSON x1)" in p.stdout, p.stdout


def test_bad_files_fail_with_a_clear_message(tiny_base, tmp_path):
    rng = random.Random(0)
    rows = [dolly_row(k, rng) for k in range(40)]
    for r in rows[:6]:  # 6 of 40 = 15 % lack `response`
        del r["response"]
    (tmp_path / "no_response.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    good = write_dolly(tmp_path / "good.jsonl", n=40)
    cases = [  # (data file, extra flags, what the one error line must say)
        ("no_response.jsonl", [], ["6 of 40 rows are bad (15% > 10%)", "missing field 'response' x6",
                                   "first bad line: 1"]),
        ("empty.jsonl", [], ["empty.jsonl is empty", "instruction, context, response and category"]),
        ("missing.jsonl", [], ["no file at", "--dolly_path"]),
        (good.name, [f"--pretrained_checkpoint={tmp_path / 'nope.pt'}"],
         ["no complete checkpoint found at", "nope.pt", "--pretrained_checkpoint"])]
    # the four runs at once: each fails in its first seconds, mostly spent importing torch
    procs = [subprocess.Popen([sys.executable, str(REPO / "finetune_dolly.py"),
                               *_args(tiny_base, tmp_path / name, tmp_path / f"out_{k}", *extra, steps=2)],
                              cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k, (name, extra, _) in enumerate(cases)]
    for k, (proc, (name, _, expect)) in enumerate(zip(procs, cases)):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, out, err)
        assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, (name, err)
        for e in expect:
            assert e in err, (name, e, err)
        assert not (tmp_path / f"out_{k}").exists()  # nothing written for a run that never started


# ---- the split: fixed by seed and file, stratified by category, independent of the world size ----

def test_split_is_stratified_stable_and_world_size_free(tmp_path, monkeypatch):
    import finetune_dolly as fd
    from conversation_loader import ConversationBatchLoader
    from tokenizer import get_tokenizer
    path = write_dolly(tmp_path / "d.jsonl", n=400, seed=3)
    mix = fd.load_dolly(path, seed=42, val_fraction=0.1)
    lines = [r.meta["line"] for r in mix.val]
    # stratified: 10 % of each category's 100 rows; no row in both parts; the same split on a rerun
    assert Counter(r.meta["category"] for r in mix.val) == {c: 10 for c in CATEGORIES}
    assert not set(lines) & {r.meta["line"] for r in mix.train} and len(mix.train) == 360
    again = fd.load_dolly(path, seed=42, val_fraction=0.1)
    assert [r.meta["line"] for r in again.val] == lines
    assert [r.meta["line"] for r in again.train] == [r.meta["line"] for r in mix.train]
    assert fd.split_fingerprint(again.val) == fd.split_fingerprint(mix.val)
    assert [r.meta["line"] for r in fd.load_dolly(path, seed=7, val_fraction=0.1).val] != lines
    # the split is computed before any process group and takes no rank or world size; under torchrun each
    # process computes it from the same file and seed. Here the processes of a 2-process run, by environment:
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert [r.meta["line"] for r in fd.load_dolly(path, seed=42, val_fraction=0.1).val] == lines
    # the world size only chooses each rank's share: 2 ranks together see the 1-process batches exactly
    tok = get_tokenizer("bytes")
    render = fd.make_render(tok, "chat")
    args = dict(max_seq_len=96, seed=42, render=render)
    one = ConversationBatchLoader(mix.train, tok, device_batch_size=4, **args)
    two = [ConversationBatchLoader(mix.train, tok, device_batch_size=2, rank=r, world_size=2, **args) for r in (0, 1)]
    def targets(y, width):  # each rank pads to its own longest row: compare at one width
        return torch.nn.functional.pad(y, (0, width - y.shape[1]), value=-1)
    for _ in range(3):
        _, y1 = one.next_batch()
        ys = [ld.next_batch()[1] for ld in two]
        width = max(y.shape[1] for y in [y1, *ys])
        assert torch.equal(targets(y1, width), torch.cat([targets(y, width) for y in ys]))
    # validation: every held-out row exactly once over the ranks, the same rows for 1 and for 2 processes
    seen = {}
    for world in (1, 2):
        seen[world] = Counter()
        for r in range(world):
            ld = ConversationBatchLoader(mix.val, tok, device_batch_size=3, rank=r, world_size=world, shuffle=False,
                                         wrap=False, **args)
            for _ in range(ld.batches_per_epoch):
                _, y = ld.next_batch()
                seen[world].update(tuple(row[row != -1].tolist()) for row in y if (row != -1).any())
        assert sum(seen[world].values()) == len(mix.val)
    assert seen[1] == seen[2]
    # the generation prompts: fixed by the seed, categories in turn
    items = fd.generation_prompts(mix.val, tok, "chat", 8, 42, 80)
    assert [i["line"] for i in items] == [i["line"] for i in fd.generation_prompts(again.val, tok, "chat", 8, 42, 80)]
    assert Counter(i["category"] for i in items) == {c: 2 for c in CATEGORIES}


def test_text_metrics_per_category():
    import evaluate as fd  # BLEU-4/ROUGE-L live in evaluate.py, shared with the coming eval.py
    rows = [{"category": "a", "reference": "the cat sat on the mat", "generation": "the cat sat on the mat"},
            {"category": "b", "reference": "a quick brown fox jumps", "generation": "nothing alike here"}]
    m = fd.text_metrics(rows)
    assert m["a"]["bleu4"] == pytest.approx(100) and m["a"]["rougeL"] == pytest.approx(100)
    assert m["b"]["bleu4"] == pytest.approx(0) and m["b"]["rougeL"] == 0
    assert 0 < m["all"]["bleu4"] < 100 and m["all"]["rougeL"] == pytest.approx(50) and m["all"]["n"] == 2
    assert "nrefs:1" in m["signature"]


def test_default_start_and_prompt_format(base_dir):
    """pretrained_checkpoint='' starts from the newest sft run, else mid, else base; prompt_format=auto follows it."""
    import finetune_dolly as fd
    from configurator import UserError

    def fake_run(stage_dir):
        run = base_dir / stage_dir / "d2"
        run.mkdir(parents=True)
        (run / "ckpt_000001.pt").write_bytes(b"")
        (run / "ckpt_000001.json").write_text("{}", encoding="utf-8")
    from checkpoint import resolve_checkpoint

    def default_init_stage():  # the stage folder the default start comes from
        return {"checkpoints": "base", "mid_checkpoints": "mid", "chatsft_checkpoints": "sft"}[
            resolve_checkpoint("", default_stage=fd.INIT_STAGES).parent.parent.name]
    with pytest.raises(UserError, match="chatsft_checkpoints"):  # nothing yet: the error names the sft folder
        default_init_stage()
    fake_run("checkpoints")
    assert default_init_stage() == "base"
    fake_run("mid_checkpoints")
    assert default_init_stage() == "mid"
    fake_run("chatsft_checkpoints")
    assert default_init_stage() == "sft"
    assert fd.resolve_prompt_format("auto", {"stage": "base"}, None)[0] == "alpaca"
    assert fd.resolve_prompt_format("auto", {"stage": "sft"}, None)[0] == "chat"
    assert fd.resolve_prompt_format("chat", {"stage": "base"}, None) == ("chat", "given")
    resumed = {"config": {"prompt_format": "alpaca"}}
    assert fd.resolve_prompt_format("auto", {"stage": "sft"}, resumed)[0] == "alpaca"  # a resume keeps its format
    with pytest.raises(UserError, match="trained with prompt_format=alpaca"):
        fd.resolve_prompt_format("chat", {"stage": "sft"}, resumed)
    with pytest.raises(UserError, match="auto, chat, alpaca"):
        fd.resolve_prompt_format("plain", {"stage": "sft"}, None)


# ---- the real file ----

@needs_shared
def test_real_dolly_head_prints_bleu_rouge_and_writes_generations(tiny_base, tmp_path):
    out = tmp_path / "run"
    p = run_script("finetune_dolly.py", f"--pretrained_checkpoint={tiny_base}",
                   f"--dolly_path={SHARED / 'data' / 'dolly15k_head.jsonl'}", f"--out_dir={out}", "--max_steps=3",
                   "--device=cpu", "--compile=False", "--max_seq_len=256", "--device_batch_size=4",
                   "--target_examples_per_step=4", "--warmup_steps=1", "--max_lr=3e-3", "--eval_every=-1",
                   "--gen_eval_examples=8", "--gen_max_tokens=24")
    assert "prompt format: alpaca (auto: a base checkpoint" in p.stdout  # a base checkpoint gets the plain template
    assert "1,653 of 1,653 rows used" in p.stdout and "validation rows whose prompt leaves no room" in p.stdout
    assert "BLEU-4" in p.stdout and "ROUGE-L" in p.stdout and "open_qa" in p.stdout
    gens = [json.loads(line) for line in (out / "generations_000003.jsonl").read_text(encoding="utf-8").splitlines()]
    # at 232 bytes a prompt, the categories with a context passage (closed_qa, ...) have none that fit: the others
    # take turns
    assert len(gens) == 8 and len({g["category"] for g in gens}) >= 4
    assert all(g["reference"] and "### Response" not in g["instruction"] for g in gens)
