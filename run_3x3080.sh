#!/usr/bin/env bash
# run_3x3080.sh: 3x RTX 3080 20 GB (bf16) with only 12 GB of host RAM, the large-dataset guide's setup: base
# pretraining with its settings (config/large_dataset.py: 32 sequences of 192 tokens per GPU x 3 GPUs x 2
# accumulation, AdamW 1e-4, 1,024 warmup steps, 3 epochs, the 5 best checkpoints kept, a log line every 100
# steps), then mid, SFT and Dolly with the stage defaults. Shards are streamed, so 10 M rows fit in 12 GB of RAM.
#   Data: your prompt/response (or text) parquet shards, DATA_ROOT=/path/to/shards (default: FineWeb-Edu shards).
#   Time and disk: they follow your corpus (3 epochs over 10 M rows of ~200 tokens: ~6 B tokens, days on 3x 3080).
# Knobs: those of run_t4_training.sh (NPROC=3 here). NCCL: a 30-minute timeout (the guide's NCCL_TIMEOUT=1800);
# consumer cards without NVLink may need NCCL_P2P_DISABLE=1, which the GPU self-check tells you before training.
set -euo pipefail
cd "$(dirname "$0")"
export NPROC=${NPROC:-3}
export NCCL_TIMEOUT=${NCCL_TIMEOUT:-1800}
export NCCL_SHM_DISABLE=${NCCL_SHM_DISABLE:-0}   # the guide's default; 1 when /dev/shm is too small (Docker)
export PRESET_BASE_ARGS=config/large_dataset.py RUN_SCRIPT=$0
export PRESET_MID_ARGS="" PRESET_SFT_ARGS=""   # the stage defaults fit a 20 GB card
exec bash run_t4_training.sh "$@"
