"""Dovetail: heterogeneous speculative decoding (EMNLP'25; ddInference/Dovetail, EAGLE-based).

The target model verifies on the CPU; an EAGLE-style draft head with Dynamic Gating Fusion (DGF)
drafts a token tree on the accelerator; only token ids, tree masks and hidden states cross between
them. Greedy output equals the target alone, token for token.

- `effrun train +technique=dovetail`: trains the draft head on the frozen target's own features
  (feature regression + soft cross-entropy through the frozen lm_head) and saves it.
- `effrun infer +technique=dovetail technique.draft_path=...`: tree drafting + tree-masked
  verification in one target forward per round.

Library: `draft` (DGF / EAGLE fusion, the head, save/load with a target header), `tree` (dynamic
draft tree, mask, greedy acceptance), `decoding` (prefill/step strategy, the draft worker),
`train` (target features, EAGLE loss), `costmodel` (projection to a LLaMA2-7B-shaped target).
No torch import here (the CLI imports specs to compose configs). `plugin.py` is the thin adapter
for the seams API (entry point `dovetail = "effrun.techniques.dovetail:spec"`).

Draft file convention: train writes `technique.draft_path` (default `<run_dir>/dovetail_draft.safetensors`);
infer reads `technique.draft_path` = that file, or a train run's directory (the file inside it), or
`random` (an untrained head from `init_seed`: lossless but accepts little; smoke runs and tests).
"""
from dataclasses import dataclass
from typing import Optional

from effrun.errors import UserError
from effrun.technique import TechniqueSpec

FUSIONS = ("dgf", "fc")  # dgf: Dovetail's Dynamic Gating Fusion; fc: EAGLE-1's concat + linear
DRAFT_DEVICES = ("auto", "cpu", "cuda")
DRAFT_DTYPES = ("auto", "float32", "bfloat16", "float16")
TARGET_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class DovetailConfig:
    name: str = "dovetail"
    # draft head: feature/embedding fusion and number of decoder layers ("deeper draft"; the paper
    # uses up to 6 and 5 in its main runs; each layer costs a full layer of the target's width)
    fusion: str = "dgf"
    draft_layers: int = 1
    # draft tree (EAGLE-2-style dynamic tree): total_tokens draft tokens per round, at most `depth`
    # along any path, `top_k` children expanded per node. Paper: 16 tokens, depth 7, top-k 10.
    total_tokens: int = 16
    depth: int = 7
    top_k: int = 10
    # infer: the trained draft (safetensors written by train); train: where to save it
    # (null -> <run_dir>/dovetail_draft.safetensors)
    draft_path: Optional[str] = None
    # train: start from this trained draft (a file or a train run's directory) instead of a fresh
    # head -- continue training, or fine-tune a corpus-trained head on self-distilled data. Its
    # fusion and layer count must equal `fusion` / `draft_layers`; null: a fresh head (init_seed)
    init_path: Optional[str] = None
    # where the draft runs ("auto": cuda when present, else a CPU worker thread) and in what dtype
    # ("auto": float16 on cuda, bfloat16 on a CPU with native bf16, else float32)
    draft_device: str = "auto"
    draft_dtype: str = "auto"
    # draft vocabulary: 0 = the target's full vocabulary (the paper); n > 0 = the n most frequent
    # training tokens (frequency-ranked, FR-Spec/EAGLE-3 style; lossless, cuts the draft's lm_head)
    draft_vocab: int = 0
    # training loss (EAGLE's weights): reg_weight * SmoothL1(feature) + ce_weight * soft CE(tokens)
    reg_weight: float = 1.0
    ce_weight: float = 0.1
    # uniform noise of this width added to the target features the draft reads in training (EAGLE
    # trains with such noise so the head tolerates its own feature errors deep in the tree); 0: off
    feature_noise: float = 0.0
    # fraction of positions (random each step) that get the cross-entropy term; its sum is rescaled
    # (unbiased). 1.0 = EAGLE exactly; less cuts the lm_head cost that dominates training on a CPU
    ce_fraction: float = 1.0
    # self-distillation: the last N tokens of each training block are replaced by the target's own
    # greedy continuation of the rest (0: EAGLE's fixed-corpus training)
    self_distill_tokens: int = 0
    # drafting steps trained as the tree drafts them (HASS's harmonized context alignment, an
    # extension): step s >= 2 reads the head's own step s-1 feature; 1 = EAGLE's one-step loss.
    # Steps >= 2 are weighted align_weight
    align_steps: int = 1
    align_weight: float = 1.0
    init_seed: int = 0
    # infer: the projection of the measured acceptance length to a big target on the host CPU with
    # the draft on a GPU (configs/model/<project_model>, configs/hardware/<project_hardware>: its
    # host_cpu_* and host_link), a draft of `project_draft_layers` layers (the paper: 5); keys projected/
    project_model: str = "llama-7b"
    project_hardware: str = "rtx-a6000"
    project_draft_layers: int = 5
    # the big target's weight dtype on the host CPU (the paper's CPU-only baseline, 2.12 tok/s for
    # LLaMA2-7B, is about what 16-bit weights give at a desktop's bandwidth; fp32 halves it)
    project_target_dtype: str = "float32"


