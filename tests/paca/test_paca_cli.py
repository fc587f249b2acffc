"""PaCA through the real CLI (tiny model), bad input, the max-seq-len search, one SmolLM2 fine-tune."""
from __future__ import annotations

import pytest

from effrun.loops.maxseq import search_max
from tests.conftest import TINY

# llama-tiny: per layer q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 64 output rows
TINY_ROWS = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)


def test_cli_paca_vs_lora_params_saved_bytes_and_export(effrun):
    import torch
    from transformers import AutoModelForCausalLM

    r = effrun("-m", "train", "+technique=paca,lora", *TINY, "run.grad_accum=2", "run.export=true")
    by = {s["technique"]: s for s in (r.summary(i) for i in range(len(r.run_dirs())))}
    paca, lora = by["paca"], by["lora"]
    assert paca["status"] == lora["status"] == "completed"
    assert paca["measured/params_trainable"] == 16 * TINY_ROWS
    # LoRA r=8 trains r * (in + out) per module: q 64+64, k/v 64+32, o 64+64, gate/up/down 64+128
    assert lora["measured/params_trainable"] == 8 * 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert paca["measured/saved_bytes"] < lora["measured/saved_bytes"]
    exp_dir = paca["info/export_dir"]
    model = AutoModelForCausalLM.from_pretrained(exp_dir)
    assert not any("paca" in k for k in model.state_dict())
    x = torch.randint(0, 256, (1, 12))
    assert torch.isfinite(model(input_ids=x).logits).all()


@pytest.mark.parametrize("args,key", [
    (["technique.r=65"], "technique.r"),                       # > in_features (64)
    (["technique.quantize=fp3"], "technique.quantize"),
    (["technique.quantize=nf4", "hardware=gaudi2"], "technique.quantize"),  # device without support
    (["+technique@technique2=lora"], "technique2"),               # paca with lora on the same modules
])
def test_cli_bad_input_exits_2_before_training(effrun, args, key):
    r = effrun("train", "+technique=paca", *TINY, *args, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert err and key in err[-1], r.stderr[-2000:]
    assert not any(d.joinpath("metrics.jsonl").exists() for d in r.run_dirs())


def test_search_max_finds_the_last_fitting_grid_point():
    for true_max in (0, 128, 256, 384, 1280, 4096):
        best, probed = search_max(lambda L: L <= true_max, 128, 4096)
        assert best == true_max
        assert len(probed) <= 2 + 5  # first, last, then log2(32) bisections
    assert search_max(lambda L: True, 128, 100) == (0, [])


def test_cli_find_max_seq_len_runs_real_probes(effrun):
    r = effrun("train", "+technique=paca", *TINY, "run.find_max_seq_len=true", "run.max_seq_len_search=512",
               "run.memory_budget_gb=16")
    s = r.summary()
    assert s["status"] == "completed"
    assert s["measured/max_seq_len"] == 512 and s["measured/max_seq_len_probes"] == [128, 512]
    rows = r.metrics()
    assert [row["seq_len"] for row in rows] == [128, 512] and all(row["fits"] for row in rows)
    assert 0 < s["measured/peak_mem_mb"] <= 16 * 1024


@pytest.mark.slow  # ~10 s on a quiet 2-core machine, minutes when it is shared
def test_smollm2_short_paca_finetune_lowers_eval_loss(need_assets, tmp_path):
    """Through effrun's train loop: eval on held-out plays before and after 4 PaCA steps."""
    from effrun.config.compose import compose_checked
    from effrun.experiment import Experiment

    cfg = compose_checked(["+technique=paca", "model=smollm2-135m", "data=shakespeare", "data.seq_len=48",
                           "data.batch_size=2", "data.eval_batches=1", "run.lr=1e-3", "run.max_steps=4",
                           "run.eval_at_start=true", "run.measure_saved_bytes=false", "logger=quiet"])
    s = Experiment(cfg, tmp_path).run()
    assert s["status"] == "completed" and s["measured/paca_layers"] == 30 * 7
    assert s["measured/eval_loss"] < s["measured/eval_loss_start"] - 0.02, s
