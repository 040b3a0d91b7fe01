"""report.py: one page that shows how the pipeline (or one run) went: report.md with PNG plots beside it.
in:  each run folder's metrics.jsonl, train.log, ckpt_*.json, eval_*.json (eval.py) and generations_*.jsonl (Dolly)
out: report.md + <stage>_*.png in --out_dir ("" = $NANOCHAT_BASE_DIR/report for the pipeline, <run>/report for one run)
     python report.py                      # the newest run of each stage under $NANOCHAT_BASE_DIR
     python report.py sft                  # one run: a stage name (its newest run), a run folder or a stage folder
     python report.py --run_name=d12       # the runs named d12 of every stage (what the run_*.sh scripts report)
It reads a run that is still going or was killed: a line cut by a kill is skipped (and counted), a step logged
twice keeps its newest record (a resume redid it), and every file is replaced whole (tmp + rename), so a reader never
sees half of one. Run it again at any time while training goes on.
"""
import ast
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import common
from checkpoint import STAGE_DIRS, STAGE_TITLES, CheckpointManager, atomic_write_text
from common import UserError
from configurator import apply_overrides

# ---- config (module globals; override with --key=value; -h lists them) -----------------------------------------
run = ""                      # a run folder, a stage folder (its newest run), a stage name, a base dir; "" = pipeline
run_name = ""                 # the pipeline's runs of this name (the run scripts' RUN_NAME); "" = each stage's newest
out_dir = ""                  # "" = $NANOCHAT_BASE_DIR/report (pipeline) or <run folder>/report (one run)
samples = 3                   # sample answers per stage; stages that logged none answer from their newest ckpt; 0 = off
device = "cpu"                # where those answers are generated: the CPU leaves the GPU to a run still training
eval_rows = 10                # the newest evals of each stage listed in its table (the plots show all of them)
force = False                 # write the report even when no file of its runs changed since the last one
# ------------------------------------------------------------------------------------------------------------------

PLAIN_PROMPTS = ("The capital of France is", "The meaning of life is", "中国的首都是")
CHAT_PROMPTS = ("Who are you?", "What is the capital of France?", "What is 7 + 5?")
_SESSION = re.compile(r"^==== (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) run .* ====$")


# ---- finding the runs ----

def _newest_run(stage_dir: Path):
    # by metrics.jsonl, not by checkpoint (resolve_checkpoint): a run shows curves before its first checkpoint
    runs = [d for d in stage_dir.iterdir() if (d / "metrics.jsonl").is_file()] if stage_dir.is_dir() else []
    return max(runs, key=lambda d: (d / "metrics.jsonl").stat().st_mtime) if runs else None


def find_runs(spec: str, name: str):
    """([(stage, run folder)], the pipeline's folder; None for a report of one run)."""
    if spec in STAGE_DIRS:
        stage_dir = common.base_dir() / STAGE_DIRS[spec]
        found = stage_dir / name if name else _newest_run(stage_dir)
        if found is None or not (found / "metrics.jsonl").is_file():
            raise UserError(f"no {STAGE_TITLES[spec]} run{f' named {name}' if name else ''} under {stage_dir}; "
                            f"train that stage first, or pass a run folder")
        return [(spec, found)], None
    where = Path(spec).expanduser() if spec else common.base_dir()
    if spec and not where.is_dir():
        raise UserError(f"{where} does not exist (or is not a folder); pass a run folder, a stage folder, a stage "
                        f"name ({'|'.join(STAGE_DIRS)}), or nothing for the newest runs under {common.base_dir()}")
    if (where / "metrics.jsonl").is_file():
        return [(run_stage(where), where)], None
    if spec and not any((where / d).is_dir() for d in STAGE_DIRS.values()):
        found = _newest_run(where)  # a stage folder, or a --log_dir holding runs
        if found is None:
            raise UserError(f"{where} holds no metrics.jsonl, nor a run folder with one; pass a run folder, a stage "
                            f"folder, a stage name ({'|'.join(STAGE_DIRS)}) or $NANOCHAT_BASE_DIR")
        return [(run_stage(found), found)], None
    runs = [(s, where / d / name if name else _newest_run(where / d)) for s, d in STAGE_DIRS.items()]
    runs = [(s, d) for s, d in runs if d is not None and (d / "metrics.jsonl").is_file()]
    if not runs:
        raise UserError(f"no run{f' named {name}' if name else ''} at {where} (looked in "
                        f"{', '.join(STAGE_DIRS.values())}): train a stage first, or pass --run=<a run folder>")
    return runs, where


