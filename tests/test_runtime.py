"""Runtime policy: precision, LR schedule, batch arithmetic, MFU table. python -m pytest -q tests/test_runtime.py"""
import math
from unittest import mock

import pytest
import torch

import common
import schedule
from common import UserError, pick_dtype, resolve_batch
from schedule import get_lr


# ---- precision policy (the CUDA queries are mocked: this machine has no GPU) ----

def test_t4_gets_fp16_and_scaler_even_though_bf16_is_emulated():
    cuda = torch.device("cuda", 0)
    # torch.cuda.is_bf16_supported() says True on a T4 through emulation: it must not be asked
    with mock.patch("torch.cuda.is_bf16_supported", side_effect=AssertionError("must not be asked")):
        with mock.patch("torch.cuda.get_device_capability", return_value=(7, 5)):
            dtype, reason = pick_dtype(cuda, "auto")
    assert dtype == torch.float16
    assert "7.5" in reason and "GradScaler" in reason


def test_ampere_gets_bf16():
    with mock.patch("torch.cuda.get_device_capability", return_value=(8, 0)):
        dtype, reason = pick_dtype(torch.device("cuda", 0), "auto")
    assert dtype == torch.bfloat16 and "8.0" in reason


def test_cpu_gets_fp32_and_explicit_override_wins():
    assert pick_dtype(torch.device("cpu"), "auto")[0] == torch.float32
    assert pick_dtype(torch.device("cpu"), "float16")[0] == torch.float16
    assert pick_dtype(torch.device("cpu"), "bf16")[0] == torch.bfloat16
    with mock.patch("torch.cuda.get_device_capability", return_value=(7, 5)):
        dtype, reason = pick_dtype(torch.device("cuda", 0), "bfloat16")
    assert dtype == torch.bfloat16 and "emulated" in reason
    with pytest.raises(UserError, match="float16"):
        pick_dtype(torch.device("cpu"), "fp8")


def test_scaler_only_for_fp16_and_it_works_on_cpu():
    cpu = torch.device("cpu")
    assert common.make_autocast_and_scaler(cpu, torch.float32)[1] is None
    assert common.make_autocast_and_scaler(cpu, torch.bfloat16)[1] is None
    ctx, scaler = common.make_autocast_and_scaler(cpu, torch.float16)
    lin = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with ctx:
        out = lin(torch.randn(4, 8))
    assert out.dtype == torch.float16
    # an overflowing gradient: the scaler skips the step and halves its scale
    before = lin.weight.detach().clone()
    scaler.scale(out.float().sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(lin.weight, before)
    assert scaler.get_scale() == 65536.0 / 2


def test_muon_never_orthogonalises_in_bf16_without_bf16_hardware():
    with mock.patch("torch.cuda.get_device_capability", return_value=(7, 5)):
        assert common.muon_ns_dtype(torch.device("cuda", 0), torch.bfloat16) == torch.float32
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)):
        assert common.muon_ns_dtype(torch.device("cuda", 0), torch.bfloat16) == torch.bfloat16
    assert common.muon_ns_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32


# ---- LR schedule ----

@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "cosine_with_restarts", "wsd"])
def test_lr_never_zero_at_step_zero_and_warms_up(kind):
    kw = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100, scheduler=kind, restarts=2,
              warmdown_steps=50)
    lrs = [get_lr(s, **kw) for s in range(101)]
    assert lrs[0] > 0
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # strictly rising warmup
    assert lrs[10] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1e-3)
    if kind == "constant":
        assert lrs[-1] == pytest.approx(1e-3)
    else:
        assert lrs[-1] == pytest.approx(1e-4)
        assert min(lrs[10:]) >= 1e-4 - 1e-12  # never below min_lr after warmup


