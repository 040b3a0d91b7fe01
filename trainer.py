"""trainer.py: the run around a stage script's loop, from its parsed globals to its last checkpoint.

Not a stage script itself (those are train_*.py and finetune_dolly.py): each of them builds its data, its
model, its optimizer and its loss, and hands them to one Trainer, which owns what must be written (and
tested) once: the config checks, the run folder, resume, DDP, precision, the loop, checkpoints and the log.

    tr = Trainer(globals(), "sft", init_stage="mid")   # config, checks, run folder, resume source: no process group yet
    tr.setup()                                          # DDP, device, precision, seed
    model = tr.build_model()                            # from scratch, from an earlier stage, or resumed
    sched = tr.schedule(...)                            # steps, warmup, learning rates: a schedule.Schedule
    opt = model.configure_optimizers(...)               # or any torch.optim.Optimizer
    tr.fit(model, opt, train_loader, accum=..., schedule=sched, evaluate=..., loss_fn=...)

fit() reads top to bottom; restore, save, one optimizer step (GradScaler, clipping, the non-finite guard) and
the log line are the named methods beside it. Whatever optimizer and loss a stage passes, resume stays exact
(the optimizer's state_dict is in every checkpoint), gradients sync once per step (no_sync), and the loss of a
step is normalised by its trained-token count over all micro-batches and ranks.
"""
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from checkpoint import (STAGE_DIRS, CheckpointManager, check_arch, checkpoint_tokenizer, load_checkpoint,
                        resolve_checkpoint, rng_state, set_rng_state)
from common import UserError, print0
from schedule import Schedule, make_schedule

# the globals a stage script may declare to shape a model from scratch (base); later stages take the shape
# from the checkpoint they start from, and only check these when the user passes them explicitly
ARCH_KEYS = ("depth", "n_embd", "n_head", "n_kv_head", "tie_embeddings")


# optimizer group keys -> the settings a user changes to move them
_HYPER_NAMES = {"base_lr": "learning rates (max_lr / matrix_lr / lr_scaling)", "base_weight_decay": "weight_decay",
                "betas": "AdamW betas", "momentum": "momentum"}
# what set_hyperparameters() writes into the groups at every step
SCHEDULED = ("lr", "weight_decay", "momentum", "cautious")
# the settings behind it, the shape of a run's schedule: a resume keeps the checkpoint's values of those this command
# line does not set, so a script whose defaults changed since the run began (a git pull) does not bend the run halfway
RECIPE_KEYS = ("warmup_steps", "warmup_ratio", "min_lr", "decay_lr", "lr_restarts", "weight_decay", "lr_scheduler",
               "warmdown_ratio", "final_lr_frac", "muon_momentum", "muon_momentum_start", "muon_momentum_warmup_steps",
               "muon_momentum_warmdown", "weight_decay_schedule", "weight_decay_horizon", "cautious_weight_decay")


def set_hyperparameters(optimizer, schedule, step):
    """The values in force at `step`, from the step number alone (so a resume continues them exactly): every group's
    lr in proportion to its peak (base_lr), its weight decay scaled by the schedule, and Muon's momentum."""
    lr, wd = schedule.lr(step), schedule.wd_factor(step)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr / schedule.peak_lr
        if "weight_decay" in group:
            group["weight_decay"] = group["base_weight_decay"] * wd
        if group.get("kind") == "muon":
            group["momentum"], group["cautious"] = schedule.momentum(step), schedule.cautious_wd


def with_shared_defaults(g: dict) -> dict:
    """A stage script's globals plus the settings every stage shares (defaults.py) that it does not declare
    itself; in place, so the script's bare names see them as well. -h shows defaults.py's comments for them."""
    import defaults
    from configurator import config_keys
    for k, v in config_keys(vars(defaults)).items():
        g.setdefault(k, v)
    g["_types"] = {**defaults._types, **g.get("_types", {})}
    g["_help_files"] = [*g.get("_help_files", ()), defaults.__file__]
    return g


def cross_entropy_sum(model, x, y):
    """The default loss_fn: the model's chunked cross-entropy, summed over the trained tokens (y != -1).
    A loss_fn returns a sum; fit() divides by the step's trained-token count over all micro-batches and ranks."""
    return model(x, y, reduction="sum")


