"""The audio-classification task family: clips in, class logits out, cross-entropy, clips/s.

Data (`data.py`): spoken keywords synthesized with Debian's espeak-ng in many voices plus an
`_unknown_` class of real speech shipped in PyPI wheels, split by speaker (held-out voices are
unseen). Model (`model.py`): a small CNN over [B, F, T] features.

Where the features come from is the data's business (`data.features`), as it is for users:
- `waveform`: raw clips; the model needs a front-end, which `+technique=nnaudio` prepends (features
  computed on the fly, on the model's device, in train and infer). Without one the run is refused.
- `librosa_files`: the baseline -- librosa computes the features of every clip once into files
  (under the run dir, or a cache keyed by the config with `data.feature_cache=true`), the run records
  measured/precompute_s and trains on the files read back; the CNN has no front-end. `data.librosa.*`
  are that call's settings (the same dataclass as `technique.*` of nnaudio, same defaults). In infer
  mode there are no files for new audio: each timed round calls librosa on the batch, then the CNN.

Seeds: run.seed orders the training clips (a fresh permutation per epoch) and, unless
model.init_seed is set, initialises the CNN; techniques draw no random numbers, so two runs that
differ only in where the features come from start from the same weights on the same clip stream.

Infer mode: a clips/s speed session (`session.py`): `run.warmup_steps` warm-up rounds, then
`run.max_steps` timed rounds, each one batch of `data.batch_size` held-out clips through the model.

This module stays import-light (no torch): it is read when configs are composed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from effrun.families.audio_classification.data import AudioDataConfig
from effrun.family import FamilySpec
from effrun.techniques.nnaudio import FrontEndConfig

FEATURES = ("waveform", "librosa_files")
# techniques that prepend a front-end to the model (data.features=waveform needs one)
FRONT_END_TECHNIQUES = ("nnaudio",)


@dataclass
class AudioModel:
    name: str = "audio-cnn"
    description: str = ""
    family: str = "audio-classification"
    source: str = "random"
    # conv blocks (3x3 conv, batch norm, ReLU; 2x2 max-pool between blocks), then global average pool
    channels: List[int] = field(default_factory=lambda: [16, 32, 64], metadata={"range": "[1, inf)"})
    dropout: float = field(default=0.1, metadata={"range": "[0, 1)"})
    # the CNN's initial weights; null: run.seed (which also orders the training clips), so arms of a
    # comparison with the same run.seed start from the same weights and see the same clip stream
    init_seed: Optional[int] = field(default=None, metadata={"range": "[0, inf)"})


@dataclass
class AudioData(AudioDataConfig):
    name: str = "spoken-words"
    description: str = ""
    family: str = "audio-classification"
    batch_size: int = field(default=32, metadata={"range": "[1, inf)"})
    eval_batch_size: int = field(default=64, metadata={"range": "[1, inf)"})
    # waveform (a front-end technique computes the features) | librosa_files (precomputed baseline)
    features: str = "waveform"
    # the librosa call of the baseline (features=librosa_files)
    librosa: FrontEndConfig = field(default_factory=FrontEndConfig)
    # librosa_files: false = precompute under the run dir (every run pays and measures it);
    # true = under ~/.cache/effrun/audio/features/<key of data + librosa settings>, reused
    feature_cache: bool = False


def data_config(node) -> AudioDataConfig:
    """The dataset part of a data node (what keys the clip cache)."""
    from dataclasses import fields

    return AudioDataConfig(**{f.name: (list(node[f.name]) if f.name in ("words", "speeds", "pitches")
                                       else node[f.name]) for f in fields(AudioDataConfig)})


def check(cfg) -> None:
    """Pre-flight, no torch: the data settings, the features' source, the librosa settings against
    the sample rate and clip length, a front-end for waveforms."""
    from effrun.errors import UserError
    from effrun.families.audio_classification import data as D
    from effrun.techniques import nnaudio

    d, m = cfg.data, cfg.model
    if str(cfg.run.dtype) != "float32":
        raise UserError(f"the audio front-ends and the librosa baseline compute in float32, not {cfg.run.dtype}",
                        key="run.dtype", choices=["float32"])
    if not list(m.channels):
        raise UserError("needs at least one conv block width", key="model.channels")
    D.validate(data_config(d))
    for w in d.words:
        if str(w) in ("True", "False"):
            raise UserError(f"word {w!r} is how YAML 1.1 reads a bare yes/no/on/off (a boolean); quote it "
                            f"(\"yes\") in the data config", key="data.words")
    if d.features not in FEATURES:
        raise UserError(f"unknown value {d.features!r}", key="data.features", choices=FEATURES)
    if d.features == "librosa_files":
        nnaudio.validate(nnaudio.as_config(d.librosa), int(d.sample_rate), nnaudio.clip_samples(d),
                         key_prefix="data.librosa.")
        return
    names = [cfg[k].get("name") for k in ("technique", "technique2") if cfg.get(k) is not None]
    if cfg.mode in ("train", "infer") and not any(n in FRONT_END_TECHNIQUES for n in names):
        raise UserError(f"data.features=waveform feeds raw clips and model {m.name!r} has no front-end; add "
                        f"+technique=nnaudio (features computed by a layer) or set data.features=librosa_files "
                        f"(precomputed with librosa)", key="data.features", choices=FEATURES)


spec = FamilySpec(
    name="audio-classification", model_config=AudioModel, data_config=AudioData,
    plugin="effrun.families.audio_classification.plugin:AudioClassification", unit="clips",
    modes=("train", "infer"), check=check,
    description="keyword spotting on espeak-ng words + wheel speech, split by speaker: a small CNN on "
                "features from a front-end technique (nnaudio) or precomputed with librosa; accuracy, clips/s",
    smoke_overrides={"train": ("model=audio-cnn-tiny", "data=spoken-words-tiny", "data.features=librosa_files"),
                     "infer": ("model=audio-cnn-tiny", "data=spoken-words-tiny", "data.features=librosa_files")},
    metrics={"train": ("measured/eval_accuracy", "measured/train_clips", "measured/eval_clips",
                       "measured/steps_per_epoch", "?measured/epoch_time_s", "?measured/precompute_s",
                       "info/features", "?info/features_dir"),
             "infer": ("measured/params_total", "measured/eval_clips", "info/features")})
