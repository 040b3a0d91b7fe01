"""eval.py: log-likelihood scoring as lm-evaluation-harness does it, checked by hand; a random model scores no better
than a trivial baseline; 1 and 2 processes agree. python -m pytest -q tests/test_eval.py"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import eval as ev
from conftest import REPO, SHARED, copy_pipeline, needs_shared
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

TOK = get_tokenizer("bytes")


def random_model(max_seq_len=512, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(depth=2, n_embd=64, vocab_size=TOK.vocab_size, max_seq_len=max_seq_len))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def by_hand(model, context, continuation):
    """sum of log p over the continuation, computed here: bos + context bytes, then the continuation's bytes."""
    ctx = [TOK.bos_id] + list(context.encode())
    cont = list(continuation.encode())
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ctx + cont[:-1]]))[0], dim=-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_loglikelihood_acc_norm_and_winogrande_partial_scoring_by_hand():
    model = random_model()
    arc = {"contexts": ["Question: Which is a fruit?\nAnswer:"] * 3, "continuations": [" apple", " a big red brick",
                                                                                      " carrot"],
           "gold": 1, "lengths": [5, 13, 6]}
    wino = {"contexts": ["The cup fell off the table because the cup", "The cup fell off the table because the table"],
            "continuations": [" was too close to the edge."] * 2, "gold": 0}
    items = [arc, wino]
    pairs = [(c, t) for it in items for c, t in zip(it["contexts"], it["continuations"])]
    got = ev.loglikelihoods(model, TOK, pairs, batch_size=2)  # batches of 2: padding inside a batch changes nothing
    want = [by_hand(model, c, t) for c, t in pairs]
    assert [g[0] for g in got] == pytest.approx(want, abs=1e-4)
    arc_ll, wino_ll = want[:3], want[3:]
    s = ev.score("arc_easy", [arc], got[:3])
    assert s["acc"][0] == float(max(range(3), key=lambda j: arc_ll[j]) == 1)
    # acc_norm divides by the length of the choice in characters (without the leading space), as the harness does
    assert s["acc_norm"][0] == float(max(range(3), key=lambda j: arc_ll[j] / arc["lengths"][j]) == 1)
    assert s["n"] == 1
    # Winogrande: the same ending scored after each filled-in option; the option with the likelier ending wins
    w = ev.score("winogrande", [wino], got[3:])
    assert w["acc"][0] == float(wino_ll[0] > wino_ll[1])
    # trailing spaces of a context move to the continuation before encoding (the harness's _encode_pair)
    assert ev.encode_pair(TOK, "Answer: ", "B") == ([TOK.bos_id] + list(b"Answer:"), list(b" B"))


def test_a_too_long_prompt_loses_its_oldest_tokens():
    model = random_model(max_seq_len=32)
    context = "x" * 100 + "Question: 2+2?\nAnswer:"
    (ll, _), = ev.loglikelihoods(model, TOK, [(context, " 4")])
    seq = ([TOK.bos_id] + list(context.encode()) + list(b" 4"))[-33:]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([seq[:-1]]))[0], dim=-1)
    assert ll == pytest.approx(logp[-2, seq[-2]].item() + logp[-1, seq[-1]].item(), abs=1e-5)


@needs_shared
@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "piqa", "winogrande", "mmlu"])
def test_a_random_model_does_no_better_than_a_trivial_baseline(task):
    """No peeking at the answer: a random tiny model's accuracy stays below the best answer-blind baseline (always
    the most frequent gold position, or always the shortest choice) plus 3 standard errors."""
    items = ev.load_task(task, SHARED / "data" / "eval", 200)
    res = ev.run_task(random_model(), TOK, task, SHARED / "data" / "eval", n=200)
    golds = [it["gold"] for it in items]
    frequent = max(golds.count(g) for g in set(golds)) / len(golds)
    shortest = sum(min(range(len(it["continuations"])), key=lambda j: len(it["continuations"][j])) == it["gold"]
                   for it in items) / len(items)
    for metric in ("acc", "acc_norm"):
        if metric in res:
            value, err = res[metric]
            assert value <= max(frequent, shortest) + 3 * err, (task, metric, value, frequent, shortest, err)
    assert res["n"] == 200


