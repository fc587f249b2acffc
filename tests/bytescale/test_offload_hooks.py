"""Selective offload via saved_tensors_hooks: what comes back is bit-identical, and it is used."""
import pytest
import torch

from effrun.techniques.bytescale import offload as O
from effrun.techniques.bytescale import ring as R
from effrun.techniques.bytescale.planner import MicroBatch, Piece
from effrun.techniques.bytescale.engine import PlanIndex, assemble


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    m = LlamaForCausalLM(cfg)
    m.set_attn_implementation(R.register())
    return m


def _grads(m, x, pos, y, hooks=None):
    m.zero_grad(set_to_none=True)
    lay = R.Layout(n_tokens=x.numel(), ring=None, local=[(0, 40), (40, x.numel())])
    ctx = hooks if hooks is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with R.use_layout(lay), ctx:
        logits = m(input_ids=x[None], position_ids=pos[None], use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[0], y, reduction="sum").backward()
    return [p.grad.clone() for p in m.parameters()]


def test_offload_hooks_restore_bit_exact():
    m = _model()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 256, (41,), generator=g), torch.randint(0, 256, (31,), generator=g)]
    mb = MicroBatch(0, [Piece(0, ((0, 40),), (0,)), Piece(1, ((0, 30),), (0,))])
    x, y, pos = assemble(mb, seqs)
    base = _grads(m, x, pos, y)
    hooks = O.OffloadHooks(m, O.offloaded_layers(1.0, 4))
    assert O.offloaded_layers(1.0, 4) == [1, 2] and O.offloaded_layers(0.5, 4) == [1]
    got = _grads(m, x, pos, y, hooks)
    assert hooks.count > 0 and hooks.bytes > 0
    for a, b in zip(base, got):
        assert torch.equal(a, b)
    # and the packed tensors really were copies (not the originals kept alive)
    seen = []
    h2 = O.OffloadHooks(m, [1])
    orig = h2._pack
    h2._pack = lambda t: (lambda p: (seen.append((t, p)), p)[1])(orig(t))
    _grads(m, x, pos, y, h2)
    assert seen and all(isinstance(p, tuple) and p[1].data_ptr() != t.data_ptr() for t, p in seen if isinstance(p, tuple))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream path needs CUDA")
def test_offload_on_side_streams_is_bit_exact_on_cuda():
    """CUDA: copies on side streams (D2H under the forward, H2D prefetched in the backward) give the
    same gradients bit for bit as no offload, and the side streams were used."""
    m = _model().cuda()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 256, (41,), generator=g), torch.randint(0, 256, (31,), generator=g)]
    mb = MicroBatch(0, [Piece(0, ((0, 40),), (0,)), Piece(1, ((0, 30),), (0,))])
    x, y, pos = (t.cuda() for t in assemble(mb, seqs))
    base = _grads(m, x, pos, y)
    hooks = O.OffloadHooks(m, O.offloaded_layers(1.0, 4))
    got = _grads(m, x, pos, y, hooks)
    torch.cuda.synchronize()
    assert hooks.count > 0 and hooks._streams
    assert all(p.dev is None and p.host is None for ps in hooks._by_layer.values() for p in ps)  # all came back
    for a, b in zip(base, got):
        assert torch.equal(a, b)