def _check_stage(ckpt, path, name):
    other = ckpt.get("stage")
    if other and other != name:
        raise UserError(f"{path} is a {other} checkpoint; resuming continues a {name} run. To start {name} from it, "
                        f"pass --pretrained_checkpoint={path} instead")


# Hugging Face weights were pretrained with AdamW at small rates; Muon's from-scratch rates (matrix_lr 0.004-0.02
# on orthogonalised updates) wreck them within a few steps. The 8 GB guide finetunes SmolLM2-135M at 4e-5.
PRETRAINED_OPTIMIZER, PRETRAINED_MAX_LR = "adamw", 4e-5


def _pretrained_defaults(g: dict, c: dict, user_set: set):
    """A stage that trains imported weights (pretrained_checkpoint=hf:<folder>, or a checkpoint of a run that
    started there) defaults to AdamW at the guide's learning rate; what the user set stays, with a warning for
    Muon. A resume of such a run sees the same lineage, so it gets the same defaults."""
    changed = []
    # only a stage whose own recipe is Muon's changes: Dolly's default (AdamW at 3e-5) is already a finetuning one
    if c.get("optimizer") != PRETRAINED_OPTIMIZER and "optimizer" not in user_set:
        for key, value in (("optimizer", PRETRAINED_OPTIMIZER), ("max_lr", PRETRAINED_MAX_LR)):
            if key not in user_set:
                changed.append(f"{key}={value} (the stage's default is {c[key]!r})")
                g[key] = c[key] = value
    if changed:
        print0(f"starting from Hugging Face weights: {', '.join(changed)}, as the 8 GB guide finetunes SmolLM2; "
               f"pass --optimizer / --max_lr to choose otherwise")
    if c.get("optimizer") == "muon":
        print0("warning: optimizer=muon on pretrained Hugging Face weights: Muon's rates suit training from scratch "
               "and can wreck pretrained weights within a few steps; --optimizer=adamw --max_lr=4e-5 is the safe choice")


# the two keys of a pair that say the same thing (common.pick_pair): only one of them can be the user's
_PAIRED = {"warmup_steps": "warmup_ratio", "warmup_ratio": "warmup_steps", "min_lr": "final_lr_frac",
           "final_lr_frac": "min_lr"}


def _keep_recipe(g: dict, c: dict, user_set: set, ckpt: dict):
    """A resumed run goes on with its own schedule (RECIPE_KEYS): the checkpoint's value of each key this command
    line does not set wins over the script's default, and a key the run's own command line set stays the user's
    (checkpoints record user_set), so pick_pair, the warmup shrink and the weight-decay horizon decide as they did.
    A checkpoint from before a setting existed ran without it, which is defaults.py's value (off). The learning
    rates follow this run, as the guides' fixes need. Returns the keys set only to spell out an old checkpoint's
    schedule in today's terms."""
    import defaults
    was, was_user, kept, legacy = ckpt.get("config") or {}, ckpt.get("user_set"), [], set()
    for k in RECIPE_KEYS:
        if k not in c or k in user_set:
            continue
        old = was.get(k, getattr(defaults, k, c[k]))
        if old != c[k]:
            kept.append(f"{k}={old!r} (the script's default is now {c[k]!r})")
            g[k] = c[k] = old
        if was_user is not None and k in was_user and _PAIRED.get(k) not in user_set:
            user_set.add(k)
    if was_user is None:
        # written before checkpoints recorded user_set: its warmup was taken as given (no shrink existed), and
        # wsd ended at a tenth of the peak then
        if "warmup_ratio" not in user_set:
            user_set.add("warmup_steps")
        if c.get("lr_scheduler") == "wsd" and c.get("min_lr") == -1 and c.get("final_lr_frac") == -1 and \
                "final_lr_frac" not in user_set:
            g["final_lr_frac"] = c["final_lr_frac"] = 0.1
            kept.append("final_lr_frac=0.1 (wsd's end before 5 % became its default)")
            legacy.add("final_lr_frac")
    if kept:
        print0(f"resume: the run keeps its own schedule: {', '.join(kept)}; pass --key=value to change one from "
               f"step {ckpt.get('step')} on")
    return legacy


