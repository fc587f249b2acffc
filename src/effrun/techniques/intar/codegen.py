"""HLS C++ for a scheduled design: the units' instruction lists, their per-stage operand routing,
FIFOs as hls::stream, scratchpads and HBM as arrays, and a top that runs the stages.

Layout of the generated file:
  * HBM arrays (graph inputs, weights, graph outputs, spilled tensors), on-chip scratchpad arrays
    (tensors passed in sequential mode), one hls::stream per (producer part, consumer part) of
    every dataflow edge;
  * the lookup tables (shared with the numpy reference);
  * per unit (core0.., sfu_<op><k>) a `static const ConfigInst INST_<unit>[]` and a function whose
    `switch (inst.stage)` selects the operand sources / sinks of that stage and runs the datapath
    (intar_rt.h) with the instruction's loop bounds;
  * main(): loads HBM images, runs stage by stage every unit's instruction of that stage (producers
    before consumers, as a dataflow region runs in C simulation), checks that every FIFO is drained
    at the end of each stage, writes the outputs.
"""
from __future__ import annotations

import json
import re
from typing import Dict, List, Tuple

from .instructions import emit, operand_place, unit_parts
from .model import Model, Schedule
from .refs import task_luts


def _id(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


class _Gen:
    def __init__(self, m: Model, s: Schedule):
        self.m, self.s, self.g = m, s, m.g
        self.parts = unit_parts(m, s)
        self.insts = emit(m, s)
        self.fifos: List[Tuple[str, str]] = []          # (c name, label)
        self.fifo_of: Dict[Tuple, str] = {}             # (edge, producer part, consumer part) -> name
        for e in m.edges:
            if not s.dataflow.get(e, False):
                continue
            p, c, i = e
            for pi, (pu, _, _) in enumerate(self.parts[p]):
                for ci, (cu, _, _) in enumerate(self.parts[c]):
                    name = f"f{len(self.fifos)}"
                    self.fifos.append((name, f"{p}.{pu}->{c}[{i}].{cu}"))
                    self.fifo_of[(e, pi, ci)] = name
        acts = [t for t in self.g.tensors.values() if t.kind != "weight"]
        self.abits = max(t.bits for t in acts)
        ws = [t.bits for t in self.g.tensors.values() if t.kind == "weight"]
        self.wbits = max(ws) if ws else self.abits
        self.maxrow = max(t.cols for t in self.g.tensors.values())

    # -- storage --------------------------------------------------------------------------------
    def buffer(self, x: str) -> str:
        """The array a tensor lives in when it is not streamed (input/weight/spill: HBM)."""
        ts = self.g.tensors[x]
        if ts.kind in ("input", "weight"):
            return f"hbm_{_id(x)}"
        return f"{'spill' if self.s.spill.get(x, False) else 'spad'}_{_id(x)}"

    def needs_buffer(self, x: str) -> bool:
        p = self.g.producer(x)
        if p is None:
            return True
        return any(not self.s.dataflow.get((p.name, c.name, i), False) for c, i in self.g.consumers(x))

    def decls(self) -> List[str]:
        out = ["// ---- HBM images, scratchpads ----"]
        for x, ts in self.g.tensors.items():
            ty = "wgt_t" if ts.kind == "weight" else "act_t"
            if ts.kind in ("input", "weight") or self.needs_buffer(x):
                where = "on-chip scratchpad" if self.buffer(x).startswith("spad") else "HBM"
                out.append(f"static {ty} {self.buffer(x)}[{ts.elems}];  // {x} {tuple(ts.shape)} {ts.dtype}, {where}")
            if x in self.g.outputs:
                out.append(f"static act_t out_{_id(x)}[{ts.elems}];  // graph output {x}, HBM")
        out.append("// ---- FIFOs (dataflow edges), one per producer part x consumer part ----")
        for name, label in self.fifos:
            out.append(f'static hls::stream<act_t> {name}("{label}");')
        out.append(f"static hls::stream<act_t>* const FIFOS[] = {{{', '.join('&' + n for n, _ in self.fifos) or 'nullptr'}}};")
        out.append(f"static const char* const FIFO_NAMES[] = {{{', '.join(json.dumps(lb) for _, lb in self.fifos) or 'nullptr'}}};")
        out.append(f"static const int N_FIFOS = {len(self.fifos)};")
        out.append("// ---- lookup tables (same integers as refs.py) ----")
        for t in self.g.tasks:
            for k, v in task_luts(self.g, t).items():
                out.append(f"static const int LUT_{_id(t.name)}_{k}[{len(v)}] = {{{', '.join(str(int(a)) for a in v)}}};")
        return out

    # -- one (task part) case -------------------------------------------------------------------
    def src(self, t: str, slot: int, ci: int, var: str) -> List[str]:
        x = self.m.t[t].inputs[slot]
        place = operand_place(self.m, self.s, t, slot)
        cols = self.g.tensors[x].cols
        if place != "fifo":
            return [f'auto {var} = Src<act_t>::array({self.buffer(x)}, {cols}, "{x}");']
        p = self.g.producer(x).name
        lines = [f"Src<act_t> {var}; {var}.name = \"{x}\";"]
        for pi, (_, lo, hi) in enumerate(self.parts[p]):
            lines.append(f"{var}.part(&{self.fifo_of[((p, t, slot), pi, ci)]}, {lo}, {hi});")
        return lines

    def dst(self, t: str, pi: int) -> List[str]:
        x = self.m.out[t]
        lines = [f"Dst<act_t> d; d.ld = {self.g.tensors[x].cols};"]
        if self.needs_buffer(x):
            lines.append(f"d.buf = {self.buffer(x)};")
        if x in self.g.outputs:
            lines.append(f"d.buf2 = out_{_id(x)};")
        for c, i in self.g.consumers(x):
            e = (t, c.name, i)
            if self.s.dataflow.get(e, False):
                for ci in range(len(self.parts[c.name])):
                    lines.append(f"d.fifo(&{self.fifo_of[(e, pi, ci)]});")
        return lines

    def body(self, t: str, pi: int) -> List[str]:
        task, g = self.m.t[t], self.g
        a = task.attrs
        op = task.op
        L = self.dst(t, pi)
        if op == "matmul":
            A, B = task.inputs
            G = int(a.get("groups", 1))
            kg = g.tensors[A].cols // G
            ng = g.tensors[task.output].cols // G
            L += self.src(t, 0, pi, "s0")
            L.append(f"const MatmulCfg c = {{{G}, {kg}, {ng}, {g.tensors[B].cols}, {str(bool(a.get('trans_b'))).lower()}, "
                     f"{str(bool(a.get('causal'))).lower()}, {str(bool(a.get('relu'))).lower()}, {int(a.get('shift', 0))}}};")
            fn = "matmul_rows" if self.s.rowstream.get(t, True) else "matmul_cols"
            L.append(f"{fn}(in, s0, {self.buffer(B)}, c, d);")
        elif op in ("conv2d", "conv_transpose2d"):
            X, W = task.inputs
            h, w, cin = g.tensors[X].shape
            k, _, _, cout = g.tensors[W].shape
            pad = k // 2 if (op == "conv2d" and a.get("pad", "same") == "same") else 0
            L += self.src(t, 0, pi, "s0")
            L.append(f"const ConvCfg c = {{{h}, {w}, {cin}, {k}, {cout}, {pad}, {int(a.get('shift', 0))}, "
                     f"{str(bool(a.get('relu'))).lower()}}};")
            L.append(f"{op}(in, s0, {self.buffer(W)}, c, d);")
        else:
            for i in range(len(task.inputs)):
                L += self.src(t, i, pi, f"s{i}")
            lut = f"LUT_{_id(t)}"
            if op == "relu":
                L.append("sfu_map(in, s0, MAP_RELU, nullptr, 0, d);")
            elif op in ("gelu", "silu"):
                L.append(f"sfu_map(in, s0, MAP_LUT, {lut}_{op}, {int(a.get('shift', 0))}, d);")
            elif op in ("add", "mul"):
                L.append(f"sfu_binary(in, s0, s1, BIN_{op.upper()}, {int(a.get('shift', 0))}, d);")
            elif op == "reparam":
                L.append(f"sfu_reparam(in, s0, s1, s2, {lut}_expv, {int(a.get('lv_shift', 0))}, {int(a.get('shift', 0))}, d);")
            elif op == "softmax":
                L.append(f"sfu_softmax(in, s0, {lut}_exp, {int(a.get('shift', 0))}, {int(a.get('q', self.abits - 2))}, d);")
            elif op == "layernorm":
                L.append(f"sfu_layernorm(in, s0, {int(a.get('q', 4))}, d);")
            elif op in ("upsample2", "maxpool2"):
                _, w, c = g.tensors[task.inputs[0]].shape
                L.append(f"sfu_{op}(in, s0, {w}, {c}, d);")
            else:
                raise ValueError(f"no codegen for op {op!r}")
        return L

    # -- whole file -----------------------------------------------------------------------------
    def source(self) -> str:
        g, s = self.g, self.s
        units: Dict[str, List[dict]] = {}
        for ins in self.insts:
            units.setdefault(ins["unit"], []).append(ins)
        names = sorted(units, key=lambda u: (not u.startswith("core"), u))
        uid = {u: i for i, u in enumerate(names)}
        out = [f"// Generated by effrun.techniques.intar.codegen: kernel {g.name}, design {s.design}, "
               f"{s.cores} core(s), {s.n_stages} stage(s), {len(self.insts)} instructions.",
               "// C simulation with the Xilinx ap_int / hls_stream headers; compare with refs.py.",
               f"#define INTAR_MAXROW {self.maxrow}", '#include "intar_rt.h"', "using namespace intar;",
               f"typedef ap_int<{self.abits}> act_t;", f"typedef ap_int<{self.wbits}> wgt_t;", ""]
        out += self.decls()
        out.append("")
        for u in names:
            rows = ", ".join(f"{{{i['stage']}, {i['i_bound']}, {i['j_lo']}, {i['j_hi']}, {i['k_bound']}}}" for i in units[u])
            out.append(f"static const ConfigInst INST_{u}[] = {{{rows}}};  // stage, i_bound, j_lo, j_hi, k_bound")
        out.append("")
        for u in names:
            out.append(f"static void {u}(const ConfigInst& in) {{")
            out.append("    switch (in.stage) {")
            for ins in units[u]:
                t = ins["task"]
                pi = [p[0] for p in self.parts[t]].index(u)
                src = ",".join(ins["src"])
                out.append(f"    case {ins['stage']}: {{  // {t} ({ins['op']}{', ' + ins['mode'] if ins['mode'] else ''}): "
                           f"in <- {src}; out -> {','.join(ins['dst'])}")
                out += ["        " + ln for ln in self.body(t, pi)]
                out.append("    } break;")
            out.append(f'    default: fail("no configuration for this stage", "{u}");')
            out.append("    }")
            out.append("}")
        out.append("")
        prog = []
        idx: Dict[str, int] = {}
        for ins in self.insts:
            u = ins["unit"]
            prog.append((ins["stage"], uid[u], idx.get(u, 0)))
            idx[u] = idx.get(u, 0) + 1
        out.append(f"static const int PROGRAM[][3] = {{{', '.join('{%d, %d, %d}' % p for p in prog)}}};  // stage, unit, instruction")
        out.append(f"static const int N_STEPS = {len(prog)};")
        out.append("static void dispatch(int unit, int k) {")
        out.append("    switch (unit) {")
        for u in names:
            out.append(f"    case {uid[u]}: {u}(INST_{u}[k]); break;")
        out.append('    default: fail("bad unit", "dispatch");')
        out.append("    }")
        out.append("}")
        out.append("")
        out.append("int main(int argc, char** argv) {")
        out.append('    if (argc < 2) { std::fprintf(stderr, "usage: %s DATA_DIR\\n", argv[0]); return 2; }')
        out.append("    const char* dir = argv[1];")
        for x, ts in g.tensors.items():
            if ts.kind in ("input", "weight"):
                nb = 2 if ts.bits > 8 else 1
                out.append(f'    load(dir, "{x}", {self.buffer(x)}, {ts.elems}, {nb});')
        out.append("    for (int i = 0; i < N_STEPS; ++i) {")
        out.append("        dispatch(PROGRAM[i][1], PROGRAM[i][2]);")
        out.append("        if (i + 1 == N_STEPS || PROGRAM[i + 1][0] != PROGRAM[i][0])")
        out.append("            for (int f = 0; f < N_FIFOS; ++f)")
        out.append('                if (!FIFOS[f]->empty()) fail("FIFO not drained at the end of its stage", FIFO_NAMES[f]);')
        out.append("    }")
        for x in g.outputs:
            out.append(f'    save(dir, "{x}", out_{_id(x)}, {g.tensors[x].elems});')
        out.append(f'    std::printf("INTAR_CSIM_OK stages={s.n_stages} instructions={len(self.insts)} fifos={len(self.fifos)}\\n");')
        out.append("    return 0;")
        out.append("}")
        return "\n".join(out) + "\n"


def generate(m: Model, s: Schedule) -> str:
    return _Gen(m, s).source()
