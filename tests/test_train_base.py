"""train_base.py end to end in subprocesses: smoke run, exact resume after SIGKILL/SIGTERM, DDP parity, bad input.
python -m pytest -q tests/test_train_base.py"""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (REPO, SHARED, TINY, assert_same_run, latest_checkpoint, load_checkpoint_file, needs_shared,
                      read_metrics, run_script, start_script, wait_for_checkpoint)


def _args(corpus, out, *extra, steps=12):
    return [*TINY, f"--data_root={corpus}", f"--out_dir={out}", f"--max_steps={steps}", "--total_batch_size=1024",
            "--eval_every=4", "--checkpoint_interval=4", *extra]


def _final_weights(run_dir):
    return load_checkpoint_file(latest_checkpoint(run_dir))


def test_smoke_loss_falls_val_bpb_and_checkpoint(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    p = run_script("train_base.py", *_args(tiny_corpus, out, "--max_lr=0.01", steps=30))
    train = read_metrics(out)
    first, last = train[0]["loss"], train[29]["loss"]
    assert last < first - 1.0, (first, last)
    assert abs(first - math.log(320)) < 1.0  # starts near ln(vocab)
    evals = read_metrics(out, "eval")
    assert evals[30]["val_bpb"] < evals[0]["val_bpb"]
    assert "val bpb" in p.stdout and "mfu n/a" in p.stdout and "tok/s" in p.stdout and "gnorm" in p.stdout
    assert (out / "ckpt_000030.pt").exists() and (out / "train.log").exists()
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "git " in log and "torch " in log and "device:" in log and "max_seq_len = 64" in log
    assert "train 2 shard(s) (shard_00000.parquet, shard_00001.parquet); val 1 (shard_00002.parquet)" in log


# the fp32 runs train under every step-driven schedule at once: wsd (its warmdown starts at step 30, after any
# checkpoint the kill tests resume from, so a resume crosses it), Muon's momentum warm-up and warmdown dip, and
# cautious weight decay on a cosine to 0; the fp16 runs keep the stage's defaults
SCHEDULES = {"float32": ["--lr_scheduler=wsd", "--warmdown_ratio=0.25", "--final_lr_frac=0.05",
                         "--muon_momentum_start=0.85", "--muon_momentum_warmup_steps=20", "--muon_momentum_warmdown=0.9",
                         "--weight_decay=0.2", "--weight_decay_schedule=cosine", "--cautious_weight_decay=True"],
             "float16": []}


def _resume_args(tiny_corpus, out, dt):
    return _args(tiny_corpus, out, f"--dtype={dt}", "--total_batch_size=2048", "--checkpoint_interval=5",
                 *SCHEDULES[dt], steps=40)


@pytest.fixture(scope="module")
def reference_runs(tiny_corpus, tmp_path_factory):
    """Uninterrupted 40-step runs, fp32 and fp16 (the T4 path on CPU), for the resume tests to match."""
    out = {}
    for dt in ("float32", "float16"):
        d = tmp_path_factory.mktemp(f"ref_{dt}") / "run"
        run_script("train_base.py", *_resume_args(tiny_corpus, d, dt))
        out[dt] = d
    return out


def test_metrics_count_tokens_since_the_start(reference_runs):
    """Every train record carries the tokens processed so far (all ranks), so a report can plot loss against
    tokens even when log_every skips steps."""
    train = read_metrics(reference_runs["float32"])
    assert [train[s]["tokens"] for s in range(40)] == [2048 * (s + 1) for s in range(40)]


@pytest.mark.slow
@pytest.mark.parametrize("dt", ["float32", "float16"])
def test_sigkill_then_auto_resume_is_bitwise_identical(dt, tiny_corpus, tmp_path, reference_runs):
    out = tmp_path / "run"
    args = _resume_args(tiny_corpus, out, dt)
    proc = start_script("train_base.py", *args)
    wait_for_checkpoint(proc, out, 10)
    proc.kill()  # SIGKILL: no handler runs, exactly like a power cut or the OOM killer
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "ckpt_000040.pt").exists(), "the run finished before the kill; the test proves nothing"
    p = run_script("train_base.py", *args, "--auto_resume=True")
    assert "(resume, step " in p.stdout
    assert "resume:" not in p.stdout  # the scheduled momentum and decay are not taken for changed settings
    if dt == "float32":
        resumed = int(p.stdout.split("(resume, step ")[1].split(")")[0].split()[0].rstrip(","))
        assert resumed < 30, "the resume must cross the start of the warmdown"
    assert_same_run(reference_runs[dt], out, 40)


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_resumes_exactly(tiny_corpus, tmp_path, reference_runs):
    out = tmp_path / "run"
    args = _resume_args(tiny_corpus, out, "float32")
    proc = start_script("train_base.py", *args)
    wait_for_checkpoint(proc, out, 5)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout
    assert "SIGTERM received" in stdout
    stopped = int((out / "LATEST").read_text(encoding="utf-8")[5:11])
    assert 5 <= stopped < 40
    # resumed without the schedule's flags, as after a git pull that changed the script's defaults: the run keeps
    # the schedule its checkpoint recorded, so it still matches the uninterrupted run bit for bit
    p = run_script("train_base.py", *[a for a in args if a not in SCHEDULES["float32"]], "--auto_resume=True")
    assert "resume: the run keeps its own schedule: " in p.stdout
    assert "warmdown_ratio=0.25 (the script's default is now 0.65)" in p.stdout
    assert "differ from the checkpoint's" not in p.stdout
    assert_same_run(reference_runs["float32"], out, 40)


