"""Rank functions for the multi-process tests (run under effrun.launch.spawn, results via JSON)."""
from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from effrun.techniques.zeropp3.comm import LevelComm
from effrun.techniques.zeropp3.engine import PartitionedEngine
from effrun.techniques.zeropp3.formulas import expected_bytes
from effrun.techniques.zeropp3.hierarchy import LEVELS, Hierarchy

SEQ, BATCH, VOCAB = 16, 2, 64


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, VOCAB // 4, (BATCH, SEQ + 1), generator=g)  # low-entropy: learnable
    return ids[:, :-1], ids[:, 1:]


def loss_fn(model, x, y):
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def reference(world: int, steps: int, lr: float, max_norm: float):
    """Single process, global batch = every rank's micro-batch; AdamW on the full model."""
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, grads = [], []
    for step in range(steps):
        loss = sum(loss_fn(model, *batch(step, r)) for r in range(world)) / world
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, grads, torch.cat([p.detach().reshape(-1) for p in params])


def _engine(h, rank, case, lr, comm):
    return PartitionedEngine(tiny_llama(), h, rank, scheme=case["scheme"], quantized_weights=case["qw"],
                             quantized_gradients=case["qg"], weight_block=32, grad_block=32, lr=lr,
                             max_grad_norm=1.0, comm=comm, gather=case.get("gather", "layer"),
                             prefetch=case.get("prefetch", False), overlap_reduce=case.get("overlap_reduce", False))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def _cluster(sent) -> list:
    t = torch.tensor([float(sent[lv]) for lv in LEVELS], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _effrun_case(rank, world, h, comm, case, steps, lr, tmp, ref):
    eng = _engine(h, rank, case, lr, comm)
    losses, counts = [], None
    for step in range(steps):
        comm.reset()
        losses.append(eng.train_step([batch(step, rank)], loss_fn))
        counts = _cluster(comm.sent) if counts is None else counts
        if step == 0:
            g0 = eng.full_gradient()
            if case.get("resume"):  # a partitioned checkpoint after the first step
                torch.save(eng.state_dict(), f"{tmp}/rank_{rank}.pt")
    resumed = None
    if case.get("resume"):
        eng2 = _engine(h, rank, case, lr, comm)
        with torch.no_grad():
            for u in eng2.units:
                u.shard.add_(1.0)  # loading must overwrite this
        eng2.load_state_dict(torch.load(f"{tmp}/rank_{rank}.pt", weights_only=False))
        resumed = [eng2.train_step([batch(step, rank)], loss_fn) for step in range(1, steps)]
        eng2.close()
    final = eng.full_parameters()
    mem = eng.state_bytes()
    eng.close()
    if rank != 0:
        return None
    rl, rg, rp = ref
    return dict(losses=losses, resumed=resumed, ref_losses=rl,
                grad_rel_err=float((g0 - rg[0]).abs().max() / rg[0].abs().max()),
                param_max_err=float((final - rp).abs().max()), sent_cluster=counts,
                expected=expected_bytes(case["scheme"], h, eng.N, 4, case["qw"], case["qg"], 32, 32),
                state=mem, N=eng.N, numel=eng.numel, units=len(eng.units),
                unit_bytes=[u.N * 4 for u in eng.units], order=eng._order,
                peak_gathered=eng.peak_gathered_bytes, prefetched=eng.prefetched,
                grad_digest=digest(g0), param_digest=digest(final))


class _Ctx:
    """The slice of effrun's Context the FSDP2 engine reads."""

    def __init__(self, rank, world, h, lr):
        self.rank, self.world_size, self.device = rank, world, "cpu"
        self.cfg = SimpleNamespace(
            run=SimpleNamespace(lr=lr, weight_decay=0.0, max_grad_norm=1.0),
            parallelism=SimpleNamespace(nodes=h.nodes, devices_per_node=h.devices, subdevices_per_device=h.subdevices,
                                        world_size=world))

    def all_reduce(self, vals):
        t = torch.tensor(vals, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()


def _fsdp2_case(rank, world, h, case, steps, lr, ref):
    from effrun.techniques.zeropp3.engines import Fsdp2Engine

    model = tiny_llama()
    c = SimpleNamespace(scheme=case["scheme"], fsdp2_mesh=case["mesh"], gather="layer")
    eng = Fsdp2Engine(_Ctx(rank, world, h, lr), model, list(model.parameters()), c)
    losses, counts = [], None
    for step in range(steps):
        x, y = batch(step, rank)
        box = []

        def closure(m, x=x, y=y):
            loss = loss_fn(m, x, y)
            box.append(float(loss.detach()))
            return loss / world

        eng.forward_backward(closure, True)
        if step == 0:
            counts = _cluster(eng.counter.sent)
            g0 = torch.cat([p.grad.full_tensor().reshape(-1) for p in eng.params])
        eng.step()
        losses.append(eng.ctx.all_reduce([box[0]])[0] / world)
    final = torch.cat([p.full_tensor().reshape(-1) for p in eng.params])
    state = eng.summary()
    if rank != 0:
        return None
    rl, rg, rp = ref
    return dict(losses=losses, ref_losses=rl, sent_cluster=counts, grad_rel_err=float((g0 - rg[0]).abs().max() / rg[0].abs().max()),
                param_max_err=float((final - rp).abs().max()), numel=sum(p.numel() for p in eng.params),
                units=eng.units, rsa=state["measured/fsdp2_reshard_after_forward"],
                state_primary=state["measured/state_bytes_primary"])


def run_cases(rank: int, world: int, hier_dims, cases, out_path: str, steps: int, lr: float, tmp: str):
    h = Hierarchy(*hier_dims)
    comm = LevelComm(h, rank)
    ref = reference(world, steps, lr, 1.0) if rank == 0 else None
    results = []
    for case in cases:
        if case.get("engine") == "fsdp2":
            r = _fsdp2_case(rank, world, h, case, steps, lr, ref)
        else:
            r = _effrun_case(rank, world, h, comm, case, steps, lr, tmp, ref)
        if rank == 0:
            results.append(dict(case=case, **r))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