def run_stage(run_dir: Path) -> str:
    """The stage its train.log names, else the one its parent folder is for (base/mid/sft/dolly), else 'run'."""
    sessions, _ = parse_train_log(run_dir / "train.log")
    named = sessions[-1]["header"].get("stage") if sessions else None
    by_folder = {d: s for s, d in STAGE_DIRS.items()}
    return named or by_folder.get(run_dir.parent.name, "run")


# ---- reading a run ----

def _record(text):
    try:
        r = json.loads(text)
    except ValueError:
        return None
    return r if isinstance(r, dict) and isinstance(r.get("kind"), str) and isinstance(r.get("step"), int) else None


def load_metrics(path: Path):
    """({kind: [record, ...] in step order}, lines that are not a record): the newest record of each step wins."""
    newest, bad = {}, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            r = _record(line)
            if r is None and line.strip():
                bad += 1
                # a run started again after the kill appends its first record to the cut line: the last {"kind" on it
                r = _record(line[max(0, line.rfind('{"kind"')):])
            if r is not None:
                newest[(r["kind"], r["step"])] = r
    out = {}
    for (kind, _), r in sorted(newest.items(), key=lambda kv: kv[0][1]):
        out.setdefault(kind, []).append(r)
    return out, bad


def parse_train_log(path: Path):
    """(sessions, sample groups). A session is one start or resume: {start (epoch s), header, config, steps, first};
    a sample group is the consecutive `sample:` lines train_base logged at one step."""
    sessions, groups, part, prev_sample = [], [], None, False
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    for line in text.splitlines():
        m = _SESSION.match(line)
        if m:
            start = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))  # RunLogger writes local time
            sessions.append({"start": start, "header": {}, "config": {}})
            part = "header"
        elif not sessions:
            continue
        elif part == "header" and line == "config:":
            part = "config"
        elif part == "header" and (": " in line or line.startswith("git ")):
            key, _, value = line.partition(": ") if not line.startswith("git ") else ("software", "", line)
            sessions[-1]["header"][key] = value
        elif part == "config" and line.startswith("  ") and " = " in line:
            key, value = line.strip().split(" = ", 1)
            sessions[-1]["config"][key] = value
        else:
            part = None
            if m := re.match(r"training (\d+) steps from step (\d+)", line):
                sessions[-1]["steps"], sessions[-1]["first"] = int(m.group(1)), int(m.group(2))
            if line.startswith("sample: "):
                try:
                    text = ast.literal_eval(line[len("sample: "):])
                except (ValueError, SyntaxError):
                    text = line[len("sample: "):]
                if not prev_sample:
                    groups.append([])
                groups[-1].append(str(text))
        prev_sample = line.startswith("sample: ")
    return sessions, groups


def wall_time(metrics: dict, sessions: list) -> float:
    """Seconds the run ran: each session (train.log) from its start to its last kept record, so neither the pause
    between a kill and the resume nor the work redone after it counts twice; without train.log, from the first
    record to the last."""
    times = sorted(r["time"] for recs in metrics.values() for r in recs if _num(r.get("time")))
    if not times:
        return 0.0
    starts = [s["start"] for s in sessions] + [math.inf]
    total = sum(max([t for t in times if a <= t < b], default=a) - a for a, b in zip(starts, starts[1:]))
    return total or times[-1] - times[0]


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(recs, key, scale=1.0):
    """(steps, values) of the records where `key` is a finite number: a killed step's NaN is a gap, not a crash."""
    pts = [(r["step"], r[key] * scale) for r in recs if _num(r.get(key))]
    return ([s for s, _ in pts], [v for _, v in pts])


