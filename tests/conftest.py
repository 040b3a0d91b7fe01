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

def make_corpus(root, n_shards=3, docs_per_shard=300, rows_per_group=100, seed=0):
    """Parquet shards of synthetic English-ish text with structure a tiny model learns in a few steps."""
    import random
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the teacher", "our robot", "the bird"]
    verbs = ["sees", "likes", "finds", "brings", "paints", "counts"]
    objects = ["the red ball", "a small box", "three apples", "the old map", "a blue cup", "seven stones"]
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        docs = [" ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
                         for _ in range(rng.randint(2, 8))) for _ in range(docs_per_shard)]
        pq.write_table(pa.table({"text": docs}), root / f"shard_{s:05d}.parquet", row_group_size=rows_per_group)
    return root


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "base_data")


# the tiny model every subprocess test trains: byte tokenizer, 2 layers, width 64 (a step is a few ms)
TINY = ["--tokenizer=bytes", "--depth=2", "--n_embd=64", "--max_seq_len=64", "--device_batch_size=4",
        "--device=cpu", "--compile=False", "--sample_every=-1", "--eval_tokens=1024"]


def run_script(script, *args, env=None, timeout=300, check=True):
    """Run a stage script in a fresh process (what a user does) and return the CompletedProcess."""
    import subprocess
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    e.pop("TIKTOKEN_CACHE_DIR", None)
    p = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                       env=e, timeout=timeout, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}")
    return p


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
