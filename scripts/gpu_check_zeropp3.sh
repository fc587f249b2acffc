#!/usr/bin/env bash
# ZeRO++ on one GPU: (1) the effrun qwZ/qgZ block quantisers (INT8 / INT4, torch) on the GPU:
# throughput and error on a 20B-GPT-layer-sized buffer; (2) the DeepSpeed engine path with the
# ZeRO++ quantised collectives ON (zero_quantized_weights / zero_quantized_gradients, stage 3), one
# process, a few steps of a tiny Llama in bf16, with overlap_comm on. Writes $OUT/zeropp3.json. < 3 minutes.
# Needs torch (+CUDA) and transformers; hydra-core/omegaconf importable (PYTHONPATH). DeepSpeed is
# taken from the environment or installed offline from $EFFRUN_WHEELS (or shared/wheels) when a
# deepspeed wheel is there; without it part (2) is recorded as skipped.
# Without a GPU it runs a CPU fallback (small buffer; DeepSpeed with quantisation off) to test itself.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib_gpu_env.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/effrun/torch_extensions}
# DeepSpeed's JIT op builder parses TORCH_CUDA_ARCH_LIST with int(): an arch-specific entry such as
# "9.0a" (set on the lent H100 image) fails with "invalid literal for int() ... '0a'". Drop the suffix.
if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  export TORCH_CUDA_ARCH_LIST=$(printf '%s' "$TORCH_CUDA_ARCH_LIST" | sed -E 's/([0-9])a\b/\1/g')
fi
WHEELS=${EFFRUN_WHEELS:-shared/wheels}

if ! $PY -c "import deepspeed" 2>/dev/null && ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --find-links "$WHEELS" deepspeed 2>&1 | tail -2 || true
fi
GPU=$($PY -c "import torch; print(1 if torch.cuda.is_available() else 0)")
WORK=$(mktemp -d)

# (2) DeepSpeed engine through the effrun CLI
DS_RC=skipped
if $PY -c "import deepspeed" 2>/dev/null; then
  if [ "$GPU" = 1 ]; then
    DS=(hardware=h100-sxm run.dtype=bfloat16 technique.quantized_weights=true technique.quantized_gradients=true
        technique.overlap_comm=true)
  else
    DS=(hardware=cpu technique.quantized_weights=false technique.quantized_gradients=false)
  fi
  EFFRUN_OUTPUT_ROOT="$WORK/runs" timeout 150 $PY -m effrun.cli train +technique=zeropp3 technique.engine=deepspeed \
    "${DS[@]}" model=llama-tiny data=synthetic data.seq_len=128 data.batch_size=4 run.max_steps=6 \
    run.warmup_steps=2 run.lr=1e-3 logger=quiet > "$WORK/ds.log" 2>&1
  DS_RC=$?
fi

$PY - "$OUT/zeropp3.json" "$GPU" "$DS_RC" "$WORK" <<'PYEOF'
import glob, json, sys, time
import torch
from effrun.techniques.zeropp3 import quant

out, gpu, ds_rc, work = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
dev = "cuda" if gpu else "cpu"
res = {"device": torch.cuda.get_device_name(0) if gpu else "cpu (fallback)", "torch": torch.__version__}
n = 6144 * 6144 * 4 if gpu else 1 << 20  # one 20B-GPT layer's MLP-in weight (151M) on the GPU
x = torch.randn(n, device=dev, dtype=torch.float32)
for bits, block in ((8, 64), (4, 64), (8, 2048)):
    def once():
        return quant.dequantize(quant.quantize(x, bits, block), n, bits, block)
    once()
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        y = once()
    if gpu:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    err = ((y - x).norm() / x.norm()).item()
    res[f"int{bits}_b{block}"] = {"quant+dequant_s": dt, "input_GBps": n * 4 / dt / 1e9, "rel_l2_err": err,
                                  "wire_bytes_per_param": quant.payload_bytes(n, bits, block) / n}
res["deepspeed_rc"] = ds_rc
logs = glob.glob(f"{work}/ds.log")
if ds_rc not in ("skipped",):
    summ = sorted(glob.glob(f"{work}/runs/**/summary.json", recursive=True))
    if summ:
        s = json.load(open(summ[-1]))
        res["deepspeed"] = {k: v for k, v in s.items() if k.startswith("measured/") or k in ("status", "error")}
    if ds_rc != "0" and logs:
        res["deepspeed_log_tail"] = open(logs[0]).read()[-3000:]
json.dump(res, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "deepspeed_log_tail"}, indent=1))
PYEOF
