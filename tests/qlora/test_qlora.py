"""QLoRA (peft LoRA over an NF4 base) and the NF4 backends it shares with QPaCA."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from effrun.metrics.memory import SavedTensorCounter
from effrun.techniques.common import DEFAULT_TARGETS
from effrun.techniques.paca import ops
from effrun.techniques.qlora import BACKENDS, available, nf4
from effrun.techniques.qlora.plugin import NF4Linear, quantize_linears
from tests.conftest import TINY

HAVE = [b for b in BACKENDS if available(b)]


def _blocks(t, block=64):
    flat = t.reshape(-1)
    return torch.cat([flat, flat.new_zeros((-flat.numel()) % block)]).view(-1, block)


@pytest.mark.parametrize("backend", HAVE)
def test_nf4_backends_reconstruct_within_the_codebook_bound(backend):
    """Every element within half the widest NF4 gap times its block's absmax (plus the error of a
    double-quantized scale); the same bound as the hand-written quantiser's test."""
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    w[5, 9] = 1.2  # an outlier only widens its own block
    q = nf4.quantize(w, backend, 64, True)
    deq = q.dequantize(torch.float32)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    err = _blocks(deq - w).abs().amax(1)
    absmax = _blocks(w).abs().amax(1)
    half_gap = (1 - 0.6961928009986877) / 2
    # a double-quantized scale (int8 steps over the scales' range around their mean) is off by at
    # most half a step, <= delta; the element error then grows by at most (1 + half_gap) * delta
    delta = (absmax - absmax.mean()).abs().max() / 127
    assert torch.all(err <= half_gap * absmax + 1.2 * delta + 1e-7)
    assert (deq - w).norm() / w.norm() < 0.12
    assert q.nbytes() * 8 / w.numel() < 4.6  # 4-bit codes + (double-quantized) scales


def test_bitsandbytes_nf4_equals_the_hand_written_quantiser_bit_for_bit():
    """Without double quantization both are the same algorithm (absmax blocks, nearest NF4 level):
    an independent implementation agreeing exactly checks both."""
    if "bnb" not in HAVE:
        pytest.skip("bitsandbytes not installed")
    torch.manual_seed(1)
    w = torch.randn(64, 192) * 0.02
    a = nf4.quantize(w, "bnb", 64, False).dequantize()
    b = ops.dequantize_blocks(ops.quantize_blocks(w, "nf4", 64, False))
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", HAVE)
def test_nf4_linear_grads_equal_dense_reference_and_save_nothing(backend):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48)
    m = NF4Linear.convert(copy.deepcopy(lin), backend, 64, True)
    W = m.dequantized_weight().detach()
    x = torch.randn(2, 5, 128, requires_grad=True)
    g = torch.randn(2, 5, 48)
    with SavedTensorCounter(m) as c:
        y = m(x)
    assert c.bytes == 0  # the base saves no activation (the adapters save theirs)
    y.backward(g)
    xr = x.detach().clone().requires_grad_(True)
    yr = F.linear(xr, W, lin.bias.detach())
    yr.backward(g)
    torch.testing.assert_close(y, yr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-6)
    assert not m.weight.requires_grad and m.weight.dtype == torch.uint8 and m.bias.grad is None


@pytest.mark.parametrize("backend", HAVE)
def test_nf4_state_loads_in_place_into_another_model(backend):
    a = NF4Linear.convert(torch.nn.Linear(128, 64), backend, 64, True)
    b = NF4Linear.convert(torch.nn.Linear(128, 64), backend, 64, True)  # other random weights
    assert not torch.equal(a.dequantized_weight(), b.dequantized_weight())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.dequantized_weight(), b.dequantized_weight())


def _tiny(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    m.config.use_cache = False
    return m


def test_qlora_model_at_init_equals_the_dequantized_base_and_only_adapters_train():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from effrun.techniques.qlora import QloraConfig
    from effrun.techniques.qlora.plugin import Qlora

    base = _tiny()
    tech = Qlora(OmegaConf.structured(QloraConfig()), SimpleNamespace())
    model = tech.transform_model(copy.deepcopy(base))
    assert len(tech.layers) == 14 and all(isinstance(m, NF4Linear) for m in tech.layers.values())
    ref = copy.deepcopy(base)  # the same network with each target replaced by its dequantized weight
    for name, q in tech.layers.items():
        parent, _, leaf = name.rpartition(".")
        lin = getattr(ref.get_submodule(parent), leaf)
        with torch.no_grad():
            lin.weight.copy_(q.dequantized_weight())
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():  # LoRA's B starts at zero: the output is the NF4 base's
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    met = tech.metrics()
    assert met["measured/qlora_layers"] == 14
    assert met["measured/qlora_quantized_weight_bytes"] * 5 < met["measured/qlora_dense_weight_bytes"]


def test_quantize_linears_refuses_bad_targets_before_touching_the_model():
    from effrun.errors import UserError

    m = _tiny()
    with pytest.raises(UserError) as e:
        quantize_linears(m, ["q_proj", "nope"], "effrun", 64, True)
    assert e.value.key == "technique.target_modules"
    assert not any(isinstance(x, NF4Linear) for x in m.modules())


def test_cli_qlora_trains_exports_and_matches_lora_params(effrun):
    from transformers import AutoModelForCausalLM

    r = effrun("-m", "train", "+technique=qlora,lora", *TINY, "run.export=true", "run.max_steps=4")
    by = {s["technique"]: s for s in (r.summary(i) for i in range(len(r.run_dirs())))}
    q, lo = by["qlora"], by["lora"]
    assert q["status"] == lo["status"] == "completed"
    assert q["measured/params_trainable"] == lo["measured/params_trainable"]
    assert q["measured/qlora_layers"] == 14
    assert q["measured/qlora_quantized_weight_bytes"] * 5 < q["measured/qlora_dense_weight_bytes"]
    # the base stays frozen: nothing but the adapters' inputs are saved beyond LoRA's own
    assert q["measured/saved_bytes"] <= lo["measured/saved_bytes"]
    model = AutoModelForCausalLM.from_pretrained(q["info/export_dir"])
    assert not any("lora" in k or "nf4" in k for k in model.state_dict())
    assert torch.isfinite(model(input_ids=torch.randint(0, 256, (1, 8))).logits).all()


@pytest.mark.parametrize("args,key", [
    (["technique.backend=gptq"], "technique.backend"),
    (["technique.quant_block=100"], "technique.quant_block"),   # bitsandbytes: 64, 128, ... 4096
    (["technique.r=0"], "technique.r"),
    (["+technique@technique2=paca"], "technique2"),              # both adapt the same linears
])
def test_cli_bad_input_exits_2_before_training(effrun, args, key):
    r = effrun("train", "+technique=qlora", *TINY, *args, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert err and key in err[-1], r.stderr[-2000:]
    assert not any(d.joinpath("metrics.jsonl").exists() for d in r.run_dirs())