def _is_score(key):
    return key.startswith("acc") or key in ("bleu4", "rougeL")


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def describe_run(run_dir: Path, stage: str) -> dict:
    """Everything the page shows of one run, read once."""
    metrics, bad = load_metrics(run_dir / "metrics.jsonl")
    sessions, sample_groups = parse_train_log(run_dir / "train.log")
    train, evals = metrics.get("train", []), metrics.get("eval", [])
    ckpts = CheckpointManager(run_dir)
    latest = ckpts.latest()
    meta = ckpts.meta(int(latest.stem.split("_")[1])) if latest else {}
    planned = next((s["steps"] for s in reversed(sessions) if "steps" in s), None)
    done = bool(meta.get("final"))
    if done:
        status = f"finished ({meta['step']} steps)"
    else:
        ago = time.time() - max((r["time"] for r in train + evals), default=time.time())
        status = (f"not finished: step {train[-1]['step'] + 1 if train else 0} of {planned or '?'}, last record "
                  f"{_duration(ago)} ago (still running, or stopped: continue it with --auto_resume=True)")
    best = min((r for r in evals if _num(r.get("val_loss"))), key=lambda r: r["val_loss"], default=None)
    return {"stage": stage, "dir": run_dir, "train": train, "evals": evals, "bad_lines": bad, "sessions": sessions,
            "sample_groups": sample_groups, "done": done, "status": status, "best": best, "latest": latest,
            "wall": wall_time(metrics, sessions), "resumes": [s["first"] for s in sessions[1:] if s.get("first")]}


# ---- plots ----

def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only: a training box has no display
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 100})
    return plt


def _save(fig, path: Path):
    for ax in fig.axes:  # steps and tokens are whole numbers: no "2.5" ticks on a short run
        ax.xaxis.get_major_locator().set_params(integer=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)  # a reader of a live report sees the old plot or the new one, never half of one
    _plt().close(fig)


