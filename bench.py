"""bench.py: t4chat's training speed and memory next to a nanoGPT baseline, measured in one run.
CPU, < 15 min:    python bench.py                # every figure but sample efficiency; a table, then one JSON line
Quality, ~30 min: python bench.py --quality      # sample efficiency at equal tokens; writes bench/quality.png
Sweep:            python bench.py --quality --baseline=False --recipe=lr_scheduler=wsd,warmup_steps=40 --recipe=...
Profile:          python bench.py --profile      # torch.profiler top ops of a training step of each model
Tests:            python bench.py --smoke        # tiny sizes, in one process, a few seconds
Options: --threads=2 --rounds=3 --depth=4 --n_embd=256 --max_seq_len=256 --device_batch_size=8 --device=cpu
         --data_root=../shared/data/pretrain --json_out=<file>
Other jobs share this machine, so every figure is the median of several steps after warm-up, the candidates
run alternately in fresh processes, and every ratio compares figures taken in the same run.
"""
import argparse
import concurrent.futures
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pretrain"
RESULT_TAG = "BENCH_RESULT "  # a worker's last stdout line; everything else it prints is ignored

# issue 5's targets, all measured at depth 4, width 256, seq 256, batch 8 on CPU in float32
TARGETS = {
    "throughput_ratio": 1.10,        # t4chat / baseline tok/s, AdamW both, >=
    "muon_extra_share": 0.15,        # (Muon step - AdamW step) / Muon training step, <
    "loader_tok_per_s": 1e6,         # one tokenizer thread, parquet to packed batch, >=
    "loader_rss_growth_mb": 300,     # for the corpus and for ten times the corpus, <
    "quality_gap_nats": 0.3,         # baseline val loss - t4chat val loss at equal tokens, >=
}
SMOKE = dict(depth=1, n_embd=64, max_seq_len=32, device_batch_size=2)


# ---------------------------------------------------------------------------------------------------
# measuring helpers (run inside the workers)
# ---------------------------------------------------------------------------------------------------

def rss_mb():
    """Current resident set size in MB (Linux /proc; elsewhere the peak, which is all getrusage knows)."""
    try:
        with open("/proc/self/statm", encoding="utf-8") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):
        return peak_rss_mb()


def peak_rss_mb():
    # the kernel's high-water mark catches the transient full-vocab logits that sampling between steps misses
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def setup_torch(spec):
    import torch
    # we pin the thread count: torch's default follows the core count, and on a shared 2-core machine more
    # threads than cores only adds contention
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    return torch, dev, sync


def matmul_rate(torch, dev, sync, n=2048, reps=10):
    """FLOP/s of an n x n float32 torch.mm, the denominator of CPU-MFU (median of `reps`, after warm-up)."""
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    c = torch.empty(n, n, device=dev)
    times = []
    for i in range(reps + 3):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / median(times)


