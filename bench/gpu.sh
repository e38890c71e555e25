#!/usr/bin/env bash
# P6: DenseNet-121 images/s with and without DP and bf16, and a short federation, on an NVIDIA GPU.
#
#   bash bench/gpu.sh            (from the repository root, on the GPU machine; < 5 min on an H100)
#
# Expects torch with CUDA already installed (python3 is the one that has it; override
# with PYTHON=...). medfed's other dependencies are installed from wheels in .whl/ when
# that folder exists (no network needed; bench/gpu_wheels.sh fills it on a machine
# with PyPI access), then medfed itself with --no-deps. Prints everything; with
# OUT set, also writes $OUT/gpu-throughput.json, $OUT/gpu-federation.json and $OUT/gpu.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-}
START=$(date +%s)
log() { echo "[gpu.sh $(( $(date +%s) - START ))s] $*"; }
[ -n "$OUT" ] && exec > >(tee "$OUT/gpu.log") 2>&1

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || log "nvidia-smi not found"
nproc; free -g | head -2
$PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU visible:', torch.cuda.is_available())" || { log "no torch"; exit 1; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  log "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/medfed-site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/medfed-site .whl/*.whl \
    && export PYTHONPATH="/tmp/medfed-site${PYTHONPATH:+:$PYTHONPATH}"
fi
log "installing medfed (--no-deps, editable)"
if ! $PY -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e . 2>/dev/null; then
  log "editable install failed (no setuptools?); using the source tree on PYTHONPATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 MEDFED_DATA_DIR=${MEDFED_DATA_DIR:-/tmp/medfed-data}
$PY -c "from federation.training import select_device; print('train.device=auto ->', select_device('auto'))" \
  || { log "medfed does not import; missing dependencies above"; exit 1; }

log "throughput: DenseNet-121, 224x224, batch 64"
$PY bench/gpu_bench.py throughput --model densenet121 --size 224 --batch 64 --steps 10 --warmup 3 \
  ${OUT:+--json "$OUT/gpu-throughput.json"}

if $PY -c "import ray" 2>/dev/null; then
  log "federation: medfed simulate on Flower's Ray engine, 2 sites x 2 rounds, DP, gpus_per_site=0.5"
  ( while sleep 2; do nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader; done ) &
  WATCH=$!
  timeout 240 $PY -m medfed simulate \
    --set data.num_sites=2 --set server.rounds=2 --set data.num_samples=800 --set train.device=auto \
    --set simulation.gpus_per_site=0.5 --set privacy.noise_multiplier=1.0 --set privacy.target_epsilon=1000 \
    --set server.out_dir=/tmp/medfed-gpu-runs --set server.run_name=gpu
  kill $WATCH 2>/dev/null
  cat /tmp/medfed-gpu-runs/gpu/sites.jsonl 2>/dev/null | head -4
else
  log "federation: Ray (Flower's simulation engine) is not installed here; running the sites' and the server's code in one process"
  timeout 240 $PY bench/gpu_bench.py federation --sites 2 --rounds 2 ${OUT:+--json "$OUT/gpu-federation.json"}
fi
log "done in $(( $(date +%s) - START )) s"
