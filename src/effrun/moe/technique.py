"""The loop the moetuner and exflow plugins run (modes plan and infer)."""
from __future__ import annotations

import time

from omegaconf import OmegaConf

from effrun.errors import UserError
from effrun.technique import Technique


class PlacementTechnique(Technique):
    METHOD = "exflow"

    def topology(self):
        from effrun.moe.placement import Topology

        n = self.cfg
        return Topology(int(n.devices), int(n.devices_per_node))

    def run(self, mode: str) -> None:
        from effrun.config.paths import config_dir
        from effrun.moe import study

        exp, node = self.exp, self.cfg
        rec = exp.start_recorder(3 if mode == "infer" else 2, title=f"{mode} {self.name} {exp.cfg.model.name}")
        t0 = time.perf_counter()
        tr, ho, origin = study.load_traces(node, exp)
        E = tr.num_experts
        hf = exp.cfg.model.get("hf_config") or {}
        model_E = hf.get("num_local_experts") or hf.get("num_experts")
        model_L = hf.get("num_hidden_layers")
        if node.trace and not node.model_dir and model_E and exp.cfg.model.source != "shape":
            tr.require(num_experts=int(model_E), key="technique.trace")
            if mode == "infer" and model_L:
                tr.require(num_layers=int(model_L), key="technique.trace")
        ho.require(num_layers=tr.num_layers, num_experts=E, key="technique.heldout_trace")
        topo = self.topology()
        from effrun.moe.placement import check_divisible

        check_divisible(E, topo.devices)
        rec.log_step(0, trace_s=time.perf_counter() - t0, tokens=tr.num_tokens)
        link = study.link_cost_from_hardware(exp.cfg.hardware, topo) if self.METHOD == "moetuner" else None
        res = study.solve(self.METHOD, tr, topo, node, link_cost=link)
        rec.log_step(1, solve_s=res.wall_s, objective=res.objective)
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
        exp.summary.update(solver_status=res.status, solver_method=res.method, trace_origin=origin,
                           devices=topo.devices, devices_per_node=topo.per_node)
        if link:
            exp.summary["moetuner_link_cost"] = list(link)
        placements = {self.METHOD: res.placement,
                      "round_robin": study.baseline("round_robin", tr, topo)}
        loads = {k: evals[k]["load_max_over_mean"] for k in placements}
        try:
            shape = OmegaConf.load(config_dir() / "model" / f"{node.project_model}.yaml")
        except FileNotFoundError:
            raise UserError(f"no model config {node.project_model!r}", key="technique.project_model") from None
        for k, v in study.projection(exp.cfg.hardware, shape, ho, placements, topo, loads,
                                     node.project_tokens_per_device).items():
            rec.set(k, v)
        study.write_placement(exp.run_dir / "placement.json", res.placement,
                              {"method": res.method, "status": res.status, "objective": res.objective,
                               "devices": topo.devices, "devices_per_node": topo.per_node,
                               "history": res.history, "heldout": evals})
        exp.summary["placement_path"] = str(exp.run_dir / "placement.json")
        if mode == "infer" and node.ep:
            t1 = time.perf_counter()
            study.run_ep(exp, node, res.placement, rec)
            rec.log_step(2, ep_s=time.perf_counter() - t1)
