#!/usr/bin/env bash
# nnAudio front-ends on one GPU: (1) every layer (STFT, Mel, MFCC, CQT 2010/1992, fixed and
# trainable) on the GPU equals the same layer on the CPU, and trainable kernels get finite gradients
# there; (2) the side-by-side benchmark (scripts/bench_nnaudio.py) with --device cuda: ours vs
# torch.stft vs nnAudio 0.3.4 on the GPU (librosa, when importable, stays on the CPU as the
# reference). Writes $OUT/nnaudio_gpu_consistency.json and $OUT/nnaudio_bench_gpu.json.
#
# Needs torch + numpy (our layers need no librosa/scipy). Optional, carried from the CPU machine
# (the GPU machine has no network): nnAudio 0.3.4 as a --target directory
#   .venv/bin/pip install --no-deps --target .bench/nnaudio-0.3.4 nnaudio==0.3.4   (needs scipy there)
# then run with carry=[".bench"]. Without it the nnAudio rows are skipped (reason recorded).
# Without a GPU it runs the same steps on the CPU with 8 clips (checks the script, not the numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib_gpu_env.sh

if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEV=cuda; CLIPS=64; REPS=20
  $PY -c "import torch; print('gpu:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
else
  echo "no CUDA device: CPU fallback (8 clips; checks the script, not the numbers)" >&2
  DEV=cpu; CLIPS=8; REPS=2
fi
NNA_DIR=.bench/nnaudio-0.3.4
[ -d "$NNA_DIR" ] || NNA_DIR="$HOME/.cache/effrun/bench/nnaudio-0.3.4"

timeout 240 $PY - "$OUT/nnaudio_gpu_consistency.json" "$DEV" <<'PYEOF' || echo "consistency check failed" >&2
import json, sys, time, torch
from effrun.techniques.nnaudio import layers as L
out_path, dev = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
sr = 16000
x = torch.randn(16, sr)  # 16 one-second clips
make = {
    "stft": lambda t: L.STFT(512, 128, trainable=t),
    "mel": lambda t: L.MelSpectrogram(sr, 512, 128, n_mels=64, trainable=t),
    "mfcc": lambda t: L.MFCC(sr, n_mfcc=20, n_fft=512, hop_length=128, n_mels=64, trainable=t),
    "cqt2010": lambda t: L.CQT(sr, 128, 65.40639132514966, 72, 12, kind="2010", trainable=t),
    "cqt1992": lambda t: L.CQT(sr, 128, 130.8, 48, 12, kind="1992", trainable=t),
}
res = {"device": dev, "torch": torch.__version__}
for name, mk in make.items():
    for trainable in (False, True):
        m_cpu = mk(trainable)
        m_dev = mk(trainable).to(dev)
        with torch.no_grad():
            a = m_cpu(x)
            b = m_dev(x.to(dev)).cpu()
        tol = 1e-3 if name == "mfcc" else 1e-4 * float(a.abs().max())
        err = float((a - b).abs().max())
        row = {"max_abs_err_vs_cpu": err, "ok": err <= tol, "shape": list(b.shape)}
        if trainable:
            y = m_dev(x.to(dev))
            y.square().mean().backward()
            row["grads_finite_nonzero"] = all(bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().max()) > 0
                                              for p in m_dev.parameters())
        res[f"{name}/{'trainable' if trainable else 'fixed'}"] = row
        print(name, "trainable" if trainable else "fixed", row, flush=True)
res["all_ok"] = all(v["ok"] and v.get("grads_finite_nonzero", True) for k, v in res.items() if isinstance(v, dict))
json.dump(res, open(out_path, "w"), indent=1)
print("all_ok", res["all_ok"])
PYEOF

timeout 300 $PY scripts/bench_nnaudio.py --device "$DEV" --clips "$CLIPS" --reps "$REPS" \
  --nnaudio-dir "$NNA_DIR" --out "$OUT/nnaudio_bench_gpu.json"
