"""The thin adapter from effrun's seams (docs/architecture.md) to the Dovetail library.

train (the one train loop): `transform_model` wraps the frozen target and a fresh draft head
       (`DovetailTrainModule`), `trainable_parameters` is the head's, `loss` is EAGLE's (feature
       regression + soft CE through the frozen lm_head; token level: (sum, positions)). At the end
       (`metrics`, the loop's last call into a technique) the head is written with its target header
       to `technique.draft_path` (default `<run_dir>/dovetail_draft.safetensors`); `run.export=true`
       also writes it into the export folder.
infer (the one infer loop): `transform_model` loads the head (refusing a draft of another target),
       `decoding` returns the prefill/step strategy (draft tree + one tree-masked target forward per
       round), `after_round` accumulates the per-round split the strategy puts in each round's row,
       `metrics` reports acceptance length, draft vs verify time, memory per side, bytes crossing,
       and the projection of the measured acceptance length to a LLaMA2-7B target (projected/).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from effrun.errors import UserError
from effrun.technique import Technique
from effrun.techniques.dovetail import DRAFT_FILE, RANDOM_DRAFT, draft_file, validate_fields


class LoopDecoding:
    """The library strategy (`step -> (new ids, round values)`) in the family session's protocol
    (`step -> new ids`). The round's values wait in `last` for the technique's `after_round`, which
    returns them as the round's row extras (the session's own `round_metrics` path fills `rnd.row`
    only after the loop has logged the row, so it is not used)."""

    def __init__(self, strategy):
        self.strategy = strategy
        self.last: Dict = {}

    def prefill(self, model, input_ids):
        self.last = {}
        return self.strategy.prefill(model, input_ids)

    def step(self, model, state):
        new, self.last = self.strategy.step(model, state)
        return new

    def tokens_in(self, state) -> int:
        """Tokens the next target forward reads: the root + the tree (its size is fixed by the config)."""
        return 1 + int(self.strategy.worker.session.total_tokens) if hasattr(self.strategy, "worker") else 1

    def pop(self) -> Dict:
        out, self.last = self.last, {}
        return out


class Dovetail(Technique):
    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.ctx = ctx
        self.target = None
        self.draft = None
        self.strategy = None
        self.loop_decoding = None
        self.train_module = None
        self.saved_path: Optional[Path] = None
        self.rounds = {"rounds": 0, "new_tokens": 0, "accepted": 0, "draft_s": 0.0, "verify_s": 0.0,
                       "bytes_to_draft": 0, "bytes_to_target": 0}

    # --- checks ---------------------------------------------------------------------------------
    def validate(self) -> None:
        validate_fields(self.cfg)
        if self.ctx.mode == "infer":
            from effrun.techniques.dovetail import check

            check(self.ctx.cfg, self.cfg)
            if self.cfg.draft_path != RANDOM_DRAFT:
                from effrun.techniques.dovetail.draft import read_header

                read_header(draft_file(self.cfg.draft_path))  # a Dovetail draft; the target check needs the model
            from effrun.techniques.dovetail.decoding import resolve_draft_device

            resolve_draft_device(self.cfg.draft_device, self.cfg.draft_dtype)

    # --- model seams ----------------------------------------------------------------------------
    def transform_model(self, model):
        from effrun.techniques.dovetail.draft import DraftHead, load_draft

        self.target = model
        if self.ctx.mode == "train":
            from effrun.techniques.dovetail.train import DovetailTrainModule

            self.draft = self._initial_draft(model)
            self.train_module = DovetailTrainModule(model, self.draft)
            return self.train_module
        if self.cfg.draft_path == RANDOM_DRAFT:
            self.draft = DraftHead.for_target(model, self.cfg.fusion, self.cfg.draft_layers, self.cfg.init_seed)
        else:
            self.draft = load_draft(draft_file(self.cfg.draft_path), model)
        return model

    def _initial_draft(self, model):
        """A fresh head, or the trained one `init_path` names (checked against this target and config)."""
        from effrun.techniques.dovetail.draft import DraftHead, load_draft

        c = self.cfg
        # float32 master weights whatever run.dtype is: a bf16 target (run.dtype=bfloat16, what infer
        # decodes with) computes the features faster and exactly as infer sees them, while the head's
        # AdamW updates stay in float32
        if not c.init_path:
            return DraftHead.for_target(model, c.fusion, c.draft_layers, c.init_seed, dtype=torch.float32)
        key = "technique.init_path"
        draft = load_draft(draft_file(c.init_path, key=key), model, key, dtype=torch.float32)
        if (draft.spec.fusion, draft.spec.layers) != (c.fusion, int(c.draft_layers)):
            raise UserError(f"init_path holds a {draft.spec.fusion} head with {draft.spec.layers} layer(s), the run "
                            f"asks for fusion={c.fusion} draft_layers={c.draft_layers}", key="technique.init_path",
                            choices=[f"fusion={draft.spec.fusion} draft_layers={draft.spec.layers}"])
        return draft.train()

    def trainable_parameters(self, model):
        return [p for p in self.draft.parameters() if p.requires_grad]

    def loss(self, model, batch):
        c = self.cfg
        mod = self.train_module if self.train_module is not None else model
        return mod.loss(batch, c.reg_weight, c.ce_weight, c.feature_noise, c.ce_fraction, c.self_distill_tokens,
                        int(c.align_steps), float(c.align_weight))

    # --- infer seams ----------------------------------------------------------------------------
    def decoding(self):
        from effrun.techniques.dovetail.decoding import DovetailDecoding

        self.strategy = DovetailDecoding(self.target, self.draft.eval(), self.cfg.total_tokens, self.cfg.depth,
                                         self.cfg.top_k, self.cfg.draft_device, self.cfg.draft_dtype,
                                         draft_vocab=self.cfg.draft_vocab)
        self.loop_decoding = LoopDecoding(self.strategy)
        return self.loop_decoding

    def after_round(self, i, rnd, dt) -> Dict:
        """This round's split (decode rounds): summed for the summary, returned as row values."""
        row = self.loop_decoding.pop() if self.loop_decoding is not None else {}
        if "accepted" not in row:
            return {}
        r = self.rounds
        r["rounds"] += 1
        r["new_tokens"] += int(row["accepted"]) + 1  # before the session drops a last round's surplus
        for k in ("accepted", "draft_s", "verify_s", "bytes_to_draft", "bytes_to_target"):
            r[k] += row.get(k, 0)
        return {k: row[k] for k in ("accepted", "tree_size", "draft_s", "verify_s")}

    def on_infer_end(self) -> None:
        if self.strategy is not None:
            self.strategy.close()

    # --- metrics --------------------------------------------------------------------------------
    def metrics(self) -> Dict:
        if self.ctx.mode == "train":
            return self._train_end()
        r = self.rounds
        if self.ctx.mode != "infer" or not r["rounds"]:
            return {}
        from effrun.techniques.dovetail.decoding import acceptance_length

        n = r["rounds"]
        out = {"measured/acceptance_length": acceptance_length(r["new_tokens"], n),
               "measured/verify_rounds": n,
               "measured/draft_s_per_round": r["draft_s"] / n,
               "measured/verify_s_per_round": r["verify_s"] / n,
               "measured/draft_share": r["draft_s"] / max(1e-12, r["draft_s"] + r["verify_s"]),
               "measured/bytes_to_draft_per_round": r["bytes_to_draft"] / n,
               "measured/bytes_to_target_per_round": r["bytes_to_target"] / n,
               "info/draft_path": str(self.cfg.draft_path if self.cfg.draft_path == RANDOM_DRAFT
                                      else draft_file(self.cfg.draft_path).absolute())}
        if self.strategy is not None:
            for k, v in self.strategy.memory().items():
                out[f"measured/{k}"] = v
            out["info/draft_device"] = f"{self.strategy.worker.device}/{self.strategy.worker.dtype}"
        out.update(self._projection(out))
        return out

    def _projection(self, meas: Dict) -> Dict:
        """The measured acceptance length and bytes per round, projected to `project_model` on the
        host CPU of `project_hardware` with the draft on its GPU (costmodel.project; roofline terms)."""
        from omegaconf import OmegaConf

        from effrun.config.paths import find_config
        from effrun.techniques.dovetail import costmodel as cm

        c = self.cfg
        hw = OmegaConf.to_container(OmegaConf.load(find_config("hardware", c.project_hardware)), resolve=True)
        mcfg = OmegaConf.to_container(OmegaConf.load(find_config("model", c.project_model)), resolve=True)
        host, gpu, link = cm.from_hardware(hw)
        shape = cm.Shape.from_hf(mcfg["hf_config"])
        tau = meas["measured/acceptance_length"]
        p = cm.project(shape, host, gpu, link, tau, c.total_tokens, c.depth, c.top_k, c.project_draft_layers,
                       c.fusion, target_dtype=c.project_target_dtype)
        pre = f"projected/{c.project_model}@{c.project_hardware}"
        out = {f"{pre}/{k}": float(p[k]) for k in
               ("cpu_only_tok_s", "dovetail_tok_s", "speedup_vs_cpu_only", "round_s", "verify_s", "draft_s",
                "transfer_s", "draft_vram_gb", "accelerate_offload_tok_s", "layer_split_tok_s")}
        # this run's measured bytes per round over that host link (the small target's features)
        out["projected/pcie_s_per_round"] = cm.link_s(meas["measured/bytes_to_draft_per_round"], link) + \
            cm.link_s(meas["measured/bytes_to_target_per_round"], link)
        return out

    # --- train end: the draft file --------------------------------------------------------------
    def draft_path_out(self) -> Path:
        p = self.cfg.draft_path
        if p and p != RANDOM_DRAFT:
            p = Path(p).expanduser()
            return p / DRAFT_FILE if p.is_dir() else p
        return Path(self.ctx.run_dir) / DRAFT_FILE

    def _save(self, path: Path) -> Path:
        from effrun.techniques.dovetail.draft import save_draft, target_header

        return save_draft(self.draft, path, target_header(self.target),
                          {"fusion": self.cfg.fusion, "layers": self.cfg.draft_layers,
                           "run_dir": str(self.ctx.run_dir), "model": str(self.ctx.cfg.model.name),
                           "data": str(self.ctx.cfg.data.name), "steps": int(self.ctx.cfg.run.max_steps)})

    def _train_end(self) -> Dict:
        if self.draft is None:
            return {}
        out = {"measured/draft_params": int(sum(p.numel() for p in self.draft.parameters()))}
        hit = tot = 0
        fam = self.ctx.family
        for batch in fam.eval_batches():  # the draft's next-feature top-1 == the target's (held-out blocks)
            h, t = self.train_module.accuracy(fam.to_device(batch))
            hit, tot = hit + h, tot + t
        out["measured/draft_top1_agreement"] = hit / max(1, tot)
        if self.ctx.is_main:
            self.saved_path = self._save(self.draft_path_out())
        out["info/draft_path"] = str(self.draft_path_out())
        return out

    def export(self, model, path=None) -> str:
        return str(self._save(Path(path) / DRAFT_FILE))