def test_lr_shapes():
    kw = dict(max_lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=100)
    assert get_lr(50, **kw, scheduler="cosine") == pytest.approx(0.5)
    assert get_lr(25, **kw, scheduler="linear") == pytest.approx(0.75)
    cos = [get_lr(s, **kw, scheduler="cosine") for s in range(101)]
    assert all(a >= b for a, b in zip(cos, cos[1:]))  # monotone decay
    # two restarts: back at the top half-way through
    r = [get_lr(s, **kw, scheduler="cosine_with_restarts", restarts=2) for s in range(101)]
    assert r[50] == pytest.approx(1.0) and r[49] < 0.01
    assert get_lr(60, **kw, scheduler="cosine", decay_lr=False) == 1.0
    with pytest.raises(UserError, match="cosine"):
        get_lr(0, **kw, scheduler="step")


def test_wsd_momentum_and_weight_decay_schedules():
    """wsd: warmup, flat, then linear to the final rate at the end (nanochat's shape); Muon's momentum warms up and
    dips in the warmdown; the weight decay's scale follows its schedule; final_lr_frac is a fraction of the peak."""
    from schedule import make_schedule
    c = dict(max_steps=100, warmup_steps=10, warmup_ratio=-1, max_lr=1.0, min_lr=-1, lr_scaling="none",
             lr_scheduler="wsd", decay_lr=True, lr_restarts=1, optimizer="muon", matrix_lr=0.02, warmdown_ratio=0.4,
             final_lr_frac=0.05, muon_momentum=0.95, muon_momentum_start=0.85, muon_momentum_warmup_steps=20,
             muon_momentum_warmdown=0.9, weight_decay_schedule="cosine", cautious_weight_decay=True)
    sched = make_schedule(c, {"final_lr_frac"})
    lrs = [sched.lr(s) for s in range(101)]
    assert sched.warmdown == 40 and sched.final_lr == pytest.approx(0.05)
    assert lrs[10:61] == [1.0] * 51 and lrs[61] < 1.0  # flat until 40 steps are left
    assert lrs[80] == pytest.approx(0.05 + 0.95 * 20 / 40) and lrs[100] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    m = [sched.momentum(s) for s in range(101)]
    assert m[0] == pytest.approx(0.85) and m[10] == pytest.approx(0.90) and m[20:61] == [0.95] * 41
    assert m[80] == pytest.approx(0.925) and m[100] == pytest.approx(0.9)
    assert sched.wd_factor(0) == 1.0 and sched.wd_factor(50) == pytest.approx(0.5) and sched.wd_factor(100) == 0.0
    assert "momentum 0.85 -> 0.95 over 20 steps -> 0.9 in the warmdown" in sched.describe()
    # weight_decay_horizon: the script's weight decay, tuned at 25 steps, decays a 100-step run a quarter as hard per
    # step; a --weight_decay is taken as typed unless the horizon is given too; a shorter run is never scaled up
    h = {**c, "weight_decay_horizon": 25}
    assert make_schedule(h, set()).wd_factor(0) == pytest.approx(0.25)
    assert make_schedule(h, set()).wd_factor(50) == pytest.approx(0.125)
    assert "weight decay x0.25 for the horizon" in make_schedule(h, set()).describe()
    assert make_schedule(h, {"weight_decay"}).wd_factor(0) == 1.0
    assert make_schedule(h, {"weight_decay", "weight_decay_horizon"}).wd_factor(0) == pytest.approx(0.25)
    assert make_schedule({**h, "max_steps": 10}, set()).wd_factor(0) == 1.0
    # the script's warmup on a run shorter than ten times it (a smoke test) shrinks to a tenth of the run, said in
    # the schedule's note; a warmup the user asked for stays, and the warmdown never goes negative
    short = make_schedule({**c, "max_steps": 20, "warmup_steps": 40}, set())
    assert short.warmup == 2 and "warmup_steps=40 (the script's default)" in short.note
    assert short.lr(2) == 1.0 and short.warmdown == 8
    mine = make_schedule({**c, "max_steps": 20, "warmup_steps": 40}, {"warmup_steps"})
    assert mine.warmup == 40 and mine.warmdown == 0 and mine.note == ""
    assert make_schedule(c, set()).note == ""  # 10 of 100 steps: as given
    # min_lr still works as before; both given by the user is an error naming both; neither: wsd ends at 5 % of the
    # peak (nanochat's), the other shapes at a tenth as they always did (the guides' cosine)
    assert make_schedule({**c, "final_lr_frac": -1, "min_lr": 0.2}, {"min_lr"}).final_lr == 0.2
    assert make_schedule({**c, "final_lr_frac": -1}, set()).final_lr == pytest.approx(0.05)
    for kind in ("cosine", "linear", "cosine_with_restarts"):
        assert make_schedule({**c, "final_lr_frac": -1, "lr_scheduler": kind}, set()).final_lr == pytest.approx(0.1)
    with pytest.raises(UserError, match="min_lr.*final_lr_frac"):
        make_schedule({**c, "min_lr": 0.2}, {"min_lr", "final_lr_frac"})
    with pytest.raises(UserError, match="muon_momentum_start"):
        make_schedule({**c, "muon_momentum_start": 1.5}, set())


