#!/usr/bin/env bash
# The one train loop on NCCL (< 1 min): torchrun with 1 rank (process group on NCCL: the loop's
# control collectives must live on the GPU) and, where the machine has 2+ GPUs, 2 ranks. Without
# CUDA the same commands run on gloo (a check of the script). Writes $OUT/nccl.json.
set -u
source "$(dirname "$0")/lib_gpu_env.sh"
export EFFRUN_OUTPUT_ROOT="$OUT/runs" PYTHONUNBUFFERED=1
HW=cpu
if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then HW=h100-sxm; fi
NG=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
COMMON=(train model=llama-tiny data=synthetic data.seq_len=64 data.batch_size=4 run.max_steps=4 run.warmup_steps=1
        logger=quiet hardware=$HW parallelism=env run.eval_at_end=true)
status=0
timeout 120 $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m effrun.cli "${COMMON[@]}" \
  parallelism.world_size=1 > "$OUT/nccl_1rank.log" 2>&1 || status=1
if [ "$NG" -ge 2 ]; then
  timeout 120 $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m effrun.cli "${COMMON[@]}" \
    parallelism.world_size=2 > "$OUT/nccl_2rank.log" 2>&1 || status=2
fi
$PY - "$OUT" "$status" "$HW" <<'PYEOF'
import json, sys, pathlib
out, status, hw = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
runs = [json.loads(p.read_text()) for p in sorted((out / "runs").rglob("summary.json"))]
res = {"status": status, "hardware": hw, "runs": [{k: r.get(k) for k in ("status", "world_size", "error",
       "measured/loss", "measured/tokens_per_s", "measured/peak_mem_mb", "measured/eval_loss")} for r in runs]}
for log in ("nccl_1rank.log", "nccl_2rank.log"):
    p = out / log
    if p.exists():
        res[log] = p.read_text()[-1500:]
(out / "nccl.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res["runs"]))
PYEOF
exit $status
