#!/usr/bin/env bash
# One GPU turn for issue 6 (performance): the CUDA tests of the fast
# path, then every benchmark with its JSON under $OUT. Run from the repo root on the device machine with .whl
# (opacus, diffusers and their missing deps) and .gpu/fashion-mnist carried:
#   run(command="bash benchmarks/gpu_perf.sh", carry=[".whl", ".gpu"], timeout_s=600)
# Two calls of about 9 and 7 minutes (the parts' caps): the default PARTS holds the issue's goals; then
#   run(command="PARTS='overhead quality celebahq' bash benchmarks/gpu_perf.sh", carry=[".whl", ".gpu"], timeout_s=600)
# Throughput and end to end share batch 256, so the second compiles from inductor's on-disk cache (same machine).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
PARTS=${PARTS:-"tests throughput e2e"}
if [ -d .whl ] && ! python3 -c "import diffusers, opacus" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 OPACUS_DMAUDIT_FASHION_MNIST=$PWD/.gpu/fashion-mnist
exec > >(tee "$OUT/log.txt") 2>&1
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
python3 -c "import torch, diffusers, opacus; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
part() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }
B=benchmarks
part tests && timeout 100 python3 -m pytest -q -p no:cacheprovider -x tests/test_reverse_process.py \
  tests/test_prior.py 2>&1 | tail -8
part throughput && { timeout 230 python3 $B/reconstruction_throughput.py --arch cifar10-32 --batch 256 --steps 50 \
  --json "$OUT/throughput-cifar10-32.json" || echo "THROUGHPUT FAILED"; }
part e2e && { timeout 210 python3 $B/end_to_end_audit.py --images 5000 --batch 256 --json "$OUT/end-to-end.json" || echo "E2E FAILED"; }
part quality && { timeout 150 python3 $B/speed_quality.py --images 1000 --json "$OUT/speed-quality.json" || echo "QUALITY FAILED"; }
part overhead && { timeout 90 python3 $B/auditor_overhead.py --steps 60 --every 10 --width 64 --batch 256 \
  --sampler-steps 50 --max-reconstructions 64 --json "$OUT/auditor-overhead.json" || echo "OVERHEAD FAILED"; }
part celebahq && { timeout 180 python3 $B/reconstruction_throughput.py --arch celebahq-256 --batch 32 --steps 20 \
  --json "$OUT/throughput-celebahq-256.json" || echo "CELEBAHQ FAILED"; }
date -u
