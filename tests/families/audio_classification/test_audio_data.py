"""Audio-classification data: espeak-ng words split by speaker, wheel speech as `_unknown_`, fixed
length float32 clips at the configured rate, deterministic batches, sample-rate refusal."""
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("librosa")
sf = pytest.importorskip("soundfile")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng missing: run scripts/setup/espeak.sh", allow_module_level=True)

from effrun.errors import UserError
from effrun.families.audio_classification import data as D

TINY = D.AudioDataConfig(words=["yes", "no", "stop"], n_speakers=4, eval_every=2, speeds=[175], pitches=[50],
                         unknown_hop_seconds=1.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one intra-op thread (on a shared, loaded box two OpenMP threads spin at barriers
    and were 3-8x slower in wall time); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    try:
        return D.load(TINY, progress=lambda m: None)
    except UserError as e:  # the wheel audio needs PyPI once; scripts/setup/espeak.sh fetches it
        pytest.skip(f"{e.line()} (run scripts/setup/espeak.sh)")


def test_split_by_speaker_keeps_eval_voices_unseen(tiny):
    train, ev, classes = tiny
    man = D.manifest(TINY)
    assert classes == ["yes", "no", "stop", D.UNKNOWN]
    assert set(man["train_speakers"]).isdisjoint(man["eval_speakers"])
    spk = D.speakers(TINY)
    assert [s for s, _, split in spk if split == "eval"] == ["m2", "m4"]  # every 2nd of m1..m4
    assert {"m2", "m4", "pyannote-speaker91"} <= set(man["eval_speakers"])
    assert {"m1", "m3", "pyannote-speaker90", "cmu-arctic"} <= set(man["train_speakers"])
    for split in (train, ev):
        assert set(np.unique(split.labels_np)) == set(range(len(classes)))  # every class in both splits
    words = [c for c in man["clips"] if c["label"] != D.UNKNOWN]
    assert len(words) == 4 * 3 and all(c["source"] == "espeak-ng" for c in words)


def test_clips_are_fixed_length_float32_at_the_configured_rate(tiny):
    train, ev, _ = tiny
    n = int(TINY.clip_seconds * TINY.sample_rate)
    for split in (train, ev):
        w = split.waveforms
        assert w.dtype.is_floating_point and str(w.dtype) == "torch.float32" and w.shape[1] == n
        assert split.sample_rate == TINY.sample_rate == 16000
        rms = w.square().mean(1).sqrt()
        assert bool((rms > 1e-3).all()) and float(w.abs().max()) < 4.0


def test_cache_is_reused_without_resynthesis(tiny, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("espeak-ng or pip ran although the dataset is cached")

    monkeypatch.setattr(D.subprocess, "run", boom)
    train, ev, _ = D.load(TINY, progress=lambda m: None)
    assert np.array_equal(train.labels_np, tiny[0].labels_np)


def test_batches_are_deterministic_and_each_epoch_is_a_permutation(tiny):
    train, ev, _ = tiny
    n, bs = len(train), 5
    a, b = train.batch(3, bs), train.batch(3, bs)
    assert a["waveform"].shape == (bs, train.clip_samples) and a["label"].shape == (bs,)
    assert bool((a["waveform"] == b["waveform"]).all()) and bool((a["label"] == b["label"]).all())
    ids = np.concatenate([train.indices(i, bs) for i in range(-(-2 * n // bs))])
    assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n:2 * n]) == list(range(n))
    assert not np.array_equal(ids[:n], ids[n:2 * n])  # a fresh order each epoch
    seen = np.concatenate([b["label"].numpy() for b in ev.iter_batches(7)])
    assert np.array_equal(seen, ev.labels_np)  # eval: every clip once, in order


def test_wav_at_another_rate_is_refused_or_resampled(tmp_path):
    path = tmp_path / "x.wav"
    sf.write(path, np.sin(np.arange(8000) * 0.1).astype(np.float32), 8000)
    with pytest.raises(UserError) as e:
        D.read_wav(path, 16000, resample=False)
    line = e.value.line()
    assert "\n" not in line and "data.sample_rate" in line and "8000 Hz" in line and "16000 Hz" in line
    y = D.read_wav(path, 16000, resample=True)
    assert y.dtype == np.float32 and len(y) == 16000


@pytest.mark.parametrize("kw,key", [(dict(sample_rate=1000), "data.sample_rate"), (dict(words=[]), "data.words"),
                                    (dict(n_speakers=99), "data.n_speakers"), (dict(pitches=[120]), "data.pitches"),
                                    (dict(clip_seconds=0.0), "data.clip_seconds")])
def test_bad_data_config_is_one_line(kw, key):
    with pytest.raises(UserError) as e:
        D.validate(D.AudioDataConfig(**kw))
    assert e.value.key == key and "\n" not in e.value.line()
