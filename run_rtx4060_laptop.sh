#!/usr/bin/env bash
# run_rtx4060_laptop.sh: one RTX 4060 Laptop GPU with 8 GB, the 8 GB guide's recipe: fp16, gradient checkpointing,
# batch 1 with large accumulation; SFT with 64 conversations per step, 5 epochs, warmup_ratio 0.2, max_rounds 6.
# The whole pipeline at depth 8 (a ~100 M-parameter model; the guide's 135 M SmolLM2 needs Hugging Face import).
#   Time: base ~10 h at 20 tokens/parameter (the preflight's estimate), SFT and Dolly well under an hour each.
#   Disk: ~7 GB of data + ~1 GB of checkpoints. Windows (PowerShell): README.md lists the same steps as python lines.
# Knobs: those of run_t4_training.sh (NPROC=1, DEPTH=8 here).
set -euo pipefail
cd "$(dirname "$0")"
export NPROC=${NPROC:-1} DEPTH=${DEPTH:-8}
LOW_MEM="--dtype=float16 --gradient_checkpointing=True"
export PRESET_BASE_ARGS="$LOW_MEM --device_batch_size=2" RUN_SCRIPT=$0
export PRESET_MID_ARGS="$LOW_MEM --device_batch_size=1"
GUIDE_SFT="--device_batch_size=1 --target_examples_per_step=64 --num_epochs=5 --warmup_ratio=0.2 --max_rounds=6"
export PRESET_SFT_ARGS="$LOW_MEM $GUIDE_SFT"
export PRESET_DOLLY_ARGS="$LOW_MEM --device_batch_size=1"
exec bash run_t4_training.sh "$@"
