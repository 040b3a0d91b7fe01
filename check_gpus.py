"""check_gpus.py: an all-reduce across every process of a torchrun launch, checked for the right answer.
Run by the multi-GPU run_*.sh scripts before training:  torchrun --standalone --nproc_per_node=4 check_gpus.py
Consumer cards without P2P/NVLink (RTX 30xx/40xx in one box) can hang in NCCL or, worse, return wrong sums; this
finds out in seconds, under TIMEOUT_S (default 120), instead of an hour into a run, and names the fix.
"""
import os
import sys
import threading

import torch
import torch.distributed as dist

import common

FIX = ("set NCCL_P2P_DISABLE=1 (GPUs without P2P/NVLink), and NCCL_IB_DISABLE=1 on machines without InfiniBand, "
       "then run the script again; NCCL_DEBUG=INFO shows what NCCL tried")


def main():
    timeout_s = float(os.environ.get("TIMEOUT_S", "120"))
    # a hung collective never returns: a watchdog thread ends the process with the advice instead
    watchdog = threading.Timer(timeout_s, lambda: (print(f"error: the all-reduce did not finish in {timeout_s:.0f} s; "
                                                         f"{FIX}", file=sys.stderr, flush=True), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    d = common.setup_distributed("auto")
    n = 1 << 22  # 16 MB of float32: large enough to take the P2P path a real gradient all-reduce takes
    t = torch.full((n,), float(d.rank + 1), device=d.device)
    common.all_reduce(t)
    want = d.world_size * (d.world_size + 1) / 2
    bad = int((t != want).sum().item())
    ok = torch.tensor([1.0 if bad == 0 else 0.0], device=d.device)
    common.all_reduce(ok, dist.ReduceOp.MIN)
    watchdog.cancel()
    if ok.item() < 1:
        if d.rank == 0:
            print(f"error: the all-reduce over {d.world_size} process(es) returned wrong values ({bad:,} of {n:,} on "
                  f"rank 0); {FIX}", file=sys.stderr, flush=True)
        sys.exit(2)
    common.print0(f"GPU self-check: all-reduce over {d.world_size} process(es) on {common.device_name(d.device)}: ok")


if __name__ == "__main__":
    common.run(main)
