"""Rank functions for the 4-process gloo test (spawned by effrun.launch.spawn; results via a file)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from effrun.techniques.bytescale import engine as E
from effrun.techniques.bytescale import planner as P
from effrun.techniques.bytescale import ring as R

LENGTHS = [100, 37, 250, 12, 64, 180, 5, 90, 21]  # mixed: 250 and 180 are split over ranks
CAPACITY = 80


def tiny_model(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).to(dtype)


def sequences(lengths):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (s + 1,), generator=g) for s in lengths]


def plans(world):
    cost = P.Cost(a1=1.0, b1=100.0)
    return {"naive": P.make_plan("naive", LENGTHS, world, CAPACITY, cost),
            "balance": P.make_plan("balance", LENGTHS, world, CAPACITY, cost, delta=0.05),
            "static": P.make_plan("static", LENGTHS, world, CAPACITY, cost, static_cp=4)}


# (impl, overlap, dtype, output tolerance, gradient tolerance): every ring implementation vs dense
ATTN_CASES = [("fused", True, torch.float64, 1e-10, 1e-10), ("fused", False, torch.float64, 1e-10, 1e-10),
              ("math", True, torch.float64, 1e-10, 1e-10), ("reference", False, torch.float64, 1e-10, 1e-10),
              ("fused", True, torch.float32, 5e-6, 2e-5), ("math", True, torch.float32, 5e-6, 2e-5)]


def _attention_check(rank, world, impl, overlap, dtype):
    """Ring attention over zigzag pieces (every wave of a plan) vs dense causal attention, fwd + grads.
    The naive plan splits 200 and 160 over ranks (one ring each); the static plan puts several
    sequences in one 4-rank ring (one call per sequence and step)."""
    torch.manual_seed(5)
    H, Hkv, D = 4, 2, 8
    lengths = [200, 70, 9, 33, 160]
    qs = [torch.randn(H, s, D, dtype=torch.float64) for s in lengths]
    ks = [torch.randn(Hkv, s, D, dtype=torch.float64) for s in lengths]
    vs = [torch.randn(Hkv, s, D, dtype=torch.float64) for s in lengths]
    ws = [torch.randn(H, s, D, dtype=torch.float64) for s in lengths]
    R.configure(impl=impl, overlap=overlap)
    out_err = grad_err = 0.0
    ringed = 0
    bytes0 = R.COMM["bytes"]
    for plan in (P.make_plan("naive", lengths, world, 64, P.Cost(1.0, 0.0)),
                 P.make_plan("static", lengths, world, 64, P.Cost(1.0, 0.0), static_cp=4)):
        index = E.PlanIndex(plan)
        dq = [torch.zeros_like(t) for t in qs]
        dk = [torch.zeros_like(t) for t in ks]
        dv = [torch.zeros_like(t) for t in vs]
        for mb in plan.ranks[rank]:
            lay = index.layout(rank, mb)
            ringed += lay.ring is not None
            order = [p for p in mb.pieces if len(p.ring) > 1] + [p for p in mb.pieces if len(p.ring) == 1]
            sl = [(p.seq, a, b) for p in order for a, b in p.ranges]
            q = torch.cat([qs[i][:, a:b] for i, a, b in sl], 1).to(dtype).requires_grad_(True)
            k = torch.cat([ks[i][:, a:b] for i, a, b in sl], 1).to(dtype).requires_grad_(True)
            v = torch.cat([vs[i][:, a:b] for i, a, b in sl], 1).to(dtype).requires_grad_(True)
            with R.use_layout(lay):
                out, _ = R.attention_forward(None, q[None], k[None], v[None], scaling=D ** -0.5)
            out = out[0].transpose(0, 1)  # [H, T, D]
            w = torch.cat([ws[i][:, a:b] for i, a, b in sl], 1).to(dtype)
            (out * w).sum().backward()
            off = 0
            for i, a, b in sl:
                n = b - a
                ref = R.dense_reference(qs[i], ks[i], vs[i], D ** -0.5, torch.zeros(lengths[i]),
                                        torch.arange(lengths[i]))
                out_err = max(out_err, float((out[:, off:off + n].detach().double() - ref[:, a:b]).abs().max()))
                dq[i][:, a:b] += q.grad[:, off:off + n].double()
                dk[i][:, a:b] += k.grad[:, off:off + n].double()
                dv[i][:, a:b] += v.grad[:, off:off + n].double()
                off += n
        for i, s in enumerate(lengths):
            for t in (dq[i], dk[i], dv[i]):
                dist.all_reduce(t)
            q, k, v = (x.clone().requires_grad_(True) for x in (qs[i], ks[i], vs[i]))
            ref = R.dense_reference(q, k, v, D ** -0.5, torch.zeros(s), torch.arange(s))
            (ref * ws[i]).sum().backward()
            grad_err = max(grad_err, float((dq[i] - q.grad).abs().max()), float((dk[i] - k.grad).abs().max()),
                           float((dv[i] - v.grad).abs().max()))
    R.configure(impl="fused", overlap=True)
    return {"attn_out_err": out_err, "attn_grad_err": grad_err, "ringed_micro_batches": ringed,
            "bytes": R.COMM["bytes"] - bytes0}


def worker(rank, world, path):
    torch.set_num_threads(1)
    res = {"attention": {c[:3]: _attention_check(rank, world, *c[:3]) for c in ATTN_CASES},
           "fused_kernel_used": {str(k): v is R.FUSED["cpu"] for k, v in R._CHECKED.items()}}
    attn = R.register()
    seqs = sequences(LENGTHS)
    for name, plan in plans(world).items():
        m = tiny_model()
        m.set_attn_implementation(attn)
        out = E.run_rank_step(m, plan, rank, seqs)
        g = E.allreduce_grads(list(m.parameters()))
        opt = E.Zero1AdamW(list(m.parameters()), lr=1e-2, weight_decay=0.1, rank=rank, world=world)
        for p, gp in zip(m.parameters(), torch.split(g, [p.numel() for p in m.parameters()])):
            p.grad = gp.view_as(p).clone() / world  # step() all-reduces again: pre-divide to keep the sum
        opt.step(max_grad_norm=1.0)
        res[name] = {"grad": g, "params": torch.cat([p.detach().reshape(-1) for p in m.parameters()]),
                     "mbs": plan.micro_batches(), "loss_sum": out["loss_sum"],
                     "state_numel": sum(t.numel() for st in opt.opt.state.values() for t in st.values()
                                        if torch.is_tensor(t) and t.dim() > 0)}
    allres = [None] * world
    dist.all_gather_object(allres, res)
    if rank == 0:
        torch.save(allres, path)
