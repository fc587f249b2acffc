"""What the moetuner and exflow techniques do, on effrun's loops (no loop of their own).

plan:  trace (given, or recorded from the model) -> solve on one part -> evaluate on a held-out part
       against the baselines -> project latency on the hardware target -> placement.json.
infer: the same study on rank 0 (the placement broadcast to every rank), then real expert
       parallelism: core starts `technique.devices` gloo ranks (spec.processes), the one infer loop
       generates on every rank with the experts placed by the solution (the EP layers installed
       in on_infer_start, a new token group announced before each round); rank 0 checks the tokens
       against a single-process run of the same model and reports the all-to-all counts and bytes.
"""
from __future__ import annotations

import time

import numpy as np
from omegaconf import OmegaConf

from effrun.errors import UserError
from effrun.technique import Technique


class PlacementTechnique(Technique):
    METHOD = "exflow"

    def topology(self):
        from effrun.techniques._moe.placement import Topology

        n = self.cfg
        return Topology(int(n.devices), int(n.devices_per_node))

    # --- the study (rank 0) ------------------------------------------------------------------------
    def study(self):
        from effrun.config.paths import find_config
        from effrun.techniques._moe import study
        from effrun.techniques._moe.placement import check_divisible

        ctx, node, rec = self.ctx, self.cfg, self.ctx.recorder
        t0 = time.perf_counter()
        tr, ho, origin = study.load_traces(node, ctx)
        E = tr.num_experts
        hf = ctx.cfg.model.get("hf_config") or {}
        model_E = hf.get("num_local_experts") or hf.get("num_experts")
        model_L = hf.get("num_hidden_layers")
        if node.trace and model_E and ctx.cfg.model.source != "shape":
            tr.require(num_experts=int(model_E), key="technique.trace")
            if model_L:  # plan and infer alike: a trace for another depth is refused here
                tr.require(num_layers=int(model_L), key="technique.trace")
        ho.require(num_layers=tr.num_layers, num_experts=E, key="technique.heldout_trace")
        topo = self.topology()
        check_divisible(E, topo.devices)
        rec.set("measured/trace_s", time.perf_counter() - t0)
        link = study.link_cost_from_hardware(ctx.cfg.hardware, topo) if self.METHOD == "moetuner" else None
        res = study.solve(self.METHOD, tr, topo, node, link_cost=link)
        evals = study.evaluate_all(self.METHOD, res, ho, tr, topo)
        for name, m in evals.items():
            for k, v in m.items():
                if k not in ("tokens", "layers", "top_k", "devices"):
                    rec.set(f"measured/heldout/{name}/{k}", v)
        rec.set("measured/trace_tokens_solve", tr.num_tokens)
        rec.set("measured/trace_tokens_heldout", ho.num_tokens)
        rec.set("measured/solver_wall_s", res.wall_s)
        rec.set("measured/solver_objective", res.objective)
        if res.bound == res.bound:  # not NaN
            rec.set("measured/solver_gap", res.gap)
        rec.update({"info/solver_status": res.status, "info/solver_method": res.method, "info/trace_origin": origin,
                    "measured/devices": topo.devices, "measured/devices_per_node": topo.per_node})
        if link:
            rec.set("info/moetuner_link_cost", list(link))
        placements = {self.METHOD: res.placement, "round_robin": study.baseline("round_robin", tr, topo)}
        loads = {k: evals[k]["load_max_over_mean"] for k in placements}
        path = find_config("model", node.project_model)
        try:
            shape = OmegaConf.load(path) if path else None
        except OSError:
            shape = None
        if shape is None:
            raise UserError(f"no model config {node.project_model!r}", key="technique.project_model") from None
        rec.update(study.projection(ctx.cfg.hardware, shape, ho, placements, topo, loads,
                                    node.project_tokens_per_device))
        study.write_placement(ctx.run_dir / "placement.json", res.placement,
                              {"method": res.method, "status": res.status, "objective": res.objective,
                               "devices": topo.devices, "devices_per_node": topo.per_node,
                               "history": res.history, "heldout": evals})
        rec.set("info/placement_path", str(ctx.run_dir / "placement.json"))
        return res.placement

    def plan(self) -> None:
        self.ctx.start_recorder(1, f"plan {self.name} {self.ctx.cfg.model.name}")
        self.study()

    # --- infer: expert parallelism through the infer loop's hooks ----------------------------------
    def _ep_on(self) -> bool:
        return bool(self.cfg.ep) and self.ctx.world_size > 1

    def on_infer_start(self, model, session=None) -> None:
        ctx = self.ctx
        placement = self.study() if ctx.is_main else None
        placement = ctx.broadcast_object(None if placement is None else placement.tolist())
        self.session = session
        self.ep = None
        if self._ep_on():
            from effrun.techniques._moe.ep import ExpertParallel

            self.ep = ExpertParallel(model, np.array(placement), self.cfg.ep_scheme).__enter__()

    def before_round(self, i, rnd) -> None:
        if self.ep is not None:
            self.ep.new_call(int(self.session.input_ids.shape[0]))

    def on_infer_end(self) -> None:
        if self.ep is None:
            return
        import torch

        from effrun.families.causal_lm.decode import generate

        ctx, ep, rec, s = self.ctx, self.ep, self.ctx.recorder, self.cfg.ep_scheme
        ep.__exit__(None, None, None)
        b = ctx.all_reduce([float(ep.stats.bytes.get("dispatch", 0)), float(ep.stats.bytes.get("combine", 0))])
        if not ctx.is_main:
            return
        ids = self.session.input_ids
        new = self.session.new_ids()
        ref_model = ctx.build_model().eval()  # EP zeroed the experts this rank does not hold
        with torch.no_grad():
            ref, _ = generate(ref_model, ids, int(new.shape[1]))
        L, n = len(ep.layers), int(new.shape[1])
        calls = ep.stats.calls
        rec.set(f"measured/ep/{s}/equals_single_process", float(torch.equal(ref, new)))
        rec.set(f"measured/ep/{s}/alltoall_calls_per_moe_layer",
                (calls.get("dispatch", 0) + calls.get("combine", 0)) / (L * n))
        rec.set(f"measured/ep/{s}/alltoall_bytes_per_moe_layer_call", sum(b) / (L * n))
        rec.set(f"measured/ep/{s}/dispatch_bytes", b[0])
        rec.set(f"measured/ep/{s}/combine_bytes", b[1])
        rec.set("measured/ep_ranks", ctx.world_size)