def _torchrun(nproc, args):
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        str(REPO / "train_base.py"), *map(str, args)], cwd=REPO, env=e, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_ddp_two_processes_match_one_and_resume_on_one(tiny_corpus, tmp_path):
    common_args = ["--lr_scheduler=constant", "--total_batch_size=1024", "--checkpoint_interval=3",
                   "--eval_every=3"]
    one, two, moved = tmp_path / "one", tmp_path / "two", tmp_path / "moved"
    run_script("train_base.py", *_args(tiny_corpus, one, *common_args, steps=6))
    _torchrun(2, _args(tiny_corpus, two, *common_args, steps=6))
    l1, l2 = read_metrics(one), read_metrics(two)
    assert sorted(l1) == sorted(l2) == list(range(6))
    for s in range(6):
        assert l2[s]["loss"] == pytest.approx(l1[s]["loss"], rel=1e-4), s
    e1, e2 = read_metrics(one, "eval"), read_metrics(two, "eval")
    assert e2[6]["val_loss"] == pytest.approx(e1[6]["val_loss"], rel=1e-4)
    # the 2-process checkpoint at step 3 continues on 1 process, on the same data
    run_script("train_base.py", *_args(tiny_corpus, moved, *common_args, steps=6),
               f"--resume={two / 'ckpt_000003.pt'}")
    lm = read_metrics(moved)
    assert sorted(lm) == [3, 4, 5]
    for s in (3, 4, 5):
        assert lm[s]["loss"] == pytest.approx(l2[s]["loss"], rel=1e-4), s


@needs_shared
def test_real_pretrain_shards_with_gpt2_tokenizer(tmp_path):
    """The issue's command on ../shared/data/pretrain, shortened: GPT-2 files load offline, bpb is printed."""
    out = tmp_path / "run"
    p = run_script("train_base.py", "--depth=2", "--max_seq_len=128", "--device_batch_size=4",
                   "--total_batch_size=1024", "--max_steps=4", "--eval_every=2", "--eval_tokens=2048",
                   f"--data_root={SHARED / 'data' / 'pretrain'}", "--device=cpu", "--compile=False",
                   "--sample_every=4", f"--out_dir={out}")
    evals = read_metrics(out, "eval")
    assert set(evals) == {0, 2, 4} and all(math.isfinite(e["val_bpb"]) for e in evals.values())
    assert "sample:" in p.stdout
    assert _final_weights(out)["tokenizer"]["name"] == "gpt2"


# ---- bad input: one clear message, exit != 0, within seconds, nothing damaged ----

def _fails(capsys_args, expect, **kw):
    t0 = time.time()
    p = run_script("train_base.py", *capsys_args, check=False, **kw)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    for e in expect:
        assert e in p.stderr, (e, p.stderr)
    assert time.time() - t0 < 60
    return p


def test_bad_inputs_fail_fast_with_a_fix(tiny_corpus, tmp_path):
    base = [*TINY, f"--data_root={tiny_corpus}", f"--out_dir={tmp_path / 'r'}", "--max_steps=2"]
    bad = tmp_path / "bad_data"
    bad.mkdir()
    (bad / "shard_00000.parquet").write_bytes(b"this is not parquet")
    (bad / "shard_00001.parquet").write_bytes(b"nor this")
    cases = [([*base, "--batch_size=8"], ["batch_size", "device_batch_size"]),
             ([*base, "--total_batch_size=1000"], ["total_batch_size=1000", "4*64*1", "--total_batch_size=768 or"]),
             ([*base, "--total_batch_size=1024", "--grad_accum_steps=2"], ["total_batch_size", "grad_accum_steps"]),
             ([*TINY, f"--data_root={tmp_path / 'nope'}", "--max_steps=2"], ["nope"]),
             ([*TINY, f"--data_root={bad}", "--max_steps=2"], ["shard_00000.parquet"]),
             ([*base, "--dtype=fp8"], ["dtype"]),
             ([*base, "--log_every=0", "--max_lr=0"], ["log_every=0 must be >= 1", "max_lr=0.0 must be > 0"])]
    # independent processes that mostly wait on imports: two at a time (one per core) halves the wall time
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(_fails, args, expect) for args, expect in cases]:
            done.result()


