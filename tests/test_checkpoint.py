"""Checkpoint manager: atomic writes, markers, rotation, prefixes. python -m pytest -q tests/test_checkpoint.py"""
import json
import os
from unittest import mock

import pytest
import torch

import checkpoint
from checkpoint import CheckpointManager, load_checkpoint, resolve_checkpoint, rng_state, set_rng_state, unwrap
from common import UserError


def _state(step, model=None, opt=None, scaler=None):
    model = model if model is not None else torch.nn.Linear(4, 4)
    return {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict() if opt else {},
            "scaler": scaler.state_dict() if scaler else None, "step": step, "rng": rng_state(),
            "loader": {"epoch": 0, "shard": 1, "row_group": 2, "row": 3, "token_offset": 4}}


def test_round_trip_with_optimizer_scaler_rng_and_weights_only(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    m = CheckpointManager(tmp_path / "run")
    m.save(7, _state(7, torch.compile(model), opt, scaler), {"loss": 1.5})
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    m.save(8, _state(8, model, opt, scaler), {"loss": 1.4})
    path = m.latest()
    assert path.name == "ckpt_000008.pt"
    ck = load_checkpoint(path)  # weights_only=True inside: RNG and loader state are tensors and ints
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ck["model"])
    assert torch.equal(ck["model"]["weight"], model.weight)
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 4).parameters(), lr=1e-3)
    opt2.load_state_dict(ck["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    s2 = torch.amp.GradScaler("cpu")
    s2.load_state_dict(ck["scaler"])
    assert s2.get_scale() == scaler.get_scale()
    torch.manual_seed(999)
    set_rng_state(ck["rng"])
    assert torch.equal(torch.rand(3), expected)
    assert ck["loader"]["token_offset"] == 4


def test_prefixes_from_elsewhere_are_stripped(tmp_path):
    model = torch.nn.Linear(4, 4)
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    sd.update({"module.extra": torch.zeros(1)})
    torch.save({"model": sd}, tmp_path / "foreign.pt")
    ck = load_checkpoint(tmp_path / "foreign.pt")
    assert set(ck["model"]) == {"weight", "bias", "extra"}


def test_marker_is_written_last_and_a_kill_mid_write_keeps_the_previous(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(5, _state(5), {"loss": 2.0})
    order = []
    real_replace = os.replace

    def spy(src, dst):
        order.append(os.path.basename(dst))
        return real_replace(src, dst)
    with mock.patch("os.replace", spy):
        m.save(10, _state(10), {"loss": 1.0})
    assert order[:2] == ["ckpt_000010.pt", "ckpt_000010.json"] and order[2] == "LATEST"

    # a "kill" while writing step 15: torch.save dies half-way through the temp file
    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("SIGKILL stand-in")
    with mock.patch("torch.save", dying_save), pytest.raises(KeyboardInterrupt):
        m.save(15, _state(15), {"loss": 0.5})
    assert m.latest().name == "ckpt_000010.pt"
    assert load_checkpoint(m.latest())["step"] == 10
    # a .pt whose marker never got written (killed between the two renames) is not trusted either
    (tmp_path / "ckpt_000020.pt").write_bytes(b"garbage")
    (tmp_path / "LATEST").unlink()
    assert m.latest().name == "ckpt_000010.pt"
    m.save(25, _state(25), {"loss": 0.4})
    assert not list(tmp_path.glob("*.tmp"))  # the stale temp file is cleaned on the next save


def test_rotation_keeps_last_permanent_best_and_final(tmp_path):
    m = CheckpointManager(tmp_path, keep_last_n=2, permanent="10", keep_best_n=1)
    vals = {5: 3.0, 10: 2.0, 15: 1.0, 20: 1.5, 25: 1.7, 30: 1.8}
    for s, v in vals.items():
        m.save(s, _state(s), {"val_loss": v})
    assert sorted(m.complete()) == [10, 15, 25, 30]  # permanent 10, best 15, last two 25 and 30
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [f"ckpt_{s:06d}.pt" for s in (10, 15, 25, 30)]
    index = json.loads((tmp_path / "checkpoints.json").read_text(encoding="utf-8"))
    assert index["best"]["step"] == 15 and index["latest"] == "ckpt_000030.pt"


def test_latest_is_the_newest_complete_checkpoint_even_when_LATEST_lags(tmp_path):
    # a kill between the marker and LATEST: the newest complete checkpoint wins, that interval is not lost
    m = CheckpointManager(tmp_path, keep_last_n=-1)
    m.save(500, _state(500), {})
    m.save(600, _state(600), {})
    (tmp_path / "LATEST").write_text("ckpt_000500.pt\n", encoding="utf-8")
    assert m.latest() == tmp_path / "ckpt_000600.pt"


def test_rollback_sets_newer_checkpoints_aside_and_rotation_keeps_the_new_save(tmp_path):
    m = CheckpointManager(tmp_path, keep_last_n=1, permanent="500")
    for s in (500, 1000):
        m.save(s, _state(s), {})
    # without set-aside, rotation must still keep what was just saved (an older step than the newest)
    m.save(600, _state(600), {})
    assert 600 in m.complete()
    # a run resumed from 500: 600 and 1000 belong to the abandoned continuation
    aside = m.set_aside_after(500)
    assert sorted(m.complete()) == [500] and m.latest() == tmp_path / "ckpt_000500.pt"
    assert sorted(p.name for p in aside.iterdir()) == ["ckpt_000600.json", "ckpt_000600.pt", "ckpt_001000.json",
                                                        "ckpt_001000.pt"]  # moved, not deleted
    m.save(510, _state(510), {})
    assert sorted(m.complete()) == [500, 510] and m.latest() == tmp_path / "ckpt_000510.pt"
    assert m.set_aside_after(510) is None  # nothing newer: nothing moved


def test_a_kill_during_set_aside_never_revives_the_abandoned_branch(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep_last_n=-1)
    for s in (500, 600, 700, 800):
        m.save(s, _state(s), {})
    real, calls = os.replace, []

    def killed_on_the_third_move(a, b):
        calls.append(a)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this runs
        return real(a, b)

    monkeypatch.setattr(checkpoint.os, "replace", killed_on_the_third_move)
    with pytest.raises(KeyboardInterrupt):
        m.set_aside_after(500)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    assert m.latest() == tmp_path / "ckpt_000500.pt"  # 700 and 800 are still here, but do not count
    # the resumed run (auto_resume picks 500 again) finishes the job, and its own saves count once more
    assert m.set_aside_after(500) is not None and sorted(m.complete()) == [500]
    m.save(510, _state(510), {})
    assert m.latest() == tmp_path / "ckpt_000510.pt"
    # killed after the last move but before the end: the next call only clears the leftover intent
    (tmp_path / checkpoint._SET_ASIDE).write_text("500", encoding="utf-8")
    assert m.latest() == tmp_path / "ckpt_000500.pt"
    assert m.set_aside_after(510) is None and m.latest() == tmp_path / "ckpt_000510.pt"


def test_a_nan_val_loss_is_never_best(tmp_path):
    # eval_loss reports nan when no validation token was scored; the index must not call that the best
    m = CheckpointManager(tmp_path, keep_last_n=1, keep_best_n=1)
    for s, v in {5: 2.0, 10: float("nan"), 15: 2.5}.items():
        m.save(s, _state(s), {"val_loss": v})
    assert m.best() == [5, 15] and sorted(m.complete()) == [5, 15]
    assert json.loads((tmp_path / "checkpoints.json").read_text(encoding="utf-8"))["best"]["step"] == 5


def test_corrupt_and_missing_checkpoints_are_clear_errors(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a t4chat checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_arch_mismatch_names_the_fields():
    with pytest.raises(UserError, match=r"n_layer=12 \(config says 6\)"):
        checkpoint.check_arch({"n_layer": 12, "n_embd": 768}, {"n_layer": 6, "n_embd": 768}, "x.pt", "fix it")


def test_resolve_checkpoint_file_run_dir_stage_name(base_dir):
    run = base_dir / "checkpoints" / "d2"
    CheckpointManager(run).save(3, _state(3), {})
    assert resolve_checkpoint("base") == run / "ckpt_000003.pt"          # stage name -> newest run
    assert resolve_checkpoint(str(run)) == run / "ckpt_000003.pt"        # run directory -> LATEST
    assert resolve_checkpoint(str(run / "ckpt_000003.pt")) == run / "ckpt_000003.pt"
    with pytest.raises(UserError, match="mid_checkpoints"):
        resolve_checkpoint("mid")
