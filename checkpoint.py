"""checkpoint.py: the checkpoint manager every stage uses.

A run directory holds `ckpt_<step>.pt` (everything needed to continue: model, optimizer, GradScaler, step,
config, world size, RNG states, global loader position), `ckpt_<step>.json` (a small human-readable
summary, written after the .pt is in place, so it doubles as the "complete" marker) and `LATEST`
(the name of the newest complete checkpoint, written last). The protocol is llm.c's DONE-marker one:
write to a temp name, rename, then mark. A kill at any moment leaves the previous checkpoint loadable,
and resume never trusts a file without its marker.
"""
import json
import os
import random
import re
import shutil
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from common import base_dir, barrier
from configurator import UserError

# stage name -> folder under $NANOCHAT_BASE_DIR, as the T4 guide documents them
STAGE_DIRS = {"base": "checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
              "dolly": "dolly_checkpoints"}
STAGE_TITLES = {"base": "base", "mid": "mid", "sft": "SFT", "dolly": "Dolly"}  # how messages name them
_CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
_SET_ASIDE = "SET_ASIDE"  # "<step>" while newer checkpoints are being moved aside (see set_aside_after)


def unwrap(model):
    """The plain nn.Module under DDP (.module) and torch.compile (._orig_mod): saving the unwrapped module
    is what keeps `module.` / `_orig_mod.` prefixes out of our checkpoints."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def strip_prefixes(state_dict: dict) -> dict:
    """Checkpoints from elsewhere (nanoGPT saves the compiled module) may carry these prefixes."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("_orig_mod.", "module.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def rng_state() -> dict:
    """RNG states as tensors and plain ints, so the checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                    "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
          "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def atomic_write_text(path, text: str):
    """Write to <path>.tmp<pid>, fsync, rename: a kill mid-write leaves the old file, never half of the new one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # per process: ranks writing one file never share a tmp
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_steps(spec) -> set:
    """permanent_checkpoints: '500,1000' (the nano-gpt guide's form) -> {500, 1000}."""
    if isinstance(spec, (list, tuple, set)):
        return {int(s) for s in spec}
    try:
        return {int(s) for s in str(spec).replace(" ", "").split(",") if s}
    except ValueError:
        raise UserError(f"permanent_checkpoints={spec!r} must be step numbers separated by commas, "
                        f"e.g. --permanent_checkpoints=500,1000") from None


