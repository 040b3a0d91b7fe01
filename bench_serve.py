"""bench_serve.py: what batched decoding buys: serve.py's aggregate tokens/s and time to first token with 1, 4 and 8
concurrent streaming clients, against one server started here.
in:  a checkpoint (default: a new depth-12 model with GPT-2's tokenizer in a temp folder; speed does not depend on
     the weights)                                                                  out: a table and one JSON line
    python bench_serve.py                              # depth 12 on the CPU; about a minute on 2 cores
    python bench_serve.py --checkpoint=sft --device=cuda --clients=1,8,32 --max_batch=32
Each client sends `requests_per_client` streaming requests one after another; every answer runs to max_tokens
(ignore_eos), so each concurrency level decodes the same number of tokens. Aggregate tokens/s = all answer
tokens / wall time of the level; time to first token = from sending a request to its first text.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

import common
from checkpoint import CheckpointManager
from common import UserError
from configurator import apply_overrides

# ---- config (module globals; override with --key=value; -h lists them) ---------------------------------------
checkpoint = ""               # "" = a new depth-`depth` model, GPT-2 tokenizer, random weights; else as serve.py takes it
depth = 12                    # size of the new model ("" checkpoint only)
max_seq_len = 1024            # context of the new model ("" checkpoint only)
clients = "1,4,8"             # concurrency levels, run in this order
requests_per_client = 3       # streaming requests each client sends, one after another
max_tokens = 64               # answer tokens per request
max_batch = 8                 # serve.py --max_batch
device = "cpu"                # serve.py --device
threads = -1                  # OMP_NUM_THREADS of the server; -1 = torch's default (one per core)
json_out = ""                 # also write the JSON line to this file
# ----------------------------------------------------------------------------------------------------------------

PROMPT = "Explain in a few sentences why the sky is blue and why sunsets are red."


def new_checkpoint(folder: Path) -> Path:
    """A randomly initialised SFT-stage checkpoint laid out as the stage scripts write it."""
    from model import GPT, GPTConfig
    from tokenizer import get_tokenizer
    tok = get_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=depth, vocab_size=tok.vocab_size, max_seq_len=max_seq_len))
    run = folder / "chatsft_checkpoints" / f"d{depth}"
    state = {"model": model.state_dict(), "arch": model.config.arch_dict(), "tokenizer": tok.describe(),
             "stage": "sft", "step": 0, "config": {}, "world_size": 1}
    CheckpointManager(run).save(0, state, {"stage": "sft", "note": "bench_serve.py: random weights"})
    return run


def start_server(spec):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "serve.py"), f"--checkpoint={spec}", "--port=0",
           f"--device={device}", f"--max_batch={max_batch}", "--access_log=False", f"--max_tokens_cap={max_tokens}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # serve.py prints its address once the model is loaded and warmed up
        print(line, end="", file=sys.stderr)
        if line.startswith("serving on "):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, line.split()[2]
    raise UserError(f"serve.py exited with {proc.wait()} before it served")


def one_request(url):
    """(seconds to the first text, answer tokens, seconds in all) of one streamed request."""
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, tokens, time.perf_counter() - t0


def level(url, n):
    """Run n clients at once; the figures of this concurrency level."""
    results, errors = [], []

    def client():
        try:
            for _ in range(requests_per_client):
                results.append(one_request(url))
        except Exception as e:  # noqa: BLE001 - a failed request makes the level invalid; reported below
            errors.append(e)

    workers = [threading.Thread(target=client) for _ in range(n)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    if errors:
        raise UserError(f"{len(errors)} request(s) failed at {n} clients: {errors[0]!r}")
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"clients": n, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
            "tok_per_s": round(tokens / wall, 2), "per_client_tok_per_s": round(tokens / wall / n, 2),
            "ttft_mean_s": round(statistics.mean(ttft), 3), "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_max_s": round(ttft[-1], 3)}


def main():
    apply_overrides(globals(), sys.argv[1:])
    levels = [int(c) for c in str(clients).split(",") if c.strip()]
    if not levels or min(levels) < 1:
        raise UserError(f"--clients={clients!r}: concurrency levels separated by commas, e.g. 1,4,8")
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        spec = checkpoint or str(new_checkpoint(Path(tmp)))
        proc, url = start_server(spec)
        try:
            one_request(url)  # one more warm-up, through HTTP this time
            rows = []
            for n in levels:
                rows.append(level(url, n))
                r = rows[-1]
                print(f"{n} client(s): {r['tok_per_s']:.1f} tok/s aggregate, TTFT mean {r['ttft_mean_s']:.2f} s",
                      file=sys.stderr, flush=True)
            health = httpx.get(url + "/health", timeout=10).json()
        finally:
            proc.terminate()
            proc.wait(30)
    base = rows[0]["tok_per_s"]
    print(f"\n| clients | aggregate tok/s | per client tok/s | vs {levels[0]} client(s) | TTFT mean | TTFT p50 | "
          f"TTFT max |\n| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['clients']} | {r['tok_per_s']:.1f} | {r['per_client_tok_per_s']:.1f} | "
              f"{r['tok_per_s'] / base:.2f}x | {r['ttft_mean_s']:.2f} s | {r['ttft_p50_s']:.2f} s | "
              f"{r['ttft_max_s']:.2f} s |")
    out = {"checkpoint": health["checkpoint"] if checkpoint else f"new depth-{depth} model (random weights)",
           "device": health["device"], "dtype": health["dtype"], "max_batch": max_batch, "max_tokens": max_tokens,
           "requests_per_client": requests_per_client, "threads": threads,
           "machine": common.device_name(torch.device(health["device"][0])), "torch": torch.__version__,
           "peak_running": health["requests"].get("peak_running"), "levels": rows,
           "wall_s": round(time.time() - t_start, 1)}
    print(json.dumps(out))
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    common.run(main)
