"""Ring attention building blocks in one process: block kernels returning the log-sum-exp, the
merge, the backward from the merged output, the zigzag block schedule, the kernel check."""
import pytest
import torch

from effrun.techniques.bytescale import engine as E
from effrun.techniques.bytescale import planner as P
from effrun.techniques.bytescale import ring as R

KERNELS = {"flash-cpu": (R.FUSED["cpu"], "cpu"), "math": (R.MATH, "cpu"), "efficient-cuda": (R.FUSED["cuda"], "cuda")}
CASES = [(k, dt, tol) for k in sorted(KERNELS) for dt, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5))
         if not (k == "efficient-cuda" and dt == torch.float64)]  # CUDA efficient attention has no fp64


@pytest.mark.parametrize("name,dtype,tol", CASES)
def test_blocks_merged_by_lse_and_their_backward_equal_dense_autograd(name, dtype, tol):
    """Keys in two blocks (the past, no mask; the diagonal, causal): forward blocks merged by their
    log-sum-exp equal dense causal attention, and each block's backward run with the MERGED output
    and log-sum-exp sums to autograd's dQ/dK/dV of the dense attention (GQA: 4 query, 2 KV heads)."""
    (fwd, bwd), device = KERNELS[name]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(0)
    H, Hkv, D, past, n = 4, 2, 16, 23, 17
    q = torch.randn(H, n, D, generator=g, dtype=torch.float64)
    k = torch.randn(Hkv, past + n, D, generator=g, dtype=torch.float64)
    v = torch.randn(Hkv, past + n, D, generator=g, dtype=torch.float64)
    dout = torch.randn(H, n, D, generator=g, dtype=torch.float64)
    # dense reference: queries at positions past..past+n-1 over keys 0..past+n-1
    qd, kd, vd = (t.clone().requires_grad_(True) for t in (q, k, v))
    seq = torch.zeros(past + n)
    pos = torch.arange(past + n)
    ref = R.dense_reference(torch.cat([torch.zeros(H, past, D, dtype=torch.float64), qd], 1), kd, vd, D ** -0.5,
                            seq, pos)[:, past:]
    ref.backward(dout)
    qc, kc, vc, dc = (t.to(device, dtype) for t in (q, k, v, dout))
    blocks = [((0, past), False), ((past, past + n), True)]
    out = torch.zeros(H, n, D, dtype=R._acc_dtype(dtype), device=device)
    lse = torch.full((H, n), float("-inf"), dtype=R._lse_dtype(dtype), device=device)
    for (a, b), causal in blocks:
        o, l = fwd(qc, kc[:, a:b], vc[:, a:b], D ** -0.5, causal)
        R._merge_rows(out, lse, ((0, n),), o, l)
    assert float((out.double().cpu() - ref.detach()).abs().max()) < tol
    dq = torch.zeros_like(qc)
    dk, dv = torch.zeros_like(kc), torch.zeros_like(vc)
    for (a, b), causal in blocks:
        gq, gk, gv = bwd(dc, qc, kc[:, a:b], vc[:, a:b], out.to(dtype), lse, D ** -0.5, causal)
        dq += gq
        dk[:, a:b] += gk
        dv[:, a:b] += gv
    for got, want in ((dq, qd.grad), (dk, kd.grad), (dv, vd.grad)):
        assert float((got.double().cpu() - want).abs().max()) < tol * 10


def _layout(lengths, world, capacity, rank, strategy="naive", cp=0):
    plan = P.make_plan(strategy, lengths, world, capacity, P.Cost(1.0, 0.0), static_cp=cp)
    idx = E.PlanIndex(plan)
    return [idx.layout(rank, mb) for mb in plan.ranks[rank] if idx.layout(rank, mb).ring]


def test_zigzag_schedule_one_kernel_call_per_ring_step():
    """One sequence over 4 ranks: on its own step a rank computes its two diagonal blocks (causal)
    and one past block; on every other step both query chunks see the same past key chunk(s), so a
    single call covers it (query chunks that see the same keys share one call)."""
    for rank in range(4):
        (lay,) = _layout([4000], 4, 1000, rank)
        own = R._tasks(lay, lay.me)
        assert sorted(c for _, _, c in own) == [False, True, True]
        for t in range(1, 4):
            tasks = R._tasks(lay, (lay.me - t) % 4)
            assert len(tasks) == 1 and not tasks[0][2]
            qr, kr, _ = tasks[0]
            src = (lay.me - t) % 4
            # src before me: both my chunks see its early chunk; after me: my late chunk sees both of its
            assert (len(qr), len(kr)) == ((2, 1) if src < lay.me else (1, 2))


def test_static_ring_with_several_sequences_never_mixes_sequences_in_a_call():
    """A static-mesh ring holds chunks of several sequences: every call's query and key rows belong
    to one sequence, and every (query chunk, visible key chunk) pair is covered exactly once."""
    for rank in range(4):
        for lay in _layout([300, 200, 100], 4, 200, rank, "static", cp=4):
            mine = {(a, b): (seq, pos) for a, b, seq, pos in lay.ring_chunks[lay.me]}
            for src in range(4):
                theirs = {(a, b): (seq, pos) for a, b, seq, pos in lay.ring_chunks[src]}
                pairs = []
                for qr, kr, causal in R._tasks(lay, src):
                    seqs = {mine[r][0] for r in qr} | {theirs[r][0] for r in kr}
                    assert len(seqs) == 1
                    pairs += [(a, b) for a in qr for b in kr]
                want = [(qa, ka) for qa, (qs, qp) in mine.items() for ka, (ks, kp) in theirs.items()
                        if qs == ks and kp <= qp]
                assert sorted(pairs) == sorted(want)


def test_partially_overlapping_chunks_are_refused():
    lay = R.Layout(n_tokens=8, ring=(0, 1), me=0, ring_tokens=[8, 8],
                   ring_chunks=[[(0, 8, 0, 0)], [(0, 8, 0, 4)]])
    with pytest.raises(ValueError, match="not a zigzag layout"):
        R._tasks(lay, 1)


def test_a_wrong_fused_kernel_is_replaced_by_math_with_a_warning(monkeypatch):
    def bad_fwd(q, k, v, scale, causal):
        o, l = R._math_fwd(q, k, v, scale, causal)
        return o * 1.01, l

    monkeypatch.setitem(R.FUSED, "cpu", (bad_fwd, R._math_bwd))
    monkeypatch.setattr(R, "_CHECKED", {})
    with pytest.warns(UserWarning, match="unusable"):
        assert R.kernel_for(torch.device("cpu"), torch.float32, "fused") is R.MATH
    monkeypatch.setattr(R, "_CHECKED", {})
    monkeypatch.setitem(R.FUSED, "cpu", (R._cpu_fwd, R._cpu_bwd))
    assert R.kernel_for(torch.device("cpu"), torch.float64, "fused") == (R._cpu_fwd, R._cpu_bwd)