def _check_ranges(c):
    """Values the parser accepts by type but the loop cannot use; all reported at once, before anything starts."""
    rules = [("max_lr", lambda v: v > 0, "> 0"), ("matrix_lr", lambda v: v > 0, "> 0"),
             ("log_every", lambda v: v >= 1, ">= 1"), ("weight_decay", lambda v: v >= 0, ">= 0"),
             ("min_lr", lambda v: v >= 0 or v == -1, ">= 0, or -1 for max_lr / 10 (wsd: max_lr * 0.05)"),
             ("keep_last_n_checkpoints", lambda v: v >= -1, ">= 0, or -1 to keep all"),
             ("max_nonfinite", lambda v: v >= 1, ">= 1")]
    bad = [f"{k}={c[k]} must be {want}" for k, ok, want in rules if k in c and not ok(c[k])]
    if bad:
        raise UserError("; ".join(bad))


class Trainer:
    def __init__(self, g: dict, name: str, *, init_stage=None, argv=None):
        """Parse the config and settle everything that can fail on bad input, before any process group exists,
        so a typo fails in a second on every rank alike."""
        from tokenizer import get_tokenizer
        self.name = name
        self.default_lrs = (g.get("max_lr"), g.get("matrix_lr"))  # before the overrides land in g
        self.config, self.user_set = common.load_config(with_shared_defaults(g), argv)
        c = self.c = self.config
        self.rank, _, self.world_size = common.dist_env()
        self.is_master = self.rank == 0

        _check_ranges(c)

        # --resume=<checkpoint>: that checkpoint holds everything (weights, optimizer, data position), so no
        # earlier stage is looked up, and by default the run goes on in the checkpoint's own folder
        self.resume_path = self.resume_ckpt = None
        if c["resume"]:
            if not c["checkpoint_path"]:
                raise UserError("resume=True needs --checkpoint_path=<ckpt file or run folder> (or --resume=<path>)")
            self.resume_path = resolve_checkpoint(c["checkpoint_path"], key="checkpoint_path")
            self.resume_ckpt = load_checkpoint(self.resume_path)
            _check_stage(self.resume_ckpt, self.resume_path, name)

        # where this stage starts from: an earlier stage's checkpoint (mid, sft, dolly) or, for base, scratch
        # unless pretrained_checkpoint is given; both through the one resolve_checkpoint() rule
        spec = c.get("pretrained_checkpoint", "")
        self.init_path = None
        if (spec or init_stage) and self.resume_path is None:
            notes = []
            self.init_path = resolve_checkpoint(spec, default_stage=init_stage, notes=notes)
            for note in notes:
                print0(note)
        self.init_ckpt = load_checkpoint(self.init_path) if self.init_path else None

        # the run folder: <stage dir>/<run_name>; a later stage keeps the name of the run it starts from (d12 -> d12)
        if self.resume_path is not None:
            default_run = self.resume_path.parent.name
        else:
            default_run = ((self.init_path.name if self.init_path.is_dir() else self.init_path.parent.name)
                           if self.init_path and init_stage else f"d{c.get('depth', 0)}")  # a folder: hf:<folder>
        self.run_name = c.get("run_name") or default_run
        if c.get("out_dir"):
            self.ckpt_dir = Path(c["out_dir"])
        elif self.resume_path is not None and not c.get("run_name"):
            self.ckpt_dir = self.resume_path.parent
        else:
            self.ckpt_dir = common.base_dir() / STAGE_DIRS[name] / self.run_name
        self.ckpts = CheckpointManager(self.ckpt_dir, keep_last_n=c["keep_last_n_checkpoints"],
                                       permanent=c["permanent_checkpoints"], keep_best_n=c.get("keep_best_n", 0),
                                       is_master=self.is_master)
        if self.resume_path is not None:
            existing = next(d for d in (self.ckpt_dir, *self.ckpt_dir.parents) if d.exists())
            if self.is_master and not os.access(existing, os.W_OK):
                raise UserError(f"{self.ckpt_dir} is not writable, so this run cannot save its checkpoints there; "
                                f"resume into a new folder with --run_name=<new name> (or --out_dir=<folder>)")
            if self.ckpt_dir.resolve() != self.resume_path.parent.resolve() and self.ckpts.latest() is not None:
                raise UserError(f"{self.ckpt_dir} already holds checkpoints of another run (newest: "
                                f"{self.ckpts.latest().name}); resuming {self.resume_path} there would mix the two. "
                                f"Leave out --run_name/--out_dir to go on in {self.resume_path.parent}, or pick a new "
                                f"--run_name")
        elif c["auto_resume"]:
            self.resume_path = self.ckpts.latest()
            if self.resume_path is None:
                print0(f"auto_resume: no complete checkpoint in {self.ckpt_dir} yet, starting a new run")
            else:
                self.resume_ckpt = load_checkpoint(self.resume_path)
                _check_stage(self.resume_ckpt, self.resume_path, name)
        elif self.ckpts.latest() is not None:
            raise UserError(f"{self.ckpt_dir} already holds checkpoints of an earlier run (newest: "
                            f"{self.ckpts.latest().name}). Continue it with --auto_resume=True, or start another run "
                            f"with --run_name=<new name>")

        # the keys an old checkpoint's schedule needs spelled out now (not a change the user made, for restore())
        self.legacy_keys = (_keep_recipe(g, c, self.user_set, self.resume_ckpt) if self.resume_ckpt is not None
                            else set())

        # the tokenizer: the one a checkpoint recorded wins (a mid run uses its base's vocabulary), unless the
        # user names one explicitly, which must then match (build_model checks)
        source, where = ((self.resume_ckpt, self.resume_path) if self.resume_ckpt is not None
                         else (self.init_ckpt, self.init_path))
        if source is not None and "tokenizer" not in self.user_set:
            self.tok = checkpoint_tokenizer(source.get("tokenizer"), where)
        else:
            self.tok = get_tokenizer(c.get("tokenizer", "") or "gpt2")
        # weights that came from Hugging Face (this stage starts there, or an earlier one did: its tokenizer is
        # the folder's) keep AdamW at a finetuning rate unless the user says otherwise
        if str(spec).startswith("hf:") or str((source or {}).get("tokenizer", {}).get("name", "")).startswith("hf:"):
            _pretrained_defaults(g, c, self.user_set)

    # ---- setup ----
    def setup(self):
        c = self.c
        self.dist = common.setup_distributed(c["device"])
        self.device = dev = self.dist.device
        self.dtype, self.dtype_reason = common.pick_dtype(dev, c["dtype"])
        self.autocast, self.scaler = common.make_autocast_and_scaler(dev, self.dtype)
        common.seed_everything(c["seed"])
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores where they exist (sm>=8.0)
            torch.backends.cudnn.allow_tf32 = True
        self.stopper = common.StopSignal()
        return self

    # ---- model ----
    def build_model(self):
        """Resume > an earlier stage's checkpoint > scratch. A loaded checkpoint gives the shape; shape keys the
        user passed explicitly must agree with it, and a different vocabulary is refused."""
        from model import GPT, GPTConfig
        from tokenizer import check_compatible
        c = self.c
        src, src_path = ((self.resume_ckpt, self.resume_path) if self.resume_ckpt is not None
                         else (self.init_ckpt, self.init_path))
        given = {k: c[k] for k in ARCH_KEYS if k in c}
        try:
            if src is None:
                cfg = GPTConfig(**given, vocab_size=self.tok.vocab_size, max_seq_len=c["max_seq_len"])
            else:
                check_compatible(src["tokenizer"], self.tok, str(src_path))
                arch = dict(src["arch"])
                trained_len = arch.pop("max_seq_len")
                mine = GPTConfig(**{**arch, **{k: v for k, v in given.items() if k in self.user_set}},
                                 max_seq_len=trained_len).arch_dict()
                check_arch(src["arch"], mine, src_path,
                           "Drop those settings (the checkpoint decides the shape), or point --pretrained_checkpoint/"
                           "--checkpoint_path at a checkpoint of that shape")
                if c["max_seq_len"] > trained_len:
                    print0(f"warning: max_seq_len={c['max_seq_len']} exceeds the {trained_len} tokens {src_path} was "
                           f"trained with; positions beyond it are new to the model and it may need more steps")
                cfg = GPTConfig(**arch, max_seq_len=c["max_seq_len"])
            model = GPT(cfg)
        except ValueError as e:
            raise UserError(f"model shape: {e}") from None
        if src is not None:
            model.load_state_dict(src["model"])
        self.init_ckpt = None  # the weights are in the model now; free the copy
        model.to(self.device)
        model.gradient_checkpointing = c.get("gradient_checkpointing", False)
        self.arch = model.config.arch_dict()
        return model

    # ---- horizon and learning rate ----
    def schedule(self, *, steps_per_epoch, default_steps, global_batch, reference_batch) -> Schedule:
        """The run's Schedule (steps, warmup, peak and final lr, Muon's matrix_lr, the scheduler) from max_steps |
        num_epochs, warmup_steps | warmup_ratio, max_lr, min_lr, lr_scaling: schedule.make_schedule."""
        sched = make_schedule(self.c, self.user_set, steps_per_epoch=steps_per_epoch, default_steps=default_steps,
                              global_batch=global_batch, reference_batch=reference_batch, default_lrs=self.default_lrs)
        if sched.note:
            print0(sched.note)
        return sched

    def loader_args(self, **more) -> dict:
        """What every loader of this run takes: the batch shape from the config, this process's share, device, seed."""
        c = self.c
        return dict(device_batch_size=c["device_batch_size"], max_seq_len=c["max_seq_len"], rank=self.rank,
                    world_size=self.world_size, device=self.device, **more)

    @property
    def ns_dtype(self):
        """Muon's Newton-Schulz dtype for this device and precision (configure_optimizers(ns_dtype=...))."""
        return common.muon_ns_dtype(self.device, self.dtype)

    # ---- the loop ----
    def fit(self, model, optimizer, train_loader, *, accum, schedule, evaluate, loss_fn=None, sample=None,
            header=None):
        """Train schedule.steps optimizer steps of `accum` micro-batches per rank, evaluating and checkpointing on
        the way. optimizer: any torch.optim.Optimizer (each group's starting lr is its peak, unless it carries a
        'base_lr'); loss_fn(model, x, y) -> summed loss (default: cross_entropy_sum); evaluate(raw_model, step) ->
        dict of metrics (val_loss drives keep_best_n); sample(raw_model) runs on rank 0 every sample_every."""
        c, raw_model = self.c, model
        if c.get("preflight"):  # will it fit, how long will it take: then stop before the first step
            import preflight
            preflight.report(model, optimizer, c=c, schedule=schedule, world_size=self.world_size, accum=accum,
                             tokens_per_step=self.tokens_per_step(accum), device=self.device, print0=print0)
            return model
        loss_fn = loss_fn or cross_entropy_sum
        for group in optimizer.param_groups:  # the schedule scales every group from its own peak
            group.setdefault("base_lr", group["lr"])
            group.setdefault("base_weight_decay", group.get("weight_decay", 0.0))
        start, tokens = self.restore(optimizer, train_loader, accum)
        if start >= schedule.steps and start > 0:
            print0(f"the checkpoint is at step {start} and max_steps={schedule.steps}: nothing left to train")
        model = self.wrap(raw_model)
        logger = self.open_log(raw_model, schedule, start, header, accum,
                               muon=any(g.get("kind") == "muon" for g in optimizer.param_groups))
        interval, keep_best = c["checkpoint_interval"], c.get("keep_best_n", 0)
        lossf, self.nonfinite = float("nan"), 0
        # Eval and checkpoint sit at the top and we run steps+1 iterations, so the final step evaluates and saves
        # through the same code (nanochat / llm.c layout). A checkpoint at `step` holds the state after `step`
        # optimizer updates, so resuming continues with iteration `step` exactly.
        logger.print(f"training {schedule.steps} steps from step {start}")
        for step in range(start, schedule.steps + 1):
            last = step == schedule.steps
            stop = self.stopper.should_stop(self.device)
            ckpt_now = step > start and (last or stop or (interval > 0 and step % interval == 0))
            val = None
            # with keep_best_n every checkpoint needs a score, so it is evaluated too; a resumed run does not
            # redo the eval of its first step: the run that saved the checkpoint did it, before saving
            if (step > start or start == 0) and (
                    (c["eval_every"] > 0 and step % c["eval_every"] == 0) or last or (keep_best > 0 and ckpt_now)):
                val = evaluate(raw_model, step)
                logger.print(f"step {step} | " + " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in val.items()))
                logger.record("eval", step, val)
            if sample is not None and c.get("sample_every", -1) > 0 and step > 0 and self.is_master and (
                    step % c["sample_every"] == 0 or last):
                sample(raw_model)
            if ckpt_now:
                self.save(raw_model, optimizer, train_loader, step, schedule.steps, lossf, val, tokens)
            if last or stop:
                if stop and not last:
                    logger.print(f"{self.stopper.requested} received: stopped at step {step}; "
                                 f"resume with --auto_resume=True")
                break

            t0 = time.time()
            set_hyperparameters(optimizer, schedule, step)
            lossf, n_tokens = self.forward_backward(model, train_loader, accum, loss_fn)
            grad_norm, skipped = self.optimizer_step(raw_model, optimizer, lossf, step)
            log_now = step % c["log_every"] == 0 or step == schedule.steps - 1
            # per-layer norms of the (unscaled, clipped) gradients, read before zero_grad frees them
            layer_norms = _layer_grad_norms(raw_model) if log_now and c.get("log_gradients") else {}
            optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            # a checkpoint from before the count existed: exact for fixed-size token batches (base, mid)
            tokens = step * n_tokens if tokens is None else tokens
            tokens += n_tokens
            if log_now:
                self.log_step(raw_model, step, schedule, lossf, grad_norm, skipped, dt, n_tokens, tokens, layer_norms)
        logger.close()
        return raw_model

    def restore(self, optimizer, loader, accum):
        """Put the resumed checkpoint's state (optimizer, GradScaler, loader position, RNG) in place; returns
        (step to start at, tokens trained so far). (0, 0) for a new run."""
        ck = self.resume_ckpt
        if ck is None:
            return 0, 0
        c = self.c
        # load_state_dict brings back the saved hyperparameters too; the ones in force are this run's config
        # (a lower max_lr after a divergence must take effect), so they are put back on top of the state
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        saved = ck["config"].get("optimizer", "?") if isinstance(ck.get("config"), dict) else "?"
        try:
            optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{self.resume_path} holds the state of another optimizer (--optimizer={saved}; this "
                            f"run: --optimizer={c.get('optimizer')}, a {type(optimizer).__name__}): {e}. Resume with "
                            f"--optimizer={saved} (and the optimizer the script built then), or start a new run from "
                            f"it with --pretrained_checkpoint={self.resume_path}") from None
        changed = set()
        was = ck.get("config") or {}
        for group, hyper in zip(optimizer.param_groups, fresh):
            # keys the saved group lacks (another torch version's defaults) are not changes the user made, nor
            # the ones the schedule sets at every step (set_hyperparameters)
            changed |= {k for k, v in hyper.items() if k not in SCHEDULED and k in group and group[k] != v}
            group.update(hyper)
        differs = [k for k in ("max_lr", "matrix_lr", "lr_scaling", *RECIPE_KEYS)
                   if k in was and k in c and was[k] != c[k] and k not in self.legacy_keys]
        changed |= set(differs) & set(RECIPE_KEYS)
        if changed:
            names = sorted({_HYPER_NAMES.get(k, k) for k in changed})
            diffs = [f"{k} {was[k]} -> {c[k]}" for k in differs]
            print0(f"resume: {', '.join(names)} differ from the checkpoint's"
                   f"{' (' + ', '.join(diffs) + ')' if diffs else ''}; this run's values apply from step "
                   f"{ck['step']} on (to keep the run's, pass them as it had them: --key=<old value>)")
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        loader.load_state_dict(ck["loader"])
        set_rng_state(ck["rng"])
        start = ck["step"]
        # rolled back to an older checkpoint of this folder: the newer ones belong to the abandoned
        # continuation; moved aside (not deleted) so rotation keeps this run's saves and auto_resume follows it
        aside = self.ckpts.set_aside_after(start)
        if aside is not None:
            print0(f"resume from step {start}: the newer checkpoints of this folder were moved to {aside}")
        common.barrier()
        if ck.get("world_size") != self.world_size:
            print0(f"resuming a {ck.get('world_size')}-process checkpoint on {self.world_size} process(es): the "
                   f"data stream and global batch are unchanged, gradient accumulation is now {accum}")
        self.resume_ckpt = None  # in place now; free the copy
        return start, ck.get("tokens")

    def wrap(self, model):
        """torch.compile (where it works) and DDP around the model; the raw model stays what we save."""
        c, dev = self.c, self.device
        if c["compile"] if c["compile"] is not None else common.compile_default(dev):
            model = common.try_compile(model, dev, self.autocast, c["device_batch_size"], c["max_seq_len"])
        if self.dist.ddp:
            model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        return model

    def tokens_per_step(self, accum) -> int:
        """Tokens of one optimizer step over all ranks; for examples (SFT, Dolly) at most, every one max_seq_len."""
        c = self.c
        if "target_examples_per_step" in c:
            return c["target_examples_per_step"] * c["max_seq_len"]
        return c["device_batch_size"] * c["max_seq_len"] * self.world_size * accum

    def describe_batch(self, accum) -> str:
        """The header's batch line: tokens per step (base, mid) or examples per step (SFT: conversations, Dolly:
        rows), and how it is made of sequences, GPUs and accumulation."""
        c, w = self.c, self.world_size
        if "target_examples_per_step" in c:
            unit = {"sft": "conversations"}.get(self.name, "rows")
            return (f"{c['target_examples_per_step']} {unit}/step = {c['device_batch_size']} x {w} GPUs x "
                    f"{accum} accumulation")
        total = self.tokens_per_step(accum)
        return (f"{total:,} tokens/step = {c['device_batch_size']} seqs x {c['max_seq_len']} tokens x {w} GPUs x "
                f"{accum} accumulation")

    def open_log(self, model, schedule, start, header, accum, muon):
        c, dev = self.c, self.device
        self.flops_per_token = model.estimate_flops_per_token()
        self.peak_flops = common.peak_flops(common.device_name(dev), self.dtype, c.get("peak_flops"))
        self.logger = common.RunLogger(
            self.dist, c.get("log_dir") or self.ckpt_dir, c, run_name=self.run_name, wandb_log=c["wandb_log"],
            wandb_project=c["wandb_project"], resume_step=start or None,
            header={"stage": self.name, "device": common.device_name(dev), "world_size": self.world_size,
                    "dtype": f"{self.dtype} ({self.dtype_reason})", "tokenizer": self.tok.describe(),
                    "parameters": f"{model.num_params():,}", "flops/token": f"{self.flops_per_token:.3e}",
                    "batch": self.describe_batch(accum), **(header or {}), "horizon": schedule.describe(muon),
                    "checkpoints": str(self.ckpt_dir),
                    "starts from": (f"{self.resume_path} (resume, step {start})" if self.resume_path
                                    else str(self.init_path or "scratch"))})
        return self.logger

    def save(self, model, optimizer, loader, step, steps, last_loss, val, tokens):
        if self.nonfinite:  # never checkpoint in a run of non-finite steps: rotation would delete the good ones
            self.logger.print(f"step {step}: the last {self.nonfinite} step(s) were not finite, checkpoint skipped "
                              f"(the last good one is kept)")
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None, "step": step,
                 "config": self.c, "user_set": sorted(self.user_set), "arch": self.arch,
                 "tokenizer": self.tok.describe(), "stage": self.name, "world_size": self.world_size,
                 "rng": rng_state(), "loader": loader.state_dict(), "tokens": tokens}
        meta = {"stage": self.name, "loss": last_loss, "final": step == steps, "world_size": self.world_size,
                "arch": self.arch, **(val or {})}
        self.ckpts.save(step, state, meta)
        self.logger.print(f"saved checkpoint {self.ckpt_dir}/ckpt_{step:06d}.pt")

    def forward_backward(self, model, loader, accum, loss_fn):
        """Forward/backward over `accum` micro-batches; returns (loss of the step, tokens processed on all ranks).

        The loss of a step is the mean over ALL its trained tokens (targets != -1) across micro-batches and ranks.
        We count them first, then each micro-batch contributes loss_fn's sum / total: so a micro-batch with no
        trained token adds exactly zero (never a NaN), and 1 process with accumulation trains exactly like N
        processes. DDP averages gradients over ranks, hence the factor world_size.
        Gradients sync only on the last micro-step (no_sync): PCIe-only T4 boxes otherwise spend more time
        all-reducing than computing."""
        batches = [loader.next_batch() for _ in range(accum)]
        counts = torch.tensor([float(sum((y != -1).sum().item() for _, y in batches)),
                               float(sum(y.numel() for _, y in batches))], device=self.device)
        common.all_reduce(counts)
        n_target, n_tokens = counts.tolist()
        norm = self.world_size / max(n_target, 1.0)
        loss_sum = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(batches):
            with (model.no_sync() if self.dist.ddp and i < accum - 1 else nullcontext()):
                with self.autocast:
                    loss = loss_fn(model, x, y) * norm
                loss_sum += loss.detach().float()
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        loss_sum = common.all_reduce(loss_sum) / self.world_size
        return loss_sum.item(), n_tokens

    def optimizer_step(self, model, optimizer, lossf, step):
        """Unscale (fp16), clip, and step, unless the loss or the gradients are not finite; returns (gradient norm,
        why the update was skipped or None). max_nonfinite such steps in a row stop the run."""
        c, scaler = self.c, self.scaler
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip and report the true gradient norm, not the scaled one
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), c["grad_clip"] if c["grad_clip"] > 0 else float("inf")).item()
        # fp16: the GradScaler itself skips steps whose gradients overflowed (normal, logged); without a scaler a
        # non-finite gradient norm means the same thing and must not reach the weights either
        if math.isfinite(lossf) and (scaler is not None or math.isfinite(grad_norm)):
            self.nonfinite = 0
            if scaler is None:
                optimizer.step()
                return grad_norm, None
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skips the update itself when the fp16 gradients overflowed
            scaler.update()
            # the scale backs off exactly when a step was skipped
            return grad_norm, "fp16 overflow" if scaler.get_scale() < scale else None
        # the weights are not touched: a non-finite loss would turn them into NaN for good
        self.nonfinite += 1
        if scaler is not None:
            scaler.update()  # record the overflow so the scale backs off
        if self.nonfinite >= c.get("max_nonfinite", 10):
            raise UserError(
                f"the loss or its gradient was not finite for {self.nonfinite} steps in a row (step {step}); the "
                f"weights were not updated and the last good checkpoint in {self.ckpt_dir} is intact. Lower "
                f"--max_lr, raise --warmup_steps, or try --dtype=float32 to find the cause, then resume with "
                f"--auto_resume=True")
        return grad_norm, "non-finite loss" if not math.isfinite(lossf) else "non-finite gradient"

    def log_step(self, model, step, schedule, lossf, grad_norm, skipped, dt, n_tokens, tokens, extra):
        """The step's line (and metrics.jsonl record): tok/s and MFU over all ranks, memory, and what was odd."""
        tok_per_s = n_tokens / dt
        mfu = self.flops_per_token * tok_per_s / (self.peak_flops * self.world_size) if self.peak_flops else None
        extra = {**({"skipped": skipped} if skipped else {}),
                 **({"scale": f"{self.scaler.get_scale():.0f}"} if self.scaler is not None else {}), **extra}
        self.logger.step(step, schedule.steps, loss=lossf, lr=schedule.lr(step), dt=dt, tok_per_s=tok_per_s, mfu=mfu,
                         grad_norm=grad_norm, mem=common.memory_stats(self.device), tokens=int(tokens),
                         extra=extra or None)


def _layer_grad_norms(model):
    """Per-layer gradient norms (log_gradients=True): the first thing to look at when a run diverges."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None and name.endswith("weight"):
            out[f"gn/{name.removesuffix('.weight')}"] = round(p.grad.float().norm().item(), 4)
    return out
