"""common.py: the runtime every stage script shares.

DDP set-up and tear-down, device and precision policy, batch arithmetic, MFU and memory figures, the run logger
(stdout + log file + metrics JSONL + optional wandb), stop signals and the error guard that turns bad input into
one clear message. Checkpoints live in checkpoint.py, the learning-rate schedule in schedule.py.
Nothing here reads a stage script's globals: the stages pass values in.
"""
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from configurator import UserError, apply_overrides

REPO_DIR = Path(__file__).resolve().parent


def base_dir() -> Path:
    """$NANOCHAT_BASE_DIR, default ~/.cache/nanochat (the T4 guide's layout)."""
    return Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat").expanduser()


# -----------------------------------------------------------------------------
# config


def load_config(g: dict, argv=None):
    """Apply config files and --key=value to a stage's globals.
    Returns (config, user_set): the effective config, and the keys a flag named or whose value differs from
    the script's default. We need the latter for the '-1 = unset' pairs: a default total_batch_size must give
    way when the user passes grad_accum_steps, while two values the *user* typed must agree."""
    types = g.get("_types", {})
    defaults = {k: g[k] for k in list(g) if not k.startswith("_") and (
        isinstance(g[k], (int, float, bool, str)) or (g[k] is None and k in types))}
    named = set()
    config = apply_overrides(g, sys.argv[1:] if argv is None else argv, types, named=named)
    # a key counts as the user's when a flag names it, even at its default value (--matrix_lr=0.02 pins it),
    # or when a file or flag gives it a value other than the default
    user_set = {k for k in config if k in defaults and (k in named or config[k] != defaults[k])}
    return config, user_set


def pick_pair(name_a, a, name_b, b, user_set):
    """Two settings that say the same thing, each -1 when unset. Returns which one to use: 'a', 'b' or None.
    Both given by the user is an error naming both; a script default yields to a user's value."""
    a_set, b_set = a != -1, b != -1
    if a_set and b_set:
        a_user, b_user = name_a in user_set, name_b in user_set
        if a_user and b_user:
            raise UserError(f"{name_a}={a} and {name_b}={b} both set the same thing; give only one "
                            f"(set the other to -1)")
        return "b" if b_user else "a"
    return "a" if a_set else ("b" if b_set else None)


# -----------------------------------------------------------------------------
# distributed


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    ddp: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def is_master(self):
        return self.rank == 0


