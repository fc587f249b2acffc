"""Routing traces: capture from any transformers MoE model, and the trace file format.

File format (``.npz``, numpy's zip of arrays; version 1):

=============  ==================  ====================================================
key            dtype / shape       meaning
=============  ==================  ====================================================
``experts``    int16 [T, L, k]     top-k expert ids (0..E-1, within the layer) per token
                                   per MoE layer, in the router's order (best first)
``weights``    float32 [T, L, k]   the routing weights the experts were called with
``row``        int32 [T]           batch row of the token in its forward call
``call``       int32 [T]           forward call the token came from (prefill = 0, then
                                   one call per decoded token with a KV cache)
``meta``       0-d str             JSON: {"version": 1, "num_experts": E, "top_k": k,
                                   "num_layers": L, "layer_ids": [...], "model": ...,
                                   plus free keys (checkpoint step, split, source)}
=============  ==================  ====================================================

T counts tokens in the order the model saw them (flattened batch-major within each call).
Loaders validate shapes and refuse an empty trace or one whose layer/expert counts do not match
the model it is used with. ExFlow's own trace (``[tokens, layers]`` top-1 ids) is ``experts[:, :, 0]``.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from effrun.errors import UserError

VERSION = 1


@dataclass
class RoutingTrace:
    experts: np.ndarray                  # int [T, L, k]
    num_experts: int
    weights: Optional[np.ndarray] = None  # float [T, L, k]
    row: Optional[np.ndarray] = None
    call: Optional[np.ndarray] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        e = np.asarray(self.experts)
        if e.ndim == 2:
            e = e[:, :, None]
        if e.ndim != 3:
            raise UserError(f"trace experts must be [tokens, layers, k], got shape {e.shape}", key="trace")
        self.experts = e.astype(np.int16)
        if self.weights is None:
            self.weights = np.full(e.shape, 1.0 / e.shape[2], dtype=np.float32)
        self.weights = np.asarray(self.weights, dtype=np.float32).reshape(e.shape)
        if e.size and (e.min() < 0 or e.max() >= self.num_experts):
            raise UserError(f"trace has expert ids outside 0..{self.num_experts - 1}", key="trace")

    # --- shape -----------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    def top1(self) -> np.ndarray:
        """[T, L] the highest-weight expert per token and layer (ExFlow's trace form)."""
        return self.experts[:, :, 0].astype(np.int64)

    def subset(self, index) -> "RoutingTrace":
        sel = lambda a: None if a is None else a[index]
        return RoutingTrace(self.experts[index], self.num_experts, self.weights[index], sel(self.row),
                            sel(self.call), dict(self.meta))

    def split(self, fraction: float, seed: int = 0):
        """(solve part, held-out part): a random token split, so evaluation is out of sample."""
        rng = np.random.default_rng(seed)
        perm = rng.permutation(self.num_tokens)
        cut = int(round(self.num_tokens * fraction))
        return self.subset(np.sort(perm[:cut])), self.subset(np.sort(perm[cut:]))

    def require(self, num_layers: Optional[int] = None, num_experts: Optional[int] = None,
                key: str = "trace") -> "RoutingTrace":
        if self.num_tokens == 0:
            raise UserError("the routing trace is empty (0 tokens)", key=key)
        if num_layers is not None and num_layers != self.num_layers:
            raise UserError(f"trace has {self.num_layers} MoE layers but the model has {num_layers}", key=key)
        if num_experts is not None and num_experts != self.num_experts:
            raise UserError(f"trace has {self.num_experts} experts per layer but the model has {num_experts}",
                            key=key)
        return self

    # --- file ------------------------------------------------------------------------------
    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, version=VERSION, num_experts=self.num_experts, top_k=self.top_k,
                    num_layers=self.num_layers)
        arrays = {"experts": self.experts, "weights": self.weights, "meta": np.array(json.dumps(meta))}
        if self.row is not None:
            arrays["row"] = np.asarray(self.row, dtype=np.int32)
        if self.call is not None:
            arrays["call"] = np.asarray(self.call, dtype=np.int32)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path, key: str = "trace") -> "RoutingTrace":
        path = Path(path).expanduser()
        if not path.exists():
            raise UserError(f"no trace file at {path}", key=key)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                tr = cls(z["experts"], int(meta["num_experts"]), z["weights"],
                         z["row"] if "row" in z else None, z["call"] if "call" in z else None, meta)
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # torn / foreign files
            raise UserError(f"{path} is not an effrun routing trace ({type(e).__name__}: {e})", key=key) from None
        if tr.num_tokens == 0:
            raise UserError(f"the routing trace {path} is empty (0 tokens)", key=key)
        return tr

    @classmethod
    def concat(cls, traces: List["RoutingTrace"]) -> "RoutingTrace":
        t0 = traces[0]
        cat = lambda name: (None if any(getattr(t, name) is None for t in traces)
                            else np.concatenate([getattr(t, name) for t in traces]))
        return cls(np.concatenate([t.experts for t in traces]), t0.num_experts,
                   np.concatenate([t.weights for t in traces]), cat("row"), cat("call"), dict(t0.meta))


