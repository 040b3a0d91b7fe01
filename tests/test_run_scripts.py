"""The run_*.sh scripts: they parse, DRY_RUN=1 prints the guides' settings, and the quick test runs every stage on
the CPU with the built-in data, skips finished stages and resumes a killed one. python -m pytest -q tests/test_run_scripts.py"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SHARED

SCRIPTS = sorted(p.name for p in REPO.glob("run_*.sh") if p.name != "run_common.sh")
GUIDES = SHARED / "guides"


def bash(script, *args, env=None, timeout=600, **kw):
    e = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
         "OMP_NUM_THREADS": "1", **(env or {})}
    e.pop("TIKTOKEN_CACHE_DIR", None)
    return subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, env=e, timeout=timeout,
                          cwd=REPO, **kw)


def dry_run(script, base_dir, **env):
    p = bash(script, env={"DRY_RUN": "1", "NANOCHAT_BASE_DIR": str(base_dir), "GPUS": "4", **env})
    assert p.returncode == 0, p.stderr
    return {m.group(1): m.group(0) for m in re.finditer(r"^\+ .*? (\w+\.py)\b.*$", p.stdout, re.M)}


def test_every_script_parses_and_dry_runs(tmp_path):
    assert {"run_t4_quick_test.sh", "run_t4_training.sh", "run_3x3080.sh", "run_rtx4060_laptop.sh",
            "run_single_gpu.sh", "run_cpu.sh", "run_multinode.sh"} <= set(SCRIPTS)
    for script in SCRIPTS + ["run_common.sh"]:
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0, script
        text = (REPO / script).read_text(encoding="utf-8")
        if script != "run_common.sh":
            assert "set -euo pipefail" in text and '"$@"' in text, script
    env = {"NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}  # what run_multinode.sh insists on
    for script in SCRIPTS:
        lines = dry_run(script, tmp_path / "nc", **env)
        stages = [s for s in ("train_base.py", "train_mid.py", "train_sft.py", "finetune_dolly.py") if s in lines]
        assert len(stages) == 4, (script, lines)
        assert all("--auto_resume=True" in lines[s] for s in stages), script
        assert not (tmp_path / "nc").exists() or not any((tmp_path / "nc").rglob("*.pt")), "DRY_RUN trained"


def _number(pattern, text):
    m = re.search(pattern, text)
    assert m, pattern
    return int(m.group(1).replace(",", ""))


@pytest.mark.skipif(not GUIDES.is_dir(), reason="../shared/guides is absent (only CI and dev machines have it)")
def test_dry_run_lines_carry_the_guides_settings(tmp_path):
    t4 = (GUIDES / "t4_training_guide.zh.md").read_text(encoding="utf-8")
    base, mid, sft = (t4.split(f"### {h}")[1].split("###")[0] for h in ("基础模型训练", "中期训练", "SFT训练"))
    lines = dry_run("run_t4_training.sh", tmp_path)
    assert "--nproc_per_node=4" in lines["train_base.py"]
    for flag, pattern, section in (("--depth", r"模型深度\*\*: (\d+)", base), ("--max_seq_len", r"序列长度\*\*: (\d+)", base),
                                   ("--device_batch_size", r"设备批次大小\*\*: (\d+)", base),
                                   ("--total_batch_size", r"总批次大小\*\*: ([\d,]+)", base),
                                   ("--eval_every", r"评估频率\*\*: 每(\d+)步", base)):
        assert f"{flag}={_number(pattern, section)} " in lines["train_base.py"] + " ", flag
    for flag, pattern in (("--device_batch_size", r"设备批次大小\*\*: (\d+)"), ("--total_batch_size", r"总批次大小\*\*: ([\d,]+)"),
                          ("--eval_every", r"评估频率\*\*: 每(\d+)步")):
        assert f"{flag}={_number(pattern, mid)} " in lines["train_mid.py"] + " ", flag
    for flag, pattern in (("--device_batch_size", r"设备批次大小\*\*: (\d+)"),
                          ("--target_examples_per_step", r"目标样本数\*\*: (\d+)"), ("--eval_every", r"评估频率\*\*: 每(\d+)步")):
        assert f"{flag}={_number(pattern, sft)} " in lines["train_sft.py"] + " ", flag
    # the quick test: depth 8, 100 base steps, 50 mid, 20 SFT
    quick = dry_run("run_t4_quick_test.sh", tmp_path)
    depth = _number(r"深度(\d+)的模型", t4)
    assert f"--depth={depth} " in quick["train_base.py"]
    for script, pattern in (("train_base.py", r"(\d+)步基础训练"), ("train_mid.py", r"(\d+)步中期训练"),
                            ("train_sft.py", r"(\d+)步SFT训练")):
        assert f"--max_steps={_number(pattern, t4)} " in quick[script], script
    # the 8 GB laptop: fp16, gradient checkpointing, batch 1 x 64, 5 epochs, warmup_ratio 0.2, max_rounds 6
    laptop = (GUIDES / "rtx4060_8gb_sft_guide.zh.md").read_text(encoding="utf-8")
    sft_line = dry_run("run_rtx4060_laptop.sh", tmp_path)["train_sft.py"]
    assert "--dtype=float16" in sft_line and "--gradient_checkpointing=True" in sft_line
    for flag, pattern in (("--device_batch_size", r"BSZPERDEV=(\d+)"), ("--target_examples_per_step", r"TOTALBSZ=(\d+)"),
                          ("--num_epochs", r"num_train_epochs=(\d+)"), ("--max_rounds", r"max_rounds=(\d+)")):
        assert f"{flag}={_number(pattern, laptop)}" in sft_line, flag
    assert "--warmup_ratio=0.2" in sft_line and "--warmup_ratio 0.2" in laptop
    # 3x RTX 3080: the large-dataset guide's batch, accumulation and sequence length, through config/large_dataset.py
    big = (GUIDES / "large_dataset_low_memory_pretraining_guide.zh.md").read_text(encoding="utf-8")
    line = dry_run("run_3x3080.sh", tmp_path)["train_base.py"]
    assert "--nproc_per_node=3" in line and "config/large_dataset.py" in line
    cfg = (REPO / "config" / "large_dataset.py").read_text(encoding="utf-8")
    for key, pattern in (("device_batch_size", r"`batch_size_per_gpu` \| (\d+)"),
                         ("grad_accum_steps", r"`gradient_accumulation_steps` \| (\d+)"),
                         ("max_seq_len", r"`max_seq_len` \| (\d+)")):
        assert re.search(rf"^{key} = {_number(pattern, big)}\b", cfg, re.M), key
    # several nodes, as the nano-gpt guide launches them
    line = dry_run("run_multinode.sh", tmp_path, NODE_RANK="1", MASTER_ADDR="192.168.1.1")["train_base.py"]
    assert "torchrun --nnodes=2 --node_rank=1 --master_addr=192.168.1.1 --master_port=29500" in line


QUICK = {"GPUS": "0", "DEPTH": "2", "CPU_SEQ_LEN": "128", "BASE_STEPS": "4", "MID_STEPS": "12", "SFT_STEPS": "2",
         "DOLLY_STEPS": "2", "HF_ENDPOINT": "http://127.0.0.1:9"}  # the discard port: no network


@pytest.mark.slow
def test_quick_test_offline_on_cpu_runs_every_stage_skips_and_resumes(tmp_path):
    env = {**QUICK, "NANOCHAT_BASE_DIR": str(tmp_path / "nc")}
    mid = tmp_path / "nc" / "mid_checkpoints" / "quick_test"
    # killed during mid-training (after its checkpoint at step 6 of 12), bash and its python child alike
    e = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", **env}
    e.pop("TIKTOKEN_CACHE_DIR", None)
    proc = subprocess.Popen(["bash", str(REPO / "run_t4_quick_test.sh")], cwd=REPO, env=e, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (mid / "ckpt_000006.json").exists():
        assert proc.poll() is None and time.time() - t0 < 300, "the script ended before mid-training's checkpoint"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (mid / "ckpt_000012.pt").exists(), "mid-training finished before the kill; the test proves nothing"
    # run again: base is skipped, mid resumes, the rest runs, and the model answers
    p = bash("run_t4_quick_test.sh", env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "built-in data" in p.stdout and "no GPU found" in p.stdout
    assert "[done]" in p.stdout and "checkpoints/quick_test holds its final checkpoint: skipping train_base.py" in p.stdout
    assert re.search(r"starts from: \S+/mid_checkpoints/quick_test/ckpt_0000(06|12)\.pt \(resume, step", p.stdout)
    assert "loaded " in p.stderr and "stage dolly" in p.stderr and "quick test done" in p.stdout
    answer = p.stdout.split("--temperature=0\n", 1)[1].split("quick test done")[0]
    assert answer.strip(), p.stdout[-2000:]
    # and again: every stage is skipped, in seconds
    t0 = time.time()
    p = bash("run_t4_quick_test.sh", env=env)
    assert p.returncode == 0 and p.stdout.count("[done]") == 4, p.stdout[-2000:]
    assert not re.search(r"^training \d+ steps", p.stdout, re.M), p.stdout[-2000:]
    assert time.time() - t0 < 30


@pytest.mark.slow
def test_run_multinode_as_two_local_nodes_trains_like_one_process(tiny_corpus, tmp_path):
    """run_multinode.sh started twice on 127.0.0.1 (node_rank 0 and 1, one CPU process each) trains the base stage
    like one process with the same total batch, after its all-reduce self-check across the two nodes."""
    import socket
    from conftest import read_metrics, run_script
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tiny = ["--n_embd=64", "--max_seq_len=64", "--device_batch_size=4", "--total_batch_size=1024", "--max_steps=6",
            "--eval_every=3", "--checkpoint_interval=3", "--eval_tokens=1024", "--sample_every=-1", "--device=cpu",
            "--compile=False"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "NANOCHAT_BASE_DIR": str(tmp_path / "nc"), "NNODES": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "NPROC": "1", "DEPTH": "2", "TOKENIZER": "bytes", "DATA_ROOT": str(tiny_corpus),
           "DOLLY_PATH": "-", "MIXTURE": "", "STAGES": "base", "BASE_ARGS": " ".join(tiny), "CHECK_TIMEOUT": "60",
           "PREPARE_TIMEOUT": "60"}
    nodes = [subprocess.Popen(["bash", str(REPO / "run_multinode.sh")], cwd=REPO, env={**env, "NODE_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "GPU self-check: all-reduce over 2 process(es)" in outs[0]
    assert "1,024 tokens/step = 4 seqs x 64 tokens x 2 GPUs x 2 accumulation" in outs[0]
    one = tmp_path / "one"
    run_script("train_base.py", "--tokenizer=bytes", "--depth=2", f"--data_root={tiny_corpus}", f"--out_dir={one}",
               *tiny)
    l1, l2 = read_metrics(one), read_metrics(tmp_path / "nc" / "checkpoints" / "d2")
    assert sorted(l1) == sorted(l2) == list(range(6))
    for s in range(6):
        assert l2[s]["loss"] == pytest.approx(l1[s]["loss"], rel=1e-4), s
    assert read_metrics(tmp_path / "nc" / "checkpoints" / "d2", "eval")[6]["val_loss"] == pytest.approx(
        read_metrics(one, "eval")[6]["val_loss"], rel=1e-4)
