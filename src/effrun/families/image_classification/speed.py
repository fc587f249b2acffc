"""Speed protocol for image classifiers (the EfficientViT paper's speed_test: fused eval model,
warm-up, then timed iterations; images/s), run for several execution modes side by side:

- eager:   the module as is (for effrun's EfficientViT: Conv-BN fused, cached attention biases)
- trace:   `torch.jit.trace` + `torch.jit.freeze` (the paper's GPU/CPU protocol traces the model)
- compile: `torch.compile` (inductor; on CPU with weight freezing)
- onnx:    exported with the TorchScript ONNX exporter, run by onnxruntime (CPU provider)

One protocol for `effrun infer` and the benchmark: `optimize_for_inference` (the model as users run
it), `prepare` (one callable per backend, built the same way for both; the first call is
preparation), warm-up calls, timed calls, and `images_per_s` = images of the timed calls / their
total time. `effrun infer` (session.py) counts warm-up and timed calls (`run.warmup_steps`,
`run.max_steps`: the infer loop's rounds, timed by the loop); `time_callable` (the benchmark, which
also times timm's model, not an effrun model) runs them for a wall-clock window as the paper's
speed_test does (10 s warm-up, then until 60 s; shortened by its flags).

`load_timm()` imports timm for baselines and cross-checks. timm imports torchvision at import time,
and PyPI's torchvision does not import beside torch 2.13.0 CPU; when that is the only obstacle, a stub
that answers torchvision's names with inert placeholders is installed first (timm's model code runs
unchanged; only timm's data transforms would reach the stub). `allow_stub=False` disables that.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

MODES = ("eager", "trace", "compile", "onnx")
TIMM_VERSION = "1.0.31"
TIMM_CACHE = Path(os.environ.get("EFFRUN_CACHE", Path.home() / ".cache" / "effrun")) / f"timm-{TIMM_VERSION}"


# ----------------------------------------------------------------------------------------------
# timm (baselines and the logits cross-check)

class _Inert:
    def __init__(self, *a, **k):
        raise RuntimeError("torchvision is a stub here (it does not import beside this torch)")


class _NameEcho(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return name


class _InterpolationMode(metaclass=_NameEcho):
    pass


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__effrun_stub__ = True

        def getattr_(name):
            if name.startswith("__"):
                raise AttributeError(name)
            if name == "InterpolationMode":
                return _InterpolationMode
            return type(name, (_Inert,), {})
        mod.__getattr__ = getattr_
        return mod

    def exec_module(self, module):
        pass


def load_timm(allow_stub: bool = True) -> Tuple[Optional[types.ModuleType], str]:
    """(timm, how) or (None, why not). Tries a plain import, then the unpacked wheel that
    `scripts/setup/efficientvit.sh` puts under ~/.cache/effrun, with the torchvision stub."""
    try:
        import timm  # noqa: F401
        return sys.modules["timm"], f"timm {sys.modules['timm'].__version__}"
    except Exception as e:  # ImportError, or torchvision's own failure at import
        plain_err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        del sys.modules[name]
    if not allow_stub:
        return None, f"timm not importable ({plain_err})"
    if importlib.util.find_spec("timm") is None:
        if not TIMM_CACHE.is_dir():
            return None, (f"timm not importable ({plain_err}); run scripts/setup/efficientvit.sh "
                          f"to unpack timm {TIMM_VERSION} into {TIMM_CACHE}")
        sys.path.insert(0, str(TIMM_CACHE))
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    stub = _TorchvisionStub()
    sys.meta_path.insert(0, stub)
    try:
        import timm  # noqa: F811
        return timm, f"timm {timm.__version__} (torchvision stubbed: {plain_err})"
    except Exception as e:
        sys.meta_path.remove(stub)
        return None, f"timm not importable even with a torchvision stub ({type(e).__name__}: {e})"


def timm_model(variant: str, **kwargs):
    """timm's `efficientvit_m*` (random init), or raises RuntimeError naming why timm is missing."""
    timm, how = load_timm()
    if timm is None:
        raise RuntimeError(how)
    return timm.create_model(variant.replace("efficientvit-", "efficientvit_"), pretrained=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# the model as users run it

def optimize_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """In place: eval; every Conv-BN folded (EfficientViT's ConvBN / head, the CGA a ViT got from the
    `cga` technique, and nn.Conv2d -> nn.BatchNorm2d pairs in an nn.Sequential such as the CNN's);
    each cascaded group attention's [heads, N, N] bias gathered once; no parameter requires grad."""
    import torch.nn as nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from effrun.families.image_classification import efficientvit as ev

    model.eval()
    for mod in list(model.modules()):
        if isinstance(mod, nn.Sequential):
            for i in range(len(mod) - 1):
                a, b = mod[i], mod[i + 1]
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and b.track_running_stats:
                    mod[i], mod[i + 1] = fuse_conv_bn_eval(a, b), nn.Identity()
    return ev.optimize_for_inference(model)  # walks every module: ConvBN, ClassifierHead, CGA biases


def count_macs(model: torch.nn.Module, x1: torch.Tensor) -> int:
    """Multiply-adds of one forward of `x1` (FlopCounterMode FLOPs / 2: convolutions, linears, attention
    matmuls; element-wise ops not counted). torch's counter has no rule for the CPU fused-attention
    kernel: CGA runs its explicit-matmul kernel while counting, and the MHSA's SDPA gets torch's own
    SDPA formula for that kernel (so CGA and MHSA are counted alike). The model's mode is restored."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash}

    from effrun.families.image_classification.efficientvit import CascadedGroupAttention

    impls = [(m, m.attn_impl) for m in model.modules() if isinstance(m, CascadedGroupAttention)]
    was = model.training
    try:
        for m, _ in impls:
            m.attn_impl = "matmul"
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as fc:
            model(x1)
        return int(fc.get_total_flops()) // 2
    finally:
        for m, impl in impls:
            m.attn_impl = impl
        model.train(was)


# ----------------------------------------------------------------------------------------------
# the protocol

@dataclass
class SpeedConfig:
    batch: int = 16
    img_size: int = 224
    in_chans: int = 3
    threads: int = 2
    warmup_s: float = 2.0        # the paper: 10 s warm-up, then timed until 60 s
    measure_s: float = 5.0
    min_iters: int = 3
    device: str = "cpu"
    autocast: bool = False       # GPU protocol: autocast (fp16)
    # "wall": time.perf_counter (the protocol). "process": this process's CPU time -- a proxy that
    # other tenants' load barely moves, meaningful at threads=1 only (idle OpenMP threads spin).
    clock: str = "wall"
    compile_options: Dict = field(default_factory=dict)


@dataclass
class SpeedResult:
    mode: str
    images_per_s: Optional[float]
    iters: int = 0
    seconds: float = 0.0
    prepare_s: float = 0.0      # trace / compile / export time (not in images/s)
    error: Optional[str] = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()



def images_per_s(images: int, seconds: float) -> float:
    """The protocol's figure: images of the timed calls / their total time (not a median of calls)."""
    return images / seconds if seconds > 0 else float("nan")


def time_callable(fn: Callable[[], object], images_per_call: int, cfg: SpeedConfig,
                  progress: Optional[Callable[[str], None]] = None, label: str = "") -> Tuple[float, int, float]:
    """Warm up for cfg.warmup_s (at least one call), then call until cfg.measure_s has passed (and at
    least cfg.min_iters calls). Returns (images/s, iterations, seconds on cfg.clock)."""
    clock = time.process_time if cfg.clock == "process" else time.perf_counter
    t0 = time.perf_counter()
    fn()
    sync(cfg.device)
    while time.perf_counter() - t0 < cfg.warmup_s:
        fn()
        sync(cfg.device)
    n, t1, c1 = 0, time.perf_counter(), clock()
    last = t1
    while True:
        fn()
        sync(cfg.device)
        n += 1
        now = time.perf_counter()
        if progress is not None and now - last > 2.0:
            progress(f"  {label}: {n} iters, {n * images_per_call / (clock() - c1):.1f} img/s so far")
            last = now
        if n >= cfg.min_iters and now - t1 >= cfg.measure_s:
            break
    dt = clock() - c1
    return images_per_s(n * images_per_call, dt), n, dt


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _inputs(cfg: SpeedConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    return x.to(cfg.device)


def _autocast(cfg: SpeedConfig):
    if cfg.autocast and cfg.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def prepare(model: torch.nn.Module, mode: str, x: torch.Tensor, cfg: SpeedConfig,
            workdir: Optional[Path] = None) -> Callable[[], object]:
    """A zero-argument callable running one batch in `mode` (the model must already be in eval mode)."""
    if mode == "eager":
        def run():
            with torch.inference_mode(), _autocast(cfg):
                return model(x)
        return run
    if mode == "trace":
        import warnings
        with torch.no_grad(), _autocast(cfg), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape ifs are constants: fixed input size
            traced = torch.jit.trace(model, x, check_trace=False)
            traced = torch.jit.freeze(traced.eval())

        def run():
            with torch.no_grad(), _autocast(cfg):
                return traced(x)
        return run
    if mode == "compile":
        import torch._inductor.config as ind
        opts = dict(cfg.compile_options)
        freezing = opts.pop("freezing", True)
        ind.freezing = freezing
        compiled = torch.compile(model, **opts)

        def run():
            with torch.no_grad(), _autocast(cfg):
                return compiled(x)
        return run
    if mode == "onnx":
        import onnxruntime as ort
        workdir = Path(workdir or tempfile.mkdtemp(prefix="effrun_onnx_"))
        path = workdir / "model.onnx"
        export_onnx(model, x, path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = cfg.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.detach().cpu().numpy()}

        def run():
            return sess.run(None, feed)
        return run
    raise ValueError(f"unknown mode {mode!r}")


def export_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path, opset: int = 17) -> Path:
    """TorchScript-based exporter (needs no onnxscript); dynamic batch dim."""
    import warnings
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    return path


def measure(model: torch.nn.Module, modes: Iterable[str], cfg: SpeedConfig,
            progress: Optional[Callable[[str], None]] = print, label: str = "",
            workdir: Optional[Path] = None) -> Dict[str, SpeedResult]:
    """images/s of `model` in each mode under the protocol; a mode that fails reports its error."""
    out: Dict[str, SpeedResult] = {}
    model = model.to(cfg.device).eval()
    with torch_threads(cfg.threads):
        x = _inputs(cfg)
        for mode in modes:
            if mode == "onnx" and cfg.device != "cpu":
                out[mode] = SpeedResult(mode, None, error="onnx mode runs on CPU only")
                continue
            tag = f"{label} {mode}".strip()
            if progress:
                progress(f"[speed] {tag}: preparing")
            t0 = time.perf_counter()
            try:
                fn = prepare(model, mode, x, cfg, workdir=workdir)
                fn()
                prep = time.perf_counter() - t0
                ips, n, dt = time_callable(fn, cfg.batch, cfg, progress, tag)
                out[mode] = SpeedResult(mode, ips, n, dt, prep)
                if progress:
                    progress(f"[speed] {tag}: {ips:.1f} img/s ({n} iters, {dt:.1f} s; prepare {prep:.1f} s)")
            except Exception as e:  # a mode that cannot run here is reported, not fatal
                out[mode] = SpeedResult(mode, None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                if progress:
                    progress(f"[speed] {tag}: FAILED {out[mode].error}")
            finally:
                torch._dynamo.reset() if mode == "compile" else None
    return out


def best(results: Dict[str, SpeedResult]) -> Tuple[Optional[str], Optional[float]]:
    ok = [(r.images_per_s, m) for m, r in results.items() if r.images_per_s]
    if not ok:
        return None, None
    v, m = max(ok)
    return m, v
