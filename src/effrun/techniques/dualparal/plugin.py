"""The dualparal technique: the `pipeline_executor` seam (infer) and the projection (plan).

infer: every rank builds its executor (DualParal: only its contiguous layers, + patch/time embedding
on rank 0, + head on the last rank; Ulysses: the whole DiT and its frames); the video-diffusion
family's session runs it one round per sampler iteration in the one infer loop. At the end each
rank's counters (bytes, messages, waits, in-flight bounds, feature-cache hits, iterations) are
gathered into `measured/dualparal/*` (or `measured/ulysses/*`).

plan: `costmodel.project` for the model (model.* when it is a video-diffusion model, else
`configs/model/<project_model>.yaml`) on `project_gpus` GPUs of the hardware target (hardware.*
when it is a GPU, else `configs/hardware/<project_hardware>.yaml`), one row per context size K.
"""
from __future__ import annotations

from typing import Any, Dict, List

from effrun.errors import UserError
from effrun.technique import Technique

PAPER = ("up to 6.54x lower latency and 1.48x lower memory than the best prior method at 1,025 frames on "
         "8x RTX 4090 (PCIe 4.0) (DualParal abstract, arXiv 2505.21070)")


def _yaml(group: str, name: str, schema) -> Any:
    from omegaconf import OmegaConf

    from effrun.config.paths import config_dir, group_options

    path = config_dir() / group / f"{name}.yaml"
    if not path.exists():
        raise UserError(f"no {group} config {name!r}", key=f"technique.project_{group}", choices=group_options(group))
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))  # strict: typed keys only


def hardware_model(hw, dtype: str):
    """costmodel.Hardware from a hardware config: peak dense TFLOPS of `dtype`, memory, and the
    GPU-to-GPU link (the first interconnect level; PCIe 4.0 p2p on RTX 4090 boxes)."""
    from effrun.techniques.dualparal.costmodel import Hardware

    peak = (hw.peak_tflops or {}).get(dtype)
    link = hw.links[0] if hw.links else hw.host_link
    if not peak or link is None or not hw.memory_gb:
        raise UserError(f"hardware {hw.name!r} lacks peak_tflops.{dtype}, memory_gb or a GPU link for the "
                        "projection", key="hardware")
    return Hardware(hw.name, float(peak) * 1e12, float(hw.memory_gb), float(link.bandwidth_GBps) * 1e9,
                    float(link.latency_us) * 1e-6)


def _per_rank(reports: List[dict], key: str) -> list:
    return [r.get(key) for r in reports]