def _write_tasks(folder):
    folder.mkdir()
    with open(folder / "arc_easy_test.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"query": f"Question: What is {i} plus one?", "choices": [str(i + 1), str(i), "many"],
                                "gold": 0}) + "\n")
    with open(folder / "winogrande_dev.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"context_options": [f"Tom gave Ann {i} coins so Tom", f"Tom gave Ann {i} coins so Ann"],
                                "continuation": "was poorer.", "gold": i % 2}) + "\n")
    return folder


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_scores(tiny_pipeline, tmp_path):
    p = copy_pipeline(tiny_pipeline, tmp_path / "nc", stages=("sft",))
    data = _write_tasks(tmp_path / "eval_data")
    env = {**os.environ, **p.env, "OMP_NUM_THREADS": "1"}
    args = ["--checkpoint=sft", f"--eval_data_dir={data}", "--tasks=arc_easy,winogrande", "--limit=25", "--batch_size=4"]
    one = subprocess.run([sys.executable, str(REPO / "eval.py"), *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "task" in one.stdout and "arc_easy" in one.stdout and "acc_norm" in one.stdout  # the table
    saved = p.latest("sft").with_name(f"eval_{40:06d}.json")
    first = json.loads(saved.read_text())
    saved.unlink()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "eval.py"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    second = json.loads(saved.read_text())
    assert first["results"] == second["results"] and first["results"]["arc_easy"]["n"] == 25
    assert not (p.latest("sft").with_suffix(".json").read_text().count("results"))  # the marker is untouched


def test_all_checkpoints_scores_each_one_and_marks_the_best(tiny_pipeline, tmp_path):
    p = copy_pipeline(tiny_pipeline, tmp_path / "nc", stages=("sft",))
    data = _write_tasks(tmp_path / "eval_data")
    env = {**os.environ, **p.env, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "eval.py"), "--checkpoint=sft", "--all_checkpoints=True",
                        f"--eval_data_dir={data}", "--tasks=arc_easy,winogrande", "--limit=8"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = sorted(int(f.stem[5:]) for f in p.runs["sft"].glob("ckpt_*.pt"))
    assert len(steps) >= 2 and all((p.runs["sft"] / f"eval_{s:06d}.json").exists() for s in steps)
    summary = r.stdout.split("all checkpoints of", 1)[1]
    assert summary.count("<- best") == 1 and all(f"\n{s:>8}" in summary for s in steps)
    means = {int(line.split()[0]): float(line.split()[3]) for line in summary.splitlines()[2:] if line.strip()}
    best = int(next(line for line in summary.splitlines() if "<- best" in line).split()[0])
    assert means[best] == max(means.values())


def test_generative_tasks_read_letters_and_numbers_and_score_what_is_generated(tiny_pipeline, tmp_path, monkeypatch):
    import evaluate
    from checkpoint import load_model
    assert [ev.letter_of(r) for r in ("B", "The answer is (C).", "D. because", "b", "no idea")] == [
        "B", "C", "D", None, None]
    data = _write_tasks(tmp_path / "eval_data")
    with open(data / "gsm8k_test.jsonl", "w") as f:
        f.write(json.dumps({"question": "Tom has 2 apples and gets 3 more. How many?", "answer": "2+3=5\n#### 5"}) + "\n")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_pipeline.base_dir))
    model, tok, _ = load_model("sft")
    arc = ev.load_gen_task("arc_easy_mc", data, 3)
    assert "A. 1\nB. 0\nC. many" in arc[0][1][0]["content"] and arc[0][1][-1]["content"] == "A"
    for task in ("arc_easy_mc", "gsm8k", "builtin"):
        res = ev.run_gen_task(model, tok, task, data, n=3)  # the real model: counted, whatever it says
        assert 1 <= res["n"] <= (12 if task == "builtin" else 3) and 0 <= res["acc"][0] <= 1
        # what is scored is what was generated: the references themselves score 1, a wrong reply 0
        monkeypatch.setattr(evaluate, "answer_items", lambda m, t, its, **kw: [
            (kind, conv, conv[-1]["content"]) for kind, conv in its])
        assert ev.run_gen_task(model, tok, task, data, n=3)["acc"][0] == 1.0, task
        monkeypatch.setattr(evaluate, "answer_items", lambda m, t, its, **kw: [(k, c, "zzz") for k, c in its])
        assert ev.run_gen_task(model, tok, task, data, n=3)["acc"][0] == 0.0, task
        monkeypatch.undo()
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_pipeline.base_dir))


