"""The audio-classification family: data (waveforms or librosa feature files), the CNN, loss and
accuracy, the clips/s infer session. See the package docstring for what `data.features` means."""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

import torch

from effrun.errors import UserError
from effrun.families.audio_classification import data_config
from effrun.families.audio_classification import data as D
from effrun.families.audio_classification import model as M
from effrun.family import Family
from effrun.techniques import nnaudio

FEATURE_FORMAT = 1


def feature_rows(cfg: nnaudio.FrontEndConfig) -> int:
    """Rows F of the [B, F, T] features `cfg` describes (what the CNN's per-row batch norm needs)."""
    return {"stft": cfg.n_fft // 2 + 1, "mel": cfg.n_mels, "mfcc": cfg.n_mfcc, "cqt": cfg.n_bins}[cfg.front_end]


class AudioClassification(Family):
    # --- data ----------------------------------------------------------------------------------
    @cached_property
    def dcfg(self) -> D.AudioDataConfig:
        return data_config(self.cfg.data)

    @cached_property
    def splits(self):
        """(train, eval, classes) waveforms; the clip cache is built on first use (progress on stderr).
        The training order is seeded by data.seed and run.seed (run.seed=0: data.seed alone)."""
        train, ev, classes = D.load(self.dcfg)
        train.seed = int(self.dcfg.seed) + (int(self.cfg.run.seed) << 32)
        return train, ev, classes

    @property
    def librosa_files(self) -> bool:
        return self.cfg.data.features == "librosa_files"

    @cached_property
    def librosa_cfg(self) -> nnaudio.FrontEndConfig:
        return nnaudio.as_config(self.cfg.data.librosa)

    def validate(self) -> None:
        self.splits  # noqa: B018  (fails early, one line: espeak-ng missing, a wav at another rate, ...)
        rec = self.ctx.recorder
        train, ev, _ = self.splits
        rec.set("measured/eval_clips", len(ev))
        if self.ctx.mode == "train":
            d, run = self.cfg.data, self.cfg.run
            per_step = int(d.batch_size) * int(run.grad_accum) * int(self.ctx.world_size)
            rec.set("measured/train_clips", len(train))
            rec.set("measured/steps_per_epoch", math.ceil(len(train) / per_step))
        rec.set("info/features", self.describe())

    def describe(self) -> str:
        sr = int(self.cfg.data.sample_rate)
        if self.librosa_files:
            where = "files" if self.ctx.mode == "train" else "a librosa call per batch (infer)"
            return f"librosa {librosa_version()} {nnaudio.describe(self.librosa_cfg, sr)}, {where}"
        return "waveforms; the front-end technique computes the features"

    def features_dir(self) -> Path:
        """Where the librosa features go: the run dir, or the shared cache keyed by the clip set, the
        librosa settings and librosa's version (data.feature_cache=true)."""
        if not self.cfg.data.feature_cache:
            return self.ctx.run_dir / "features"
        key = json.dumps(dict(clips=D.config_hash(self.dcfg), librosa=asdict(self.librosa_cfg),
                              version=librosa_version(), format=FEATURE_FORMAT), sort_keys=True)
        return D.cache_root() / "features" / hashlib.sha256(key.encode()).hexdigest()[:16]

    @cached_property
    def precomputed(self):
        """(train, eval) feature files read back; computed first when missing. Records
        measured/precompute_s: the librosa time of both splits (from the files' meta when reused)."""
        from effrun.techniques.nnaudio.baseline import PrecomputedDataset, precompute_features

        train, ev, _ = self.splits
        root = self.features_dir()
        sr = int(self.cfg.data.sample_rate)
        out, seconds = [], 0.0
        for name, ds in (("train", train), ("eval", ev)):
            d = root / name
            if self.ctx.is_main and not _complete(d, len(ds)):
                t0 = time.perf_counter()
                precompute_features(ds, self.librosa_cfg, sr, d)
                meta = json.loads((d / "meta.json").read_text())
                meta["wall_s"] = time.perf_counter() - t0
                (d / "meta.json").write_text(json.dumps(meta, indent=1))
            self.ctx.barrier()
            pre = PrecomputedDataset(d, like=ds)
            seconds += float(pre.meta.get("wall_s", pre.meta.get("seconds", 0.0)))
            out.append(pre)
        self.ctx.recorder.set("measured/precompute_s", seconds)
        self.ctx.recorder.set("info/features_dir", str(root))
        if out[0].n_features != feature_rows(self.librosa_cfg):
            raise UserError(f"{root} holds {out[0].n_features}-row features, the settings give "
                            f"{feature_rows(self.librosa_cfg)}; delete it to rebuild", key="data.librosa")
        return out[0], out[1]

    def train_batch(self, index: int, batch_size: int):
        if self.librosa_files:
            return self.precomputed[0].batch(index, batch_size)
        return self.splits[0].batch(index, batch_size)

    def eval_batches(self):
        bs = int(self.cfg.data.eval_batch_size)
        if self.librosa_files:
            return self.precomputed[1].iter_batches(bs)
        return self.splits[1].iter_batches(bs)

    def to_device(self, batch):
        dev = self.ctx.device
        return {k: v.to(dev) for k, v in batch.items()}

    # --- model and loss ------------------------------------------------------------------------
    def build_model(self):
        m = self.cfg.model
        classes = self.splits[2]
        if self.librosa_files:
            if self.ctx.mode == "train":
                self.precomputed  # noqa: B018  (the files exist before the model: n_features, timing)
            n_features, log = feature_rows(self.librosa_cfg), not nnaudio.features_are_log(self.librosa_cfg)
        else:
            n_features, log = None, True  # the front-end technique attaches its front-end (and sizes the norm)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.cfg.run.seed if m.init_seed is None else m.init_seed))
            model = M.build_model(None, len(classes), n_features, log_features=log,
                                  channels=tuple(int(c) for c in m.channels), dropout=float(m.dropout))
        return model.to(self.ctx.device)

    def loss(self, model, batch):
        return M.loss(model, batch)

    def units(self, batch) -> int:
        return int(batch["label"].numel())

    def evaluate(self, model, loss_fn=None):
        out = M.evaluate(model, (self.to_device(b) for b in self.eval_batches()))
        out.pop("eval_clips", None)
        rec = self.ctx.recorder
        step, per_epoch = rec.summary.get("measured/step_time_s"), rec.summary.get("measured/steps_per_epoch")
        if step is not None and per_epoch:  # at the end of training (step times aggregated)
            rec.set("measured/epoch_time_s", float(step) * int(per_epoch))
        return out

    # --- infer ---------------------------------------------------------------------------------
    def infer_session(self, model, decoding=None, executor=None):
        from effrun.families.audio_classification.session import ClipSpeedSession

        _, ev, _ = self.splits
        batches = list(ev.iter_batches(int(self.cfg.data.batch_size)))
        if self.librosa_files:
            from effrun.techniques.nnaudio.baseline import librosa_features

            cfg, sr = self.librosa_cfg, int(self.cfg.data.sample_rate)

            def featurize(b):
                return torch.from_numpy(librosa_features(b["waveform"].numpy(), cfg, sr))
        else:
            if not getattr(model, "takes_waveforms", False):
                raise UserError("data.features=waveform needs a front-end on the model; add +technique=nnaudio",
                                key="data.features", choices=["librosa_files"])

            def featurize(b):
                return b["waveform"]
        return ClipSpeedSession(model, batches, featurize, warmup=int(self.cfg.run.warmup_steps),
                                timed=int(self.cfg.run.max_steps), device=self.ctx.device, n_eval=len(ev),
                                features=self.describe())


def _complete(d: Path, n: int) -> bool:
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("n_clips") == n and (d / "features.npy").is_file() and (d / "labels.npy").is_file()


def librosa_version() -> str:
    from importlib.metadata import version

    try:
        return version("librosa")
    except Exception:
        return "?"
