"""`effrun plan +technique=intar`: bad input is one line on stderr naming the key, exit code 2;
a whole plan writes its schedule, instructions, C++ and C-simulation result."""
import json

import pytest

BASE = ["+technique=intar", "hardware=alveo-u280", "logger=quiet"]


@pytest.fixture
def run(effrun):
    def _run(*args, timeout=120, **kw):
        return effrun("plan", *BASE, *args, check=False, timeout=timeout, **kw)
    return _run


def graph_file(tmp_path, tensors, tasks, outputs):
    p = tmp_path / "g.json"
    p.write_text(json.dumps({"name": "bad", "tensors": tensors, "tasks": tasks, "outputs": outputs}))
    return str(p)


def one_line_exit2(cp, *needles):
    assert cp.returncode == 2, (cp.returncode, cp.stdout[-500:], cp.stderr[-500:])
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cp.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cycle(run, tmp_path):
    g = graph_file(tmp_path, {"x": {"shape": [4, 8], "kind": "input"}, "a": {"shape": [4, 8]},
                              "b": {"shape": [4, 8]}},
                   [{"name": "t1", "op": "add", "inputs": ["x", "b"], "output": "a"},
                    {"name": "t2", "op": "relu", "inputs": ["a"], "output": "b"}], ["b"])
    one_line_exit2(run(f"technique.graph={g}", "technique.csim=false"), "technique.graph", "cycle")


def test_shape_mismatch(run, tmp_path):
    g = graph_file(tmp_path, {"x": {"shape": [4, 8], "kind": "input"}, "w": {"shape": [16, 8], "kind": "weight"},
                              "y": {"shape": [4, 8]}},
                   [{"name": "mm", "op": "matmul", "inputs": ["x", "w"], "output": "y"}], ["y"])
    one_line_exit2(run(f"technique.graph={g}", "technique.csim=false"), "technique.graph", "shape mismatch", "'mm'")


def test_cannot_fit_even_sequentially(run, tmp_path):
    g = graph_file(tmp_path, {"x": {"shape": [8192, 8192], "kind": "input"},
                              "w": {"shape": [8192, 8192], "kind": "weight"}, "y": {"shape": [8192, 8192]}},
                   [{"name": "mm", "op": "matmul", "inputs": ["x", "w"], "output": "y"}], ["y"])
    one_line_exit2(run(f"technique.graph={g}", "technique.csim=false"), "technique.kernel", "even sequentially")


def test_missing_compiler(run):
    one_line_exit2(run("technique.kernel=vae", "technique.cxx=no-such-g++-anywhere"), "technique.cxx", "not found")


def test_unknown_kernel_and_bad_field(run):
    one_line_exit2(run("technique.kernel=resnet"), "technique.kernel", "valid:")
    one_line_exit2(run("technique.kernel=vae", "technique.onchip_fraction=2"), "technique.onchip_fraction")
    one_line_exit2(run("technique.kernel=vae", "technique.cores=[0,2]"), "technique.cores")
    one_line_exit2(run("technique.kernel=vae", "hardware=cpu"), "hardware")


def test_plan_runs_end_to_end(run):
    """A whole plan for one kernel: schedule, instructions, C++ and C simulation, files written."""
    pytest.importorskip("ortools")
    cp = run("technique.kernel=vae", "technique.cores=[2,16]", "technique.solver_time_s=2", timeout=300)
    if "hls_headers" in cp.stderr:
        pytest.skip("hls4ml headers missing: run scripts/setup/hls_headers.sh")
    assert cp.returncode == 0, cp.stderr[-2000:]
    s = cp.summary()
    assert s["status"] == "completed" and s["measured/vae/csim_bit_exact"] == 1
    assert s["projected/vae/intar_cycles"] <= min(s["projected/vae/dataflow_cycles"], s["projected/vae/sequential_cycles"])
    tmp_path = cp.run_dirs()[-1]
    d = tmp_path / "intar" / "vae"
    insts = json.loads((d / "instructions.json").read_text())
    sched = json.loads((d / "schedule_intar.json").read_text())
    assert len(insts) >= len(sched["stage"])
    assert (d / "csim" / "vae_intar.cpp").is_file()
    rows = json.loads((tmp_path / "intar" / "rows.json").read_text())
    assert rows[0]["csim_bit_exact"] is True
    assert rows[0]["intar_cycles"] <= min(rows[0]["dataflow_cycles"], rows[0]["sequential_cycles"])
