#!/usr/bin/env python
"""nnAudio front-ends side by side in one run: ours (effrun.techniques.nnaudio) vs librosa (looped
per clip and one whole-batch call), torch.stft, and nnAudio 0.3.4 itself.

Default workload (the issue's): 64 clips x 5 s at 22.05 kHz of real speech (the pyannote-audio
wheel's sample, resampled), STFT n_fft=2048 hop=512 (magnitude), Mel 128 bands (power), CQT from
C1, 84 bins, 12 per octave, hop 512 (magnitude), MFCC 20 (info only). Every contender computes the
same quantity; errors are against librosa's whole-batch call:
  STFT / Mel: max |ours - librosa| / max |librosa|        goal <= 1e-5
  CQT: p99 of |ours - librosa| / |librosa| over bins above 1e-3 of each clip's peak   goal <= 1%
Speed goals (fixed kernels, wall time, min over --reps): >= 1.5x librosa's whole-batch call and
>= 3x nnAudio (its fastest variant). The goals are printed as PASS/FAIL from this run's ratios.

nnAudio 0.3.4 is installed by this script into its own directory (pip install --no-deps --target,
default ~/.cache/effrun/bench/nnaudio-0.3.4), never into the project venv.

  .venv/bin/python scripts/bench_nnaudio.py                        # the issue's benchmark, 2 threads
  .venv/bin/python scripts/bench_nnaudio.py --clips 8 --reps 3    # quick
  python scripts/bench_nnaudio.py --device cuda --out $OUT/nnaudio.json   # GPU (librosa stays on CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PAPER = {  # Cheuk et al. 2020, Table (1,770 MAPS clips; librosa on CPU vs nnAudio on a V100), seconds
    "stft": (10.64, 0.001), "mel": (18.3, 0.015), "cqt": (103.4, 0.258)}


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--sr", type=int, default=22050)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op, BLAS and OpenMP threads for everyone")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--features", default="stft,mel,cqt,mfcc")
    ap.add_argument("--signal", default="speech", choices=("speech", "synthetic"))
    ap.add_argument("--no-nnaudio", action="store_true")
    ap.add_argument("--no-trainable", action="store_true", help="skip the trainable-kernel rows")
    ap.add_argument("--nnaudio-dir", default=str(Path.home() / ".cache" / "effrun" / "bench" / "nnaudio-0.3.4"))
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for everyone: on a shared, oversubscribed box OpenMP threads that "
                         "spin at barriers made 2-thread torch runs 3-10x slower (not needed on a quiet box)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    return ap.parse_args()


ARGS = parse()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)  # before numpy/torch load their thread pools
if ARGS.omp_passive:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from effrun.techniques.nnaudio import layers as L  # noqa: E402
from effrun.techniques.nnaudio import kernels as K  # noqa: E402


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def try_import_librosa():
    try:
        import librosa

        return librosa, None
    except Exception as e:  # the GPU image has no librosa
        return None, f"librosa not importable ({e.__class__.__name__}: {e})"


def ensure_nnaudio(target: Path):
    if not (target / "nnAudio").exists():
        say(f"installing nnAudio 0.3.4 into {target} (pip install --no-deps --target; not the project venv)")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                            "nnaudio==0.3.4"], capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"pip install nnaudio==0.3.4 failed: {r.stderr.strip().splitlines()[-1:]}"
    sys.path.insert(0, str(target))
    try:
        from nnAudio import features

        return features, None
    except Exception as e:
        return None, f"nnAudio not importable ({e.__class__.__name__}: {e})"


def signals(n, seconds, sr, kind, librosa):
    """[n, S] float32: windows of real speech (pyannote-audio's 30 s two-speaker sample), or a
    deterministic speech-like synthetic signal when the wheel audio or librosa is unavailable."""
    S = int(round(seconds * sr))
    if kind == "speech" and librosa is not None:
        try:
            from effrun.families.audio_classification.data import fetch_wheel_audio, read_wav

            y = read_wav(fetch_wheel_audio(say) / "pyannote_sample.wav", sr, resample=True)
            starts = np.linspace(0, len(y) - S, n).astype(int) if len(y) > S else np.zeros(n, int)
            return np.stack([y[s:s + S] for s in starts]).astype(np.float32), "pyannote-audio sample.wav (speech)"
        except Exception as e:
            say(f"speech unavailable ({e}); using the synthetic signal")
    t = np.arange(S) / sr
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        f0 = (110 + 10 * i % 90) * (1 + 0.05 * np.sin(2 * np.pi * 5 * t))
        ph = 2 * np.pi * np.cumsum(f0) / sr
        v = sum(np.sin(k * ph) / k for k in range(1, 30)) * (0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * t + i))
        out.append(0.3 * v + 0.01 * rng.standard_normal(S))
    return np.stack(out).astype(np.float32), "synthetic harmonic series + noise"


def timed(fn, reps, sync):
    """(result, wall ms min, wall ms median, process CPU ms min). On a loaded machine the CPU time
    (all threads of this process) is the steadier number; the goals use wall time."""
    fn()
    sync()
    ts, cs = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        r = fn()
        sync()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return r, 1e3 * min(ts), 1e3 * float(np.median(ts)), 1e3 * min(cs)


def to_np(r):
    if isinstance(r, torch.Tensor):
        return r.detach().cpu().numpy()
    return np.asarray(r)


def max_rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def p99_rel(a, b):
    a, b = np.abs(a), np.abs(b)
    m = b > 1e-3 * b.max(axis=(-2, -1), keepdims=True)
    e = np.abs(a - b)[m] / b[m]
    return float(np.percentile(e, 99)), float(np.median(e))


def main():
    torch.set_num_threads(ARGS.threads)
    dev = torch.device(ARGS.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    librosa, why_librosa = try_import_librosa()
    nna, why_nna = (None, "--no-nnaudio") if ARGS.no_nnaudio else ensure_nnaudio(Path(ARGS.nnaudio_dir))
    if why_librosa:
        say(why_librosa)
    if why_nna:
        say(why_nna)
    sr, n_fft, hop = ARGS.sr, 2048, 512
    X, source = signals(ARGS.clips, ARGS.seconds, sr, ARGS.signal, librosa)
    XT = torch.from_numpy(X).to(dev)
    load0 = os.getloadavg()
    res = {"info/device": str(dev), "info/threads": ARGS.threads, "info/clips": ARGS.clips,
           "info/seconds": ARGS.seconds, "info/sr": sr, "info/signal": source, "info/load_before": load0,
           "info/omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
           "info/torch": torch.__version__, "info/librosa": getattr(librosa, "__version__", why_librosa),
           "info/nnaudio": "0.3.4" if nna else why_nna, "rows": []}
    if cuda:
        res["info/gpu"] = torch.cuda.get_device_name(0)
    feats = ARGS.features.split(",")
    win = torch.from_numpy(K.window("hann", n_fft, n_fft)).float().to(dev)
    mel_np = K.mel_basis(sr, n_fft, 128, 0.0, None)
    mel_t = torch.from_numpy(mel_np).float().to(dev)
    cqt_kw = dict(hop_length=hop, fmin=32.70319566257483, n_bins=84, bins_per_octave=12)

    def run(feature, name, fn, kind, ref=None, role=""):
        with torch.no_grad():
            out, t_min, t_med, c_min = timed(fn, ARGS.reps, sync)
        row = {"feature": feature, "name": name, "role": role, "kind": kind, "ms_min": t_min, "ms_median": t_med,
               "cpu_ms_min": c_min}
        if ref is not None:
            o = to_np(out) if not isinstance(out, list) else np.stack([to_np(r) for r in out])
            if feature == "cqt":
                row["p99_rel_err"], row["median_rel_err"] = p99_rel(o, ref)
            elif feature == "mfcc":
                row["max_abs_err_db"] = float(np.abs(o - ref).max())
            else:
                row["max_rel_err"] = max_rel(o, ref)
        res["rows"].append(row)
        err = {k: f"{v:.2e}" for k, v in row.items() if "err" in k}
        say(f"  {feature:5s} {name:34s} {t_min:9.1f} ms (median {t_med:8.1f}, cpu {c_min:8.1f})  {err}")
        return out

    for feature in feats:
        say(f"[{feature}]")
        ref = None
        if feature == "stft":
            if librosa:
                ref = run(feature, "librosa batch", lambda: np.abs(librosa.stft(X, n_fft=n_fft, hop_length=hop)),
                          "cpu", role="librosa_batch")
                run(feature, "librosa loop", lambda: [np.abs(librosa.stft(x, n_fft=n_fft, hop_length=hop)) for x in X],
                    "cpu", ref, role="librosa_loop")
            run(feature, "torch.stft", lambda: torch.stft(XT, n_fft, hop, window=win, pad_mode="constant",
                                                          return_complex=True).abs(), ARGS.device, ref, "torch_stft")
            if nna:
                m = nna.STFT(n_fft=n_fft, hop_length=hop, output_format="Magnitude", pad_mode="constant",
                             verbose=False).to(dev)
                run(feature, "nnAudio STFT", lambda: m(XT), ARGS.device, ref, role="nnaudio")
            m1 = L.STFT(n_fft, hop).to(dev)
            run(feature, "ours STFT (fixed)", lambda: m1(XT), ARGS.device, ref, role="ours")
            if not ARGS.no_trainable:
                m2 = L.STFT(n_fft, hop, trainable=True).to(dev)
                run(feature, "ours STFT (trainable kernels)", lambda: m2(XT), ARGS.device, ref, role="ours_trainable")
        elif feature == "mel":
            if librosa:
                ref = run(feature, "librosa batch", lambda: librosa.feature.melspectrogram(
                    y=X, sr=sr, n_fft=n_fft, hop_length=hop), "cpu", role="librosa_batch")
                run(feature, "librosa loop", lambda: [librosa.feature.melspectrogram(
                    y=x, sr=sr, n_fft=n_fft, hop_length=hop) for x in X], "cpu", ref, role="librosa_loop")
            run(feature, "torch.stft + mel matmul", lambda: torch.matmul(
                mel_t, torch.stft(XT, n_fft, hop, window=win, pad_mode="constant", return_complex=True).abs() ** 2),
                ARGS.device, ref, role="torch_stft")
            if nna:
                m = nna.MelSpectrogram(sr=sr, n_fft=n_fft, hop_length=hop, n_mels=128, pad_mode="constant",
                                       verbose=False).to(dev)
                run(feature, "nnAudio MelSpectrogram", lambda: m(XT), ARGS.device, ref, role="nnaudio")
            m1 = L.MelSpectrogram(sr, n_fft, hop).to(dev)
            run(feature, "ours Mel (fixed)", lambda: m1(XT), ARGS.device, ref, role="ours")
            if not ARGS.no_trainable:
                m2 = L.MelSpectrogram(sr, n_fft, hop, trainable=True).to(dev)
                run(feature, "ours Mel (trainable kernels)", lambda: m2(XT), ARGS.device, ref, role="ours_trainable")
        elif feature == "cqt":
            if librosa:
                ref = run(feature, "librosa batch", lambda: np.abs(librosa.cqt(X, sr=sr, **cqt_kw)), "cpu",
                          role="librosa_batch")
                run(feature, "librosa loop", lambda: [np.abs(librosa.cqt(x, sr=sr, **cqt_kw)) for x in X], "cpu",
                    ref, role="librosa_loop")
            if nna:
                for cls in ("CQT1992v2", "CQT2010v2"):
                    m = getattr(nna, cls)(sr=sr, output_format="Magnitude", pad_mode="constant", verbose=False,
                                          **cqt_kw).to(dev)
                    run(feature, f"nnAudio {cls}", lambda m=m: m(XT), ARGS.device, ref, role="nnaudio")
            m1 = L.CQT(sr, kind="2010", **cqt_kw).to(dev)
            run(feature, "ours CQT kind=2010 (fixed)", lambda: m1(XT), ARGS.device, ref, role="ours")
            m3 = L.CQT(sr, kind="1992", **cqt_kw).to(dev)
            run(feature, "ours CQT kind=1992 (fixed)", lambda: m3(XT), ARGS.device, ref, role="ours_1992")
            if not ARGS.no_trainable:
                m2 = L.CQT(sr, kind="2010", trainable=True, **cqt_kw).to(dev)
                run(feature, "ours CQT 2010 (trainable kernels)", lambda: m2(XT), ARGS.device, ref,
                    role="ours_trainable")
        elif feature == "mfcc":
            if librosa:  # per clip: top_db applies per clip (a batch call would clip at the batch max)
                ref = run(feature, "librosa loop", lambda: np.stack([librosa.feature.mfcc(
                    y=x, sr=sr, n_fft=n_fft, hop_length=hop) for x in X]), "cpu", role="librosa_loop")
            if nna:
                m = nna.MFCC(sr=sr, n_mfcc=20, n_fft=n_fft, hop_length=hop, pad_mode="constant",
                             verbose=False).to(dev)
                run(feature, "nnAudio MFCC", lambda: m(XT), ARGS.device, ref, role="nnaudio")
            m1 = L.MFCC(sr, n_mfcc=20, n_fft=n_fft, hop_length=hop).to(dev)
            run(feature, "ours MFCC (fixed)", lambda: m1(XT), ARGS.device, ref, role="ours")

    res["info/load_after"] = os.getloadavg()
    summarize(res)
    if ARGS.out:
        Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ARGS.out).write_text(json.dumps(res, indent=1))
        say(f"wrote {ARGS.out}")


def summarize(res):
    rows = res["rows"]
    goals = {}
    print(f"\nnnAudio front-ends: {res['info/clips']} clips x {res['info/seconds']:g} s at {res['info/sr']} Hz, "
          f"{res['info/signal']}; device {res['info/device']}, {res['info/threads']} threads "
          f"(OMP_WAIT_POLICY {res['info/omp_wait_policy']}); load "
          f"{res['info/load_before'][0]:.1f} -> {res['info/load_after'][0]:.1f}")
    print(f"{'feature':7s} {'contender':36s} {'ms (min)':>10s} {'ms (med)':>10s} {'cpu ms':>10s}  "
          "error vs librosa batch")
    for r in rows:
        err = " ".join(f"{k}={v:.2e}" for k, v in r.items() if "err" in k)
        print(f"{r['feature']:7s} {r['name']:36s} {r['ms_min']:10.1f} {r['ms_median']:10.1f} "
              f"{r['cpu_ms_min']:10.1f}  {err}")
    for feature in ("stft", "mel", "cqt"):
        by = {}
        for r in rows:
            if r["feature"] == feature:
                by.setdefault(r["role"], []).append(r)
        if "ours" not in by:
            continue
        ours = by["ours"][0]
        g = {"measured/ours_ms": ours["ms_min"]}
        if "librosa_batch" in by:
            lb = by["librosa_batch"][0]["ms_min"]
            g["measured/speedup_vs_librosa_batch"] = lb / ours["ms_min"]
            g["measured/cpu_time_ratio_vs_librosa_batch"] = by["librosa_batch"][0]["cpu_ms_min"] / ours["cpu_ms_min"]
            g["goal/speedup_vs_librosa_batch>=1.5"] = g["measured/speedup_vs_librosa_batch"] >= 1.5
            if feature == "cqt":
                g["measured/p99_rel_err"] = ours["p99_rel_err"]
                g["goal/p99_rel_err<=0.01"] = ours["p99_rel_err"] <= 0.01
            else:
                g["measured/max_rel_err"] = ours["max_rel_err"]
                g["goal/max_rel_err<=1e-5"] = ours["max_rel_err"] <= 1e-5
        if "nnaudio" in by:
            fastest = min(by["nnaudio"], key=lambda r: r["ms_min"])
            g["measured/nnaudio_fastest"] = fastest["name"]
            g["measured/speedup_vs_nnaudio"] = fastest["ms_min"] / ours["ms_min"]
            g["goal/speedup_vs_nnaudio>=3"] = g["measured/speedup_vs_nnaudio"] >= 3
        if "torch_stft" in by:
            g["measured/speedup_vs_torch_stft"] = by["torch_stft"][0]["ms_min"] / ours["ms_min"]
        lib_s, nna_s = PAPER[feature]
        g["paper/librosa_s_1770_clips"] = lib_s
        g["paper/nnaudio_v100_s_1770_clips"] = nna_s
        g["paper/speedup"] = lib_s / nna_s
        goals[feature] = g
    res["goals"] = goals
    print("\ngoals (this run's ratios; paper: 1,770 MAPS clips, librosa CPU vs nnAudio V100)")
    for f, g in goals.items():
        parts = []
        for k, v in g.items():
            if k.startswith("goal/"):
                parts.append(f"{k[5:]}: {'PASS' if v else 'FAIL'}")
        sp = [f"{k.split('/')[1]}={v:.2f}" for k, v in g.items() if "speedup" in k and k.startswith("measured")]
        print(f"  {f:5s} {' '.join(sp)}  | {'; '.join(parts)}  | paper speedup {g['paper/speedup']:.0f}x")


if __name__ == "__main__":
    main()