class TraceRecorder:
    """Context manager: record the top-k expert ids and weights every MoE layer is called with.

    It hooks the experts modules (forward pre-hooks, read-only), so outputs are unchanged and the
    recorded ids are exactly the ones the experts ran with (after any family-specific routing:
    group-limited top-k in DeepSeek-V3, softmax-after-topk in GPT-OSS, renormalisation...).
    """

    def __init__(self, model, layers=None, meta: Optional[Dict[str, Any]] = None):
        from effrun.techniques._moe.layers import require_moe

        self.model = model
        self.layers = layers if layers is not None else require_moe(model)
        self.meta = dict(meta or {})
        self._handles = []
        self._per_layer: List[List] = [[] for _ in self.layers]
        self._calls: List[tuple] = []  # (batch rows, tokens per row)
        self.enabled = True

    def __enter__(self):
        import torch

        def top_hook(mod, args, kwargs):
            if not self.enabled:
                return
            x = kwargs.get("input_ids")
            if x is None:
                x = kwargs.get("inputs_embeds")
            if x is None and args:
                x = args[0]
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                self._calls.append((int(x.shape[0]), int(x.shape[1])))
            else:
                self._calls.append((1, -1))

        self._handles.append(self.model.register_forward_pre_hook(top_hook, with_kwargs=True))
        from effrun.techniques._moe.layers import _split_args

        for i, layer in enumerate(self.layers):
            def hook(mod, args, kwargs, i=i):
                if not self.enabled:
                    return
                _, idx, w = _split_args(args, kwargs)
                self._per_layer[i].append((idx.detach().to("cpu", copy=True),
                                           w.detach().to("cpu", dtype=torch.float32, copy=True)))

            self._handles.append(layer.experts.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def trace(self) -> RoutingTrace:
        import torch

        counts = {len(p) for p in self._per_layer}
        if len(counts) != 1:
            raise RuntimeError(f"MoE layers were called unevenly: {[len(p) for p in self._per_layer]}")
        E = self.layers[0].num_experts
        k = self.layers[0].top_k
        if not self._per_layer[0]:
            return RoutingTrace(np.zeros((0, len(self.layers), k), np.int16), E, meta=self._meta())
        idx = torch.stack([torch.cat([c[0].reshape(-1, c[0].shape[-1]) for c in p]) for p in self._per_layer], 1)
        w = torch.stack([torch.cat([c[1].reshape(-1, c[1].shape[-1]) for c in p]) for p in self._per_layer], 1)
        rows, calls = [], []
        per_call = [c[0].reshape(-1, c[0].shape[-1]).shape[0] for c in self._per_layer[0]]
        for ci, n in enumerate(per_call):
            b, s = self._calls[ci] if ci < len(self._calls) else (1, n)
            s = s if s > 0 and b * s == n else n
            b = n // s
            rows.append(np.repeat(np.arange(b, dtype=np.int32), s))
            calls.append(np.full(n, ci, dtype=np.int32))
        return RoutingTrace(idx.numpy(), E, w.numpy(), np.concatenate(rows), np.concatenate(calls), self._meta())

    def _meta(self) -> Dict[str, Any]:
        cfg = getattr(self.model, "config", None)
        return dict({"model_type": getattr(cfg, "model_type", None),
                     "layer_ids": [l.layer_id for l in self.layers],
                     "layer_names": [l.name for l in self.layers]}, **self.meta)


def record(model, fn, meta: Optional[Dict[str, Any]] = None) -> tuple:
    """Run ``fn()`` with a TraceRecorder on ``model``; returns (fn's result, RoutingTrace)."""
    with TraceRecorder(model, meta=meta) as rec:
        out = fn()
    return out, rec.trace()
