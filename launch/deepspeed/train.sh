#!/usr/bin/env bash
# Multi-node training with the `deepspeed` launcher.
#
# pdsh mode (passwordless ssh between nodes; run once, on the first node):
#   launch/deepspeed/train.sh HOSTFILE --config configs/text-gpt.yaml [key=value …]
#
# no-ssh mode (run on every node, e.g. by your scheduler; NODE_RANK = 0 … nodes-1):
#   MASTER_ADDR=10.0.0.1 NODE_RANK=1 launch/deepspeed/train.sh HOSTFILE --config configs/text-gpt.yaml
#
# Environment: MASTER_ADDR (required without ssh; the first node's address), MASTER_PORT (29500),
# NODE_RANK (switches to no-ssh mode), ARPIPE_PYTHON (the interpreter with arpipe installed).
# In pdsh mode every node runs this interpreter (same path) in this directory, with only the
# variables DeepSpeed forwards (PYTHON*, MLFLOW*, NCCL*, …) and the KEY=VALUE lines of
# ./.deepspeed_env or ~/.deepspeed_env (e.g. OMP_NUM_THREADS=8): see the README.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,14p' "$0"; exit 2; }
hostfile=$1; shift
python=${ARPIPE_PYTHON:-python3}
args=(--hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" --log_level warning)
[ -n "${MASTER_ADDR:-}" ] && args+=(--master_addr "$MASTER_ADDR")
if [ -n "${NODE_RANK:-}" ]; then
  [ -n "${MASTER_ADDR:-}" ] || { echo "train.sh: NODE_RANK needs MASTER_ADDR" >&2; exit 2; }
  args+=(--no_ssh --node_rank "$NODE_RANK")
fi
exec "$python" -m deepspeed.launcher.runner "${args[@]}" --module pipeline.train "$@"
