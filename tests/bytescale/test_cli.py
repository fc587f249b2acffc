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


def test_single_process_runs_write_measured_keys_and_strategies_agree(effrun, tmp_path):
    """Through effrun's train loop: two strategies (separate runs, same batches) see the same
    losses, since the token-level loss makes the gradient independent of the assignment."""
    out = {}
    for st in ("balance", "naive"):
        r = effrun("train", *BS, "technique.max_len=128", "technique.min_len=16", "technique.capacity=128",
                   "technique.tokens_per_step=512", f"technique.strategy={st}", "run.max_steps=2",
                   "run.warmup_steps=1", timeout=300, root=tmp_path / st)
        s = r.summary()
        assert s["status"] == "completed" and s["info/strategy"] == st
        assert all(k.startswith(("measured/", "projected/", "info/")) for k in s if "/" in k)
        assert s["measured/max_tokens_per_rank_micro_batch"] <= 128
        assert s["measured/step_time_s"] > 0
        out[st] = [x["loss"] for x in r.metrics() if "loss" in x]
        if st == "balance":  # the profile pass ran once, before step 0, on the calibration batches
            from effrun.techniques.bytescale import planner as P
            from effrun.techniques.bytescale.plugin import calibration_lengths

            want = sum(len(P.plan_naive(ls, 1, 128, P.Cost()).ranks[0])
                       for ls in calibration_lengths(128, 1, [64, 256, 1024], 128, 8)[1:])
            assert s["measured/cost_fit/profile_micro_batches"] == want > 0
        else:  # naive and static plans do not use the cost: no profile pass
            assert "measured/cost_fit/profile_micro_batches" not in s
    assert len(out["balance"]) == 2
    assert out["balance"] == pytest.approx(out["naive"], abs=1e-4)
