"""Tiny random Llama targets (float64, so argmax ties between the tree and the serial path cannot
flip a token) and a draft head trained for a few seconds on the target's own samples."""
import contextlib

import pytest
import torch


@contextlib.contextmanager
def single_thread():
    """Tiny shapes: one intra-op thread is fastest and immune to a busy machine's oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiny_target(vocab=64, hidden=64, layers=2, seed=0, dtype=torch.float64, sharpness=8.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked next-token distributions, like a trained LM (random init is ~uniform)
        m.lm_head.weight.mul_(sharpness)
    m = m.to(dtype).eval()
    m.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    m.generation_config.pad_token_id = 0
    return m


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="session")
def target():
    return tiny_target()


@pytest.fixture(scope="session")
def trained_drafts(target):
    """{fusion: draft head} trained 120 steps on the target's greedy continuations (fp32 training,
    then float64 like the target)."""
    with single_thread():
        return _train_drafts(target)


def _train_drafts(target):
    from effrun.techniques.dovetail.draft import DraftHead
    from effrun.techniques.dovetail.train import DovetailTrainModule

    t32 = tiny_target(dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    with torch.no_grad():
        data = t32.generate(torch.randint(0, 64, (48, 4), generator=g), max_new_tokens=48, do_sample=False)
    out = {}
    for fusion, layers in (("dgf", 2), ("fc", 1)):
        mod = DovetailTrainModule(t32, DraftHead.for_target(t32, fusion, layers, seed=0))
        opt = torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=3e-3)
        for _ in range(120):
            idx = torch.randint(0, len(data), (16,), generator=g)
            loss, n = mod.loss({"input_ids": data[idx]})
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
        out[fusion] = rebind(mod.draft, target)
    return out


def rebind(draft, target):
    """The same trained head bound to `target`'s embedding/lm_head (float64)."""
    from effrun.techniques.dovetail.draft import DraftHead, target_io

    dec, head = target_io(target)
    d = DraftHead(draft.spec, dec.get_input_embeddings().weight, head.weight)
    d.load_state_dict(draft.state_dict())
    return d.to(torch.float64).eval()


@pytest.fixture
def prompt():
    return torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(7))
