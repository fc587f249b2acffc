"""One browser session: page server + headless Chromium + the problems placed in the page.

    with BrowserSession() as s:
        h = s.problem(Shape(1, 384, 768, 768))        # random A, B (seeded), uploaded once
        k = s.compile(h, tile)                         # generate -> wat2wasm -> WebAssembly.compile
        r = s.time(k, repeats=20)                      # performance.now() loop in the page
        err = s.check(h, k)                            # C read back, compared with numpy (float64)
"""
from __future__ import annotations

import base64
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from .browser import Browser
from .codegen import Assembler, Problem, check_dims, memory_layout
from .onnx_model import matmul_model
from .server import PageServer
from .space import GpuTile, Tile, pad_to

ORT_DIR_DEFAULT = os.path.expanduser("~/.cache/effrun/npm/node_modules/onnxruntime-web/dist")


@dataclass(frozen=True)
class Shape:
    """A (batch) matmul as the model sees it: [batch] x (M x K) @ (K x N)."""
    batch: int
    M: int
    K: int
    N: int
    weight: bool = True          # B is a constant weight (linear layer) vs an activation (attention)

    def __post_init__(self):
        check_dims((self.batch, self.M, self.K, self.N))

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.M * self.K * self.N

    def key(self) -> str:
        return f"b{self.batch}_m{self.M}_k{self.K}_n{self.N}"

    @staticmethod
    def parse(text: str, key: str = "technique.shapes") -> "Shape":
        """'BxMxKxN' or 'MxKxN'."""
        from effrun.errors import UserError
        try:
            dims = [int(x) for x in str(text).lower().split("x")]
        except ValueError:
            raise UserError(f"shape {text!r} is not BxMxKxN or MxKxN (integers >= 1)", key=key) from None
        if len(dims) == 3:
            dims = [1] + dims
        if len(dims) != 4:
            raise UserError(f"shape {text!r} is not BxMxKxN or MxKxN (integers >= 1)", key=key)
        check_dims(dims, key=key)
        return Shape(*dims)


def max_rel_error(C: np.ndarray, A: np.ndarray, B: np.ndarray) -> float:
    """max |C - A@B| / (K * eps32 * (|A| @ |B|)) over all outputs, with A@B in float64.

    A float32 dot product of length K is within ~K * eps * sum|a_k b_k| of the exact value for any
    summation order, so a correct kernel scores < 1 (typically ~0.01); a wrong one scores >> 1."""
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    ref = A64 @ B64
    bound = np.abs(A64) @ np.abs(B64) * (A.shape[-1] * np.finfo(np.float32).eps) + 1e-30
    if not np.all(np.isfinite(C)):
        return float("inf")
    return float(np.max(np.abs(C.astype(np.float64) - ref) / bound))


@dataclass
class ProblemHandle:
    pid: str
    shape: Shape
    padded: Problem
    A: np.ndarray                 # [batch, M, K] float32 (unpadded)
    B: np.ndarray                 # [batch, K, N]
    pad_m: int
    pad_n: int
    ort_sid: Optional[str] = None
    extras: Dict = field(default_factory=dict)


@dataclass
class Kernel:
    kid: str
    handle: ProblemHandle
    tile: Tile
    assemble_s: float
    compile_ms: float
    wasm_bytes: int