# IFEval: hand-written replies to prompts with known instructions, labelled here by reading the instruction
# (strict, loose) per instruction. The language check runs langdetect; the sentence count runs NLTK's Punkt.
IFEVAL_CASES = [
    ({"key": 1, "prompt": "Describe the sea in two sentences, all in lowercase, without commas.",
      "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma",
                              "length_constraints:number_sentences"],
      "kwargs": [{}, {}, {"relation": "less than", "num_sentences": 3}]},
     [("the sea is wide and blue. it never sleeps.", [True, True, True], [True, True, True]),
      ("The sea is wide, and blue. It never sleeps. It sings. It roars.", [False, False, False],
       [False, False, False]),
      # a chatty first line breaks the strict reading (an uppercase S, a third sentence); loose drops that line
      ("Sure! Here you go:\nthe sea is wide and blue. it never sleeps.", [False, True, False], [True, True, True])]),
    ({"key": 2, "prompt": "Antworte auf Deutsch: was ist ein Fluss? End your reply with 'Ist das alles?'",
      "instruction_id_list": ["language:response_language", "startend:end_checker"],
      "kwargs": [{"language": "de"}, {"end_phrase": "Ist das alles?"}]},
     [("Ein Fluss ist ein natürliches Fließgewässer, das sich von der Quelle bis zur Mündung durch die Landschaft "
       "bewegt. Ist das alles?", [True, True], [True, True]),
      ("A river is a natural stream of water flowing towards an ocean, a lake or another river.",
       [False, False], [False, False])]),
    ({"key": 3, "prompt": "List exactly three tips as markdown bullets and add a postscript starting with P.S.",
      "instruction_id_list": ["detectable_format:number_bullet_lists", "detectable_content:postscript"],
      "kwargs": [{"num_bullets": 3}, {"postscript_marker": "P.S."}]},
     [("* sleep well\n* drink water\n* walk daily\n\nP.S. start today", [True, True], [True, True]),
      ("* sleep well\n* drink water\n\nThat is all.", [False, False], [False, False])]),
]


def _ifeval_expected():
    docs, replies, strict, loose = [], [], [], []
    for doc, answers in IFEVAL_CASES:
        for reply, s, lo in answers:
            docs.append(doc), replies.append(reply), strict.append(s), loose.append(lo)
    return docs, replies, strict, loose


