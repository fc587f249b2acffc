"""The audio classifier with each front-end: shapes, the loss convention, trainable kernels that
receive gradients while the loss falls, and the librosa precompute baseline read back."""
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("librosa")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng missing: run scripts/setup/espeak.sh", allow_module_level=True)

from effrun.errors import UserError
from effrun.families.audio_classification import data as D
from effrun.families.audio_classification import model as M
from effrun.techniques.nnaudio import FrontEndConfig, NnAudioConfig, build_front_end, features_are_log
from effrun.techniques.nnaudio.baseline import PrecomputedDataset, librosa_features, precompute_features

TINY = D.AudioDataConfig(words=["yes", "no", "stop"], n_speakers=4, eval_every=2, speeds=[175], pitches=[50],
                         unknown_hop_seconds=1.0)
SR = TINY.sample_rate


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
    except UserError as e:
        pytest.skip(f"{e.line()} (run scripts/setup/espeak.sh)")


FRONT_ENDS = [NnAudioConfig(front_end="stft", n_fft=256), NnAudioConfig(front_end="mel"),
              NnAudioConfig(front_end="mfcc"), NnAudioConfig(front_end="cqt", n_bins=60, fmin=65.4),
              NnAudioConfig(front_end="cqt", n_bins=48, fmin=130.8, cqt_kind="1992"),
              NnAudioConfig(front_end="mel", trainable=True)]


@pytest.mark.parametrize("cfg", FRONT_ENDS, ids=lambda c: f"{c.front_end}-{c.cqt_kind}-{c.trainable}")
def test_model_with_each_front_end_and_the_loss_convention(tiny, cfg):
    train, _, classes = tiny
    torch.manual_seed(0)
    model = M.build_model(build_front_end(cfg, SR), len(classes), log_features=not features_are_log(cfg))
    batch = train.batch(0, 4)
    logits = model(batch["waveform"])
    assert logits.shape == (4, len(classes))
    model.eval()  # same batch-norm statistics for both evaluations below
    total, count = M.loss(model, batch)
    assert count == 4
    ref = F.cross_entropy(model(batch["waveform"]), batch["label"], reduction="sum")
    assert float(total.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)


def _train(model, ds, steps, lr=3e-3, bs=8):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for i in range(steps):
        total, n = M.loss(model, ds.batch(i, bs))
        opt.zero_grad()
        (total / n).backward()
        opt.step()
        losses.append(float(total.detach()) / n)
    return losses


def test_trainable_kernels_receive_gradients_and_the_loss_falls(tiny):
    train, _, classes = tiny
    torch.manual_seed(0)
    fe = build_front_end(NnAudioConfig(front_end="mel", trainable=True), SR)
    model = M.build_model(fe, len(classes), channels=(8, 16, 16))  # small: the test is about the kernels
    before = {k: v.detach().clone() for k, v in fe.named_parameters()}
    assert set(before) == {"kernel", "mel"}
    total, n = M.loss(model, train.batch(0, 8))
    (total / n).backward()
    for k, p in fe.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, k
    model.zero_grad()
    losses = _train(model, train, 30)
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6])
    for k, p in fe.named_parameters():
        assert not torch.equal(p.detach(), before[k]), f"{k} did not change"


def test_librosa_precompute_baseline_matches_the_layer_and_replays_the_stream(tiny, tmp_path):
    train, ev, classes = tiny
    cfg = FrontEndConfig(front_end="mel")
    out = precompute_features(train, cfg, SR, tmp_path / "train", batch_size=16, progress=lambda m: None)
    pre = PrecomputedDataset(out, like=train)
    feats = np.load(out / "features.npy")
    layer = build_front_end(NnAudioConfig(front_end="mel"), SR)
    with torch.no_grad():
        ours = layer(train.waveforms[:8]).numpy()
    assert feats.shape == (len(train),) + ours.shape[1:] and feats.dtype == np.float32
    assert np.abs(ours - feats[:8]).max() <= 1e-5 * np.abs(feats[:8]).max()
    np.testing.assert_allclose(librosa_features(train.waveforms_np([3]), cfg, SR), feats[3:4], rtol=1e-5,
                               atol=1e-7 * float(feats[3].max()))  # one clip vs a batch of 16: BLAS rounding
    for i in (0, 5, 11):  # same clips, same order as the on-the-fly stream
        a, b = pre.batch(i, 8), train.batch(i, 8)
        assert torch.equal(a["label"], b["label"])
        with torch.no_grad():
            np.testing.assert_allclose(a["features"].numpy(), layer(b["waveform"]).numpy(), rtol=1e-4,
                                       atol=1e-5 * float(np.abs(feats).max()))
    torch.manual_seed(0)
    model = M.build_model(None, len(classes), n_features=pre.n_features, channels=(8, 16, 16))
    losses = _train(model, pre, 30)
    assert np.mean(losses[-6:]) < np.mean(losses[:6])
    with pytest.raises(ValueError, match="another dataset"):
        PrecomputedDataset(out, like=ev)
