"""A real 2-process gloo run equals one process with the same global batch (grad accumulation)."""
from tests.conftest import TINY


def test_ddp2_gloo_matches_single_process_grad_accum(effrun, tmp_path):
    common = [*TINY, "data=synthetic", "run.max_steps=3"]
    single = effrun("train", *common, "run.grad_accum=2", root=tmp_path / "single")
    ddp = effrun("train", *common, "parallelism=ddp2", root=tmp_path / "ddp")
    a = [r["loss"] for r in single.metrics()]
    b = [r["loss"] for r in ddp.metrics()]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-5, (a, b)
    s = ddp.summary()
    assert s["status"] == "completed" and s["world_size"] == 2
    assert s["measured/eval_loss"] == single.summary()["measured/eval_loss"] or \
        abs(s["measured/eval_loss"] - single.summary()["measured/eval_loss"]) < 1e-5
