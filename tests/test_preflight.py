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
    assert "preflight for T4 (16 GiB, compute capability 7.5, float16" in text and "4 GPU(s)" in text
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