class CheckpointManager:
    """Saves, finds, loads and rotates the checkpoints of one run directory.
    Rotation keeps: the last `keep_last_n` (-1 = all), the `permanent` steps, the `keep_best_n` with the lowest
    val_loss, and the newest one (LATEST); everything else is deleted."""

    def __init__(self, run_dir, *, keep_last_n=5, permanent="", keep_best_n=0, is_master=True):
        self.dir = Path(run_dir)
        self.keep_last_n = keep_last_n
        self.permanent = parse_steps(permanent)
        self.keep_best_n = keep_best_n
        self.is_master = is_master

    # ---- finding
    def complete(self) -> dict:
        """{step: path} of checkpoints whose marker (.json) exists; a lone .pt is an unfinished write. While a
        set-aside is under way (or was cut short by a kill), the steps it moves away do not count."""
        out = self._complete_all()
        cutoff = self._set_aside_cutoff()
        return out if cutoff is None else {s: p for s, p in out.items() if s <= cutoff}

    def _complete_all(self) -> dict:
        out = {}
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                m = _CKPT_RE.match(p.name)
                if m and p.with_suffix(".json").exists():
                    out[int(m.group(1))] = p
        return dict(sorted(out.items()))

    def _set_aside_cutoff(self):
        try:
            return int((self.dir / _SET_ASIDE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def latest(self):
        """The newest complete checkpoint. The marker (.json) decides, not LATEST: a kill between the two writes
        leaves LATEST naming the one before, and that interval's work must not be thrown away. (LATEST is kept
        up to date for people and scripts; a rollback moves the newer checkpoints aside, see set_aside_after.)"""
        done = self.complete()
        return done[max(done)] if done else None

    def set_aside_after(self, step: int):
        """A run resumed from `step` while newer checkpoints of the abandoned continuation are still here (a
        rollback after a divergence): move those into a subfolder, so rotation and auto_resume see only the
        branch being trained, and nothing is deleted. Returns the folder, or None when there was nothing."""
        newer = [p for s, p in self._complete_all().items() if s > step]
        if not self.is_master:
            return None
        if not newer:
            # a set-aside killed after its last move: finish it, or this run's own saves would not count
            (self.dir / _SET_ASIDE).unlink(missing_ok=True)
            return None
        try:
            # first the intent, atomically: from here on the newer steps no longer count as complete, so a kill
            # half-way through the moves can never make the abandoned branch the newest checkpoint again
            # (the next resume finds the rest and moves it)
            atomic_write_text(self.dir / _SET_ASIDE, str(step))
            stamp = time.strftime("%Y%m%d_%H%M%S")
            for k in range(100):  # two rollbacks to the same step within a second get their own folders
                aside = self.dir / f"set_aside_after_{step:06d}_{stamp}{f'_{k}' if k else ''}"
                try:
                    aside.mkdir()
                    break
                except FileExistsError:
                    continue
            for p in newer:  # the marker first: never a marker without its data
                os.replace(p.with_suffix(".json"), aside / p.with_suffix(".json").name)
                os.replace(p, aside / p.name)
            metrics = self.dir / "metrics.jsonl"
            if metrics.exists():  # the resumed run rewrites it from `step` on; the abandoned curve stays here
                shutil.copy2(metrics, aside / metrics.name)
            atomic_write_text(self.dir / "LATEST", f"ckpt_{step:06d}.pt\n")
            (self.dir / _SET_ASIDE).unlink()
            self.write_index()
        except OSError as e:
            raise UserError(f"resuming step {step} of {self.dir}: could not move the newer checkpoints aside "
                            f"({type(e).__name__}: {e}); check the folder's permissions and free space, or resume "
                            f"into a new folder with --run_name=<new name>") from None
        return aside

    # ---- saving
    def save(self, step: int, state: dict, meta: dict):
        """Rank 0 writes; every rank meets at the barrier so no rank races ahead of a half-written file."""
        if self.is_master:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("*.tmp"):  # left by a kill during an earlier write
                stale.unlink()
            path = self.dir / f"ckpt_{step:06d}.pt"
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            atomic_write_text(path.with_suffix(".json"), json.dumps({"step": step, **meta}, indent=2))
        barrier()
        if self.is_master:
            atomic_write_text(self.dir / "LATEST", f"ckpt_{step:06d}.pt\n")
            self.rotate(keep=step)
            self.write_index()
        barrier()

    def meta(self, step):
        try:
            return json.loads((self.dir / f"ckpt_{step:06d}.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    def best(self) -> list:
        """Steps with a finite val_loss, best first."""
        scored = []
        for s in self.complete():
            v = self.meta(s).get("val_loss")
            if isinstance(v, (int, float)) and v == v:
                scored.append((v, s))
        return [s for _, s in sorted(scored)]

    def rotate(self, keep=None):
        """`keep`: the step just saved, kept whatever its rank."""
        done = self.complete()
        if not done:
            return
        steps = sorted(done)
        keep = {steps[-1], keep} | (self.permanent & set(steps))
        keep |= set(steps if self.keep_last_n < 0 else steps[len(steps) - self.keep_last_n:] if self.keep_last_n else [])
        if self.keep_best_n > 0:
            keep |= set(self.best()[:self.keep_best_n])
        for s in steps:
            if s not in keep:
                done[s].with_suffix(".json").unlink(missing_ok=True)  # unmark first: never a marker without data
                done[s].unlink(missing_ok=True)

    def write_index(self):
        """checkpoints.json: what is here and which one is best, for people and scripts."""
        best = self.best()
        index = {"latest": self.latest().name if self.latest() else None,
                 "best": {"file": f"ckpt_{best[0]:06d}.pt", "step": best[0],
                          "val_loss": self.meta(best[0]).get("val_loss"),
                          "why": "lowest validation loss among the kept checkpoints"} if best else None,
                 "checkpoints": [{"file": p.name, **{k: v for k, v in self.meta(s).items() if k in
                                                     ("step", "val_loss", "loss", "final")}}
                                 for s, p in self.complete().items()]}
        atomic_write_text(self.dir / "checkpoints.json", json.dumps(index, indent=2))


def load_checkpoint(path, key="checkpoint_path or --pretrained_checkpoint") -> dict:
    """Load with weights_only=True (no arbitrary code from a downloaded file); a clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.is_dir():  # resolve_checkpoint gives a folder only for hf:<folder>
        from hf import hf_checkpoint
        return hf_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        f"it may be truncated or not a t4chat checkpoint. Pick another with --{key}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a t4chat checkpoint (no 'model' entry); pick another with --{key}")
    ckpt["model"] = strip_prefixes(ckpt["model"])
    return ckpt


def check_arch(ckpt_arch: dict, arch: dict, path, fix: str):
    """Refuse a checkpoint of another architecture, naming every differing field."""
    from model import GPTConfig
    # a field added to GPTConfig after the checkpoint was written (tie_embeddings) is absent from its record; the
    # checkpoint was trained with that field's default, which is what GPT(GPTConfig(**arch)) rebuilds
    ckpt_arch = {**{f.name: f.default for f in fields(GPTConfig)}, **ckpt_arch}
    diff = [f"{k}={ckpt_arch.get(k)} (config says {arch.get(k)})" for k in sorted(set(ckpt_arch) | set(arch))
            if ckpt_arch.get(k) != arch.get(k)]
    if diff:
        raise UserError(f"checkpoint {path} has another architecture: {', '.join(diff)}. {fix}")


def _newest_in(where: Path):
    """The newest complete checkpoint of a run folder, or of the newest run in a stage folder; None if none."""
    if where.is_file():
        return where
    if not where.is_dir():
        return None
    found = CheckpointManager(where).latest()
    if found:
        return found
    runs = [CheckpointManager(d).latest() for d in where.iterdir() if d.is_dir()]
    runs = [(p.stat().st_mtime, p) for p in runs if p]
    return max(runs)[1] if runs else None


def resolve_checkpoint(spec: str, *, default_stage=None, key="pretrained_checkpoint", notes=None) -> Path:
    """Where a stage starts from or a face loads: a .pt file, a run directory (its newest), a stage directory (its
    newest run), or a stage name (base, mid, sft, dolly). One function for every script.

    With no spec, default_stage decides: a stage name, or a tuple of them tried in order (chat.py: sft, else
    dolly, mid, base; finetune_dolly.py: sft, else mid, else base). Taking a later one than the first appends a
    sentence saying so to `notes` (a list), for the caller to show."""
    spec = (spec or "").strip()
    if spec.startswith("hf:"):  # a Hugging Face model folder (hf.py reads it; load_checkpoint knows the folder)
        folder = Path(spec[3:]).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"--{key}={spec}: {folder} is not a Hugging Face model folder (no config.json). Download "
                            f"one first, e.g. huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir {folder}")
        return folder.resolve()
    if not spec:
        stages = (default_stage,) if isinstance(default_stage, str) else tuple(default_stage or ())
        if not stages:
            raise UserError(f"no checkpoint given; pass --{key}=<file, run dir or stage name>")
        looked = []
        for stage in stages:
            found = _newest_in(base_dir() / STAGE_DIRS[stage])
            if found is not None:
                if looked and notes is not None:
                    notes.append(f"note: no {STAGE_TITLES[stages[0]]} checkpoint under {looked[0]}; using the "
                                 f"newest {STAGE_TITLES[stage]} checkpoint instead")
                return found
            looked.append(str(base_dir() / STAGE_DIRS[stage]))
        raise UserError(f"no complete checkpoint found in {', '.join(looked)} ($NANOCHAT_BASE_DIR={base_dir()}). "
                        f"Train that stage first, or pass --{key}=<a ckpt_*.pt file, a run folder, or a stage "
                        f"name: {'|'.join(STAGE_DIRS)}>")
    where = base_dir() / STAGE_DIRS[spec] if spec in STAGE_DIRS else Path(spec).expanduser()
    found = _newest_in(where)
    if found is not None:
        return found
    looked = f"{where}" + (f" (stage '{spec}' under $NANOCHAT_BASE_DIR={base_dir()})" if spec in STAGE_DIRS else "")
    if (where / "config.json").is_file():
        raise UserError(f"{where} looks like a Hugging Face model folder: pass --{key}=hf:{spec}")
    raise UserError(f"no complete checkpoint found at {looked}. Train that stage first, or pass "
                    f"--{key}=<a ckpt_*.pt file or a run directory>")


def checkpoint_tokenizer(recorded, path):
    """The tokenizer a checkpoint recorded (tokenizer.describe()), checked against its fingerprint so a changed
    vocabulary is refused. A save_bpe() folder is recorded by its absolute path; when that path is gone or now
    holds another vocabulary (the run was moved, or copied to another machine, with its tokenizer), a folder of the
    same name beside the checkpoint, beside its run folder or beside its stage folder is taken instead, if its
    fingerprint matches."""
    from tokenizer import check_compatible, get_tokenizer
    if not isinstance(recorded, dict) or "name" not in recorded:
        raise UserError(f"{path} records no tokenizer (got {recorded!r}); it was not written by t4chat")
    name = recorded["name"]
    if name in ("gpt2", "bytes") or name.startswith("hf:"):  # hf: the Hugging Face folder the run started from
        tok = get_tokenizer(name)
        check_compatible(recorded, tok, str(path))
        return tok
    here = Path(path).resolve().parent
    candidates = [Path(name)] + [d / Path(name).name for d in (here, here.parent, here.parent.parent)]
    for folder in candidates:
        if folder.exists():
            tok = get_tokenizer(str(folder))
            if tok.fingerprint() == recorded.get("fingerprint"):
                return tok
    looked = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise UserError(f"{path} was trained with the tokenizer folder {name}; no folder with that vocabulary is at "
                    f"{looked}. Copy the tokenizer folder back to {name}, or next to the run folder")


def build_from_checkpoint(ckpt: dict, path, max_seq_len=None):
    """The model and tokenizer a checkpoint describes, with its weights. max_seq_len may differ from training's:
    it only sizes the RoPE table, which holds no weights."""
    from model import GPT, GPTConfig
    tok = checkpoint_tokenizer(ckpt.get("tokenizer"), path)
    try:
        arch = dict(ckpt["arch"])
        if max_seq_len:
            arch["max_seq_len"] = max_seq_len
        model = GPT(GPTConfig(**arch))
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        # a .pt of another program: no 'arch' entry, or weights of another shape
        raise UserError(f"checkpoint {path} cannot be loaded as a t4chat model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); pick a checkpoint written by t4chat") from None
    return model, tok


def load_model(spec: str, device="cpu", default_stage="sft", key="checkpoint"):
    """The one way to load a model for inference (chat.py, and the coming eval/serve/export faces; the training
    stages start from a checkpoint through resolve_checkpoint + load_checkpoint, which keep the optimizer state):
    (model in eval mode on `device`, tokenizer, meta) from a ckpt_*.pt, a run folder or a stage name; with no spec
    the newest checkpoint of default_stage (a stage or a tuple tried in order, see resolve_checkpoint).
    meta: path, stage (None when the file does not say), step, config, arch, and notes (sentences for the user:
    which fallback stage was taken)."""
    notes = []
    path = resolve_checkpoint(spec, default_stage=default_stage, key=key, notes=notes)
    ckpt = load_checkpoint(path, key=key)
    model, tok = build_from_checkpoint(ckpt, path)
    meta = {"path": path, "stage": ckpt.get("stage"), "step": ckpt.get("step"), "config": ckpt.get("config") or {},
            "arch": model.config.arch_dict(), "notes": notes}
    return model.to(device).eval(), tok, meta
