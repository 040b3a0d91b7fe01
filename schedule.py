"""schedule.py: a run's horizon and learning rates, resolved once from its config into a Schedule.

    sched = make_schedule(config, user_set, steps_per_epoch=..., default_steps=..., global_batch=...,
                          reference_batch=...)
    sched.steps, sched.warmup, sched.peak_lr, sched.matrix_lr, sched.lr(step)
    sched.momentum(step), sched.wd_factor(step)     # Muon's momentum and the weight decay's scale at `step`
                                                    # (its schedule's shape times weight_decay_horizon / steps)

get_lr() is the pure function behind Schedule.lr (linear warmup that never starts at 0, then cosine, linear,
constant, cosine with restarts, or wsd: constant, then a linear warmdown over the last warmdown_ratio of the steps,
down to the final rate); resolve_schedule() settles the '-1 = unset' pairs (max_steps | num_epochs,
warmup_steps | warmup_ratio) and scale_lr() the multi-GPU guide's lr_scaling. Everything is a function of the step
number alone, so a resumed run gets exactly the values an uninterrupted one had.
Every stage uses these through Trainer.schedule(); bench.py uses them for train_base.py's recipe.
"""
import math
from dataclasses import dataclass

from common import pick_pair
from configurator import UserError

LR_SCHEDULERS = ("cosine", "linear", "constant", "cosine_with_restarts", "wsd")
# where the decay ends when neither min_lr nor final_lr_frac is set: a tenth of the peak (nanoGPT; the guides'
# cosine), or for wsd 5 % (nanochat's final_lr_frac, the shape train_base.py's default recipe was measured with)
DEFAULT_FINAL_FRAC = {"wsd": 0.05}
WD_SCHEDULES = ("constant", "linear", "cosine")


