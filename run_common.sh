# run_common.sh: what every run_*.sh shares; sourced by them, not run by itself.
#   NANOCHAT_BASE_DIR  where data, checkpoints and logs go (default ~/.cache/nanochat, as the T4 guide says)
#   PYTHON             the interpreter (default: python)
#   NPROC              processes (GPUs) per node; each script sets its own default
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node runs (torchrun's own names)
#   DRY_RUN=1          print each command instead of running it
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
BASE_DIR=$NANOCHAT_BASE_DIR
PYTHON=${PYTHON:-python}
# one thread per process unless told otherwise: torchrun starts one process per GPU, and more threads than
# cores only adds contention (torchrun would set 1 itself, with a warning)
CORES=$(nproc 2>/dev/null || echo 2)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES > 8 ? 8 : CORES ))}
# the CUDA caching allocator grows segments instead of fragmenting: fewer OOMs late in a run
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

gpus_found() {  # CUDA devices torch sees (0 on a CPU-only machine or without torch)
  "$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0
}

run() {  # show a command, then run it (DRY_RUN=1: only show it)
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "${DRY_RUN:-0}" = 1 ]; then return 0; fi
  "$@"
}

launch() {  # a Python script on NPROC processes per node (torchrun), or plain python for one process on one node
  if [ "${NNODES:-1}" -gt 1 ]; then
    run torchrun --nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK, 0 on the master node}" \
      --master_addr="${MASTER_ADDR:?set MASTER_ADDR to the address of the master node}" \
      --master_port="${MASTER_PORT:-29500}" --nproc_per_node="$NPROC" "$@"
  elif [ "$NPROC" -gt 1 ]; then
    run torchrun --standalone --nproc_per_node="$NPROC" "$@"
  else
    run "$PYTHON" "$@"
  fi
}

finished() {  # the run folder's newest checkpoint is its final one (ckpt_<step>.json says "final": true)
  local last
  last=$(ls "$1"/ckpt_*.json 2>/dev/null | sort | tail -n 1)
  [ -n "$last" ] && grep -q '"final": true' "$last"
}

want() {  # want <stage>: STAGES (comma-separated; default all) names it
  [[ ",${STAGES:-base,mid,sft,dolly,eval}," == *",$1,"* ]]
}

stage() {  # stage <run folder> <script> [args...]: skip a finished stage, else run it, continuing any checkpoint
  local dir=$1
  shift
  if finished "$dir"; then
    echo "[done] $dir holds its final checkpoint: skipping $1 (delete the folder to train it again)"
    return 0
  fi
  launch "$@" --auto_resume=True
}

report() {  # report [args...]: report.py's page of the runs (plots, tables, samples); a failure only warns, since
  # the training it describes is done and saved
  if [ "${NODE_RANK:-0}" != 0 ]; then return 0; fi  # one page per pipeline: node 0's
  if ! run "$PYTHON" report.py "$@"; then
    echo "warning: report.py failed (see above); the training itself is done. Try again: $PYTHON report.py $*" >&2
  fi
}

check_collectives() {  # multi-GPU: an all-reduce over every GPU, checked, under a timeout, before hours of training
  if [ "$NPROC" -gt 1 ] || [ "${NNODES:-1}" -gt 1 ]; then
    if ! TIMEOUT_S=${CHECK_TIMEOUT:-120} launch check_gpus.py; then
      echo "the GPU self-check failed or hung: see its message above; consumer cards without P2P/NVLink usually" \
           "need NCCL_P2P_DISABLE=1 (and NCCL_IB_DISABLE=1 without InfiniBand): NCCL_P2P_DISABLE=1 bash ${RUN_SCRIPT:-$0}" >&2
      exit 1
    fi
  fi
}

pick_data() {  # DATA_ROOT and DOLLY_PATH: given, else what prepare_data.py downloaded, else the built-in data
  if [ -z "${DATA_ROOT:-}" ]; then
    if ls "$BASE_DIR"/base_data/*.parquet >/dev/null 2>&1; then DATA_ROOT=$BASE_DIR/base_data
    else DATA_ROOT=$BASE_DIR/builtin_data/base; echo "data: the built-in data ($DATA_ROOT)"; fi
  fi
  if [ -z "${DOLLY_PATH:-}" ]; then
    if [ -f "$BASE_DIR/data/databricks-dolly-15k.jsonl" ]; then DOLLY_PATH=$BASE_DIR/data/databricks-dolly-15k.jsonl
    else DOLLY_PATH=$BASE_DIR/builtin_data/dolly.jsonl; fi
  fi
}

pick_mixture() {  # MIXTURE: given, else SmolTalk + GSM8K + the built-in tasks when prepare_data.py fetched them
  if [ -z "${MIXTURE+x}" ]; then
    if [ -f "$BASE_DIR/data/smol-smoltalk_train.parquet" ] && [ -f "$BASE_DIR/data/gsm8k_train.parquet" ]; then
      MIXTURE=smol-smoltalk_train.parquet,gsm8k_train.parquet,builtin
    else MIXTURE=""; fi  # the built-in tasks
  fi
}
