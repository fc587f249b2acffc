"""PaCA / QPaCA unit tests on single layers and the tiny Llama (in-process, float64 where exact)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from effrun.metrics.memory import SavedTensorCounter
from effrun.techniques.common import DEFAULT_TARGETS
from effrun.techniques.paca import ops
from effrun.techniques.paca.plugin import (PacaLinear, QPacaLinear, apply_paca, merge_paca, paca_modules)

TINY_CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=False)


def tiny_llama(dtype=torch.float64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**TINY_CFG)).to(dtype)
    m.config.use_cache = False
    return m


def batch(b=2, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, t + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def lm_loss(model, x, y):
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def p_grads(model):
    return {n: m.paca_p.grad.clone() for n, m in paca_modules(model).items()}


def sync_all(model):
    for m in paca_modules(model).values():
        if isinstance(m, PacaLinear):
            m.sync()


# --- the custom function ----------------------------------------------------------------------

def _dense_reference(W0, b, idx, p, scaling, x, g):
    """Plain autograd: W with columns idx replaced by scaling * P (trainable), the rest frozen."""
    P = p.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    W = W0.index_copy(1, idx, scaling * P)
    (xr @ W.t() + b).backward(g)
    return xr.grad, P.grad


@pytest.mark.parametrize("scaling", [1.0, 4.0, 0.3])
def test_float64_grads_equal_dense_reference(scaling):
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 10, dtype=torch.float64)
    idx = torch.tensor([1, 5, 6, 17, 23])
    PacaLinear.convert(lin, idx, scaling)
    with torch.no_grad():  # move the columns away from their init, as after some training
        lin.paca_p.add_(torch.randn_like(lin.paca_p))
    lin.sync()
    W_now = lin.weight.detach().clone()
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, 10, dtype=torch.float64)
    lin(x).backward(g)
    gx_ref, gp_ref = _dense_reference(W_now, lin.bias.detach(), idx, lin.paca_p, scaling, x, g)
    torch.testing.assert_close(x.grad, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin.paca_p.grad, gp_ref, rtol=1e-12, atol=1e-12)
    assert lin.weight.grad is None and lin.bias.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_are_only_the_selected_columns(dtype):
    B, T, IN, OUT, r = 3, 11, 40, 24, 6
    lin = torch.nn.Linear(IN, OUT, dtype=dtype)
    PacaLinear.convert(lin, torch.arange(0, IN, IN // r)[:r], 2.0)
    x = torch.randn(B, T, IN, dtype=dtype, requires_grad=True)
    with SavedTensorCounter(lin) as c:
        y = lin(x)
    assert c.bytes == B * T * r * torch.tensor([], dtype=dtype).element_size()
    assert c.count == 1
    y.sum().backward()
    assert lin.paca_p.grad.dtype == dtype and lin.paca_p.grad.shape == (OUT, r)


def test_bf16_grads_close_to_float64():
    torch.manual_seed(0)
    lin64 = torch.nn.Linear(64, 32, dtype=torch.float64)
    lin16 = copy.deepcopy(lin64).to(torch.bfloat16)
    idx = torch.arange(3, 64, 4)
    PacaLinear.convert(lin64, idx, 2.0)
    PacaLinear.convert(lin16, idx, 2.0)
    x = torch.randn(4, 8, 64, dtype=torch.float64)
    lin64(x).square().sum().backward()
    lin16(x.bfloat16()).float().square().sum().backward()
    rel = (lin16.paca_p.grad.double() - lin64.paca_p.grad).norm() / lin64.paca_p.grad.norm()
    assert rel < 0.03


# --- the model transform ----------------------------------------------------------------------

def test_output_equals_base_at_init_and_only_columns_train():
    base = tiny_llama()
    model = copy.deepcopy(base)
    layers = apply_paca(model, 16, 64.0, DEFAULT_TARGETS, seed=0)
    assert len(layers) == 14
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(base(input_ids=x).logits, model(input_ids=x).logits)
    x.requires_grad_(False)
    assert torch.equal(base(input_ids=x).logits.detach(), model(input_ids=x).logits.detach())  # grad path
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("paca_p") for n in trainable)
    for m in layers.values():  # sorted, distinct, r of in_features, a persistent buffer
        idx = m.paca_idx
        assert idx.numel() == 16 and torch.all(idx[1:] > idx[:-1]) and int(idx.max()) < m.in_features
    assert any(k.endswith("paca_idx") for k in model.state_dict())


def test_update_point_is_explicit_and_touches_only_the_columns():
    model = tiny_llama()
    apply_paca(model, 8, 16.0, ["q_proj", "down_proj"], seed=3)
    before = {n: m.weight.detach().clone() for n, m in paca_modules(model).items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = batch()
    lm_loss(model, x, y).backward()
    opt.step()
    for n, m in paca_modules(model).items():  # optimizer step alone leaves the weight alone
        assert torch.equal(m.weight, before[n])
    sync_all(model)
    for n, m in paca_modules(model).items():
        keep = torch.ones(m.in_features, dtype=torch.bool)
        keep[m.paca_idx] = False
        assert torch.equal(m.weight[:, keep], before[n][:, keep])
        assert torch.equal(m.weight[:, m.paca_idx], m.paca_p.detach() * m.paca_scaling)
        assert not torch.equal(m.weight[:, m.paca_idx], before[n][:, m.paca_idx])


def test_grad_accumulation_equals_one_big_batch():
    a = tiny_llama()
    apply_paca(a, 8, 16.0, DEFAULT_TARGETS, seed=0)
    b = copy.deepcopy(a)
    x, y = batch(b=4)
    lm_loss(a, x, y).backward()
    for sl in (slice(0, 2), slice(2, 4)):
        (lm_loss(b, x[sl], y[sl]) / 2).backward()
    ga, gb = p_grads(a), p_grads(b)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-10, atol=1e-12)


def test_gradient_checkpointing_gives_identical_grads():
    a = tiny_llama()
    apply_paca(a, 8, 16.0, DEFAULT_TARGETS, seed=0)
    b = copy.deepcopy(a)
    b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    b.train(), a.train()
    x, y = batch()
    lm_loss(a, x, y).backward()
    lm_loss(b, x, y).backward()
    ga, gb = p_grads(a), p_grads(b)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-12, atol=1e-13)


def _train_steps(model, steps, lr=1e-2, opt=None):
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for s in range(steps):
        x, y = batch(seed=10 + s)
        loss = lm_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sync_all(model)
        losses.append(float(loss))
    return opt, losses


def test_merged_equals_unmerged_and_export_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from effrun.techniques.paca.plugin import Paca

    model = tiny_llama()
    apply_paca(model, 8, 16.0, DEFAULT_TARGETS, seed=0)
    _train_steps(model, 2)
    x, _ = batch(seed=99)
    with torch.no_grad():
        ref = model(input_ids=x).logits
        merged = copy.deepcopy(model)
        merge_paca(merged)
        assert not paca_modules(merged)
        torch.testing.assert_close(merged(input_ids=x).logits, ref, rtol=0, atol=0)

    from types import SimpleNamespace

    tech = Paca.__new__(Paca)
    tech.ctx = SimpleNamespace(family=SimpleNamespace(tokenizer=object()))
    tech.export(model, tmp_path / "export")
    assert paca_modules(model), "export must leave the training model intact"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float64)
    assert not any("paca" in k for k in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ref, rtol=0, atol=0)


def test_column_indices_and_training_state_survive_checkpoint(tmp_path):
    """Through the train loop's checkpoint module and default engine: the column indices (buffers),
    P, the synced weights and the optimizer state all come back."""
    from omegaconf import OmegaConf

    from effrun.context import Context
    from effrun.loops import checkpoint as ckpt
    from effrun.loops.batchplan import BatchPlan
    from effrun.loops.engine import PlainEngine

    ctx = Context(cfg=OmegaConf.create({"run": {"lr": 1e-2, "weight_decay": 0.0, "max_grad_norm": None}}),
                  mode="train", run_dir=tmp_path)

    def engine(model):
        return PlainEngine(ctx, model, [p for p in model.parameters() if p.requires_grad])

    class _T:  # stands in for the plugin in the checkpoint's technique list
        name = "paca"

        def __init__(self, model):
            self.model = model

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            sync_all(self.model)

    a = tiny_llama()
    apply_paca(a, 8, 16.0, DEFAULT_TARGETS, seed=0)
    eng_a = engine(a)
    opt_a, _ = _train_steps(a, 2, opt=eng_a.opt)
    ckpt.save(ctx, 2, eng_a, BatchPlan(), [_T(a)])
    _, tail_a = _train_steps(a, 2, opt=opt_a)

    b = tiny_llama(seed=5)  # different base init and different column seed: all must be restored
    apply_paca(b, 8, 16.0, DEFAULT_TARGETS, seed=1)
    eng_b = engine(b)
    opt_b = eng_b.opt
    assert ckpt.load(ctx, eng_b, BatchPlan(), [_T(b)]) == 2
    for n, m in paca_modules(b).items():
        assert torch.equal(m.paca_idx, paca_modules(a)[n].paca_idx)
    _, tail_b = _train_steps(b, 2, opt=opt_b)
    assert tail_a == tail_b
    for n, m in paca_modules(b).items():
        assert torch.equal(m.weight, paca_modules(a)[n].weight)


def test_r_too_large_is_a_user_error():
    from effrun.errors import UserError

    model = tiny_llama()
    with pytest.raises(UserError) as e:
        apply_paca(model, 65, 1.0, DEFAULT_TARGETS, seed=0)
    assert e.value.key == "technique.r" and "q_proj" in str(e.value)
    assert not paca_modules(model)


@pytest.mark.parametrize("targets", [["q_proj", "nope"], ["act_fn"]])  # missing; exists but not nn.Linear
def test_bad_target_module_is_a_user_error(targets):
    from effrun.errors import UserError

    model = tiny_llama()
    with pytest.raises(UserError) as e:
        apply_paca(model, 4, 1.0, targets, seed=0)
    assert e.value.key == "technique.target_modules" and "q_proj" in e.value.choices
    assert not paca_modules(model)


# --- QPaCA -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,double", [("nf4", True), ("nf4", False), ("int8", True), ("int8", False)])
def test_block_quantization_error_is_bounded(mode, double):
    torch.manual_seed(0)
    w = torch.randn(96, 200) * 0.05
    w[3, 7] = 1.5  # an outlier only hurts its own block
    q = ops.quantize_blocks(w, mode, 64, double)
    deq = ops.dequantize_blocks(q)
    assert deq.shape == w.shape
    flat_err = (deq - w).reshape(-1)
    pad = (-flat_err.numel()) % 64
    err = torch.cat([flat_err, flat_err.new_zeros(pad)]).view(-1, 64).abs().amax(1)
    absmax = torch.cat([w.reshape(-1), w.new_zeros(pad)]).view(-1, 64).abs().amax(1)
    # half the widest gap of the code book, plus the error of a double-quantized scale
    half_gap = (1 - 0.6961928009986877) / 2 if mode == "nf4" else 0.5 / 127
    scale_err = (ops.block_scales(q) - absmax).abs() if double else torch.zeros_like(absmax)
    assert torch.all(err <= half_gap * absmax + scale_err + 1e-7)
    rel = (deq - w).norm() / w.norm()
    # (double quantization of int8 costs accuracy here: the outlier block widens the scales' range)
    assert rel < {"nf4": 0.12, "int8": 0.03 if double else 0.01}[mode]
    bits = sum(v.numel() * v.element_size() * 8 for v in q.values() if torch.is_tensor(v)) / w.numel()
    assert bits < (4.6 if mode == "nf4" else 8.6)


@pytest.mark.parametrize("backend", ["bnb", "torchao", "effrun"])
def test_qpaca_grads_equal_dense_reference_and_saves_slice_only(backend):
    from effrun.techniques.qlora import available

    if not available(backend):
        pytest.skip(f"{backend} not installed")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, dtype=torch.float64)
    idx = torch.tensor([0, 9, 31, 40, 63])
    q = QPacaLinear(lin, idx, 2.0, "nf4", 64, True, backend)
    assert q.qbackend == backend
    assert torch.equal(q.paca_p * 2.0, lin.weight[:, idx])  # the selected columns stay exact
    W = q.dequantized_weight().detach()
    x = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 32, dtype=torch.float64)
    with SavedTensorCounter(q) as c:
        y = q(x)
    assert c.bytes == 2 * 5 * 5 * 8
    y.backward(g)
    gx_ref, gp_ref = _dense_reference(W, lin.bias.detach(), idx, q.paca_p, 2.0, x, g)
    torch.testing.assert_close(x.grad, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.paca_p.grad, gp_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_qpaca_trains_and_exports(mode):
    model = tiny_llama(torch.float32)
    layers = apply_paca(model, 16, 32.0, DEFAULT_TARGETS, seed=0, quantize=mode)
    assert all(isinstance(m, QPacaLinear) for m in layers.values())
    assert not any(n.endswith(".weight") and "proj" in n for n, _ in model.named_parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    x, y = batch(b=4, t=32, seed=7)
    losses = []
    for _ in range(12):
        loss = lm_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05
    with torch.no_grad():
        ref = model(input_ids=x).logits
        merge_paca(model)
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=1e-5, atol=1e-5)


def test_layer_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    PacaLinear.convert(lin, torch.arange(0, 32, 4), 2.0)
    ref = copy.deepcopy(lin)
    x = torch.randn(4, 32, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    f = torch.compile(lambda a: lin(a).square().sum(), fullgraph=True)  # fullgraph: no graph break
    f(x).backward()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(lin.paca_p.grad, ref.paca_p.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_flop_counter_counts_the_paca_op_forward_and_its_backward_matmuls():
    """FlopCounterMode alone would count PaCA's custom op as 0: the registered formula gives its
    GEMM; the backward's dx and dP matmuls are counted as they run (no dW: the point of PaCA)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from effrun.techniques.paca import ops

    rows, d_in, d_out, r = 3 * 5, 8, 6, 2
    x = torch.randn(3, 5, d_in, requires_grad=True)
    w, p = torch.randn(d_out, d_in), torch.randn(d_out, r, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        ops.paca_linear(x, w, None, torch.tensor([1, 4]), p, 1.0).sum().backward()
    assert fc.get_total_flops() == 2 * rows * d_in * d_out + 2 * rows * d_out * d_in + 2 * rows * d_out * r


# --- every layer owns its own index buffer with its own draw ----------------------------------

def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_every_layer_owns_its_index_buffer_with_its_own_draw(tmp_path, quantize):
    """The indices of each targeted layer are that layer's own draw from the one seeded generator
    (in module order), in a buffer no other layer shares, and stay so through a saved checkpoint
    and a load into a model built with another seed. Two layers sharing one `paca_idx` tensor
    (or one draw) fail here: the reference draws differ from layer to layer."""
    from effrun.techniques.common import find_linears

    model = tiny_llama(torch.float32)
    names = list(find_linears(model, DEFAULT_TARGETS))
    widths = [m.in_features for m in find_linears(model, DEFAULT_TARGETS).values()]
    layers = apply_paca(model, 8, 16.0, DEFAULT_TARGETS, seed=7, quantize=quantize)
    assert list(layers) == names
    gen = torch.Generator().manual_seed(7)
    ref = [torch.sort(torch.randperm(w, generator=gen)[:8]).values for w in widths]  # one draw per layer
    assert len({tuple(r.tolist()) for r in ref}) == len(ref)  # the reference draws all differ
    idx = [layers[n].paca_idx for n in names]
    for got, want in zip(idx, ref):
        assert torch.equal(got, want)
    assert len({_storage(t) for t in idx}) == len(idx)  # one buffer per layer, none shared
    idx[0][0] = idx[0][0] + 1  # writing one layer's indices leaves every other layer's alone
    assert all(torch.equal(t, r) for t, r in zip(idx[1:], ref[1:]))
    idx[0][0] = idx[0][0] - 1

    # a checkpoint (the model state saved by torch.save) keeps per-layer buffers and draws ...
    torch.save(model.state_dict(), tmp_path / "m.pt")
    sd = torch.load(tmp_path / "m.pt", weights_only=True)
    saved = [sd[f"{n}.paca_idx"] for n in names]
    assert len({_storage(t) for t in saved}) == len(saved)
    for got, want in zip(saved, ref):
        assert torch.equal(got, want)
    # ... and loading it into a model built with another seed restores each layer's own draw
    other = tiny_llama(torch.float32, seed=3)
    other_layers = apply_paca(other, 8, 16.0, DEFAULT_TARGETS, seed=11, quantize=quantize)
    other.load_state_dict(sd)
    loaded = [other_layers[n].paca_idx for n in names]
    assert len({_storage(t) for t in loaded}) == len(loaded)
    for got, want in zip(loaded, ref):
        assert torch.equal(got, want)
