"""nn-JIT.web: just-in-time Wasm SIMD matmul kernels, generated and tuned in a real browser.

`effrun infer +technique=nnjit hardware=browser-wasm`: the technique supplies the infer loop's
`target_runner` seam (`runner.NnjitRunner`, a session of rounds). Round 0 starts headless Chromium
on a page served from 127.0.0.1 and tunes a kernel per distinct matmul shape of one transformer
layer (BERT-base or GPT-2, 1 x 384) by a grid search over the pruned lite space within a
wall-clock budget (winners cached per device and shape); every later round runs one matmul of the
layer with its winner in the browser and checks it against numpy. The loop closes the session
(stops the browser and the page server) also when a run fails.

Library modules: space (spaces, pruning rules), codegen (WebAssembly text -> wat2wasm), server
(127.0.0.1 page server), browser (Chromium over the DevTools protocol), harness (one browser
session), tuner (grid / random search, cache), onnx_model (onnxruntime-web baseline model),
layers (transformer matmul shapes), runner (the target runner), plugin (the Technique).
Setup: `bash scripts/setup/browser.sh`. Benchmark: `scripts/bench_nnjit.py`.

This module stays import-light (no numpy, no torch at import): it is read when configs are composed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from effrun.errors import UserError

MODELS = ("bert-base", "gpt2")
SEARCHES = ("lite", "large")
STATS = ("min", "median")


def _r(default, rng):
    return field(default=default, metadata={"range": rng})


@dataclass
class NnjitConfig:
    name: str = "nnjit"
    model: str = "bert-base"            # bert-base | gpt2: the layer whose matmuls run
    seq_len: int = _r(384, "[1, inf)")
    batch: int = _r(1, "[1, inf)")
    shapes: List[str] = field(default_factory=list)   # instead of a model layer: "BxMxKxN" / "MxKxN"
    budget_s: float = _r(30.0, "(0, inf)")   # tuning wall-clock budget per distinct shape
    repeats: int = _r(20, "[1, inf)")        # timed calls per candidate
    stat: str = "min"                   # min | median of the timed calls (min: least disturbed by other load)
    abort_factor: float = _r(3.0, "(1, inf)")  # skip a candidate's repeats when its warm-up > factor x best
    search: str = "lite"                # lite: grid over the pruned lite space | large: random search
    reg_occupancy_min: float = _r(0.8, "[0, 1]")   # pruning: SIMD registers used >= this share of the device's
    l1_occupancy_min: float = _r(0.9, "[0, 1]")    # pruning: cache block footprint >= this share of L1
    simd_registers: Optional[int] = _r(None, "[1, inf)")  # None -> hardware.extra.simd_registers
    l1_kb: Optional[int] = _r(None, "[0, inf)")  # None -> hardware.extra.l1_kb; 0: no L1 rule (as the paper's phones)
    cache_dir: str = "~/.cache/effrun/nnjit"
    use_cache: bool = True              # reuse a winner tuned before on this device and shape
    chromium: str = ""                  # path; "" -> Debian's /usr/lib/chromium/chromium
    ort_dir: str = "~/.cache/effrun/npm/node_modules/onnxruntime-web/dist"
    baseline_ort: bool = True           # onnxruntime-web wasm on each matmul, same session
    ort_threads: int = _r(1, "[1, inf)")
    webgpu_check: bool = True           # WebGPU (SwiftShader) matmul vs numpy, correctness only
    check: bool = True                  # every matmul's output vs numpy (float64)
    seed: int = 0
    start_timeout_s: float = _r(60.0, "(0, inf)")


def _get(node: Any, key: str, default=None):
    if node is None:
        return default
    if isinstance(node, dict):
        return node.get(key, default)
    try:
        v = node.get(key, default)          # DictConfig
        return default if v is None else v
    except AttributeError:
        return getattr(node, key, default)


def device_rule(cfg: NnjitConfig, hardware: Any):
    """The pruning rule from the config, falling back on hardware.extra (registers, L1)."""
    from .space import PruneRule
    extra = _get(hardware, "extra", {}) or {}
    regs = cfg.simd_registers if cfg.simd_registers is not None else _get(extra, "simd_registers")
    l1_kb = cfg.l1_kb if cfg.l1_kb is not None else _get(extra, "l1_kb")
    if regs is None or l1_kb is None:
        raise UserError("the browser target needs SIMD registers and L1 size (hardware.extra.simd_registers, "
                        "hardware.extra.l1_kb, or technique.simd_registers / technique.l1_kb)",
                        key="hardware", choices=["browser-wasm"])
    return PruneRule(int(regs), int(l1_kb) * 1024, float(cfg.reg_occupancy_min), float(cfg.l1_occupancy_min))


def validate(cfg: NnjitConfig, hardware: Any = None) -> None:
    """Every bad value is one UserError line (exit 2) before any work starts."""
    from .layers import layer_shapes
    from .tuner import check_budget
    if hardware is not None and _get(hardware, "kind") not in (None, "browser"):
        raise UserError(f"nnjit runs on a browser target, not {_get(hardware, 'kind')!r}", key="hardware",
                        choices=["browser-wasm"])
    if cfg.model not in MODELS and not cfg.shapes:
        raise UserError(f"unknown model {cfg.model!r}", key="technique.model", choices=MODELS)
    if cfg.search not in SEARCHES:
        raise UserError(f"unknown search {cfg.search!r}", key="technique.search", choices=SEARCHES)
    if cfg.stat not in STATS:
        raise UserError(f"unknown stat {cfg.stat!r}", key="technique.stat", choices=STATS)
    check_budget(cfg.budget_s)
    for key in ("seq_len", "batch", "repeats", "ort_threads"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{v!r} must be an integer >= 1", key=f"technique.{key}")
    for key in ("reg_occupancy_min", "l1_occupancy_min"):
        v = getattr(cfg, key)
        if not (0.0 <= float(v) <= 1.0):
            raise UserError(f"{v!r} is outside [0, 1]", key=f"technique.{key}")
    for key, lo in (("simd_registers", 1), ("l1_kb", 0)):
        v = getattr(cfg, key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
            raise UserError(f"{v!r} must be an integer >= {lo} (or null: from the hardware config)",
                            key=f"technique.{key}")
    if not cfg.abort_factor > 1.0:
        raise UserError(f"{cfg.abort_factor!r} must be > 1", key="technique.abort_factor")
    layer_shapes(cfg)            # raises on a zero dimension / bad shape string
    if hardware is not None:
        rule = device_rule(cfg, hardware)
        from .space import lite_space, prune
        if cfg.search == "lite" and not prune(lite_space(), rule):
            raise UserError(f"no lite-space kernel survives pruning for {rule.registers} SIMD registers and "
                            f"{rule.l1_bytes // 1024} KiB L1 at occupancies {rule.reg_min} / {rule.l1_min}; "
                            "lower it (or technique.l1_occupancy_min)", key="technique.reg_occupancy_min")


def as_config(node: Any) -> NnjitConfig:
    """The typed `technique` node (a DictConfig of NnjitConfig) as the dataclass itself."""
    if isinstance(node, NnjitConfig):
        return node
    from omegaconf import DictConfig, OmegaConf
    if isinstance(node, DictConfig):
        obj = OmegaConf.to_object(node)
        if isinstance(obj, NnjitConfig):
            return obj
        node = obj
    d = dict(node)
    return NnjitConfig(**{k: v for k, v in d.items() if k in NnjitConfig.__dataclass_fields__})


def check(cfg: Any, node: Any) -> None:
    """Cheap pre-flight (no browser started, no torch): values, the target, the tools on this machine."""
    c = as_config(node)
    hardware = cfg.get("hardware") if hasattr(cfg, "get") else None
    validate(c, hardware)
    if getattr(cfg, "mode", "infer") == "infer":
        from .browser import find_chromium
        from .codegen import find_wat2wasm
        find_chromium(c.chromium)       # one line naming scripts/setup/browser.sh when missing
        find_wat2wasm()


METRICS = (
    "measured/layer_ms", "measured/layer_gflops", "measured/matmul_ms/*", "measured/max_rel_error",
    "measured/tune_s", "measured/survivors", "measured/tuned_shapes", "measured/tuned_from_cache",
    "?measured/ort_layer_ms", "?measured/speedup_vs_ort", "?measured/ort_matmul_ms/*",
    "?measured/webgpu_max_rel_error", "info/winners", "info/browser",
)


def _spec():
    from effrun.technique import TechniqueSpec

    return TechniqueSpec(
        name="nnjit", config=NnjitConfig, plugin="effrun.techniques.nnjit.plugin:Nnjit", modes=("infer",),
        families=(), hardware="run", check=check, seams={"infer": ("target_runner",)},
        metrics={"infer": METRICS},
        # a quick conformance run: two small shapes (one batched, with M/N/K tails), a short budget,
        # no cache (so it tunes), no WebGPU check (SwiftShader start-up is slow on a loaded box)
        smoke_overrides={"infer": ("hardware=browser-wasm", "technique.shapes=[1x24x40x32,2x16x8x16]",
                                   "technique.budget_s=5", "technique.repeats=3", "technique.use_cache=false",
                                   "technique.webgpu_check=false")},
        description="nn-JIT.web: JIT WebAssembly SIMD matmul kernels from a pruned lite space, tuned in "
                    "headless Chromium; onnxruntime-web wasm and WebGPU (SwiftShader) in the same session")


spec = _spec()