def test_a_resume_keeps_its_runs_schedule_over_changed_script_defaults(capsys):
    """A checkpoint's schedule settings win over the script's defaults (a git pull changed them mid-run); what the
    command line sets wins over the checkpoint; a checkpoint older than a setting ran with defaults.py's 'off'."""
    from trainer import _keep_recipe
    script = dict(lr_scheduler="wsd", warmup_steps=40, warmup_ratio=-1, min_lr=-1, weight_decay=0.28,
                  muon_momentum_start=0.85, muon_momentum_warmup_steps=400, weight_decay_schedule="cosine",
                  max_lr=0.004, max_steps=500)
    old_run = dict(lr_scheduler="cosine", warmup_steps=-1, warmup_ratio=0.0, min_lr=-1, weight_decay=0.0,
                   max_lr=0.004, max_steps=500)  # written before the momentum and decay schedules existed
    g, c = dict(script), dict(script)
    _keep_recipe(g, c, {"max_steps", "weight_decay"}, dict(config=old_run, step=300))
    assert g == c
    assert c["lr_scheduler"] == "cosine" and c["warmup_steps"] == -1 and c["warmup_ratio"] == 0.0
    assert c["muon_momentum_start"] == -1 and c["muon_momentum_warmup_steps"] == 0
    assert c["weight_decay_schedule"] == "constant"
    assert c["weight_decay"] == 0.28  # set on this command line
    out = capsys.readouterr().out
    assert "lr_scheduler='cosine' (the script's default is now 'wsd')" in out and "from step 300 on" in out
    # nothing differs: nothing said
    _keep_recipe(g, c, set(), dict(config=dict(c), step=5))
    assert capsys.readouterr().out == ""


