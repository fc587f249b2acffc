"""Task graphs: validation of bad graphs, and the row windows that decide FIFO legality checked
against the numpy semantics of each op (perturb one producer row, see which consumer rows move)."""
import numpy as np
import pytest

from effrun.errors import UserError
from effrun.techniques.intar import KERNEL_NAMES
from effrun.techniques.intar.graph import OPS, Task, TaskGraph, TensorSpec
from effrun.techniques.intar.kernels import kernel
from effrun.techniques.intar.refs import make_inputs, run_graph, run_task


def _g(tasks, tensors, outputs):
    return TaskGraph("t", {t.name: t for t in tensors}, tasks, outputs)


def test_cycle_is_refused_naming_the_loop():
    ts = [TensorSpec("x", (4, 8), kind="input"), TensorSpec("w", (8, 8), kind="weight"),
          TensorSpec("a", (4, 8)), TensorSpec("b", (4, 8))]
    tasks = [Task("t1", "add", ("x", "b"), "a"), Task("t2", "matmul", ("a", "w"), "b")]
    with pytest.raises(UserError, match=r"cycle: t\d -> t\d -> t\d"):
        _g(tasks, ts, ["b"]).validate()


def test_shape_mismatch_names_producer_and_consumer():
    ts = [TensorSpec("x", (4, 8), kind="input"), TensorSpec("w1", (8, 16), kind="weight"),
          TensorSpec("w2", (8, 4), kind="weight"), TensorSpec("h", (4, 16)), TensorSpec("y", (4, 4))]
    tasks = [Task("fc1", "matmul", ("x", "w1"), "h"), Task("fc2", "matmul", ("h", "w2"), "y")]
    with pytest.raises(UserError) as e:
        _g(tasks, ts, ["y"]).validate()
    msg = e.value.line()
    assert "shape mismatch into task 'fc2'" in msg and "task 'fc1'" in msg and "\n" not in msg


def test_declared_output_shape_must_match():
    ts = [TensorSpec("x", (4, 8), kind="input"), TensorSpec("y", (4, 9))]
    with pytest.raises(UserError, match="produces"):
        _g([Task("r", "relu", ("x",), "y")], ts, ["y"]).validate()


def test_unknown_tensor_and_double_producer():
    ts = [TensorSpec("x", (4, 8), kind="input"), TensorSpec("y", (4, 8))]
    with pytest.raises(UserError, match="unknown tensor"):
        _g([Task("r", "relu", ("nope",), "y")], ts, ["y"]).validate()
    with pytest.raises(UserError, match="produced by both"):
        _g([Task("r", "relu", ("x",), "y"), Task("s", "relu", ("x",), "y")], ts, ["y"]).validate()


def test_json_round_trip():
    g = kernel("gpt2_medium_layer", "csim")
    g2 = TaskGraph.from_dict(g.to_dict()).validate()
    assert [t.name for t in g2.tasks] == [t.name for t in g.tasks]
    assert g2.tensors == g.tensors


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_row_windows_bound_the_real_dependencies(name):
    """For every streamed edge of every kernel: perturbing producer row r may change consumer output
    row b only if r < need(b) (the consumer has read row r before emitting row b). A window that is
    too small (e.g. a 3x3 conv claiming 1 row) fails here."""
    g = kernel(name, "csim")
    env = run_graph(g, make_inputs(g, seed=1))
    rng = np.random.default_rng(7)
    checked = 0
    for p, c, slot in g.edges():
        if g.role(c, slot) != "stream":
            continue
        op = OPS[c.op]
        x = g.tensors[p.output]
        out_rows = g.tensors[c.output].rows
        need = [op.need(b, slot, x.rows, out_rows, g.attrs(c)) for b in range(out_rows)]
        assert need == sorted(need) and need[-1] == x.rows, (c.name, need)
        base = env[c.output]
        for r in range(x.rows):
            for _ in range(3):
                e2 = dict(env)
                pert = env[p.output].copy()
                pert[r] = rng.integers(-60, 60, size=pert[r].shape)
                e2[p.output] = pert
                moved = np.nonzero((run_task(g, c, e2) != base).reshape(out_rows, -1).any(axis=1))[0]
                for b in moved:
                    assert r < need[b], f"{c.name} row {b} depends on {p.output} row {r} beyond its window {need[b]}"
                checked += 1
    assert checked > 0


def test_window_of_same_conv_is_half_kernel_plus_one():
    g = kernel("cnn4l", "csim")
    c = g.task("conv2")
    assert g.lag_tail(c, 0) == (2, 2)       # 3x3 'same': rows 0,1 before row 0; last two rows wait for the end
    up = g.task("up1")
    assert g.lag_tail(up, 0) == (1, 2)      # nearest 2x: one input row gives two output rows
