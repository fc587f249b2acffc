"""8 gloo processes as 2 nodes x 2 devices x 2 sub-devices, one spawn for every check (slow start):
the effrun engine (blocking and prefetching) and FSDP2, against a single-process reference."""
import json

import pytest

from effrun.launch import spawn
from effrun.techniques.zeropp3.formulas import _ring, expected_bytes, ring_links
from effrun.techniques.zeropp3.hierarchy import LEVELS, Hierarchy
from tests.zeropp3._workers import run_cases

CASES = {
    "zero3": dict(scheme="zero3", qw=False, qg=False),
    "zeropp": dict(scheme="zeropp", qw=False, qg=False),
    "hier3": dict(scheme="hier3", qw=False, qg=False),
    "hier3/q": dict(scheme="hier3", qw=True, qg=True, resume=True),
    "zeropp/q": dict(scheme="zeropp", qw=True, qg=True),
    "hier3/model": dict(scheme="hier3", qw=False, qg=False, gather="model"),
    # prefetching gathers on their own thread / process groups, reductions overlapped
    "zero3/pf": dict(scheme="zero3", qw=False, qg=False, prefetch=True),
    "hier3/pf": dict(scheme="hier3", qw=False, qg=False, prefetch=True, overlap_reduce=True),
    "zeropp/q/pf": dict(scheme="zeropp", qw=True, qg=True, prefetch=True, overlap_reduce=True),
    # PyTorch FSDP2 baseline, collectives counted per level
    "fsdp2/zero3": dict(engine="fsdp2", scheme="zero3", mesh="flat"),
    "fsdp2/zeropp": dict(engine="fsdp2", scheme="zeropp", mesh="flat"),
    "fsdp2/hier3": dict(engine="fsdp2", scheme="hier3", mesh="flat"),
    "fsdp2/hier3-hsdp": dict(engine="fsdp2", scheme="hier3", mesh="hsdp"),
}
STEPS = 3
H = Hierarchy(2, 2, 2)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("zpp")
    cases = [dict(c, id=k) for k, c in CASES.items()]
    spawn(run_cases, 8, "gloo", args=((2, 2, 2), cases, str(d / "out.json"), STEPS, 1e-2, str(d)))
    return {r["case"]["id"]: r for r in json.loads((d / "out.json").read_text())}


def _levels(d):
    return [d[lv] for lv in LEVELS]


@pytest.mark.parametrize("key", ["zero3", "zeropp", "hier3", "hier3/model", "fsdp2/zero3", "fsdp2/zeropp",
                                 "fsdp2/hier3", "fsdp2/hier3-hsdp"])
def test_unquantized_equals_single_process_reference(results, key):
    r = results[key]
    assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-6, abs=1e-6)
    assert r["grad_rel_err"] < 1e-5          # first-step mean gradient vs autograd on the global batch
    assert r["param_max_err"] < 1e-5         # after 3 AdamW steps with clipping


@pytest.mark.parametrize("key", ["zero3", "zeropp", "hier3", "hier3/q", "zeropp/q", "hier3/model"])
def test_bytes_per_level_equal_formulas(results, key):
    r = results[key]
    assert r["sent_cluster"] == _levels(r["expected"])


@pytest.mark.parametrize("key,base", [("zero3/pf", "zero3"), ("hier3/pf", "hier3"), ("zeropp/q/pf", "zeropp/q")])
def test_prefetch_is_bit_equal_to_the_blocking_engine(results, key, base):
    """Prefetched gathers and overlapped reductions move the same bytes at other times: losses,
    first-step gradient and final parameters are bit-identical (sha256), byte counts identical."""
    r, b = results[key], results[base]
    assert r["losses"] == b["losses"]
    assert r["grad_digest"] == b["grad_digest"] and r["param_digest"] == b["param_digest"]
    assert r["sent_cluster"] == b["sent_cluster"] == _levels(r["expected"])
    assert r["prefetched"] == STEPS * 2 * r["units"]  # every gather of every pass was issued ahead


@pytest.mark.parametrize("key,base", [("zero3/pf", "zero3"), ("hier3/pf", "hier3"), ("zeropp/q/pf", "zeropp/q")])
def test_prefetch_peak_is_current_plus_next_unit(results, key, base):
    r, b = results[key], results[base]
    u, order = r["unit_bytes"], r["order"]
    assert order == list(range(len(u)))  # the recorded forward order (Llama: module order)
    pairs = max(u[order[i]] + u[order[i + 1]] for i in range(len(u) - 1))
    assert r["peak_gathered"] == pairs       # two units at once, never three
    assert b["peak_gathered"] == max(u)      # the blocking engine: one unit at a time
    assert r["state"]["full_resident"] == 0  # nothing gathered left over after the step


