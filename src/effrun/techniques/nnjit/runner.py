"""The target runner effrun's one infer loop drives (the `target_runner` seam; an `InferSession`).

    runner = NnjitRunner(cfg, hardware, run_dir, log=print)
    for rnd in runner.rounds():          # round 0 (kind "tune"): start the browser, tune every distinct shape
        units = rnd.run()                # rounds 1.. (kind "matmul"): one matmul of the layer each
    runner.finish(recorder)              # measured/... keys; stops the browser and the page server
    runner.close()                       # idempotent; the loop calls it also when a round fails

Every matmul round runs its tuned kernel once in the page (timed there with performance.now()),
reads C back and compares it with numpy in float64 (`max_rel_error` < 1 or the round fails).
With `baseline_ort`, onnxruntime-web's wasm backend runs the same matmul in the same session.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from effrun.rounds import InferSession, Round

from . import NnjitConfig, device_rule, validate
from .harness import BrowserSession, Kernel, ProblemHandle, Shape
from .layers import distinct, layer_shapes
from .space import GpuTile, PruneRule, gpu_space
from .tuner import TuneCache, TuneResult, device_key, lite_candidates, tune_cached, tune_random_large


class KernelMismatch(RuntimeError):
    pass


def _stderr(msg: str) -> None:
    print(f"[nnjit] {msg}", file=sys.stderr, flush=True)


def _sigterm_exit(signum, frame):
    raise SystemExit(128 + signum)


class NnjitRunner(InferSession):
    unit = "matmuls"
    first_is_latency = False
    warmup_rounds = 1            # the tuning round

    def __init__(self, cfg: NnjitConfig, hardware: Any, run_dir: Optional[str] = None,
                 log: Optional[Callable[[str], None]] = _stderr):
        validate(cfg, hardware)
        self.cfg, self.hardware = cfg, hardware
        self.rule: PruneRule = device_rule(cfg, hardware)
        self.run_dir = Path(run_dir) if run_dir else None
        self.log = log or (lambda m: None)
        self.matmuls: List[Tuple[str, Shape]] = layer_shapes(cfg)
        self.sess: Optional[BrowserSession] = None
        self.handles: Dict[Shape, ProblemHandle] = {}
        self.tuned: Dict[Shape, TuneResult] = {}
        self.kernels: Dict[Shape, Kernel] = {}
        self.results: List[Dict] = []
        self.ort: Dict[Shape, Dict] = {}
        self.gpu: Dict[str, Any] = {}
        self.tune_s = 0.0
        self._stat = "min_ms" if cfg.stat == "min" else "median_ms"
        self.hw_name = str((hardware.get("name") if hasattr(hardware, "get") else getattr(hardware, "name", ""))
                           or "browser-wasm")
        self._old_sigterm = None

    # ---- rounds
    def total_rounds(self) -> int:
        return 1 + len(self.matmuls)

    def rounds(self) -> Iterator[Round]:
        row: Dict[str, Any] = {}
        yield Round("tune", partial(self._tune, row), info={"steady": False}, row=row)
        for name, shape in self.matmuls:
            row = {}
            yield Round("matmul", partial(self._matmul, name, shape, row), info={"name": name, "shape": shape.key()},
                        row=row)

    def _open(self) -> BrowserSession:
        if self.sess is None:
            self._trap_sigterm()
            self.sess = BrowserSession(self.cfg.chromium, os.path.expanduser(self.cfg.ort_dir),
                                       webgpu=self.cfg.webgpu_check, start_timeout=self.cfg.start_timeout_s,
                                       log=self.log).start()
        return self.sess

    def _trap_sigterm(self) -> None:
        """While the browser runs, SIGTERM becomes SystemExit (when nobody else handles it), so the
        run's clean-up (the loop's close(), the summary) happens as for Ctrl-C."""
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_exit)

    def _untrap_sigterm(self) -> None:
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def _tune(self, row: Optional[Dict[str, Any]] = None) -> int:
        s = self._open()
        cache = TuneCache(self.cfg.cache_dir) if self.cfg.use_cache else None
        dev = device_key(s.info.get("userAgent", ""), self.hw_name, self.rule)
        t0 = time.perf_counter()
        pad_m = max([t.mr for t in lite_candidates(self.rule, 1 << 20, 1 << 20)] or [4])
        pad_n = max([t.nr for t in lite_candidates(self.rule, 1 << 20, 1 << 20)] or [4])
        for i, shape in enumerate(distinct(self.matmuls)):
            h = s.problem(shape, seed=self.cfg.seed + i, pad_m=pad_m, pad_n=pad_n)
            self.handles[shape] = h
            kw = dict(repeats=self.cfg.repeats, abort_factor=self.cfg.abort_factor, stat=self.cfg.stat,
                      progress=self.log)
            if self.cfg.search == "lite":
                res = tune_cached(s, h, self.rule, self.cfg.budget_s, cache, dev, **kw)
            else:
                res = tune_random_large(s, h, self.cfg.budget_s, seed=self.cfg.seed, **kw)
            if res.best is None:
                raise KernelMismatch(f"no candidate kernel for {shape.key()} "
                                     f"(survivors: {res.candidates}); loosen the pruning occupancies")
            self.tuned[shape] = res
            self.kernels[shape] = s.compile(h, res.best.tile)
            if self.cfg.baseline_ort and s.ort_available():
                s.ort_prepare(h, self.cfg.ort_threads)
        self.tune_s = time.perf_counter() - t0
        if self.cfg.webgpu_check:
            self._webgpu()
        if row is not None:
            row.update({"tune_s": self.tune_s, "tuned_shapes": len(self.tuned),
                        "from_cache": sum(1 for r in self.tuned.values() if r.from_cache)})
        return 0

    def _webgpu(self) -> None:
        """WebGPU through SwiftShader: one pruned workgroup tiling per shape on a row slice (correctness)."""
        s = self.sess
        info = s.gpu_info()
        self.gpu = {"adapter": info, "checks": []}
        if not info.get("available"):
            return
        g = next((g for g in gpu_space(shared_bytes=int(info.get("maxWorkgroupStorage") or 16384))
                  if g.t == 4 and g.wg_m == 8 and g.wg_n == 8), GpuTile(8, 8, 4, 8))
        for shape, h in self.handles.items():
            rows = min(shape.M, 32)
            sub = Shape(min(shape.batch, 2), rows, shape.K, shape.N, shape.weight)
            hs = s.problem(sub, A=h.A[:sub.batch, :rows], B=h.B[:sub.batch], pad_m=1, pad_n=1)
            r = s.gpu_check(hs, g)
            s.drop(hs)
            self.gpu["checks"].append({"shape": shape.key(), "slice": sub.key(), "tile": g.key(),
                                       "max_rel_error": r["max_rel_error"]})
            if not r["max_rel_error"] < 1.0:
                raise KernelMismatch(f"WebGPU matmul {sub.key()} differs from numpy "
                                     f"(max_rel_error {r['max_rel_error']:.3g})")

    def _matmul(self, name: str, shape: Shape, out: Optional[Dict[str, Any]] = None) -> int:
        s, k = self.sess, self.kernels[shape]
        row: Dict[str, Any] = {"name": name, "shape": shape.key(), "tile": k.tile.key(), "flops": shape.flops}
        if self.cfg.check:
            err, _ = s.check(k)          # poisons C, runs once, reads back
            row["max_rel_error"] = err
            if not err < 1.0:
                raise KernelMismatch(f"{name} {shape.key()} with {k.tile.key()} differs from numpy "
                                     f"(max_rel_error {err:.3g})")
        r = s.time(k, self.cfg.repeats)
        row["ms"] = r[self._stat]
        row["median_ms"], row["min_ms"] = r["median_ms"], r["min_ms"]
        row["gflops"] = shape.flops / (row["ms"] * 1e6) if row["ms"] > 0 else None
        h = self.handles[shape]
        if h.ort_sid is not None:
            if shape not in self.ort:
                o = s.ort_time(h, self.cfg.repeats)
                if not o["max_rel_error"] < 1.0:
                    raise KernelMismatch(f"onnxruntime-web {shape.key()} differs from numpy")
                self.ort[shape] = o
            row["ort_ms"] = self.ort[shape][self._stat]
        self.results.append(row)
        if out is not None:
            out.update({"name": name, "shape": shape.key(), "tile": k.tile.key(), "kernel_ms": row["ms"],
                        "gflops": row["gflops"], **({"max_rel_error": row["max_rel_error"]} if "max_rel_error" in row
                                                    else {}), **({"ort_ms": row["ort_ms"]} if "ort_ms" in row else {})})
        self.log(f"{name:>12} {shape.key():>22} {row['ms']:8.2f} ms {row['gflops'] or 0:6.1f} GFLOP/s"
                 + (f"  (ort {row['ort_ms']:.2f} ms)" if "ort_ms" in row else ""))
        return 1

    # ---- summary
    def summary(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.results:
            ms = sum(r["ms"] for r in self.results)
            fl = sum(r["flops"] for r in self.results)
            out["measured/layer_ms"] = ms
            out["measured/layer_gflops"] = fl / (ms * 1e6) if ms > 0 else None
            errs = [r["max_rel_error"] for r in self.results if "max_rel_error" in r]
            if errs:
                out["measured/max_rel_error"] = max(errs)
            for r in self.results:
                out[f"measured/matmul_ms/{r['name']}"] = r["ms"]
                if "ort_ms" in r:
                    out[f"measured/ort_matmul_ms/{r['name']}"] = r["ort_ms"]
            if all("ort_ms" in r for r in self.results):
                oms = sum(r["ort_ms"] for r in self.results)
                out["measured/ort_layer_ms"] = oms
                out["measured/speedup_vs_ort"] = oms / ms if ms > 0 else None
        out["measured/tune_s"] = self.tune_s
        out["measured/survivors"] = len(lite_candidates(self.rule, 1 << 20, 1 << 20))
        out["measured/tuned_shapes"] = len(self.tuned)
        out["measured/tuned_from_cache"] = sum(1 for r in self.tuned.values() if r.from_cache)
        if self.gpu.get("checks"):
            out["measured/webgpu_max_rel_error"] = max(c["max_rel_error"] for c in self.gpu["checks"])
        out["info/winners"] = json.dumps({s.key(): r.best.tile.key() for s, r in self.tuned.items() if r.best})
        out["info/browser"] = (self.sess.info.get("userAgent") if self.sess else None) or ""
        return out

    def finish(self, rec: Any) -> None:
        try:
            summary = self.summary()
            for k, v in summary.items():
                rec.set(k, v)
            if self.run_dir is not None:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "nnjit.json").write_text(json.dumps({
                    "matmuls": self.results, "tuning": [r.summary() for r in self.tuned.values()],
                    "webgpu": self.gpu, "rule": self.rule.__dict__, "summary": summary}, indent=1, default=str))
        finally:
            self.close()

    def close(self) -> None:
        try:
            if self.sess is not None:
                self.sess.stop()
                self.sess = None
        finally:
            self._untrap_sigterm()

    def __enter__(self) -> "NnjitRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
