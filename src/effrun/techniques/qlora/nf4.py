"""NF4 (QLoRA's 4-bit NormalFloat, block-wise absmax, double-quantized scales) through one small
interface over three backends, so QLoRA and QPaCA keep their frozen base weights the same way:

  bnb      bitsandbytes' quantize_4bit / dequantize_4bit (native CPU and CUDA kernels; the kernels
           of bnb's own Linear4bit)                                        -- the default
  torchao  torchao's NF4Tensor (torchtune's QLoRA base)
  effrun   the hand-written pure-torch quantiser in effrun.techniques.paca.ops

Chosen by measurement (scripts/bench_paca.py --nf4-backends, docs/results/2026-11-30-paca.md):
bitsandbytes quantizes without the fp32 temporary of 16 x the weight that the two pure-torch
ones build (their nearest-level search), and dequantizes fastest; torchao and ours are kept to
be measured against it.

A quantized weight is a dict of plain tensors (registered as module buffers: they go into
`state_dict` and checkpoints and load back in place) plus static metadata; `dequantize` is a
pure function of both, so `module.to(...)` and `load_state_dict` cannot leave a stale copy.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, Tuple

import torch
from torch import Tensor

from effrun.techniques.qlora import BACKENDS, BNB_BLOCKS, available, check_backend  # noqa: F401


def _quiet_import(name: str):
    """bitsandbytes and torchao print load warnings for optional kernels (GPU builds, `kernels`)."""
    os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            return importlib.import_module(name)
        finally:
            logging.disable(level)


# --- bitsandbytes ---------------------------------------------------------------------------------

def _bnb_quantize(w: Tensor, block: int, double_quant: bool) -> Tuple[Dict[str, Tensor], dict]:
    F = _quiet_import("bitsandbytes.functional")
    packed, qs = F.quantize_4bit(w.detach().contiguous(), blocksize=block, compress_statistics=double_quant,
                                 quant_type="nf4")
    t = {"packed": packed, "absmax": qs.absmax, "code": qs.code}
    meta = {"shape": tuple(w.shape), "dtype": w.dtype, "block": block, "nested": qs.nested}
    if qs.nested:
        t.update(offset=qs.offset.reshape(1), absmax2=qs.state2.absmax, code2=qs.state2.code)
        meta["block2"] = qs.state2.blocksize
    return t, meta


def _bnb_dequantize(t: Dict[str, Tensor], meta: dict, dtype) -> Tensor:
    F = _quiet_import("bitsandbytes.functional")
    state2 = None
    if meta["nested"]:
        state2 = F.QuantState(absmax=t["absmax2"], code=t["code2"], blocksize=meta["block2"], dtype=torch.float32)
    qs = F.QuantState(absmax=t["absmax"], shape=torch.Size(meta["shape"]), code=t["code"], blocksize=meta["block"],
                      quant_type="nf4", dtype=meta["dtype"], offset=t["offset"][0] if meta["nested"] else None,
                      state2=state2)
    return F.dequantize_4bit(t["packed"], qs).to(dtype)


# --- torchao --------------------------------------------------------------------------------------

def _ao_scaler_block(n_blocks: int) -> int:
    """torchao needs n_blocks divisible by the scales' block (QLoRA: 256); SmolLM2's 576-wide layers
    give n_blocks = 5184 = 81 * 64, so take the largest power of two <= 256 that divides it."""
    sb = 256
    while sb > 1 and n_blocks % sb:
        sb //= 2
    return sb


def _ao_quantize(w: Tensor, block: int, double_quant: bool):
    from effrun.errors import UserError

    if w.numel() % block:
        raise UserError(f"torchao NF4 needs the weight size {tuple(w.shape)} divisible by the block {block}",
                        key="technique.quant_block")
    ao = _quiet_import("torchao.quantization")
    n_blocks = w.numel() // block
    x = ao.NF4Tensor.from_tensor(w.detach().contiguous(), block, _ao_scaler_block(n_blocks))
    t = {"packed": x.quantized_data, "scalers": x.quantized_scalers, "factor": x.quantization_factor,
         "mean": x.scaler_mean.reshape(1), "code": x.nf4}
    meta = {"shape": tuple(w.shape), "stride": tuple(w.stride()), "dtype": w.dtype, "block": block,
            "n_blocks": n_blocks, "scaler_block": x.scaler_block_size}
    return t, meta


def _ao_dequantize(t: Dict[str, Tensor], meta: dict, dtype) -> Tensor:
    nf4mod = _quiet_import("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    tm = nf4mod.SubclassTensorArgs(torch.Size(meta["shape"]), meta["stride"], 0, meta["dtype"], t["packed"].device,
                                   False)
    x = nf4mod.NF4Tensor(tm, meta["block"], meta["n_blocks"], meta["scaler_block"], t["scalers"], t["factor"],
                         t["mean"][0], t["packed"], t["code"])
    return x.get_original_weight().to(dtype)


# --- ours (effrun.techniques.paca.ops) -------------------------------------------------------------

def _effrun_quantize(w: Tensor, block: int, double_quant: bool, mode: str = "nf4"):
    from effrun.techniques.paca import ops

    q = ops.quantize_blocks(w, mode, block, double_quant)
    t = {("packed" if k == "codes" else k): v for k, v in q.items() if torch.is_tensor(v)}
    meta = {k: v for k, v in q.items() if not torch.is_tensor(v)}
    return t, meta


def _effrun_dequantize(t: Dict[str, Tensor], meta: dict, dtype) -> Tensor:
    from effrun.techniques.paca import ops

    q = {**meta, **{("codes" if k == "packed" else k): v for k, v in t.items()}}
    return ops.dequantize_blocks(q, dtype)


_Q = {"bnb": _bnb_quantize, "torchao": _ao_quantize, "effrun": _effrun_quantize}
_D = {"bnb": _bnb_dequantize, "torchao": _ao_dequantize, "effrun": _effrun_dequantize}


class Quantized:
    """One quantized weight: its tensors, metadata and backend (used by the benchmark; modules keep
    the tensors as buffers and call `dequantize` with them)."""

    def __init__(self, backend: str, tensors: Dict[str, Tensor], meta: dict):
        self.backend, self.tensors, self.meta = backend, tensors, meta

    def dequantize(self, dtype=torch.float32) -> Tensor:
        return dequantize(self.backend, self.tensors, self.meta, dtype)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())


def quantize(w: Tensor, backend: str, block: int = 64, double_quant: bool = True, mode: str = "nf4") -> Quantized:
    if mode != "nf4":  # int8: only the hand-written block quantiser has the symmetric int8 of QPaCA
        t, m = _effrun_quantize(w, block, double_quant, mode)
        return Quantized("effrun", t, m)
    t, m = _Q[backend](w, block, double_quant)
    return Quantized(backend, t, m)


def dequantize(backend: str, tensors: Dict[str, Tensor], meta: dict, dtype=torch.float32) -> Tensor:
    return _D[backend](tensors, meta, dtype)
