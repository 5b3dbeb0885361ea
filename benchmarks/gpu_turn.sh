#!/usr/bin/env bash
# One GPU turn: train the shipped Fashion-MNIST prior, measure it against the reference prior, time reconstruction.
# Run from the repo root on the device machine with .whl (diffusers and its missing deps) and .gpu (Fashion-MNIST
# IDX files, reference prior) carried: `python3 benchmarks/prepare_gpu_carry.py --reference-prior ../shared/reference-prior/<name>`
# fills both. TRAIN_MINUTES / EVAL_LIMIT scale it down for a local dry run.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
TRAIN_MINUTES=${TRAIN_MINUTES:-5.5}; EVAL_LIMIT=${EVAL_LIMIT:-1000}; MODEL_SIZE=${MODEL_SIZE:-small}
if [ -d .whl ] && [ -n "$(ls .whl 2>/dev/null)" ] && ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 OPACUS_DMAUDIT_FASHION_MNIST=$PWD/.gpu/fashion-mnist
exec > >(tee "$OUT/log.txt") 2>&1
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" || exit 1
PRIOR=/tmp/prior-out/fashion-mnist-32; rm -rf /tmp/prior-out
python3 -m opacus_dmaudit train-prior --images fashion-mnist:train --out "$PRIOR" --model-size "$MODEL_SIZE" \
  --minutes "$TRAIN_MINUTES" --batch-size 256 --learning-rate 3e-4 --warmup-steps 500 --ema-decay 0.9995 \
  --compile --checkpoint-every 0 --no-progress || echo "TRAIN FAILED"
tar -C /tmp/prior-out --exclude training_checkpoint.pt -cf "$OUT/prior.tar" fashion-mnist-32 && ls -la "$PRIOR" "$PRIOR/unet"
for p in "$PRIOR" .gpu/reference-prior/fashion-mnist-ddpm-32; do
  name=$(basename "$p")
  timeout 150 python3 -m opacus_dmaudit reconstruct --prior "$p" --images fashion-mnist --noise-std 0.2 0.8 1.6 \
    --sampler ddim --steps 50 --limit "$EVAL_LIMIT" --json "$OUT/eval-$name.json" --no-progress --overwrite \
    || echo "EVAL FAILED $name"
done
timeout 60 python3 benchmarks/reconstruction_throughput.py --arch cifar10-32 --json "$OUT/bench-cifar10-32.json" || echo "BENCH FAILED"
timeout 30 python3 benchmarks/reconstruction_throughput.py --arch fashion-32 --json "$OUT/bench-fashion-32.json" || echo "BENCH FAILED"
date -u
