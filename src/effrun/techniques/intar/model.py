"""Cycle and resource model shared by InTAR, pure dataflow and pure sequential designs.

A design is a *schedule* on the same hardware budget (target.Budget): an ordered list of stages;
in each stage some tasks run, each compute task on `n` of the design's `C` equal cores (a core
has P/C MAC lanes, 1/C of the on-chip stream ports and 1/C of the HBM ports); special-function
tasks (softmax, LayerNorm, GELU, ...) run on their own stream units. Each edge is either
*dataflow* (a FIFO between two units of the same stage: the producer must emit rows in order and
the consumer must read that operand as a row stream) or *sequential* (the tensor lands in an
on-chip scratchpad - or, if spilled, in HBM - and the consumer starts after the producer finished,
in the same or a later stage).

The three designs are schedules of this one model:
  InTAR       C in the searched core counts, any number of stages, both edge modes.
  dataflow    one stage, every task its own module with lanes in 1/G steps (C = G), both edge
              modes (a non-streamable edge is a buffer the consumer waits on).
  sequential  one engine (C = 1), one task per stage, every edge through memory.
so InTAR's search space contains both baselines and, solved exactly, InTAR <= min(both).

Time of a compute task on n of C cores (cycles, integer):
  T = max(ceil(MACs C / (n P)), ceil(E C / (n W_s)), ceil(HBM C / (n B)))
with E the elements it streams in or out, HBM the bytes of weights / graph inputs / graph outputs
it moves. A special-function task: T = max(ceil(E / w_sfu), ceil(HBM / B)). Row time r = ceil(T /
rows). Inside a stage (times relative to the stage start): start_c >= start_p + lag r_p and
finish_c >= finish_p + tail r_c on a FIFO edge (lag/tail from the op's row window), start_c >=
finish_p on a same-stage memory edge, finish >= start + T. A stage lasts max(finish,
ceil(stage HBM bytes / B), ceil(spilled bytes / B_spill)) + the stage overhead. Memory of a stage: the scratchpad tensors alive
across it (produced at or before, read at or after, not spilled) plus the buffers its tasks need
(a weight-matmul that streams A keeps W on chip; one that streams W keeps A; a spilled resident
operand is reloaded). It must fit the on-chip budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from effrun.errors import UserError

from .graph import OPS, TaskGraph
from .target import BRAM36_BYTES, URAM_BYTES, Budget

Edge = Tuple[str, str, int]   # (producer task, consumer task, consumer input slot)
SFU_DSP_OPS = ("softmax", "layernorm", "mul", "reparam")
FIFO_DEPTH_ROWS = 2


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Schedule:
    design: str                                  # intar | dataflow | sequential | sequential_spill
    cores: int                                   # C
    stage: Dict[str, int]                        # task -> stage index
    ncores: Dict[str, int]                       # compute task -> cores it is split over
    dataflow: Dict[Edge, bool]                   # edge -> FIFO (True) or memory (False)
    rowstream: Dict[str, bool]                   # weight-matmul -> W on chip, A streamed
    spill: Dict[str, bool]                       # intermediate tensor -> kept in HBM
    status: str = "given"                        # optimal | feasible | given
    objective: Optional[int] = None
    bound: Optional[int] = None
    solve_s: float = 0.0

    def compact(self) -> "Schedule":
        """Renumber stages 0..k-1 (empty stages dropped)."""
        used = sorted(set(self.stage.values()))
        remap = {s: i for i, s in enumerate(used)}
        self.stage = {t: remap[s] for t, s in self.stage.items()}
        return self

    @property
    def n_stages(self) -> int:
        return len(set(self.stage.values()))

    def to_dict(self) -> dict:
        return {"design": self.design, "cores": self.cores, "status": self.status, "objective": self.objective,
                "bound": self.bound, "solve_s": round(self.solve_s, 3), "stage": dict(self.stage),
                "ncores": dict(self.ncores), "rowstream": dict(self.rowstream),
                "spill": {k: v for k, v in self.spill.items() if v},
                "dataflow_edges": [f"{p}->{c}[{i}]" for (p, c, i), d in self.dataflow.items() if d]}


@dataclass
class Evaluation:
    cycles: int
    stages: List[dict]
    tasks: Dict[str, dict]
    peak_onchip_bytes: int
    hbm_bytes: int
    valid: bool = True
    problems: List[str] = field(default_factory=list)


class Model:
    """Per-task constants of one graph on one budget, and the evaluator."""

    def __init__(self, g: TaskGraph, b: Budget):
        self.g, self.b = g, b
        self.tasks = [t.name for t in g.tasks]
        self.core = {t.name for t in g.tasks if OPS[t.op].unit == "core"}
        self.edges: List[Edge] = [(p.name, c.name, i) for p, c, i in g.edges()]
        self.t = {t.name: t for t in g.tasks}
        self.macs = {t.name: g.macs(t) for t in g.tasks}
        self.rows = {t.name: g.tensors[t.output].rows for t in g.tasks}
        self.out = {t.name: t.output for t in g.tasks}
        self.size = {n: ts.nbytes for n, ts in g.tensors.items()}
        self.wmm = {t.name for t in g.tasks if g.weight_matmul(t)}
        # elements a task streams (its row-streamed inputs, its output)
        self.elems = {}
        self.hbm = {}
        self.fixed_buf = {}
        for t in g.tasks:
            roles = [g.role(t, i) for i in range(len(t.inputs))]
            ins = [g.tensors[x].elems for x, r in zip(t.inputs, roles) if r == "stream"]
            self.elems[t.name] = max([g.tensors[t.output].elems] + ins)
            hb = sum(g.tensors[x].nbytes for x in t.inputs if g.tensors[x].kind in ("input", "weight"))
            if t.output in g.outputs:
                hb += g.tensors[t.output].nbytes
            self.hbm[t.name] = hb
            self.fixed_buf[t.name] = self._fixed_buf(t)
        self.lagtail = {(p, c, i): g.lag_tail(self.t[c], i) for p, c, i in self.edges}
        self.intermediates = [t.output for t in g.tasks if g.consumers(t.output)]

    # -- constants --------------------------------------------------------------------------------
    def _fixed_buf(self, t) -> int:
        g = self.g
        x = g.tensors[t.inputs[0]]
        row = x.cols * x.bits // 8
        if t.op in ("conv2d", "conv_transpose2d"):
            k = g.tensors[t.inputs[1]].shape[0]
            return g.tensors[t.inputs[1]].nbytes + k * row
        if t.op == "maxpool2":
            return 2 * row
        return row  # one row of the streamed operand

    def streamable(self, e: Edge) -> bool:
        """Static part of FIFO legality: the consumer reads this operand as a row stream. (A
        weight-matmul producer must also run in row-stream mode; a weight-matmul consumer too.)"""
        p, c, i = e
        return self.g.role(self.t[c], i) == "stream"

    def T(self, t: str, n: int = 1, C: int = 1) -> int:
        b = self.b
        if t not in self.core:
            return max(cdiv(self.elems[t], b.sfu_elems), cdiv(self.hbm[t], b.hbm_bytes_per_cycle), 1)
        return max(cdiv(self.macs[t] * C, n * b.lanes), cdiv(self.elems[t] * C, n * b.stream_elems),
                   cdiv(self.hbm[t] * C, n * b.hbm_bytes_per_cycle), 1)

    def r(self, t: str, n: int = 1, C: int = 1) -> int:
        return cdiv(self.T(t, n, C), self.rows[t])

    def dyn_buf(self, s: Schedule, t: str) -> int:
        """Buffers a task needs in its stage beyond the scratchpad tensors (see module doc)."""
        g, task = self.g, self.t[t]
        if t in self.wmm:
            if s.rowstream.get(t, False):
                return self.size[task.inputs[1]]
            a = task.inputs[0]
            return self.size[a] if (g.tensors[a].kind == "input" or s.spill.get(a, False)) else 0
        if task.op == "matmul":  # resident activation operand B
            bt = task.inputs[1]
            return self.size[bt] if (g.tensors[bt].kind == "input" or s.spill.get(bt, False)) else 0
        return 0

    def min_task_bytes(self, t: str) -> int:
        """On-chip bytes a task needs even when everything else is spilled to HBM."""
        task = self.t[t]
        if t in self.wmm:
            return self.fixed_buf[t] + min(self.size[task.inputs[0]], self.size[task.inputs[1]])
        if task.op == "matmul":
            return self.fixed_buf[t] + self.size[task.inputs[1]]
        return self.fixed_buf[t]

    def check_fits(self, key: str = "technique.kernel") -> None:
        """Refuse a kernel that cannot run on the target even sequentially with every intermediate
        spilled to HBM."""
        b = self.b
        for t in self.tasks:
            need = self.min_task_bytes(t)
            if need > b.onchip_bytes:
                raise UserError(f"kernel {self.g.name!r} cannot fit {b.target.name} even sequentially: task "
                                f"{t!r} needs {need / 2**20:.1f} MiB on chip, the budget is "
                                f"{b.onchip_bytes / 2**20:.1f} MiB (onchip_fraction of BRAM+URAM)", key=key)
        hbm = sum(ts.nbytes for ts in self.g.tensors.values())
        if hbm > b.target.hbm_gb * 2**30:
            raise UserError(f"kernel {self.g.name!r} cannot fit {b.target.name} even sequentially: its tensors "
                            f"take {hbm / 2**30:.1f} GiB, HBM holds {b.target.hbm_gb:g} GiB", key=key)

    # -- evaluator --------------------------------------------------------------------------------
    def check(self, s: Schedule) -> List[str]:
        probs = []
        C = s.cores
        stages = sorted(set(s.stage.values()))
        for t in self.tasks:
            if t not in s.stage:
                probs.append(f"task {t} has no stage")
            if t in self.core and not 1 <= s.ncores.get(t, 0) <= C:
                probs.append(f"task {t} on {s.ncores.get(t)} of {C} cores")
        for st in stages:
            ts = [t for t in self.tasks if s.stage[t] == st]
            used = sum(s.ncores[t] for t in ts if t in self.core)
            if used > C:
                probs.append(f"stage {st} uses {used} > {C} cores")
            if s.design.startswith("sequential") and len(ts) > 1:
                probs.append(f"sequential stage {st} runs {ts}")
        for e in self.edges:
            p, c, i = e
            if s.stage[c] < s.stage[p]:
                probs.append(f"edge {p}->{c} goes back in time")
            if s.dataflow.get(e, False):
                if s.stage[c] != s.stage[p]:
                    probs.append(f"FIFO edge {p}->{c} crosses stages")
                if not self.streamable(e):
                    probs.append(f"FIFO edge {p}->{c}: {c} needs input {i} resident")
                if p in self.wmm and not s.rowstream.get(p, False):
                    probs.append(f"FIFO edge {p}->{c}: {p} streams W, its rows come out of order")
                if c in self.wmm and i == 0 and not s.rowstream.get(c, False):
                    probs.append(f"FIFO edge {p}->{c}: {c} keeps A resident")
        return probs

    def live_bytes(self, s: Schedule, st: int) -> int:
        total = 0
        for x in self.intermediates:
            if s.spill.get(x, False):
                continue
            p = self.g.producer(x).name
            seq = [s.stage[c.name] for c, i in self.g.consumers(x) if not s.dataflow.get((p, c.name, i), False)]
            if seq and s.stage[p] <= st <= max(seq):
                total += self.size[x]
        return total

    def stage_bytes(self, s: Schedule, st: int) -> int:
        ts = [t for t in self.tasks if s.stage[t] == st]
        return self.live_bytes(s, st) + sum(self.fixed_buf[t] + self.dyn_buf(s, t) for t in ts)

    def spill_bytes(self, s: Schedule, st: int) -> int:
        total = 0
        for x in self.intermediates:
            if not s.spill.get(x, False):
                continue
            p = self.g.producer(x).name
            if s.stage[p] == st:
                total += self.size[x]
            for c, i in self.g.consumers(x):
                if not s.dataflow.get((p, c.name, i), False) and s.stage[c.name] == st:
                    total += self.size[x]
        return total

    def evaluate(self, s: Schedule) -> Evaluation:
        probs = self.check(s)
        C, b = s.cores, self.b
        stages = sorted(set(s.stage.values()))
        info, tinfo, total, peak, hbm_total = [], {}, 0, 0, 0
        for st in stages:
            ts = [t for t in self.tasks if s.stage[t] == st]       # topological order
            start, fin = {}, {}
            for t in ts:
                n = s.ncores.get(t, 1)
                T, r = self.T(t, n, C), self.r(t, n, C)
                a, f = 0, 0
                for e in self.edges:
                    p, c, i = e
                    if c != t or s.stage[p] != st:
                        continue
                    lag, tail = self.lagtail[e]
                    if s.dataflow.get(e, False):
                        a = max(a, start[p] + lag * self.r(p, s.ncores.get(p, 1), C))
                        f = max(f, fin[p] + tail * r)
                    else:
                        a = max(a, fin[p])
                start[t], fin[t] = a, max(f, a + T)
                tinfo[t] = {"stage": st, "start": a, "finish": fin[t], "T": T, "cores": n if t in self.core else 0}
            sp = self.spill_bytes(s, st)
            hb = sum(self.hbm[t] for t in ts) + sp
            L = max(max(fin.values()), cdiv(hb, b.hbm_bytes_per_cycle),
                    cdiv(sp, b.spill_bytes_per_cycle or b.hbm_bytes_per_cycle))
            mem = self.stage_bytes(s, st)
            if mem > b.onchip_bytes:
                probs.append(f"stage {st} needs {mem} B on chip > budget {b.onchip_bytes}")
            peak, hbm_total = max(peak, mem), hbm_total + hb
            total += L + b.stage_overhead
            info.append({"stage": st, "tasks": ts, "cycles": L, "hbm_bytes": hb, "onchip_bytes": mem})
        return Evaluation(total, info, tinfo, peak, hbm_total, not probs, probs)

    # -- resources --------------------------------------------------------------------------------
    def resources(self, s: Schedule, ev: Optional[Evaluation] = None) -> dict:
        ev = ev or self.evaluate(s)
        b, tg = self.b, self.b.target
        per = b.lanes // s.cores
        if s.design == "dataflow":
            lanes = sum(s.ncores[t] * per for t in self.core)
        else:
            lanes = b.lanes
        sfu = [t for t in self.tasks if t not in self.core]
        units: Dict[str, int] = {}          # special-function units per op kind
        if s.design == "dataflow":         # a module per task
            for t in sfu:
                units[self.t[t].op] = units.get(self.t[t].op, 0) + 1
        else:                               # shared across stages: as many as one stage runs at once
            for st in set(s.stage.values()):
                cnt: Dict[str, int] = {}
                for t in sfu:
                    if s.stage[t] == st:
                        cnt[self.t[t].op] = cnt.get(self.t[t].op, 0) + 1
                for k, v in cnt.items():
                    units[k] = max(units.get(k, 0), v)
        sfu_dsp = sum(v * b.sfu_elems for k, v in units.items() if k in SFU_DSP_OPS)
        dsp = int(math.ceil(lanes * b.dsp_per_mac)) + sfu_dsp
        # FIFOs: one per (producer part, consumer part) of each dataflow edge, >= one BRAM36
        fifo_bram = 0
        for e, d in s.dataflow.items():
            if not d:
                continue
            p, c, i = e
            parts = s.ncores.get(p, 1) * s.ncores.get(c, 1)
            x = self.g.tensors[self.out[p]]
            per_fifo = cdiv(FIFO_DEPTH_ROWS * x.cols * x.bits // 8, parts)
            fifo_bram += parts * max(1, cdiv(per_fifo, BRAM36_BYTES))
        bulk = ev.peak_onchip_bytes
        uram = min(tg.uram, cdiv(bulk, URAM_BYTES))
        rest = max(0, bulk - uram * URAM_BYTES)
        bram = cdiv(rest, BRAM36_BYTES) + fifo_bram
        return {"lanes": lanes, "dsp": dsp, "dsp_limit": tg.dsp, "bram36": bram, "bram36_limit": tg.bram36,
                "uram": uram, "uram_limit": tg.uram, "onchip_bytes": bulk,
                "onchip_budget_bytes": b.onchip_bytes, "fifos_bram36": fifo_bram,
                "hbm_GBps": round(b.hbm_bytes_per_cycle * b.clock_hz / 1e9, 1), "hbm_ports": b.hbm_ports,
                "sfu_units": sum(units.values()),
                "fits": dsp <= tg.dsp and bram <= tg.bram36 and uram <= tg.uram and bulk <= b.onchip_bytes}