def smooth(ys: list) -> list:
    """Debiased EMA over a tenth of the points (at most 100): the trend through step-to-step noise, starting where
    the run did."""
    beta, avg, out = 1 - 2 / (min(100, max(1, len(ys) // 10)) + 1), 0.0, []
    for i, y in enumerate(ys):
        avg = beta * avg + (1 - beta) * y
        out.append(avg / (1 - beta ** (i + 1)) if beta else y)
    return out


def _scale_y(ax, values):
    # log scale where the curve spans a wide range (a base run's fast start and slow end alike); a narrow range
    # (SFT's loss, say) stays linear, where log would leave one or two tick labels
    from matplotlib.ticker import FormatStrFormatter
    values = [v for v in values if v > 0]
    if values and max(values) > 3 * min(values):
        ax.set_yscale("log")
        for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            set_formatter(FormatStrFormatter("%.3g"))
        return ", log scale"
    return ""


def plot_loss(r, title, path):
    """Train loss (raw and smoothed) and validation loss against steps and against tokens."""
    import numpy as np
    from matplotlib.ticker import EngFormatter
    steps, loss = _series(r["train"], "loss")
    val_steps, val = _series(r["evals"], "val_loss")
    # tokens trained after s steps, interpolated between logged steps (log_every > 1 logs only some): what the
    # model behind a step's train loss and behind an eval at that step has seen
    known = [(0, 0)] + [(t["step"] + 1, t["tokens"]) for t in r["train"] if _num(t.get("tokens"))]
    fig, axes = _plt().subplots(1, 2, figsize=(14, 5.5), layout="constrained")
    for ax, x, label in ((axes[0], np.asarray, "optimizer step"),
                         (axes[1], lambda s: np.interp(s, *zip(*known)), "tokens trained")):
        ax.plot(x(steps), loss, color="C0", alpha=0.3, lw=1, label="train loss")
        ax.plot(x(steps), smooth(loss), color="C0", lw=2.2, label="train loss, smoothed")
        if val:
            ax.plot(x(val_steps), val, "o-", color="C3", ms=5, lw=1.5, label="validation loss")
        for i, s in enumerate(r["resumes"]):
            ax.axvline(x(s), color="grey", ls=":", lw=1.2, label=None if i else "resumed here")
        scale = _scale_y(ax, loss + val)
        ax.set(xlabel=label, ylabel=f"loss (nats per token{scale})", title=f"{title}: loss against {label}")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.legend()
    _save(fig, path)


def plot_system(r, title, path):
    """Learning rate, tokens/s with MFU, memory, gradient norm: how the run used the machine, step by step."""
    from matplotlib.ticker import EngFormatter
    train = r["train"]
    fig, ((lr, speed), (mem, gn)) = _plt().subplots(2, 2, figsize=(14, 8.5), layout="constrained")
    lr.plot(*_series(train, "lr"), color="C2", lw=2)
    lr.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate (AdamW groups; Muon's has this shape)")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    steps, rate = _series(train, "tok_per_s")
    speed.plot(steps, rate, color="C0", alpha=0.35, lw=1, label="tokens/s")
    speed.plot(steps, smooth(rate), color="C0", lw=2, label="tokens/s, smoothed")
    speed.set_ylim(0, 1.25 * max(rate, default=1))  # from 0: a 2 % wobble must not look like a collapse
    speed.yaxis.set_major_formatter(EngFormatter(sep=""))
    speed.set(xlabel="optimizer step", ylabel="tokens/s (all GPUs)", title="throughput and MFU")
    ratio = [100 * t["mfu"] / t["tok_per_s"] for t in train if _num(t.get("mfu")) and t.get("tok_per_s")]
    if ratio and max(ratio) < 1.01 * min(ratio):
        # MFU is tokens/s times FLOPs per token over peak FLOP/s, a constant while the device and the GPU count
        # stay: one curve with a second scale, rather than two lines hiding each other
        k = ratio[0]
        speed.secondary_yaxis("right", functions=(lambda v: v * k, lambda m: m / k)).set_ylabel("MFU (% of peak)")
    elif ratio:  # resumed on another device or GPU count: MFU gets its own line
        twin = speed.twinx()
        twin.plot(*_series(train, "mfu", 100), color="C1", lw=1.5)
        twin.set(ylabel="MFU (% of peak)", ylim=(0, 1.25 * max(_series(train, "mfu", 100)[1])))
        twin.grid(False)
        speed.plot([], [], color="C1", label="MFU (right axis)")
    else:
        speed.plot([], [], " ", label="MFU: n/a (peak FLOP/s unknown here)")
    speed.legend(loc="lower right")
    for key, label in (("gpu_reserved_gb", "GPU reserved (peak)"), ("gpu_alloc_gb", "GPU allocated (peak)"),
                       ("rss_gb", "host RAM (RSS)")):
        if _series(train, key)[0]:
            mem.plot(*_series(train, key), lw=2, label=label)
    mem.set(xlabel="optimizer step", ylabel="GB", title="memory",
            ylim=(0, 1.15 * max([max(line.get_ydata()) for line in mem.get_lines()], default=1)))
    mem.legend()
    norm_steps, norms = _series(train, "grad_norm")
    gn.plot(norm_steps, norms, color="C4", lw=1.2, label="gradient norm (before clipping)")
    skipped = [t["step"] for t in train if t.get("skipped")]
    if skipped:  # fp16 overflows and non-finite steps: no update was applied
        gn.plot(skipped, [min(norms, default=1)] * len(skipped), "x", color="C3", ms=8,
                label=f"skipped update ({len(skipped)})")
    gn.set(xlabel="optimizer step", ylabel=f"norm{_scale_y(gn, norms)}", title="gradient norm")
    gn.legend()
    fig.suptitle(f"{title}: learning rate, speed, memory, gradients", fontsize=14)
    _save(fig, path)


def plot_scores(r, title, path):
    """Task accuracies (mid, SFT) and BLEU-4/ROUGE-L (Dolly) at each eval, all on a 0-100 scale."""
    evals = r["evals"]
    fig, ax = _plt().subplots(figsize=(14, 5), layout="constrained")
    for k in sorted({k for e in evals for k in e if _is_score(k)}):
        ax.plot(*_series(evals, k, 100 if k.startswith("acc") else 1), "o-", ms=5,
                lw=2.2 if k in ("acc", "bleu4", "rougeL") else 1, label=k)
    last = max([e["step"] for e in evals + r["train"]])
    ax.set(xlabel="optimizer step", ylabel="score (accuracy in %; BLEU-4, ROUGE-L: 0-100)",
           title=f"{title}: scores at each eval", xlim=(-0.02 * last, 1.02 * last),  # the whole run, if one eval
           ylim=(0, max([5] + [1.15 * max(line.get_ydata()) for line in ax.get_lines()])))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)


def plot_run(r: dict, folder: Path) -> list:
    """The plots this run has data for, as [(what, file name)]: <stage>_loss.png, _system.png, _evals.png."""
    title, prefix = STAGE_TITLES.get(r["stage"], r["stage"]), r["stage"]
    out = []
    for what, name, plot, has_data in (
            ("loss", "loss", plot_loss, r["train"] or _series(r["evals"], "val_loss")[0]),
            ("learning rate, speed, memory, gradients", "system", plot_system, r["train"]),
            ("scores", "evals", plot_scores, any(_is_score(k) for e in r["evals"] for k in e))):
        if has_data:
            plot(r, title, folder / f"{prefix}_{name}.png")
            out.append((what, f"{prefix}_{name}.png"))
    return out


# ---- samples ----

def run_samples(r: dict, n: int) -> tuple:
    """([(prompt, answer)], where they come from): base's logged samples, Dolly's newest generation eval, else
    greedy answers of the run's newest checkpoint to fixed prompts (mid and SFT log none)."""
    if n <= 0:
        return [], ""
    if r["sample_groups"]:
        return [("", s) for s in r["sample_groups"][-1][:n]], "the last samples train_base logged (train.log)"
    gens = sorted(r["dir"].glob("generations_*.jsonl"))
    if gens:
        rows = [json.loads(line) for line in gens[-1].read_text(encoding="utf-8").splitlines() if line.strip()]
        return ([(x["instruction"] + (f"\n\n{x['context']}" if x.get("context") else ""),
                  f"{x['generation']}\n\n(reference: {x['reference']})") for x in rows[:n]],
                f"the generation eval of {gens[-1].name}")
    if r["stage"] == "dolly" or r["latest"] is None:  # Dolly's prompt format may be Alpaca's: no guessing
        return [], "none logged yet"
    from checkpoint import load_model
    from evaluate import generate_answers
    try:
        model, tok, meta = load_model(str(r["latest"]), common.resolve_device(device))
    except (UserError, OSError, RuntimeError) as e:  # rotated away by a run still training, a moved tokenizer...
        return [], f"none: {e}"
    chat, fmt = r["stage"] != "base", tok.chat_format
    prompts = [(p, fmt.render_prompt([{"role": "user", "content": p}]) if chat else fmt.render_plain_prompt(p))
               for p in (CHAT_PROMPTS if chat else PLAIN_PROMPTS)[:n]]
    prompts = [(p, ids) for p, ids in prompts if len(ids) < model.config.max_seq_len]
    answers = generate_answers(model, tok, [ids for _, ids in prompts], max_tokens=64,
                               stop_ids=fmt.stop_ids(chat=chat))
    return ([(p, a) for (p, _), (a, _) in zip(prompts, answers)],
            f"greedy answers of {r['latest'].name} (step {meta['step']}), made for this report")


# ---- the page ----

def _cell(v) -> str:
    if isinstance(v, float):
        v = f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(head, rows) -> str:
    lines = ["| " + " | ".join(map(_cell, head)) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(_cell, row)) + " |" for row in rows])


def _fenced(text: str) -> str:
    # a fence longer than any backtick run inside, so a model's own ``` cannot end the block early
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


def stage_section(r: dict, folder: Path) -> str:
    evals, sessions = r["evals"], r["sessions"]
    head = sessions[-1]["header"] if sessions else {}
    out = [f"## {STAGE_TITLES.get(r['stage'], r['stage'])}: `{r['dir']}`", "", f"**Status:** {r['status']}."]
    if r["bad_lines"]:
        out.append(f"metrics.jsonl: {r['bad_lines']} line(s) were not a whole record (cut by a kill) and are left out.")
    out += [""] + ([f"![{what}]({png})" for what, png in plot_run(r, folder)] or ["(no step logged yet)"])
    out += ["", "### Setup", "", _table(["", ""], [(k, head[k]) for k in (
        "device", "world_size", "dtype", "parameters", "batch", "horizon", "tokens", "tokenizer", "starts from",
        "software") if k in head] + [("wall time", _duration(r["wall"]))])]
    if len(sessions) > 1:
        out += ["", f"{len(sessions)} sessions (a start and {len(sessions) - 1} resume(s)): " + "; ".join(
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(s['start']))} from step {s.get('first', '?')} on "
            f"{s['header'].get('world_size', '?')} x {s['header'].get('device', '?')}" for s in sessions) + "."]
    if sessions:
        cfg = sessions[-1]["config"]
        out += ["", f"<details><summary>config ({len(cfg)} settings)</summary>", "",
                _table(["setting", "value"], sorted(cfg.items())), "", "</details>"]
    if evals:
        keys = [k for k in ("val_loss", "val_bpb") if any(k in e for e in evals)]
        keys += sorted({k for e in evals for k in e if _is_score(k)})
        shown = evals[-eval_rows:] if eval_rows > 0 else evals
        out += ["", "### Evaluations during training", "",
                _table(["step", *keys], [(e["step"], *(e.get(k, "") for k in keys)) for e in shown])]
        if len(shown) < len(evals):
            out.append(f"\n(the newest {len(shown)} of {len(evals)}; all are in metrics.jsonl and the plots)")
    for path in sorted(r["dir"].glob("eval_*.json")):
        try:
            ev = json.loads(path.read_text(encoding="utf-8"))
            rows = [(task, metric, v["value"], v["stderr"], res.get("n", "")) for task, res in ev["results"].items()
                    for metric, v in res.items() if metric != "n" and not metric.startswith("acc/")]
        except (ValueError, KeyError, TypeError, AttributeError):
            out += ["", f"{path.name}: not eval.py's format, left out"]
            continue
        limit = f", the first {ev['limit']} items per task" if ev.get("limit", -1) > 0 else ""
        out += ["", f"### Benchmarks at step {ev.get('step')} (eval.py{limit})", "",
                _table(["task", "metric", "value", "± stderr", "n"], rows)]
    pairs, source = run_samples(r, samples)
    if samples > 0:
        out += ["", "### Samples", "", f"From {source}." if source else ""]
        for prompt, answer in pairs:
            out += ["", *([f"**{_cell(prompt)}**", ""] if prompt else []), _fenced(answer)]
    return "\n".join(out)