def test_a_resume_without_the_runs_flags_resolves_its_schedule_as_the_run_did():
    """The rules that ask what the user set (pick_pair, the warmup shrink, the weight-decay horizon) decide on
    resume as on the run's first launch, with or without its flags again: checkpoints record user_set."""
    from schedule import make_schedule
    from trainer import _keep_recipe
    script = dict(max_steps=1000, warmup_steps=40, warmup_ratio=-1, max_lr=0.004, min_lr=-1, lr_scaling="none",
                  lr_scheduler="wsd", decay_lr=True, lr_restarts=1, optimizer="muon", matrix_lr=0.02,
                  warmdown_ratio=0.65, final_lr_frac=-1, weight_decay=0.28, weight_decay_schedule="cosine",
                  weight_decay_horizon=400)

    def run(flags, steps=1000):
        c = {**script, **flags, "max_steps": steps}
        return c, set(flags) | {"max_steps"}

    def same(a, b):
        return all((a.lr(s), a.momentum(s), a.wd_factor(s)) == (b.lr(s), b.momentum(s), b.wd_factor(s))
                   for s in range(a.steps + 1)) and a.warmup == b.warmup

    for flags, steps in (({"warmup_ratio": 0.2}, 1000), ({"weight_decay": 0.1}, 1000), ({"warmup_steps": 10}, 60),
                         ({"final_lr_frac": 0.2}, 1000), ({"weight_decay": 0.28}, 1000), ({}, 60)):
        c0, us0 = run(flags, steps)
        first = make_schedule(c0, us0)
        for again in (flags, {}):  # the same command line, or none of its flags
            c1, us1 = run(again, steps)
            _keep_recipe(dict(c1), c1, us1, dict(config=dict(c0), user_set=sorted(us0), step=5))
            assert same(make_schedule(c1, us1), first), (flags, again)
    # a checkpoint from before user_set was recorded (finetune_dolly's warmup 100 on a 500-step run): its warmup
    # is kept as given, not shrunk; a wsd run of that time ended at a tenth of the peak
    old = {**script, "lr_scheduler": "cosine", "warmup_steps": 100, "max_steps": 500}
    c1, us1 = dict(old), {"max_steps"}
    _keep_recipe(dict(c1), c1, us1, dict(config=dict(old), step=5))
    assert make_schedule(c1, us1).warmup == 100 and make_schedule(dict(old), {"max_steps"}).warmup == 50
    c2, us2 = {**old, "lr_scheduler": "wsd"}, {"max_steps"}
    _keep_recipe(dict(c2), c2, us2, dict(config={**old, "lr_scheduler": "wsd"}, step=5))
    assert make_schedule(c2, us2).final_lr == pytest.approx(0.0004)


def test_cautious_weight_decay_only_shrinks_weights_the_update_shrinks_too():
    from optim import MuonAdamW
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    w.grad = torch.randn(8, 8)
    before = w.detach().clone()
    opt = MuonAdamW([dict(params=[w], kind="muon", lr=0.1, weight_decay=0.5, cautious=True)])
    plain = torch.nn.Parameter(before.clone())
    plain.grad = w.grad.clone()
    MuonAdamW([dict(params=[plain], kind="muon", lr=0.1, weight_decay=0.0)]).step()
    opt.step()
    update = before - plain.detach()  # the Muon step alone (no decay): its sign is the update's
    decayed = (before * update) > 0   # where the update shrinks the weight, decay applies too
    expect = before - 0.1 * 0.5 * before * decayed - update
    assert torch.allclose(w.detach(), expect, atol=1e-6) and 0 < decayed.sum() < 64


def test_lr_scaling_follows_gpu_count_only_when_accumulation_is_per_gpu():
    assert schedule.scale_lr(1e-4, mode="none", global_batch=8, reference_batch=1) == 1e-4
    assert schedule.scale_lr(1e-4, mode="linear", global_batch=8, reference_batch=1) == pytest.approx(8e-4)
    assert schedule.scale_lr(1e-4, mode="sqrt", global_batch=8, reference_batch=1) == pytest.approx(1e-4 * math.sqrt(8))
    with pytest.raises(UserError):
        schedule.scale_lr(1e-4, mode="cubic", global_batch=8, reference_batch=1)


def test_schedule_pairs():
    def res(user_set, **kw):
        base = dict(max_steps=-1, num_epochs=-1, warmup_steps=-1, warmup_ratio=-1)
        base.update(kw)
        return schedule.resolve_schedule(**base, user_set=user_set, steps_per_epoch=lambda: 10,
                                       default_steps=lambda: 77)
    assert res(set()) == (77, 0)
    assert res({"max_steps"}, max_steps=100, warmup_ratio=0.1) == (100, 10)
    assert res({"num_epochs"}, num_epochs=2.5) == (25, 0)
    # a script default yields to the user's value; two user values are an error naming both
    assert res({"warmup_steps"}, max_steps=100, warmup_steps=5, warmup_ratio=0.1) == (100, 5)
    with pytest.raises(UserError, match="warmup_steps.*warmup_ratio"):
        res({"warmup_steps", "warmup_ratio"}, max_steps=100, warmup_steps=5, warmup_ratio=0.1)
    with pytest.raises(UserError, match="max_steps.*num_epochs"):
        res({"max_steps", "num_epochs"}, max_steps=100, num_epochs=2)


