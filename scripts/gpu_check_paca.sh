#!/usr/bin/env bash
# PaCA vs LoRA on one GPU (bf16, longer sequences), eager and torch.compile, plus the max sequence
# length under the same memory budget; writes the ratios as JSON to $OUT/paca.json.
# Needs: torch + transformers + peft, and hydra-core/omegaconf importable (PYTHONPATH). Runs from
# the repo root; no network, no assets needed: SmolLM2-135M's *shape* with random weights and
# synthetic tokens when the fetched asset is absent (speed and memory do not depend on the values).
# Without a GPU it falls back to a tiny CPU run that exercises the same path (used to test it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

SMOL_SHAPE=(model=llama-tiny model.name=smollm2-shape model.hf_config.vocab_size=49152
  model.hf_config.hidden_size=576 model.hf_config.intermediate_size=1536 model.hf_config.num_hidden_layers=30
  model.hf_config.num_attention_heads=9 model.hf_config.num_key_value_heads=3
  model.hf_config.max_position_embeddings=8192 model.hf_config.tie_word_embeddings=true)

if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ -f "$HOME/.cache/effrun/smollm2-135m/.complete" ]; then MODEL=(--model smollm2-135m); else
    MODEL=(--model llama-tiny --extra "${SMOL_SHAPE[@]:1}"); fi
  ARGS=("${MODEL[@]}" --data synthetic --device cuda --dtype bfloat16 --hardware h100-sxm --seq 2048 --batch 4
        --steps 8 --warmup 3 --modes eager,compile --maxseq --maxseq-limit 8192 --timeout 170)
  $PY -c "import torch; print('gpu:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
else
  echo "no CUDA device: CPU fallback (tiny model; checks the script, not the numbers)" >&2
  ARGS=(--model llama-tiny --data synthetic --seq 128 --batch 2 --steps 3 --warmup 1 --modes eager
        --maxseq --maxseq-limit 512 --timeout 300)
fi
timeout 280 $PY scripts/bench_paca.py "${ARGS[@]}" --out "$OUT/paca.json"
$PY - "$OUT/paca.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({"ratios": r["ratios"], "maxseq": r.get("maxseq")}, indent=1))
PYEOF
