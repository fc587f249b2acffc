"""C simulation: generate the HLS C++ of a schedule, compile it with g++ against the Xilinx
ap_int / hls_stream headers shipped in the hls4ml wheel (scripts/setup/hls_headers.sh), run it on
deterministic integer inputs and compare every graph output with the numpy reference, bit for bit.

It is a functional check of the generated design (the schedule's stages, FIFOs and scratchpads
really compute the kernel), not a speed measurement: the C-simulation seconds are reported as
`measured/csim_*` only to show what the check costs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from effrun.errors import UserError

from .codegen import generate
from .graph import TaskGraph
from .model import Model, Schedule
from .refs import make_inputs, run_graph

RT_DIR = Path(__file__).parent / "rt"
SETUP_SCRIPT = "scripts/setup/hls_headers.sh"


class HeadersMissing(RuntimeError):
    """The hls4ml headers are not unpacked (run scripts/setup/hls_headers.sh)."""


def default_headers() -> Path:
    return Path(os.environ.get("EFFRUN_CACHE", Path.home() / ".cache" / "effrun")) / "hls_headers"


def find_headers(path: Optional[str] = None) -> Path:
    p = Path(path) if path else default_headers()
    if not (p / "ap_int.h").is_file() or not (p / "hls_stream.h").is_file():
        raise HeadersMissing(f"no ap_int.h / hls_stream.h in {p}; run {SETUP_SCRIPT}")
    return p


def find_cxx(cxx: str = "g++", key: str = "technique.cxx") -> str:
    exe = shutil.which(cxx)
    if exe is None:
        raise UserError(f"C++ compiler {cxx!r} not found on PATH; the C simulation needs g++ "
                        f"(Debian: apt-get install -y g++) or set {key}", key=key)
    return exe


def instantiate(full: Schedule, small: Model) -> Schedule:
    """The full-size schedule's decisions (stages, cores, edge modes, spills) on the scaled graph
    of the same kernel (same task and tensor names)."""
    edges = {e: full.dataflow.get(e, False) for e in small.edges}
    return Schedule(full.design, full.cores, {t: full.stage[t] for t in small.tasks},
                    {t: full.ncores[t] for t in small.core}, edges,
                    {t: full.rowstream.get(t, False) for t in small.wmm},
                    {x: full.spill.get(x, False) for x in small.intermediates}, status=full.status)


@dataclass
class CsimResult:
    kernel: str
    design: str
    bit_exact: bool
    compile_s: float
    run_s: float
    outputs: Dict[str, dict] = field(default_factory=dict)
    stdout: str = ""
    workdir: str = ""


def _write_inputs(g: TaskGraph, data: Dict[str, np.ndarray], d: Path) -> None:
    for x, ts in g.tensors.items():
        if ts.kind in ("input", "weight"):
            dt = np.int16 if ts.bits > 8 else np.int8
            data[x].astype(dt).ravel().tofile(d / f"{x}.bin")


def run(m: Model, s: Schedule, workdir: Path, headers: Path, cxx: str = "g++", seed: int = 0,
        timeout_s: float = 120.0, opt: str = "-O1") -> CsimResult:
    g = m.g
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / f"{g.name}_{s.design}.cpp"
    src.write_text(generate(m, s))
    exe = workdir / f"{g.name}_{s.design}.bin"
    t0 = time.perf_counter()
    cmd = [cxx, opt, "-std=c++14", "-w", f"-I{headers}", f"-I{RT_DIR}", str(src), "-o", str(exe)]
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise UserError(f"C++ compiler {cxx!r} not found", key="technique.cxx") from None
    compile_s = time.perf_counter() - t0
    if cp.returncode != 0:
        raise RuntimeError(f"g++ failed on {src}:\n{cp.stderr[-4000:]}")
    data = make_inputs(g, seed)
    _write_inputs(g, data, workdir)
    t0 = time.perf_counter()
    rp = subprocess.run([str(exe), str(workdir)], capture_output=True, text=True, timeout=timeout_s)
    run_s = time.perf_counter() - t0
    if rp.returncode != 0 or "INTAR_CSIM_OK" not in rp.stdout:
        raise RuntimeError(f"C simulation of {g.name} ({s.design}) failed (rc={rp.returncode}): "
                           f"{(rp.stderr or rp.stdout)[-2000:]}")
    ref = run_graph(g, data)
    outs, ok = {}, True
    for x in g.outputs:
        got = np.fromfile(workdir / f"{x}.out.bin", dtype=np.int32).reshape(g.tensors[x].shape)
        want = ref[x]
        eq = bool(np.array_equal(got.astype(np.int64), want))
        ok &= eq
        outs[x] = {"equal": eq, "mismatches": int((got != want).sum()), "elems": int(want.size),
                   "min": int(want.min()), "max": int(want.max()), "distinct": int(np.unique(want).size)}
    return CsimResult(g.name, s.design, ok, compile_s, run_s, outs, rp.stdout.strip(), str(workdir))