def test_ifeval_scores_hand_written_replies_as_the_harness_does_offline_and_twice_alike(tmp_path, monkeypatch):
    """Our IFEval = lm-evaluation-harness's checkers (its process_results), so the labels above are what the
    package's reference code says; a fresh process with no nltk_data anywhere (new HOME and base dir, nothing can
    be downloaded) gives the same results twice, and the aggregates are the harness's."""
    import evaluate
    docs, replies, strict, loose = _ifeval_expected()
    code = ("import json, sys; import evaluate; d, r = json.load(sys.stdin); "
            "print(json.dumps(evaluate.ifeval_results(d, r)))")
    env = {**os.environ, "HOME": str(tmp_path / "home"), "NANOCHAT_BASE_DIR": str(tmp_path / "nc"),
           "NLTK_DATA": str(tmp_path / "no_nltk_data")}
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120, input=json.dumps([docs, replies]))
        assert r.returncode == 0, r.stderr[-3000:]
        assert "punkt_tab" not in r.stdout + r.stderr  # found locally: no download attempted or reported
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1]
    assert (tmp_path / "nc" / "nltk_data" / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").is_file()
    assert [r["inst_level_strict_acc"] for r in runs[0]] == strict
    assert [r["inst_level_loose_acc"] for r in runs[0]] == loose
    assert [r["prompt_level_strict_acc"] for r in runs[0]] == [all(s) for s in strict]
    assert [r["prompt_level_loose_acc"] for r in runs[0]] == [all(lo) for lo in loose]
    # eval.py's task: what the model generated goes to the checkers; prompt level per prompt, instruction level
    # over all instructions (the harness's agg_inst_level_acc)
    data = tmp_path / "eval_data"
    data.mkdir()
    (data / "ifeval_input_data.jsonl").write_text("".join(json.dumps(d) + "\n" for d, _ in IFEVAL_CASES))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nc"))
    by_key = {doc["key"]: answers[0][0] for doc, answers in IFEVAL_CASES}  # each prompt's passing reply
    monkeypatch.setattr(evaluate, "answer_items", lambda m, t, its, **kw: [
        (kind, conv, by_key[conv[-1]["doc"]["key"]]) for kind, conv in its])
    res = ev.run_gen_task(random_model(), TOK, "ifeval", data)
    assert res["n"] == 3 and res["prompt_level_strict_acc"][0] == 1.0 and res["inst_level_loose_acc"][0] == 1.0
    by_key = {doc["key"]: answers[1][0] for doc, answers in IFEVAL_CASES}  # each prompt's failing reply
    res = ev.run_gen_task(random_model(), TOK, "ifeval", data)
    assert res["prompt_level_strict_acc"][0] == 0.0 and res["inst_level_strict_acc"][0] == 0.0
    by_key = {1: IFEVAL_CASES[0][1][2][0], 2: IFEVAL_CASES[1][1][0][0], 3: IFEVAL_CASES[2][1][1][0]}
    res = ev.run_gen_task(random_model(), TOK, "ifeval", data)
    assert res["prompt_level_strict_acc"][0] == pytest.approx(1 / 3)
    assert res["inst_level_strict_acc"][0] == pytest.approx(3 / 7) and res["prompt_level_loose_acc"][0] == 2 / 3
    assert "prompt_level_strict_acc" in ev.table({"ifeval": res})


def test_val_bpb_scores_the_runs_own_validation_shard(tiny_pipeline, monkeypatch):
    """A base checkpoint's bits per byte on the validation shard its run set aside, with a stderr; a folder with no
    shards says so."""
    from checkpoint import load_model
    from common import UserError
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_pipeline.base_dir))
    model, tok, meta = load_model("base")
    res = ev.run_val_bpb(model, tok, meta["config"], n=4)
    bpb, err = res["bpb"]
    assert res["n"] == 4
    assert 0 < bpb < 8 and 0 < err < bpb and ev.headline(res) == bpb
    # the global batch is fixed: the same sequences on 1 process as on N (each rank takes its share)
    import evaluate
    with monkeypatch.context() as m:
        m.setattr(evaluate, "rank_and_world", lambda: (0, 2))  # rank 0 of 2: half the rows, the same count
        assert ev.run_val_bpb(model, tok, meta["config"], n=4)["n"] == 4
    monkeypatch.setattr(ev, "data_root", str(tiny_pipeline.base_dir / "no_such_folder"))
    with pytest.raises(UserError):
        ev.run_val_bpb(model, tok, meta["config"], n=4)
