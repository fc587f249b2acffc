"""ByteScale's train loop: every step, a global batch of mixed-length real-text sequences is planned
(HDP balance / naive, static DP x CP mesh) and run on all ranks; the strategies named in
`baselines` run on the same batches, step by step, each with its own model replica, so their step
times, imbalances and losses are measured side by side in one run.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Dict, List

import torch

from effrun.errors import UserError
from effrun.technique import Technique
from effrun.techniques.bytescale import engine as E
from effrun.techniques.bytescale import lengths as L
from effrun.techniques.bytescale import offload as O
from effrun.techniques.bytescale import planner as P
from effrun.techniques.bytescale import ring as R

FAMILIES = ("llama", "qwen2", "mistral", "qwen3")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def gather(obj):
    d = _dist()
    if d is None:
        return [obj]
    out = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def barrier():
    d = _dist()
    if d is not None:
        d.barrier()


class ByteScale(Technique):
    def validate(self) -> None:
        fam = self.exp.cfg.model.family
        if fam not in FAMILIES:
            raise UserError(f"bytescale's packed/ring attention supports decoder families {FAMILIES}, not {fam!r}",
                            key="model", choices=["llama-tiny", "smollm2-135m"])
        maxpos = getattr(self.exp.hf_config, "max_position_embeddings", None)
        if maxpos and self.cfg.max_len > maxpos and self.cfg.distribution != "fixed":
            raise UserError(f"max_len={self.cfg.max_len} exceeds the model's max_position_embeddings={maxpos}",
                            key="technique.max_len")

    # --- set-up -----------------------------------------------------------------------------
    def _stream(self):
        exp, c = self.exp, self.cfg
        if exp.cfg.data.kind == "synthetic":
            g = torch.Generator().manual_seed(exp.cfg.data.seed)
            return torch.randint(0, exp.vocab_size, (max(4 * c.tokens_per_step, 2 * c.max_len + 2),), generator=g)
        return exp.data.train.reshape(-1)

    def _lengths(self, step: int) -> List[int]:
        c = self.cfg
        if c.distribution == "fixed":
            return [int(x) for x in c.fixed_lengths]
        dist = L.get(c.distribution, c.max_len, c.min_len)
        return L.sample_batch(dist, c.tokens_per_step, seed=self.exp.cfg.run.seed * 1_000_003 + step,
                              max_len=c.max_len)

    def _flops_cost(self) -> P.Cost:
        hc = self.exp.hf_config
        h, l, ffn = hc.hidden_size, hc.num_hidden_layers, hc.intermediate_size
        kv = h * getattr(hc, "num_key_value_heads", hc.num_attention_heads) // hc.num_attention_heads
        return P.Cost.flops(h, l, 2 * h * h + 2 * h * kv + 3 * h * ffn)

    def _layer_model(self, cost: P.Cost) -> O.LayerModel:
        hc = self.exp.hf_config
        l = hc.num_hidden_layers
        # activation bytes per token per layer: 34 h values (Korthikanti et al.) x the dtype's bytes
        act = 34 * hc.hidden_size * (2 if self.exp.cfg.run.dtype in ("bfloat16", "float16") else 4)
        # a fitted (profile) cost is in seconds already; a FLOP cost is turned into seconds at an
        # assumed 1e10 FLOP/s (it only matters relative to the copy bandwidth)
        rate = 1.0 if cost.unit == "s" else 1e10
        return O.LayerModel(cost.a1 / l / rate, cost.b1 / l / rate, cost.p / l / rate, act, 0.0)

    def _bw(self) -> float:
        c, hw = self.cfg, self.exp.cfg.hardware
        if c.offload_bw_GBps > 0:
            return c.offload_bw_GBps * 1e9
        return (hw.host_link.bandwidth_GBps if hw.host_link else 16.0) * 1e9

    def _plan(self, strategy: str, lengths, cost: P.Cost) -> P.Plan:
        c, world = self.cfg, self.exp.world_size
        ranks_for = None
        if c.offload and strategy != "static":
            l = self.exp.hf_config.num_hidden_layers
            ranks_for = O.ranks_for(c.capacity, l, self._layer_model(cost), self._bw())
        plan = P.make_plan(strategy, lengths, world, c.capacity, cost, delta=c.delta, balance=c.balance,
                           n_buckets=c.buckets, static_cp=c.static_cp, ranks_for=ranks_for, min_chunk=c.min_chunk)
        return plan

    def _offload_for(self, model, plan: P.Plan):
        c = self.cfg
        if not c.offload:
            return None
        l = self.exp.hf_config.num_hidden_layers
        lm = self._layer_model(plan.cost)

        def pick(mb):
            longest = max(plan.lengths[p.seq] for p in mb.pieces)
            r, _ = O.solve(longest, c.capacity, l, lm, self._bw())
            ids = O.offloaded_layers(r, l)
            if not ids:
                return None
            h = O.OffloadHooks(model, ids)
            self._offload_hooks.append(h)
            return h
        return pick

    # --- the loop ---------------------------------------------------------------------------
    def run(self, mode: str) -> None:
        exp, c, run = self.exp, self.cfg, self.exp.cfg.run
        rank, world = exp.rank, exp.world_size
        attn = R.register()
        strategies = [c.strategy] + [b for b in c.baselines if b != c.strategy]
        models, opts = {}, {}
        for st in strategies:
            m = exp.build_model()
            m.set_attn_implementation(attn)
            m.train()
            models[st] = m
            opts[st] = E.Zero1AdamW(list(m.parameters()), lr=run.lr, weight_decay=run.weight_decay,
                                    rank=rank, world=world)
        stream = self._stream()
        cost = self._flops_cost()
        self._offload_hooks = []
        rec = exp.start_recorder(run.max_steps, f"train bytescale[{c.strategy}] vs {strategies[1:]} "
                                                f"{exp.cfg.model.name} x{world}")
        n_params = sum(p.numel() for p in models[c.strategy].parameters())
        rec.update({"measured/params_total": n_params, "measured/params_trainable": n_params,
                    "measured/capacity_tokens": c.capacity, "measured/world_size": world,
                    "measured/strategies": ",".join(strategies)})
        stats: Dict[str, Dict[str, list]] = {st: {} for st in strategies}
        fit_rows: List[tuple] = []
        max_rank_tokens = 0
        losses: Dict[str, List[float]] = {st: [] for st in strategies}
        for step in range(run.max_steps):
            lengths = self._lengths(step)
            seqs = L.cut_text(stream, lengths, seed=run.seed * 7919 + step)
            n_global = sum(lengths)
            for st in strategies:
                plan = self._plan(st, lengths, cost)
                max_rank_tokens = max([max_rank_tokens] + [mb.tokens for mbs in plan.ranks for mb in mbs])
                model = models[st]
                barrier()
                t0 = time.perf_counter()
                out = E.run_rank_step(model, plan, rank, seqs, exp.device, self._offload_for(model, plan))
                cpu = out["cpu_s"]
                norm = opts[st].step(run.max_grad_norm)
                dt = time.perf_counter() - t0
                rows = gather({"tokens": out["tokens"], "compute_s": out["compute_s"], "cpu_s": cpu,
                               "wait_s": out["comm_wait_s"], "mbs": out["micro_batches"],
                               "loss_sum": out["loss_sum"], "step_s": dt, "records": out["records"]})
                loss = sum(r["loss_sum"] for r in rows) / n_global
                losses[st].append(loss)
                step_s = max(r["step_s"] for r in rows)
                vals = {
                    "step_time_s": step_s,
                    "token_imbalance": P.imbalance([r["tokens"] for r in rows]),
                    "compute_imbalance": P.imbalance([r["cpu_s"] for r in rows]),
                    "compute_wall_imbalance": P.imbalance([r["compute_s"] for r in rows]),
                    "predicted_imbalance": P.imbalance(plan.rank_cost()),
                    "comm_wait_s": max(r["wait_s"] for r in rows),
                    "micro_batches_max": max(r["mbs"] for r in rows),
                    "micro_batches_min": min(r["mbs"] for r in rows),
                    "grad_norm": norm,
                }
                if step >= run.warmup_steps or run.max_steps <= run.warmup_steps:
                    for k, v in vals.items():
                        stats[st].setdefault(k, []).append(v)
                    stats[st].setdefault("rank_cpu", []).append([r["cpu_s"] for r in rows])
                if step >= min(1, run.warmup_steps) or run.max_steps == 1:  # calibration skips only step 0
                    for r in rows:
                        fit_rows.extend(r["records"])
                if st == c.strategy:
                    row = dict(loss=loss, tokens=n_global, samples=len(lengths), **vals)
                else:
                    row[f"{st}_step_time_s"] = step_s
                    row[f"{st}_compute_imbalance"] = vals["compute_imbalance"]
            rec.log_step(step, **row)
            if c.cost_source == "profile" and fit_rows:
                coef, _ = E.fit_cost(fit_rows)  # same records on every rank -> the same plan everywhere
                if coef[0] > 0 or coef[2] > 0:
                    cost = P.Cost(a1=coef[0], a1_ring=coef[1], b1=coef[2], p=coef[3], r=coef[4], g=coef[5],
                                  unit="s")
        rec.aggregate_steps()
        self._summarise(rec, strategies, stats, losses, fit_rows, max_rank_tokens, opts)
        if c.project and exp.is_main:
            self._project(rec)

    # --- summary ----------------------------------------------------------------------------
    def _summarise(self, rec, strategies, stats, losses, fit_rows, max_rank_tokens, opts) -> None:
        c = self.cfg
        from effrun.metrics.memory import peak_rss_mb

        for st in strategies:
            s = stats[st]
            if not s:
                continue
            pre = f"measured/{st}"
            rec.set(f"{pre}/step_time_s", statistics.median(s["step_time_s"]))
            for k in ("token_imbalance", "compute_imbalance", "compute_wall_imbalance", "predicted_imbalance",
                      "comm_wait_s"):
                rec.set(f"{pre}/{k}", sum(s[k]) / len(s[k]))
            rec.set(f"{pre}/compute_imbalance_median", statistics.median(s["compute_imbalance"]))
            # per-rank CPU time summed over the timed steps (per-step noise on shared cores averages out)
            rec.set(f"{pre}/compute_imbalance_pooled", P.imbalance([sum(x) for x in zip(*s["rank_cpu"])]))
            rec.set(f"{pre}/micro_batches_max", max(s["micro_batches_max"]))
            rec.set(f"{pre}/micro_batches_min", min(s["micro_batches_min"]))
            rec.set(f"{pre}/loss", losses[st][-1])
        main = c.strategy
        for base in strategies[1:]:
            if stats[base] and stats[main]:
                rec.set(f"measured/speedup_vs_{base}", statistics.median(stats[base]["step_time_s"]) /
                        statistics.median(stats[main]["step_time_s"]))
        if len(strategies) > 1:
            diffs = [abs(a - b) for st in strategies[1:] for a, b in zip(losses[main], losses[st])]
            rec.set("measured/loss_max_abs_diff_vs_baselines", max(diffs) if diffs else None)
        if stats[main]:
            rec.set("measured/compute_imbalance", sum(stats[main]["compute_imbalance"]) / len(stats[main]["compute_imbalance"]))
            rec.set("measured/token_imbalance", sum(stats[main]["token_imbalance"]) / len(stats[main]["token_imbalance"]))
        rec.set("measured/max_tokens_per_rank_micro_batch", max_rank_tokens)
        o = opts[main]
        rec.set("measured/optimizer_state_bytes_per_rank", o.state_bytes())
        rec.set("measured/optimizer_state_bytes_unsharded", 2 * o.n * o.master.element_size())
        rec.set("measured/peak_rss_mb", peak_rss_mb())
        rec.set("measured/ring_bytes_sent_rank0", R.COMM["bytes"])
        if self._offload_hooks:
            rec.set("measured/offloaded_bytes_rank0", sum(h.bytes for h in self._offload_hooks))
        # calibration: micro-batch CPU time fitted on (sum s^2/d, sum s/d, sequences, 1), all strategies
        if len(fit_rows) >= 6:
            coef, r2 = E.fit_cost(fit_rows)
            for k, v in zip(("s_per_token2_local", "s_per_token2_ring", "s_per_token", "s_per_sequence",
                             "s_per_ring_step", "s_per_micro_batch"), coef):
                rec.set(f"measured/cost_fit/{k}", v)
            rec.set("measured/cost_fit/r2", r2)
            fl = self._flops_cost()
            _, r2f = E.fit_cost([([fl.a1 * (f[0] + f[1]) + fl.b1 * f[2]], t) for f, t in fit_rows])
            rec.set("measured/cost_fit/r2_flops_only", r2f)
            rec.set("measured/cost_fit/micro_batches", len(fit_rows))

    def _project(self, rec) -> None:
        from effrun.techniques.bytescale import costmodel as CM

        c = self.cfg
        rows = CM.project_grid(list(c.project_models), list(c.project_hardware), c.project_gpus,
                               list(c.project_contexts), c.project_distribution, c.project_global_tokens,
                               c.project_mfu, c.project_batches)
        for r in rows:
            key = f"projected/{r['model']}@{r['hardware']}x{r['gpus']}/{r['context'] // 1024}K"
            if "error" in r:
                rec.set(f"{key}/error", r["error"])
                continue
            for k in ("static_step_s", "naive_step_s", "balance_step_s", "speedup_naive", "speedup_balance",
                      "balance_imbalance", "capacity", "static_cp", "tp"):
                rec.set(f"{key}/{k}", r[k])
        rec.set("projected/assumptions", f"{c.project_distribution} lengths, {c.project_global_tokens} tokens/step, "
                                         f"bf16 MFU {c.project_mfu}, 34h bytes/token/layer activations")
        for m in c.project_models:
            for h in c.project_hardware:
                sub = [r for r in rows if r["model"] == m and r["hardware"] == h and "error" not in r]
                for k in ("static_step_s", "naive_step_s", "balance_step_s"):
                    v = CM.doubling_slowdown(sub, k)
                    if v:
                        rec.set(f"projected/{m}@{h}/slowdown_per_doubling/{k.split('_')[0]}", v)
