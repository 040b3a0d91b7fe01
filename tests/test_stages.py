"""The chat stages end to end in subprocesses: base -> mid -> SFT finding each other, real data files, exact
resume after SIGKILL, 2-process parity, overlong conversations, chat.py on the result, the max_seq_len warning.
python -m pytest -q tests/test_stages.py"""
import io
import json
import math
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from conftest import (PIPELINE_MID, PIPELINE_SEQ_LEN, PIPELINE_SFT, REPO, SHARED, assert_same_run, copy_pipeline,
                      latest_checkpoint, load_checkpoint_file, metric_values, needs_shared, read_metrics, run_script,
                      start_script, wait_for_checkpoint)


def _starts_from(stdout):
    """The 'starts from:' header line of a stage's log."""
    return next(line for line in stdout.splitlines() if line.startswith("starts from: "))[len("starts from: "):]


# ---- 1. the pipeline: each stage finds the previous one by itself ----------------------------------------------

def test_base_mid_sft_each_find_the_previous_checkpoint(tiny_pipeline):
    p = tiny_pipeline
    # no --pretrained_checkpoint anywhere: mid took the newest base run, SFT the newest mid run
    assert _starts_from(p.stdout["mid"]) == str(p.latest("base"))
    assert _starts_from(p.stdout["sft"]) == str(p.latest("mid"))
    for stage, steps in (("mid", 10), ("sft", 40)):
        ck = load_checkpoint_file(p.latest(stage))
        assert ck["stage"] == stage and ck["step"] == steps
        assert ck["tokenizer"]["name"] == "bytes"  # inherited from the base checkpoint, never passed again
        assert ck["arch"] == load_checkpoint_file(p.latest("base"))["arch"]  # the shape comes from the checkpoint too
        evals = read_metrics(p.runs[stage], "eval")
        first, last = evals[0], metric_values(evals[steps])
        # the built-in tasks' held-out accuracy is measured at every eval (acc_<task> and the overall acc)
        assert {"acc", "acc_spelling", "acc_count", "acc_arithmetic", "acc_identity"} <= set(last)
        assert all(math.isfinite(v) for v in last.values())
        assert last["val_loss"] < first["val_loss"], (stage, first, last)  # it learned something
    assert "warning: max_seq_len" not in p.stdout["mid"]  # the base run used the same length


@needs_shared
def test_pipeline_on_the_shared_data_files(tiny_pipeline, tmp_path):
    """mid -> SFT on the issue's real files (Dolly, ShareGPT, the Alpaca demo, GSM8K), found under the fixed
    layout $NANOCHAT_BASE_DIR/data/, starting from a copy of the tiny base run."""
    p = copy_pipeline(tiny_pipeline, tmp_path / "nanochat", stages=("base",))
    data = p.base_dir / "data"
    data.mkdir()
    files = {"dolly15k_head.jsonl": "dolly15k_head.jsonl", "sharegpt_v3_subset.jsonl": "sharegpt_v3_subset.jsonl",
             "llamafactory_alpaca_en_demo.jsonl": "llamafactory_alpaca_en_demo.jsonl",
             "gsm8k_train.jsonl": "eval/gsm8k_train.jsonl", "gsm8k_test.jsonl": "eval/gsm8k_test.jsonl"}
    for name, src in files.items():
        (data / name).symlink_to(SHARED / "data" / src)
    mixture = ("--mixture=dolly15k_head.jsonl,sharegpt_v3_subset.jsonl:0.2,llamafactory_alpaca_en_demo.jsonl,"
               "gsm8k_train.jsonl:0.1")
    # 512 tokens: real answers are long, and a GSM8K test question (~300 bytes) must fit the eval prompt
    # (max_seq_len - 64 answer tokens) to be evaluated at all; more than the base run's 128, hence the warning
    runtime = ["--device=cpu", "--compile=False", "--max_seq_len=512", "--max_steps=4", "--eval_every=-1",
               "--eval_examples_per_task=1", "--val_fraction=0.01", mixture]
    mid = run_script("train_mid.py", *runtime, "--device_batch_size=2", "--total_batch_size=1024",
                     "--eval_tokens=1024", env=p.env).stdout
    sft = run_script("train_sft.py", *runtime, "--device_batch_size=2", "--target_examples_per_step=4",
                     env=p.env).stdout
    assert "warning: max_seq_len=512 exceeds the 128 tokens" in mid
    for out in (mid, sft):
        for name, fmt in (("dolly15k_head", "dolly"), ("sharegpt_v3_subset", "sharegpt"),
                          ("llamafactory_alpaca_en_demo", "alpaca"), ("gsm8k_train", "gsm8k")):
            assert f"{data / name}.jsonl ({fmt}): " in out, (name, out[-3000:])
    assert _starts_from(mid) == str(p.latest("base"))
    mid_run, sft_run = p.base_dir / "mid_checkpoints" / "d2", p.base_dir / "chatsft_checkpoints" / "d2"
    assert _starts_from(sft) == str(latest_checkpoint(mid_run))
    for run in (mid_run, sft_run):
        assert load_checkpoint_file(latest_checkpoint(run))["step"] == 4
        assert all(math.isfinite(r["loss"]) for r in read_metrics(run).values())
        last = read_metrics(run, "eval")[4]
        assert math.isfinite(last["val_loss"]) and "acc_gsm8k" in last  # GSM8K test present: evaluated too