class DualParal(Technique):
    executor = None
    _metrics: Dict[str, Any] = {}

    # --- infer: the pipeline executor -------------------------------------------------------------
    def pipeline_executor(self):
        ctx, fam = self.ctx, self.ctx.family
        c, s = fam.model_config, fam.sampling
        if self.cfg.mode == "dualparal":
            from effrun.techniques.dualparal.pipeline import DualParalExecutor

            # only rank 0 embeds the prompt; the projected context is broadcast to the other ranks
            text = fam.text() if ctx.is_main else None
            self.executor = DualParalExecutor(c, s, ctx.rank, ctx.world_size, text, ctx.device, fam.dtype,
                                              cache=s.feature_cache)
        else:
            from effrun.techniques.dualparal.seqpar import UlyssesExecutor

            self.executor = UlyssesExecutor(c, s, ctx.rank, ctx.world_size, fam.text(), ctx.device, fam.dtype)
        return self.executor

    def on_infer_end(self) -> None:
        ctx = self.ctx
        reports = ctx.all_gather_object(self.executor.report())  # every rank: a collective
        if not ctx.is_main:
            return
        mode, n = self.cfg.mode, ctx.world_size
        m: Dict[str, Any] = {}
        if mode == "dualparal":
            layers = _per_rank(reports, "layers")
            m["info/executor"] = f"dualparal x{n}: layers " + " ".join(f"[{a},{b})" for a, b in layers)
            p = "measured/dualparal/"
            m[p + "layers_per_rank"] = layers
            for k in ("iterations", "items", "bytes_sent", "messages", "wait_s", "compute_s", "max_sends"):
                m[p + f"{k}_per_rank"] = _per_rank(reports, k)
            m[p + "max_outstanding"] = reports[0]["max_outstanding"]
            if "cache_hits" in reports[0]:
                hits, misses = _per_rank(reports, "cache_hits"), _per_rank(reports, "cache_misses")
                m[p + "cache_hits_per_rank"] = hits
                m[p + "cache_misses_per_rank"] = misses
                m[p + "cache_peak_bytes_per_rank"] = _per_rank(reports, "cache_peak_bytes")
                m[p + "cache_hit_rate"] = sum(hits) / max(1, sum(hits) + sum(misses))
        else:
            m["info/executor"] = f"ulysses x{n}: frames " + " ".join(str(f) for f in _per_rank(reports, "frames_local"))
            p = "measured/ulysses/"
            for k in ("bytes_sent", "comm_s", "compute_s", "frames_local", "steps"):
                m[p + f"{k}_per_rank"] = _per_rank(reports, k)
        self._metrics = m

    def metrics(self) -> Dict[str, Any]:
        return dict(self._metrics)

    # --- plan: the projection ---------------------------------------------------------------------
    def plan(self) -> None:
        from effrun.config.schema import HardwareConfig
        from effrun.families.video_diffusion.config import VideoDiTConfig, VideoSamplingConfig
        from effrun.techniques.dualparal.costmodel import dualparal_memory_gb, project

        node, cfg, ctx = self.cfg, self.ctx.cfg, self.ctx
        if cfg.model.get("family") == "video-diffusion":
            from effrun.families.video_diffusion.config import model_config

            model = model_config(cfg.model)
        else:
            model = _yaml("model", node.project_model, VideoDiTConfig)
        hw_cfg = cfg.hardware if cfg.hardware.kind == "cuda" else _yaml("hardware", node.project_hardware,
                                                                       HardwareConfig)
        hw = hardware_model(hw_cfg, node.project_dtype)
        P, gpus = int(node.project_block_frames), int(node.project_gpus)
        if gpus > model.layers:
            raise UserError(f"{gpus} GPUs but {model.name} has only {model.layers} layers",
                            key="technique.project_gpus", choices=list(range(1, model.layers + 1)))
        latents = (int(node.project_frames) - 1) // 4 + 1
        ks = [int(k) for k in node.project_context_frames]
        rec = ctx.start_recorder(len(ks), f"plan dualparal {model.name} on {gpus}x {hw.name}")
        desc = (f"{model.name} on {gpus}x {hw.name} ({node.project_dtype} {hw.peak_flops / 1e12:.1f} TFLOPS at MFU "
                f"{node.project_mfu}, link {hw.link_Bps / 1e9:.0f} GB/s/dir), {node.project_frames} frames requested "
                f"({latents} latents), latent {node.project_height}x{node.project_width}, {node.project_steps} steps, "
                f"P={P}, CFG {node.project_guidance_scale}")
        rec.set("info/projection", desc)
        rec.set("info/paper", PAPER)
        print(f"projected: {desc}")
        print("| P,K | frames | DualParal s | Ulysses s | 1 GPU s (fits?) | latency SP/DP | DP GB/rank | SP GB | "
              "mem SP/DP |")
        for i, k in enumerate(ks):
            lf = -(-(latents - k) // P) * P  # latent_frames: a multiple of P, the video at least as long
            s = VideoSamplingConfig(latent_frames=lf, block_frames=P, context_frames=k, steps=int(node.project_steps),
                                    height=int(node.project_height), width=int(node.project_width),
                                    guidance_scale=float(node.project_guidance_scale))
            r = project(model, s, gpus, hw, float(node.project_mfu), hw_bytes(node.project_dtype))
            pre = f"projected/k{k}/"
            for key, v in r.items():
                rec.set(pre + key[len("projected/"):], v)
            mem0 = dualparal_memory_gb(model, s, gpus, 0, act_bytes=hw_bytes(node.project_dtype),
                                       weight_bytes=hw_bytes(node.project_dtype))
            for key, v in mem0.items():
                rec.set(pre + f"dualparal_rank0_{key}_gb", v)
            rec.log_step(i, context_frames=k, **{key[len("projected/"):]: v for key, v in r.items()
                                                 if not isinstance(v, list)})
            print(f"| {P},{k} | {r['projected/pixel_frames']} | {r['projected/dualparal_latency_s']:.0f} | "
                  f"{r['projected/seqpar_latency_s']:.0f} | {r['projected/single_gpu_latency_s']:.0f} "
                  f"({r['projected/single_gpu_fits']}) | {r['projected/latency_ratio_seqpar_over_dualparal']:.2f}x | "
                  f"{r['projected/dualparal_peak_mem_gb']:.2f} | {r['projected/seqpar_peak_mem_gb']:.2f} | "
                  f"{r['projected/memory_ratio_seqpar_over_dualparal']:.2f}x |")
        print(f"paper: {PAPER}")


def hw_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2