RANDOM_DRAFT = "random"  # technique.draft_path=random: an untrained head (smoke runs, tests)
DRAFT_FILE = "dovetail_draft.safetensors"


def check(cfg, node) -> None:
    """One-line errors for bad values, before any model is built (no torch import)."""
    from pathlib import Path

    validate_fields(node)
    if int(node.project_draft_layers) < 1:
        raise UserError(f"project_draft_layers={node.project_draft_layers}: must be >= 1",
                        key="technique.project_draft_layers")
    if node.project_target_dtype not in TARGET_DTYPES:
        raise UserError(f"unknown project_target_dtype {node.project_target_dtype!r}",
                        key="technique.project_target_dtype", choices=TARGET_DTYPES)
    _check_projection(node)
    mode = getattr(cfg, "mode", None)
    if mode == "train" and getattr(node, "init_path", None):
        draft_file(node.init_path, key="technique.init_path")
    if mode == "infer":
        if not node.draft_path:
            raise UserError("infer needs a trained draft: a file or a train run's directory (train one with "
                            f"`effrun train +technique=dovetail`), or {RANDOM_DRAFT!r} for an untrained head",
                            key="technique.draft_path")
        if node.draft_path != RANDOM_DRAFT:
            draft_file(node.draft_path)


def draft_file(path: str, key: str = "technique.draft_path"):
    """The draft checkpoint named by `path`: the file itself, or `<dir>/dovetail_draft.safetensors`
    when `path` is a train run's directory. One line when there is none."""
    from pathlib import Path

    p = Path(str(path)).expanduser()
    if p.is_dir():
        p = p / DRAFT_FILE
    if not p.is_file():
        raise UserError(f"no draft checkpoint at {p} (train one with `effrun train +technique=dovetail`, then "
                        "pass the file or the run directory)", key=key)
    return p


def _check_projection(node) -> None:
    from omegaconf import OmegaConf

    from effrun.config.paths import find_config, group_options

    hw = find_config("hardware", str(node.project_hardware))
    ok = [h for h in group_options("hardware") if _has_host(find_config("hardware", h))]
    if hw is None or not _has_host(hw):
        raise UserError(f"unknown projection hardware {node.project_hardware!r} (needs host_cpu_* and a GPU)",
                        key="technique.project_hardware", choices=sorted(ok))
    m = find_config("model", str(node.project_model))
    if m is None or "hidden_size" not in (OmegaConf.load(m).get("hf_config") or {}):
        raise UserError(f"unknown projection model {node.project_model!r} (needs a model config with hf_config)",
                        key="technique.project_model")


def _has_host(path) -> bool:
    from omegaconf import OmegaConf

    if path is None:
        return False
    hw = OmegaConf.load(path)
    return bool(hw.get("host_cpu_gflops")) and bool(hw.get("host_cpu_mem_bw_GBps")) and bool(hw.get("peak_tflops"))


