#!/usr/bin/env bash
# EfficientViT on one GPU: M0..M5 images/s at batch 2048 under fp16 autocast (the paper's GPU speed
# protocol: Conv-BN fused, eval, traced; eager and torch.compile beside it), effrun's model and timm's
# interleaved, next to the paper's V100 figures; then the logits cross-check against timm (the GPU
# image ships timm + torchvision) for all six models, fp32, on CPU and GPU.
# Writes $OUT/efficientvit_gpu.json, $OUT/efficientvit_crosscheck.json and logs. Needs only torch
# (+ timm for the baseline / cross-check; onnxruntime not needed). Runs from anywhere.
# Without a GPU it falls back to a tiny CPU run of the same path (checks the script, not the numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib_gpu_env.sh

if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  $PY -c "import torch; print('gpu:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
  ARGS=(--device cuda --batch "${EVIT_BATCH:-2048}" --autocast --modes "${EVIT_MODES:-eager,trace}"
        --timm-modes "${EVIT_MODES:-eager,trace}" --warmup 3 --measure 3 --rounds 2 --sections speed)
  XDEV=cuda
else
  echo "no CUDA device: CPU fallback (M0, batch 2; checks the script, not the numbers)" >&2
  ARGS=(--models m0 --batch 2 --threads 1 --modes eager,trace --timm-modes eager,trace
        --warmup 0 --measure 0.2 --rounds 1 --sections speed)
  XDEV=cpu
fi
timeout 420 $PY scripts/bench_efficientvit.py "${ARGS[@]}" --out "$OUT/efficientvit_gpu.json" 2>&1 \
  | grep -v -e TracerWarning -e "^  if " | tee "$OUT/efficientvit_gpu.log"

timeout 150 $PY - "$OUT/efficientvit_crosscheck.json" "$XDEV" <<'PYEOF' 2>&1 | tee "$OUT/efficientvit_crosscheck.log"
import json, sys, torch
from effrun.families.image_classification import efficientvit as ev
from effrun.families.image_classification import speed
out, dev = {}, sys.argv[2]
timm, how = speed.load_timm()
out["timm"] = how
if timm is None:
    print(f"cross-check skipped: {how}")
else:
    variants = ev.VARIANTS if dev == "cuda" else ("efficientvit-m0",)
    for v in variants:
        torch.manual_seed(0)
        ref = speed.timm_model(v).eval()
        with torch.no_grad():  # non-trivial BN statistics and biases
            for n, p in ref.named_parameters():
                if n.endswith("bn.weight"): p.uniform_(0.5, 1.5)
                elif n.endswith("bn.bias") or n.endswith("attention_biases"): p.normal_(0, 0.2)
            for n, b in ref.named_buffers():
                if n.endswith("running_var"): b.uniform_(0.5, 1.5)
                elif n.endswith("running_mean"): b.normal_(0, 0.1)
        ours = ev.load_timm_state_dict(ev.build_efficientvit(v), ref.state_dict()).eval()
        x = torch.randn(4, 3, 224, 224)
        row = {}
        for d in ("cpu", dev) if dev != "cpu" else ("cpu",):
            r, o = ref.to(d), ours.to(d)
            with torch.no_grad():
                a = r(x.to(d)).float().cpu()
                b = o(x.to(d)).float().cpu()
            row[d] = {"max_abs_diff": (a - b).abs().max().item(), "max_abs_logit": a.abs().max().item()}
        with torch.no_grad():
            fused = ev.optimize_for_inference(ours.cpu())(x)
        row["fused_cpu_max_abs_diff"] = (ref.cpu()(x) - fused).abs().max().item()
        out[v] = row
        print(v, json.dumps(row))
json.dump(out, open(sys.argv[1], "w"), indent=2)
PYEOF
echo "wrote $OUT/efficientvit_gpu.json $OUT/efficientvit_crosscheck.json"