def build_model(torch, spec, kind, dev):
    """(model, loss_fn) at the spec's size. The baseline keeps nanoGPT's head size of 64; its FLOPs per token
    differ from ours by the MLP width only (4x GELU vs 8/3x SwiGLU rounded up to 64): 0.4 % at width 256."""
    from tokenizer import get_tokenizer
    vocab = get_tokenizer("gpt2").vocab_size
    torch.manual_seed(0)
    if kind == "t4chat":
        from model import GPT, GPTConfig
        model = GPT(GPTConfig(depth=spec["depth"], n_embd=spec["n_embd"], vocab_size=vocab,
                              max_seq_len=spec["max_seq_len"]))
        loss_fn = model
    elif kind == "nanogpt":
        from bench_baseline import NanoGPT, NanoGPTConfig
        model = NanoGPT(NanoGPTConfig(block_size=spec["max_seq_len"], vocab_size=vocab, n_layer=spec["depth"],
                                      n_head=max(1, spec["n_embd"] // 64), n_embd=spec["n_embd"]))

        def loss_fn(x, y):
            return model(x, y)[1]
    else:
        raise ValueError(f"model={kind!r}: use 't4chat' or 'nanogpt'")
    return model.to(dev), loss_fn


def make_optimizer(model, kind, optimizer, dev):
    """'adamw' is the same AdamW for both models (nanoGPT's hyperparameters); 'muon' is t4chat's default."""
    import bench_baseline as nb
    if kind == "nanogpt":
        if optimizer != "adamw":
            raise ValueError(f"the baseline trains with AdamW only, got optimizer={optimizer!r}")
        return model.configure_optimizers(nb.WEIGHT_DECAY, nb.MAX_LR, nb.BETAS, dev.type)
    if optimizer == "adamw":
        return model.configure_optimizers("adamw", max_lr=nb.MAX_LR, weight_decay=nb.WEIGHT_DECAY, betas=nb.BETAS)
    return model.configure_optimizers("muon")


def precision(torch, dev, spec):
    import common
    dtype, _ = common.pick_dtype(dev, spec.get("dtype", "auto"))
    ctx, scaler = common.make_autocast_and_scaler(dev, dtype)
    return dtype, ctx, scaler


def random_batches(torch, spec, dev, n=4):
    """Fixed token batches: speed does not depend on the text, and both models then see the same tokens."""
    g = torch.Generator().manual_seed(1)
    shape = (spec["device_batch_size"], spec["max_seq_len"])
    return [(torch.randint(0, 50257, shape, generator=g).to(dev), torch.randint(0, 50257, shape, generator=g).to(dev))
            for _ in range(n)]


def train_step(torch, model, loss_fn, opt, x, y, ctx, scaler, sync, clip=1.0):
    """One optimizer step as train_base.py takes it; returns (loss tensor, seconds per phase)."""
    sync()
    t0 = time.perf_counter()
    with ctx:
        loss = loss_fn(x, y)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    sync()
    t1 = time.perf_counter()
    if scaler is not None:
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    sync()
    t2 = time.perf_counter()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    sync()
    t3 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    return loss.detach(), dict(fwdbwd=t1 - t0, clip=t2 - t1, opt=t3 - t2, zero=t4 - t3, step=t4 - t0)


def phase_medians(times):
    return {f"{k}_ms": 1000 * median([t[k] for t in times]) for k in times[0]}


# ---------------------------------------------------------------------------------------------------
# workers: each runs in a fresh process (or inline under --smoke) and returns one dict
# ---------------------------------------------------------------------------------------------------

def work_train(spec):
    """Throughput, FLOP/s, MFU, optimizer time and peak memory of one model + optimizer."""
    torch, dev, sync = setup_torch(spec)
    rate = matmul_rate(torch, dev, sync, n=spec.get("matmul_n", 2048), reps=spec["matmul_reps"])
    model, loss_fn = build_model(torch, spec, spec["model"], dev)
    opt = make_optimizer(model, spec["model"], spec["optimizer"], dev)
    dtype, ctx, scaler = precision(torch, dev, spec)
    batches = random_batches(torch, spec, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss_before = rss_mb()
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        x, y = batches[i % len(batches)]
        loss, t = train_step(torch, model, loss_fn, opt, x, y, ctx, scaler, sync)
        if i >= spec["warmup"]:
            times.append(t)
    tokens = spec["device_batch_size"] * spec["max_seq_len"]
    fpt = model.estimate_flops_per_token()
    step_s = median([t["step"] for t in times])
    res = dict(model=spec["model"], optimizer=spec["optimizer"], dtype=str(dtype).removeprefix("torch."),
               tok_per_s=tokens / step_s, flops_per_token=fpt, achieved_flops=fpt * tokens / step_s,
               matmul_flops=rate, params=sum(p.numel() for p in model.parameters()),
               step_times_ms=[round(1000 * t["step"], 1) for t in times], loss=loss.item(),
               rss_before_mb=rss_before, peak_rss_mb=peak_rss_mb(), **phase_medians(times))
    res["cpu_mfu"] = res["achieved_flops"] / rate
    if dev.type == "cuda":
        import common
        res["gpu_peak_alloc_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
        peak = common.peak_flops(torch.cuda.get_device_name(dev), dtype)
        res["gpu_mfu"] = res["achieved_flops"] / peak if peak else None
    return res


def work_optim(spec):
    """Muon vs AdamW on the same t4chat model, alternating step by step in one process, so the difference is
    not a difference between two processes' luck with the neighbours."""
    torch, dev, sync = setup_torch(spec)
    model, loss_fn = build_model(torch, spec, "t4chat", dev)
    opts = {"muon": make_optimizer(model, "t4chat", "muon", dev),
            "adamw": make_optimizer(model, "t4chat", "adamw", dev)}
    dtype, ctx, scaler = precision(torch, dev, spec)
    batches = random_batches(torch, spec, dev)
    times = {name: [] for name in opts}
    for i in range(spec["warmup"] + spec["steps"]):
        for j, (name, opt) in enumerate(opts.items()):
            x, y = batches[(2 * i + j) % len(batches)]
            _, t = train_step(torch, model, loss_fn, opt, x, y, ctx, scaler, sync)
            if i >= spec["warmup"]:
                times[name].append(t)
    res = {name: phase_medians(t) for name, t in times.items()}
    extra = res["muon"]["opt_ms"] - res["adamw"]["opt_ms"]
    # the share of Muon's own training step that Muon adds over AdamW
    return dict(res, muon_extra_ms=extra, muon_extra_share=extra / res["muon"]["step_ms"])


def work_growth(spec):
    """RSS after every step of a t4chat run with the default recipe (Muon) fed by the real loader."""
    torch, dev, sync = setup_torch(spec)
    from dataloader import PretrainLoader
    from tokenizer import get_tokenizer
    model, loss_fn = build_model(torch, spec, "t4chat", dev)
    opt = make_optimizer(model, "t4chat", "muon", dev)
    dtype, ctx, scaler = precision(torch, dev, spec)
    rss = []
    with PretrainLoader(spec["data_root"], get_tokenizer("gpt2"), split="train",
                        device_batch_size=spec["device_batch_size"], max_seq_len=spec["max_seq_len"],
                        device=spec["device"]) as loader:
        for _ in range(spec["steps"]):
            x, y = loader.next_batch()
            train_step(torch, model, loss_fn, opt, x, y, ctx, scaler, sync)
            rss.append(rss_mb())
    # the first steps allocate optimizer state and warm the allocator; growth is measured after them
    w = spec["warmup"]
    tail = rss[w - 1:]
    n = len(tail)
    xm, ym = (n - 1) / 2, sum(tail) / n
    slope = sum((i - xm) * (r - ym) for i, r in enumerate(tail)) / max(1e-9, sum((i - xm) ** 2 for i in range(n)))
    return dict(steps=spec["steps"], batch=spec["device_batch_size"], rss_after_warmup_mb=tail[0],
                rss_last_mb=rss[-1], growth_mb=rss[-1] - tail[0], max_growth_mb=max(tail) - tail[0],
                slope_mb_per_100_steps=100 * slope, peak_rss_mb=peak_rss_mb(),
                rss_every_10_mb=[round(r, 1) for r in rss[::10]])


class _TokenizerThreads:
    """The loader calls encode_batch() with the tokenizer's default thread count; we pin it to measure the
    loader on a given number of tokenizer threads without changing the loader."""

    def __init__(self, tok, threads):
        self._tok, self._threads = tok, threads

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode_batch(self, texts, num_threads=None):
        return self._tok.encode_batch(texts, num_threads=self._threads)


def work_loader(spec):
    """Tokens/s and RSS while streaming the training split once, parquet to packed (x, y) batches."""
    torch, dev, sync = setup_torch(spec)
    from dataloader import PretrainLoader, list_shards
    from tokenizer import get_tokenizer
    tok = get_tokenizer("gpt2")
    tok.encode("warm up")  # tiktoken builds its tables lazily; that is not the loader's memory
    rss0 = rss_mb()
    sampled_max, tokens, batches = rss0, 0, 0
    t0 = time.perf_counter()
    with PretrainLoader(spec["data_root"], _TokenizerThreads(tok, spec["tokenizer_threads"]), split="train",
                        device_batch_size=spec["device_batch_size"], max_seq_len=spec["max_seq_len"]) as loader:
        while True:
            x, y = loader.next_batch()
            if loader.epoch > 0:  # this batch crossed into the second epoch: the corpus has streamed once
                break
            tokens += x.numel()
            batches += 1
            if batches % 64 == 0:
                sampled_max = max(sampled_max, rss_mb())
            if spec["max_tokens"] and tokens >= spec["max_tokens"]:
                break
    dt = time.perf_counter() - t0
    shards = list_shards(spec["data_root"], "train")
    res = dict(shards=len(shards), tokens=tokens, seconds=dt, tok_per_s=tokens / dt,
               tokenizer_threads=spec["tokenizer_threads"], rss_before_mb=rss0, sampled_max_rss_mb=sampled_max,
               peak_rss_mb=peak_rss_mb(), rss_growth_mb=peak_rss_mb() - rss0)
    if spec.get("tiktoken_reference"):
        # tiktoken alone on the same text, one thread: the ceiling the loader works under
        import pyarrow.parquet as pq
        texts = pq.ParquetFile(shards[0]).read_row_group(0, columns=["text"]).column("text").to_pylist()
        t0 = time.perf_counter()
        n = sum(map(len, tok.encode_batch(texts, num_threads=1)))
        res["tiktoken_tok_per_s"] = n / (time.perf_counter() - t0)
    return res


def work_compile(spec):
    """Eager vs torch.compile steps of t4chat (AdamW) in one process, and the one-time compile cost."""
    # inductor caches compiled kernels across processes (/tmp/torchinductor_<user>); a fresh cache makes
    # the cost the one a user pays on first use, not what is left after an earlier benchmark run
    cache, before = tempfile.mkdtemp(prefix="t4chat_bench_inductor_"), os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        return _compile_figures(spec)
    finally:  # --smoke runs in the caller's process: leave its environment and /tmp as they were
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
        shutil.rmtree(cache, ignore_errors=True)


def _compile_figures(spec):
    torch, dev, sync = setup_torch(spec)
    model, _ = build_model(torch, spec, "t4chat", dev)
    opt = make_optimizer(model, "t4chat", "adamw", dev)
    dtype, ctx, scaler = precision(torch, dev, spec)
    batches = random_batches(torch, spec, dev)

    def steps(fn, n, skip):
        out = []
        for i in range(skip + n):
            x, y = batches[i % len(batches)]
            _, t = train_step(torch, model, fn, opt, x, y, ctx, scaler, sync)
            out.append(t["step"])
        return out[skip:]

    eager = steps(model, spec["steps"], spec["warmup"])
    compiled = torch.compile(model)
    try:
        first = steps(compiled, 1, 0)[0]  # the first call traces and compiles (forward and backward)
        comp = steps(compiled, spec["steps"], 1)
    except Exception as e:  # no C++ compiler, an inductor bug: report it rather than lose every other figure
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    eager += steps(model, spec["steps"], 0)  # a second eager block, so both sides span the same minutes
    tokens = spec["device_batch_size"] * spec["max_seq_len"]
    e, c = median(eager), median(comp)
    return dict(eager_tok_per_s=tokens / e, compiled_tok_per_s=tokens / c, speedup=e / c,
                first_compiled_step_s=first, compile_cost_s=first - c)


def work_profile(spec):
    """torch.profiler's top ops (self CPU time) over two training steps after two warm-up steps."""
    torch, dev, sync = setup_torch(spec)
    from torch.profiler import ProfilerActivity, profile
    model, loss_fn = build_model(torch, spec, spec["model"], dev)
    opt = make_optimizer(model, spec["model"], spec["optimizer"], dev)
    dtype, ctx, scaler = precision(torch, dev, spec)
    batches = random_batches(torch, spec, dev)
    for x, y in batches[:2]:
        train_step(torch, model, loss_fn, opt, x, y, ctx, scaler, sync)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for x, y in batches[2:4]:
            train_step(torch, model, loss_fn, opt, x, y, ctx, scaler, sync)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=spec.get("rows", 15))
    return dict(model=spec["model"], optimizer=spec["optimizer"], table=table)


def train_base_recipe(overrides, named=None, **fixed):
    """train_base.py's config as the stage reads it (its globals plus defaults.py's shared keys, then `fixed`), with
    a sweep point's key=value overrides typed and checked as its own flags are; `named` collects the keys set."""
    import train_base as tb
    from configurator import apply_overrides
    from trainer import with_shared_defaults
    return apply_overrides({**with_shared_defaults(dict(vars(tb))), **fixed}, [f"--{kv}" for kv in overrides],
                           named=named)


def work_quality(spec):
    """Train one model for `steps` steps on the real data; train loss every step, val loss every eval_every."""
    torch, dev, sync = setup_torch(spec)
    import bench_baseline as nb
    from dataloader import PretrainLoader
    from tokenizer import get_tokenizer
    tok = get_tokenizer("gpt2")
    kind, steps = spec["model"], spec["steps"]
    model, loss_fn = build_model(torch, spec, kind, dev)
    loader_args = dict(device_batch_size=spec["device_batch_size"], max_seq_len=spec["max_seq_len"],
                       device=spec["device"])
    # the same validation windows for both models, read once: the first eval_batches of the val shard
    with PretrainLoader(spec["data_root"], tok, split="val", **loader_args) as val_loader:
        val = [val_loader.next_batch() for _ in range(spec["eval_batches"])]
    dtype, ctx, scaler = precision(torch, dev, spec)
    if kind == "t4chat":
        # the shipped recipe: train_base.py's defaults, read from the module so this follows any change there,
        # through the same Schedule the stages use (schedule.make_schedule), with max_steps = this run's steps
        import train_base as tb
        named = {"max_steps"}
        recipe = train_base_recipe(spec.get("recipe", []), named, max_steps=steps,
                                   optimizer="muon" if spec["optimizer"] == "default" else spec["optimizer"])
        from schedule import make_schedule
        sched = make_schedule(recipe, named, default_lrs=(tb.max_lr, tb.matrix_lr))
        opt = model.configure_optimizers(optimizer=recipe["optimizer"], max_lr=sched.peak_lr,
                                         matrix_lr=sched.matrix_lr or tb.matrix_lr, weight_decay=recipe["weight_decay"])
        clip = recipe["grad_clip"] if recipe["grad_clip"] > 0 else float("inf")
        from trainer import set_hyperparameters

        def apply(step):  # lr, weight decay and Muon's momentum at `step`, as Trainer.fit sets them
            set_hyperparameters(opt, sched, step)
        recipe = f"{recipe['optimizer']}, {sched.describe()}, wd {recipe['weight_decay']:g}, clip {recipe['grad_clip']:g}"
    else:
        opt = make_optimizer(model, kind, "adamw", dev)
        warmup, clip = int(round(nb.WARMUP_FRACTION * steps)), nb.GRAD_CLIP

        def apply(step):
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * nb.get_lr(step, warmup_iters=warmup, lr_decay_iters=steps) / nb.MAX_LR
        recipe = (f"adamw, max_lr {nb.MAX_LR:g}, cosine to {nb.MIN_LR:g}, warmup {warmup}, wd {nb.WEIGHT_DECAY:g}, "
                  f"clip {nb.GRAD_CLIP:g}")
    for group in opt.param_groups:
        group.setdefault("base_lr", group["lr"])
        group.setdefault("base_weight_decay", group.get("weight_decay", 0.0))

    def evaluate():
        model.eval()
        with torch.no_grad(), ctx:
            losses = [loss_fn(x, y).float().item() for x, y in val]
        model.train()
        return sum(losses) / len(losses)

    train_losses, val_losses = [], []
    t0 = time.perf_counter()
    with PretrainLoader(spec["data_root"], tok, split="train", **loader_args) as train_loader:
        for step in range(steps + 1):
            if step % spec["eval_every"] == 0 or step == steps:
                val_losses.append((step, evaluate()))
                print(f"{kind} step {step} val {val_losses[-1][1]:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
            if step == steps:
                break
            apply(step)
            x, y = train_loader.next_batch()
            loss, _ = train_step(torch, model, loss_fn, opt, x, y, ctx, scaler, sync, clip=clip)
            train_losses.append(loss.item())
    return dict(model=kind, recipe=recipe, steps=steps, tokens=steps * spec["device_batch_size"] * spec["max_seq_len"],
                val_tokens=spec["eval_batches"] * spec["device_batch_size"] * spec["max_seq_len"],
                train_loss=[round(v, 4) for v in train_losses], val_loss=[(s, round(v, 4)) for s, v in val_losses],
                final_val_loss=val_losses[-1][1], seconds=time.perf_counter() - t0)


WORKERS = {"train": work_train, "optim": work_optim, "growth": work_growth, "loader": work_loader,
           "compile": work_compile, "profile": work_profile, "quality": work_quality}


# ---------------------------------------------------------------------------------------------------
# the parent: schedules workers, collects their results, prints the table and the JSON line
# ---------------------------------------------------------------------------------------------------

def run_worker(spec, inline=False):
    """One worker in a fresh Python process (or in this one under --smoke); its result dict."""
    if inline:
        sys.path.insert(0, str(REPO))
        return WORKERS[spec["worker"]](spec)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench worker {spec['worker']} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    res = json.loads(lines[-1][len(RESULT_TAG):])
    res["wall_s"] = time.perf_counter() - t0
    return res


def log(msg):
    print(msg, file=sys.stderr, flush=True)  # progress on stderr, so stdout is the table and the JSON line


def make_big_corpus(src, dst, times=10):
    """`times` copies of the training shards (symlinks, in name order) plus the validation shard last."""
    from dataloader import list_shards
    train, val = list_shards(src, "train"), list_shards(src, "val")
    k = 0
    for _ in range(times):
        for shard in train:
            os.symlink(shard.resolve(), Path(dst) / f"shard_{k:05d}.parquet")
            k += 1
    os.symlink(val[0].resolve(), Path(dst) / f"shard_{k:05d}.parquet")  # last by name: validation


def run_speed(args):
    """Every figure but sample efficiency."""
    base = dict(threads=args.threads, device=args.device, dtype=args.dtype, depth=args.depth, n_embd=args.n_embd,
                max_seq_len=args.max_seq_len, device_batch_size=args.device_batch_size,
                data_root=str(args.data_root))
    smoke = args.smoke
    t_start = time.perf_counter()
    train_steps, warmup = (1, 1) if smoke else (args.steps, args.warmup)
    candidates = [("t4chat", "adamw"), ("nanogpt", "adamw"), ("t4chat", "muon")]
    runs = {c: [] for c in candidates}
    for r in range(args.rounds):
        # we rotate the order every round, so no candidate always runs first (or right after the loader)
        order = candidates[r % len(candidates):] + candidates[:r % len(candidates)]
        for model, opt in order:
            log(f"[{time.perf_counter() - t_start:5.0f}s] round {r + 1}/{args.rounds}: {model} {opt}")
            runs[(model, opt)].append(run_worker(dict(base, worker="train", model=model, optimizer=opt,
                                                      steps=train_steps, warmup=warmup,
                                                      matmul_reps=2 if smoke else 10,
                                                      matmul_n=256 if smoke else 2048), smoke))
    log(f"[{time.perf_counter() - t_start:5.0f}s] optimizer: Muon vs AdamW, alternating")
    optim = run_worker(dict(base, worker="optim", steps=2 if smoke else args.optim_steps, warmup=1), smoke)
    growth_steps = 5 if smoke else args.growth_steps
    log(f"[{time.perf_counter() - t_start:5.0f}s] memory growth over {growth_steps} steps")
    # memory, not speed: one thread keeps this run from stalling on a shared machine (two threads that
    # wait for each other behind other jobs made its 200 steps 5-10x slower here)
    growth = run_worker(dict(base, worker="growth", threads=1, steps=growth_steps,
                             warmup=2 if smoke else 10,
                             device_batch_size=args.device_batch_size if smoke else args.growth_batch), smoke)
    loader_spec = dict(base, worker="loader", threads=1, tokenizer_threads=1,
                       max_tokens=20000 if smoke else args.loader_max_tokens)
    log(f"[{time.perf_counter() - t_start:5.0f}s] loader: {args.data_root}")
    loader1 = run_worker(dict(loader_spec, tiktoken_reference=True), smoke)
    with tempfile.TemporaryDirectory(prefix="t4chat_bench_corpus_") as big:
        make_big_corpus(args.data_root, big)
        log(f"[{time.perf_counter() - t_start:5.0f}s] loader: ten times the corpus ({big})")
        loader10 = run_worker(dict(loader_spec, data_root=big), smoke)
    if smoke or not args.compile:
        comp = dict(skipped="--smoke" if smoke else "--compile=False")
    else:
        log(f"[{time.perf_counter() - t_start:5.0f}s] compile on vs off")
        comp = run_worker(dict(base, worker="compile", steps=args.compile_steps, warmup=2), smoke)
    wall = time.perf_counter() - t_start

    def agg(c, key):
        return median([r[key] for r in runs[c]])

    def cand(c):
        keys = ["tok_per_s", "achieved_flops", "cpu_mfu", "matmul_flops", "step_ms", "fwdbwd_ms", "clip_ms",
                "opt_ms", "peak_rss_mb", "rss_before_mb"]
        out = {k: agg(c, k) for k in keys}
        out.update(flops_per_token=runs[c][0]["flops_per_token"], params=runs[c][0]["params"],
                   dtype=runs[c][0]["dtype"], per_round_tok_per_s=[round(r["tok_per_s"], 1) for r in runs[c]])
        if "gpu_peak_alloc_mb" in runs[c][0]:
            out["gpu_peak_alloc_mb"] = agg(c, "gpu_peak_alloc_mb")
        return out

    t4, nano, t4m = cand(candidates[0]), cand(candidates[1]), cand(candidates[2])
    # ratios within a round (the two processes ran minutes apart), then their median across rounds
    per_round = [a["tok_per_s"] / b["tok_per_s"] for a, b in zip(runs[candidates[0]], runs[candidates[1]])]
    results = {
        "machine": machine_info(args), "threads": args.threads, "wall_s": wall,
        "config": dict(depth=args.depth, n_embd=args.n_embd, max_seq_len=args.max_seq_len,
                       device_batch_size=args.device_batch_size, rounds=args.rounds, steps=train_steps,
                       warmup=warmup),
        "t4chat_adamw": t4, "nanogpt_adamw": nano, "t4chat_muon": t4m,
        "throughput_ratio": t4["tok_per_s"] / nano["tok_per_s"],
        "throughput_ratio_per_round": [round(x, 3) for x in per_round],
        "fwdbwd_ratio": nano["fwdbwd_ms"] / t4["fwdbwd_ms"],
        "memory_ratio": t4["peak_rss_mb"] / nano["peak_rss_mb"],
        "optim": optim, "growth": growth, "loader": loader1, "loader_10x": loader10, "compile": comp,
        "gpu": "not measured",
    }
    return results


def machine_info(args):
    import platform
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                device=args.device, load_avg_at_end=[round(x, 2) for x in load] if load else None)


def fmt_rate(x):
    return f"{x / 1e9:.1f} GFLOP/s"


def print_speed(res):
    t4, nano, t4m, opt = res["t4chat_adamw"], res["nanogpt_adamw"], res["t4chat_muon"], res["optim"]
    ld, ld10, gr, comp = res["loader"], res["loader_10x"], res["growth"], res["compile"]

    def ok(good):
        return "met" if good else "MISSED"

    rows = [
        ("train tok/s (AdamW both)", f"{t4['tok_per_s']:,.0f}", f"{nano['tok_per_s']:,.0f}",
         f"{res['throughput_ratio']:.3f}", ">= 1.10", ok(res["throughput_ratio"] >= TARGETS["throughput_ratio"])),
        ("  per round t4chat / baseline", "", "", " ".join(f"{x:.2f}" for x in res["throughput_ratio_per_round"]),
         "", ""),
        ("achieved FLOP/s (own count)", fmt_rate(t4["achieved_flops"]), fmt_rate(nano["achieved_flops"]),
         f"{t4['achieved_flops'] / nano['achieved_flops']:.3f}", "", ""),
        ("FLOPs per token", f"{t4['flops_per_token'] / 1e6:.1f}M", f"{nano['flops_per_token'] / 1e6:.1f}M",
         f"{t4['flops_per_token'] / nano['flops_per_token']:.3f}", "", ""),
        ("CPU-MFU (vs 2048^2 fp32 mm)", f"{100 * t4['cpu_mfu']:.0f}%", f"{100 * nano['cpu_mfu']:.0f}%", "", "", ""),
        ("  mm rate in those processes", fmt_rate(t4["matmul_flops"]), fmt_rate(nano["matmul_flops"]), "", "", ""),
        ("step ms: fwd+bwd", f"{t4['fwdbwd_ms']:.0f}", f"{nano['fwdbwd_ms']:.0f}",
         f"{res['fwdbwd_ratio']:.3f}", "", ""),
        ("step ms: clip / optimizer", f"{t4['clip_ms']:.0f} / {t4['opt_ms']:.0f}",
         f"{nano['clip_ms']:.0f} / {nano['opt_ms']:.0f}", "", "", ""),
        ("peak RSS of training (MB)", f"{t4['peak_rss_mb']:,.0f}", f"{nano['peak_rss_mb']:,.0f}",
         f"{res['memory_ratio']:.3f}", "< 1", ok(res["memory_ratio"] < 1)),
        ("t4chat Muon tok/s", f"{t4m['tok_per_s']:,.0f}", "", "", "", ""),
        ("optimizer ms/step Muon | AdamW", f"{opt['muon']['opt_ms']:.0f} | {opt['adamw']['opt_ms']:.0f}", "", "", "", ""),
        ("Muon extra / Muon step", f"{opt['muon_extra_ms']:.0f} ms of {opt['muon']['step_ms']:.0f}",
         "", f"{100 * opt['muon_extra_share']:.1f}%", "< 15%", ok(opt["muon_extra_share"] < TARGETS["muon_extra_share"])),
        (f"RSS growth over {gr['steps']} steps (MB)", f"{gr['growth_mb']:+.1f} (max {gr['max_growth_mb']:+.1f})",
         "", f"{gr['slope_mb_per_100_steps']:+.2f} MB/100 steps", "flat", ""),
        ("loader tok/s (1 tokenizer thread)", f"{ld['tok_per_s']:,.0f}", "", "", ">= 1M",
         ok(ld["tok_per_s"] >= TARGETS["loader_tok_per_s"])),
        ("  tiktoken alone, 1 thread", f"{ld.get('tiktoken_tok_per_s', float('nan')):,.0f}", "", "", "", ""),
        ("loader RSS growth, corpus (MB)", f"{ld['rss_growth_mb']:.0f} ({ld['shards']} shards)", "", "", "< 300",
         ok(ld["rss_growth_mb"] < TARGETS["loader_rss_growth_mb"])),
        ("loader RSS growth, 10x corpus (MB)", f"{ld10['rss_growth_mb']:.0f} ({ld10['shards']} shards)", "", "",
         "< 300", ok(ld10["rss_growth_mb"] < TARGETS["loader_rss_growth_mb"])),
    ]
    if "speedup" in comp:
        rows += [("compile on / off tok/s", f"{comp['compiled_tok_per_s']:,.0f} / {comp['eager_tok_per_s']:,.0f}",
                  "", f"{comp['speedup']:.3f}", "", ""),
                 ("one-time compile cost", f"{comp['compile_cost_s']:.1f} s", "", "", "", "")]
    else:
        rows += [("compile on / off", comp.get("error") or f"skipped ({comp.get('skipped')})", "", "", "", "")]
    rows.append(("GPU (depth 12, seq 1024)", res["gpu"], "", "", "", ""))
    head = ("figure", "t4chat", "baseline", "ratio", "target", "")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = " | ".join(h.ljust(w) for h, w in zip(head, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    m = res["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {res['threads']} torch threads per process, "
          f"wall {res['wall_s']:.0f} s, load average at the end {m['load_avg_at_end']}")


def run_quality(args):
    base = dict(threads=args.threads, device=args.device, dtype=args.dtype, depth=args.depth, n_embd=args.n_embd,
                max_seq_len=args.max_seq_len, device_batch_size=args.device_batch_size,
                data_root=str(args.data_root), worker="quality", steps=args.quality_steps,
                eval_every=args.eval_every, eval_batches=args.eval_batches)
    if args.smoke:
        base.update(steps=3, eval_every=2, eval_batches=1)
    t0 = time.perf_counter()
    # each --recipe is one more t4chat run (a sweep point); the baseline runs unless --baseline=False
    points = [[kv.strip() for kv in r.split(",") if kv.strip()] for r in args.recipe] or [[]]
    from configurator import UserError
    for r in points:  # a typo fails here, in one line, not in every worker
        try:
            train_base_recipe(r)
        except UserError as e:
            raise SystemExit(f"--recipe={','.join(r)}: {e}") from None
    candidates = {f"t4chat{' ' + ','.join(r) if r else ''}": dict(model="t4chat", optimizer="default", recipe=r)
                  for r in points}
    if args.baseline:
        candidates["nanogpt"] = dict(model="nanogpt", optimizer="adamw")
    if args.smoke:
        runs = {name: run_worker(dict(base, **c), True) for name, c in candidates.items()}
    else:
        # losses do not depend on timing, so the runs train side by side, each on its share of the threads:
        # one-thread processes waste nothing on waits, and the wall time is that of the slowest run
        base["threads"] = max(1, args.threads // len(candidates))
        log(f"quality: {' and '.join(candidates)} side by side, {base['steps']} steps each, "
            f"{base['threads']} thread(s) each")
        with concurrent.futures.ThreadPoolExecutor(len(candidates)) as pool:
            futures = {name: pool.submit(run_worker, dict(base, **c)) for name, c in candidates.items()}
            runs = {name: f.result() for name, f in futures.items()}
        log(f"[{time.perf_counter() - t0:5.0f}s] quality runs done")
    ours = [name for name in runs if name != "nanogpt"]
    size = f"depth {args.depth}, width {args.n_embd}, seq {args.max_seq_len}"
    if len(ours) > 1 or not args.baseline:  # a sweep: every point's final loss, no baseline comparison
        for name in ours:
            print(f"{runs[name]['final_val_loss']:.4f}  {name}  ({runs[name]['recipe']})")
        res = dict(sweep={name: runs[name] for name in ours}, machine=machine_info(args), threads=args.threads,
                   wall_s=time.perf_counter() - t0)
        if args.plot and not args.smoke:
            res["plot"] = str(plot_runs({name.removeprefix("t4chat ") or "default": runs[name] for name in ours},
                                        args.plot, f"Recipe sweep: {size}"))
            print(f"plot: {res['plot']}")
        return res
    label = f"t4chat ({ours[0].removeprefix('t4chat ') or 'Muon, default recipe'})"  # one --recipe: that point
    runs["t4chat"] = runs.pop(ours[0])
    gap = runs["nanogpt"]["final_val_loss"] - runs["t4chat"]["final_val_loss"]
    res = dict(quality=dict(t4chat=runs["t4chat"], nanogpt=runs["nanogpt"], gap_nats=gap,
                            target_nats=TARGETS["quality_gap_nats"], met=gap >= TARGETS["quality_gap_nats"]),
               machine=machine_info(args), threads=args.threads, wall_s=time.perf_counter() - t0)
    print(f"val loss at equal tokens ({runs['t4chat']['tokens']:,} training tokens, "
          f"{runs['t4chat']['val_tokens']:,} validation tokens of the last shard)")
    print("step | t4chat | baseline")
    for (s, a), (_, b) in zip(runs["t4chat"]["val_loss"], runs["nanogpt"]["val_loss"]):
        print(f"{s:4d} | {a:.4f} | {b:.4f}")
    print(f"gap (baseline - t4chat) at the end: {gap:.3f} nats; target >= {TARGETS['quality_gap_nats']} "
          f"({'met' if res['quality']['met'] else 'MISSED'})")
    print(f"t4chat:   {runs['t4chat']['recipe']}\nbaseline: {runs['nanogpt']['recipe']}")
    if not args.smoke:
        path = plot_runs({label: runs["t4chat"],
                          "nanoGPT baseline (AdamW + cosine)": runs["nanogpt"]},
                         args.plot or REPO / "bench" / "quality.png", f"Sample efficiency at equal tokens, {size}")
        print(f"plot: {path}")
        res["quality"]["plot"] = str(path)
    return res


def plot_runs(runs, path, title):
    """Validation loss (dots) and, up to three runs, a running mean of the training loss of each run, labelled by
    the dict's keys; bench.py --quality draws t4chat against the baseline, a sweep (--plot) every point. The right
    panel zooms in on the second half, where recipes that start alike part."""
    import matplotlib  # only --quality needs it, so the speed run works without it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    first = next(iter(runs.values()))
    half = first["steps"] // 2
    trains = len(runs) <= 3  # beyond three runs the noisy training curves hide the validation ones
    for n, (label, r) in enumerate(runs.items()):
        tl, k = r["train_loss"], 10  # a running mean over 10 steps: single-batch losses are too noisy by eye
        smooth = [sum(tl[max(0, i - k + 1):i + 1]) / len(tl[max(0, i - k + 1):i + 1]) for i in range(len(tl))]
        s, v = zip(*r["val_loss"])
        for ax, lo in zip(axes, (0, half)):
            if trains:
                ax.plot(range(lo + 1, len(tl) + 1), smooth[lo:], color=f"C{n}", alpha=0.4, lw=1,
                        label=f"{label}: train" if lo == 0 else None)
            ax.plot([x for x in s if x >= lo], [y for x, y in zip(s, v) if x >= lo], "o-", color=f"C{n}", lw=2,
                    ms=4, label=f"{label}: val ({v[-1]:.3f})" if lo == 0 else None)
    for ax in axes:
        ax.set_xlabel(f"step ({first['tokens'] // first['steps']:,} tokens each)")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(top=min(11.5, axes[0].get_ylim()[1]))
    axes[0].legend(fontsize=7)
    axes[0].set_title(title, fontsize=10)
    axes[1].set_title(f"steps {half}-{first['steps']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_profile(args):
    base = dict(threads=args.threads, device=args.device, dtype=args.dtype, depth=args.depth, n_embd=args.n_embd,
                max_seq_len=args.max_seq_len, device_batch_size=args.device_batch_size, worker="profile")
    out = {}
    for model, opt in (("t4chat", "adamw"), ("nanogpt", "adamw"), ("t4chat", "muon")):
        r = run_worker(dict(base, model=model, optimizer=opt), args.smoke)
        print(f"==== {model} + {opt}: top ops by self CPU time over 2 steps ====\n{r['table']}")
        out[f"{model}_{opt}"] = r["table"]
    return dict(profile=out)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quality", action="store_true", help="sample efficiency (about 30 min on 2 CPU cores)")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of each model's step")
    p.add_argument("--smoke", action="store_true", help="tiny sizes in one process (the test uses this)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per benchmark process (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16 (auto: fp32 on CPU)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--device_batch_size", type=int, default=8)
    p.add_argument("--data_root", type=Path, default=DEFAULT_DATA)
    p.add_argument("--rounds", type=int, default=3, help="alternations of the training candidates")
    p.add_argument("--steps", type=int, default=5, help="timed steps per training process")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--optim_steps", type=int, default=4, help="timed steps per optimizer in the Muon/AdamW worker")
    p.add_argument("--growth_steps", type=int, default=200)
    p.add_argument("--growth_batch", type=int, default=2, help="sequences per step in the memory-growth run")
    p.add_argument("--loader_max_tokens", type=int, default=0, help="0 = stream the whole training split")
    p.add_argument("--compile", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--compile_steps", type=int, default=4)
    p.add_argument("--quality_steps", type=int, default=400)
    p.add_argument("--recipe", action="append", default=[],
                   help="--quality: train_base.py settings for t4chat, key=value,key=value (repeat: runs side by side)")
    p.add_argument("--baseline", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="--quality: also train the nanoGPT baseline (False for a sweep)")
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--eval_batches", type=int, default=32)
    p.add_argument("--plot", type=Path, default=None,
                   help="--quality: where the loss curves go (default bench/quality.png; a sweep plots only if given)")
    p.add_argument("--json_out", type=Path, default=None, help="also write the JSON line to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
        args.rounds = 1
        # one thread: at these sizes a second thread only adds waits on a machine that other jobs share
        args.threads = 1
    if not args.worker and not args.profile and not Path(args.data_root).is_dir():
        raise SystemExit(f"--data_root={args.data_root} is not a folder of parquet shards; pass "
                         f"--data_root=../shared/data/pretrain (or wherever the shards are)")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(RESULT_TAG + json.dumps(WORKERS[spec["worker"]](spec)), flush=True)
        return
    sys.path.insert(0, str(REPO))
    if args.profile:
        res = run_profile(args)
    elif args.quality:
        res = run_quality(args)
    else:
        res = run_speed(args)
        print_speed(res)
    line = json.dumps(res)
    if args.json_out:
        args.json_out.write_text(line + "\n", encoding="utf-8")
    print(line)


if __name__ == "__main__":
    main()