# ---- batch arithmetic ----

def test_grad_accum_derived_and_world_size_invariant():
    kw = dict(grad_accum_steps=-1, device_batch_size=4, max_seq_len=1024, user_set=set())
    assert resolve_batch(total_batch_size=131072, world_size=4, **kw) == (131072, 8)
    assert resolve_batch(total_batch_size=131072, world_size=1, **kw) == (131072, 32)


def test_bad_batch_arithmetic_shows_the_sum_and_valid_values():
    with pytest.raises(UserError) as e:
        resolve_batch(total_batch_size=100000, grad_accum_steps=-1, device_batch_size=4, max_seq_len=1024,
                      world_size=3, user_set=set())
    msg = str(e.value)
    assert "4*1024*3 = 12288" in msg
    assert "98304" in msg and "110592" in msg  # the nearest valid totals


def test_grad_accum_given_instead_of_total():
    # the user passes grad_accum_steps; the script's default total_batch_size gives way
    assert resolve_batch(total_batch_size=131072, grad_accum_steps=2, device_batch_size=4, max_seq_len=128,
                         world_size=2, user_set={"grad_accum_steps"}) == (2048, 2)
    with pytest.raises(UserError, match="total_batch_size.*grad_accum_steps"):
        resolve_batch(total_batch_size=2048, grad_accum_steps=2, device_batch_size=4, max_seq_len=128,
                      world_size=2, user_set={"grad_accum_steps", "total_batch_size"})


# ---- MFU table ----

def test_peak_flops_table():
    assert common.peak_flops("Tesla T4", torch.float16) == 65e12
    assert common.peak_flops("Tesla T4", torch.bfloat16) is None  # emulated: no honest peak
    assert common.peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert common.peak_flops("NVIDIA A10", torch.bfloat16) == 125e12
    assert common.peak_flops("NVIDIA GeForce RTX 4060 Laptop GPU", torch.float16) == 46e12
    assert common.peak_flops("NVIDIA GeForce RTX 3080", torch.bfloat16) == 59.5e12
    assert common.peak_flops("Some Future GPU", torch.bfloat16) is None
    assert common.peak_flops("Some Future GPU", torch.bfloat16, override=1e15) == 1e15


# ---- the error guard and the compile fallback ----

def test_run_turns_user_error_and_oom_into_one_message(capsys):
    def bad_input():
        raise UserError("--depth=0 must be >= 1")
    with pytest.raises(SystemExit) as e:
        common.run(bad_input)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --depth=0 must be >= 1"

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(SystemExit) as e:
        common.run(oom)
    assert e.value.code == 3
    err = capsys.readouterr().err
    for advice in ("--device_batch_size", "--gradient_checkpointing=True", "--max_seq_len", "--depth"):
        assert advice in err


def test_compile_failure_falls_back_to_eager(capsys):
    model = torch.nn.Linear(4, 4)

    class Broken(torch.nn.Module):
        def forward(self, *a, **k):
            raise RuntimeError("triton not found")
    with mock.patch("torch.compile", return_value=Broken()):
        out = common.try_compile(model, torch.device("cpu"), common.contextlib.nullcontext(), 2, 4)
    assert out is model
    assert "continuing without compile" in capsys.readouterr().out
    assert common.compile_default(torch.device("cpu")) is False


# ---- logging: what the console showed is in train.log; a validation set with nothing to score ----

