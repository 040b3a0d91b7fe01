"""report.py: a page with readable plots of a real tiny pipeline; killed, resumed and still-running runs read right;
clear errors. python -m pytest -q tests/test_report.py"""
import importlib
import json
import math
import random
import time

import pytest

from conftest import REPO, run_script


@pytest.fixture
def report():
    """A fresh module each time: main() writes its overrides into the module's globals."""
    import report as module
    return importlib.reload(module)


def write_run(run_dir, steps=2000, log_every=10, resume_at=None, cut_last_line=False, final=True, t0=None):
    """A synthetic run folder as trainer.py writes it (metrics.jsonl, train.log, the final ckpt_<step>.json): a
    loss falling from ~10 to ~3, warmup + cosine lr, GPU memory, MFU, two fp16 overflows. resume_at: the run was
    killed there and resumed 10 minutes later (the killed session's records past it are logged again)."""
    rng = random.Random(0)
    run_dir.mkdir(parents=True)
    t0 = t0 or time.time() - 3600
    header = ("==== {} run d12 ====\ngit abc1234 | torch 2.8.0 | python 3.11.7\nstage: base\ndevice: Tesla T4\n"
              "world_size: 4\ndtype: torch.float16 (compute capability 7.5 < 8.0)\nparameters: 185,000,000\n"
              "config:\n  depth = 12\n  max_lr = 0.0006\ntraining {} steps from step {}\n")
    stamp = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))  # noqa: E731
    log = header.format(stamp(t0), steps, 0)
    recs, t = [], t0 + 5

    def train_rec(s, t, bump=0.0):
        speed = 80000 + rng.gauss(0, 1500)
        lr = 6e-4 * min(1, (s + 1) / 100) * (0.1 + 0.9 * (1 + math.cos(math.pi * s / steps)) / 2)
        return {"kind": "train", "step": s, "time": t, "loss": 3 + 7.5 * math.exp(-s / 150) + bump +
                rng.gauss(0, 0.08), "lr": lr, "dt": 1.6, "tok_per_s": speed,
                "mfu": speed * 0.31 / 80000, "grad_norm": 0.3 + 2 * math.exp(-s / 80) + abs(rng.gauss(0, 0.05)),
                "tokens": (s + 1) * 131072, "rss_gb": 3.1, "gpu_alloc_gb": 11.2, "gpu_reserved_gb": 13.5,
                **({"skipped": "fp16 overflow"} if s in (30, 700) else {})}
    for s in range(0, steps + 1):
        t += 1.6
        if s % 250 == 0 or s == steps:
            recs.append({"kind": "eval", "step": s, "time": t, "val_loss": 3.05 + 7.5 * math.exp(-s / 150),
                         "val_bpb": (3.05 + 7.5 * math.exp(-s / 150)) / 3.2})
        if s < steps and (s % log_every == 0 or s == steps - 1):
            recs.append(train_rec(s, t, bump=0.3 if resume_at and s >= resume_at else 0.0))
    if resume_at:  # the killed session logged past resume_at with another loss; the resumed one logged it again
        t_resume = recs[-1]["time"] + 600
        log += "sample: 'The capital of France is Paris'\n" + header.format(stamp(t_resume), steps, resume_at)
        redo = [dict(r, time=t_resume + r["time"] - t0 - 1.6 * resume_at) for r in recs if r["step"] >= resume_at]
        for r in redo:
            if r["kind"] == "train":
                r["loss"] -= 0.3
        recs = recs + redo
    log += "sample: 'The capital of France is a city'\nsample: 'The meaning of life is 42'\n"
    text = "".join(json.dumps(r) + "\n" for r in recs)
    if cut_last_line:
        text += json.dumps(train_rec(steps, t + 2))[:40]
    (run_dir / "metrics.jsonl").write_text(text, encoding="utf-8")
    (run_dir / "train.log").write_text(log, encoding="utf-8")
    if final:
        (run_dir / f"ckpt_{steps:06d}.pt").write_bytes(b"")
        (run_dir / f"ckpt_{steps:06d}.json").write_text(json.dumps({"step": steps, "stage": "base", "final": True}))
    return recs


