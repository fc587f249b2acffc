"""`+technique=cga`: the transform_model seam swaps every MHSA of the family's plain ViT for cascaded
group attention (swap.swap_attention); the loops, the data, the loss and the speed protocol are the
family's. Summary: how many attentions were swapped and their parameters before and after."""
from __future__ import annotations

from effrun.technique import Technique
from effrun.techniques.cga.swap import TokenCGA, swap_attention


def _attn_params(model, kind) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, kind) for p in m.parameters())


class Cga(Technique):
    def transform_model(self, model):
        from effrun.families.image_classification.vit import MultiHeadSelfAttention

        self.before = _attn_params(model, MultiHeadSelfAttention)
        c = self.cfg
        model = swap_attention(model, key_dim=int(c.key_dim), kernel=int(c.kernel),
                               num_heads=None if c.num_heads is None else int(c.num_heads))
        self.layers, self.after = int(model.cga_swapped), _attn_params(model, TokenCGA)
        return model

    def metrics(self):
        if not hasattr(self, "layers"):
            return {}
        return {"measured/cga/layers": self.layers, "measured/cga/attn_params": self.after,
                "measured/cga/mhsa_attn_params": self.before}
