#!/usr/bin/env bash
# run_t4_quick_test.sh: the T4 guide's quick test. Every stage, briefly, to see that the machine, the data and the
# code work before a real run: base (depth 8, 100 steps), mid (50 steps), SFT (20), a short Dolly finetune (20),
# the report of every stage ($NANOCHAT_BASE_DIR/report/report.md), then one answer from the model.
#   GPUs: all it finds, under torchrun (4x T4: about 15 min). No GPU: the same stages on the CPU with a small model
#   (depth 4, the byte tokenizer), about 2 min on 2 cores; it says so when it starts.
#   Disk: ~250 MB (2 FineWeb-Edu shards, Dolly); a few MB with the built-in data (no network: used automatically).
# Knobs (environment, default): NPROC (GPUs found), DEPTH (8; CPU 4), BASE_STEPS (100), MID_STEPS (50),
#   SFT_STEPS (20), DOLLY_STEPS (20), NUM_SHARDS (2), DATA_ROOT (downloaded, else built-in), MIXTURE (the built-in
#   tasks), DOLLY_PATH (downloaded, else built-in), RUN_NAME (quick_test), CPU_SEQ_LEN (256), DRY_RUN=1, and those of
#   run_common.sh. Arguments go to every stage:  bash run_t4_quick_test.sh --device_batch_size=2
# Run it again after a kill: each stage continues from its last checkpoint, and finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")"
source ./run_common.sh

GPUS=${GPUS:-$(gpus_found)}  # GPUS=0 forces the CPU path
NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}
RUN_NAME=${RUN_NAME:-quick_test}
BASE_STEPS=${BASE_STEPS:-100}; MID_STEPS=${MID_STEPS:-50}; SFT_STEPS=${SFT_STEPS:-20}; DOLLY_STEPS=${DOLLY_STEPS:-20}
if [ "$GPUS" -gt 0 ]; then
  # the T4 guide's settings are the stage scripts' defaults; only the depth and the step counts change
  DEPTH=${DEPTH:-8}
  BASE=(--depth="$DEPTH")
  MID=(); SFT=(); DOLLY=()
else
  echo "no GPU found: running the quick test on the CPU with a small model (depth ${DEPTH:-4}, byte tokenizer)"
  DEPTH=${DEPTH:-4}; L=${CPU_SEQ_LEN:-256}
  BASE=(--depth="$DEPTH" --tokenizer=bytes --max_seq_len="$L" --device_batch_size=8 --total_batch_size=$((8 * L))
        --eval_tokens=$((32 * L)))
  MID=(--max_seq_len="$L" --device_batch_size=8 --total_batch_size=$((8 * L)) --eval_tokens=$((32 * L))
       --eval_examples_per_task=5)
  SFT=(--max_seq_len="$L" --device_batch_size=4 --target_examples_per_step=8 --eval_examples_per_task=5)
  # a model this small learns nothing at the guide's finetuning rate (3e-5)
  DOLLY=(--max_seq_len="$L" --device_batch_size=4 --target_examples_per_step=8 --max_lr=1e-3 --gen_eval_examples=8
         --gen_max_tokens=32)
fi

# ---- data: FineWeb-Edu shards and Dolly (the built-in data when there is no network) ----
if [ -z "${DATA_ROOT:-}" ] || [ -z "${DOLLY_PATH:-}" ]; then
  run "$PYTHON" prepare_data.py --what=base,dolly --num_shards="${NUM_SHARDS:-2}"
fi
pick_data
check_collectives

# ---- the four stages, each from the one before ----
CK=$BASE_DIR
stage "$CK/checkpoints/$RUN_NAME" train_base.py ${BASE[@]+"${BASE[@]}"} --data_root="$DATA_ROOT" --run_name="$RUN_NAME" \
  --max_steps="$BASE_STEPS" --eval_every=$(( (BASE_STEPS + 1) / 2 )) \
  --checkpoint_interval=$(( (BASE_STEPS + 1) / 2 )) "$@"
stage "$CK/mid_checkpoints/$RUN_NAME" train_mid.py ${MID[@]+"${MID[@]}"} --pretrained_checkpoint="$CK/checkpoints/$RUN_NAME" \
  --mixture="${MIXTURE:-}" --run_name="$RUN_NAME" --max_steps="$MID_STEPS" --eval_every=$(( (MID_STEPS + 1) / 2 )) \
  --checkpoint_interval=$(( (MID_STEPS + 1) / 2 )) "$@"
stage "$CK/chatsft_checkpoints/$RUN_NAME" train_sft.py ${SFT[@]+"${SFT[@]}"} \
  --pretrained_checkpoint="$CK/mid_checkpoints/$RUN_NAME" \
  --mixture="${MIXTURE:-}" --run_name="$RUN_NAME" --max_steps="$SFT_STEPS" --eval_every=$(( (SFT_STEPS + 1) / 2 )) \
  --checkpoint_interval=$(( (SFT_STEPS + 1) / 2 )) "$@"
stage "$CK/dolly_checkpoints/$RUN_NAME" finetune_dolly.py ${DOLLY[@]+"${DOLLY[@]}"} \
  --pretrained_checkpoint="$CK/chatsft_checkpoints/$RUN_NAME" --dolly_path="$DOLLY_PATH" --run_name="$RUN_NAME" \
  --max_steps="$DOLLY_STEPS" --warmup_steps=$(( DOLLY_STEPS / 10 )) --eval_every=$(( (DOLLY_STEPS + 1) / 2 )) \
  --checkpoint_interval=$(( (DOLLY_STEPS + 1) / 2 )) "$@"

# ---- the report: every stage's curves, setup, evals and samples on one page ----
report --run_name="$RUN_NAME"

# ---- one answer from the model ----
run "$PYTHON" chat.py --checkpoint="$CK/dolly_checkpoints/$RUN_NAME" -p "${PROMPT:-Who are you?}" --max_tokens=48 \
  --temperature=0
echo "quick test done. Chat with it: python chat.py --checkpoint=$CK/dolly_checkpoints/$RUN_NAME"
echo "      how each stage went: $BASE_DIR/report/report.md"
