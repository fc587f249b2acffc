"""The static instruction list that drives reconfiguration.

One instruction per (stage, unit): a compute core running (its part of) a task, or a special-
function unit. Like the artifact's ConfigInst{stage, i_bound, j_bound, k_bound} it carries the
stage (which selects the operand sources and sinks of the unit's datapath) and the loop bounds;
a task split over n cores gives n instructions, each with its own output-column range (split at
head / pixel boundaries). Where each operand comes from (fifo / scratchpad / hbm) and where the
result goes is recorded beside it for the reader; the hardware has it wired per stage.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from .graph import OPS
from .model import Model, Schedule


def split_cols(cols: int, atom: int, n: int) -> List[Tuple[int, int]]:
    """n contiguous column ranges, each a whole number of atoms (heads, pixels), as even as can be."""
    atoms = cols // atom
    base, extra = divmod(atoms, n)
    out, lo = [], 0
    for i in range(n):
        k = base + (1 if i < extra else 0)
        out.append((lo * atom, (lo + k) * atom))
        lo += k
    return out


def k_bound(m: Model, t: str) -> int:
    g, task = m.g, m.t[t]
    if task.op == "matmul":
        return g.tensors[task.inputs[0]].cols // int(task.attrs.get("groups", 1))
    if task.op in ("conv2d", "conv_transpose2d"):
        w = g.tensors[task.inputs[1]].shape
        return w[0] * w[1] * w[2]
    if task.op == "softmax":
        return g.tensors[task.output].cols // int(task.attrs.get("groups", 1))
    return g.tensors[task.output].cols


def operand_place(m: Model, s: Schedule, t: str, slot: int) -> str:
    x = m.t[t].inputs[slot]
    kind = m.g.tensors[x].kind
    if kind in ("input", "weight"):
        return "hbm"
    p = m.g.producer(x).name
    if s.dataflow.get((p, t, slot), False):
        return "fifo"
    return "hbm" if s.spill.get(x, False) else "spad"


def result_places(m: Model, s: Schedule, t: str) -> List[str]:
    x = m.out[t]
    out = []
    cons = m.g.consumers(x)
    if any(s.dataflow.get((t, c.name, i), False) for c, i in cons):
        out.append("fifo")
    if any(not s.dataflow.get((t, c.name, i), False) for c, i in cons):
        out.append("hbm" if s.spill.get(x, False) else "spad")
    if x in m.g.outputs:
        out.append("hbm")
    return out


def unit_parts(m: Model, s: Schedule) -> Dict[str, List[Tuple[str, int, int]]]:
    """task -> [(unit, j_lo, j_hi)]: cores handed out in task order within each stage; special-
    function units per op kind, numbered within a stage."""
    parts: Dict[str, List[Tuple[str, int, int]]] = {}
    for st in sorted(set(s.stage.values())):
        nxt, kinds = 0, {}
        for t in m.tasks:
            if s.stage[t] != st:
                continue
            cols = m.g.tensors[m.out[t]].cols
            if t in m.core:
                n = s.ncores[t]
                op = OPS[m.t[t].op]
                atom = op.atom(m.g.tensors[m.out[t]].shape, m.t[t].attrs)
                parts[t] = [(f"core{nxt + i}", lo, hi) for i, (lo, hi) in enumerate(split_cols(cols, atom, n))]
                nxt += n
            else:
                op = m.t[t].op
                k = kinds.get(op, 0)
                kinds[op] = k + 1
                parts[t] = [(f"sfu_{op}{k}", 0, cols)]
    return parts


def emit(m: Model, s: Schedule) -> List[dict]:
    parts = unit_parts(m, s)
    out = []
    for st in sorted(set(s.stage.values())):
        for t in m.tasks:
            if s.stage[t] != st:
                continue
            task = m.t[t]
            for unit, lo, hi in parts[t]:
                out.append({"stage": st, "unit": unit, "task": t, "op": task.op,
                            "i_bound": m.rows[t], "j_lo": lo, "j_hi": hi, "k_bound": k_bound(m, t),
                            "mode": ("row-stream" if s.rowstream.get(t, True) else "weight-stream")
                            if task.op == "matmul" else None,
                            "src": [operand_place(m, s, t, i) for i in range(len(task.inputs))],
                            "dst": result_places(m, s, t)})
    return out


def per_unit(insts: List[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for i in insts:
        out.setdefault(i["unit"], []).append(i)
    return out