def test_rollback_resume_with_a_lower_lr_goes_on_in_the_checkpoints_folder(tiny_corpus, tmp_path):
    # the way back after a divergence: resume an older checkpoint with a lower max_lr. The new rates must
    # apply (not the checkpoint's), the run must go on in that checkpoint's folder, and the abandoned newer
    # checkpoints must be moved aside rather than deleted or resumed later.
    env = {"NANOCHAT_BASE_DIR": str(tmp_path / "nc")}
    args = [*TINY, f"--data_root={tiny_corpus}", "--total_batch_size=1024", "--eval_every=4",
            "--checkpoint_interval=4", "--max_steps=8"]
    run_script("train_base.py", *args, "--run_name=myrun", "--log_gradients=True", env=env)
    run = tmp_path / "nc" / "checkpoints" / "myrun"
    gn = [k for k in read_metrics(run)[3] if k.startswith("gn/")]
    assert len(gn) > 4, "log_gradients logged no per-layer norms"
    first_final = (run / "ckpt_000008.pt").read_bytes()
    # another optimizer's state cannot be resumed: one message, nothing touched
    _fails([*args, f"--resume={run / 'ckpt_000004.pt'}", "--optimizer=adamw"], ["another optimizer", "--optimizer=muon"],
           env=env)
    assert (run / "ckpt_000008.pt").read_bytes() == first_final
    p = run_script("train_base.py", *args, f"--resume={run / 'ckpt_000004.pt'}", "--max_lr=0.001", env=env)
    assert "moved to" in p.stdout and "learning rates (max_lr" in p.stdout and "max_lr 0.004 -> 0.001" in p.stdout, \
        p.stdout[-3000:]
    aside = [d for d in run.iterdir() if d.is_dir() and d.name.startswith("set_aside_after_000004")]
    assert len(aside) == 1 and (aside[0] / "ckpt_000008.pt").read_bytes() == first_final
    assert 7 in read_metrics(aside[0])  # the abandoned curve is kept beside its checkpoints
    ck = torch.load(run / "ckpt_000008.pt", map_location="cpu", weights_only=True)
    assert ck["config"]["max_lr"] == 0.001
    muon = [g for g in ck["optimizer"]["param_groups"] if g.get("kind") == "muon"]
    # matrix_lr follows max_lr in proportion: 0.02 * 0.001 / 0.004
    assert muon and all(g["base_lr"] == pytest.approx(0.005) for g in muon)


def test_incompatible_checkpoint_and_existing_run_are_refused_untouched(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    run_script("train_base.py", *_args(tiny_corpus, out, steps=4))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".pt", ".json")}
    # a fresh run into a folder with checkpoints would rotate them away: refused
    _fails(_args(tiny_corpus, out, steps=4), ["--auto_resume=True", "--run_name"])
    # resuming with another depth: the differing field is named
    _fails(_args(tiny_corpus, out, "--depth=3", "--auto_resume=True", steps=8), ["depth=2 (config says 3)", "another architecture"])
    # resuming with another tokenizer is refused as well (bytes -> gpt2 changes the vocabulary)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".pt", ".json")}
    assert before == after


def test_repeated_non_finite_losses_stop_with_good_checkpoints_only(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    # an absurd learning rate makes the loss NaN within a few steps
    p = _fails([*TINY, f"--data_root={tiny_corpus}", f"--out_dir={out}", "--max_steps=40", "--total_batch_size=256",
                "--eval_every=-1", "--checkpoint_interval=1", "--optimizer=adamw", "--max_lr=1e30"],
               ["not finite for 10 steps in a row", "last good checkpoint", "--max_lr"])
    assert "checkpoint skipped" in p.stdout
    kept = list(out.glob("ckpt_*.pt"))
    assert kept, "the steps before the divergence should have a checkpoint"
    for f in kept:  # nothing non-finite was ever written
        meta = torch.load(f, map_location="cpu", weights_only=True)
        assert math.isfinite(meta["step"]) and all(torch.isfinite(v).all() for v in meta["model"].values())


def test_wandb_offline_and_help(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    run_script("train_base.py", *TINY, f"--data_root={tiny_corpus}", f"--out_dir={out}", "--max_steps=2",
               "--total_batch_size=256", "--wandb_log=True", env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    h = run_script("train_base.py", "-h")
    assert "--total_batch_size=131072" in h.stdout and "tokens per optimizer step" in h.stdout
