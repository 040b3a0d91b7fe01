"""training.py: what every stage script shares, from its parsed globals to its last checkpoint.

A stage script (train_base.py, train_mid.py, train_sft.py, finetune_dolly.py) keeps only what differs per
stage — its defaults, its data and what it evaluates — and hands the rest to one Stage object:

    st = Stage(globals(), "mid", init_stage="base")   # config, checks, run folder, resume source: no process group yet
    st.setup()                                         # DDP, device, precision, seed
    model = st.build_model()                           # from scratch, from an earlier stage, or resumed
    st.fit(model, train_loader, accum=..., steps=..., evaluate=...)

The loop in fit() is the only training loop in the repo, so exact resume, no_sync accumulation, the
GradScaler path, the non-finite guard, SIGTERM handling and the log line are written (and tested) once.
"""
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from checkpoint import (STAGE_DIRS, CheckpointManager, check_arch, load_checkpoint, resolve_checkpoint, rng_state,
                        set_rng_state)
from common import UserError, print0

# the globals a stage script may declare to shape a model from scratch (base); later stages take the shape
# from the checkpoint they start from, and only check these when the user passes them explicitly
ARCH_KEYS = ("depth", "n_embd", "n_head", "n_kv_head")


# optimizer group keys -> the settings a user changes to move them
_HYPER_NAMES = {"base_lr": "learning rates (max_lr / matrix_lr / lr_scaling)", "weight_decay": "weight_decay",
                "betas": "AdamW betas", "momentum": "Muon momentum"}


def _check_stage(ckpt, path, name):
    other = ckpt.get("stage")
    if other and other != name:
        raise UserError(f"{path} is a {other} checkpoint; resuming continues a {name} run. To start {name} from it, "
                        f"pass --pretrained_checkpoint={path} instead")


def _sum_dtype(device):
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _check_ranges(c):
    """Values the parser accepts by type but the loop cannot use; all reported at once, before anything starts."""
    rules = [("max_lr", lambda v: v > 0, "> 0"), ("matrix_lr", lambda v: v > 0, "> 0"),
             ("log_every", lambda v: v >= 1, ">= 1"), ("weight_decay", lambda v: v >= 0, ">= 0"),
             ("min_lr", lambda v: v >= 0 or v == -1, ">= 0, or -1 for max_lr / 10"),
             ("keep_last_n_checkpoints", lambda v: v >= -1, ">= 0, or -1 to keep all"),
             ("max_nonfinite", lambda v: v >= 1, ">= 1")]
    bad = [f"{k}={c[k]} must be {want}" for k, ok, want in rules if k in c and not ok(c[k])]
    if bad:
        raise UserError("; ".join(bad))


