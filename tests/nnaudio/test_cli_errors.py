"""Bad input through `effrun` (issue 17): fmax above Nyquist, fmin too low for n_fft, hop <= 0, a clip
shorter than the longest CQT wavelet, a wav at another sample rate than configured (refused when
data.resample=false), a front-end missing or doubled, a precision the front-ends do not compute:
each is ONE line naming the key and the numbers, exit code 2, no traceback, before any run dir
is written."""
import shutil

import pytest

pytest.importorskip("librosa")

BASE = ["model=audio-cnn-tiny", "data=spoken-words-tiny", "run.max_steps=1", "logger=quiet"]
NN = ["+technique=nnaudio"]

CASES = [
    # (overrides, key, needles in the line)
    (NN + ["technique.fmax=9000"], "technique.fmax", ["fmax=9000 Hz", "Nyquist frequency 8000 Hz",
                                                    "sample_rate=16000"]),
    (NN + ["technique.n_fft=128", "technique.n_mels=128"], "technique.fmin", ["n_fft=128", "125 Hz",
                                                                            "n_fft >= "]),
    (NN + ["technique.hop_length=0"], "technique.hop_length", ["0", "[1, inf)"]),
    (NN + ["technique.hop_length=-512"], "technique.hop_length", ["-512", "[1, inf)"]),
    (NN + ["technique.front_end=cqt", "technique.fmin=32.7", "data.clip_seconds=0.25"], "technique.short_input",
     ["4000 samples", "0.250 s at 16000 Hz", "longest CQT wavelet", "8481 samples", "zero_pad"]),
    (NN + ["technique.front_end=cqt", "technique.n_bins=100", "technique.fmin=65.4"], "technique.n_bins",
     ["Nyquist frequency 8000 Hz"]),
    (["data.features=librosa_files", "data.librosa.fmax=9000"], "data.librosa.fmax",
     ["fmax=9000 Hz", "Nyquist frequency 8000 Hz"]),
    (["data.features=librosa_files", "data.librosa.front_end=cqt", "data.librosa.fmin=32.7",
      "data.clip_seconds=0.25"], "data.librosa.short_input", ["4000 samples", "8481 samples"]),
    ([], "data.features", ["no front-end", "+technique=nnaudio", "data.features=librosa_files"]),
    (NN + ["data.features=librosa_files"], "data.features", ["already feeds precomputed features"]),
    (NN + ["data.features=mfcc_files"], "data.features", ["mfcc_files", "waveform, librosa_files"]),
    (NN + ["run.dtype=bfloat16"], "run.dtype", ["float32"]),
    (NN + ["data.sample_rate=1000"], "data.sample_rate", ["got 1000", "4000..48000"]),
]


@pytest.mark.parametrize("overrides,key,needles", CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2(effrun, overrides, key, needles):
    r = effrun("train", *BASE, *overrides, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr  # pre-flight: nothing else printed
    assert lines[0].startswith(f"error: {key}:"), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not list(r.root.rglob("summary.json"))  # refused before any run dir


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng missing: run scripts/setup/espeak.sh")
def test_wav_at_another_rate_is_refused_when_resampling_is_off(effrun):
    """espeak-ng writes 22050 Hz; with data.resample=false a 16 kHz dataset refuses it (the default,
    data.resample=true, resamples with soxr_hq). The clips are built when the family is set up,
    before the run starts: the error follows the data's progress lines and no summary is written."""
    r = effrun("train", *BASE, *NN, "data.resample=false", check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    line = errors[0]
    assert line.startswith("error: data.sample_rate:") and "22050 Hz" in line and "16000 Hz" in line
    assert "data.resample=true" in line
    assert not list(r.root.rglob("summary.json"))


def test_unquoted_yes_in_a_data_yaml_is_refused(effrun, tmp_path):
    """YAML 1.1 reads a bare `yes` as true: espeak-ng would say "True". A data config of one's own
    (--config-dir) with words: [yes, no] is refused in one line."""
    (tmp_path / "cfg" / "data").mkdir(parents=True)
    (tmp_path / "cfg" / "data" / "my-words.yaml").write_text(
        "defaults:\n  - spoken-words-tiny\n  - _self_\nname: my-words\nwords: [yes, no, stop]\n")
    r = effrun("train", "--config-dir", str(tmp_path / "cfg"), "model=audio-cnn-tiny", "data=my-words", *NN,
               "logger=quiet", check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("error: data.words:") and "'True'" in r.stderr and "quote" in r.stderr
