"""ZeRO-3 vs ZeRO++ vs 3-level on 8 gloo processes (2 nodes x 2 devices x 2 sub-devices), side by side.

Measured in one run, same tiny Llama, batch and seed for every variant: bytes sent per link level
per iteration (summed over ranks, from the engine's counters), cross-node bytes per node / M,
per-rank persistent state, step time on this CPU (gloo over loopback: NOT an interconnect
measurement; the ratios that transfer to real clusters are the byte ratios). Then the cost
model's projection for the paper's 20B GPT on Frontier (mi250x-gcd) at 384 GCDs.

    .venv/bin/python scripts/bench_zeropp3.py [--steps 4] [--hidden 128]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

VARIANTS = [("zero3", False, False), ("zeropp", False, False), ("hier3", False, False),
            ("zeropp", True, True), ("hier3", True, True)]


def worker(rank, world, steps, hidden, out):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from effrun.techniques.zeropp3.comm import LevelComm
    from effrun.techniques.zeropp3.engine import PartitionedEngine
    from effrun.techniques.zeropp3.hierarchy import LEVELS, Hierarchy

    torch.set_num_threads(1)
    h = Hierarchy(2, 2, 2)
    comm = LevelComm(h, rank)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)

    def lossf(m, x, y):
        return F.cross_entropy(m(input_ids=x, use_cache=False).logits.reshape(-1, 256), y.reshape(-1))

    rows = []
    for scheme, qw, qg in VARIANTS:
        torch.manual_seed(0)
        eng = PartitionedEngine(LlamaForCausalLM(cfg), h, rank, scheme=scheme, quantized_weights=qw,
                                quantized_gradients=qg, lr=1e-3, max_grad_norm=1.0, comm=comm)
        times, losses = [], []
        for step in range(steps):
            g = torch.Generator().manual_seed(step * 100 + rank)
            ids = torch.randint(0, 64, (2, 65), generator=g)
            comm.reset()
            torch.distributed.barrier()
            t0 = time.perf_counter()
            losses.append(eng.train_step([(ids[:, :-1], ids[:, 1:])], lossf))
            torch.distributed.barrier()
            times.append(time.perf_counter() - t0)
        sent = torch.tensor([comm.sent[lv] for lv in LEVELS], dtype=torch.float64)
        torch.distributed.all_reduce(sent)
        rows.append(dict(variant=f"{scheme}{'+qwZ+qgZ' if qw else ''}", step_s=statistics.median(times[1:]),
                         loss_first=losses[0], loss_last=losses[-1], M=eng.N * 4,
                         bytes=dict(zip(LEVELS, sent.tolist())), state=eng.state_bytes()))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    a = ap.parse_args()
    from effrun.launch import spawn

    out = os.path.join(tempfile.mkdtemp(), "bench.json")
    t0 = time.time()
    spawn(worker, 8, "gloo", args=(a.steps, a.hidden, out))
    rows = json.load(open(out))
    base = rows[0]
    print(f"# 8 gloo ranks as 2x2x2, tiny Llama d={a.hidden}, M = {base['M']} fp32 bytes, "
          f"{a.steps} steps (wall {time.time() - t0:.0f} s incl. start)")
    print("| variant | sub-device B/iter | device B/iter | node B/iter | cross-node per node / M | "
          "vs ZeRO-3 | state/rank (primary+opt+secondary) | step s (CPU loopback) | loss first->last |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, st = r["bytes"], r["state"]
        per_node = b["node"] / 2 / r["M"]
        print(f"| {r['variant']} | {b['subdevice']:.0f} | {b['device']:.0f} | {b['node']:.0f} | {per_node:.3f} | "
              f"{b['node'] / base['bytes']['node']:.3f} | {st['primary'] + st['optimizer'] + st['secondary']} "
              f"| {r['step_s']:.3f} | {r['loss_first']:.3f}->{r['loss_last']:.3f} |")
    from omegaconf import OmegaConf

    from effrun.config.paths import config_dir
    from effrun.costmodel import levels_from_hardware
    from effrun.techniques.zeropp3.costmodel import project_zero, ratio

    P, Pn = 20_256_509_952, 19_934_859_264  # gpt-20b (configs/model/gpt-20b.yaml), counted on the meta device
    for hw in ("mi250x-gcd", "h100-sxm"):
        cfg = OmegaConf.load(config_dir() / "hardware" / f"{hw}.yaml")
        rows = project_zero(P, Pn, 44, 6144, levels_from_hardware(cfg), cfg.peak_tflops.bfloat16, [8, 16, 384],
                            2, 2048, 0.45)
        r384 = {r["scheme"]: r for r in rows if r["devices"] == 384}
        print(f"projected {hw} 20B GPT @384: TFLOPS/device " +
              ", ".join(f"{s} {r['tflops_per_device']:.1f}" for s, r in r384.items()) +
              f"; hier3/zeropp {ratio(rows, 'hier3', 'zeropp', 384):.2f}x, zeropp/zero3 "
              f"{ratio(rows, 'zeropp', 'zero3', 384):.2f}x; scaling eff. 8->384 hier3 "
              f"{r384['hier3']['scaling_efficiency']:.3f}, 16->384 {r384['hier3']['scaling_efficiency_multinode']:.3f}")


if __name__ == "__main__":
    main()
