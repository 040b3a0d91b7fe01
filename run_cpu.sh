#!/usr/bin/env bash
# run_cpu.sh: the whole pipeline on the CPU with a small model (depth 4, the byte tokenizer): something to chat
# with, on any machine, in about an hour on 2 cores (1,000 base steps, 200 mid, 100 SFT, 100 Dolly); the quick
# test's CPU path with more steps. Disk: a few MB (built-in data) to ~250 MB (2 FineWeb-Edu shards).
# Knobs: those of run_t4_quick_test.sh.
set -euo pipefail
cd "$(dirname "$0")"
export CUDA_VISIBLE_DEVICES="" GPUS=0 NPROC=1 RUN_SCRIPT=$0
export RUN_NAME=${RUN_NAME:-cpu} BASE_STEPS=${BASE_STEPS:-1000} MID_STEPS=${MID_STEPS:-200}
export SFT_STEPS=${SFT_STEPS:-100} DOLLY_STEPS=${DOLLY_STEPS:-100}
exec bash run_t4_quick_test.sh "$@"
