"""C simulation: the generated HLS C++ of each kernel's schedule, compiled with g++ against the
hls4ml wheel's Xilinx headers, equals the numpy reference bit for bit; a corrupted instruction
list does not."""
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from effrun.techniques.intar import KERNEL_NAMES, instructions
from effrun.techniques.intar import csim
from effrun.techniques.intar.kernels import kernel
from effrun.techniques.intar.model import Model
from effrun.techniques.intar.target import make_budget

try:
    HEADERS = csim.find_headers()
except csim.HeadersMissing as e:  # pragma: no cover - depends on the machine
    HEADERS = None
    WHY = str(e)

pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ missing (Debian: apt-get install -y g++)"),
    pytest.mark.skipif(HEADERS is None, reason="hls4ml headers missing: run scripts/setup/hls_headers.sh"),
]


def _small(name, plan, u280, node):
    sm = Model(kernel(name, "csim"), make_budget(kernel(name, "csim"), u280, node))
    return sm, csim.instantiate(plan["schedules"]["intar"], sm)


def test_every_kernel_matches_numpy_bit_for_bit(plans, u280, fast_node, tmp_path):
    def one(name):
        sm, ss = _small(name, plans[name], u280, fast_node)
        return name, csim.run(sm, ss, tmp_path / name, HEADERS, seed=3)

    with ThreadPoolExecutor(2) as ex:          # compile two kernels at a time (2 cores)
        results = dict(ex.map(one, KERNEL_NAMES))
    for name, r in results.items():
        assert r.bit_exact, (name, r.outputs)
        for o in r.outputs.values():
            assert o["distinct"] > 8, (name, o)   # outputs are not a saturated / constant plane
        assert "INTAR_CSIM_OK" in r.stdout


@pytest.mark.parametrize("design", ["dataflow", "sequential"])
def test_baseline_designs_also_simulate_exactly(plans, u280, fast_node, tmp_path, design):
    """The same code generator runs the dataflow (one stage, FIFOs everywhere they can stream) and
    sequential (one task per stage) schedules of the FIFO-heaviest kernel."""
    name = "cnn4l"
    sm = Model(kernel(name, "csim"), make_budget(kernel(name, "csim"), u280, fast_node))
    ss = csim.instantiate(plans[name]["schedules"][design], sm)
    r = csim.run(sm, ss, tmp_path, HEADERS, seed=5)
    assert r.bit_exact, r.outputs


def test_corrupted_loop_bound_is_caught(plans, u280, fast_node, tmp_path, monkeypatch):
    """A reduction bound one short (k_bound - 1) in the emitted instructions must break equality."""
    name = "self_attention"
    sm, ss = _small(name, plans[name], u280, fast_node)
    real = instructions.k_bound
    monkeypatch.setattr(instructions, "k_bound", lambda m, t: real(m, t) - (1 if t == "q_proj" else 0))
    r = csim.run(sm, ss, tmp_path, HEADERS, seed=3)
    assert not r.bit_exact


def test_fifo_protocol_violation_is_caught(plans, u280, fast_node, tmp_path, monkeypatch):
    """A consumer that stops early leaves data in its FIFO: the stage-end check fails. (A 3x3 'same'
    conv stopping one row early still reads every input row - its window - so it stops two.)"""
    name = "cnn4l"
    sm = Model(kernel(name, "csim"), make_budget(kernel(name, "csim"), u280, fast_node))
    ss = csim.instantiate(plans[name]["schedules"]["dataflow"], sm)
    real = instructions.emit

    def short(m, s):
        out = real(m, s)
        for i in out:
            if i["task"] == "conv4":
                i["i_bound"] -= 2
        return out

    monkeypatch.setattr("effrun.techniques.intar.codegen.emit", short)
    with pytest.raises(RuntimeError, match="FIFO not drained"):
        csim.run(sm, ss, tmp_path, HEADERS)
