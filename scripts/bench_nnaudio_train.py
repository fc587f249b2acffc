#!/usr/bin/env python
"""Training-step cost of the three arms of recipes/nnaudio_vs_librosa.yaml, side by side.

The recipe runs its arms one after another (Hydra's sequential launcher), so on a shared machine
their step times see different loads; this script measures the same thing interleaved in ONE
process, so a ratio compares like with like:

  fixed          audio-cnn on waveforms with the nnAudio mel front-end, fixed kernels
  trainable      the same with trainable kernels (STFT conv kernels + mel filterbank as parameters)
  librosa_files  audio-cnn on precomputed mel features (the baseline; its librosa precompute of the
                 training clips is timed separately, once per rep)

Each rep runs `--steps` optimizer steps (AdamW, batch `--batch`, real spoken-words training clips)
of every arm in turn (A B C, A B C, ...), after `--warmup` untimed steps per arm. A time per arm is
the median of its steps pooled over the reps, with its spread (IQR / median); a ratio is the ratio
of the pooled medians, with the range of the per-rep ratios. A ratio whose per-rep range exceeds the
difference it claims is printed as `refused`, not as a number. Wall time and process CPU time are
both reported (CPU time is the steadier one under load). Epoch time = step time x steps per epoch.

    flock -x /work/notes/cpu.lock nice -n 5 .venv/bin/python scripts/bench_nnaudio_train.py --out bench_train.json

Bad arguments: one line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per arm per rep (>= 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="alternating reps (>= 2 for a ratio)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--channels", default="16,32,64", help="CNN widths (audio-cnn: 16,32,64)")
    ap.add_argument("--front-end", default="mel", choices=("stft", "mel", "mfcc", "cqt"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    for k in ("batch", "threads", "reps"):
        if getattr(a, k) < 1:
            ap.exit(2, f"error: --{k}: must be >= 1, got {getattr(a, k)}\n")
    if a.steps < 3:
        ap.exit(2, f"error: --steps: must be >= 3 (a median of fewer steps is noise), got {a.steps}\n")
    if a.warmup < 0:
        ap.exit(2, f"error: --warmup: must be >= 0, got {a.warmup}\n")
    try:
        a.channels = tuple(int(c) for c in a.channels.split(","))
        assert a.channels and min(a.channels) >= 1
    except (ValueError, AssertionError):
        ap.exit(2, f"error: --channels: comma-separated widths >= 1, got {a.channels!r}\n")
    return a


def quantiles(v):
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return q[0], statistics.median(v), q[2]


def main(argv=None) -> int:
    a = parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from effrun.families.audio_classification import data as D
    from effrun.families.audio_classification import model as M
    from effrun.techniques.nnaudio import FrontEndConfig, NnAudioConfig, build_front_end, features_are_log
    from effrun.techniques.nnaudio.baseline import librosa_features

    dcfg = D.AudioDataConfig()  # spoken-words: 765 training clips of 1 s at 16 kHz
    train, _, classes = D.load(dcfg, progress=lambda m: print(m, file=sys.stderr))
    sr = dcfg.sample_rate
    fe_kw = dict(front_end=a.front_end, n_fft=512, hop_length=128, n_mels=64)  # the recipe's settings
    fcfg = FrontEndConfig(**fe_kw)
    log = not features_are_log(fcfg)
    per_epoch = math.ceil(len(train) / a.batch)

    def build(fe, n_features=None):
        torch.manual_seed(0)
        return M.build_model(fe, len(classes), n_features, log_features=log, channels=a.channels, dropout=0.1)

    # the librosa arm's features of every training clip (timed per rep below: the precompute cost)
    def precompute():
        feats = [librosa_features(train.waveforms_np(np.arange(i, min(i + 64, len(train)))), fcfg, sr)
                 for i in range(0, len(train), 64)]
        return torch.from_numpy(np.concatenate(feats))

    t0 = time.perf_counter()
    feats = precompute()
    first_precompute = time.perf_counter() - t0  # librosa's import and first calls included
    arms = {
        "fixed": build(build_front_end(NnAudioConfig(**fe_kw), sr)),
        "trainable": build(build_front_end(NnAudioConfig(**fe_kw, trainable=True), sr)),
        "librosa_files": build(None, int(feats.shape[1])),
    }
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3) for k, m in arms.items()}

    def batch(arm, i):
        ids = torch.as_tensor(train.indices(i, a.batch))
        if arm == "librosa_files":
            return {"features": feats[ids], "label": train.labels[ids]}
        return {"waveform": train.waveforms[ids], "label": train.labels[ids]}

    def step(arm, i):
        m, opt = arms[arm], opts[arm]
        b = batch(arm, i)
        w, c = time.perf_counter(), time.process_time()
        total, n = M.loss(m, b)
        opt.zero_grad(set_to_none=True)
        (total / n).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - w, time.process_time() - c

    load0 = os.getloadavg()
    wall = {k: [] for k in arms}
    cpu = {k: [] for k in arms}
    per_rep = {k: [] for k in arms}  # (wall median, cpu median) of each rep
    pre = []
    pos = 0
    for r in range(a.reps):
        for arm in arms:
            for _ in range(a.warmup):
                step(arm, pos)
            ws, cs = [], []
            for s in range(a.steps):
                dw, dc = step(arm, pos + s)
                ws.append(dw)
                cs.append(dc)
            wall[arm] += ws
            cpu[arm] += cs
            per_rep[arm].append((statistics.median(ws), statistics.median(cs)))
        w, c = time.perf_counter(), time.process_time()
        precompute()
        pre.append((time.perf_counter() - w, time.process_time() - c))
        pos += a.steps
        print(f"rep {r + 1}/{a.reps} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    load1 = os.getloadavg()

    res = {"load_before": load0, "load_after": load1, "args": {k: v for k, v in vars(a).items()},
           "train_clips": len(train), "steps_per_epoch": per_epoch, "arms": {}, "ratios": {},
           "precompute_s": {"wall": [p[0] for p in pre], "cpu": [p[1] for p in pre],
                            "first_wall": first_precompute}}
    print(f"\ntrain step, batch {a.batch}, audio-cnn {a.channels}, {a.front_end}; {a.threads} thread(s); "
          f"{a.reps} reps x {a.steps} steps alternating; load {load0[0]:.1f} -> {load1[0]:.1f}")
    print("| arm | step wall ms (median, IQR/med) | step CPU ms (median, IQR/med) | epoch wall s | epoch CPU s |")
    print("|---|---:|---:|---:|---:|")
    for arm in arms:
        qw, qc = quantiles(wall[arm]), quantiles(cpu[arm])
        res["arms"][arm] = {"wall_s": qw[1], "cpu_s": qc[1], "wall_spread": (qw[2] - qw[0]) / qw[1],
                            "cpu_spread": (qc[2] - qc[0]) / qc[1], "epoch_wall_s": qw[1] * per_epoch,
                            "epoch_cpu_s": qc[1] * per_epoch, "per_rep": per_rep[arm]}
        print(f"| {arm} | {1000 * qw[1]:.1f} ({(qw[2] - qw[0]) / qw[1]:.0%}) | {1000 * qc[1]:.1f} "
              f"({(qc[2] - qc[0]) / qc[1]:.0%}) | {qw[1] * per_epoch:.2f} | {qc[1] * per_epoch:.2f} |")
    pw, pc = statistics.median(res["precompute_s"]["wall"]), statistics.median(res["precompute_s"]["cpu"])
    print(f"| librosa precompute of the {len(train)} training clips (once; features in memory, no files) | "
          f"wall {pw:.2f} s | CPU {pc:.2f} s | | |")
    print(f"(the process's first precompute, librosa's import and first calls included: {first_precompute:.2f} s wall)")
    print()
    for arm in ("fixed", "trainable"):
        for j, what in ((0, "wall"), (1, "CPU")):
            base = "librosa_files"
            pooled = res["arms"][arm][what.lower() + "_s"] / res["arms"][base][what.lower() + "_s"]
            reps = [x[j] / y[j] for x, y in zip(per_rep[arm], per_rep[base])]
            spread = max(reps) - min(reps) if len(reps) > 1 else float("inf")
            ok = len(reps) > 1 and spread <= abs(1 - pooled)
            res["ratios"][f"{arm}/{base} {what}"] = {"ratio": pooled if ok else None, "pooled": pooled,
                                                     "per_rep": reps, "refused": not ok}
            if ok:
                print(f"{arm} / {base} step {what}: {pooled:.2f}x (per-rep {min(reps):.2f}-{max(reps):.2f})")
            else:
                why = "one rep gives no spread" if len(reps) < 2 else \
                    f"spread {spread:.2f} > difference {abs(1 - pooled):.2f}"
                print(f"{arm} / {base} step {what}: refused ({why})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
