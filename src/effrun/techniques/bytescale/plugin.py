"""ByteScale in effrun's train loop: three seams, no loop of its own.

- transform_model: attention runs through the ring/zigzag implementation (one global group).
- batch_plan (`HDPPlan`): every step, a global batch of mixed-length real-text sequences is planned
  (HDP balance / naive, or the static DP x CP mesh baseline) into this rank's micro-batches; each
  micro-batch carries its ring layout (and selective offload) as a context; the loss normaliser
  is the global token count (token-level loss). The balance scheduler's cost is profiled: a
  calibration pass (local and ring micro-batches on every rank) before the first step, then
  refitted after each step from all ranks' measured micro-batch CPU times, which are also gathered
  into the imbalance metrics.
- engine (`Zero1Engine`): parameters and gradients replicated, AdamW states sharded (ZeRO-1);
  gradients SUMmed once per step (ranks may run different numbers of micro-batches).
The static-mesh and naive baselines are the same technique with `technique.strategy=static|naive`
(the recipe sweeps them); `effrun plan +technique=bytescale` gives the cluster-scale projection.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Dict, List

import torch

from effrun.errors import UserError
from effrun.loops.batchplan import BatchPlan, MicroBatch, StepPlan
from effrun.loops.engine import Engine
from effrun.technique import Technique
from effrun.techniques.bytescale import engine as E
from effrun.techniques.bytescale import lengths as L
from effrun.techniques.bytescale import offload as O
from effrun.techniques.bytescale import planner as P
from effrun.techniques.bytescale import ring as R

FAMILIES = ("llama", "qwen2", "mistral", "qwen3")


class Zero1Engine(Engine):
    """ByteScale's ZeRO-1 AdamW: SUM of gradients over ranks at the step, sharded optimizer states."""

    def __init__(self, ctx, model, params):
        run = ctx.cfg.run
        self.model = self.module = model
        self.opt = E.Zero1AdamW(list(params), lr=run.lr, weight_decay=run.weight_decay, rank=ctx.rank,
                                world=ctx.world_size)
        self.max_grad_norm = run.max_grad_norm

    def forward_backward(self, closure, last: bool) -> None:
        closure(self.model).backward()

    def step(self):
        return self.opt.step(self.max_grad_norm)

    def state_dict(self):
        return {"model": self.module.state_dict(), "master": self.opt.master.detach().clone(),
                "optimizer": self.opt.opt.state_dict()}

    def load_state_dict(self, state) -> None:
        self.module.load_state_dict(state["model"])
        with torch.no_grad():
            self.opt.master.copy_(state["master"])
        self.opt.opt.load_state_dict(state["optimizer"])

    # every rank keeps only its optimizer shard: checkpoints are per rank
    sharded_checkpoint = True

    def summary(self) -> Dict[str, Any]:
        return {"measured/optimizer_state_bytes_per_rank": self.opt.state_bytes(),
                "measured/optimizer_state_bytes_unsharded": 2 * self.opt.n * self.opt.master.element_size()}


