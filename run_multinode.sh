#!/usr/bin/env bash
# run_multinode.sh: the T4 pipeline over several machines, as the nano-gpt guide launches it. Run it on every node
# with the same settings and its own NODE_RANK (0 on the master):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=192.168.1.1 MASTER_PORT=29500 bash run_multinode.sh     # on 192.168.1.1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=192.168.1.1 MASTER_PORT=29500 bash run_multinode.sh     # on the other node
# NPROC: GPUs per node (default: all found). The global batch stays the T4 guide's, so the accumulation shrinks
# with the GPU count. NANOCHAT_BASE_DIR must be a folder every node sees (NFS or the like): global rank 0 writes the
# checkpoints, and each later stage starts from the one before on every node. Without InfiniBand set
# NCCL_IB_DISABLE=1, and NCCL_SOCKET_IFNAME=<interface> when the nodes have several networks.
set -euo pipefail
cd "$(dirname "$0")"
source ./run_common.sh
export NNODES=${NNODES:-2} NODE_RANK=${NODE_RANK:?set NODE_RANK, 0 on the master node}
export MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of the master node} MASTER_PORT=${MASTER_PORT:-29500}
GPUS=$(gpus_found)
export NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}
export NCCL_TIMEOUT=${NCCL_TIMEOUT:-1800} RUN_SCRIPT=$0
exec bash run_t4_training.sh "$@"
