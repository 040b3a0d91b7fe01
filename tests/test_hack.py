"""What a user does to hack a stage: cp train_sft.py my_sft.py, edit a few lines of the copy to train with plain SGD
and a label-smoothed loss, and run it: it trains differently, and still resumes bitwise after SIGKILL.
python -m pytest -q tests/test_hack.py"""
import difflib
import shutil
import signal

import pytest

from conftest import (PIPELINE_SFT, REPO, assert_same_run, latest_checkpoint, load_checkpoint_file, read_metrics,
                      run_script, start_script, wait_for_checkpoint)

# the edits, as text, the way the README's "How to hack a stage" tells a user to make them
EDITS = [
    ("import math\n", "import math\n\nimport torch\nimport torch.nn.functional as F\n"),
    ("""    opt = model.configure_optimizers(optimizer=optimizer, max_lr=sched.peak_lr, matrix_lr=sched.matrix_lr,
                                     weight_decay=weight_decay, ns_dtype=tr.ns_dtype)
""", """    opt = torch.optim.SGD(model.parameters(), lr=sched.peak_lr, momentum=0.9)

    def loss_fn(m, x, y):  # label smoothing; a loss_fn returns the sum over the trained tokens (y != -1)
        return F.cross_entropy(m(x).flatten(0, 1), y.flatten(), ignore_index=-1, label_smoothing=0.1, reduction="sum")
"""),
    ("tr.fit(model, opt, train_loader, accum=accum,", "tr.fit(model, opt, train_loader, loss_fn=loss_fn, accum=accum,"),
]


@pytest.mark.slow
def test_a_copied_sft_script_with_its_own_optimizer_and_loss_trains_and_resumes_exactly(tiny_pipeline, tmp_path):
    repo = tmp_path / "t4chat"  # the user's clone
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(".*", "tests", "bench", "__pycache__"))
    original = (repo / "train_sft.py").read_text(encoding="utf-8")
    hacked = original
    for old, new in EDITS:
        assert hacked.count(old) == 1, f"train_sft.py no longer has this line to edit: {old!r}"
        hacked = hacked.replace(old, new)
    (repo / "my_sft.py").write_text(hacked, encoding="utf-8")
    a, b = original.splitlines(), hacked.splitlines()
    changed = sum(j2 - j1 for op, _, _, j1, j2 in difflib.SequenceMatcher(None, a, b).get_opcodes() if op != "equal")
    assert changed <= 10, changed

    # the copy against the script it was copied from: the pipeline's own SFT run, same flags, same mid checkpoint
    # no held-out task generation: it changes no training step, and the three runs below are what cost time
    args, env = [*PIPELINE_SFT, "--eval_examples_per_task=0"], tiny_pipeline.env
    ref = tmp_path / "hacked"
    run_script("my_sft.py", *args, f"--out_dir={ref}", env=env, repo=repo)
    mine, theirs = read_metrics(ref), read_metrics(tiny_pipeline.runs["sft"])
    assert all(mine[s]["loss"] != theirs[s]["loss"] for s in range(5))
    # step 0: the same weights and batch, so the difference is the loss alone; smoothing can only add to it
    assert mine[0]["loss"] > theirs[0]["loss"]
    state = load_checkpoint_file(latest_checkpoint(ref))["optimizer"]
    group = state["param_groups"][0]
    assert group["momentum"] == 0.9 and "dampening" in group and "kind" not in group  # torch's SGD, not Muon/AdamW
    assert state["state"] and all("momentum_buffer" in s for s in state["state"].values())

    # SIGKILL mid-run, then --auto_resume=True: the same run, bit for bit, optimizer state and all
    out = tmp_path / "killed"
    proc = start_script("my_sft.py", *args, f"--out_dir={out}", env=env, repo=repo)
    wait_for_checkpoint(proc, out, 10)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "ckpt_000040.pt").exists(), "the run finished before the kill; the test proves nothing"
    p = run_script("my_sft.py", *args, f"--out_dir={out}", "--auto_resume=True", env=env, repo=repo)
    assert "(resume, step " in p.stdout
    assert_same_run(ref, out, 40, final_eval=True)