class Stage:
    def __init__(self, g: dict, name: str, *, init_stage=None, argv=None):
        """Parse the config and settle everything that can fail on bad input, before any process group exists,
        so a typo fails in a second on every rank alike."""
        from tokenizer import get_tokenizer
        self.name, self.init_stage = name, init_stage
        self.default_lrs = (g.get("max_lr"), g.get("matrix_lr"))  # before the overrides land in g
        self.config, self.user_set = common.load_config(g, argv)
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
            self.init_path = resolve_checkpoint(spec, default_stage=init_stage)
        self.init_ckpt = load_checkpoint(self.init_path) if self.init_path else None

        # the run folder: <stage dir>/<run_name>; a later stage keeps the name of the run it starts from (d12 -> d12)
        if self.resume_path is not None:
            default_run = self.resume_path.parent.name
        else:
            default_run = self.init_path.parent.name if self.init_path and init_stage else f"d{c.get('depth', 0)}"
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

        # the tokenizer: the one a checkpoint recorded wins (a mid run uses its base's vocabulary), unless the
        # user names one explicitly, which must then match
        source = self.resume_ckpt or self.init_ckpt
        tok_spec = c.get("tokenizer", "")
        if source is not None and "tokenizer" not in self.user_set:
            tok_spec = source["tokenizer"]["name"]
        self.tok = get_tokenizer(tok_spec or "gpt2")

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
    def schedule(self, model, *, steps_per_epoch, default_steps, global_batch, reference_batch):
        """(steps, warmup, peak_lr, final_lr) from max_steps|num_epochs, warmup_steps|warmup_ratio, lr_scaling."""
        c = self.c
        steps, warmup = common.resolve_schedule(
            max_steps=c["max_steps"], num_epochs=c.get("num_epochs", -1), warmup_steps=c["warmup_steps"],
            warmup_ratio=c["warmup_ratio"], user_set=self.user_set, steps_per_epoch=steps_per_epoch,
            default_steps=default_steps)
        peak = common.scale_lr(c["max_lr"], mode=c["lr_scaling"], global_batch=global_batch,
                               reference_batch=c["lr_reference_batch"] if c["lr_reference_batch"] > 0 else reference_batch)
        final = c["min_lr"] if c["min_lr"] >= 0 else peak / 10
        return steps, warmup, peak, final

    def matrix_lr(self, peak_lr):
        """Muon's peak rate. It follows max_lr: a user who lowers max_lr (the guides' "loss not falling: lower
        the learning rate") lowers every rate in the model in proportion, unless matrix_lr is set as well; and
        lr_scaling scales both alike."""
        c = self.c
        default_max, default_matrix = self.default_lrs
        matrix = c.get("matrix_lr", default_matrix or 0.02)
        if "max_lr" in self.user_set and "matrix_lr" not in self.user_set and default_max:
            matrix *= c["max_lr"] / default_max
        return matrix * peak_lr / c["max_lr"]

    # ---- evaluation helper ----
    @torch.no_grad()
    def eval_loss(self, model, loader, n_batches, token_bytes=None):
        """Mean loss over the trained tokens of n_batches from `loader` (reset first, so every eval sees the same
        data), summed over ranks; plus bits-per-byte when token_bytes is given."""
        was_training = model.training
        model.eval()
        loader.reset()
        # loss (nats), tokens, bytes; float64 so millions of tokens sum exactly (MPS has no float64: float32 there)
        sums = torch.zeros(3, dtype=_sum_dtype(self.device), device=self.device)
        for _ in range(max(1, n_batches)):
            x, y = loader.next_batch()
            with self.autocast:
                losses = model(x, y, reduction="none").float()
            if token_bytes is None:
                counted = y != -1
                nbytes = counted
            else:
                nbytes = token_bytes[y.clamp(min=0)] * (y != -1)
                counted = nbytes > 0  # specials (bos) carry no bytes: left out of bpb, as nanochat does
            sums += torch.stack([t.sum().to(sums.dtype) for t in (losses * counted, counted, nbytes)])
        common.all_reduce(sums)
        model.train(was_training)
        if sums[1] == 0:
            # nothing to average: every validation example lost its trained tokens (an SFT reply cut off by
            # max_seq_len, say). nan, not 0.0, so it can never pass for a perfect model or become the "best" one
            print0(f"warning: the {n_batches} validation batch(es) hold no trained token, so there is no val loss "
                   f"(nan). Raise max_seq_len, or check that the validation data has assistant replies")
            out = {"val_loss": float("nan")}
        else:
            out = {"val_loss": (sums[0] / sums[1]).item()}
        if token_bytes is not None:
            out["val_bpb"] = (sums[0] / (math.log(2) * sums[2])).item() if sums[2] > 0 else float("nan")
        return out

    @torch.no_grad()
    def task_accuracy(self, model, items, max_new_tokens=64):
        """Exact-match accuracy of greedy answers: items are (task, messages) whose last message is the
        reference answer. Every rank answers a share; the counts are summed over ranks. Returns
        {'acc_<task>': ..., 'acc': overall}."""
        from conversations import check_answer
        from engine import consume, generate_stream, stop_ids_for
        from tokenizer import render_for_completion
        tasks = sorted({t for t, _ in items})
        counts = torch.zeros(len(tasks), 2, dtype=_sum_dtype(self.device), device=self.device)  # correct, total
        was_training = model.training
        model.eval()
        limit = model.config.max_seq_len
        for i in range(self.rank, len(items), self.world_size):
            task, messages = items[i]
            try:
                ids = render_for_completion(self.tok, messages[:-1], max_seq_len=limit - max_new_tokens)
            except UserError:
                continue  # a prompt too long for the model: not answerable, not counted
            out = []
            consume(generate_stream(model, self.tok, ids, max_tokens=max_new_tokens, temperature=0.0,
                                    stop_ids=stop_ids_for(self.tok, True), autocast=self.autocast), out.append)
            k = tasks.index(task)
            counts[k, 0] += float(check_answer(task, messages, self.tok.decode(out)))
            counts[k, 1] += 1
        common.all_reduce(counts)
        model.train(was_training)
        # a task none of whose prompts fit in max_seq_len is left out rather than reported as 0 %
        out = {f"acc_{t}": (counts[k, 0] / counts[k, 1]).item() for k, t in enumerate(tasks) if counts[k, 1] > 0}
        out["acc"] = (counts[:, 0].sum() / counts[:, 1].sum().clamp(min=1)).item()
        return out

    # ---- the loop ----
    def fit(self, model, train_loader, *, accum, steps, warmup, peak_lr, final_lr, evaluate, sample=None,
            header=None):
        """Train `steps` optimizer steps of `accum` micro-batches per rank, evaluating and checkpointing on the way.
        evaluate(raw_model, step) -> dict of metrics (val_loss drives keep_best_n); sample(raw_model) runs on rank 0."""
        c, dev, scaler, dist_info = self.c, self.device, self.scaler, self.dist
        raw_model = model
        optim = raw_model.configure_optimizers(optimizer=c["optimizer"], max_lr=peak_lr,
                                               matrix_lr=self.matrix_lr(peak_lr),
                                               weight_decay=c["weight_decay"],
                                               ns_dtype=common.muon_ns_dtype(dev, self.dtype))
        start_step = 0
        ck = self.resume_ckpt
        if ck is not None:
            # load_state_dict brings back the saved hyperparameters too; the ones in force are this run's config
            # (a lower max_lr after a divergence must take effect), so they are put back on top of the state
            fresh = [{k: v for k, v in g.items() if k != "params"} for g in optim.param_groups]
            saved = ck["config"].get("optimizer", "?") if isinstance(ck.get("config"), dict) else "?"
            try:
                optim.load_state_dict(ck["optimizer"])
            except (ValueError, KeyError) as e:
                raise UserError(f"{self.resume_path} holds the state of another optimizer ({saved}; this run: "
                                f"--optimizer={c['optimizer']}): {e}. Resume with --optimizer={saved}, or start a new "
                                f"run from it with --pretrained_checkpoint={self.resume_path}") from None
            changed = set()
            for group, hyper in zip(optim.param_groups, fresh):
                # keys the saved group lacks (another torch version's defaults) are not changes the user made
                changed |= {k for k, v in hyper.items() if k != "lr" and k in group and group[k] != v}
                group.update(hyper)
            if changed:
                names = sorted({_HYPER_NAMES.get(k, k) for k in changed})
                was = ck.get("config") or {}
                diffs = [f"{k} {was[k]} -> {c[k]}" for k in ("max_lr", "matrix_lr", "lr_scaling", "weight_decay",
                                                              "muon_momentum") if k in was and k in c and was[k] != c[k]]
                print0(f"resume: {', '.join(names)} differ from the checkpoint's"
                       f"{' (' + ', '.join(diffs) + ')' if diffs else ''}; this run's values apply from step "
                       f"{ck['step']} on (pass the original run's flags again to keep its values)")
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            train_loader.load_state_dict(ck["loader"])
            set_rng_state(ck["rng"])
            start_step = ck["step"]
            # rolled back to an older checkpoint of this folder: the newer ones belong to the abandoned
            # continuation; moved aside (not deleted) so rotation keeps this run's saves and auto_resume follows it
            aside = self.ckpts.set_aside_after(start_step)
            if aside is not None:
                print0(f"resume from step {start_step}: the newer checkpoints of this folder were moved to {aside}")
            common.barrier()
            if ck.get("world_size") != self.world_size:
                print0(f"resuming a {ck.get('world_size')}-process checkpoint on {self.world_size} process(es): the "
                       f"data stream and global batch are unchanged, gradient accumulation is now {accum}")
            self.resume_ckpt = ck = None
        if start_step >= steps and start_step > 0:
            print0(f"the checkpoint is at step {start_step} and max_steps={steps}: nothing left to train")

        use_compile = c["compile"] if c["compile"] is not None else common.compile_default(dev)
        if use_compile:
            model = common.try_compile(model, dev, self.autocast, c["device_batch_size"], c["max_seq_len"])
        if dist_info.ddp:
            model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)

        num_params, flops_per_token = raw_model.num_params(), raw_model.estimate_flops_per_token()
        logger = self.logger = common.RunLogger(
            dist_info, c.get("log_dir") or self.ckpt_dir, c, run_name=self.run_name, wandb_log=c["wandb_log"],
            wandb_project=c["wandb_project"], resume_step=start_step or None,
            header={"stage": self.name, "device": common.device_name(dev), "world_size": self.world_size,
                    "dtype": f"{self.dtype} ({self.dtype_reason})", "tokenizer": self.tok.describe(),
                    "parameters": f"{num_params:,}", "flops/token": f"{flops_per_token:.3e}", **(header or {}),
                    "horizon": f"{steps} steps, warmup {warmup}, lr {peak_lr:g} -> {final_lr:g} ({c['lr_scheduler']})"
                               + (f", Muon matrix_lr {self.matrix_lr(peak_lr):g}" if c["optimizer"] == "muon" else ""),
                    "checkpoints": str(self.ckpt_dir),
                    "starts from": (f"{self.resume_path} (resume, step {start_step})" if self.resume_path
                                    else str(self.init_path or "scratch"))})
        peak = common.peak_flops(common.device_name(dev), self.dtype, c.get("peak_flops"))

        def save(step, last_loss, val):
            state = {"model": raw_model.state_dict(), "optimizer": optim.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None, "step": step,
                     "config": c, "arch": self.arch, "tokenizer": self.tok.describe(), "stage": self.name,
                     "world_size": self.world_size, "rng": rng_state(), "loader": train_loader.state_dict()}
            meta = {"stage": self.name, "loss": last_loss, "final": step == steps, "world_size": self.world_size,
                    "arch": self.arch, **(val or {})}
            self.ckpts.save(step, state, meta)
            logger.print(f"saved checkpoint {self.ckpt_dir}/ckpt_{step:06d}.pt")

        # Eval and checkpoint sit at the top and we run steps+1 iterations, so the final step evaluates and saves
        # through the same code (nanochat / llm.c layout). A checkpoint at `step` holds the state after `step`
        # optimizer updates, so resuming continues with iteration `step` exactly.
        logger.print(f"training {steps} steps from step {start_step}")
        interval, keep_best = c["checkpoint_interval"], c.get("keep_best_n", 0)
        lossf, nonfinite = float("nan"), 0
        for step in range(start_step, steps + 1):
            last = step == steps
            stop = self.stopper.should_stop(dev)
            ckpt_now = step > start_step and (last or stop or (interval > 0 and step % interval == 0))
            val = None
            # with keep_best_n every checkpoint needs a score, so it is evaluated too
            # a resumed run does not redo the eval of its first step: the run that saved the checkpoint did it
            # (and its record is kept in metrics.jsonl), before saving
            redo = step > start_step or start_step == 0
            if redo and ((c["eval_every"] > 0 and step % c["eval_every"] == 0) or last or (keep_best > 0 and ckpt_now)):
                val = evaluate(raw_model, step)
                logger.print(f"step {step} | " + " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in val.items()))
                logger.record("eval", step, val)
            if sample is not None and c.get("sample_every", -1) > 0 and step > 0 and dist_info.is_master and (
                    step % c["sample_every"] == 0 or last):
                sample(raw_model)
            if ckpt_now:
                if nonfinite == 0:
                    save(step, lossf, val)
                else:  # never checkpoint in a run of non-finite steps: rotation would delete the good ones
                    logger.print(f"step {step}: the last {nonfinite} step(s) were not finite, checkpoint skipped "
                                 f"(the last good one is kept)")
            if last or stop:
                if stop and not last:
                    logger.print(f"{self.stopper.requested} received: stopped at step {step}; "
                                 f"resume with --auto_resume=True")
                break

            t0 = time.time()
            lr = common.get_lr(step, max_lr=peak_lr, min_lr=final_lr, warmup_steps=warmup, max_steps=steps,
                               scheduler=c["lr_scheduler"], decay_lr=c["decay_lr"], restarts=c["lr_restarts"])
            for group in optim.param_groups:
                group["lr"] = group["base_lr"] * lr / peak_lr
            lossf, tokens = self._train_step(model, train_loader, accum)
            if scaler is not None:
                scaler.unscale_(optim)  # clip and report the true gradient norm, not the scaled one
            grad_norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), c["grad_clip"] if c["grad_clip"] > 0 else float("inf")).item()
            skipped = None
            # fp16: the GradScaler itself skips steps whose gradients overflowed (normal, logged below); without
            # a scaler a non-finite gradient norm means the same thing and must not reach the weights either
            if math.isfinite(lossf) and (scaler is not None or math.isfinite(grad_norm)):
                nonfinite = 0
                if scaler is not None:
                    scale = scaler.get_scale()
                    scaler.step(optim)  # skips the update itself when the fp16 gradients overflowed
                    scaler.update()
                    if scaler.get_scale() < scale:  # the scale backs off exactly when a step was skipped
                        skipped = "fp16 overflow"
                else:
                    optim.step()
            else:
                # the weights are not touched: a non-finite loss would turn them into NaN for good
                nonfinite = nonfinite + 1
                skipped = "non-finite loss" if not math.isfinite(lossf) else "non-finite gradient"
                if scaler is not None:
                    scaler.update()  # record the overflow so the scale backs off
                if nonfinite >= c.get("max_nonfinite", 10):
                    raise UserError(
                        f"the loss or its gradient was not finite for {nonfinite} steps in a row (step {step}); the weights were not "
                        f"updated and the last good checkpoint in {self.ckpt_dir} is intact. Lower --max_lr, raise "
                        f"--warmup_steps, or try --dtype=float32 to find the cause, then resume with --auto_resume=True")
            log_now = step % c["log_every"] == 0 or step == steps - 1
            # per-layer norms of the (unscaled, clipped) gradients, read before zero_grad frees them
            layer_norms = _layer_grad_norms(raw_model) if log_now and c.get("log_gradients") else {}
            optim.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0

            if log_now:
                tok_per_s = tokens / dt
                mfu = flops_per_token * tok_per_s / (peak * self.world_size) if peak else None
                extra = {"skipped": skipped} if skipped else {}
                if scaler is not None:
                    extra["scale"] = f"{scaler.get_scale():.0f}"
                extra.update(layer_norms)
                logger.step(step, steps, loss=lossf, lr=lr, dt=dt, tok_per_s=tok_per_s, mfu=mfu, grad_norm=grad_norm,
                            mem=common.memory_stats(dev), extra=extra or None)
        logger.close()
        return raw_model

    def _train_step(self, model, loader, accum):
        """Forward/backward over `accum` micro-batches; returns (loss of the step, tokens processed on all ranks).

        The loss of a step is the mean over ALL its trained tokens (targets != -1) across micro-batches and ranks.
        We count them first, then each micro-batch contributes sum(token losses) / total: so a micro-batch with no
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
            sync = i == accum - 1
            with (model.no_sync() if self.dist.ddp and not sync else nullcontext()):
                with self.autocast:
                    loss = model(x, y, reduction="sum") * norm
                loss_sum += loss.detach()
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        loss_sum = common.all_reduce(loss_sum) / self.world_size
        return loss_sum.item(), n_tokens


def _layer_grad_norms(model):
    """Per-layer gradient norms (log_gradients=True): the first thing to look at when a run diverges."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None and name.endswith("weight"):
            out[f"gn/{name.removesuffix('.weight')}"] = round(p.grad.float().norm().item(), 4)
    return out
