"""Projected expert-parallel step latency (alpha-beta), from a trace, a placement and a hardware
target. Every number here is *projected*: it names the hardware and model shape it is for.

Per MoE layer and device (one step moving ``tokens_per_device`` tokens through the layer):
  dense   = tokens x 2 x dense_params_per_layer / (peak x mfu)
  experts = tokens x k x load_max_over_mean x 2 x params_per_expert / (peak x mfu)
  a2a     = sum over link levels used of (latency + bytes_sent_on_level / bandwidth), per call
with bytes = rows x hidden x bytes_per_value, rows from the trace: (token, slot) pairs whose expert
device differs from the token's current device, split by the level they cross (intra / inter node).
Standard EP: dispatch + combine, token homes = data-parallel owners (uniform over devices).
Context-coherent (ExFlow): dispatch from the previous top-1 expert's device; with top-k > 1 a
second, smaller all-to-all returns the non-top-1 partial outputs to the top-1 device.
No compute/communication overlap. Uses effrun.costmodel for the link levels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from effrun.costmodel import levels_from_hardware


@dataclass
class ModelShape:
    name: str
    hidden: int
    ffn: int
    layers: int
    experts: int
    top_k: int
    heads: int
    kv_heads: int

    @classmethod
    def from_hf(cls, name: str, hf: dict) -> "ModelShape":
        return cls(name, int(hf["hidden_size"]), int(hf.get("moe_intermediate_size") or hf["intermediate_size"]),
                   int(hf["num_hidden_layers"]), int(hf.get("num_local_experts") or hf.get("num_experts")),
                   int(hf["num_experts_per_tok"]), int(hf["num_attention_heads"]),
                   int(hf.get("num_key_value_heads") or hf["num_attention_heads"]))

    @property
    def dense_params_per_layer(self) -> float:
        hd = self.hidden // self.heads
        return self.hidden * hd * (2 * self.heads + 2 * self.kv_heads)

    @property
    def expert_params(self) -> float:
        return 3.0 * self.hidden * self.ffn


def traffic_fractions(experts: np.ndarray, placement: np.ndarray, devices: int, per_node: int,
                      scheme: str, seed: int = 0) -> Dict[str, np.ndarray]:
    """Per layer, fraction of (token, slot) rows each all-to-all sends intra-node and inter-node."""
    T, L, k = experts.shape
    rng = np.random.default_rng(seed)
    owner = rng.integers(0, devices, size=T)
    node = lambda d: d // per_node
    out = {"dispatch_intra": np.zeros(L), "dispatch_inter": np.zeros(L),
           "combine_intra": np.zeros(L), "combine_inter": np.zeros(L)}
    home = owner
    for l in range(L):
        dev = placement[l][experts[:, l, :]]                     # [T, k]
        src = owner if (scheme == "standard" or l == 0) else home
        remote = dev != src[:, None]
        inter = remote & (node(dev) != node(src)[:, None])
        out["dispatch_intra"][l] = (remote & ~inter).sum() / (T * k)
        out["dispatch_inter"][l] = inter.sum() / (T * k)
        if scheme == "standard":
            out["combine_intra"][l], out["combine_inter"][l] = out["dispatch_intra"][l], out["dispatch_inter"][l]
        else:
            prim = dev[:, :1]
            rem2 = (dev[:, 1:] != prim)
            int2 = rem2 & (node(dev[:, 1:]) != node(prim))
            out["combine_intra"][l] = (rem2 & ~int2).sum() / (T * k)
            out["combine_inter"][l] = int2.sum() / (T * k)
            home = dev[:, 0]
    return out


def project_step(shape: ModelShape, hw, devices: int, per_node: int, fractions: Dict[str, np.ndarray],
                 load_ratio: float, scheme: str, tokens_per_device: int = 512, mfu: float = 0.4,
                 bytes_per_value: int = 2) -> Dict[str, float]:
    """Seconds per step through all MoE layers (fractions per trace layer are averaged and applied
    to every layer of ``shape``)."""
    levels = levels_from_hardware(hw)
    intra, inter = levels[0], levels[-1]
    peak = float((hw.get("peak_tflops") or {}).get("bfloat16") or 0.0) * 1e12 * mfu
    b = tokens_per_device
    dense = b * 2 * shape.dense_params_per_layer / peak
    expert = b * shape.top_k * load_ratio * 2 * shape.expert_params / peak
    row = shape.hidden * bytes_per_value
    comm, calls = 0.0, 0
    for kind in ("dispatch", "combine"):
        fi = float(np.mean(fractions[f"{kind}_intra"]))
        fe = float(np.mean(fractions[f"{kind}_inter"]))
        if kind == "combine" and scheme != "standard" and fi + fe == 0:
            continue
        calls += 1
        t = 0.0
        if fi > 0:
            t += intra.latency_us * 1e-6 + b * shape.top_k * fi * row / (intra.bandwidth_GBps * 1e9)
        if fe > 0:
            t += inter.latency_us * 1e-6 + b * shape.top_k * fe * row / (inter.bandwidth_GBps * 1e9)
        comm += t
    per_layer = dense + expert + comm
    return {"step_s": per_layer * shape.layers, "comm_s": comm * shape.layers, "compute_s": (dense + expert) * shape.layers,
            "alltoall_calls_per_layer": calls}
