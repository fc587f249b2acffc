#!/usr/bin/env bash
# HybriMoE on one GPU (< 3 min): real hybrid execution (GPU expert cache + PCIe copy stream + CPU
# experts, HSS split, impact prefetch) vs kTransformers-style fixed mapping, on-demand LRU and
# all-CPU, measured one after the other on the same prompt; plus the timing model's projection
# for the same model/target for comparison. Writes $OUT/hybrimoe.json.
# Needs: torch with CUDA, transformers, hydra-core/omegaconf (PYTHONPATH), effrun importable.
set -u
OUT=${OUT:-$(pwd)/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
export EFFRUN_OUTPUT_ROOT="$OUT/runs" PYTHONUNBUFFERED=1 WANDB_MODE=offline
# a mid-size random Mixtral: 4 layers x 8 experts of 3 x 1024 x 2816 fp32 (34.6 MB each)
MODEL=(model=mixtral-tiny model.hf_config.hidden_size=1024 model.hf_config.intermediate_size=2816
       model.hf_config.num_hidden_layers=4 model.hf_config.num_attention_heads=8 model.hf_config.num_key_value_heads=8)
COMMON=(+technique=hybrimoe hardware=h100-sxm run.max_new_tokens=24 logger=quiet technique.cache_ratio=0.25
        "technique.compare=[ktransformers,ktransformers_layers,ondemand_lru,all_cpu]")
status=0
if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  timeout 150 $PY -m effrun.cli infer "${COMMON[@]}" "${MODEL[@]}" technique.execution=real \
    > "$OUT/hybrimoe_real.log" 2>&1 || status=$?
else
  echo "no CUDA: skipping the real run" | tee "$OUT/hybrimoe_real.log"
  status=3
fi
timeout 90 $PY -m effrun.cli infer "${COMMON[@]}" "${MODEL[@]}" technique.execution=model run.device=cpu \
  run.max_new_tokens=6 > "$OUT/hybrimoe_model.log" 2>&1 || status=$((status ? status : 4))
$PY - "$OUT" "$status" <<'PYEOF'
import json, sys, pathlib
out, status = pathlib.Path(sys.argv[1]), int(sys.argv[2])
res = {"status": status, "runs": {}}
for s in sorted((out / "runs").rglob("summary.json")):
    d = json.loads(s.read_text())
    key = "real" if any(k.startswith("measured/hybrimoe/") for k in d) else "model"
    res["runs"][key] = {k: v for k, v in d.items() if k.startswith(("measured/", "projected/")) or k in ("status", "error")}
try:
    import torch
    res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    res["torch"] = torch.__version__
except Exception as e:  # noqa: BLE001
    res["device"] = f"unknown ({e})"
for log in ("hybrimoe_real.log", "hybrimoe_model.log"):
    p = out / log
    if p.exists():
        res[log] = p.read_text()[-2000:]
(out / "hybrimoe.json").write_text(json.dumps(res, indent=1))
r = res["runs"].get("real", {})
print("real:", {k: r.get(k) for k in ("status", "measured/hybrimoe/decode_tokens_per_s", "measured/ktransformers/decode_tokens_per_s",
                                      "measured/all_cpu/decode_tokens_per_s", "measured/speedup_decode_vs_ktransformers",
                                      "measured/speedup_decode_vs_ktransformers_layers",
                                      "measured/tokens_match_fraction", "error")})
PYEOF
exit $status