class BrowserSession:
    def __init__(self, chromium: str = "", ort_dir: Optional[str] = ORT_DIR_DEFAULT, webgpu: bool = True,
                 start_timeout: float = 60.0, log: Optional[Callable[[str], None]] = None):
        self.log = log or (lambda m: None)
        self.server = PageServer(ort_dir if ort_dir and os.path.isdir(ort_dir) else None)
        self.browser = Browser("", chromium=chromium, webgpu=webgpu, start_timeout=start_timeout, log=self.log)
        self.asm = Assembler()
        self._ids = itertools.count()
        self.info: Dict = {}
        self.ort_version: Optional[str] = None

    # ---- lifecycle
    def start(self) -> "BrowserSession":
        self.server.start()
        self.browser.url = self.server.url + "/index.html"
        try:
            self.browser.start()
            self.info = self.browser.call("info")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.browser.stop()
        finally:
            self.server.stop()

    def __enter__(self) -> "BrowserSession":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    # ---- problems
    def problem(self, shape: Shape, seed: int = 0, pad_m: int = 1, pad_n: int = 4,
                A: Optional[np.ndarray] = None, B: Optional[np.ndarray] = None) -> ProblemHandle:
        rng = np.random.default_rng(seed)
        if A is None:
            A = rng.standard_normal((shape.batch, shape.M, shape.K), dtype=np.float32)
        if B is None:
            B = (rng.standard_normal((shape.batch, shape.K, shape.N), dtype=np.float32) / np.sqrt(shape.K)).astype(np.float32)
        Mp, Np = pad_to(shape.M, pad_m), pad_to(shape.N, pad_n)
        prob = Problem(shape.batch, Mp, shape.K, Np)
        Ap = np.zeros((shape.batch, Mp, shape.K), np.float32)
        Ap[:, :shape.M] = A
        Bp = np.zeros((shape.batch, shape.K, Np), np.float32)
        Bp[:, :, :shape.N] = B
        pid = self._id("p")
        pa, pb, pc, ps, end = memory_layout(prob)
        a_url = self.server.put(pid + "_A", Ap.tobytes())
        b_url = self.server.put(pid + "_B", Bp.tobytes())
        self.browser.call("setProblem", pid, {"batch": prob.batch, "M": Mp, "K": prob.K, "N": Np,
                                              "pa": pa, "pb": pb, "pc": pc, "ps": ps,
                                              "pages": -(-end // 65536),
                                              "aUrl": a_url, "bUrl": b_url, "bmm": not shape.weight})
        self.server.drop(pid + "_")
        return ProblemHandle(pid, shape, prob, A, B, pad_m, pad_n)

    def drop(self, h: ProblemHandle) -> None:
        self.browser.call("dropProblem", h.pid)

    # ---- generated kernels
    def compile(self, h: ProblemHandle, tile: Tile) -> Kernel:
        t0 = time.perf_counter()
        wasm = self.asm.kernel(h.padded, tile)
        asm_s = time.perf_counter() - t0
        kid = self._id("k")
        r = self.browser.call("compile", kid, h.pid, base64.b64encode(wasm).decode())
        return Kernel(kid, h, tile, asm_s, float(r["compile_ms"]), len(wasm))

    def release(self, k: Kernel) -> None:
        self.browser.call("dropKernel", k.kid)

    def time(self, k: Kernel, repeats: int, deadline_s: float = 1e9, abort_ms: float = 0.0) -> Dict:
        timeout = max(60.0, min(deadline_s, 1e6) + 60.0)
        return self.browser.call("time", k.kid, int(repeats), float(min(deadline_s, 1e7) * 1000.0),
                                 float(abort_ms), timeout=timeout)

    def run_once(self, k: Kernel) -> float:
        return float(self.browser.call("run", k.kid))

    def read_c(self, h: ProblemHandle) -> np.ndarray:
        name = self._id("c")
        self.browser.call("readC", h.pid, name)
        p = h.padded
        C = np.frombuffer(self.server.take(name), np.float32).reshape(p.batch, p.M, p.N)
        return C[:, :h.shape.M, :h.shape.N]

    def check(self, k: Kernel) -> Tuple[float, np.ndarray]:
        """Poison C, run the kernel once, read C back: (max_rel_error vs numpy, C)."""
        h = k.handle
        self.browser.call("poisonC", h.pid)
        self.run_once(k)
        C = self.read_c(h)
        return max_rel_error(C, h.A, h.B), C

    # ---- onnxruntime-web (wasm backend)
    def ort_available(self) -> bool:
        return self.server.ort_dir is not None and (self.server.ort_dir / "ort.wasm.min.js").is_file()

    def ort_prepare(self, h: ProblemHandle, threads: int = 1) -> Dict:
        if self.ort_version is None:
            self.ort_version = self.browser.call("ortLoad", int(threads))["version"]
        s = h.shape
        bmm = not s.weight or s.batch > 1
        a_dims = [s.batch, s.M, s.K] if bmm else [s.M, s.K]
        b_dims = [s.batch, s.K, s.N] if bmm else [s.K, s.N]
        weight = None if not s.weight else (h.B if bmm else h.B[0])
        model = matmul_model(a_dims, b_dims, weight=weight)
        # the page reads A (and B) from the problem memory, which holds the padded matrices:
        # ORT gets a problem of its own with exactly the model's shapes
        hp = h if (h.padded.M, h.padded.N) == (s.M, s.N) else self.problem(s, A=h.A, B=h.B, pad_m=1, pad_n=1)
        url = self.server.put(self._id("m"), model)
        sid = self._id("s")
        r = self.browser.call("ortSession", sid, hp.pid, url, weight is None)
        h.ort_sid = sid
        return r

    def ort_time(self, h: ProblemHandle, repeats: int, deadline_s: float = 1e9, check: bool = True) -> Dict:
        """onnxruntime-web session.run() timed in the page; with `check`, its output vs numpy."""
        name = self._id("o") if check else ""
        r = self.browser.call("ortTime", h.ort_sid, int(repeats), float(min(deadline_s, 1e7) * 1000.0), name,
                              timeout=max(60.0, min(deadline_s, 1e6) + 60.0))
        if check:
            C = np.frombuffer(self.server.take(name), np.float32).reshape(h.shape.batch, h.shape.M, h.shape.N)
            r["max_rel_error"] = max_rel_error(C, h.A, h.B)
        return r

    # ---- WebGPU (SwiftShader): correctness only
    def gpu_info(self) -> Dict:
        return self.browser.call("gpuInfo")

    def gpu_check(self, h: ProblemHandle, g: GpuTile) -> Dict:
        name = self._id("g")
        hp = h if (h.padded.M, h.padded.N) == (h.shape.M, h.shape.N) else self.problem(
            h.shape, A=h.A, B=h.B, pad_m=1, pad_n=1)
        r = self.browser.call("gpuMatmul", hp.pid, {"wg_m": g.wg_m, "wg_n": g.wg_n, "t": g.t, "kb": g.kb}, name)
        C = np.frombuffer(self.server.take(name), np.float32).reshape(h.shape.batch, h.shape.M, h.shape.N)
        r["max_rel_error"] = max_rel_error(C, h.A, h.B)
        return r