class HDPPlan(BatchPlan):
    def __init__(self, tech: "ByteScale"):
        self.t, self.ctx, self.c = tech, tech.ctx, tech.cfg
        self.stream = tech._stream()
        self.cost = tech._flops_cost()
        self.fit_rows: List[tuple] = []
        self.stats: Dict[str, list] = {}
        self.max_rank_tokens = 0
        self.offload_bytes = 0
        self.profile_rows, self.profile_s = 0, 0.0
        self._cur: Dict[str, Any] = {}

    # --- planning --------------------------------------------------------------------------
    def step(self, step: int) -> StepPlan:
        """The step's global batch; with run.grad_accum = g it is split into g consecutive groups of
        sequences (about equal tokens), each planned over all ranks and run after the previous one:
        the same global batch in g waves, so the gradient equals the one-wave step."""
        ctx, c, run = self.ctx, self.c, self.ctx.cfg.run
        if self._needs_profile():
            self.profile()
        lengths = self.t._lengths(step)
        seqs = L.cut_text(self.stream, lengths, seed=run.seed * 7919 + step)
        mbs, plans = [], []
        for group in split_groups(lengths, int(run.grad_accum)):
            sub = [lengths[i] for i in group]
            plan = self.t._plan(c.strategy, sub, self.cost)
            plans.append(plan)
            self.max_rank_tokens = max([self.max_rank_tokens] + [mb.tokens for mbs_ in plan.ranks for mb in mbs_])
            mbs += self._micro_batches(plan, [seqs[i] for i in group])
        self._reset(plans, len(mbs))
        n = sum(lengths)
        return StepPlan(mbs, n_global=n, units=n, samples=len(lengths))

    def _micro_batches(self, plan, seqs) -> List[MicroBatch]:
        index, rank, out = E.PlanIndex(plan), self.ctx.rank, []
        for mb in plan.ranks[rank]:
            ids, labels, pos = E.assemble(mb, seqs)
            batch = {"input_ids": ids[None], "labels": labels[None], "position_ids": pos[None]}
            lay = index.layout(rank, mb)
            out.append(MicroBatch(batch, context=lambda lay=lay, mb=mb, plan=plan: self._micro(lay, mb, plan)))
        return out

    def _reset(self, plans, n_mbs: int) -> None:
        self._cur = {"plans": plans, "records": [], "detail": [], "tokens": 0, "compute_s": 0.0, "cpu_s": 0.0,
                     "wait_s": 0.0, "mbs": n_mbs}

    # --- the profiled cost model ---------------------------------------------------------------
    def _needs_profile(self) -> bool:
        """The balance scheduler plans with a profiled cost: profile once before the first planned
        step (not after a resume, whose checkpoint holds the fit)."""
        c = self.c
        return c.cost_source == "profile" and c.profile and (c.strategy == "balance" or c.offload) and \
            not self.fit_rows

    def profile(self) -> None:
        """Time forward + backward of calibration micro-batches on every rank (local sequences of the
        profile lengths, single and packed; sequences over d = 2..world ranks, two lengths each) and
        fit the cost from all ranks' records, so the first planned step already knows what ring and
        local attention cost here. A short pass first warms up (allocations, kernel checks) and is
        not recorded. The gradients it leaves are dropped."""
        ctx, c = self.ctx, self.c
        t0 = time.perf_counter()
        fam, model = ctx.family, self.t.model
        flops = self.t._flops_cost()
        rows = []
        for k, lengths in enumerate(calibration_lengths(c.capacity, ctx.world_size, list(c.profile_lengths),
                                                        c.max_len, c.min_chunk)):
            plan = P.plan_naive(lengths, ctx.world_size, c.capacity, flops, min_chunk=c.min_chunk)
            seqs = L.cut_text(self.stream, lengths, seed=104_729 + k)
            mbs = self._micro_batches(plan, seqs)
            self._reset([plan], len(mbs))
            for mb in mbs:
                batch = fam.to_device(mb.batch)
                with mb.context():
                    loss, _ = fam.loss(model, batch)
                    (loss / sum(lengths)).backward()
            if k > 0:
                rows += self._cur["records"]
        for p in model.parameters():
            p.grad = None
        self._cur = {}
        for r in ctx.all_gather_object(rows):
            self.fit_rows.extend(r)
        self.profile_rows = len(self.fit_rows)
        self.profile_s = time.perf_counter() - t0
        self._refit()

    def _refit(self) -> None:
        coef, _ = E.fit_cost(self.fit_rows)  # same records on every rank -> the same plan everywhere
        if coef[0] > 0 or coef[1] > 0 or coef[2] > 0:
            self.cost = P.Cost(a1=coef[0], a1_ring=coef[1], b1=coef[2], p=coef[3], r=coef[4], g=coef[5], unit="s")

    @contextlib.contextmanager
    def _micro(self, lay, mb, plan):
        """Around one micro-batch's forward and backward: its ring layout, its selective offload,
        and its compute time (CPU time of this thread, less the P2P waits)."""
        off = self._offload(mb, plan)
        wait0, wcpu0 = R.COMM["wait_s"], R.COMM["wait_cpu_s"]
        c0, t0 = time.thread_time(), time.perf_counter()
        with R.use_layout(lay), (off if off is not None else contextlib.nullcontext()):
            yield
        if str(self.ctx.device).startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        wait = R.COMM["wait_s"] - wait0
        cpu = time.thread_time() - c0 - (R.COMM["wait_cpu_s"] - wcpu0)
        cur = self._cur
        cur["tokens"] += sum(b - a for p in mb.pieces for a, b in p.ranges)
        cur["compute_s"] += wall - wait
        cur["cpu_s"] += cpu
        cur["wait_s"] += wait
        cur["records"].append((E.features(plan, mb), cpu))
        if self.c.trace:
            cur["detail"].append({"wave": mb.wave, "tokens": mb.tokens, "pieces": len(mb.pieces),
                                  "ring": len(mb.ring or ()), "pred": plan.cost.g + sum(
                                      plan.cost.piece(plan.lengths[p.seq], len(p.ring)) for p in mb.pieces),
                                  "cpu_s": cpu, "wall_s": wall, "wait_s": wait})
        if off is not None:
            self.offload_bytes += off.bytes

    def _offload(self, mb, plan):
        c = self.c
        if not c.offload:
            return None
        l = self.t.hf_config.num_hidden_layers
        longest = max(plan.lengths[p.seq] for p in mb.pieces)
        r, _ = O.solve(longest, c.capacity, l, self.t._layer_model(plan.cost), self.t._bw())
        ids = O.offloaded_layers(r, l)
        return O.OffloadHooks(self.t.model, ids) if ids else None

    # --- after each step: the ranks' times side by side -------------------------------------
    def after_step(self, step: int, result: Dict[str, Any]) -> Dict[str, Any]:
        ctx, c, run, cur = self.ctx, self.c, self.ctx.cfg.run, self._cur
        rows = ctx.all_gather_object({k: cur[k] for k in ("tokens", "compute_s", "cpu_s", "wait_s", "records", "mbs",
                                                          "detail")} | {"step_s": result["step_time_s"]})
        predicted = [sum(x) for x in zip(*(p.rank_cost() for p in cur["plans"]))]
        vals = {"token_imbalance": P.imbalance([r["tokens"] for r in rows]),
                "compute_imbalance": P.imbalance([r["cpu_s"] for r in rows]),
                "compute_wall_imbalance": P.imbalance([r["compute_s"] for r in rows]),
                "predicted_imbalance": P.imbalance(predicted),
                "comm_wait_s": max(r["wait_s"] for r in rows),
                "micro_batches_max": max(r["mbs"] for r in rows),
                "micro_batches_min": min(r["mbs"] for r in rows),
                "step_time_max_s": max(r["step_s"] for r in rows)}
        if c.trace and ctx.is_main:
            import json

            cost = cur["plans"][0].cost
            row = {"step": step, "strategy": c.strategy, "predicted": predicted,
                   "cost": [cost.a1, cost.a1_ring, cost.b1, cost.p, cost.r, cost.g, cost.unit],
                   "ranks": [{k: r[k] for k in ("cpu_s", "compute_s", "wait_s", "tokens", "mbs", "step_s", "detail")}
                             for r in rows]}
            with open(ctx.run_dir / "bytescale_trace.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if step >= run.warmup_steps or run.max_steps <= run.warmup_steps:
            for k, v in vals.items():
                self.stats.setdefault(k, []).append(v)
            self.stats.setdefault("rank_cpu", []).append([r["cpu_s"] for r in rows])
        if step >= min(1, run.warmup_steps) or run.max_steps == 1:  # calibration skips only step 0
            for r in rows:
                self.fit_rows.extend(r["records"])
        if c.cost_source == "profile" and self.fit_rows:
            self._refit()
        return vals

    def state_dict(self):
        cost = self.cost
        return {"fit_rows": [(list(map(float, f)), float(t)) for f, t in self.fit_rows],
                "cost": [cost.a1, cost.a1_ring, cost.b1, cost.p, cost.r, cost.g, cost.unit],
                "stats": {k: v for k, v in self.stats.items()}, "max_rank_tokens": self.max_rank_tokens,
                "profile": [self.profile_rows, self.profile_s]}

    def load_state_dict(self, state) -> None:
        if not state:
            return
        self.fit_rows = [(list(f), t) for f, t in state["fit_rows"]]
        a1, a1r, b1, p, r, g, unit = state["cost"]
        self.cost = P.Cost(a1=a1, a1_ring=a1r, b1=b1, p=p, r=r, g=g, unit=unit)
        self.stats = dict(state["stats"])
        self.max_rank_tokens = int(state["max_rank_tokens"])
        self.profile_rows, self.profile_s = state.get("profile", (0, 0.0))

    # --- summary -----------------------------------------------------------------------------
    def summary(self) -> Dict[str, Any]:
        s, out = self.stats, {}
        if s:
            for k in ("token_imbalance", "compute_imbalance", "compute_wall_imbalance", "predicted_imbalance",
                      "comm_wait_s"):
                out[f"measured/{k}"] = sum(s[k]) / len(s[k])
            out["measured/compute_imbalance_median"] = statistics.median(s["compute_imbalance"])
            # per-rank CPU time summed over the timed steps (per-step noise on shared cores averages out)
            out["measured/compute_imbalance_pooled"] = P.imbalance([sum(x) for x in zip(*s["rank_cpu"])])
            out["measured/micro_batches_max"] = max(s["micro_batches_max"])
            out["measured/micro_batches_min"] = min(s["micro_batches_min"])
        out["measured/max_tokens_per_rank_micro_batch"] = self.max_rank_tokens
        out["measured/capacity_tokens"] = self.c.capacity
        out["info/strategy"] = self.c.strategy
        out["measured/ring_bytes_sent_rank0"] = R.COMM["bytes"]
        if self.c.offload:
            out["measured/offloaded_bytes_rank0"] = self.offload_bytes
        # calibration: micro-batch CPU time fitted on (sum s^2/d, sum s/d, sequences, 1)
        if len(self.fit_rows) >= 6:
            coef, r2 = E.fit_cost(self.fit_rows)
            for k, v in zip(("s_per_token2_local", "s_per_token2_ring", "s_per_token", "s_per_sequence",
                             "s_per_ring_step", "s_per_micro_batch"), coef):
                out[f"measured/cost_fit/{k}"] = v
            out["measured/cost_fit/r2"] = r2
            fl = self.t._flops_cost()
            _, r2f = E.fit_cost([([fl.a1 * (f[0] + f[1]) + fl.b1 * f[2]], t) for f, t in self.fit_rows])
            out["measured/cost_fit/r2_flops_only"] = r2f
            out["measured/cost_fit/micro_batches"] = len(self.fit_rows)
        if self.profile_rows:
            out["measured/cost_fit/profile_micro_batches"] = self.profile_rows
            out["measured/cost_fit/profile_s"] = self.profile_s
        if self.c.project and self.ctx.is_main:
            out.update(self.t.projection())
        return out


def split_groups(lengths: List[int], groups: int) -> List[List[int]]:
    """Indices of `lengths` cut into `groups` consecutive runs of about equal tokens (none empty)."""
    groups = max(1, min(groups, len(lengths)))
    total, out, cur, acc = sum(lengths), [], [], 0
    for i, n in enumerate(lengths):
        cur.append(i)
        acc += n
        left = len(lengths) - i - 1
        if len(out) < groups - 1 and (acc >= total * (len(out) + 1) / groups or left == groups - 1 - len(out)):
            out.append(cur)
            cur = []
    out.append(cur)
    return [g for g in out if g]


def calibration_lengths(capacity: int, world: int, profile_lengths: List[int], max_len: int,
                        min_chunk: int) -> List[List[int]]:
    """The profile pass's batches: a warm-up batch, then two measured ones. Each measured batch has
    local sequences of every profile length (packed to C: 1..C/L pieces per micro-batch) and, for every
    ring size d = 2..world a run may need (d C - C/4 or d C - C/2 tokens <= max_len), one sequence over
    d ranks; the two batches differ in the ring lengths so s^2/d and s/d are told apart."""
    top = min(capacity, max_len)
    local = []
    for n in sorted({x for x in profile_lengths if 0 < x <= top} | {top}):
        local += [n] * max(1, capacity // n)
    out = []
    for cut in (2, 4):
        ring = [d * capacity - capacity // cut for d in range(2, world + 1)]
        out.append(local + [s for d, s in zip(range(2, world + 1), ring)
                            if s <= max_len and s // (2 * d) >= min_chunk])
    warm = [top] * world + ([2 * capacity] if world > 1 and 2 * capacity <= max_len and capacity // 2 >= min_chunk
                            else [])
    return [warm] + out


class ByteScale(Technique):
    @property
    def hf_config(self):
        return self.ctx.family.hf_config

    def validate(self) -> None:
        if self.ctx.mode == "plan":
            return
        arch = self.ctx.cfg.model.arch
        if arch not in FAMILIES:
            raise UserError(f"bytescale's packed/ring attention supports decoder architectures {FAMILIES}, not "
                            f"{arch!r}", key="model", choices=["llama-tiny", "smollm2-135m"])
        maxpos = getattr(self.hf_config, "max_position_embeddings", None)
        if maxpos and self.cfg.max_len > maxpos and self.cfg.distribution != "fixed":
            raise UserError(f"max_len={self.cfg.max_len} exceeds the model's max_position_embeddings={maxpos}",
                            key="technique.max_len")

    # --- seams -------------------------------------------------------------------------------
    def transform_model(self, model):
        from effrun.families.causal_lm.loss import unwrap

        unwrap(model).set_attn_implementation(R.register())
        R.configure(impl=self.cfg.ring_impl, overlap=self.cfg.ring_overlap)
        self.model = model
        return model

    def engine(self, model, params):
        return Zero1Engine(self.ctx, model, params)

    def batch_plan(self):
        return HDPPlan(self)

    def plan(self) -> None:
        rec = self.ctx.start_recorder(1, f"plan bytescale {self.cfg.project_models} on {self.cfg.project_hardware}")
        rec.update(self.projection())

    # --- set-up helpers ------------------------------------------------------------------------
    def _stream(self):
        ctx, c = self.ctx, self.cfg
        if ctx.cfg.data.kind == "synthetic":
            g = torch.Generator().manual_seed(ctx.cfg.data.seed)
            return torch.randint(0, ctx.family.vocab_size, (max(4 * c.tokens_per_step, 2 * c.max_len + 2),),
                                 generator=g)
        return ctx.family.data.train.reshape(-1)

    def _lengths(self, step: int) -> List[int]:
        c = self.cfg
        if c.distribution == "fixed":
            return [int(x) for x in c.fixed_lengths]
        dist = L.get(c.distribution, c.max_len, c.min_len)
        return L.sample_batch(dist, c.tokens_per_step, seed=self.ctx.cfg.run.seed * 1_000_003 + step,
                              max_len=c.max_len)

    def _flops_cost(self) -> P.Cost:
        hc = self.hf_config
        h, l, ffn = hc.hidden_size, hc.num_hidden_layers, hc.intermediate_size
        kv = h * getattr(hc, "num_key_value_heads", hc.num_attention_heads) // hc.num_attention_heads
        return P.Cost.flops(h, l, 2 * h * h + 2 * h * kv + 3 * h * ffn)

    def _layer_model(self, cost: P.Cost) -> O.LayerModel:
        hc = self.hf_config
        l = hc.num_hidden_layers
        # activation bytes per token per layer: 34 h values (Korthikanti et al.) x the dtype's bytes
        act = 34 * hc.hidden_size * (2 if self.ctx.cfg.run.dtype in ("bfloat16", "float16") else 4)
        # a fitted (profile) cost is in seconds already; a FLOP cost is turned into seconds at an
        # assumed 1e10 FLOP/s (it only matters relative to the copy bandwidth)
        rate = 1.0 if cost.unit == "s" else 1e10
        return O.LayerModel(cost.a1 / l / rate, cost.b1 / l / rate, cost.p / l / rate, act, 0.0)

    def _bw(self) -> float:
        c, hw = self.cfg, self.ctx.cfg.hardware
        if c.offload_bw_GBps > 0:
            return c.offload_bw_GBps * 1e9
        return (hw.host_link.bandwidth_GBps if hw.host_link else 16.0) * 1e9

    def _plan(self, strategy: str, lengths, cost: P.Cost) -> P.Plan:
        c, world = self.cfg, self.ctx.world_size
        ranks_for = None
        if c.offload and strategy != "static":
            l = self.hf_config.num_hidden_layers
            ranks_for = O.ranks_for(c.capacity, l, self._layer_model(cost), self._bw())
        return P.make_plan(strategy, lengths, world, c.capacity, cost, delta=c.delta, balance=c.balance,
                           n_buckets=c.buckets, static_cp=c.static_cp, ranks_for=ranks_for, min_chunk=c.min_chunk)

    # --- projection (cost model) ----------------------------------------------------------------
    def projection(self) -> Dict[str, Any]:
        from effrun.techniques.bytescale import costmodel as CM

        c, out = self.cfg, {}
        rows = CM.project_grid(list(c.project_models), list(c.project_hardware), c.project_gpus,
                               list(c.project_contexts), c.project_distribution, c.project_global_tokens,
                               c.project_mfu, c.project_batches)
        for r in rows:
            key = f"projected/{r['model']}@{r['hardware']}x{r['gpus']}/{r['context'] // 1024}K"
            if "error" in r:
                out[f"{key}/error"] = r["error"]
                continue
            for k in ("static_step_s", "naive_step_s", "balance_step_s", "speedup_naive", "speedup_balance",
                      "balance_imbalance", "capacity", "static_cp", "tp"):
                out[f"{key}/{k}"] = r[k]
        out["projected/assumptions"] = (f"{c.project_distribution} lengths, {c.project_global_tokens} tokens/step, "
                                        f"bf16 MFU {c.project_mfu}, 34h bytes/token/layer activations")
        for m in c.project_models:
            for h in c.project_hardware:
                sub = [r for r in rows if r["model"] == m and r["hardware"] == h and "error" not in r]
                for k in ("static_step_s", "naive_step_s", "balance_step_s"):
                    v = CM.doubling_slowdown(sub, k)
                    if v:
                        out[f"projected/{m}@{h}/slowdown_per_doubling/{k.split('_')[0]}"] = v
        return out
