#!/usr/bin/env bash
# PaCA vs LoRA (and the PaCA r=1 floor) on one GPU (bf16, longer sequences), eager and
# torch.compile in one bench run (A B C A B C, medians, spread rule); writes the ratios as JSON to
# $OUT/paca.json. QPaCA (NF4/int8) on the device: bitsandbytes' NF4 when importable, else the
# hand-written quantiser (the GPU image has no bitsandbytes); the QLoRA base (NF4Linear) likewise.
# Needs: torch + transformers + peft, and hydra-core/omegaconf importable (PYTHONPATH). Runs from
# the repo root; no network, no assets needed: SmolLM2-135M's *shape* with random weights and
# synthetic tokens when the fetched asset is absent (speed and memory do not depend on the values).
# Without a GPU it falls back to a tiny CPU run that exercises the same path (used to test it).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib_gpu_env.sh

SMOL_SHAPE=(model=llama-tiny model.name=smollm2-shape model.hf_config.vocab_size=49152
  model.hf_config.hidden_size=576 model.hf_config.intermediate_size=1536 model.hf_config.num_hidden_layers=30
  model.hf_config.num_attention_heads=9 model.hf_config.num_key_value_heads=3
  model.hf_config.max_position_embeddings=8192 model.hf_config.tie_word_embeddings=true)

if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ -f "$HOME/.cache/effrun/smollm2-135m/.complete" ]; then MODEL=(--model smollm2-135m); else
    MODEL=(--model llama-tiny --extra "${SMOL_SHAPE[@]:1}"); fi
  ARGS=("${MODEL[@]}" --data synthetic --device cuda --dtype bfloat16 --hardware h100-sxm --seq 2048 --batch 4
        --steps 5 --warmup 2 --compile-warmup 3 --reps 2 --modes eager,compile --techniques paca,paca1,lora
        --timeout 120)
  $PY -c "import torch; print('gpu:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
else
  echo "no CUDA device: CPU fallback (tiny model; checks the script, not the numbers)" >&2
  ARGS=(--model llama-tiny --data synthetic --seq 128 --batch 2 --steps 5 --warmup 1 --reps 2 --modes eager
        --techniques paca,paca1,lora --timeout 300)
fi
# QPaCA (NF4/int8) on this device: trains, grads of the op vs a dense reference, merge
timeout 60 $PY - "$OUT/paca_qpaca.json" <<'PYEOF' || echo "qpaca check failed" >&2
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from effrun.techniques.paca.plugin import QPacaLinear, apply_paca, merge_paca
from effrun.techniques.qlora import available
dev = "cuda" if torch.cuda.is_available() else "cpu"
backend = "bnb" if available("bnb") else "effrun"
out = {"device": dev, "nf4_backend": backend}
for mode in ("nf4", "int8"):
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).to(dev)
    apply_paca(m, 16, 32.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 0, mode,
               backend=backend)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    x = torch.randint(0, 256, (4, 65), device=dev)
    losses = []
    for _ in range(10):
        loss = m(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward(); opt.step(); opt.zero_grad(); losses.append(float(loss))
    lin = torch.nn.Linear(64, 32, dtype=torch.float64, device=dev)
    q = QPacaLinear(lin, torch.arange(0, 64, 8, device=dev), 2.0, mode, 64, True, backend)
    W = q.dequantized_weight().detach()
    xi = torch.randn(3, 64, dtype=torch.float64, device=dev, requires_grad=True)
    q(xi).sum().backward()
    gx_ref = torch.ones(3, 32, dtype=torch.float64, device=dev) @ W
    with torch.no_grad():
        ref = m(input_ids=x[:, :-1]).logits
        merge_paca(m)
        merged = m(input_ids=x[:, :-1]).logits
    out[mode] = {"loss_first": losses[0], "loss_last": losses[-1], "loss_decreased": losses[-1] < losses[0],
                 "input_grad_max_err": float((xi.grad - gx_ref).abs().max()),
                 "merge_max_abs_diff": float((merged - ref).abs().max())}
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out))
PYEOF
timeout 480 $PY scripts/bench_paca.py "${ARGS[@]}" --out "$OUT/paca.json"
$PY - "$OUT/paca.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({"ratios": r.get("ratios"), "stats": r.get("stats")}, indent=1))
PYEOF
