"""The CLI side: `effrun infer +technique=routing_trace` writes a loadable trace; bad placement input
fails with exit 2 and one line naming the cause, before any solving."""
import numpy as np

from effrun.techniques._moe.trace import RoutingTrace

TINY = ["model=mixtral-tiny", "logger=quiet"]


def test_infer_records_trace(effrun, tmp_path):
    path = tmp_path / "tr.npz"
    r = effrun("infer", *TINY, "+technique=routing_trace", f"technique.path={path}", "run.max_new_tokens=3",
               "run.prompt=abcd")
    s = r.summary()
    tr = RoutingTrace.load(path)
    assert tr.num_layers == 2 and tr.num_experts == 8 and tr.top_k == 2
    assert tr.num_tokens == 4 + 2 == s["measured/trace_tokens"]  # prompt + fed-back new tokens


def test_bad_placement_inputs_exit_2(effrun, tmp_path):
    r = effrun("plan", *TINY, "+technique=exflow", "technique.devices=3", check=False)
    assert r.returncode == 2 and "not divisible by 3 devices" in r.stderr
    wrong = tmp_path / "wrong.npz"
    RoutingTrace(np.zeros((10, 3, 2), dtype=np.int64), 8).save(wrong)  # 3 layers, model has 2
    for mode in ("infer", "plan"):  # plan checks the depth too (it used to accept any trace)
        r = effrun(mode, *TINY, "+technique=exflow", "technique.devices=2", f"technique.trace={wrong}", check=False)
        assert r.returncode == 2 and "technique.trace" in r.stderr and "3 MoE layers but the model has 2" in r.stderr
    assert r.returncode == 2 and "technique.trace" in r.stderr and "3 MoE layers but the model has 2" in r.stderr
    empty = tmp_path / "empty.npz"
    RoutingTrace(np.zeros((0, 2, 2), dtype=np.int64), 8).save(empty)
    r = effrun("plan", *TINY, "+technique=moetuner", "technique.devices=2", f"technique.trace={empty}", check=False)
    assert r.returncode == 2 and "empty" in r.stderr
    assert r.stderr.count("\n") <= 3 and "Traceback" not in r.stderr
