#!/usr/bin/env bash
# GPU benchmark: tokens/s and MFU of arpipe's trainer on one GPU (H100/H200), GPT-2 small with and
# without torch.compile, WaveNet and PixelCNN (benchmarks/gpu.py says what and how). At most 8
# minutes. Run from anywhere in the repository, on the GPU machine:
#
#   bash benchmarks/gpu.sh [--results FILE] [--cases gpt gpt-compile wavenet pixelcnn]
#
# Its python3 needs torch with CUDA, numpy, tokenizers, pyyaml, pydantic, deepspeed and
# webdataset (mlflow optional: without it the runs track nothing). Wheels in .whl/ (made with
# /work/shared/tools/device-wheels.sh on a machine with a package index) are installed first
# into /tmp/site when deepspeed is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import deepspeed' 2>/dev/null && compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv 2>/dev/null || true
exec timeout 480 python3 benchmarks/gpu.py "$@"
