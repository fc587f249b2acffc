#!/usr/bin/env bash
# Dovetail on a lent GPU machine: the real draft head on the GPU (fp16), the target on that
# machine's CPU cores (fp32), features/trees crossing PCIe for real. Writes $OUT/dovetail.json.
#   1. SmolLM2-135M shape (random weights: the asset is too big to carry): per-round draft time on
#      the GPU (incl. transfers) vs on the CPU, tree verify time on the CPU, target-only per-token
#      time, greedy output identical to target-only.
#   2. LLaMA2-7B shape (random fp32 target, 27 GB RAM; DGF draft with 5 layers, fp16, ~2.7 GB VRAM):
#      the three terms of the cost model measured on this hardware -- one-token forward, tree
#      (16+1 tokens) forward on the CPU, a draft round (depth 7, top-k 10) on the GPU -- and the
#      tokens/s they give at the acceptance length measured on the CPU with the trained draft
#      (DOVETAIL_ACCEPTANCE, default from docs/techniques/dovetail.md). Random weights: acceptance is
#      not measurable here, timings are (they do not depend on the values).
# No network, no assets, no hydra needed (torch + transformers + this tree on PYTHONPATH). Without a
# GPU it runs tiny shapes on the CPU (checks the script, not the numbers). Budget: ~3-5 min.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib_gpu_env.sh
SIZE=tiny
if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then SIZE=full; fi
export DOVETAIL_ACCEPTANCE=${DOVETAIL_ACCEPTANCE:-3.0}
timeout "${DOVETAIL_GPU_TIMEOUT:-420}" $PY - "$OUT/dovetail.json" "$SIZE" <<'PYEOF'
import json, os, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from effrun.techniques.dovetail.decoding import DovetailDecoding, GreedyDecoding, TargetSide, generate
from effrun.techniques.dovetail.draft import DraftHead, draft_copy
from effrun.techniques.dovetail.tree import DraftSession, additive_mask, cache_crop

out_path, size = sys.argv[1], sys.argv[2]
cuda = torch.cuda.is_available()
dev = "cuda" if cuda else "cpu"
ddt = torch.float16 if cuda else torch.float32
tau = float(os.environ["DOVETAIL_ACCEPTANCE"])
res = {"size": size, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if cuda else None,
       "cpu_threads": torch.get_num_threads(), "acceptance_assumed": tau}
print(json.dumps({k: res[k] for k in ("gpu", "cpu_threads", "torch")}), flush=True)


def fast_random_llama(**kw):
    """A random-weight Llama without transformers' slow init (meta -> empty -> normal_)."""
    cfg = LlamaConfig(**kw)
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    m = m.to_empty(device="cpu")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    m.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    m.generation_config.eos_token_id = None
    return m.eval()


def med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def timed(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return med(ts)


# ---- 1. SmolLM2 shape: end-to-end rounds, draft on GPU vs CPU ----
smol = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
if size == "tiny":
    smol = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
torch.manual_seed(0)
t = fast_random_llama(**smol)
draft = DraftHead.for_target(t, "dgf", 2)
prompt = torch.randint(0, smol["vocab_size"], (1, 128))
n_new = 48
with torch.no_grad():
    ref, rows, st, _ = generate(GreedyDecoding(t), t, prompt, n_new)
    per_tok = st.totals["verify_s"] / st.totals["rounds"]
    one = {}
    for where, d, dt in (("gpu", dev, ddt), ("cpu", "cpu", torch.bfloat16 if not cuda else torch.float32)):
        if where == "gpu" and not cuda:
            continue
        dec = DovetailDecoding(t, draft, 16, 7, 10, d, str(dt).split(".")[-1])
        generate(dec, t, prompt[:, :32], 8)  # warm-up (CUDA context, kernels)
        out, rows, st2, _ = generate(dec, t, prompt, n_new)
        tot = st2.totals
        one[where] = {"exact": out == ref, "rounds": tot["rounds"], "acceptance": tot["new_tokens"] / tot["rounds"],
                      "draft_s_per_round": tot["draft_s"] / tot["rounds"],
                      "verify_s_per_round": tot["verify_s"] / tot["rounds"],
                      "bytes_to_draft_per_round": tot["bytes_to_draft"] / tot["rounds"],
                      "bytes_to_target_per_round": tot["bytes_to_target"] / tot["rounds"],
                      "memory": dec.memory()}
        dec.close()
res["smollm2_shape"] = {"target_only_s_per_token": per_tok, "rounds": one,
                        "projected_tok_s_at_acceptance": {
                            w: tau / (r["draft_s_per_round"] + r["verify_s_per_round"]) for w, r in one.items()},
                        "target_only_tok_s": 1.0 / per_tok}
print(json.dumps(res["smollm2_shape"], default=str), flush=True)
del t, draft

# ---- 2. LLaMA2-7B shape: the cost model's terms, measured ----
big = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
           num_key_value_heads=32, max_position_embeddings=4096)
layers_d = 5
if size == "tiny":
    big = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=512)
    layers_d = 2
t0 = time.time()
t = fast_random_llama(**big)
build_s = time.time() - t0
side = TargetSide(t)
cache = side.new_cache()
ctx = 256
with torch.no_grad():
    side.forward(torch.randint(0, big["vocab_size"], (1, ctx)), cache)

    def fwd(n, tree=False):
        ids = torch.randint(0, big["vocab_size"], (1, n))
        mask = None
        if tree:
            allowed = torch.cat([torch.ones(n, ctx, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)
            mask = additive_mask(allowed, torch.float32)
        f = side.forward(ids, cache, position_ids=torch.arange(ctx, ctx + n)[None], mask=mask)
        side.logits(f)
        cache_crop(cache, ctx)

    t_one = timed(lambda: fwd(1), 3)
    t_tree = timed(lambda: fwd(17, tree=True), 3)
    head = DraftHead.for_target(t, "dgf", layers_d)
    dhead = draft_copy(head, torch.device(dev), ddt)
    del head
    sess = DraftSession(dhead, 16, 7, 10)
    feats = torch.randn(ctx, big["hidden_size"])
    toks = torch.randint(0, big["vocab_size"], (ctx,))
    sess.propose(feats.to(dev, ddt), toks.to(dev))  # the draft's prefix

    def round_():
        f = torch.randn(3, big["hidden_size"]).to(ddt)  # ~acceptance length of verified pairs
        sess.propose(f.to(dev), torch.randint(0, big["vocab_size"], (3,)).to(dev))
        sess.stable -= 3
        cache_crop(sess.cache, sess.stable)

    t_draft = timed(round_, 5)
    vram = torch.cuda.max_memory_allocated() if cuda else None
res["llama7b_shape"] = {"build_s": build_s, "context": ctx, "t_one_token_s": t_one, "t_tree17_s": t_tree,
                        "tree_over_one": t_tree / t_one, "t_draft_round_s": t_draft, "draft_layers": layers_d,
                        "draft_gpu_max_allocated_gb": vram / 1e9 if vram else None,
                        "cpu_only_tok_s": 1.0 / t_one,
                        "dovetail_tok_s_at_acceptance": tau / (t_tree + t_draft),
                        "speedup_at_acceptance": tau / (t_tree + t_draft) * t_one}
print(json.dumps(res["llama7b_shape"]), flush=True)
json.dump(res, open(out_path, "w"), indent=1, default=str)
print("wrote", out_path)
PYEOF