# ---- 2. SFT: SIGKILL, then --auto_resume=True, ends bitwise-identical to the uninterrupted run -------------------



@pytest.mark.slow
def test_sft_sigkill_then_auto_resume_is_bitwise_identical(tiny_pipeline, tmp_path):
    # the reference is the pipeline's own SFT run: same flags, same mid checkpoint (found the same way)
    out = tmp_path / "run"
    args = [*PIPELINE_SFT, f"--out_dir={out}"]
    proc = start_script("train_sft.py", *args, env=tiny_pipeline.env)
    wait_for_checkpoint(proc, out, 10)
    proc.kill()  # SIGKILL: no handler runs, exactly like a power cut or the OOM killer
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "ckpt_000040.pt").exists(), "the run finished before the kill; the test proves nothing"
    p = run_script("train_sft.py", *args, "--auto_resume=True", env=tiny_pipeline.env)
    assert "(resume, step " in p.stdout
    assert_same_run(tiny_pipeline.runs["sft"], out, 40, final_eval=True)


# ---- 3. two processes train like one with the same batch (examples per step for SFT, tokens for mid) -------------

@pytest.mark.slow
@pytest.mark.parametrize("stage,script,steps,batch_line", [
    ("mid", "train_mid.py", 10, "1,024 tokens/step = 4 seqs x 128 tokens x 2 GPUs x 1 accumulation"),
    ("sft", "train_sft.py", 40, "4 conversations/step = 2 x 2 GPUs x 1 accumulation")])
def test_two_processes_match_one(stage, script, steps, batch_line, tiny_pipeline, tmp_path):
    """torchrun --standalone --nproc_per_node=2 against the pipeline's own 1-process run of the same flags
    (accumulation 2 there, 1 here): the per-step loss and the final evaluation agree."""
    out = tmp_path / "two"
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **tiny_pipeline.env}
    args = PIPELINE_MID if stage == "mid" else PIPELINE_SFT
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / script), *args, f"--out_dir={out}"], cwd=REPO, env=e,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert batch_line in p.stdout
    assert _starts_from(p.stdout) == _starts_from(tiny_pipeline.stdout[stage])  # the same checkpoint, found alike
    one, two = read_metrics(tiny_pipeline.runs[stage]), read_metrics(out)
    assert sorted(one) == sorted(two) == list(range(steps))
    for s in range(steps):
        assert two[s]["loss"] == pytest.approx(one[s]["loss"], rel=1e-4), s
    e1, e2 = read_metrics(tiny_pipeline.runs[stage], "eval")[steps], read_metrics(out, "eval")[steps]
    assert e2["val_loss"] == pytest.approx(e1["val_loss"], rel=1e-4)
    assert e2["acc"] == e1["acc"]  # the eval items are shared out over the ranks and the counts summed back
    w1, w2 = load_checkpoint_file(latest_checkpoint(tiny_pipeline.runs[stage]))["model"], load_checkpoint_file(latest_checkpoint(out))["model"]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5, msg=lambda m: f"{k}: {m}")


# ---- 4. conversations far longer than max_seq_len: cut or dropped, never a NaN ---------------------------------