def assert_readable_png(path, min_size=(1000, 450)):
    """A real PNG of a useful size whose pixels are not (almost) all background: something was drawn."""
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1], (path, im.size)
        px = np.asarray(im.convert("RGB")).reshape(-1, 3)
    drawn = (px.min(axis=1) < 200).mean()  # not white or a pale grid line
    colours = len({tuple(p) for p in px[:: max(1, len(px) // 20000)]})
    assert drawn > 0.01 and colours > 20, (path, drawn, colours)


def test_report_of_the_tiny_pipeline(report, tiny_pipeline, tmp_path):
    out = tmp_path / "report"
    report.main([f"--run={tiny_pipeline.base_dir}", f"--out_dir={out}", "--samples=1"])
    md = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("## base: ", "## mid: ", "## SFT: ", "### Setup", "### Evaluations during training",
                    "### Samples", "<details><summary>config"):
        assert heading in md, heading
    assert md.count("| finished |") == 3 and "| world_size | 1 |" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["base_loss.png", "base_system.png", "mid_evals.png", "mid_loss.png", "mid_system.png",
                    "sft_evals.png", "sft_loss.png", "sft_system.png"]
    for name in pngs:
        assert f"]({name})" in md
        assert_readable_png(out / name)
    assert not list(out.glob("*.tmp"))
    # mid and SFT log no answers: the report asks their final checkpoints
    assert md.count("From greedy answers of ckpt_") == 3 and "**Who are you?**" in md


def test_killed_resumed_run_reads_right_and_plots(report, tmp_path, capsys):
    run_dir = tmp_path / "checkpoints" / "d12"
    recs = write_run(run_dir, resume_at=1000, cut_last_line=True, final=False)
    metrics, bad = report.load_metrics(run_dir / "metrics.jsonl")
    assert bad == 1
    train = metrics["train"]
    assert [r["step"] for r in train] == sorted({r["step"] for r in recs if r["kind"] == "train"})
    resumed = {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}  # the last record of each step wins
    assert [r["loss"] for r in train] == [resumed[r["step"]] for r in train]
    sessions, samples = report.parse_train_log(run_dir / "train.log")
    assert [s["first"] for s in sessions] == [0, 1000] and sessions[0]["config"]["depth"] == "12"
    assert samples[-1] == ["The capital of France is a city", "The meaning of life is 42"]
    # steps 0-999 of the first session and 1000-1999 of the second, 1.6 s each: neither the 10 minutes between the
    # kill and the resume nor the killed session's steps past 1000 (redone, their records replaced) count
    assert report.wall_time(metrics, sessions) == pytest.approx(2000 * 1.6, rel=0.02)

    report.main([str(run_dir), "--samples=2"])  # the positional form; one run: <run>/report
    md = (run_dir / "report" / "report.md").read_text(encoding="utf-8")
    assert "not finished: step 2000 of 2000" in md and "1 line(s) were not a whole record" in md
    assert "2 sessions (a start and 1 resume(s))" in md and "4 x Tesla T4" in md
    assert "The meaning of life is 42" in md and "| wall time | 53 min |" in md
    for name in ("base_loss.png", "base_system.png"):
        assert_readable_png(run_dir / "report" / name)
    # called again with nothing new (a run script rerun after every stage was skipped): the page stands
    report.main([str(run_dir), "--samples=2"])
    assert "is up to date" in capsys.readouterr().out.splitlines()[-1]
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:  # a run started again appends to the cut line
        f.write(json.dumps({"kind": "eval", "step": 2001, "time": time.time(), "val_loss": 2.5}) + "\n")
    report.main([str(run_dir), "--samples=2"])
    assert "| 2001 | 2.5 |" in (run_dir / "report" / "report.md").read_text(encoding="utf-8")


def test_pipeline_picks_runs_by_name_or_newest(report, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    write_run(tmp_path / "checkpoints" / "old", steps=50, log_every=1)
    write_run(tmp_path / "checkpoints" / "new", steps=50, log_every=1)
    write_run(tmp_path / "mid_checkpoints" / "old", steps=30, log_every=1, final=False)
    runs, root = report.find_runs("", "")
    assert root == tmp_path and [(s, d.name) for s, d in runs] == [("base", "new"), ("mid", "old")]
    assert [d.name for _, d in report.find_runs("", "old")[0]] == ["old", "old"]
    assert report.find_runs("base", "")[0] == [("base", tmp_path / "checkpoints" / "new")]
    assert report.find_runs(str(tmp_path / "checkpoints"), "")[0] == [("base", tmp_path / "checkpoints" / "new")]
    with pytest.raises(report.UserError, match="no SFT run under"):
        report.find_runs("sft", "")
    with pytest.raises(report.UserError, match="no run named d99 at"):
        report.find_runs("", "d99")


def test_missing_run_is_one_clear_error(tmp_path):
    p = run_script("report.py", str(tmp_path / "nowhere"), env={"NANOCHAT_BASE_DIR": str(tmp_path)}, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "nowhere does not exist" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (REPO / "report").exists()
