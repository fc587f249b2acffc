"""The DeepSpeed config effrun generates for engine=deepspeed (ZeRO-3 + ZeRO++ keys; no torch)."""
from __future__ import annotations


def hpz_size(scheme: str, p) -> int:
    """zero3: no secondary partition; zeropp: the node; hier3: the GCD pair (sub-devices)."""
    from effrun.techniques.zeropp3 import dims

    _, d, s = dims(p)
    return {"zeropp": d * s, "hier3": s}.get(scheme, 1)


def ds_config(cfg, node) -> dict:
    run, p, d = cfg.run, cfg.parallelism, cfg.data
    out = {
        "train_micro_batch_size_per_gpu": d.batch_size,
        "gradient_accumulation_steps": run.grad_accum,
        "train_batch_size": d.batch_size * run.grad_accum * p.world_size,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": 3,
            "zero_hpz_partition_size": hpz_size(node.scheme, p),
            "zero_quantized_weights": bool(node.quantized_weights),
            "zero_quantized_gradients": bool(node.quantized_gradients),
            "overlap_comm": bool(getattr(node, "overlap_comm", False)),
            "contiguous_gradients": True,
        },
    }
    if getattr(node, "deepspeed_config", None):
        out = merge(out, load_user_config(node.deepspeed_config))
    if run.max_grad_norm and "gradient_clipping" not in out:
        out["gradient_clipping"] = float(run.max_grad_norm)
    if run.dtype == "bfloat16":
        out["bf16"] = {"enabled": True}
    elif run.dtype == "float16":
        out["fp16"] = {"enabled": True}
    return out


def load_user_config(path) -> dict:
    """A user's DeepSpeed config (JSON or YAML), as DeepSpeed users keep them."""
    from pathlib import Path

    from effrun.errors import UserError

    p = Path(str(path)).expanduser()
    try:
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            from omegaconf import OmegaConf

            conf = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
        else:
            import json

            conf = json.loads(text)
    except Exception as e:
        raise UserError(f"cannot read DeepSpeed config {str(path)!r}: {type(e).__name__}: {e}",
                        key="technique.deepspeed_config") from None
    if not isinstance(conf, dict):
        raise UserError(f"DeepSpeed config {str(path)!r} is not a mapping", key="technique.deepspeed_config")
    return conf


def merge(base: dict, user: dict) -> dict:
    """The user's keys win, recursively (their zero_optimization keys over ours)."""
    out = dict(base)
    for k, v in user.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
