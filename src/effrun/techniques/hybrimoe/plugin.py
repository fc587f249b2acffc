"""HybriMoE plugin: owns the infer loop (real generation + projected timelines) and plan mode."""
from __future__ import annotations

import json
import time
from typing import Dict, List

from effrun.errors import UserError
from effrun.technique import Technique
from effrun.techniques.hybrimoe.costs import CostModel, build_costs, fit_cpu, moe_shape
from effrun.techniques.hybrimoe.sim import Forward, Simulator, static_sets, summarize, capacity_of
from effrun.techniques.hybrimoe.trace import demand_hit_rate, synthetic_trace

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class Hybrimoe(Technique):
    def validate(self) -> None:
        shape = moe_shape(self.exp.hf_config)
        if shape is None:
            raise UserError(f"model {self.exp.cfg.model.name!r} has no routed experts", key="model")
        self.shape = shape
        if self.execution() == "real":
            import torch

            if not torch.cuda.is_available():
                raise UserError("real GPU execution asked for but torch sees no GPU", key="technique.execution",
                                choices=["auto", "model"])

    def execution(self) -> str:
        if self.cfg.execution != "auto":
            return self.cfg.execution
        if self.exp.mode == "infer" and self.exp.cfg.hardware.kind == "cuda":
            import torch

            return "real" if torch.cuda.is_available() else "model"
        return "model"

    # --- helpers --------------------------------------------------------------------------------
    def bytes_per_param(self) -> float:
        if self.cfg.weight_bits:
            return self.cfg.weight_bits / 8.0
        return float(DTYPE_BYTES.get(self.exp.cfg.run.dtype, 4))

    def costs(self, cpu_fit=None) -> CostModel:
        dtype = "bfloat16" if self.cfg.weight_bits and self.cfg.weight_bits < 16 else self.exp.cfg.run.dtype
        return build_costs(self.shape, self.exp.cfg.hardware, self.cfg, self.bytes_per_param(), dtype, cpu_fit)

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
        hw, model = self.exp.cfg.hardware.name, self.exp.cfg.model.name
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
        if c.plot and self.exp.is_main:
            try:
                from effrun.techniques.hybrimoe.plot import timeline_png

                path = timeline_png(sims, self.exp.run_dir / "plots" / "hybrimoe_timeline.png",
                                    title=f"{model} on {hw}, cache {c.cache_ratio:g}")
                if path:
                    self.exp.summary["notes"] = f"timeline plot: {path}"
            except ImportError:
                pass
        return results

    # --- modes ----------------------------------------------------------------------------------
    def run(self, mode: str) -> None:
        if mode == "plan":
            return self._plan()
        if self.execution() == "real":
            from effrun.techniques.hybrimoe.cuda_exec import run_real

            return run_real(self)
        return self._infer_model()

    def _plan(self) -> None:
        c, sh = self.cfg, self.shape
        rec = self.exp.start_recorder(1, title=f"plan hybrimoe {self.exp.cfg.model.name}")
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
                                f"{self.exp.cfg.model.name!r} has {sh.experts}", key=key)
            if sorted(first.layers) == list(sh.moe_layers) and len(streams) == 1:
                return streams[0]
            return tile_streams(streams, sh.moe_layers)
        except UserError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError, StopIteration, AttributeError) as e:
            raise UserError(f"cannot use routing trace {path!r}: {type(e).__name__}: {e}", key=key) from e

    def _infer_model(self) -> None:
        import torch

        from effrun.metrics.memory import peak_rss_mb, reset_peak_rss
        from effrun.techniques.hybrimoe.capture import RoutingCapture, calibrate_cpu_stable

        exp, c, run = self.exp, self.cfg, self.exp.cfg.run
        model = exp.build_model()
        model.eval()
        cap = RoutingCapture(model).attach()
        if not cap.blocks:
            raise UserError(f"model {exp.cfg.model.name!r} has no hookable MoE blocks", key="model")
        ids = torch.tensor([exp.tokenizer.encode(run.prompt)], device=exp.device)
        # warm-up run: calibrates the CPU cost per expert (a + b * tokens) on this machine
        # warm-up / profiling pass: its routing gives the fixed mapping's GPU set and every
        # cache's warm start (the live scheduler cannot see the future)
        warm = cap.profile_generate(ids, max(1, c.calibrate_tokens))
        static = static_sets(warm, capacity_of(c.cache_ratio, self.shape.experts), self.shape.experts)
        calib, passes = calibrate_cpu_stable(cap.blocks[0][1].experts, self.shape.hidden, dtype=model.dtype,
                                              max_s=c.calibrate_max_s)
        fit = fit_cpu(calib)
        use_measured = c.cpu_costs in ("auto", "measured")
        costs = self.costs(fit if use_measured else None)
        live = self.simulator("hybrimoe", costs, static)
        cap.samples.clear()
        cap.pred_hits = cap.pred_total = 0
        trace: List[Forward] = []
        rec = exp.start_recorder(run.max_new_tokens, title=f"infer hybrimoe {exp.cfg.model.name}")
        reset_peak_rss()
        times, out = [], []
        past, cur = None, ids
        with torch.no_grad():
            for i in range(run.max_new_tokens):
                t0 = time.perf_counter()
                cap.begin(int(cur.shape[1]))
                res = model(input_ids=cur, past_key_values=past, use_cache=True)
                fw = cap.end(logits=1)
                past = res.past_key_values
                nxt = res.logits[:, -1, :].argmax(dim=-1, keepdim=True)
                dt = time.perf_counter() - t0
                proj = live.step(fw)
                trace.append(fw)
                times.append(dt)
                out.append(nxt)
                cur = nxt
                rec.log_step(i, token_time_s=dt, tokens=1, projected_token_time_s=proj)
        cap.detach()
        new = torch.cat(out, dim=1)
        rec.set("measured/ttft_s", times[0])
        if len(times) > 1:
            dec = times[1:]
            rec.set("measured/tbt_s", sum(dec) / len(dec))
            rec.set("measured/decode_tokens_per_s", len(dec) / sum(dec))
        rec.set("measured/prompt_tokens", ids.shape[1])
        rec.set("measured/prefill_tokens_per_s", ids.shape[1] / times[0])
        rec.set("measured/new_tokens", new.shape[1])
        rec.set("measured/peak_mem_mb", peak_rss_mb())
        rec.set("measured/expert_calls_on_cpu", len(cap.samples))
        if cap.samples:
            import statistics

            rec.set("measured/cpu_expert_call_median_s", statistics.median(t for _, t in cap.samples))
        rec.set("measured/cpu_calibration_passes", passes)
        if fit:
            rec.set("measured/cpu_expert_overhead_s", fit[0])
            rec.set("measured/cpu_expert_per_token_s", fit[1])
        rec.set("measured/prefetch_prediction_accuracy", cap.prediction_accuracy)
        rec.set("measured/execution", "experts on this CPU; GPU and PCIe timed by the target model")
        self.simulate(trace, costs, int(ids.shape[1]), rec, static=static)
        # the live scheduler and the replay are the same code: they must agree
        rec.set("projected/live_vs_replay_max_abs_diff_s",
                max(abs(a - b) for a, b in zip(live.stats.time_s, self._replay_times(trace, costs, static))))
        (exp.run_dir / "routing_trace.json").write_text(json.dumps([fw.to_json() for fw in trace]))
        exp.summary["generated_text"] = exp.tokenizer.decode(new[0].tolist())
        exp.summary["generated_ids"] = new[0].tolist()

    def _replay_times(self, trace, costs, static) -> List[float]:
        return self.simulator("hybrimoe", costs, static).run(trace).time_s
