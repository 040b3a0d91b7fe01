#!/usr/bin/env bash
# run_t4_training.sh: the whole pipeline on 4x T4 (16 GB, fp16), the T4 guide's full run: data, our own tokenizer,
# base (depth 12), mid, SFT, Dolly-15k finetuning, evaluation (eval.py), the report of every stage
# ($NANOCHAT_BASE_DIR/report/report.md: plots, setup, evals, samples), and the command to chat.
#   Settings: the T4 guide's, which are the stage scripts' defaults (base: seq 1024, 4 x 4 GPUs x 8 accumulation =
#   131,072 tokens/step; mid: 65,536 tokens/step; SFT: 8 conversations/step; Dolly: the nano-gpt guide's 1,750 steps).
#   Time on 4x T4 (python train_base.py --preflight=True --gpu=4xT4): base ~10 h at 20 tokens/parameter, more than
#   the guide's 2-4 h, which is BASE_ARGS="--max_steps=5000 ..." to 10,000; mid ~1-2 h, SFT < 1 h, Dolly ~1 h.
#   Disk: ~7 GB (64 FineWeb-Edu shards) + ~2 GB of checkpoints.
# Knobs (environment, default): NPROC (4), DEPTH (12), RUN_NAME (d$DEPTH), NUM_SHARDS (64), TOKENIZER (our own BPE,
#   trained first; gpt2 for GPT-2's), DATA_ROOT, MIXTURE (SmolTalk + GSM8K + built-in tasks), DOLLY_PATH,
#   BASE_ARGS / MID_ARGS / SFT_ARGS / DOLLY_ARGS (extra flags for one stage), STAGES (base,mid,sft,dolly,eval: the
#   ones to run), EVAL_DATA_DIR ($NANOCHAT_BASE_DIR/eval_data: eval.py's files; no files, no eval), EVAL_LIMIT
#   (500 items per task, so the answers of 14k MMLU questions do not add hours; -1 = all), DRY_RUN=1, and
#   those of run_common.sh. Arguments go to every stage:
#   bash run_t4_training.sh --device_batch_size=2
# The other setups (run_3x3080.sh, run_rtx4060_laptop.sh, run_single_gpu.sh, run_cpu.sh, run_multinode.sh) are this
# script with their own settings. Rerun after a kill: each stage resumes; finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")"
source ./run_common.sh

NPROC=${NPROC:-4}
DEPTH=${DEPTH:-12}
RUN_NAME=${RUN_NAME:-d$DEPTH}
# each stage's flags: the setup's (PRESET_*_ARGS, set by run_3x3080.sh & co.; here the T4 guide's settings, which
# are also the stage scripts' defaults), then the user's own (BASE_ARGS, ...), which win
read -r -a BASE_X <<< "${PRESET_BASE_ARGS---max_seq_len=1024 --device_batch_size=4 --total_batch_size=131072 \
--eval_every=100} ${BASE_ARGS:-}"
read -r -a MID_X <<< "${PRESET_MID_ARGS---device_batch_size=2 --total_batch_size=65536 --eval_every=75} ${MID_ARGS:-}"
read -r -a SFT_X <<< "${PRESET_SFT_ARGS---device_batch_size=1 --target_examples_per_step=8 --eval_every=50} \
${SFT_ARGS:-}"
read -r -a DOLLY_X <<< "${PRESET_DOLLY_ARGS:-} ${DOLLY_ARGS:-}"

# ---- data and tokenizer: fetched (no network: an error, not the quick test's toy data), then our own BPE ----
# on several nodes sharing NANOCHAT_BASE_DIR only node 0 prepares them; the others wait for its marker
TOKENIZER=${TOKENIZER:-$BASE_DIR/tokenizer}
READY=$BASE_DIR/.prepared_$RUN_NAME
if [ "${NODE_RANK:-0}" = 0 ]; then
  if [ -z "${DATA_ROOT:-}" ] || [ -z "${DOLLY_PATH:-}" ] || [ -z "${MIXTURE+x}" ]; then
    run "$PYTHON" prepare_data.py --what=base,chat,dolly,eval --num_shards="${NUM_SHARDS:-64}" --offline_fallback=False
  fi
  pick_data
  if [ "$TOKENIZER" = "$BASE_DIR/tokenizer" ] && [ ! -f "$TOKENIZER/bpe_config.json" ]; then
    run "$PYTHON" train_tokenizer.py --data_root="$DATA_ROOT" --out_dir="$TOKENIZER"
  fi
  if [ "${NNODES:-1}" -gt 1 ]; then mkdir -p "$BASE_DIR" && run touch "$READY"; fi
else
  echo "node $NODE_RANK: waiting for node 0 to prepare the data and the tokenizer ($READY)"
  WAITED=0
  until [ "${DRY_RUN:-0}" = 1 ] || [ -f "$READY" ]; do
    if [ "$WAITED" -ge "${PREPARE_TIMEOUT:-7200}" ]; then
      echo "error: node 0 did not finish preparing in ${PREPARE_TIMEOUT:-7200} s ($READY is missing): is it running," \
           "and is NANOCHAT_BASE_DIR=$BASE_DIR the folder it writes to (shared by every node)?" >&2
      exit 1
    fi
    sleep 2; WAITED=$((WAITED + 2))
  done
  pick_data
fi
pick_mixture
check_collectives

# ---- stages ----
CK=$BASE_DIR
want base && stage "$CK/checkpoints/$RUN_NAME" train_base.py --depth="$DEPTH" --tokenizer="$TOKENIZER" \
  --data_root="$DATA_ROOT" --run_name="$RUN_NAME" ${BASE_X[@]+"${BASE_X[@]}"} "$@"
want mid && stage "$CK/mid_checkpoints/$RUN_NAME" train_mid.py --pretrained_checkpoint="$CK/checkpoints/$RUN_NAME" \
  --mixture="$MIXTURE" --run_name="$RUN_NAME" ${MID_X[@]+"${MID_X[@]}"} "$@"
want sft && stage "$CK/chatsft_checkpoints/$RUN_NAME" train_sft.py \
  --pretrained_checkpoint="$CK/mid_checkpoints/$RUN_NAME" --mixture="$MIXTURE" --run_name="$RUN_NAME" ${SFT_X[@]+"${SFT_X[@]}"} "$@"
want dolly && stage "$CK/dolly_checkpoints/$RUN_NAME" finetune_dolly.py \
  --pretrained_checkpoint="$CK/chatsft_checkpoints/$RUN_NAME" --dolly_path="$DOLLY_PATH" --run_name="$RUN_NAME" \
  ${DOLLY_X[@]+"${DOLLY_X[@]}"} "$@"
if want eval && ls "${EVAL_DATA_DIR:-$BASE_DIR/eval_data}"/* >/dev/null 2>&1; then
  for STAGE_DIR in checkpoints chatsft_checkpoints dolly_checkpoints; do  # the benchmarks for each stage's model
    launch eval.py --checkpoint="$CK/$STAGE_DIR/$RUN_NAME" --eval_data_dir="${EVAL_DATA_DIR:-$BASE_DIR/eval_data}" \
      --limit="${EVAL_LIMIT:-500}"
  done
fi
report --run_name="$RUN_NAME"  # every stage's curves, setup, evals and samples on one page
echo "done. How each stage went: $BASE_DIR/report/report.md"
echo "      Chat with the SFT model: python chat.py --checkpoint=$CK/chatsft_checkpoints/$RUN_NAME"
echo "      or the Dolly-finetuned one: python chat.py --checkpoint=$CK/dolly_checkpoints/$RUN_NAME"
