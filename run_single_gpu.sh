#!/usr/bin/env bash
# run_single_gpu.sh: the T4 pipeline on one GPU (16 GB or more): the same global batch as 4x T4, with 4x the gradient
# accumulation, so the same model in about 4x the time (base ~40 h on one T4 at 20 tokens/parameter; a 24 GB card
# in bf16 is ~3x faster). Disk as run_t4_training.sh. Knobs: those of run_t4_training.sh (NPROC=1 here).
set -euo pipefail
cd "$(dirname "$0")"
export NPROC=1 RUN_SCRIPT=$0
exec bash run_t4_training.sh "$@"
