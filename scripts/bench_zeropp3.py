"""ZeRO-3 / ZeRO++ / 3-level on 8 gloo processes (2 nodes x 2 devices x 2 sub-devices), side by side,
then the cost model: calibrated here (validation) and projected onto Frontier (term by term).

Parts (`--parts`, default all):
- calib:   ring all-gather / reduce-scatter / all-to-all (effrun's LevelComm, the engine's own
           collectives) over every group kind of the hierarchy (all instances of a kind at once, as
           in a step), sizes 4 KiB..4 MiB; alpha and beta per link level by least squares on
           T = (n-1) alpha + (n-1)/n B / beta, with residuals; the quantisers' rate here.
- steps:   the effrun engine (blocking and prefetching) and PyTorch FSDP2, same tiny Llama, batch and
           seed, built once and stepped ALTERNATELY (A B C ... A B C ...; round 0 is warm-up):
           bytes per level per iteration (summed over ranks), step time median and spread, losses;
           compute alone per gather unit (hooks, every rank at once) for the validation.
- predict: the cost model with the calibrated levels and the measured per-unit compute predicts
           each effrun variant's step time (measured vs predicted).
- project: the paper's 20B GPT on Frontier (mi250x-gcd) at 8..384 GCDs: per assumption set (quantiser
           time, overlap) TFLOPS ratios beside the paper's; the term-by-term table at 384 GCDs with
           and without overlap; which single assumption would give the paper's ratios.

    .venv/bin/python scripts/bench_zeropp3.py [--rounds 6] [--hidden 128] [--layers 4] [--json out.json]
    .venv/bin/python scripts/bench_zeropp3.py --parts project          # cost model only (seconds)
    .venv/bin/python scripts/bench_zeropp3.py --from out.json          # re-print the tables of a run

Step times are gloo over loopback on this machine's cores (shared): the links and the compute are the
same CPUs, so overlap cannot speed anything up here; what transfers to clusters are the byte counts,
and the cost model checked against this machine's own times.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

VARIANTS = [  # name, engine, scheme, qw, qg, prefetch, overlap_reduce, fsdp2 mesh
    ("effrun zero3", "effrun", "zero3", False, False, False, False, None),
    ("effrun zero3 +prefetch", "effrun", "zero3", False, False, True, True, None),
    ("fsdp2 zero3", "fsdp2", "zero3", False, False, False, False, "flat"),
    ("effrun zeropp", "effrun", "zeropp", False, False, False, False, None),
    ("fsdp2 zeropp (rsa=4)", "fsdp2", "zeropp", False, False, False, False, "flat"),
    ("effrun hier3", "effrun", "hier3", False, False, False, False, None),
    ("effrun hier3 +prefetch", "effrun", "hier3", False, False, True, True, None),
    ("fsdp2 hier3 (rsa=2)", "fsdp2", "hier3", False, False, False, False, "flat"),
    ("fsdp2 hier3 hsdp (rsa=2)", "fsdp2", "hier3", False, False, False, False, "hsdp"),
    ("effrun zeropp +qwZ+qgZ", "effrun", "zeropp", True, True, False, False, None),
    ("effrun hier3 +qwZ+qgZ", "effrun", "hier3", True, True, False, False, None),
    ("effrun hier3 +qwZ+qgZ +prefetch", "effrun", "hier3", True, True, True, True, None),
]
KIND_LEVEL = {"pair": "subdevice", "device": "device", "node": "device", "cross_node": "node", "world": "node"}
PAPER = {"zeropp/zero3": 1.405, "hier3/zero3": 2.398, "hier3/zeropp": 1.71, "hier3 scaling 8->384": 0.94}
GPT20B = dict(P=20_256_509_952, Pn=19_934_859_264, L=44, H=6144)  # configs/model/gpt-20b.yaml, meta device


# --- ranks ------------------------------------------------------------------------------------------
def _max_over_ranks(dt: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([dt], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def calibrate(comm, h, rank, sizes, reps):
    import torch
    import torch.distributed as dist

    from effrun.techniques.zeropp3 import quant

    groups = {"pair": h.pair_group(rank), "device": h.device_group(rank), "node": h.node_group(rank),
              "cross_node": h.cross_node_group(rank), "world": h.world_group()}
    out = []
    for kind, g in groups.items():
        n = len(g)
        for op in ("all_gather", "reduce_scatter", "all_to_all"):
            for B in sizes:
                x = torch.randn(n, B // 4 // n)
                ts = []
                for _ in range(reps + 1):
                    dist.barrier()
                    t0 = time.perf_counter()
                    if op == "all_gather":
                        comm.all_gather(x, g)
                    elif op == "reduce_scatter":
                        comm.reduce_scatter(x, g)
                    else:
                        comm.all_to_all(list(x), g)
                    ts.append(_max_over_ranks(time.perf_counter() - t0))
                out.append(dict(kind=kind, level=KIND_LEVEL[kind], n=n, op=op, bytes=B,
                                seconds=statistics.median(ts[1:]), spread=[min(ts[1:]), max(ts[1:])]))
    rates = {}
    for bits in (8, 4):  # every rank at once, as in a step
        n = 1 << 18
        x = torch.randn(n)
        ts = []
        for _ in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            quant.dequantize(quant.quantize(x, bits, 64), n, bits, 64)
            ts.append(_max_over_ranks(time.perf_counter() - t0))
        rates[bits] = n * 4 / statistics.median(ts[1:]) / 1e9
    return {"samples": out, "quant_GBps": rates}


class _Ctx:
    """The slice of effrun's Context the FSDP2 engine reads."""

    def __init__(self, rank, world, h, lr):
        from types import SimpleNamespace

        self.rank, self.world_size, self.device = rank, world, "cpu"
        self.cfg = SimpleNamespace(
            run=SimpleNamespace(lr=lr, weight_decay=0.0, max_grad_norm=1.0),
            parallelism=SimpleNamespace(nodes=h.nodes, devices_per_node=h.devices, subdevices_per_device=h.subdevices,
                                        world_size=world))

    def all_reduce(self, vals):
        import torch
        import torch.distributed as dist

        t = torch.tensor(vals, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


def _unit_compute(model_fn, batches, reps):
    """Forward / backward seconds per gather unit of the plain model (no communication), every rank
    at once; time outside the units' modules (loss) goes to the last unit (fwd) / first (bwd)."""
    import torch
    import torch.distributed as dist

    from effrun.techniques.zeropp3.engine import _units_of

    model = model_fn()
    groups = _units_of(model, [p for p in model.parameters()], True)
    n = len(groups)
    fwd, bwd = [[0.0] * n for _ in range(reps)], [[0.0] * n for _ in range(reps)]
    stamp = {}
    r = [0]
    for i, (mod, _) in enumerate(groups):
        mod.register_forward_pre_hook(lambda m, a, i=i: stamp.__setitem__(("f", i), time.perf_counter()))
        mod.register_forward_hook(lambda m, a, o, i=i: fwd[r[0]].__setitem__(
            i, time.perf_counter() - stamp[("f", i)]))
        mod.register_full_backward_pre_hook(lambda m, g, i=i: stamp.__setitem__(("b", i), time.perf_counter()))
        mod.register_full_backward_hook(lambda m, gi, go, i=i: bwd[r[0]].__setitem__(
            i, time.perf_counter() - stamp[("b", i)]))
    tot_f, tot_b = [], []
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    for k in range(reps + 1):
        r[0] = max(k - 1, 0)
        x, y = batches(k)
        dist.barrier()
        t0 = time.perf_counter()
        logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if k:
            tot_f.append(t1 - t0)
            tot_b.append(t2 - t1)
    med = lambda rows, i: statistics.median(row[i] for row in rows)  # noqa: E731
    f = [med(fwd, i) for i in range(n)]
    b = [med(bwd, i) for i in range(n)]
    f[-1] += max(0.0, statistics.median(tot_f) - sum(f))
    b[0] += max(0.0, statistics.median(tot_b) - sum(b))
    return {"fwd_s": f, "bwd_s": b, "total_fwd_s": statistics.median(tot_f), "total_bwd_s": statistics.median(tot_b)}


def steps(comm, h, rank, world, rounds, hidden, layers):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from effrun.techniques.zeropp3.engine import PartitionedEngine
    from effrun.techniques.zeropp3.engines import Fsdp2Engine
    from effrun.techniques.zeropp3.hierarchy import LEVELS

    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)

    def model_fn():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)

    def lossf(m, x, y):
        return F.cross_entropy(m(input_ids=x, use_cache=False).logits.reshape(-1, 256), y.reshape(-1))

    def batches(step):
        g = torch.Generator().manual_seed(step * 100 + rank)
        ids = torch.randint(0, 64, (2, 65), generator=g)
        return ids[:, :-1], ids[:, 1:]

    from types import SimpleNamespace

    engines = []
    for name, kind, scheme, qw, qg, pf, ov, mesh in VARIANTS:
        if kind == "effrun":
            eng = PartitionedEngine(model_fn(), h, rank, scheme=scheme, quantized_weights=qw, quantized_gradients=qg,
                                    lr=1e-3, max_grad_norm=1.0, comm=comm, prefetch=pf, overlap_reduce=ov)
        else:
            m = model_fn()
            eng = Fsdp2Engine(_Ctx(rank, world, h, 1e-3), m, list(m.parameters()),
                              SimpleNamespace(scheme=scheme, fsdp2_mesh=mesh, gather="layer"))
        engines.append(eng)

    def one_step(eng, step):
        x, y = batches(step)
        if isinstance(eng, PartitionedEngine):
            comm.reset()
            return eng.train_step([(x, y)], lossf), dict(comm.sent)
        eng.counter.reset()
        box = []

        def closure(m):
            loss = lossf(m, x, y)
            box.append(float(loss.detach()))
            return loss / world

        eng.forward_backward(closure, True)
        eng.step()
        t = torch.tensor([box[0] / world], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t), dict(eng.counter.sent)

    res = [dict(name=v[0], times=[], losses=[], bytes=None) for v in VARIANTS]
    for rnd in range(rounds + 1):  # A B C ... A B C ...: each variant once per round
        for eng, r in zip(engines, res):
            dist.barrier()
            t0 = time.perf_counter()
            loss, sent = one_step(eng, rnd)
            dist.barrier()
            dt = time.perf_counter() - t0
            r["losses"].append(loss)
            if rnd:
                r["times"].append(dt)
            if r["bytes"] is None:
                s = torch.tensor([float(sent[lv]) for lv in LEVELS], dtype=torch.float64)
                dist.all_reduce(s)
                r["bytes"] = dict(zip(LEVELS, s.tolist()))
    for eng, r, v in zip(engines, res, VARIANTS):
        if isinstance(eng, PartitionedEngine):
            r["unit_elems"] = [u.N for u in eng.units]
            r["M"] = eng.N * 4
            r["peak_gathered"] = eng.peak_gathered_bytes
            st = eng.state_bytes()
            r["state"] = st["primary"] + st["optimizer"] + st["secondary"]
            eng.close()
        else:
            r["M"] = sum(p.numel() for p in eng.params) * 4
            s = eng.summary()
            r["state"] = s["measured/state_bytes_primary"] + s["measured/state_bytes_optimizer"]
    compute = _unit_compute(model_fn, batches, max(3, rounds // 2))
    return {"variants": res, "compute": compute, "hidden": hidden, "layers": layers}


def worker(rank, world, parts, rounds, hidden, layers, sizes, reps, out):
    import torch

    from effrun.techniques.zeropp3.comm import LevelComm
    from effrun.techniques.zeropp3.hierarchy import Hierarchy

    torch.set_num_threads(1)
    h = Hierarchy(2, 2, 2)
    comm = LevelComm(h, rank)
    res = {}
    if "calib" in parts:
        res["calib"] = calibrate(comm, h, rank, sizes, reps)
    if "steps" in parts:
        res["steps"] = steps(comm, h, rank, world, rounds, hidden, layers)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)


# --- analysis (no torch) ----------------------------------------------------------------------------
def fit_levels(samples):
    """alpha (s) and beta (bytes/s) per level by least squares over its all-gathers and reduce-scatters."""
    import numpy as np

    fits = {}
    for lv in ("subdevice", "device", "node"):
        rows = [s for s in samples if s["level"] == lv and s["op"] in ("all_gather", "reduce_scatter")]
        X = np.array([[s["n"] - 1, (s["n"] - 1) / s["n"] * s["bytes"]] for s in rows])
        y = np.array([s["seconds"] for s in rows])
        (a, inv_b), *_ = np.linalg.lstsq(X, y, rcond=None)
        fits[lv] = dict(alpha_us=a * 1e6, beta_GBps=(1 / inv_b) / 1e9 if inv_b > 0 else float("inf"),
                        samples=len(rows))
    return fits


def here_levels(fits):
    from effrun.costmodel import Level

    return [Level("subdevice", 2, fits["subdevice"]["beta_GBps"], fits["subdevice"]["alpha_us"]),
            Level("device", 4, fits["device"]["beta_GBps"], fits["device"]["alpha_us"]),
            Level("node", 8, fits["node"]["beta_GBps"], fits["node"]["alpha_us"])]


def residuals(samples, levels):
    from effrun.costmodel import collective_time

    by = {lv.name: lv for lv in levels}
    out = {}
    for s in samples:
        pred = collective_time(s["op"], s["bytes"], s["n"], by[s["level"]])
        out.setdefault((s["kind"], s["op"]), []).append((pred - s["seconds"]) / s["seconds"])
    return out


def predict(steps_res, levels, quant_rates):
    from effrun.techniques.zeropp3.costmodel import Unit, iteration

    comp = steps_res["compute"]
    rows = []
    for v, r in zip(VARIANTS, steps_res["variants"]):
        name, kind, scheme, qw, qg, pf, ov, _ = v
        if kind != "effrun":
            continue
        units = [Unit(n, f, b) for n, f, b in zip(r["unit_elems"], comp["fwd_s"], comp["bwd_s"])]
        it = iteration(scheme, units, levels, 8, wire=4.0, grad_wire=4.0, qw=qw, qg=qg, wblock=64, gblock=64,
                       prefetch=pf, overlap_reduce=ov, quant_GBps=quant_rates)
        rows.append(dict(name=name, measured=statistics.median(r["times"]), predicted=it["step_s"],
                         compute=it["compute_s"], comm=it["comm_s"], quant=it["quant_s"],
                         exposed=it["exposed_comm_s"]))
    return rows


def _frontier():
    from omegaconf import OmegaConf

    from effrun.config.paths import config_dir
    from effrun.costmodel import levels_from_hardware

    hw = OmegaConf.load(config_dir() / "hardware" / "mi250x-gcd.yaml")
    return levels_from_hardware(hw), float(hw.peak_tflops.bfloat16), float(hw.memory_bw_GBps)


ASSUMPTIONS = [  # name, quantiser time, prefetch + overlapped reduction
    ("bandwidth only (no quantiser time, no overlap)", False, False),
    ("+ quantiser time (our torch kernels)", True, False),
    ("+ overlap (prefetch, overlapped reduction), no quantiser time", False, True),
    ("+ quantiser time + overlap", True, True),
]


def project(levels=None, eff=0.45, quant=True, overlap=False, devices=(8, 16, 384)):
    from effrun.techniques.zeropp3.costmodel import project_zero, quant_rate

    fl, peak, mem = _frontier()
    levels = levels or fl
    q = {b: quant_rate(mem, b) for b in (8, 4)} if quant else None
    g = GPT20B
    return project_zero(g["P"], g["Pn"], g["L"], g["H"], levels, peak, list(devices), 2, 2048, eff,
                        prefetch=overlap, overlap_reduce=overlap, quant_GBps=q)


def ratios(rows, W=384):
    from effrun.techniques.zeropp3.costmodel import ratio

    h = next(r for r in rows if r["scheme"] == "hier3" and r["devices"] == W)
    return {"zeropp/zero3": ratio(rows, "zeropp", "zero3", W), "hier3/zero3": ratio(rows, "hier3", "zero3", W),
            "hier3/zeropp": ratio(rows, "hier3", "zeropp", W), "hier3 scaling 8->384": h["scaling_efficiency"]}


def _bisect(f, lo, hi, target, steps=40, log=True):
    """x in [lo, hi] with f(x) = target (f monotone), or None if the target is outside f's range."""
    import math

    a, b = f(lo) - target, f(hi) - target
    if a * b > 0:
        return None
    for _ in range(steps):
        mid = math.sqrt(lo * hi) if log else (lo + hi) / 2
        m = f(mid) - target
        if (m < 0) == (a < 0):
            lo, a = mid, m
        else:
            hi = mid
    return math.sqrt(lo * hi) if log else (lo + hi) / 2


def implied_pair(quant, overlap):
    """The Infinity Fabric (8-GCD) and Slingshot (per GCD) effective bandwidths that together give the
    paper's 3-level/ZeRO++ = 1.71 and ZeRO++/ZeRO-3 = 1.405 (then 3-level/ZeRO-3 = 2.40 follows): an
    implied pair, printed beside the hardware config, never used to project."""
    from dataclasses import replace

    fl, _, _ = _frontier()

    def rows(if_bw, ss_bw):
        lv = list(fl)
        lv[1] = replace(lv[1], bandwidth_GBps=if_bw)
        lv[2] = replace(lv[2], bandwidth_GBps=ss_bw)
        return project(lv, quant=quant, overlap=overlap, devices=(8, 384))

    def if_for(ss_bw):
        return _bisect(lambda bw: ratios(rows(bw, ss_bw))["hier3/zeropp"], 0.05, 5000, 1.71)

    def zpp_over_z3(ss_bw):
        x = if_for(ss_bw)
        return 0.0 if x is None else ratios(rows(x, ss_bw))["zeropp/zero3"]

    ss = _bisect(zpp_over_z3, 0.05, 500, 1.405, steps=30)
    if ss is None:
        return None
    x = if_for(ss)
    return dict(if_GBps=x, slingshot_GBps=ss, **ratios(rows(x, ss)))


@functools.lru_cache(maxsize=None)
def implied(quant, overlap):
    """Which single assumption, changed alone, gives each of the paper's ratios (None: none can)."""
    from dataclasses import replace

    fl, _, _ = _frontier()

    def with_bw(i, bw):
        lv = list(fl)
        lv[i] = replace(lv[i], bandwidth_GBps=bw)
        return project(lv, quant=quant, overlap=overlap, devices=(8, 384))

    out = {}
    out["IF GB/s for hier3/zeropp=1.71"] = _bisect(lambda bw: ratios(with_bw(1, bw))["hier3/zeropp"], 0.05, 5000, 1.71)
    out["IF GB/s for zeropp/zero3=1.405"] = _bisect(lambda bw: ratios(with_bw(1, bw))["zeropp/zero3"], 0.05, 5000, 1.405)
    out["Slingshot GB/s per GCD for zeropp/zero3=1.405"] = _bisect(
        lambda bw: ratios(with_bw(2, bw))["zeropp/zero3"], 0.05, 5000, 1.405)
    out["Slingshot GB/s per GCD for hier3/zero3=2.398"] = _bisect(
        lambda bw: ratios(with_bw(2, bw))["hier3/zero3"], 0.05, 5000, 2.398)
    out["compute efficiency for hier3/zero3=2.398"] = _bisect(
        lambda e: ratios(project(fl, e, quant, overlap, (8, 384)))["hier3/zero3"], 0.01, 1.0, 2.398)
    out["compute efficiency for hier3/zeropp=1.71"] = _bisect(
        lambda e: ratios(project(fl, e, quant, overlap, (8, 384)))["hier3/zeropp"], 0.01, 1.0, 1.71)
    return out


# --- printing ---------------------------------------------------------------------------------------
def _f(x, nd=3):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def print_calib(c):
    fits = fit_levels(c["samples"])
    lv = here_levels(fits)
    print("\n## Calibration here: ring collectives on 8 gloo ranks (all instances of a group kind at once)\n")
    print("| level | alpha (us) | beta (GB/s) | samples (all-gather + reduce-scatter) |\n|---|---|---|---|")
    for k, f in fits.items():
        print(f"| {k} | {f['alpha_us']:.0f} | {f['beta_GBps']:.3f} | {f['samples']} |")
    res = residuals(c["samples"], lv)
    print("\n| group kind (level) | op | n | median rel. residual | worst | fitted on |\n|---|---|---|---|---|---|")
    for (kind, op), rs in res.items():
        n = next(s["n"] for s in c["samples"] if s["kind"] == kind)
        used = "yes" if op != "all_to_all" else "no (check)"
        print(f"| {kind} ({KIND_LEVEL[kind]}) | {op} | {n} | {statistics.median(rs):+.2f} | "
              f"{max(rs, key=abs):+.2f} | {used} |")
    print("\n| group kind | op | bytes | measured s | predicted s |\n|---|---|---|---|---|")
    by = {x.name: x for x in lv}
    from effrun.costmodel import collective_time

    for s in c["samples"]:
        if s["bytes"] in (min(x["bytes"] for x in c["samples"]), max(x["bytes"] for x in c["samples"])):
            print(f"| {s['kind']} | {s['op']} | {s['bytes']} | {s['seconds']:.4f} | "
                  f"{collective_time(s['op'], s['bytes'], s['n'], by[s['level']]):.4f} |")
    q = c["quant_GBps"]
    print(f"\nquantise+dequantise here (every rank at once): INT8 {float(q['8'] if '8' in q else q[8]):.3f} GB/s, "
          f"INT4 {float(q['4'] if '4' in q else q[4]):.3f} GB/s of fp32 input")
    return lv, {8: float(q.get("8", q.get(8))), 4: float(q.get("4", q.get(4)))}


def print_steps(s):
    print(f"\n## Engines side by side: 8 gloo ranks (2x2x2), tiny Llama d={s['hidden']}, {s['layers']} layers, "
          f"fp32, rounds alternated\n")
    print("| variant | sub-device B/iter | device B/iter | node B/iter | node / M | step s median [min, max] | "
          "state B/rank | loss first -> last |\n|---|---|---|---|---|---|---|---|")
    for r in s["variants"]:
        b = r["bytes"]
        t = r["times"]
        print(f"| {r['name']} | {b['subdevice']:.0f} | {b['device']:.0f} | {b['node']:.0f} | "
              f"{b['node'] / r['M']:.3f} | {statistics.median(t):.3f} [{min(t):.3f}, {max(t):.3f}] | {r['state']} | "
              f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} |")
    base = {r["name"]: statistics.median(r["times"]) for r in s["variants"]}
    print("\nratios of medians (same run): " + ", ".join(
        f"{a} / {b} = {base[a] / base[b]:.2f}" for a, b in (
            ("effrun zero3 +prefetch", "effrun zero3"), ("effrun hier3 +prefetch", "effrun hier3"),
            ("effrun hier3 +qwZ+qgZ +prefetch", "effrun hier3 +qwZ+qgZ"), ("fsdp2 zero3", "effrun zero3"),
            ("fsdp2 zeropp (rsa=4)", "effrun zeropp"), ("fsdp2 hier3 (rsa=2)", "effrun hier3"))))
    c = s["compute"]
    print(f"\ncompute alone (no communication, every rank at once): forward {c['total_fwd_s']:.4f} s, backward "
          f"{c['total_bwd_s']:.4f} s; per unit fwd {[round(x, 4) for x in c['fwd_s']]}, "
          f"bwd {[round(x, 4) for x in c['bwd_s']]}")


def print_predict(rows):
    print("\n## Validation: the cost model with the calibrated levels vs the measured step times here\n")
    print("| variant | measured s | predicted s | pred / meas | compute s | comm s | quantiser s | exposed comm s |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['measured']:.3f} | {r['predicted']:.3f} | {r['predicted'] / r['measured']:.2f} | "
              f"{r['compute']:.3f} | {r['comm']:.3f} | {r['quant']:.3f} | {r['exposed']:.3f} |")


def print_project():
    from effrun.techniques.zeropp3.costmodel import quant_rate
    from effrun.techniques.zeropp3.plugin import terms_table

    _, _, mem = _frontier()
    print("\n## Projection: 20B GPT on Frontier (mi250x-gcd), bf16, micro-batch 2 x 2048, compute 45% of peak\n")
    print(f"quantiser rate on a GCD: H100-measured torch quantisers scaled by HBM bandwidth: INT8 "
          f"{quant_rate(mem, 8):.1f} GB/s, INT4 {quant_rate(mem, 4):.1f} GB/s of fp32 input\n")
    print("| assumptions | ZeRO-3 TFLOPS | ZeRO++ | 3-level | ZeRO++/ZeRO-3 | 3-level/ZeRO-3 | 3-level/ZeRO++ | "
          "3-level scaling 8->384 |\n|---|---|---|---|---|---|---|---|")
    out = {}
    for name, quant, overlap in ASSUMPTIONS:
        rows = project(quant=quant, overlap=overlap)
        t = {r["scheme"]: r["tflops_per_device"] for r in rows if r["devices"] == 384}
        rr = ratios(rows)
        out[name] = rows
        print(f"| {name} | {t['zero3']:.1f} | {t['zeropp']:.1f} | {t['hier3']:.1f} | {rr['zeropp/zero3']:.3f} | "
              f"{rr['hier3/zero3']:.3f} | {rr['hier3/zeropp']:.3f} | {rr['hier3 scaling 8->384']:.3f} |")
    print(f"| **paper** | - | - | - | {PAPER['zeropp/zero3']} | {PAPER['hier3/zero3']} | {PAPER['hier3/zeropp']} | "
          f"{PAPER['hier3 scaling 8->384']} |")
    for name in (ASSUMPTIONS[1][0], ASSUMPTIONS[3][0]):
        print()
        print(terms_table(out[name], 384, f"20B GPT on Frontier, {name}"))
    print("## Which single assumption would give the paper's ratios (everything else as in the row)\n")
    print("| assumptions | " + " | ".join(implied(False, False)) + " |\n|---|" + "---|" * 6)
    for name, quant, overlap in ASSUMPTIONS:
        imp = implied(quant, overlap)
        print(f"| {name} | " + " | ".join(_f(v, 2) for v in imp.values()) + " |")
    print("\n(hardware config: IF 50 GB/s per GCD, Slingshot 12.5 GB/s per GCD, compute efficiency 0.45; "
          "'-' = no value of that one parameter reaches the paper's ratio)")
    print("\n### Two effective bandwidths together (implied by the paper's two independent ratios; not a fit, "
          "not used to project)\n")
    print("| assumptions | IF GB/s (8-GCD groups) | Slingshot GB/s per GCD | ZeRO++/ZeRO-3 | 3-level/ZeRO-3 | "
          "3-level/ZeRO++ | 3-level scaling 8->384 |\n|---|---|---|---|---|---|---|")
    for name, quant, overlap in (ASSUMPTIONS[0], ASSUMPTIONS[2]):
        p = implied_pair(quant, overlap)
        if p is None:
            print(f"| {name} | - | - | - | - | - | - |")
            continue
        print(f"| {name} | {p['if_GBps']:.2f} | {p['slingshot_GBps']:.2f} | {p['zeropp/zero3']:.3f} | "
              f"{p['hier3/zero3']:.3f} | {p['hier3/zeropp']:.3f} | {p['hier3 scaling 8->384']:.3f} |")
    print("\n### What-if: the 8-GCD Infinity Fabric all-gather at the bandwidth 3-level/ZeRO++ = 1.71 implies "
          "(one value, all three ratios; an implied scenario, not a fit)\n")
    print("| assumptions | IF GB/s | ZeRO++/ZeRO-3 | 3-level/ZeRO-3 | 3-level/ZeRO++ | 3-level scaling 8->384 |\n"
          "|---|---|---|---|---|---|")
    from dataclasses import replace

    fl, _, _ = _frontier()
    for name, quant, overlap in ASSUMPTIONS:
        bw = implied(quant, overlap)["IF GB/s for hier3/zeropp=1.71"]
        if bw is None:
            continue
        lv = list(fl)
        lv[1] = replace(lv[1], bandwidth_GBps=bw)
        rr = ratios(project(lv, quant=quant, overlap=overlap))
        print(f"| {name} | {bw:.2f} | {rr['zeropp/zero3']:.3f} | {rr['hier3/zero3']:.3f} | {rr['hier3/zeropp']:.3f} | "
              f"{rr['hier3 scaling 8->384']:.3f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="calib,steps,predict,project")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sizes", default="4096,65536,1048576,4194304,16777216")
    ap.add_argument("--json", default=None, help="write the raw measurements here")
    ap.add_argument("--from", dest="src", default=None, help="re-print the tables of a --json file")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    t0 = time.time()
    if a.src:
        res = json.load(open(a.src))
    elif parts & {"calib", "steps"}:
        from effrun.launch import spawn

        out = os.path.join(tempfile.mkdtemp(), "bench.json")
        sizes = [int(x) for x in a.sizes.split(",")]
        spawn(worker, 8, "gloo", args=(sorted(parts), a.rounds, a.hidden, a.layers, sizes, a.reps, out))
        res = json.load(open(out))
        res["meta"] = dict(load=os.getloadavg(), wall_s=time.time() - t0, date=time.strftime("%Y-%m-%d %H:%M"),
                           args=vars(a))
        if a.json:
            json.dump(res, open(a.json, "w"), indent=1)
    else:
        res = {}
    if "meta" in res:
        m = res["meta"]
        print(f"# bench_zeropp3 {m['date']}: wall {m['wall_s']:.0f} s incl. 8-process start, load average "
              f"(1/5/15 min) at the end {m['load'][0]:.1f} / {m['load'][1]:.1f} / {m['load'][2]:.1f}")
    lv = rates = None
    if "calib" in res:
        lv, rates = print_calib(res["calib"])
    if "steps" in res:
        print_steps(res["steps"])
        if lv is not None and "predict" in parts:
            print_predict(predict(res["steps"], lv, rates))
    if "project" in parts:
        print_project()


if __name__ == "__main__":
    main()
