#!/usr/bin/env bash
# The GPU machine's check (issue 18): the five-family flow test and the scale bench's smallest
# size, both on runtime=dask device=cuda. That machine has torch, transformers and CUDA but not
# this project's stack: wheels built for its Python (3.12) travel in .whl/ (MLflow and DVC left
# out to fit the 64 MiB that travels, so tracking is off and the flow runs without a DVC stage).
# Usage there: bash bench/gpu_check.sh OUTDIR
set -uo pipefail
out="${1:-/tmp/gpu-check}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >"$out/pip.log" 2>&1 || { tail -5 "$out/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
# --target installs no console scripts; the tests start `prefect server` beside the interpreter
bindir=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
[ -x "$bindir/prefect" ] || printf '#!/bin/sh\nexec python3 -m prefect "$@"\n' >"$bindir/prefect"
chmod +x "$bindir/prefect"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, prefect, lm_eval, mergekit, distributed
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers',
      transformers.__version__, 'prefect', prefect.__version__)"
# GPU memory, sampled every 0.5 s for the whole check
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -lms 500 \
  >"$out/gpu_mem.csv" &
smi=$!
# each step alone first (seconds), then the five-family flow test on dask
timeout "${SCALE_TIMEOUT:-240}" python3 -m bench.scale --sizes 30M --runtime dask \
  --device cuda --generations 1 --no-dvc --skip-alloc --override tracking.enabled=false \
  ${SCALE_ARGS:-} --workdir /var/tmp/scale 2>&1 | tee "$out/scale.log" | tail -40
echo "scale: exit ${PIPESTATUS[0]}"
export KINSHIP_TEST_OVERRIDES="runtime=dask device=cuda tracking.enabled=false"
timeout "${FAMILIES_TIMEOUT:-260}" python3 -m pytest -q -s -p no:cacheprovider \
  tests/test_families.py -k five_families 2>&1 | tee "$out/families.log" | tail -25
echo "families: exit ${PIPESTATUS[0]}"
unset KINSHIP_TEST_OVERRIDES
cp /var/tmp/scale/scale.json "$out/" 2>/dev/null
kill $smi
awk -F', ' '{gsub(/ MiB/,"",$2); if ($2+0 > m) m = $2+0} END {print "peak GPU memory used:", m, "MiB"}' \
  "$out/gpu_mem.csv"