def dist_env():
    """(rank, local_rank, world_size) from torchrun's environment, before any process group exists,
    so batch arithmetic can be validated before init_process_group."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    return 0, 0, 1


def is_master_env():
    return dist_env()[0] == 0


# rank-0 messages printed before a RunLogger opened train.log (the stage's warnings and notices about data and
# checkpoints come first); the logger copies them into train.log, so the log holds everything the console showed
_early_messages = []
_log_file = None  # train.log of the open RunLogger


def print0(*args, **kwargs):
    """print on rank 0 only; reads RANK from the environment so it works before DDP init too. Also goes into
    train.log: at once when a RunLogger is open, else when the next one opens."""
    if is_master_env():
        print(*args, **kwargs, flush=True)
        if "file" not in kwargs:
            msg = kwargs.get("sep", " ").join(map(str, args))
            if _log_file is not None and not _log_file.closed:
                _log_file.write(msg + "\n")
                _log_file.flush()
            elif len(_early_messages) < 1000:  # a process that never opens a log (chat.py) must not grow it
                _early_messages.append(msg)


def resolve_device(device: str) -> torch.device:
    """'auto' picks cuda when present, else cpu. An explicit device that is not there is a user error."""
    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device={device!r} is not a device torch knows; use auto, cpu or cuda") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={device} but torch sees no CUDA GPU (torch {torch.__version__}, "
                        f"CUDA build: {torch.version.cuda or 'no'}); use --device=cpu or install a CUDA build")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps but MPS is not available here; use --device=cpu")
    return d


def setup_distributed(device: str = "auto") -> Dist:
    """Start DDP under torchrun (nccl on CUDA, gloo on CPU); a plain process gets world size 1."""
    rank, local_rank, world_size = dist_env()
    dev = resolve_device(device)
    if world_size == 1:
        return Dist(device=dev)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                            f"lower --nproc_per_node or check CUDA_VISIBLE_DEVICES")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        # 30 min, not NCCL's 10: rank 0 may sample or write a checkpoint to a slow disk while the others wait
        # (the large-dataset guide's NCCL_TIMEOUT=1800); NCCL_TIMEOUT=<seconds> overrides it
        raw = os.environ.get("NCCL_TIMEOUT", "1800")
        if not raw.strip().isdigit() or int(raw) <= 0:
            raise UserError(f"NCCL_TIMEOUT={raw!r} must be a positive number of seconds, e.g. 1800")
        timeout = datetime.timedelta(seconds=int(raw))
        dist.init_process_group("nccl", device_id=dev, timeout=timeout)
    else:
        dist.init_process_group("gloo")
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, ddp=True, device=dev)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce that is a no-op outside DDP (so stage code has no `if ddp` branches).
    gloo has no AVG, so averaging is done by the callers with SUM / world_size."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int):
    """Same seed on every rank: identical init (DDP would broadcast it anyway) and identical sampling."""
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# precision

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_dtype(device: torch.device, requested: str = "auto", capability=None):
    """Returns (dtype, reason). bf16 only on CUDA compute capability >= 8.0. We never ask
    torch.cuda.is_bf16_supported(): on a T4 (sm_75) it answers True because bf16 can be *emulated*,
    which is several times slower than fp16 tensor cores."""
    if requested not in ("auto", "") and requested not in _DTYPES:
        raise UserError(f"--dtype={requested!r} is not one of auto, float32, float16, bfloat16")
    if requested not in ("auto", ""):
        dtype = _DTYPES[requested]
        reason = f"dtype={requested} requested explicitly"
        if device.type == "cuda" and dtype == torch.bfloat16:
            cap = capability or torch.cuda.get_device_capability(device)
            if cap < (8, 0):
                reason += (f" (warning: compute capability {cap[0]}.{cap[1]} has no bf16 hardware; "
                           f"it is emulated and slow, float16 is the fast path here)")
        return dtype, reason
    if device.type != "cuda":
        return torch.float32, f"{device.type}: float32 (no fast low-precision matmuls to gain from)"
    cap = capability or torch.cuda.get_device_capability(device)
    if cap >= (8, 0):
        return torch.bfloat16, f"compute capability {cap[0]}.{cap[1]} >= 8.0: bfloat16 autocast"
    return torch.float16, (f"compute capability {cap[0]}.{cap[1]} < 8.0 (e.g. T4, V100) has no bf16 hardware: "
                           f"float16 autocast + GradScaler")


def make_autocast_and_scaler(device: torch.device, dtype: torch.dtype):
    """The autocast context for forward passes and a GradScaler for fp16 (None otherwise).
    fp16 works on CPU too (CPU autocast + GradScaler('cpu')), so the T4 path is tested without a GPU."""
    if dtype == torch.float32:
        ctx = contextlib.nullcontext()
    else:
        ctx = torch.autocast(device_type=device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return ctx, scaler


def muon_ns_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """Muon's Newton-Schulz runs in bf16 only where bf16 is real hardware (sm >= 8.0); on a T4 it must not."""
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def compile_default(device: torch.device) -> bool:
    """torch.compile by default only where it works: CUDA sm >= 7.0 (Triton's floor) and not Windows."""
    return (device.type == "cuda" and sys.platform != "win32"
            and torch.cuda.get_device_capability(device) >= (7, 0))


