"""The CLI: bad input exits 2 with one line naming the numbers; a 1-process run writes its metrics."""
import pytest

from tests.conftest import TINY

BS = ["+technique=bytescale", "model=llama-tiny", "data=synthetic", "logger=quiet", "technique.project=false"]


@pytest.mark.parametrize("args,needle", [
    (["parallelism=ddp4", "technique.max_len=8192", "technique.capacity=1024"],
     "a sequence of 8192 tokens exceeds the world's capacity: world_size 4 x C=1024 = 4096"),
    (["parallelism=ddp4", "technique.capacity=10", "technique.min_chunk=8", "technique.max_len=16",
      "technique.min_len=8"], "capacity C=10 is smaller than two minimum chunks"),
    (["technique.max_len=4096", "technique.capacity=1024"], "world_size=1 but context parallelism is needed"),
    (["parallelism=ddp4", "technique.strategy=greedy"], "technique.strategy"),
])
def test_bad_input_exit_2(effrun, args, needle):
    r = effrun("train", *BS, *args, check=False, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_single_process_run_writes_measured_keys(effrun):
    r = effrun("train", *BS, "technique.max_len=128", "technique.min_len=16", "technique.capacity=128",
               "technique.tokens_per_step=512", "technique.baselines=[naive]", "run.max_steps=2",
               "run.warmup_steps=1", timeout=300)
    s = r.summary()
    assert s["status"] == "completed"
    assert all(k.startswith(("measured/", "projected/")) for k in s if "/" in k)
    assert s["measured/max_tokens_per_rank_micro_batch"] <= 128
    # gradients equal whatever the assignment: the two strategies see the same losses
    assert s["measured/loss_max_abs_diff_vs_baselines"] < 1e-4
    assert s["measured/balance/step_time_s"] > 0 and s["measured/naive/step_time_s"] > 0
    rows = r.metrics()
    assert len([x for x in rows if "loss" in x]) == 2
