"""nn-JIT.web: just-in-time Wasm SIMD matmul kernels, generated and tuned in a real browser.

`effrun infer +technique=nnjit hardware=browser-wasm` (once the plugin adapter lands): a target
runner (`runner.NnjitRunner`) starts headless Chromium on a page served from 127.0.0.1, tunes a
kernel per matmul shape of one transformer layer (BERT-base or GPT-2, 1 x 384) by a grid search
over the pruned lite space within a wall-clock budget, caches the winners per device and shape,
then runs every matmul of the layer with its winner in the browser and checks it against numpy.

Library modules: space (spaces, pruning rules), codegen (WebAssembly text -> wat2wasm), server
(127.0.0.1 page server), browser (Chromium over the DevTools protocol), harness (one browser
session), tuner (grid / random search, cache), onnx_model (onnxruntime-web baseline model),
layers (transformer matmul shapes), runner (target runner). Standalone:
`python -m effrun.techniques.nnjit --help`. Setup: `bash scripts/setup/browser.sh`.

No entry point is registered yet (see docs/techniques/nnjit.md, "Integration").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from effrun.errors import UserError

MODELS = ("bert-base", "gpt2")
SEARCHES = ("lite", "large")
STATS = ("min", "median")


@dataclass
class NnjitConfig:
    name: str = "nnjit"
    model: str = "bert-base"            # bert-base | gpt2: the layer whose matmuls run
    seq_len: int = 384
    batch: int = 1
    shapes: List[str] = field(default_factory=list)   # instead of a model layer: "BxMxKxN" / "MxKxN"
    budget_s: float = 30.0              # tuning wall-clock budget per distinct shape
    repeats: int = 20                   # timed calls per candidate
    stat: str = "min"                   # min | median of the timed calls (min: least disturbed by other load)
    abort_factor: float = 3.0           # skip a candidate's repeats when its warm-up > factor x best
    search: str = "lite"                # lite: grid over the pruned lite space | large: random search
    reg_occupancy_min: float = 0.8      # pruning: SIMD registers used >= this share of the device's
    l1_occupancy_min: float = 0.9       # pruning: cache block footprint >= this share of L1
    simd_registers: Optional[int] = None  # None -> hardware.extra.simd_registers
    l1_kb: Optional[int] = None         # None -> hardware.extra.l1_kb
    cache_dir: str = "~/.cache/effrun/nnjit"
    use_cache: bool = True              # reuse a winner tuned before on this device and shape
    chromium: str = ""                  # path; "" -> Debian's /usr/lib/chromium/chromium
    ort_dir: str = "~/.cache/effrun/npm/node_modules/onnxruntime-web/dist"
    baseline_ort: bool = True           # onnxruntime-web wasm on each matmul, same session
    ort_threads: int = 1
    webgpu_check: bool = True           # WebGPU (SwiftShader) matmul vs numpy, correctness only
    check: bool = True                  # every matmul's output vs numpy (float64)
    seed: int = 0
    start_timeout_s: float = 60.0


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
    for key in ("simd_registers", "l1_kb"):
        v = getattr(cfg, key)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise UserError(f"{v!r} must be an integer >= 1 (or null: from the hardware config)",
                            key=f"technique.{key}")
    if not cfg.abort_factor > 1.0:
        raise UserError(f"{cfg.abort_factor!r} must be > 1", key="technique.abort_factor")
    layer_shapes(cfg)            # raises on a zero dimension / bad shape string
    if hardware is not None:
        rule = device_rule(cfg, hardware)
        from .space import lite_space, prune
        if cfg.search == "lite" and not prune(lite_space(), rule):
            raise UserError(f"no lite-space kernel survives pruning for {rule.registers} SIMD registers and "
                            f"{rule.l1_bytes // 1024} KiB L1 at occupancies {rule.reg_min} / {rule.l1_min}",
                            key="technique.reg_occupancy_min")
