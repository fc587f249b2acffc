"""Metrics: saved-for-backward bytes against a hand count, recorder key discipline, RSS reset."""
import pytest
import torch
import torch.nn as nn

from effrun.metrics.memory import SavedTensorCounter, peak_rss_mb, reset_peak_rss
from effrun.metrics.recorder import Recorder


class TwoLinear(nn.Module):
    def __init__(self, d=16, h=32):
        super().__init__()
        self.a = nn.Linear(d, h, bias=False)
        self.b = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_saved_bytes_hand_count():
    torch.manual_seed(0)
    B, d, h = 8, 16, 32
    m = TwoLinear(d, h)
    x = torch.randn(B, d, requires_grad=False)
    with SavedTensorCounter(m) as c:
        y = m(x)
    # a saves x (B*d); relu saves its output (B*h); b saves its input = relu output (same storage).
    # weights are parameters: excluded.
    assert c.bytes == (B * d + B * h) * 4
    y.sum().backward()


def test_saved_bytes_shared_input_counted_once():
    q, k = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    x = torch.randn(4, 8)
    with SavedTensorCounter(nn.ModuleList([q, k])) as c:
        _ = q(x) + k(x)
    assert c.bytes == 4 * 8 * 4  # x saved by both projections, one storage


def test_recorder_rejects_unprefixed_keys_and_aggregates_after_warmup():
    r = Recorder(warmup_steps=1)
    with pytest.raises(ValueError):
        r.set("step_time_s", 1.0)
    r.log_step(0, step_time_s=10.0, tokens=100, loss=3.0)
    r.log_step(1, step_time_s=1.0, tokens=100, loss=2.0)
    r.log_step(2, step_time_s=3.0, tokens=100, loss=1.0)
    r.aggregate_steps()
    assert r.summary["measured/step_time_s"] == 2.0  # median of steps 1, 2 (step 0 is warm-up)
    assert r.summary["measured/tokens_per_s"] == pytest.approx(200 / 4.0)
    assert r.summary["measured/loss"] == 1.0 and r.summary["measured/loss_first"] == 3.0


def test_peak_rss_reset_tracks_a_new_allocation():
    """In a fresh process (the test runner's heap may already hold freed pages): after a reset the
    peak follows the new allocation, not the larger one before the reset."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from effrun.metrics.memory import peak_rss_mb, reset_peak_rss\n"
        "a = torch.ones(256 * 2**20 // 4); del a\n"
        "before = peak_rss_mb()\n"
        "ok = reset_peak_rss()\n"
        "after_reset = peak_rss_mb()\n"
        "b = torch.ones(64 * 2**20 // 4)\n"
        "print(ok, before, after_reset, peak_rss_mb())\n")
    env = {"MALLOC_MMAP_THRESHOLD_": "1048576", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    ok, before, after_reset, peak = out.stdout.split()
    if ok != "True":
        pytest.skip("clear_refs not writable here")
    before, after_reset, peak = float(before), float(after_reset), float(peak)
    assert before - after_reset > 200  # the 256 MiB peak is forgotten
    assert 50 < peak - after_reset < 120  # the 64 MiB allocation is seen