def test_volumes_follow_the_schemes(results):
    M = results["zero3"]["N"] * 4
    node = {k: r["sent_cluster"][2] / 2 for k, r in results.items()}  # per node, 2 nodes
    # ZeRO-3: three collectives over all 8 ranks, each (W-1)/W * M across each node boundary
    assert node["zero3"] == pytest.approx(3 * 7 / 8 * M)
    # hpZ keeps the backward all-gather inside the node (ZeRO++) or the GCD pair (3-level)
    assert node["zeropp"] == pytest.approx(2 * 7 / 8 * M)
    assert node["hier3"] == pytest.approx(7 / 8 * M + 1 / 2 * M)
    # quantised: INT8 forward all-gather (+ fp32 scales / 32) and INT4 inter-node hop: ~ 0.75 M_fp16
    n = results["zero3"]["N"]
    qnode = 7 / 8 * (n + 4 * n / 32) + 1 / 2 * (n / 2 + 4 * n / 32)
    assert node["hier3/q"] == pytest.approx(qnode) == pytest.approx(node["zeropp/q"])
    # 3-level moves the backward all-gather off the device level onto the GCD pair
    assert results["hier3/q"]["sent_cluster"][1] < results["zeropp/q"]["sent_cluster"][1] / 3


def _fsdp2_expected(scheme: str, mesh: str, n: int) -> list:
    """Bytes per level of FSDP2's collectives as rings (tiny Llama: every dim 0 divides by 8, so no
    padding): forward all-gather over the shard group, backward over the re-shard group, gradient
    reduce-scatter over the shard group (+ the hybrid all-reduce of a 1/4 chunk across nodes)."""
    M, acc = n * 4, {lv: 0.0 for lv in LEVELS}
    shard = ("world", 8) if mesh == "flat" else ("node", 4)
    _ring(acc, H, *shard, M)
    _ring(acc, H, *({"zero3": shard, "zeropp": ("node", 4), "hier3": ("pair", 2)}[scheme]), M)
    _ring(acc, H, *shard, M)
    if mesh == "hsdp":  # ring all-reduce of each rank's M/4 chunk over its 2-rank cross-node group
        for lv, links in ring_links(H, "cross_node").items():
            acc[lv] += links * 2 * (1 / 2) * M / 4
    return _levels(acc)


@pytest.mark.parametrize("key", ["fsdp2/zero3", "fsdp2/zeropp", "fsdp2/hier3", "fsdp2/hier3-hsdp"])
def test_fsdp2_bytes_counted_per_level_like_the_rings(results, key):
    r, c = results[key], CASES[key]
    assert r["units"] == 5 and r["numel"] * 4 == results["zero3"]["numel"] * 4
    assert r["sent_cluster"] == pytest.approx(_fsdp2_expected(c["scheme"], c["mesh"], r["numel"]), rel=1e-12)
    assert r["rsa"] == {"zero3": 8 if c["mesh"] == "flat" else 4, "zeropp": 4, "hier3": 2}[c["scheme"]]
    # the same scheme through the effrun engine: same bytes where the collectives are the same
    if key in ("fsdp2/zero3", "fsdp2/zeropp"):
        e = results[c["scheme"]]
        assert r["sent_cluster"] == _levels(expected_bytes(c["scheme"], H, r["numel"], 4, False, False))
        assert r["sent_cluster"][2] <= e["sent_cluster"][2]  # effrun pads each unit to world x block


def test_memory_primary_and_secondary_partitions(results):
    for key, r in results.items():
        if key.startswith("fsdp2"):
            assert r["state_primary"] * 8 == r["numel"] * 4 * (2 if "hsdp" in key else 1)
            continue
        M, st = r["N"] * 4, r["state"]
        scheme = r["case"]["scheme"]
        assert st["primary"] == M / 8 and st["optimizer"] == 2 * M / 8 and st["full_resident"] == 0
        assert st["secondary"] == {"zero3": 0, "zeropp": M / 4, "hier3": M / 2}[scheme]
        if key.endswith("/model"):
            assert r["units"] == 1 and r["peak_gathered"] == M
        elif not r["case"].get("prefetch"):  # per layer: embeddings, 2 layers, final norm, head
            assert r["units"] == 5 and r["peak_gathered"] < 0.6 * M  # never the whole model at once


def test_quantized_close_to_reference_and_learning(results):
    for key in ("zeropp/q", "hier3/q"):
        r = results[key]
        assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-2)  # INT8 weights / INT4 grads
        assert r["grad_rel_err"] < 0.2
        assert r["losses"][-1] < r["losses"][0] - 0.2


def test_partitioned_checkpoint_resumes_same_losses(results):
    r = results["hier3/q"]
    assert r["resumed"] == pytest.approx(r["losses"][1:], rel=1e-6)
