#!/usr/bin/env bash
# GPU check of the auditor: tests with the prior on CUDA (worker thread, own CUDA stream), then the overhead
# benchmark. Carry .whl (opacus, diffusers) and .gpu/fashion-mnist.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OPACUS_DMAUDIT_FASHION_MNIST=$PWD/.gpu/fashion-mnist
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:warnings -p no:cacheprovider tests/test_auditor.py tests/test_imprint_recovery.py \
  tests/test_prior.py -x 2>&1 | tail -15
timeout 70 python3 benchmarks/auditor_overhead.py --steps 60 --every 10 --width 64 --batch 256 --sampler-steps 50 \
  --max-reconstructions 64 --json "$OUT/auditor_overhead_gpu.json" || echo "BENCH FAILED"
