"""HybriMoE on effrun's infer loop (hooks, no loop of its own) and plan mode.

infer, execution=model: every expert computed for real on this CPU; the routing of each round is
captured by hooks and fed to the live HSS scheduler (projected GPU + PCIe timeline of the target);
at the end the baselines are replayed over the same routing. execution=real (CUDA): the
HybridExecutor serves the experts (GPU cache + PCIe + CPU experts) inside the same loop.
plan: the same simulator over synthetic or trace routing for real model shapes."""
from __future__ import annotations

import json
from typing import Dict, List

from effrun.errors import UserError
from effrun.technique import Technique
from effrun.techniques.hybrimoe.costs import CostModel, build_costs, fit_cpu, moe_shape
from effrun.techniques.hybrimoe.sim import Forward, Simulator, static_sets, summarize, capacity_of
from effrun.techniques.hybrimoe.trace import demand_hit_rate, synthetic_trace

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class Hybrimoe(Technique):
    def validate(self) -> None:
        shape = moe_shape(self.ctx.family.hf_config)
        if shape is None:
            raise UserError(f"model {self.ctx.cfg.model.name!r} has no routed experts", key="model")
        self.shape = shape
        if self.execution() == "real" and self.cfg.real_device != "cpu":
            import torch

            if not torch.cuda.is_available():
                raise UserError("real GPU execution asked for but torch sees no GPU", key="technique.execution",
                                choices=["auto", "model"])

    def execution(self) -> str:
        if self.cfg.execution != "auto":
            return self.cfg.execution
        if self.ctx.mode == "infer" and self.ctx.cfg.hardware.kind == "cuda":
            import torch

            return "real" if torch.cuda.is_available() else "model"
        return "model"

    # --- helpers --------------------------------------------------------------------------------
    def bytes_per_param(self) -> float:
        if self.cfg.weight_bits:
            return self.cfg.weight_bits / 8.0
        return float(DTYPE_BYTES.get(self.ctx.cfg.run.dtype, 4))

    def costs(self, cpu_fit=None) -> CostModel:
        dtype = "bfloat16" if self.cfg.weight_bits and self.cfg.weight_bits < 16 else self.ctx.cfg.run.dtype
        return build_costs(self.shape, self.ctx.cfg.hardware, self.cfg, self.bytes_per_param(), dtype, cpu_fit)

    def simulator(self, policy: str, costs: CostModel, static, record_events=()) -> Simulator:
        """A Simulator for `policy` with this run's cache / MRS / prefetch settings."""
        c = self.cfg
        return Simulator(policy, self.shape, costs, cache_ratio=c.cache_ratio, cache_policy=c.cache_policy,
                         mrs_alpha=c.mrs_alpha, mrs_top_p=c.mrs_top_p, prefetch=c.prefetch,
                         prefetch_budget=c.prefetch_budget, static=static, record_events=record_events)

    def policies(self) -> List[str]:
        main = "hybrimoe"
        out = [main]
        for c in self.cfg.compare:
            if c not in out:
                out.append(c)
        return out

    def simulate(self, trace: List[Forward], costs: CostModel, prompt_tokens: int, rec,
                 static=None) -> Dict[str, dict]:
        """Replay every policy over `trace`. `static`: the profiled per-layer GPU set of the fixed
        mapping and every cache's warm start; None -> the most frequent experts of `trace` itself."""
        c, sh = self.cfg, self.shape
        if static is None:
            static = static_sets(trace, capacity_of(c.cache_ratio, sh.experts), sh.experts)
        results, sims = {}, {}
        for pol in self.policies():
            sim = self.simulator(pol, costs, static, record_events=(0, 1))
            st = sim.run(trace)
            results[pol] = summarize(st, prompt_tokens, costs.expert_bytes)
            results[pol]["prefetch_budget_violations"] = st.prefetch_budget_violations
            results[pol]["max_cache_experts_per_layer"] = st.max_cache_size
            sims[pol] = sim
        hw, model = self.ctx.cfg.hardware.name, self.ctx.cfg.model.name
        rec.set("projected/hardware", hw)
        rec.set("projected/model", model)
        rec.set("projected/cost_source", costs.source)
        rec.set("projected/cache_experts_per_layer", capacity_of(c.cache_ratio, sh.experts))
        rec.set("projected/expert_bytes", costs.expert_bytes)
        for k in ("cpu_tok", "cpu_exp", "gpu_exp", "gpu_tok", "xfer"):
            rec.set(f"projected/cost/{k}_s", getattr(costs, k))
        for pol, r in results.items():
            for k, v in r.items():
                rec.set(f"projected/{pol}/{k}", v)
        h = results["hybrimoe"]
        for name in ("ktransformers", "ktransformers_layers"):
            base = results.get(name)
            if not base:
                continue
            if h.get("decode_tokens_per_s") and base.get("decode_tokens_per_s"):
                rec.set(f"projected/speedup_decode_vs_{name}", h["decode_tokens_per_s"] / base["decode_tokens_per_s"])
            if h.get("ttft_s") and base.get("ttft_s"):
                rec.set(f"projected/speedup_prefill_vs_{name}", base["ttft_s"] / h["ttft_s"])
        for p in ("mrs", "lru", "lfu"):
            rec.set(f"projected/demand_hit_rate/{p}",
                    demand_hit_rate(trace, sh.experts, c.cache_ratio, p, sh.top_k, c.mrs_alpha, c.mrs_top_p))
        if c.plot and self.ctx.is_main:
            try:
                from effrun.techniques.hybrimoe.plot import timeline_png

                path = timeline_png(sims, self.ctx.run_dir / "plots" / "hybrimoe_timeline.png",
                                    title=f"{model} on {hw}, cache {c.cache_ratio:g}")
                if path:
                    rec.set("info/timeline_plot", str(path))
            except ImportError:
                pass
        return results

    # --- plan mode ------------------------------------------------------------------------------
    def plan(self) -> None:
        self._plan()

    def _plan(self) -> None:
        c, sh = self.cfg, self.shape
        rec = self.ctx.start_recorder(1, f"plan hybrimoe {self.ctx.cfg.model.name}")
        if c.routing_trace:
            trace = self._trace_for_shape(c.routing_trace, "technique.routing_trace")
            rec.set("projected/routing", f"trace:{c.routing_trace}")
            profile = self._trace_for_shape(c.profile_trace, "technique.profile_trace") if c.profile_trace else trace
            rec.set("projected/static_profile", f"trace:{c.profile_trace}" if c.profile_trace
                    else "oracle: the evaluated trace itself")
        else:
            trace = synthetic_trace(sh, c.prompt_len, c.decode_tokens, c.routing_skew, c.routing_locality,
                                    c.predict_acc, seed=c.seed + 1, pop_seed=c.seed)
            # the fixed mapping is profiled offline on other text of the same model: same expert
            # popularity, other draws
            profile = synthetic_trace(sh, c.prompt_len, c.decode_tokens, c.routing_skew, c.routing_locality,
                                      c.predict_acc, seed=c.seed + 2, pop_seed=c.seed)
            rec.set("projected/routing", f"synthetic zipf s={c.routing_skew} locality={c.routing_locality} "
                                         f"predict_acc={c.predict_acc}")
            rec.set("projected/static_profile", "synthetic: same popularity, other draws")
        static = static_sets(profile, capacity_of(c.cache_ratio, sh.experts), sh.experts)
        costs = self.costs(None)
        res = self.simulate(trace, costs, trace[0].tokens, rec, static=static)
        rec.log_step(0, **{f"{p}_decode_tok_s": r.get("decode_tokens_per_s") for p, r in res.items()})

    def _trace_for_shape(self, path: str, key: str) -> List[Forward]:
        """A trace file fitted to this model: used as is when its MoE layers match, else tiled."""
        from effrun.techniques.hybrimoe.trace import load_streams, tile_streams

        sh = self.shape
        try:
            streams = load_streams(path)
            if not streams or not all(streams) or not streams[0][0].layers:
                raise UserError(f"trace {path!r} holds no routed forwards", key=key)
            first = streams[0][0]
            experts = len(next(iter(first.layers.values())).counts)
            if experts != sh.experts:
                raise UserError(f"trace {path!r} routes over {experts} experts, model "
                                f"{self.ctx.cfg.model.name!r} has {sh.experts}", key=key)
            if sorted(first.layers) == list(sh.moe_layers) and len(streams) == 1:
                return streams[0]
            return tile_streams(streams, sh.moe_layers)
        except UserError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError, StopIteration, AttributeError) as e:
            raise UserError(f"cannot use routing trace {path!r}: {type(e).__name__}: {e}", key=key) from e

    # --- infer: hooks around the infer loop's rounds ------------------------------------------
    def transform_model(self, model):
        if self.ctx.mode != "infer" or self.execution() != "real":
            return model
        from effrun.techniques.hybrimoe.cuda_exec import real_executor

        self.executor, model = real_executor(self, model, self.cfg.real_device)
        return model

    def on_infer_start(self, model, session) -> None:
        self.session = session
        if self.execution() == "real":
            from effrun.families.causal_lm.decode import generate

            generate(model, session.input_ids, 2)  # warm-up (kernels, caches), outside the timed rounds
            self.executor.reset_stats()
            return
        from effrun.techniques.hybrimoe.capture import RoutingCapture, calibrate_cpu_stable

        c, ids = self.cfg, session.input_ids
        cap = RoutingCapture(model).attach()
        if not cap.blocks:
            raise UserError(f"model {self.ctx.cfg.model.name!r} has no hookable MoE blocks", key="model")
        # warm-up / profiling pass (the family's generation, untimed): its routing gives the fixed
        # mapping's GPU set and every cache's warm start (the live scheduler cannot see the future)
        warm = cap.profile_generate(ids, max(1, c.calibrate_tokens))
        self.static = static_sets(warm, capacity_of(c.cache_ratio, self.shape.experts), self.shape.experts)
        # calibrates the CPU cost per expert (a + b * tokens) on this machine
        calib, self.passes = calibrate_cpu_stable(cap.blocks[0][1].experts, self.shape.hidden, dtype=model.dtype,
                                                  max_s=c.calibrate_max_s)
        self.fit = fit_cpu(calib)
        self.live_costs = self.costs(self.fit if c.cpu_costs in ("auto", "measured") else None)
        self.live = self.simulator("hybrimoe", self.live_costs, self.static)
        cap.samples.clear()
        cap.pred_hits = cap.pred_total = 0
        self.cap, self.trace = cap, []

    def before_round(self, i, rnd) -> None:
        if self.execution() != "real":
            self.cap.begin(int(rnd.info["tokens_in"]))

    def after_round(self, i, rnd, dt):
        if self.execution() == "real":
            return None
        fw = self.cap.end(logits=1)
        self.trace.append(fw)
        return {"projected_token_time_s": self.live.step(fw)}

    def on_infer_end(self) -> None:
        if self.execution() == "real":
            self.executor.record(self.ctx.recorder)
            return
        import statistics

        rec, cap = self.ctx.recorder, self.cap
        cap.detach()
        rec.set("measured/expert_calls_on_cpu", len(cap.samples))
        if cap.samples:
            rec.set("measured/cpu_expert_call_median_s", statistics.median(t for _, t in cap.samples))
        rec.set("measured/cpu_calibration_passes", self.passes)
        if self.fit:
            rec.set("measured/cpu_expert_overhead_s", self.fit[0])
            rec.set("measured/cpu_expert_per_token_s", self.fit[1])
        rec.set("measured/prefetch_prediction_accuracy", cap.prediction_accuracy)
        rec.set("info/execution", "experts on this CPU; GPU and PCIe timed by the target model")
        self.simulate(self.trace, self.live_costs, int(self.session.input_ids.shape[1]), rec, static=self.static)
        # the live scheduler and the replay are the same code: they must agree
        rec.set("projected/live_vs_replay_max_abs_diff_s",
                max(abs(a - b) for a, b in zip(self.live.stats.time_s,
                                               self._replay_times(self.trace, self.live_costs, self.static))))
        if self.ctx.is_main:
            (self.ctx.run_dir / "routing_trace.json").write_text(json.dumps([fw.to_json() for fw in self.trace]))

    def _replay_times(self, trace, costs, static) -> List[float]:
        return self.simulator("hybrimoe", costs, static).run(trace).time_s
