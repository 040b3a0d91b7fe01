"""Shared test set-up. Run the suite with: python -m pytest -q tests"""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

# 2-core CI machine: more threads than cores only adds contention
torch.set_num_threads(2)

needs_shared = pytest.mark.skipif(not (SHARED / "data").is_dir(),
                                  reason="../shared/data is absent (only CI and dev machines have it)")


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A private $NANOCHAT_BASE_DIR so no test touches ~/.cache/nanochat."""
    d = tmp_path / "nanochat"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


# ---- the shared tiny pipeline: a generated corpus and a tiny-model command line -----------------------------

def make_corpus(root, **kw):
    """The built-in offline corpus (prepare_data.builtin_corpus): synthetic text a tiny model learns quickly."""
    from prepare_data import builtin_corpus
    return builtin_corpus(root, **kw)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "base_data")


# the tiny model every subprocess test trains: byte tokenizer, 2 layers, width 64 (a step is a few ms)
TINY = ["--tokenizer=bytes", "--depth=2", "--n_embd=64", "--max_seq_len=64", "--device_batch_size=4",
        "--device=cpu", "--compile=False", "--sample_every=-1", "--eval_tokens=1024"]


def run_script(script, *args, env=None, timeout=300, check=True, repo=REPO):
    """Run a stage script in a fresh process (what a user does) and return the CompletedProcess. repo: the
    folder the script is in and runs from (a copy of the repo, for a test that edits scripts)."""
    import subprocess
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    e.pop("TIKTOKEN_CACHE_DIR", None)
    p = subprocess.run([sys.executable, str(repo / script), *map(str, args)], capture_output=True, text=True,
                       env=e, timeout=timeout, cwd=repo)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}")
    return p


def latest_checkpoint(run_dir):
    """The checkpoint file LATEST names in a run folder."""
    run_dir = Path(run_dir)
    return run_dir / (run_dir / "LATEST").read_text(encoding="utf-8").strip()


def load_checkpoint_file(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def metric_values(record):
    """A metrics.jsonl record without its bookkeeping (kind, step, wall-clock time)."""
    return {k: v for k, v in record.items() if k not in ("kind", "step", "time")}


def assert_same_run(a, b, steps, final_eval=False):
    """Two run folders ended in the same place: final step, bitwise weights, every logged loss (and, with
    final_eval, the same final evaluation)."""
    import torch
    ca, cb = load_checkpoint_file(latest_checkpoint(a)), load_checkpoint_file(latest_checkpoint(b))
    assert ca["step"] == cb["step"] == steps
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), f"weights differ at {k}"
    la, lb = read_metrics(a), read_metrics(b)
    assert sorted(la) == sorted(lb) == list(range(steps))
    assert [la[s]["loss"] for s in la] == [lb[s]["loss"] for s in la]  # identical logged losses
    assert [la[s]["tokens"] for s in la] == [lb[s]["tokens"] for s in la]  # the cumulative count goes on too
    if final_eval:
        assert metric_values(read_metrics(a, "eval")[steps]) == metric_values(read_metrics(b, "eval")[steps])


def read_metrics(run_dir, kind="train"):
    """{step: record} from a run's metrics.jsonl."""
    import json
    out = {}
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == kind:
                out[r["step"]] = r
    return out


# ---- the tiny chat pipeline: base -> mid -> SFT in one private $NANOCHAT_BASE_DIR -----------------------------
# Built once per session (~25 s on 2 cores). No stage after base is told where to start: mid finds the newest
# base run and SFT the newest mid run, as a user's pipeline does. Treat the folder as read-only: a test that
# trains further writes to its own --out_dir, or works on copy_pipeline(); chat.py and later stages (Dolly)
# find the SFT run here by default. Sequences are 128 tokens in every stage (bytes: a built-in task's
# conversation fits, and the eval prompts leave room for 64 answer tokens).

PIPELINE_SEQ_LEN = 128
PIPELINE_BASE = ["--tokenizer=bytes", "--depth=2", "--n_embd=64", f"--max_seq_len={PIPELINE_SEQ_LEN}",
                 "--device_batch_size=4", "--total_batch_size=1024", "--max_steps=20", "--eval_every=10",
                 "--eval_tokens=1024", "--checkpoint_interval=-1", "--sample_every=-1", "--device=cpu",
                 "--compile=False"]
