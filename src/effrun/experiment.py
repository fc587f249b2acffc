"""Experiment: the resolved config turned into objects (hardware, techniques, data, recorder)
and one run of the mode's loop. Data flows config -> experiment -> loop -> recorder -> sinks.
"""
from __future__ import annotations

import os
import sys
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from effrun import registry
from effrun.config.compose import technique_nodes, validate
from effrun.config.validate_deep import validate_plugins
from effrun.errors import UserError
from effrun.metrics.recorder import Recorder
from effrun.rundir import SUMMARY, atomic_write_json, config_hash, ensure_run_id, read_summary


class Experiment:
    def __init__(self, cfg: DictConfig, run_dir, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.mode = cfg.mode
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.world_size = world_size
        self.techniques = []
        for key, node in technique_nodes(cfg).items():
            spec = registry.get(node.name)
            tech = spec.load()(node, self)
            tech.spec = spec
            self.techniques.append(tech)
        self.recorder: Recorder = Recorder()
        self.summary: Dict[str, Any] = {}

    # --- lazily built parts ----------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @cached_property
    def device(self) -> str:
        import torch

        want = self.cfg.run.device
        if want == "auto":
            want = "cuda" if (self.cfg.hardware.kind == "cuda" and torch.cuda.is_available()) else "cpu"
        if want == "cuda" and not torch.cuda.is_available():
            raise UserError("CUDA requested but no GPU is present", key="run.device", choices=["cpu", "auto"])
        if want == "cuda" and self.world_size > 1:
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return want

    @cached_property
    def tokenizer(self):
        from effrun.models import build_tokenizer

        return build_tokenizer(self.cfg.model)

    @cached_property
    def data(self):
        from effrun.data import TokenBlocks

        return TokenBlocks(self.cfg.data, self.tokenizer, self.vocab_size)

    @cached_property
    def hf_config(self):
        from effrun.models import hf_config

        return hf_config(self.cfg.model)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    def build_model(self, **kw):
        from effrun.models import build_model

        return build_model(self.cfg.model, device=self.device, dtype=self.cfg.run.dtype, **kw)

    def peak_tflops(self) -> Optional[float]:
        return (self.cfg.hardware.peak_tflops or {}).get(self.cfg.run.dtype)

    def technique_named(self, name: str):
        return next((t for t in self.techniques if t.name == name), None)

    # --- the run ---------------------------------------------------------------------------
    def _owner(self):
        owners = [t for t in self.techniques if self.mode in t.spec.owns_loop]
        if len(owners) > 1:
            raise UserError(f"techniques {[t.name for t in owners]} both own the {self.mode} loop",
                            key="technique2")
        return owners[0] if owners else None

    def _meta(self) -> Dict[str, Any]:
        from effrun.metrics.memory import allocator_settings

        c = self.cfg
        return {"mode": self.mode, "model": c.model.name, "hardware": c.hardware.name,
                "technique": self.techniques[0].name if self.techniques else "none",
                "techniques": [t.name for t in self.techniques] or ["none"],
                "config_hash": config_hash(c), "run_dir": str(self.run_dir),
                "world_size": c.parallelism.world_size, "allocator": allocator_settings()}

    def _setup_process(self) -> None:
        import torch

        threads = self.cfg.run.threads
        if threads is None and self.cfg.parallelism.world_size > 1 and self.cfg.parallelism.launcher == "spawn":
            threads = max(1, (os.cpu_count() or 1) // self.cfg.parallelism.world_size)
        if threads:
            torch.set_num_threads(int(threads))
        torch.manual_seed(self.cfg.run.seed)

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        validate(cfg)
        validate_plugins(cfg)
        prior = read_summary(self.run_dir) or {}
        if cfg.run.skip_completed and prior.get("status") == "completed":
            print(f"skip: {self.run_dir} already completed", file=sys.stderr)
            return prior
        self.run_id = ensure_run_id(self.run_dir, cfg)
        p = cfg.parallelism
        if p.world_size > 1 and p.launcher == "spawn":
            return self._run_spawned()
        if p.launcher == "env" and p.world_size > 1:
            from effrun.launch import env_rank, init_process_group, resolve_backend, teardown

            r = env_rank()
            if r is None or r[1] != p.world_size:
                raise UserError(f"launcher=env needs RANK/WORLD_SIZE (or Slurm tasks) matching world_size="
                                f"{p.world_size}; found {r}", key="parallelism.launcher")
            self.rank, self.world_size = r[0], r[1]
            init_process_group(r[0], r[1], resolve_backend(p.backend, "cuda" if cfg.hardware.kind == "cuda" else "cpu"), r[2])
            try:
                return self._run_rank()
            finally:
                teardown()
        return self._run_rank()

    def _run_spawned(self) -> Dict[str, Any]:
        from effrun.launch import resolve_backend, spawn

        backend = resolve_backend(self.cfg.parallelism.backend, "cuda" if self.cfg.hardware.kind == "cuda" else "cpu")
        container = OmegaConf.to_container(self.cfg, resolve=True)
        spawn(_rank_worker, self.cfg.parallelism.world_size, backend, args=(container, str(self.run_dir)))
        return read_summary(self.run_dir) or {}

    def _run_rank(self) -> Dict[str, Any]:
        from effrun.sinks import build_sinks

        self._setup_process()
        for t in self.techniques:
            t.validate()
        owner = self._owner()
        self.summary = {"run_id": self.run_id, "status": "running",
                        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **self._meta()}
        self.recorder = Recorder(warmup_steps=self.cfg.run.warmup_steps)
        if self.is_main:
            self._write_summary()
        status, error = "failed", None
        try:
            if owner is not None:
                owner.run(self.mode)
            else:
                from effrun.loops import run_loop

                run_loop(self)
            for t in self.techniques:
                self.recorder.update(t.metrics())
            status = "completed"
        except UserError as e:
            error = e.line()
            raise
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.summary.update(self.recorder.summary)
            self.summary.update(status=status, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            if error:
                self.summary["error"] = error
            if self.is_main:
                self._write_summary()
                self.recorder.finish()
            self.recorder.close()
        return self.summary

    def start_recorder(self, total_steps: Optional[int], title: Optional[str] = None,
                       resume_from_step: int = 0) -> Recorder:
        """Called by a loop once it knows its length; sinks exist only on rank 0."""
        from effrun.sinks import build_sinks

        sinks = []
        if self.is_main:
            title = title or f"{self.mode} {self.summary.get('technique', '')} {self.cfg.model.name}"
            sinks = build_sinks(self.cfg.logger, self.run_dir, self.run_id,
                                OmegaConf.to_container(self.cfg, resolve=True), total_steps, title,
                                resume_from_step=resume_from_step)
        self.recorder = Recorder(sinks, warmup_steps=self.cfg.run.warmup_steps)
        return self.recorder

    def _write_summary(self) -> None:
        s = dict(self.summary)
        s.update(self.recorder.summary)
        atomic_write_json(self.run_dir / SUMMARY, s)


def _rank_worker(rank: int, world_size: int, container: dict, run_dir: str) -> None:
    cfg = OmegaConf.create(container)
    exp = Experiment(cfg, run_dir, rank=rank, world_size=world_size)
    exp.run_id = ensure_run_id(Path(run_dir), cfg)
    exp._run_rank()
