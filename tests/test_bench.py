"""bench.py --smoke: every figure is present in the JSON line. Timings are printed, never asserted."""
import json
import subprocess
import sys

from conftest import REPO, needs_shared


@needs_shared
def test_smoke_prints_every_figure():
    out = subprocess.run([sys.executable, "bench.py", "--smoke"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for side in ("t4chat_adamw", "nanogpt_adamw", "t4chat_muon"):
        for key in ("tok_per_s", "achieved_flops", "cpu_mfu", "matmul_flops", "opt_ms", "peak_rss_mb"):
            assert key in res[side], (side, key)
    for key in ("throughput_ratio", "throughput_ratio_per_round", "memory_ratio", "gpu"):
        assert key in res, key
    assert {"muon", "adamw", "muon_extra_share"} <= set(res["optim"])
    assert {"growth_mb", "slope_mb_per_100_steps"} <= set(res["growth"])
    for loader in ("loader", "loader_10x"):
        assert {"tok_per_s", "rss_growth_mb"} <= set(res[loader])
    assert res["loader_10x"]["shards"] == 10 * res["loader"]["shards"]
    assert "compile" in res


@needs_shared
def test_quality_smoke_reports_both_curves_and_the_gap():
    out = subprocess.run([sys.executable, "bench.py", "--quality", "--smoke"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    q = json.loads(out.stdout.strip().splitlines()[-1])["quality"]
    for kind in ("t4chat", "nanogpt"):
        steps = [s for s, _ in q[kind]["val_loss"]]
        assert steps[0] == 0 and steps[-1] == q[kind]["steps"], steps
        assert len(q[kind]["train_loss"]) == q[kind]["steps"]
    # the gap is computed from the two curves, not stored: it must be their final difference
    assert abs(q["gap_nats"] - (q["nanogpt"]["val_loss"][-1][1] - q["t4chat"]["val_loss"][-1][1])) < 1e-3
    assert q["met"] == (q["gap_nats"] >= q["target_nats"])
    assert "Muon" in q["t4chat"]["recipe"] or "muon" in q["t4chat"]["recipe"]


@needs_shared
def test_a_quality_sweep_runs_each_recipe_as_train_base_would_read_it():
    """--recipe points (issue 17's sweep): each trains with its settings applied, the schedule says so; a typo in a
    key fails at once, naming it."""
    cmd = [sys.executable, "bench.py", "--quality", "--smoke", "--baseline=False",
           "--recipe=lr_scheduler=cosine,warmup_steps=1",
           "--recipe=muon_momentum_start=0.8,muon_momentum_warmup_steps=2"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = json.loads(out.stdout.strip().splitlines()[-1])["sweep"]
    assert "warmup 1, lr 0.004 -> 0.0004 (cosine)" in sweep["t4chat lr_scheduler=cosine,warmup_steps=1"]["recipe"]
    # the other settings are train_base.py's defaults: wsd, Muon's momentum rising to 0.97
    assert "(wsd, warmdown 2)" in sweep["t4chat muon_momentum_start=0.8,muon_momentum_warmup_steps=2"]["recipe"]
    assert "momentum 0.8 -> 0.97 over 2 steps" in sweep["t4chat muon_momentum_start=0.8,muon_momentum_warmup_steps=2"][
        "recipe"]
    bad = subprocess.run(cmd[:4] + ["--recipe=warmdown_ration=0.5"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "warmdown_ratio" in bad.stderr and "Traceback" not in bad.stderr
