"""Helpers several techniques share: resolving target linear modules by name suffix, and turning a
converted layer back into a plain frozen nn.Linear for export."""
from __future__ import annotations

from typing import Dict, List, Sequence

from effrun.errors import UserError

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def find_linears(model, targets: Sequence[str], key: str = "technique.target_modules") -> Dict[str, "object"]:
    """{qualified name: nn.Linear} for modules whose last name component is in targets.

    Unknown targets (matching nothing) or targets that are not nn.Linear raise a UserError that
    lists the linear layer names the model has.
    """
    import torch.nn as nn

    found, seen = {}, set()
    linear_names = set()
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.Linear) and "lm_head" not in name:
            linear_names.add(leaf)
        if leaf in targets:
            seen.add(leaf)
            if not isinstance(mod, nn.Linear):
                raise UserError(f"target {leaf!r} is a {type(mod).__name__}, not nn.Linear", key=key,
                                choices=sorted(linear_names))
            found[name] = mod
    missing = [t for t in targets if t not in seen]
    if missing:
        raise UserError(f"target module(s) {missing} not found in the model", key=key, choices=sorted(linear_names))
    return found


def as_list(x) -> List[str]:
    return [str(v) for v in x]


def plain_linear(weight, bias=None):
    """A frozen nn.Linear holding `weight` (out x in) and `bias` as they are (no copy, no init):
    what a converted layer (PaCA, QPaCA, QLoRA's NF4) becomes when it is merged for export."""
    import torch.nn as nn

    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin
