"""--preflight=True: memory per device and run time for a stage's settings on a named GPU, then exit without
training. python -m pytest -q tests/test_preflight.py"""
import torch

import preflight
from conftest import TINY, run_script


def test_preflight_prints_memory_time_and_the_largest_batch_then_exits(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    p = run_script("train_base.py", *TINY, f"--data_root={tiny_corpus}", f"--out_dir={out}", "--max_steps=1000",
                   "--total_batch_size=4096", "--preflight=True", "--gpu=4xT4")
    text = p.stdout
    assert "preflight for T4 (15 GiB, compute capability 7.5, float16" in text and "4 GPU(s)" in text
    for part in ("weights", "gradients", "optimizer state", "activations", "logits and loss", "DDP buckets"):
        assert part in text, part
    assert text.count("largest device_batch_size that fits") == 2 and "h of training" in text
    assert not out.exists() or not any(out.glob("ckpt_*")), "preflight trained"
    p = run_script("train_base.py", *TINY, f"--data_root={tiny_corpus}", f"--out_dir={out}", "--preflight=True",
                   "--gpu=T5", check=False)
    assert p.returncode == 2 and "is not one we know" in p.stderr and "RTX4060_8GB" in p.stderr


def test_activation_bytes_grow_with_tokens_and_checkpointing_keeps_only_block_inputs():
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(depth=2, n_embd=64, vocab_size=320, max_seq_len=256))
    full, _ = preflight.activation_model(model, torch.float32, False)
    ckpt, _ = preflight.activation_model(model, torch.float32, True)
    assert full > 10 * 64 * 4 * 2  # many saved tensors per layer and token
    assert 2 * 64 * 4 <= ckpt < full / 4  # the block inputs (float32, width 64, 2 layers), a little more
    a = preflight.saved_bytes(model, 2, 64, torch.float32)
    assert preflight.saved_bytes(model, 4, 64, torch.float32) > 1.8 * a - 1e6  # linear in the batch


def test_the_largest_batch_fits_and_one_more_does_not_and_gpu_counts_parse():
    from model import GPT, GPTConfig
    from schedule import Schedule
    model = GPT(GPTConfig(depth=2, n_embd=64, vocab_size=320, max_seq_len=256))
    opt = model.configure_optimizers("muon")
    c = {"gpu": "2xt4", "dtype": "auto", "max_seq_len": 256, "device_batch_size": 8, "gradient_checkpointing": False,
         "total_batch_size": 8192, "grad_accum_steps": -1}
    lines = []
    fits = preflight.report(model, opt, c=c, schedule=Schedule(steps=10, warmup=0, peak_lr=1e-3, final_lr=1e-4),
                            world_size=1, accum=4, tokens_per_step=8192, device=torch.device("cpu"),
                            print0=lines.append)
    assert "2 GPU(s) x 8 sequences of 256 tokens x 2 accumulation" in lines[0]  # the global batch stays
    usable = 15 * preflight.GIB - preflight.RESERVED_GIB * preflight.GIB

    def total(batch):
        est = preflight.estimate(model, opt, device_batch_size=batch, seq_len=256, dtype=torch.float16,
                                 gradient_checkpointing=False)
        return sum(v for k, v in est.items() if k not in ("per_token", "per_pass")) + est["gradients"]  # + DDP
    assert total(fits[False]) <= usable < total(fits[False] + 1) + 64 * 2 ** 20  # one more crosses (64 MB: chunk)
