#!/usr/bin/env bash
# Training-step benchmark on one CUDA GPU, in one short run (about 3 minutes on an H100-class GPU):
# ResNet-110 (CIFAR, 32x32, batch 128) and ResNet-50 (224x224, batch 64), bf16 autocast, NCHW and
# channels-last, plain / MRLA-L / MRLA-B / DIA (where registered) / ELA with 0, 50 and 100 % of the
# prunable blocks pruned. Writes two bench JSONs and prints their tables.
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # default OUT_DIR: benchmarks/gpu
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh       # another interpreter
#   ELANET_GPU_DRY_RUN=1 bash benchmarks/gpu.sh /tmp/dry   # the same commands, tiny, on the CPU (tests run this)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/gpu}
elanet=("${PYTHON:-python}" -m elanet)  # PYTHON: the interpreter with elanet and torch

flags=(--memory-format both --fractions 0 0.5 1 --no-kl --quiet)
if [[ ${ELANET_GPU_DRY_RUN:-0} == 1 ]]; then  # checks the script and the CLI: no bf16 (slow on CPU), tiny inputs
    common=(--device cpu --threads 1 --steps 1 --warmup 0 --batch-size 2 --amp none)
    cifar=(--depths 20 --image-size 8)
    imagenet=(--depths 50 --image-size 16)
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    common=(--device cuda --steps 20 --warmup 3 --amp bf16)
    cifar=(--depths 110 --batch-size 128)
    imagenet=(--depths 50 --batch-size 64 --steps 10)
fi

mkdir -p "$out"
"${elanet[@]}" bench "${common[@]}" "${flags[@]}" "${cifar[@]}" --out "$out/resnet110_cifar.json"
"${elanet[@]}" bench "${common[@]}" "${flags[@]}" "${imagenet[@]}" --out "$out/resnet50_224.json"