def test_messages_printed_before_the_log_opens_end_up_in_it(tmp_path, capsys):
    common.print0("warning: printed before the log opened")
    logger = common.RunLogger(common.Dist(), tmp_path, {"depth": 2}, run_name="t")
    common.print0("a notice after it opened")
    logger.print("step 0 | loss 1.0")
    logger.close()
    common.print0("after close: not this log's")
    log = (tmp_path / "train.log").read_text(encoding="utf-8")
    assert "warning: printed before the log opened" in log and "a notice after it opened" in log
    assert "after close" not in log
    assert log.index("depth = 2") < log.index("warning: printed before") < log.index("step 0")
    out = capsys.readouterr().out
    assert out.count("warning: printed before the log opened") == 1  # copied into the file, not re-printed
    # the next log starts clean of the previous one's messages, but gets those printed in between
    logger2 = common.RunLogger(common.Dist(), tmp_path / "b", {}, run_name="t2")
    logger2.close()
    log2 = (tmp_path / "b" / "train.log").read_text(encoding="utf-8")
    assert "after close: not this log's" in log2 and "printed before the log opened" not in log2


def test_eval_loss_is_nan_not_zero_when_no_token_is_trained(capsys):
    from evaluate import eval_loss
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=1, n_embd=32, n_head=2, vocab_size=64, max_seq_len=8))
    x = torch.randint(0, 64, (2, 8))

    class Loader:
        def __init__(self, y):
            self.y = y

        def reset(self):
            pass

        def next_batch(self):
            return x, self.y

    y = torch.randint(0, 64, (2, 8))
    y[0, :5] = -1
    out = eval_loss(model, Loader(y), 2)
    with torch.no_grad():
        assert out["val_loss"] == pytest.approx(model(x, y).item(), rel=1e-5)
    out = eval_loss(model, Loader(torch.full((2, 8), -1)), 2, token_bytes=torch.ones(64))
    assert math.isnan(out["val_loss"]) and math.isnan(out["val_bpb"])
    assert "hold no trained token" in capsys.readouterr().out


def test_eval_loss_bpb_stderr_is_the_ratio_estimators_over_sequences():
    from evaluate import eval_loss
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=1, n_embd=32, n_head=2, vocab_size=64, max_seq_len=8)).eval()
    batches = [(torch.randint(0, 64, (3, 8)), torch.randint(0, 64, (3, 8))) for _ in range(2)]
    token_bytes = torch.randint(0, 4, (64,))

    class Loader:
        def reset(self):
            self.i = 0

        def next_batch(self):
            self.i += 1
            return batches[self.i - 1]

    out = eval_loss(model, Loader(), 2, token_bytes=token_bytes, stderr=True)
    rows = []  # (nats, bytes) per sequence, by hand
    with torch.no_grad():
        for x, y in batches:
            losses, b = model(x, y, reduction="none"), token_bytes[y]
            rows += [((losses[i] * (b[i] > 0)).sum().item(), b[i].sum().item()) for i in range(3)]
    n = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    b = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    ratio = n.sum() / b.sum()
    se = ((n - ratio * b).pow(2).sum() / (len(rows) - 1) / len(rows)).sqrt() / b.mean() / math.log(2)
    assert out["val_bpb"] == pytest.approx((ratio / math.log(2)).item(), rel=1e-6)
    assert out["val_bpb_stderr"] == pytest.approx(se.item(), rel=1e-6)


def test_a_flag_at_its_default_value_still_counts_as_the_users():
    # --matrix_lr=0.02 (its default) must pin matrix_lr, so it does not follow a changed max_lr
    g = {"max_lr": 0.004, "matrix_lr": 0.02, "total_batch_size": 1024, "__file__": "stage.py"}
    _, user_set = common.load_config(dict(g), ["--max_lr=0.002", "--matrix_lr=0.02"])
    assert user_set == {"max_lr", "matrix_lr"}
    _, user_set = common.load_config(dict(g), ["--max_lr=0.002"])
    assert user_set == {"max_lr"}
