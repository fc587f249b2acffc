#!/usr/bin/env bash
# HybriMoE on one GPU (a few minutes): real hybrid execution (GPU expert cache + PCIe copy stream +
# CPU experts, HSS split, impact prefetch) for hybrimoe and the baselines, one `effrun infer` run per
# policy on the same prompt (execution=real, technique.real_policy=...), with experts of Mixtral's
# real size (hidden 4096, FFN 14336, bf16: 352 MB per expert; 2 MoE layers of 8 experts); plus the
# timing model's projection for the same shape. Without CUDA it runs the same commands on tiny
# shapes with the executor on the CPU (a check of the script, not a measurement).
# Writes $OUT/hybrimoe.json. Needs: torch, transformers, hydra-core/omegaconf, effrun importable.
set -u
OUT=${OUT:-$(pwd)/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
export EFFRUN_OUTPUT_ROOT="$OUT/runs" PYTHONUNBUFFERED=1 WANDB_MODE=offline
if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  MODEL=(model=mixtral-tiny model.hf_config.hidden_size=4096 model.hf_config.intermediate_size=14336
         model.hf_config.num_hidden_layers=2 model.hf_config.num_attention_heads=32
         model.hf_config.num_key_value_heads=8 run.dtype=bfloat16)
  REAL=(hardware=h100-sxm technique.execution=real)
  TOKENS=24
else
  MODEL=(model=mixtral-tiny)
  REAL=(hardware=rtx-a6000 technique.execution=real technique.real_device=cpu)
  TOKENS=4
fi
COMMON=(+technique=hybrimoe run.max_new_tokens=$TOKENS logger=quiet technique.cache_ratio=0.25 technique.plot=false)
status=0
for pol in hybrimoe ktransformers ktransformers_layers ondemand_lru all_cpu; do
  timeout 240 $PY -m effrun.cli infer "${COMMON[@]}" "${MODEL[@]}" "${REAL[@]}" technique.real_policy=$pol \
    > "$OUT/hybrimoe_real_$pol.log" 2>&1 || status=$((status ? status : 5))
done
timeout 120 $PY -m effrun.cli infer "${COMMON[@]}" model=mixtral-tiny hardware=h100-sxm technique.execution=model \
  run.device=cpu run.max_new_tokens=6 > "$OUT/hybrimoe_model.log" 2>&1 || status=$((status ? status : 4))
$PY - "$OUT" "$status" <<'PYEOF'
import json, sys, pathlib
out, status = pathlib.Path(sys.argv[1]), int(sys.argv[2])
res = {"status": status, "runs": {}}
for s in sorted((out / "runs").rglob("summary.json")):
    d = json.loads(s.read_text())
    pols = [k.split("/")[1] for k in d if k.endswith("/hit_rate") and k.startswith("measured/")]
    key = f"real/{pols[0]}" if pols else "model"
    res["runs"][key] = {k: v for k, v in d.items() if k.startswith(("measured/", "projected/", "info/")) or k in ("status", "error")}
try:
    import torch
    res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    res["torch"] = torch.__version__
except Exception as e:  # noqa: BLE001
    res["device"] = f"unknown ({e})"
h = res["runs"].get("real/hybrimoe", {}).get("measured/decode_tokens_per_s")
for base in ("ktransformers", "ktransformers_layers", "ondemand_lru", "all_cpu"):
    b = res["runs"].get(f"real/{base}", {}).get("measured/decode_tokens_per_s")
    if h and b:
        res[f"measured/speedup_decode_vs_{base}"] = h / b
ids = {k: r.get("info/generated_ids") for k, r in res["runs"].items() if k.startswith("real/")}
res["tokens_equal_across_policies"] = len({json.dumps(v) for v in ids.values()}) == 1 if ids else None
(out / "hybrimoe.json").write_text(json.dumps(res, indent=1))
print({k: v for k, v in res.items() if k != "runs"})
PYEOF
exit $status
