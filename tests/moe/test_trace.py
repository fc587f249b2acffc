"""Routing-trace capture: family-agnostic discovery, outputs unchanged, ids equal the router's."""
import numpy as np
import pytest
import torch

from effrun.errors import UserError
from effrun.techniques._moe.layers import find_moe_layers, run_single_expert
from effrun.techniques._moe.trace import RoutingTrace, TraceRecorder

from .helpers import tiny_moe


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "gpt_oss"])
def test_capture_does_not_change_outputs_and_matches_router(family):
    model = tiny_moe(family)
    layers = find_moe_layers(model)
    assert len(layers) == 2 and all(l.num_experts == 8 and l.top_k == 2 for l in layers)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        # the router's own decision, computed independently of the recorder
        seen = {}
        hs = [l.router.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o[2].clone()))
              for i, l in enumerate(layers)]
        with TraceRecorder(model) as rec:
            out = model(input_ids=ids).logits
        for h in hs:
            h.remove()
    assert torch.equal(out, ref)
    tr = rec.trace()
    assert tr.experts.shape == (14, 2, 2)
    for i in range(2):
        assert np.array_equal(tr.experts[:, i, :], seen[i].reshape(14, 2).numpy())
    assert np.array_equal(tr.row, np.repeat([0, 1], 7))


def test_single_expert_helper_matches_manual_mixtral():
    model = tiny_moe("mixtral")
    ex = find_moe_layers(model)[0].experts
    x = torch.randn(5, 32)
    with torch.no_grad():
        y = run_single_expert(ex, 3, x)
    gate, up = torch.nn.functional.linear(x, ex.gate_up_proj[3]).chunk(2, dim=-1)
    ref = torch.nn.functional.linear(ex.act_fn(gate) * up, ex.down_proj[3])
    assert torch.allclose(y, ref, atol=1e-5)


def test_generate_trace_roundtrip_and_bad_input(tmp_path):
    model = tiny_moe("mixtral")
    from effrun.families.causal_lm.decode import greedy_generate

    with TraceRecorder(model, meta={"split": "test"}) as rec:
        new, _ = greedy_generate(model, torch.tensor([[1, 2, 3, 4]]), 3)
    tr = rec.trace()
    assert tr.num_tokens == 4 + 2  # prefill + 2 cached decode calls (the 3rd token is not fed back)
    assert list(tr.call) == [0, 0, 0, 0, 1, 2]
    p = tr.save(tmp_path / "t.npz")
    back = RoutingTrace.load(p)
    assert np.array_equal(back.experts, tr.experts) and back.meta["split"] == "test"
    assert back.num_experts == 8 and back.top_k == 2
    with pytest.raises(UserError, match="layers"):
        back.require(num_layers=3, num_experts=8)
    with pytest.raises(UserError, match="experts per layer"):
        back.require(num_layers=2, num_experts=16)
    with pytest.raises(UserError, match="empty"):
        back.subset(np.zeros(back.num_tokens, bool)).require()
    with pytest.raises(UserError, match="no trace file"):
        RoutingTrace.load(tmp_path / "missing.npz")