def get_lr(step, *, max_lr, min_lr, warmup_steps, max_steps, scheduler="cosine", decay_lr=True, restarts=1,
           warmdown_steps=0):
    """The learning rate at `step` (0-based), a pure function shared by every stage.
    Warmup is (step+1)/(warmup+1) so step 0 never runs at lr 0 (nanoGPT PR #578). wsd holds max_lr until the last
    warmdown_steps, then falls linearly, reaching min_lr after the last step (nanochat's base_train shape)."""
    if scheduler not in LR_SCHEDULERS:
        raise UserError(f"lr_scheduler={scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    if not decay_lr or scheduler == "constant":
        return max_lr
    if step >= max_steps:
        return min_lr
    if scheduler == "wsd":
        left = max_steps - step  # steps still to run, this one included
        return max_lr if left > warmdown_steps else min_lr + (max_lr - min_lr) * left / max(1, warmdown_steps)
    p = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # decay progress in [0, 1)
    if scheduler == "linear":
        return max_lr - p * (max_lr - min_lr)
    if scheduler == "cosine_with_restarts":
        p = (p * max(1, restarts)) % 1.0  # each restart jumps back to max_lr and decays again
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (max_lr - min_lr)


def scale_lr(max_lr, *, mode, global_batch, reference_batch):
    """Scale max_lr with the global batch: the multi-GPU guide's linear (x N) or sqrt (x sqrt N) rule."""
    if mode == "none":
        return max_lr
    if mode not in ("linear", "sqrt"):
        raise UserError(f"lr_scaling={mode!r} is not one of none, linear, sqrt")
    ratio = global_batch / reference_batch
    return max_lr * (ratio if mode == "linear" else math.sqrt(ratio))


def resolve_schedule(*, max_steps, num_epochs, warmup_steps, warmup_ratio, user_set, steps_per_epoch=None,
                     default_steps=None):
    """Resolve the '-1 = unset' pairs of the horizon: (max_steps | num_epochs) and (warmup_steps | warmup_ratio).
    steps_per_epoch is a callable (it may read parquet metadata), default_steps the fallback when neither is set."""
    which = pick_pair("max_steps", max_steps, "num_epochs", num_epochs, user_set)
    if which == "b":
        if num_epochs <= 0:
            raise UserError(f"num_epochs={num_epochs} must be > 0")
        max_steps = max(1, math.ceil(num_epochs * steps_per_epoch()))
    elif which is None:
        max_steps = default_steps()
    if max_steps < 1:
        raise UserError(f"max_steps={max_steps} must be >= 1")
    which = pick_pair("warmup_steps", warmup_steps, "warmup_ratio", warmup_ratio, user_set)
    if which == "b":
        if not 0 <= warmup_ratio < 1:
            raise UserError(f"warmup_ratio={warmup_ratio} must be in [0, 1)")
        warmup_steps = int(round(warmup_ratio * max_steps))
    elif which is None:
        warmup_steps = 0
    return max_steps, warmup_steps


@dataclass(frozen=True)
class Schedule:
    """The horizon and the learning rates of a run, resolved once from the config (make_schedule). lr(step) is
    the rate in force at `step`; every optimizer group follows it in proportion to its own peak (base_lr):
    group lr = base_lr * lr(step) / peak_lr."""
    steps: int                  # optimizer steps
    warmup: int                 # linear warmup steps
    peak_lr: float              # max_lr after lr_scaling: the AdamW groups' peak
    final_lr: float             # where the decay ends
    matrix_lr: float = 0.0      # Muon's peak (follows max_lr, see make_schedule); 0 unless optimizer=muon
    kind: str = "cosine"        # lr_scheduler
    decay: bool = True          # decay_lr
    restarts: int = 1           # lr_restarts (cosine_with_restarts)
    warmdown: int = 0           # wsd: the last steps, decaying linearly (warmdown_ratio * steps)
    muon_momentum: float = 0.95     # Muon's momentum after its warm-up
    momentum_start: float = 0.95    # ... at step 0, rising linearly over momentum_warmup steps
    momentum_warmup: int = 0
    momentum_warmdown: float = -1.0  # wsd's warmdown takes it linearly to this value; -1 = it stays
    wd_schedule: str = "constant"   # the weight decay's scale over the run: constant, linear or cosine to 0
    wd_scale: float = 1.0           # weight_decay_horizon / steps (at most 1): a longer run decays less per step
    cautious_wd: bool = False       # Muon: decay only where the update shrinks the weight too
    note: str = ""                  # a script default that gave way to this run's length, for the log

    def lr(self, step) -> float:
        return get_lr(step, max_lr=self.peak_lr, min_lr=self.final_lr, warmup_steps=self.warmup,
                      max_steps=self.steps, scheduler=self.kind, decay_lr=self.decay, restarts=self.restarts,
                      warmdown_steps=self.warmdown)

    def momentum(self, step) -> float:
        """Muon's momentum at `step`: warm-up from momentum_start, then muon_momentum, then (wsd, when asked) a
        linear dip to momentum_warmdown across the warmdown, as nanochat's base_train does."""
        m = self.muon_momentum
        if step < self.momentum_warmup:
            m = self.momentum_start + (self.muon_momentum - self.momentum_start) * step / self.momentum_warmup
        start = self.steps - self.warmdown
        if self.momentum_warmdown >= 0 and self.kind == "wsd" and self.warmdown and step >= start:
            m += (self.momentum_warmdown - m) * min(1.0, (step - start) / self.warmdown)
        return m

    def wd_factor(self, step) -> float:
        """The weight decay at `step` as a fraction of weight_decay: its shape (1 throughout, or down to 0 at the
        end) times wd_scale."""
        p = min(1.0, step / max(1, self.steps))
        shape = {"constant": 1.0, "linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * p))}[self.wd_schedule]
        return self.wd_scale * shape

    def describe(self, muon=True) -> str:
        """One line for the log; muon=False leaves out Muon's settings (the stage built an optimizer without it)."""
        shape = f"{self.kind}, warmdown {self.warmdown}" if self.kind == "wsd" else self.kind
        line = f"{self.steps} steps, warmup {self.warmup}, lr {self.peak_lr:g} -> {self.final_lr:g} ({shape})"
        if self.matrix_lr and muon:
            line += f", Muon matrix_lr {self.matrix_lr:g}, momentum "
            line += (f"{self.momentum_start:g} -> {self.muon_momentum:g} over {self.momentum_warmup} steps"
                     if self.momentum_warmup else f"{self.muon_momentum:g}")
            if self.momentum_warmdown >= 0 and self.kind == "wsd":
                line += f" -> {self.momentum_warmdown:g} in the warmdown"
            if self.cautious_wd:
                line += ", cautious weight decay"
        if self.wd_scale != 1:
            line += f", weight decay x{self.wd_scale:.3g} for the horizon"
        return line + (f", weight decay {self.wd_schedule} to 0" if self.wd_schedule != "constant" else "")


def make_schedule(c: dict, user_set, *, steps_per_epoch=None, default_steps=None, global_batch=1,
                  reference_batch=1, default_lrs=(None, None)) -> Schedule:
    """The Schedule a config asks for: max_steps | num_epochs, warmup_steps | warmup_ratio (resolve_schedule),
    max_lr scaled by lr_scaling (a lr_reference_batch / lr_reference_examples > 0 replaces reference_batch), min_lr
    (-1 = peak / 10; wsd: peak * 0.05). default_lrs are the script's (max_lr, matrix_lr) before overrides: Muon's
    matrix_lr follows max_lr, so a user who lowers max_lr (the guides' "loss not falling: lower the learning rate")
    lowers every rate in the model in proportion, unless matrix_lr is set as well; lr_scaling scales both alike."""
    steps, warmup = resolve_schedule(
        max_steps=c["max_steps"], num_epochs=c.get("num_epochs", -1), warmup_steps=c["warmup_steps"],
        warmup_ratio=c["warmup_ratio"], user_set=user_set, steps_per_epoch=steps_per_epoch,
        default_steps=default_steps)
    note = ""
    # a script's warmup_steps is sized for real runs; on a run not ten times longer (a smoke test) it would eat the
    # run, so it shrinks to a tenth of the steps and the log says so. A warmup the user asked for is kept.
    if warmup > steps // 10 and warmup == c["warmup_steps"] and not {"warmup_steps", "warmup_ratio"} & user_set:
        note = (f"warmup_steps={warmup} (the script's default) is more than a tenth of this {steps}-step run: "
                f"warming up over {steps // 10} steps instead; pass --warmup_steps to choose")
        warmup = steps // 10
    given = c.get("lr_reference_batch", c.get("lr_reference_examples", -1))
    peak = scale_lr(c["max_lr"], mode=c["lr_scaling"], global_batch=global_batch,
                    reference_batch=given if given > 0 else reference_batch)
    default_max, default_matrix = default_lrs
    matrix = c.get("matrix_lr", default_matrix or 0.0) if c.get("optimizer") == "muon" else 0.0
    if "max_lr" in user_set and "matrix_lr" not in user_set and default_max:
        matrix *= c["max_lr"] / default_max
    # the final rate: final_lr_frac of the peak (nanochat's name), else min_lr (-1 = DEFAULT_FINAL_FRAC's)
    frac = c.get("final_lr_frac", -1)
    if pick_pair("min_lr", c["min_lr"], "final_lr_frac", frac, user_set) == "b":
        if not 0 <= frac <= 1:
            raise UserError(f"final_lr_frac={frac} must be in [0, 1]")
        final = frac * peak
    else:
        final = c["min_lr"] if c["min_lr"] >= 0 else peak * DEFAULT_FINAL_FRAC.get(c["lr_scheduler"], 0.1)
    ratio = c.get("warmdown_ratio", 0.0)
    if not 0 <= ratio <= 1:
        raise UserError(f"warmdown_ratio={ratio} must be in [0, 1] (the fraction of the steps that decay)")
    warmdown = max(0, min(int(round(ratio * steps)), steps - warmup)) if c["lr_scheduler"] == "wsd" else 0
    momentum = c.get("muon_momentum", 0.95)
    start = c.get("muon_momentum_start", -1)
    for name, value in (("muon_momentum", momentum), ("muon_momentum_start", start),
                        ("muon_momentum_warmdown", c.get("muon_momentum_warmdown", -1))):
        if value != -1 and not 0 <= value < 1 or name == "muon_momentum" and value == -1:
            raise UserError(f"{name}={value} must be in [0, 1)" + ("" if name == "muon_momentum" else "; -1 = off"))
    # weight decay tuned at `horizon` steps keeps its total over a longer run: the weights' memory (1 / (lr * wd)
    # steps) stays the same fraction of the run (T_epoch, arXiv 2405.13698; nanochat scales it alike). Only the
    # script's value is scaled: a --weight_decay means what it says unless the horizon is given with it. Never
    # above the tuned value, so a short smoke run does not decay harder than anything measured.
    horizon = c.get("weight_decay_horizon", -1)
    if "weight_decay" in user_set and "weight_decay_horizon" not in user_set:
        horizon = -1
    wd_scale = min(1.0, horizon / steps) if horizon > 0 else 1.0
    if c.get("weight_decay_schedule", "constant") not in WD_SCHEDULES:
        raise UserError(f"weight_decay_schedule={c['weight_decay_schedule']!r} is not one of {', '.join(WD_SCHEDULES)}")
    return Schedule(steps=steps, warmup=warmup, peak_lr=peak, final_lr=final,
                    matrix_lr=matrix * peak / c["max_lr"], kind=c["lr_scheduler"], decay=c["decay_lr"],
                    restarts=c["lr_restarts"], warmdown=warmdown, muon_momentum=momentum,
                    momentum_start=momentum if start == -1 else start,
                    momentum_warmup=max(0, c.get("muon_momentum_warmup_steps", 0)),
                    momentum_warmdown=c.get("muon_momentum_warmdown", -1),
                    wd_schedule=c.get("weight_decay_schedule", "constant"), wd_scale=wd_scale,
                    cautious_wd=bool(c.get("cautious_weight_decay", False)), note=note)