def write_report(runs, root, folder: Path, stamp: str) -> Path:
    """Plots first, then the page: report.md never names a plot that is not there yet."""
    folder.mkdir(parents=True, exist_ok=True)
    described = [describe_run(d, stage) for stage, d in runs]
    summary = _table(["stage", "run", "status", "steps", "tokens", "last train loss", "best val loss (step)",
                      "wall time"], [
        (STAGE_TITLES.get(r["stage"], r["stage"]), r["dir"].name, "finished" if r["done"] else "not finished",
         r["train"][-1]["step"] + 1 if r["train"] else 0, f"{r['train'][-1].get('tokens', 0):,}" if r["train"] else 0,
         r["train"][-1]["loss"] if r["train"] else "",
         f"{r['best']['val_loss']:.4f} ({r['best']['step']})" if r["best"] else "", _duration(r["wall"]))
        for r in described])
    where = f"the pipeline under `{root}`" if root else f"`{described[0]['dir']}`"
    page = [stamp, f"# t4chat report: {where}", "",
            f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by report.py from metrics.jsonl, train.log and the "
            f"checkpoint folders; run `python report.py` again to refresh it.", "", summary]
    page += ["", "\n\n".join(stage_section(r, folder) for r in described), ""]
    text = "\n".join(page)
    atomic_write_text(folder / "report.md", text)
    # plots of an earlier report that this one no longer shows (a stage gone, a run now without steps)
    shown = set(re.findall(r"\]\(([\w.]+\.png)\)", text))
    for old in folder.glob("*.png"):
        if re.fullmatch(rf"({'|'.join([*STAGE_DIRS, 'run'])})_(loss|system|evals)\.png", old.name) and \
                old.name not in shown:  # only the names report.py writes: --out_dir may hold the user's own files
            old.unlink()
    return folder / "report.md"


