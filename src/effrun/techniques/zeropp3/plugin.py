"""The zeropp3 technique: the engine seam of the train loop (effrun's partitioned engine or
DeepSpeed) and plan mode (the alpha-beta cost model over the target's link levels)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from effrun.errors import UserError
from effrun.technique import Technique


class Zeropp3(Technique):
    def engine(self, model, params):
        from effrun.techniques.zeropp3.engines import DeepSpeedZero3, Fsdp2Engine, ZeroEngine

        if self.cfg.engine == "deepspeed":
            return DeepSpeedZero3(self.ctx, model, params, self.cfg)
        if self.cfg.engine == "fsdp2":
            return Fsdp2Engine(self.ctx, model, params, self.cfg)
        return ZeroEngine(self.ctx, model, params, self.cfg)

    # --- cost model (mode=plan) ------------------------------------------------------------------
    def plan(self) -> None:
        from effrun.costmodel import levels_from_hardware
        from effrun.techniques.zeropp3.costmodel import SCHEMES, project_zero, quant_rate, ratio
        from effrun.metrics.flops import count_params, nonembedding_params

        ctx, c, cfg = self.ctx, self.cfg, self.ctx.cfg
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
            try:
                s = json.loads(Path(c.calibrate_from).read_text())
                if not isinstance(s, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read {c.calibrate_from!r}: {type(e).__name__}: {e}",
                                key="technique.calibrate_from") from None
            if s.get("measured/mfu"):
                eff, eff_src = float(s["measured/mfu"]), f"measured/mfu of {c.calibrate_from}"
        from transformers import AutoModelForCausalLM

        # the real shape on the meta device (no memory): exact parameter counts. Not accelerate's
        # init_empty_weights: it re-registers the tied lm_head as a second parameter (gpt-20b:
        # 20,565,577,728 counted instead of 20,256,509,952)
        hc = ctx.family.hf_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hc)
        P, Pn = count_params(model), nonembedding_params(model)
        L = getattr(hc, "num_hidden_layers", getattr(hc, "n_layer", 1))
        H = getattr(hc, "hidden_size", getattr(hc, "n_embd", 1))
        wire = 2.0 if c.plan_dtype in ("bfloat16", "float16") else 4.0
        devs = [int(d) for d in c.plan_devices]
        qr = ({8: c.plan_quant_GBps, 4: c.plan_quant_GBps} if c.plan_quant_GBps else
              {b: quant_rate(hw.get("memory_bw_GBps"), b) for b in (8, 4)})
        rows = project_zero(P, Pn, L, H, levels, float(peak), devs, c.plan_micro_batch, c.plan_seq_len,
                            eff, SCHEMES, wire, prefetch=c.prefetch, overlap_reduce=c.overlap_reduce, quant_GBps=qr,
                            qw=c.quantized_weights, qg=c.quantized_gradients)
        rec = ctx.start_recorder(len(rows), f"plan zeropp3 {cfg.model.name} on {hw.name}")
        for i, r in enumerate(rows):
            rec.log_step(i, **{k: v for k, v in r.items() if k not in ("parts", "terms")},
                         **{f"comm_{k}_s": v for k, v in r["parts"].items()})
        top = max(devs)
        rec.set("projected/target", f"{cfg.model.name} on {hw.name} ({c.plan_dtype}), {top} devices max")
        rec.set("projected/params", P)
        rec.set("projected/compute_efficiency", eff)
        rec.set("projected/compute_efficiency_source", eff_src)
        rec.set("info/plan_overlap", f"prefetch={c.prefetch} overlap_reduce={c.overlap_reduce}; quantise+dequantise "
                f"{qr[8]:.1f} (INT8) / {qr[4]:.1f} (INT4) GB/s")
        for r in rows:
            if r["devices"] == top:
                rec.set(f"projected/{r['scheme']}_tflops_per_device_at_{top}", r["tflops_per_device"])
                rec.set(f"projected/{r['scheme']}_scaling_efficiency_at_{top}", r["scaling_efficiency"])
                rec.set(f"projected/{r['scheme']}_comm_s_at_{top}", r["comm_s"])
                rec.set(f"projected/{r['scheme']}_exposed_comm_s_at_{top}", r["exposed_comm_s"])
                rec.set(f"projected/{r['scheme']}_quant_s_at_{top}", r["quant_s"])
                rec.set(f"projected/{r['scheme']}_step_s_at_{top}", r["step_s"])
                rec.set(f"projected/{r['scheme']}_scaling_efficiency_multinode_at_{top}",
                        r["scaling_efficiency_multinode"])
                rec.set(f"projected/{r['scheme']}_model_state_GB_at_{top}", r["model_state_GB"])
        rec.set(f"projected/hier3_over_zeropp_tflops_at_{top}", ratio(rows, "hier3", "zeropp", top))
        rec.set(f"projected/zeropp_over_zero3_tflops_at_{top}", ratio(rows, "zeropp", "zero3", top))
        rec.set(f"projected/hier3_over_zero3_tflops_at_{top}", ratio(rows, "hier3", "zero3", top))
        if ctx.is_main:
            _write_table(ctx.run_dir, rows, hw.name, cfg.model.name)
            (ctx.run_dir / "zeropp3_terms.md").write_text(terms_table(rows, top, f"{cfg.model.name} on {hw.name}, "
                                                                       f"prefetch={c.prefetch}, overlap_reduce="
                                                                       f"{c.overlap_reduce}"))


def terms_table(rows, W: int, title: str) -> str:
    """Markdown: every collective and kernel of each scheme at W devices, time hidden / exposed."""
    lines = [f"# Term by term at {W} devices: {title} (projected)", "",
             "| scheme | term | level | GB sent/device | time s | of it latency s | hidden s | exposed s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["devices"] != W:
            continue
        for name, t in r["terms"].items():
            lines.append(f"| {r['scheme']} | {name} | {t['level']} | {t['bytes_sent'] / 1e9:.2f} | {t['seconds']:.3f} | "
                         f"{t['latency_s']:.3f} | {t['hidden_s']:.3f} | {t['exposed_s']:.3f} |")
        lines.append(f"| {r['scheme']} | compute | - | - | {r['compute_s']:.3f} | - | - | {r['compute_s']:.3f} |")
        lines.append(f"| {r['scheme']} | **step** | - | - | **{r['step_s']:.3f}** | - | - | "
                     f"{r['tflops_per_device']:.1f} TFLOPS/device |")
    return "\n".join(lines) + "\n"


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