def validate_fields(node) -> None:
    if node.fusion not in FUSIONS:
        raise UserError(f"unknown fusion {node.fusion!r}", key="technique.fusion", choices=FUSIONS)
    if int(node.draft_layers) < 1:
        raise UserError(f"draft_layers={node.draft_layers}: must be >= 1", key="technique.draft_layers")
    if int(node.total_tokens) < 1:
        raise UserError(f"total_tokens={node.total_tokens}: the draft tree needs at least 1 token",
                        key="technique.total_tokens")
    if int(node.depth) < 1:
        raise UserError(f"depth={node.depth}: must be >= 1", key="technique.depth")
    if int(node.depth) > int(node.total_tokens):
        raise UserError(f"depth={node.depth} is larger than the tree (total_tokens={node.total_tokens}); "
                        f"valid: 1..{node.total_tokens}", key="technique.depth")
    if int(node.top_k) < 1:
        raise UserError(f"top_k={node.top_k}: must be >= 1", key="technique.top_k")
    if node.draft_device not in DRAFT_DEVICES:
        raise UserError(f"unknown draft_device {node.draft_device!r}", key="technique.draft_device",
                        choices=DRAFT_DEVICES)
    if node.draft_dtype not in DRAFT_DTYPES:
        raise UserError(f"unknown draft_dtype {node.draft_dtype!r}", key="technique.draft_dtype",
                        choices=DRAFT_DTYPES)
    if int(node.draft_vocab) < 0:
        raise UserError(f"draft_vocab={node.draft_vocab}: must be >= 0 (0 = full vocabulary)",
                        key="technique.draft_vocab")
    if int(node.draft_vocab) and int(node.top_k) > int(node.draft_vocab):
        raise UserError(f"top_k={node.top_k} exceeds draft_vocab={node.draft_vocab}", key="technique.top_k")
    if int(node.align_steps) < 1:
        raise UserError(f"align_steps={node.align_steps}: must be >= 1 (1 = EAGLE's one-step loss)",
                        key="technique.align_steps")
    for k in ("reg_weight", "ce_weight", "feature_noise", "align_weight"):
        if float(getattr(node, k)) < 0:
            raise UserError(f"{k}={getattr(node, k)}: must be >= 0", key=f"technique.{k}")
    if not 0.0 < float(node.ce_fraction) <= 1.0:
        raise UserError(f"ce_fraction={node.ce_fraction}: must be in (0, 1]", key="technique.ce_fraction")
    if int(node.self_distill_tokens) < 0:
        raise UserError(f"self_distill_tokens={node.self_distill_tokens}: must be >= 0",
                        key="technique.self_distill_tokens")
    if float(node.reg_weight) == 0 and float(node.ce_weight) == 0:
        raise UserError("reg_weight and ce_weight are both 0: nothing to train", key="technique.ce_weight")


def unsupported_run(cfg, node):
    return {"compile": "the draft trains through a frozen target wrapper (torch.compile of it is not supported)",
            "infer_batch_size": "the target verifies one sequence's draft tree per round"}


TRAIN_KEYS = ("info/draft_path", "measured/draft_params", "measured/draft_top1_agreement")
INFER_KEYS = ("measured/acceptance_length", "measured/verify_rounds", "measured/draft_s_per_round",
              "measured/verify_s_per_round", "measured/draft_share", "measured/bytes_to_draft_per_round",
              "measured/bytes_to_target_per_round", "measured/target_weight_bytes", "measured/target_kv_peak_bytes",
              "measured/draft_weight_bytes", "measured/draft_kv_peak_bytes", "?measured/draft_cuda_max_allocated_bytes",
              "info/draft_device", "info/draft_path", "projected/*")

spec = TechniqueSpec(
    name="dovetail", config=DovetailConfig, plugin="effrun.techniques.dovetail.plugin:Dovetail",
    modes=("train", "infer"), families=("causal-lm",), check=check, unsupported_run=unsupported_run,
    seams={"train": ("loss",), "infer": ("decoding",)},
    metrics={"train": TRAIN_KEYS, "infer": INFER_KEYS},
    smoke_overrides={"train": ("technique.ce_fraction=0.5", "technique.align_steps=2"),
                     "infer": ("technique.draft_path=random", "technique.total_tokens=4", "technique.depth=2",
                               "technique.top_k=2", "technique.draft_dtype=float32")},
    description="Dovetail: draft head (DGF) on the accelerator, target verifies a token tree on the CPU")