def try_compile(model, device, autocast, batch_size, seq_len):
    """Compile and run one forward/backward on a dummy batch right away, because compile errors only surface
    on the first call. A failure falls back to eager with one line instead of killing the run."""
    try:
        compiled = torch.compile(model)
        x = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        with autocast:
            loss = compiled(x, x)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return compiled
    except Exception as e:  # Triton missing, an unsupported GPU, a compiler bug: eager still trains
        model.zero_grad(set_to_none=True)
        print0(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
               f"continuing without compile (--compile=False silences this)")
        return model


# -----------------------------------------------------------------------------
# batch arithmetic


def resolve_batch(*, total_batch_size, grad_accum_steps, device_batch_size, max_seq_len, world_size, user_set):
    """Returns (total_batch_size, grad_accum_steps), validated before any process group or compile.
    total_batch_size is in tokens per optimizer step over all ranks; grad accumulation is derived from it,
    so the global batch (and the data each step sees) does not change with the GPU count."""
    for name, v in (("device_batch_size", device_batch_size), ("max_seq_len", max_seq_len)):
        if v < 1:
            raise UserError(f"{name}={v} must be >= 1")
    per_micro = device_batch_size * max_seq_len * world_size
    which = pick_pair("total_batch_size", total_batch_size, "grad_accum_steps", grad_accum_steps, user_set)
    if which is None:
        raise UserError("set total_batch_size (tokens per step) or grad_accum_steps; both are -1")
    if which == "b":
        if grad_accum_steps < 1:
            raise UserError(f"grad_accum_steps={grad_accum_steps} must be >= 1")
        return grad_accum_steps * per_micro, grad_accum_steps
    if total_batch_size % per_micro != 0 or total_batch_size < per_micro:
        lo = max(per_micro, total_batch_size // per_micro * per_micro)
        hi = lo + per_micro if lo < total_batch_size else lo
        near = sorted({lo, hi})
        raise UserError(
            f"total_batch_size={total_batch_size} is not a multiple of device_batch_size*max_seq_len*world_size"
            f" = {device_batch_size}*{max_seq_len}*{world_size} = {per_micro} tokens, so gradient accumulation "
            f"would not be a whole number ({total_batch_size}/{per_micro} = {total_batch_size / per_micro:.3f}). "
            f"Use --total_batch_size={' or '.join(str(n) for n in near)}, or change device_batch_size/max_seq_len.")
    return total_batch_size, total_batch_size // per_micro


def resolve_examples(*, target_examples_per_step, device_batch_size, world_size):
    """SFT's batch: target_examples_per_step conversations per optimizer step over all ranks; returns the
    gradient accumulation. Checked before any process group, like resolve_batch."""
    per_micro = device_batch_size * world_size
    if device_batch_size < 1 or target_examples_per_step < 1:
        raise UserError(f"device_batch_size={device_batch_size} and target_examples_per_step="
                        f"{target_examples_per_step} must be >= 1")
    if target_examples_per_step % per_micro:
        lo = max(per_micro, target_examples_per_step // per_micro * per_micro)
        raise UserError(
            f"target_examples_per_step={target_examples_per_step} is not a multiple of device_batch_size*world_size"
            f" = {device_batch_size}*{world_size} = {per_micro}, so gradient accumulation would not be a whole "
            f"number. Use --target_examples_per_step={' or '.join(str(n) for n in sorted({lo, lo + per_micro}))}, "
            f"or change device_batch_size.")
    return target_examples_per_step // per_micro


# -----------------------------------------------------------------------------
# MFU and memory

# Dense peak FLOP/s per GPU by (name fragment, dtype). Tensor-core figures with fp32 accumulation, from the
# vendors' datasheets/whitepapers. GeForce Ampere cards run fp16/bf16 with fp32 accumulate at half the
# "marketing" rate, hence 3080/3090 below. The first fragment contained in the device name wins, so longer
# names come first ("a100" before "a10", "4060 laptop" before "4060").
PEAK_FLOPS = [
    ("h200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("h100 pcie", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("h100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("a100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("a10g", {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12}),
    ("a10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("l4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("a6000", {"bf16": 154.8e12, "fp16": 154.8e12, "fp32": 38.7e12}),
    ("v100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("t4", {"fp16": 65e12, "fp32": 8.1e12}),
    ("4090", {"bf16": 165.2e12, "fp16": 165.2e12, "fp32": 82.6e12}),
    ("4080", {"bf16": 97.5e12, "fp16": 97.5e12, "fp32": 48.7e12}),
    ("4070", {"bf16": 58.3e12, "fp16": 58.3e12, "fp32": 29.1e12}),
    ("4060 laptop", {"bf16": 46e12, "fp16": 46e12, "fp32": 11.6e12}),
    ("4060", {"bf16": 60.6e12, "fp16": 60.6e12, "fp32": 15.1e12}),
    ("3090", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),
    ("3080", {"bf16": 59.5e12, "fp16": 59.5e12, "fp32": 29.8e12}),
    ("3070", {"bf16": 40.6e12, "fp16": 40.6e12, "fp32": 20.3e12}),
    ("3060", {"bf16": 25.6e12, "fp16": 25.6e12, "fp32": 12.7e12}),
    ("2080", {"fp16": 53.8e12, "fp32": 13.4e12}),
]
_DTYPE_KEY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def peak_flops(device_name: str, dtype: torch.dtype, override=None):
    """Peak FLOP/s of one device, or None when unknown (MFU then prints n/a rather than a wrong number)."""
    if override:
        return float(override)
    name = device_name.lower()
    for fragment, table in PEAK_FLOPS:
        if fragment in name:
            return table.get(_DTYPE_KEY.get(dtype))
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def rss_gb():
    """Resident set size of this process in GB (Linux /proc; peak RSS from getrusage elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="utf-8") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, AttributeError):
        try:
            import resource
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return kb * (1 if sys.platform == "darwin" else 1024) / 1e9
        except ImportError:  # Windows
            return float("nan")


def memory_stats(device: torch.device) -> dict:
    m = {"rss_gb": rss_gb()}
    if device.type == "cuda":
        m["gpu_alloc_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        m["gpu_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
    return m


def format_memory(m: dict) -> str:
    s = f"rss {m['rss_gb']:.2f}GB"
    if "gpu_alloc_gb" in m:
        s = f"mem {m['gpu_alloc_gb']:.2f}/{m['gpu_reserved_gb']:.2f}GB " + s
    return s


# -----------------------------------------------------------------------------
# logging


def git_hash() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True,
                             text=True, timeout=5)
        h = out.stdout.strip()
        if not h:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return h + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunLogger:
    """One fixed-format line per logged step on rank 0, mirrored into `<log_dir>/train.log`; one JSON record
    per logged step and per eval in `<log_dir>/metrics.jsonl` (for plots); wandb when asked for.
    Every log starts with the config, git hash, torch version and device (modded-nanogpt's habit)."""

    def __init__(self, dist_info: Dist, log_dir, config: dict, *, run_name, wandb_log=False, wandb_project="t4chat",
                 header: dict = None, resume_step=None):
        self.master = dist_info.is_master
        self.log_file = self.metrics_file = self.wandb = None
        if not self.master:
            return
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = log_dir / "metrics.jsonl"
        if resume_step is not None:
            self._drop_metrics_from(resume_step)
        self.log_file = open(log_dir / "train.log", "a", encoding="utf-8")
        self.metrics_file = open(self.metrics_path, "a", encoding="utf-8")
        lines = [f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} run {run_name} ====",
                 f"git {git_hash()} | torch {torch.__version__} | python {sys.version.split()[0]}"]
        lines += [f"{k}: {v}" for k, v in (header or {}).items()]
        lines += ["config:"] + [f"  {k} = {config[k]!r}" for k in sorted(config)]
        self.print("\n".join(lines))
        global _log_file
        if _early_messages:  # already on the console: into the file only
            self.log_file.write("".join(f"{m}\n" for m in _early_messages))
            self.log_file.flush()
            _early_messages.clear()
        _log_file = self.log_file
        if wandb_log:
            try:
                import wandb  # lazy: a stage script must start fast and work without wandb
                self.wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")
            except Exception as e:  # a wandb outage or missing login must not kill a paid-for GPU run
                self.print(f"warning: wandb disabled ({type(e).__name__}: {e}); set WANDB_MODE=offline to log locally")

    def _drop_metrics_from(self, step):
        """A resumed run redoes the steps from its checkpoint on; drop the killed run's records for them so the
        metrics file (and its plots) has one record per step."""
        if not self.metrics_path.exists():
            return
        keep = []
        with open(self.metrics_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    # evals at the resume step itself ran before its checkpoint was saved: they stay
                    if rec.get("step", -1) < step or (rec.get("kind") == "eval" and rec.get("step") == step):
                        keep.append(line)
                except json.JSONDecodeError:
                    pass  # a line cut by a kill
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    def print(self, msg: str):
        if not self.master:
            return
        print(msg, flush=True)
        if self.log_file:
            self.log_file.write(msg + "\n")
            self.log_file.flush()

    def record(self, kind: str, step: int, metrics: dict):
        if not self.master:
            return
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **metrics}
        self.metrics_file.write(json.dumps(rec) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def step(self, step, max_steps, *, loss, lr, dt, tok_per_s, mfu, grad_norm, mem, tokens=None, extra=None):
        """tokens: processed since the run began (all ranks, across resumes), for plots of loss against tokens."""
        if not self.master:
            return
        width = len(str(max_steps))
        mfu_s = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
        line = (f"step {step:0{width}d}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | dt {1000 * dt:.0f}ms | "
                f"tok/s {tok_per_s:,.0f} | mfu {mfu_s} | gnorm {grad_norm:.3f} | {format_memory(mem)}")
        if extra:
            line += " | " + " | ".join(f"{k} {v}" for k, v in extra.items())
        self.print(line)
        self.record("train", step, {"loss": loss, "lr": lr, "dt": dt, "tok_per_s": tok_per_s, "mfu": mfu,
                                    "grad_norm": grad_norm, **({"tokens": tokens} if tokens is not None else {}),
                                    **mem, **(extra or {})})

    def close(self):
        global _log_file
        for f in (self.log_file, self.metrics_file):
            if f:
                f.close()
        if self.master:
            _log_file = None
            _early_messages.clear()  # what comes after belongs to the next log, if any
        if self.wandb is not None:
            self.wandb.finish()


# -----------------------------------------------------------------------------
# stopping: signals, non-finite losses, and the error guard


class StopSignal:
    """SIGTERM (spot/rented GPUs get it before being reclaimed) and Ctrl-C set a flag; the loop saves a
    checkpoint at the next step boundary and exits cleanly. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def should_stop(self, device) -> bool:
        """All ranks must agree, or one rank leaves the loop while the others wait in a collective forever."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        return all_reduce(flag, dist.ReduceOp.MAX).item() > 0


OOM_ADVICE = ("CUDA out of memory. Lower the memory per step, in this order (the T4 guide's advice): "
              "--device_batch_size (e.g. half of it; the batch per optimizer step stays, gradient accumulation "
              "grows), --gradient_checkpointing=True, --max_seq_len (e.g. 512); when pretraining with "
              "train_base.py, also --depth (e.g. 8). A run with checkpoints resumes with --auto_resume=True.")


def run(main):
    """Run a stage's main(): bad input becomes one message and exit 2, OOM becomes advice and exit 3;
    the process group is torn down whatever happens."""
    try:
        main()
    except UserError as e:
        if is_master_env():
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except torch.OutOfMemoryError as e:
        if is_master_env():
            print(f"error: {OOM_ADVICE}\n({str(e).splitlines()[0]})", file=sys.stderr, flush=True)
        sys.exit(3)
    finally:
        cleanup_distributed()
