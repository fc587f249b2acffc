#!/usr/bin/env bash
# Run every scripts/gpu_check_*.sh on a lent GPU machine in one call.
# Expects .whl/ to hold wheels the GPU image lacks (hydra-core, omegaconf, antlr4, deepspeed and its
# pure deps, and an effrun wheel built from this tree: `.venv/bin/pip wheel --no-deps -w .whl .`).
# Each check writes $OUT/<name>.json; this script also writes $OUT/gpu_env.json.
set -u
OUT=${OUT:-/tmp/effrun-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site EFFRUN_CONFIG_DIR="$PWD/configs" EFFRUN_CACHE=/tmp/effrun-cache PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)  # checks write run dirs here; only their JSON and logs are copied to $OUT
python3 - <<'PY' > "$OUT/gpu_env.json"
import json, torch, transformers
print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PY
cat "$OUT/gpu_env.json"
for s in ${GPU_CHECKS:-scripts/gpu_check_*.sh}; do
  echo "=== $s"
  start=$(date +%s)
  OUT="$WORK" timeout "${GPU_CHECK_TIMEOUT:-170}" bash "$s" 2>&1 | tail -n 25
  echo "=== $s rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
  cp "$WORK"/*.json "$OUT"/ 2>/dev/null
done
cp "$WORK"/*.log "$OUT"/ 2>/dev/null
ls -la "$OUT"
