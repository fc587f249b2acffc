"""Multi-task kernels as task graphs: tensors (shape, dtype, volume), tasks (op, inputs, output).

Every activation is a 2-D stream of rows: a matrix (M, N) streams its M rows, an image (H, W, C)
streams its H rows of W*C values. That is the unit a FIFO carries between two units of an InTAR
design and the unit the cycle model pipelines. Each op says, for each input, whether it consumes
it as a row stream ("stream": rows in order, a bounded window) or needs the whole tensor on chip
("resident": e.g. K in Q K^T) or reads it from HBM ("weight"), and, for a streamed input, how many
input rows it needs before it can emit output row b (`need`). Those facts decide which edges may be
FIFOs (dataflow mode) and how far a consumer lags its producer.

Validation (`TaskGraph.validate`) rejects, with one line naming the task and tensor: an unknown
tensor, a tensor produced twice, a cycle, an unknown op, and a shape or dtype mismatch between a
producer and its consumer.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from effrun.errors import UserError

DTYPE_BITS = {"int16": 16, "int8": 8, "int4": 4}
KINDS = ("input", "weight", "act")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: Tuple[int, ...]
    dtype: str = "int16"
    kind: str = "act"  # input (from HBM) | weight (from HBM) | act (produced by a task)

    @property
    def rows(self) -> int:
        return int(self.shape[0])

    @property
    def cols(self) -> int:
        return int(math.prod(self.shape[1:])) if len(self.shape) > 1 else 1

    @property
    def elems(self) -> int:
        return int(math.prod(self.shape))

    @property
    def bits(self) -> int:
        return DTYPE_BITS[self.dtype]

    @property
    def nbytes(self) -> int:
        return (self.elems * self.bits + 7) // 8


@dataclass(frozen=True)
class Task:
    name: str
    op: str
    inputs: Tuple[str, ...]
    output: str
    attrs: Dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


class ShapeError(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# ops: shape inference, work, operand roles, streaming windows
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpDef:
    name: str
    unit: str                      # "core" (MAC arrays) | "sfu" (special-function unit)
    arity: Tuple[int, ...]         # allowed numbers of inputs
    infer: Callable                # (shapes, attrs, kinds) -> out shape, raises ShapeError
    roles: Callable                # (attrs, kinds) -> tuple of "stream" | "resident" | "weight"
    need: Callable = None          # (b, slot, in_rows, out_rows, attrs) -> input rows needed for output row b
    macs: Callable = None          # (shapes, out_shape, attrs) -> multiply-accumulates (core ops)
    atom: Callable = None          # (out_shape, attrs) -> column granularity of a split across cores
    elementwise: bool = False      # output order = input order, row by row (SFU row ops)


def _need_same(b, slot, in_rows, out_rows, attrs):
    return min(b + 1, in_rows)


def _matmul_geom(shapes, attrs):
    (m, ka), bshape = shapes[0], shapes[1]
    g = int(attrs.get("groups", 1))
    if len(shapes[0]) != 2 or len(bshape) != 2:
        raise ShapeError(f"matmul operands must be 2-D, got {tuple(shapes[0])} and {tuple(bshape)}")
    if ka % g:
        raise ShapeError(f"A has {ka} columns, not divisible by groups={g}")
    kg = ka // g
    if attrs.get("trans_b", False):
        # B (Ng, G*Kg): group g uses B[:, g*Kg:(g+1)*Kg]^T
        if bshape[1] != ka:
            raise ShapeError(f"A {tuple(shapes[0])} x B^T {tuple(bshape)}: B has {bshape[1]} columns, A has {ka}")
        ng = bshape[0]
    else:
        # B (Kg, G*Ng)
        if bshape[0] != kg:
            raise ShapeError(f"A {tuple(shapes[0])} x B {tuple(bshape)}: reduction {kg} (per group) != B rows {bshape[0]}")
        if bshape[1] % g:
            raise ShapeError(f"B has {bshape[1]} columns, not divisible by groups={g}")
        ng = bshape[1] // g
    return m, g, kg, ng


def _matmul_infer(shapes, attrs, kinds):
    m, g, kg, ng = _matmul_geom(shapes, attrs)
    if attrs.get("causal", False) and ng != m:
        raise ShapeError(f"causal mask needs a square score block per group, got {m} x {ng}")
    return (m, g * ng)


def _matmul_macs(shapes, out, attrs):
    m, g, kg, ng = _matmul_geom(shapes, attrs)
    if attrs.get("causal", False):
        return g * kg * (m * (m + 1) // 2)   # the core skips masked (j > i) positions
    return m * g * kg * ng


def _matmul_roles(attrs, kinds):
    return ("stream", "weight" if kinds[1] == "weight" else "resident")


def _matmul_atom(out, attrs):
    g = int(attrs.get("groups", 1))
    return out[1] // g if g > 1 else 1


def _conv_check(shapes, kind):
    x, w = shapes
    if len(x) != 3 or len(w) != 4:
        raise ShapeError(f"{kind} wants X (H, W, Cin) and K (k, k, Cin, Cout), got {tuple(x)} and {tuple(w)}")
    if w[0] != w[1]:
        raise ShapeError(f"{kind} kernel must be square, got {w[0]}x{w[1]}")
    if w[2] != x[2]:
        raise ShapeError(f"{kind}: input has {x[2]} channels, kernel expects {w[2]}")
    return x, w


def _conv_infer(shapes, attrs, kinds):
    x, w = _conv_check(shapes, "conv2d")
    k = w[0]
    if attrs.get("pad", "same") == "same":
        if k % 2 == 0:
            raise ShapeError(f"'same' padding needs an odd kernel, got {k}")
        return (x[0], x[1], w[3])
    if x[0] < k or x[1] < k:
        raise ShapeError(f"valid conv of a {x[0]}x{x[1]} image with a {k}x{k} kernel")
    return (x[0] - k + 1, x[1] - k + 1, w[3])


def _conv_need(b, slot, in_rows, out_rows, attrs):
    k = attrs["k"]
    if attrs.get("pad", "same") == "same":
        return min(b + k // 2 + 1, in_rows)
    return min(b + k, in_rows)


def _conv_macs(shapes, out, attrs):
    x, w = shapes
    return out[0] * out[1] * out[2] * w[0] * w[1] * w[2]


def _convt_infer(shapes, attrs, kinds):
    x, w = _conv_check(shapes, "conv_transpose2d")
    k = w[0]
    return (x[0] + k - 1, x[1] + k - 1, w[3])


def _convt_macs(shapes, out, attrs):
    x, w = shapes
    return x[0] * x[1] * w[0] * w[1] * w[2] * w[3]


def _pixel_atom(out, attrs):
    return out[2]


def _same_shape(shapes, attrs, kinds):
    for s in shapes[1:]:
        if tuple(s) != tuple(shapes[0]):
            raise ShapeError(f"operands differ in shape: {tuple(shapes[0])} vs {tuple(s)}")
    return tuple(shapes[0])


def _softmax_infer(shapes, attrs, kinds):
    s = shapes[0]
    g = int(attrs.get("groups", 1))
    if len(s) != 2 or s[1] % g:
        raise ShapeError(f"softmax over {g} groups needs a 2-D tensor with columns divisible by {g}, got {tuple(s)}")
    return tuple(s)


def _rowwise2d(shapes, attrs, kinds):
    if len(shapes[0]) != 2:
        raise ShapeError(f"wants a 2-D tensor, got {tuple(shapes[0])}")
    return tuple(shapes[0])


def _upsample_infer(shapes, attrs, kinds):
    x = shapes[0]
    if len(x) != 3:
        raise ShapeError(f"upsample2 wants (H, W, C), got {tuple(x)}")
    return (2 * x[0], 2 * x[1], x[2])


def _maxpool_infer(shapes, attrs, kinds):
    x = shapes[0]
    if len(x) != 3 or x[0] % 2 or x[1] % 2:
        raise ShapeError(f"maxpool2 wants (H, W, C) with even H and W, got {tuple(x)}")
    return (x[0] // 2, x[1] // 2, x[2])


def _streams(n):
    return lambda attrs, kinds: ("stream",) * n


OPS: Dict[str, OpDef] = {
    "matmul": OpDef("matmul", "core", (2,), _matmul_infer, _matmul_roles, _need_same, _matmul_macs, _matmul_atom),
    "conv2d": OpDef("conv2d", "core", (2,), _conv_infer, lambda a, k: ("stream", "weight"), _conv_need,
                    _conv_macs, _pixel_atom),
    "conv_transpose2d": OpDef("conv_transpose2d", "core", (2,), _convt_infer, lambda a, k: ("stream", "weight"),
                              _need_same, _convt_macs, _pixel_atom),
    "relu": OpDef("relu", "sfu", (1,), _same_shape, _streams(1), _need_same, elementwise=True),
    "gelu": OpDef("gelu", "sfu", (1,), _same_shape, _streams(1), _need_same, elementwise=True),
    "silu": OpDef("silu", "sfu", (1,), _same_shape, _streams(1), _need_same, elementwise=True),
    "add": OpDef("add", "sfu", (2,), _same_shape, _streams(2), _need_same, elementwise=True),
    "mul": OpDef("mul", "sfu", (2,), _same_shape, _streams(2), _need_same, elementwise=True),
    "reparam": OpDef("reparam", "sfu", (3,), _same_shape, _streams(3), _need_same, elementwise=True),
    "softmax": OpDef("softmax", "sfu", (1,), _softmax_infer, _streams(1), _need_same, elementwise=True),
    "layernorm": OpDef("layernorm", "sfu", (1,), _rowwise2d, _streams(1), _need_same, elementwise=True),
    "upsample2": OpDef("upsample2", "sfu", (1,), _upsample_infer, _streams(1),
                       lambda b, s, i, o, a: min(b // 2 + 1, i)),
    "maxpool2": OpDef("maxpool2", "sfu", (1,), _maxpool_infer, _streams(1),
                      lambda b, s, i, o, a: min(2 * b + 2, i)),
}


def lag_tail(op: OpDef, slot: int, in_rows: int, out_rows: int, attrs) -> Tuple[int, int]:
    """(lag, tail) of a streamed input: the input rows needed before output row 0, and the output
    rows that can only be emitted after the last input row arrived."""
    lag = op.need(0, slot, in_rows, out_rows, attrs)
    first_full = next(b for b in range(out_rows) if op.need(b, slot, in_rows, out_rows, attrs) >= in_rows)
    return lag, out_rows - first_full


# ------------------------------------------------------------------------------------------------
# graph
# ------------------------------------------------------------------------------------------------
@dataclass
class TaskGraph:
    name: str
    tensors: Dict[str, TensorSpec]
    tasks: List[Task]
    outputs: List[str]
    meta: Dict[str, Any] = field(default_factory=dict)

    # -- lookups --------------------------------------------------------------------------------
    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def producer(self, tensor: str) -> Optional[Task]:
        for t in self.tasks:
            if t.output == tensor:
                return t
        return None

    def consumers(self, tensor: str) -> List[Tuple[Task, int]]:
        return [(t, i) for t in self.tasks for i, x in enumerate(t.inputs) if x == tensor]

    def op(self, task: Task) -> OpDef:
        return OPS[task.op]

    def edges(self) -> List[Tuple[Task, Task, int]]:
        """(producer, consumer, consumer input slot) for every task-to-task edge."""
        out = []
        for c in self.tasks:
            for i, x in enumerate(c.inputs):
                p = self.producer(x)
                if p is not None:
                    out.append((p, c, i))
        return out

    def role(self, task: Task, slot: int) -> str:
        kinds = [self.tensors[x].kind for x in task.inputs]
        return OPS[task.op].roles(task.attrs, kinds)[slot]

    def macs(self, task: Task) -> int:
        op = OPS[task.op]
        if op.macs is None:
            return 0
        return int(op.macs([self.tensors[x].shape for x in task.inputs], self.tensors[task.output].shape, task.attrs))

    def attrs(self, task: Task) -> Dict[str, Any]:
        """The task's attributes plus what follows from its operands (kernel size k of a conv)."""
        a = dict(task.attrs)
        if task.op in ("conv2d", "conv_transpose2d"):
            a["k"] = int(self.tensors[task.inputs[1]].shape[0])
        return a

    def lag_tail(self, task: Task, slot: int) -> Tuple[int, int]:
        return lag_tail(OPS[task.op], slot, self.tensors[task.inputs[slot]].rows,
                        self.tensors[task.output].rows, self.attrs(task))

    def weight_matmul(self, task: Task) -> bool:
        """A matmul whose B operand is an HBM weight: it either keeps W on chip and streams A rows
        (row-stream order, rows out in order) or keeps A on chip and streams W once (column-block
        order: its output cannot feed a FIFO)."""
        return task.op == "matmul" and self.tensors[task.inputs[1]].kind == "weight"

    def topo(self) -> List[Task]:
        return list(self.tasks)  # validate() reorders tasks topologically

    # -- validation -----------------------------------------------------------------------------
    def validate(self, key: str = "technique.kernel") -> "TaskGraph":
        names = set()
        for t in self.tasks:
            if t.name in names:
                raise UserError(f"graph {self.name!r}: task name {t.name!r} used twice", key=key)
            names.add(t.name)
            if t.op not in OPS:
                raise UserError(f"graph {self.name!r}: task {t.name!r} has unknown op {t.op!r}", key=key,
                                choices=sorted(OPS))
            if len(t.inputs) not in OPS[t.op].arity:
                raise UserError(f"graph {self.name!r}: task {t.name!r} ({t.op}) takes {OPS[t.op].arity[0]} "
                                f"inputs, got {len(t.inputs)}", key=key)
            for x in (*t.inputs, t.output):
                if x not in self.tensors:
                    raise UserError(f"graph {self.name!r}: task {t.name!r} names unknown tensor {x!r}", key=key)
        for n, ts in self.tensors.items():
            if ts.kind not in KINDS:
                raise UserError(f"graph {self.name!r}: tensor {n!r} has kind {ts.kind!r}", key=key, choices=KINDS)
            if ts.dtype not in DTYPE_BITS:
                raise UserError(f"graph {self.name!r}: tensor {n!r} has dtype {ts.dtype!r}", key=key,
                                choices=sorted(DTYPE_BITS))
            if any(int(d) < 1 for d in ts.shape) or not ts.shape:
                raise UserError(f"graph {self.name!r}: tensor {n!r} has shape {tuple(ts.shape)}", key=key)
        made: Dict[str, str] = {}
        for t in self.tasks:
            if t.output in made:
                raise UserError(f"graph {self.name!r}: tensor {t.output!r} is produced by both "
                                f"{made[t.output]!r} and {t.name!r}", key=key)
            if self.tensors[t.output].kind != "act":
                raise UserError(f"graph {self.name!r}: task {t.name!r} writes {t.output!r}, which is an "
                                f"{self.tensors[t.output].kind}", key=key)
            made[t.output] = t.name
        for n, ts in self.tensors.items():
            if ts.kind == "act" and n not in made:
                raise UserError(f"graph {self.name!r}: intermediate tensor {n!r} has no producer", key=key)
        for o in self.outputs:
            if o not in made:
                raise UserError(f"graph {self.name!r}: output {o!r} is not produced by any task", key=key)
        self.tasks = self._toposort(key)
        for t in self.tasks:
            self._check_shapes(t, key)
        return self

    def _toposort(self, key: str) -> List[Task]:
        by_out = {t.output: t for t in self.tasks}
        state: Dict[str, int] = {}
        order: List[Task] = []

        def visit(t: Task, path: List[str]):
            s = state.get(t.name, 0)
            if s == 2:
                return
            if s == 1:
                cyc = path[path.index(t.name):] + [t.name]
                raise UserError(f"graph {self.name!r} has a cycle: {' -> '.join(cyc)}", key=key)
            state[t.name] = 1
            for x in t.inputs:
                if x in by_out:
                    visit(by_out[x], path + [t.name])
            state[t.name] = 2
            order.append(t)

        for t in self.tasks:
            visit(t, [])
        return order

    def _check_shapes(self, t: Task, key: str) -> None:
        op = OPS[t.op]
        ins = [self.tensors[x] for x in t.inputs]
        try:
            out = tuple(int(d) for d in op.infer([tuple(x.shape) for x in ins], t.attrs, [x.kind for x in ins]))
        except ShapeError as e:
            src = ", ".join(f"{x.name}{tuple(x.shape)} from {self._origin(x.name)}" for x in ins)
            raise UserError(f"graph {self.name!r}: shape mismatch into task {t.name!r} ({t.op}): {e} [{src}]",
                            key=key) from None
        decl = tuple(self.tensors[t.output].shape)
        if out != decl:
            raise UserError(f"graph {self.name!r}: task {t.name!r} ({t.op}) produces {out} but tensor "
                            f"{t.output!r} is declared {decl}", key=key)
        act = [x.dtype for x, r in zip(ins, op.roles(t.attrs, [x.kind for x in ins])) if r != "weight"]
        if any(d != self.tensors[t.output].dtype for d in act):
            raise UserError(f"graph {self.name!r}: dtype mismatch into task {t.name!r}: inputs {act}, output "
                            f"{self.tensors[t.output].dtype}", key=key)

    def _origin(self, tensor: str) -> str:
        p = self.producer(tensor)
        return f"task {p.name!r}" if p else self.tensors[tensor].kind

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name,
                "tensors": {n: {"shape": list(t.shape), "dtype": t.dtype, "kind": t.kind}
                            for n, t in self.tensors.items()},
                "tasks": [{"name": t.name, "op": t.op, "inputs": list(t.inputs), "output": t.output,
                           "attrs": dict(t.attrs)} for t in self.tasks],
                "outputs": list(self.outputs), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any], key: str = "technique.graph") -> "TaskGraph":
        try:
            tensors = {n: TensorSpec(n, tuple(int(s) for s in v["shape"]), v.get("dtype", "int16"),
                                     v.get("kind", "act")) for n, v in d["tensors"].items()}
            tasks = [Task(t["name"], t["op"], tuple(t["inputs"]), t["output"], dict(t.get("attrs", {})))
                     for t in d["tasks"]]
            outputs = list(d["outputs"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"task graph is malformed ({type(e).__name__}: {e}); it needs tensors, tasks "
                            f"and outputs", key=key) from None
        return cls(d.get("name", "graph"), tensors, tasks, outputs, dict(d.get("meta", {})))

    @classmethod
    def load(cls, path: str, key: str = "technique.graph") -> "TaskGraph":
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise UserError(f"cannot read task graph {path!r}: {e.strerror}", key=key) from None
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml
                d = yaml.safe_load(text)
            else:
                d = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse error is bad input
            raise UserError(f"cannot parse task graph {path!r}: {str(e).splitlines()[0]}", key=key) from None
        if not isinstance(d, dict):
            raise UserError(f"task graph {path!r} is not a mapping", key=key)
        return cls.from_dict(d, key).validate(key)


def build(name: str, tensors: Sequence[TensorSpec], tasks: Sequence[Task], outputs: Sequence[str],
          **meta) -> TaskGraph:
    return TaskGraph(name, {t.name: t for t in tensors}, list(tasks), list(outputs), dict(meta)).validate()
