"""The zeropp3 technique: owns the train loop (effrun or DeepSpeed engine) and the plan loop."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from effrun import slurm
from effrun.errors import UserError
from effrun.loops.loss import causal_lm_loss
from effrun.technique import Technique
from effrun.techniques.zeropp3.hierarchy import LEVELS, Hierarchy

CKPT = "checkpoints"


def _hierarchy(p, world: int) -> Hierarchy:
    from effrun.techniques.zeropp3 import dims

    return Hierarchy(1, 1, 1) if world == 1 else Hierarchy(*dims(p))


class Zeropp3(Technique):
    def validate(self) -> None:
        p = self.exp.cfg.parallelism
        if self.exp.world_size > 1 and _hierarchy(p, self.exp.world_size).world != self.exp.world_size:
            raise UserError("hierarchy does not match the number of processes", key="parallelism.world_size")

    def run(self, mode: str) -> None:
        if mode == "plan":
            return self._plan()
        if self.cfg.engine == "deepspeed":
            return self._train_deepspeed()
        return self._train_effrun()

    # --- effrun engine ----------------------------------------------------------------------
    def _ckpt_dirs(self):
        d = self.exp.run_dir / CKPT
        if not d.is_dir():
            return []
        done = [x for x in d.glob("zeropp3_step_*") if (x / "complete").exists()]
        return sorted(done, key=lambda x: int(x.name.rsplit("_", 1)[1]))

    def _save(self, eng, step: int) -> None:
        exp = self.exp
        d = exp.run_dir / CKPT / f"zeropp3_step_{step}"
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".rank_{exp.rank}.pt.tmp"
        torch.save({"step": step, "engine": eng.state_dict(), "rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, d / f"rank_{exp.rank}.pt")
        if exp.world_size > 1:
            torch.distributed.barrier()
        if exp.is_main:
            (d / "complete").write_text(str(step))
            for old in self._ckpt_dirs()[:-2]:
                for f in old.iterdir():
                    f.unlink()
                old.rmdir()

    def _train_effrun(self) -> None:
        from effrun.techniques.zeropp3.comm import LevelComm
        from effrun.techniques.zeropp3.engine import PartitionedEngine
        from effrun.techniques.zeropp3.formulas import expected_bytes

        exp, c = self.exp, self.cfg
        run, data, W, rank = exp.cfg.run, exp.data, exp.world_size, exp.rank
        h = _hierarchy(exp.cfg.parallelism, W)
        model = exp.build_model()
        model.train()
        if exp.device != "cpu":
            raise UserError("the effrun engine keeps its shards on the CPU here; use run.device=cpu or "
                            "technique.engine=deepspeed on GPUs", key="technique.engine", choices=["deepspeed"])
        comm = LevelComm(h, rank)
        eng = PartitionedEngine(model, h, rank, scheme=c.scheme, quantized_weights=c.quantized_weights,
                                quantized_gradients=c.quantized_gradients, weight_block=c.weight_block,
                                grad_block=c.grad_block, lr=run.lr, weight_decay=run.weight_decay,
                                max_grad_norm=run.max_grad_norm, comm=comm, gather=c.gather)
        start = 0
        # run.resume, or Slurm requeued this job (preemption/time limit): continue from the last checkpoint
        dirs = self._ckpt_dirs() if (run.resume or slurm.requeued()) else []
        if dirs:
            st = torch.load(dirs[-1] / f"rank_{rank}.pt", map_location="cpu", weights_only=False)
            eng.load_state_dict(st["engine"])
            torch.set_rng_state(st["rng"])
            start = int(st["step"])
        rec = exp.start_recorder(run.max_steps, f"train zeropp3/{c.scheme} ({c.engine}) {exp.cfg.model.name}",
                                 resume_from_step=start)
        if start:
            rec.set("measured/resumed_from_step", start)
        ga, bs = run.grad_accum, data.batch_size
        tokens = bs * ga * data.seq_len * W
        lossf = lambda m, x, y: causal_lm_loss(m, x, y, run.chunked_ce)  # noqa: E731
        per_iter = None
        for step in range(start, run.max_steps):
            comm.reset()
            t0 = time.perf_counter()
            micro = [data.batch((step * ga + m) * W + rank) for m in range(ga)]
            loss = eng.train_step(micro, lossf)
            dt = time.perf_counter() - t0
            sent = torch.tensor([comm.sent[lv] for lv in LEVELS], dtype=torch.float64)
            if W > 1:
                torch.distributed.all_reduce(sent)
            per_iter = dict(zip(LEVELS, sent.tolist()))
            rec.log_step(step, loss=loss, step_time_s=dt, tokens=tokens, samples=bs * ga * W,
                         tokens_per_s=tokens / dt, **{f"bytes_{lv}": v for lv, v in per_iter.items()})
            saved = bool(run.checkpoint_every) and (step + 1) % run.checkpoint_every == 0
            if saved:
                self._save(eng, step + 1)
            # Slurm signalled a preemption/time limit: should_stop answers the same on every rank and
            # _save has barriers, so every rank checkpoints its shard, then the job is requeued
            if slurm.should_stop(exp, step):
                if not saved:
                    self._save(eng, step + 1)
                raise slurm.Requeue(step + 1)
            if run.crash_after_steps is not None and step + 1 >= run.crash_after_steps:
                os._exit(137)  # test hook: a kill -9 after this step
        slurm.stop_polling()
        rec.aggregate_steps()
        # bytes per link level: measured (summed over ranks) and the closed-form formula
        elem = eng.full.element_size()
        expect = expected_bytes(c.scheme, h, eng.N, elem, c.quantized_weights, c.quantized_gradients,
                                c.weight_block, c.grad_block)
        M = eng.N * elem
        for lv in LEVELS:
            if per_iter is not None:
                rec.set(f"measured/bytes_per_iter_{lv}", per_iter[lv])
                rec.set(f"measured/bytes_per_iter_per_node_{lv}", per_iter[lv] / h.nodes)
            rec.set(f"projected/formula_bytes_per_iter_{lv}", expect[lv] * ga)
        if per_iter is not None:
            rec.set("measured/cross_node_bytes_per_node_over_M", per_iter["node"] / h.nodes / M)
        rec.set("measured/model_bytes_M", M)
        st = eng.state_bytes()
        for k, v in st.items():
            rec.set(f"measured/state_bytes_{k}", v)
        k_hpz = len(eng.hpz_group) if eng.hpz_group else 0
        rec.set("projected/formula_state_bytes_primary", M / W)
        rec.set("projected/formula_state_bytes_secondary", M / k_hpz if k_hpz else 0)
        rec.set("measured/hpz_group_size", k_hpz)
        rec.set("measured/hierarchy", f"{h.nodes}x{h.devices}x{h.subdevices}")
        rec.set("measured/gather_units", len(eng.units))
        rec.set("measured/peak_gathered_bytes", getattr(eng, "peak_gathered_bytes", 0))
        if run.eval_at_end:
            from effrun.loops.train import evaluate

            if eng.by_layer:  # the forward hooks gather each layer
                rec.set("measured/eval_loss", evaluate(exp, model))
            else:
                eng.load_full_into_model()
                rec.set("measured/eval_loss", evaluate(exp, model))
                eng.release(eng.units[0])

    # --- DeepSpeed engine -------------------------------------------------------------------
    # (no checkpoint/resume and no slurm.should_stop polling: a preemption signal here takes
    # submitit's own path, a requeue that restarts the run from step 0)
    def _train_deepspeed(self) -> None:
        from effrun.launch import free_port
        from effrun.techniques.zeropp3.dsconfig import ds_config

        exp, c = self.exp, self.cfg
        run, data, W, rank = exp.cfg.run, exp.data, exp.world_size, exp.rank
        if W == 1:  # DeepSpeed wants launcher variables even for one process
            for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
                os.environ.setdefault(k, v)
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        import importlib

        import deepspeed

        if exp.device == "cpu":  # skip compiling the shm op (init 25 s -> 2 s); note that
            # `import deepspeed.comm.torch` binds the torch package, hence import_module
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        conf = ds_config(exp.cfg, c)
        model = exp.build_model()
        opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=conf)
        rec = exp.start_recorder(run.max_steps, f"train zeropp3/{c.scheme} (deepspeed) {exp.cfg.model.name}")
        ga, bs = run.grad_accum, data.batch_size
        tokens = bs * ga * data.seq_len * W
        for step in range(run.max_steps):
            t0 = time.perf_counter()
            tot = 0.0
            for m in range(ga):
                x, y = data.batch((step * ga + m) * W + rank)
                loss = causal_lm_loss(engine, x.to(engine.device), y.to(engine.device), run.chunked_ce)
                engine.backward(loss)
                engine.step()
                tot += float(loss.detach())
            lt = torch.tensor([tot / ga], dtype=torch.float64)
            if W > 1:
                torch.distributed.all_reduce(lt)
            dt = time.perf_counter() - t0
            rec.log_step(step, loss=float(lt) / W, step_time_s=dt, tokens=tokens, samples=bs * ga * W,
                         tokens_per_s=tokens / dt)
        rec.aggregate_steps()
        z = conf["zero_optimization"]
        rec.set("measured/deepspeed_zero_stage", z["stage"])
        rec.set("measured/deepspeed_hpz_partition_size", z["zero_hpz_partition_size"])
        rec.set("measured/deepspeed_quantized_weights", z["zero_quantized_weights"])
        rec.set("measured/deepspeed_quantized_gradients", z["zero_quantized_gradients"])
        if exp.is_main:
            (exp.run_dir / "ds_config.json").write_text(json.dumps(conf, indent=2))

    # --- cost model (mode=plan) ------------------------------------------------------------------
    def _plan(self) -> None:
        from effrun.costmodel import levels_from_hardware
        from effrun.costmodel.zero import SCHEMES, project_zero, ratio
        from effrun.metrics.flops import count_params, nonembedding_params

        exp, c, cfg = self.exp, self.cfg, self.exp.cfg
        hw = cfg.hardware
        try:
            levels = levels_from_hardware(hw)
        except ValueError:
            raise UserError(f"hardware {hw.name!r} has no link levels to project onto", key="hardware",
                            choices=["mi250x-gcd", "h100-sxm"]) from None
        peak = (hw.peak_tflops or {}).get(c.plan_dtype)
        if not peak:
            raise UserError(f"hardware {hw.name!r} has no peak for {c.plan_dtype}", key="technique.plan_dtype",
                            choices=[k for k, v in (hw.peak_tflops or {}).items() if v])
        eff, eff_src = c.compute_efficiency, "assumed (technique.compute_efficiency)"
        if c.calibrate_from:
            s = json.loads(Path(c.calibrate_from).read_text())
            if s.get("measured/mfu"):
                eff, eff_src = float(s["measured/mfu"]), f"measured/mfu of {c.calibrate_from}"
        from transformers import AutoModelForCausalLM

        hc = exp.hf_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hc)
        P, Pn = count_params(model), nonembedding_params(model)
        L = getattr(hc, "num_hidden_layers", getattr(hc, "n_layer", 1))
        H = getattr(hc, "hidden_size", getattr(hc, "n_embd", 1))
        wire = 2.0 if c.plan_dtype in ("bfloat16", "float16") else 4.0
        devs = [int(d) for d in c.plan_devices]
        rows = project_zero(P, Pn, L, H, levels, float(peak), devs, c.plan_micro_batch, c.plan_seq_len,
                            eff, c.overlap, SCHEMES, wire)
        rec = exp.start_recorder(len(rows), f"plan zeropp3 {cfg.model.name} on {hw.name}")
        for i, r in enumerate(rows):
            rec.log_step(i, **{k: v for k, v in r.items() if k != "parts"},
                         **{f"comm_{k}_s": v for k, v in r["parts"].items()})
        top = max(devs)
        rec.set("projected/target", f"{cfg.model.name} on {hw.name} ({c.plan_dtype}), {top} devices max")
        rec.set("projected/params", P)
        rec.set("projected/compute_efficiency", eff)
        rec.set("projected/compute_efficiency_source", eff_src)
        for r in rows:
            if r["devices"] == top:
                rec.set(f"projected/{r['scheme']}_tflops_per_device_at_{top}", r["tflops_per_device"])
                rec.set(f"projected/{r['scheme']}_scaling_efficiency_at_{top}", r["scaling_efficiency"])
                rec.set(f"projected/{r['scheme']}_comm_s_at_{top}", r["comm_s"])
                rec.set(f"projected/{r['scheme']}_scaling_efficiency_multinode_at_{top}",
                        r["scaling_efficiency_multinode"])
                rec.set(f"projected/{r['scheme']}_model_state_GB_at_{top}", r["model_state_GB"])
        rec.set(f"projected/hier3_over_zeropp_tflops_at_{top}", ratio(rows, "hier3", "zeropp", top))
        rec.set(f"projected/zeropp_over_zero3_tflops_at_{top}", ratio(rows, "zeropp", "zero3", top))
        rec.set(f"projected/hier3_over_zero3_tflops_at_{top}", ratio(rows, "hier3", "zero3", top))
        if exp.is_main:
            _write_table(exp.run_dir, rows, hw.name, cfg.model.name)

    def metrics(self):
        return {}


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _write_table(run_dir: Path, rows, hw: str, model: str) -> None:
    lines = [f"# ZeRO-3 / ZeRO++ / 3-level projection: {model} on {hw} (projected)", "",
             "| scheme | devices | comm s | compute s | TFLOPS/device | scaling eff. (vs smallest) | "
             "scaling eff. (vs first multi-node) | model states GB/device |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['devices']} | {r['comm_s']:.3f} | {r['compute_s']:.3f} | "
                     f"{r['tflops_per_device']:.1f} | {r['scaling_efficiency']:.3f} | "
                     f"{_f(r['scaling_efficiency_multinode'])} | {r['model_state_GB']:.1f} |")
    (run_dir / "zeropp3_projection.md").write_text("\n".join(lines) + "\n")
    (run_dir / "zeropp3_projection.json").write_text(json.dumps(rows, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        rs = [r for r in rows if r["scheme"] == scheme]
        ax[0].plot([r["devices"] for r in rs], [r["tflops_per_device"] for r in rs], marker="o", label=scheme)
        ax[1].plot([r["devices"] for r in rs], [r["scaling_efficiency"] for r in rs], marker="o", label=scheme)
    ax[0].set(xlabel="devices", ylabel="TFLOPS per device (projected)", xscale="log", title=f"{model} on {hw}")
    ax[1].set(xlabel="devices", ylabel="scaling efficiency (projected)", xscale="log")
    ax[0].legend()
    (run_dir / "plots").mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(run_dir / "plots" / "zeropp3_scaling.png", dpi=80)
    plt.close(fig)