def _run_from_positional(argv):
    """`python report.py <run dir or stage>` -> --run=<it>: the configurator would take a bare word for a config
    file (a .py/.json/.yaml one still is one)."""
    out = list(argv)
    bare = [i for i, a in enumerate(out) if not a.startswith("-") and not a.endswith((".py", ".json", ".yaml", ".yml"))
            and not (i and out[i - 1].startswith("--") and "=" not in out[i - 1])]  # `--out_dir x`: x is its value
    if len(bare) > 1:
        raise UserError(f"one run at a time, got {' and '.join(out[i] for i in bare)}; none = the whole pipeline")
    for i in bare:
        out[i] = f"--run={out[i]}"
    return out


def _inputs_stamp(runs) -> str:
    """What the page was made from: the runs, the settings and their newest file. Taken before anything is read,
    so a file a live run writes meanwhile makes the next call write the page again."""
    def mtime(p):
        try:
            return p.stat().st_mtime_ns if p.is_file() else 0
        except OSError:  # rotated away by a run still training
            return 0
    newest = max(mtime(p) for _, d in runs for p in d.iterdir())
    return json.dumps({"runs": [str(d) for _, d in runs], "samples": samples, "eval_rows": eval_rows,
                       "device": device, "newest": newest})


def main(argv=None):
    apply_overrides(globals(), _run_from_positional(sys.argv[1:] if argv is None else argv))
    runs, root = find_runs(run, run_name)
    folder = Path(out_dir).expanduser() if out_dir else (root / "report" if root else runs[0][1] / "report")
    stamp, md = f"<!-- report.py: {_inputs_stamp(runs)} -->", folder / "report.md"
    what = ", ".join(f"{STAGE_TITLES.get(s, s)} {d.name}" for s, d in runs)
    # the run scripts call us after every (re)run: when no stage moved, the page is already right, and redrawing
    # a dozen plots would only make "skip the finished stages" slow
    if not force and md.is_file() and md.read_text(encoding="utf-8").startswith(stamp + "\n"):
        print(f"report: {md} is up to date ({what}: nothing changed since; --force=True writes it again)")
        return
    write_report(runs, root, folder, stamp)
    print(f"report: {md} ({what})")


if __name__ == "__main__":
    common.run(main)