PIPELINE_MID = [f"--max_seq_len={PIPELINE_SEQ_LEN}", "--device_batch_size=4", "--total_batch_size=1024",
                "--max_steps=10", "--eval_every=5", "--eval_tokens=1024", "--eval_examples_per_task=2",
                "--device=cpu", "--compile=False"]
# SFT: 2 conversations a micro-step, 4 a step (accumulation 2 on one process, 1 on two); a checkpoint every
# 5 steps, so the resume tests can kill it in the middle and compare against this very run
PIPELINE_SFT = [f"--max_seq_len={PIPELINE_SEQ_LEN}", "--device_batch_size=2", "--target_examples_per_step=4",
                "--max_steps=40", "--eval_every=20", "--checkpoint_interval=5", "--eval_examples_per_task=2",
                "--device=cpu", "--compile=False"]


class Pipeline:
    """What tiny_pipeline built: base_dir, env (NANOCHAT_BASE_DIR set, for run_script's env=), runs
    {stage: run folder}, stdout {stage: the run's output}."""

    def __init__(self, base_dir, env, runs, stdout):
        self.base_dir, self.env, self.runs, self.stdout = base_dir, env, runs, stdout

    def latest(self, stage):
        """The final checkpoint file of a stage's run."""
        return latest_checkpoint(self.runs[stage])


def pipeline_env(base_dir):
    return {"NANOCHAT_BASE_DIR": str(base_dir)}


def run_pipeline(corpus, base_dir, base_args=(), mid_args=(), sft_args=()):
    """base -> mid -> SFT under base_dir; extra args go after the pipeline's own (the last of a key wins)."""
    from checkpoint import STAGE_DIRS
    env = pipeline_env(base_dir)
    stdout = {"base": run_script("train_base.py", *PIPELINE_BASE, f"--data_root={corpus}", *base_args, env=env).stdout,
              "mid": run_script("train_mid.py", *PIPELINE_MID, *mid_args, env=env).stdout,
              "sft": run_script("train_sft.py", *PIPELINE_SFT, *sft_args, env=env).stdout}
    runs = {stage: base_dir / STAGE_DIRS[stage] / "d2" for stage in stdout}
    return Pipeline(base_dir, env, runs, stdout)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_corpus, tmp_path_factory):
    """The shared tiny chat pipeline (built-in tasks): see the comment above PIPELINE_SEQ_LEN."""
    base_dir = tmp_path_factory.mktemp("pipeline") / "nanochat"
    base_dir.mkdir()
    return run_pipeline(tiny_corpus, base_dir)


def copy_pipeline(pipeline, dest, stages=("base", "mid", "sft")):
    """A private copy of some of the pipeline's stages under dest (a new $NANOCHAT_BASE_DIR), for a test that
    adds runs of its own: the shared folder stays as every other test expects it. Returns a Pipeline."""
    import shutil
    dest.mkdir(parents=True, exist_ok=True)
    runs = {}
    for stage in stages:
        src = pipeline.runs[stage]
        runs[stage] = dest / src.relative_to(pipeline.base_dir)
        shutil.copytree(src, runs[stage])
    return Pipeline(dest, pipeline_env(dest), runs, {s: pipeline.stdout[s] for s in stages})


# ---- killing a run mid-way (the resume tests of every stage) ---------------------------------------------------

def start_script(script, *args, env=None, repo=REPO):
    """A stage script in the background (stdout and stderr together), to be killed mid-run."""
    import subprocess
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, str(repo / script), *map(str, args)], cwd=repo, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def latest_step(run_dir):
    """The step LATEST names, -1 when there is none yet."""
    f = Path(run_dir) / "LATEST"
    return int(f.read_text(encoding="utf-8").strip()[5:11]) if f.exists() else -1


def wait_for_checkpoint(proc, run_dir, min_step, timeout=120):
    """Poll until a complete checkpoint at >= min_step exists, while the run is still going."""
    import time
    t0 = time.time()
    while time.time() - t0 < timeout:
        step = latest_step(run_dir)
        if step >= min_step:
            return step
        assert proc.poll() is None, f"run ended before a checkpoint at {min_step}:\n{proc.stdout.read()}"
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def hf_offline():
    """No Hugging Face hub: huggingface_hub reads these when transformers is first imported (inside the tests)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield
