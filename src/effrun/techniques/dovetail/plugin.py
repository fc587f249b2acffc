"""The thin adapter from effrun's seams (docs/architecture.md) to the Dovetail library.

train: `transform_model` wraps the frozen target and a fresh draft head (`DovetailTrainModule`),
       `trainable_parameters` is the head's, `loss` is EAGLE's (feature regression + soft CE),
       `export`/`on_train_end` writes the head with its target header.
infer: `transform_model` loads the head (refusing a draft of another target), `decoding` returns
       the prefill/step strategy, `after_round` accumulates the per-round split, `metrics` reports
       acceptance length, draft vs verify time, memory per side and the modelled PCIe time.
Not registered yet (the entry point is added when the seams land).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from effrun.errors import UserError
from effrun.technique import Technique
from effrun.techniques.dovetail import validate_fields

DRAFT_FILE = "dovetail_draft.safetensors"


class Dovetail(Technique):
    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.ctx = ctx
        self.target = None
        self.draft = None
        self.strategy = None
        self.rounds = {"rounds": 0, "new_tokens": 0, "accepted": 0, "draft_s": 0.0, "verify_s": 0.0,
                       "bytes_to_draft": 0, "bytes_to_target": 0}

    # --- checks ---------------------------------------------------------------------------------
    def validate(self) -> None:
        validate_fields(self.cfg)
        if self.ctx.mode == "infer":
            if not self.cfg.draft_path:
                raise UserError("infer needs a trained draft (train one with `effrun train +technique=dovetail`)",
                                key="technique.draft_path")
            from effrun.techniques.dovetail.draft import read_header

            read_header(self.cfg.draft_path)  # exists and is a Dovetail draft; the target check needs the model
            from effrun.techniques.dovetail.decoding import resolve_draft_device

            resolve_draft_device(self.cfg.draft_device, self.cfg.draft_dtype)

    # --- model seams ----------------------------------------------------------------------------
    def transform_model(self, model):
        from effrun.techniques.dovetail.draft import DraftHead, load_draft

        self.target = model
        if self.ctx.mode == "train":
            from effrun.techniques.dovetail.train import DovetailTrainModule

            self.draft = DraftHead.for_target(model, self.cfg.fusion, self.cfg.draft_layers, self.cfg.init_seed)
            return DovetailTrainModule(model, self.draft)
        self.draft = load_draft(self.cfg.draft_path, model).eval()
        return model

    def trainable_parameters(self, model):
        return [p for p in model.draft.parameters() if p.requires_grad]

    def loss(self, model, batch):
        c = self.cfg
        return model.loss(batch, c.reg_weight, c.ce_weight, c.feature_noise, c.ce_fraction, c.self_distill_tokens)

    # --- infer seams ----------------------------------------------------------------------------
    def decoding(self):
        from effrun.techniques.dovetail.decoding import DovetailDecoding

        self.strategy = DovetailDecoding(self.target, self.draft, self.cfg.total_tokens, self.cfg.depth,
                                         self.cfg.top_k, self.cfg.draft_device, self.cfg.draft_dtype,
                                         draft_vocab=self.cfg.draft_vocab)
        return self.strategy

    def after_round(self, i, rnd, dt) -> Dict:
        """`rnd`: the step's metrics dict (draft_s, verify_s, accepted, tree_size, bytes...)."""
        if not isinstance(rnd, dict) or "accepted" not in rnd:
            return {}
        self.rounds["rounds"] += 1
        self.rounds["new_tokens"] += rnd["accepted"] + 1
        for k in ("accepted", "draft_s", "verify_s", "bytes_to_draft", "bytes_to_target"):
            self.rounds[k] += rnd.get(k, 0)
        return {"accepted": rnd["accepted"], "draft_s": rnd["draft_s"], "verify_s": rnd["verify_s"]}

    def on_infer_end(self) -> None:
        if self.strategy is not None:
            self.strategy.close()

    def metrics(self) -> Dict:
        r = self.rounds
        if self.ctx.mode != "infer" or not r["rounds"]:
            return {}
        n = r["rounds"]
        out = {"measured/acceptance_length": r["new_tokens"] / n,
               "measured/draft_s_per_round": r["draft_s"] / n,
               "measured/verify_s_per_round": r["verify_s"] / n,
               "measured/draft_share": r["draft_s"] / max(1e-12, r["draft_s"] + r["verify_s"]),
               "measured/bytes_to_draft_per_round": r["bytes_to_draft"] / n,
               "measured/bytes_to_target_per_round": r["bytes_to_target"] / n}
        if self.strategy is not None:
            for k, v in self.strategy.memory().items():
                out[f"measured/{k}"] = v
            out["info/draft_device"] = f"{self.strategy.worker.device}/{self.strategy.worker.dtype}"
        link = self._host_link()
        if link is not None:
            from effrun.techniques.dovetail.costmodel import Link, link_s

            lk = Link(link["name"], float(link["bandwidth_GBps"]), float(link["latency_us"]))
            out["projected/pcie_s_per_round"] = link_s(r["bytes_to_draft"] / n, lk) + \
                link_s(r["bytes_to_target"] / n, lk)
        return out

    def _host_link(self) -> Optional[dict]:
        hw = getattr(self.ctx.cfg, "hardware", None)
        link = getattr(hw, "host_link", None) if hw is not None else None
        if link is None:
            return None
        return {k: getattr(link, k) if not isinstance(link, dict) else link[k]
                for k in ("name", "bandwidth_GBps", "latency_us")}

    # --- state ----------------------------------------------------------------------------------
    def draft_path_out(self) -> Path:
        return Path(self.cfg.draft_path).expanduser() if self.cfg.draft_path else Path(self.ctx.run_dir) / DRAFT_FILE

    def export(self, model, path=None) -> str:
        from effrun.techniques.dovetail.draft import save_draft, target_header

        target = model.target if hasattr(model, "target") else self.target
        draft = model.draft if hasattr(model, "draft") else self.draft
        out = Path(path) / DRAFT_FILE if path is not None else self.draft_path_out()
        save_draft(draft, out, target_header(target), {"fusion": self.cfg.fusion, "layers": self.cfg.draft_layers})
        return str(out)

    def on_train_end(self, model) -> str:
        return self.export(model)