def _long_conversations(path, n=40, seed=0):
    """ShareGPT-sized chats of 10-20k bytes for a 128-token model. Every other one opens with a user turn that
    alone overflows max_seq_len (no assistant token survives: an all -1 row); the others keep only the start of
    their first answer (cut mid-answer)."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            msgs = [{"role": "user", "content": text(300 if i % 2 else 5)},
                    {"role": "assistant", "content": text(400)}]
            for _ in range(rng.randint(2, 4)):
                msgs += [{"role": "user", "content": text(200)}, {"role": "assistant", "content": text(600)}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def test_sft_on_conversations_far_longer_than_max_seq_len_stays_finite(tiny_pipeline, tmp_path):
    data = _long_conversations(tmp_path / "long_chats.jsonl")
    out = tmp_path / "run"
    # one conversation a micro-step, two a step: micro-batches and whole steps with no trained token occur
    run_script("train_sft.py", f"--mixture={data}", f"--max_seq_len={PIPELINE_SEQ_LEN}", "--device_batch_size=1",
               "--target_examples_per_step=2", "--max_steps=20", "--eval_every=10", "--eval_examples_per_task=0",
               "--val_fraction=0.1", "--device=cpu", "--compile=False", f"--out_dir={out}", env=tiny_pipeline.env)
    train = read_metrics(out)
    assert sorted(train) == list(range(20))  # every step logged
    losses = [train[s]["loss"] for s in range(20)]
    assert all(math.isfinite(x) for x in losses), losses
    assert any(x == 0.0 for x in losses), "no step without a trained token: the edge case was not exercised"
    assert any(x > 0.0 for x in losses)
    assert all(math.isfinite(r["grad_norm"]) for r in train.values() if "grad_norm" in r)
    assert all(math.isfinite(r["val_loss"]) for r in read_metrics(out, "eval").values())
    ck = load_checkpoint_file(latest_checkpoint(out))
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


# ---- 5. chat.py on the pipeline's SFT checkpoint ------------------------------------------------------------------

def _run_chat(*args, env, stdin=None):
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", **env}
    return subprocess.run([sys.executable, str(REPO / "chat.py"), *map(str, args)], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=e, timeout=120, cwd=REPO)


class _Recorder(io.StringIO):
    """stdout stand-in that remembers what each flush() had received: a streamed answer flushes piece by piece."""

    def __init__(self):
        super().__init__()
        self.flushed = []

    def flush(self):
        self.flushed.append(self.getvalue())
        super().flush()


def test_chat_answers_from_the_pipeline_sft_checkpoint(tiny_pipeline, monkeypatch):
    import chat
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_pipeline.base_dir))
    sft = tiny_pipeline.latest("sft")
    model, tok, path, stage = chat.load_for_chat("", torch.device("cpu"))  # default: the newest SFT run
    assert path == sft and stage == "sft"

    def session():
        return chat.ChatSession(model, tok, max_tokens=24, temperature=0.0)

    # -p: one answer on stdout, what was loaded on stderr, exit 0
    question = "Spell the word 'cat' letter by letter."
    p = _run_chat("-p", question, "--max_tokens=24", "--temperature=0", env=tiny_pipeline.env)
    assert p.returncode == 0, p.stderr
    assert f"loaded {sft} (stage sft" in p.stderr and "; chat" in p.stderr
    answer = session().respond(question)[0]
    assert answer and p.stdout == answer + "\n"
    # streaming: answer_once (the -p path) flushes each decoded piece as soon as it is generated
    rec = _Recorder()
    chat.answer_once(session(), question, out=rec)
    pieces = [b for a, b in zip([""] + rec.flushed, rec.flushed) if len(b) > len(a)]
    assert len(pieces) >= 3 and rec.getvalue() == answer + "\n"

    # interactive through stdin: the second answer is generated with the first exchange in its prompt, and the
    # third message is long enough (> 128 - 24 - 16 tokens with the first exchange) that the oldest exchange
    # must go: the note says so, which only happens to a session that kept its history
    turns = ["Who are you?", "What is 2 + 3?", "Count the letter a in the word " + "banana" * 10 + ", please."]
    p = _run_chat("--max_tokens=24", "--temperature=0", env=tiny_pipeline.env,
                  stdin="\n".join(turns + ["/clear", turns[1]]) + "\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("Assistant: ") == 4 and "[history cleared]" in p.stdout
    s = session()
    expected = [s.respond(t)[0] for t in turns]
    assert s.last_dropped >= 1
    assert f"[left out the {s.last_dropped} oldest exchange(s) to fit max_seq_len={PIPELINE_SEQ_LEN}]" in p.stdout
    s.clear()
    expected.append(s.respond(turns[1])[0])
    for a in expected:
        assert f"Assistant: {a}\n" in p.stdout, (a, p.stdout)


# ---- 6. mid warns when max_seq_len exceeds what the base run used --------------------------------------------------

def test_mid_warns_when_max_seq_len_exceeds_the_base_run(tiny_pipeline, tmp_path):
    longer = 2 * PIPELINE_SEQ_LEN
    p = run_script("train_mid.py", f"--max_seq_len={longer}", "--device_batch_size=4",
                   f"--total_batch_size={4 * longer}", "--max_steps=1", "--eval_every=-1", "--eval_tokens=1",
                   "--eval_examples_per_task=0", "--device=cpu", "--compile=False", f"--out_dir={tmp_path / 'run'}",
                   env=tiny_pipeline.env)
    base = tiny_pipeline.latest("base")
    assert (f"warning: max_seq_len={longer} exceeds the {PIPELINE_SEQ_LEN} tokens {base} was trained with"
            in p.stdout), p.stdout[-3000:]
    assert load_checkpoint_file(latest_checkpoint(tmp_path / "run"))["arch"]["max_seq_len"] == longer  # it trained at the longer length
    # printed before train.log opened, and still in it: the log keeps everything the console showed
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    assert f"warning: max_seq_len={longer} exceeds the {PIPELINE_SEQ_LEN} tokens" in log, log[-3000:]
    assert log.index("==== ") < log.index("warning: max_seq_len=")  # after the header, which opens the log


def test_resume_refuses_a_checkpoint_of_another_stage(tiny_pipeline, tmp_path):
    base = tiny_pipeline.latest("base")
    p = run_script("train_mid.py", f"--resume={base}", "--device=cpu", "--compile=False", env=tiny_pipeline.env,
                   check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "is a base checkpoint" in p.stderr and f"--pretrained_checkpoint={base}" in p.stderr, p.stderr[-2000:]
