"""Experiment: the resolved config turned into a run — processes, the task family, the techniques,
a Context for them, one run of the mode's loop, and the summary. Data flows config -> experiment
-> loop -> recorder -> sinks. Techniques and families see the Context, never this object.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from effrun import registry
from effrun.config.compose import technique_nodes, validate
from effrun.config.validate_deep import validate_plugins
from effrun.context import Context
from effrun.errors import UserError
from effrun.metrics.recorder import Recorder
from effrun.rundir import SUMMARY, atomic_write_json, config_hash, ensure_run_id, read_summary


class Experiment:
    def __init__(self, cfg: DictConfig, run_dir, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.mode = cfg.mode
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size = rank, world_size
        self.run_id = ""
        self.meta: Dict[str, Any] = {}
        self.ctx: Context | None = None

    # --- process layout --------------------------------------------------------------------
    def _device(self) -> str:
        import torch

        want = self.cfg.run.device
        if want == "auto":
            want = "cuda" if (self.cfg.hardware.kind == "cuda" and torch.cuda.is_available()) else "cpu"
        if want == "cuda" and not torch.cuda.is_available():
            raise UserError("CUDA requested but no GPU is present", key="run.device", choices=["cpu", "auto"])
        if want == "cuda" and self.world_size > 1:
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return want

    def _technique_processes(self) -> int:
        n = 1
        for key, node in technique_nodes(self.cfg).items():
            spec = registry.get(node.name)
            if spec.processes is not None:
                n = max(n, int(spec.processes(self.cfg, node)))
        return n

    def _backend(self) -> str:
        from effrun.launch import resolve_backend

        return resolve_backend(self.cfg.parallelism.backend, "cuda" if self.cfg.hardware.kind == "cuda" else "cpu")

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        validate(cfg)
        validate_plugins(cfg)
        prior = read_summary(self.run_dir) or {}
        if cfg.run.skip_completed and prior.get("status") == "completed":
            print(f"skip: {self.run_dir} already completed", file=sys.stderr)
            return prior
        # one run per directory: the first rank (or the parent of spawned ranks) holds its lock for
        # the whole run; a second run on it exits 2 naming the holder; the kernel drops it on a crash
        lock = None
        if self._first_rank():
            from effrun.rundir import open_run

            lock = open_run(self.run_dir)
        try:
            return self._run_locked()
        finally:
            if lock is not None:
                lock.release()

    def _first_rank(self) -> bool:
        p = self.cfg.parallelism
        if p.launcher == "env" and p.world_size > 1:
            from effrun.launch import env_rank

            r = env_rank()
            return r is None or r[0] == 0
        return True

    def _run_locked(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.run_id = ensure_run_id(self.run_dir, cfg)
        p = cfg.parallelism
        if p.launcher == "spawn" and p.world_size > 1:
            return self._run_spawned(p.world_size)
        from effrun.launch import env_rank

        if p.launcher == "env" and (p.world_size > 1 or env_rank() is not None):
            # ranks from torchrun / Slurm tasks (a 1-rank group too: the NCCL check on one GPU)
            from effrun.launch import init_process_group, teardown

            r = env_rank()
            if r is None or r[1] != p.world_size:
                raise UserError(f"launcher=env needs RANK/WORLD_SIZE (or Slurm tasks) matching world_size="
                                f"{p.world_size}; found {r}", key="parallelism.launcher")
            self.rank, self.world_size = r[0], r[1]
            init_process_group(r[0], r[1], self._backend(), r[2])
            try:
                return self._run_rank()
            finally:
                teardown()
        n = self._technique_processes()
        if n > 1:  # a technique needs several ranks (e.g. expert parallelism): core starts them
            return self._run_spawned(n)
        return self._run_rank()

    def _run_spawned(self, n: int) -> Dict[str, Any]:
        from effrun.launch import RankFailure, spawn
        from effrun.rundir import mark_failed

        container = OmegaConf.to_container(self.cfg, resolve=True)
        try:
            spawn(_rank_worker, n, self._backend(), args=(container, str(self.run_dir)))
        except RankFailure as e:  # a rank died: the summary says which and why, whatever rank 0 wrote last
            mark_failed(self.run_dir, str(e), cause=True)
            raise
        return read_summary(self.run_dir) or {}

    # --- one rank ----------------------------------------------------------------------------
    def _context(self) -> Context:
        cfg = self.cfg
        ctx = Context(cfg=cfg, mode=self.mode, run_dir=self.run_dir, run_id=self.run_id, rank=self.rank,
                      world_size=self.world_size, device=self._device(),
                      recorder=Recorder(warmup_steps=cfg.run.warmup_steps))
        fspec = registry.family(cfg.model.family)
        ctx.family = fspec.load()(ctx)
        ctx.family.spec = fspec
        for key, node in technique_nodes(cfg).items():
            spec = registry.get(node.name)
            tech = spec.load()(node, ctx)
            tech.spec = spec
            ctx.techniques.append(tech)
        return ctx

    def _meta(self) -> Dict[str, Any]:
        from effrun.metrics.memory import allocator_settings

        c = self.cfg
        names = [n.name for n in technique_nodes(c).values()]
        # a technique that needs no task family (a plan, a non-torch target) runs without the model's
        model_free = self.mode == "plan" or any(not registry.get(n).families for n in names)
        return {"run_id": self.run_id, "mode": self.mode, "model": c.model.name,
                "family": "none" if model_free else c.model.family,
                "hardware": c.hardware.name, "technique": names[0] if names else "none",
                "techniques": names or ["none"], "config_hash": config_hash(c), "run_dir": str(self.run_dir),
                "world_size": self.world_size, "allocator": allocator_settings()}

    def _setup_process(self) -> None:
        import torch

        threads = self.cfg.run.threads
        if threads is None and self.world_size > 1 and self.cfg.parallelism.launcher != "env":
            threads = max(1, (os.cpu_count() or 1) // self.world_size)
        if threads:
            torch.set_num_threads(int(threads))
        torch.manual_seed(self.cfg.run.seed)

    def _run_rank(self) -> Dict[str, Any]:
        from effrun.loops import run_loop

        self._setup_process()
        self.meta = {**self._meta(), "status": "running", "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.ctx = ctx = self._context()
        if self.mode != "plan":
            ctx.family.validate()
        for t in ctx.techniques:
            t.validate()
        if ctx.is_main:
            self._write_summary()
        status, error = "failed", None
        try:
            run_loop(ctx)
            for t in ctx.techniques:
                ctx.recorder.update(t.metrics())
            status = "completed"
        except UserError as e:
            error = e.line()
            raise
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.meta.update(status=status, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            if error:
                self.meta["error"] = error
            if ctx.is_main:
                self._write_summary()
                ctx.recorder.finish()
            ctx.recorder.close()
        return self.summary

    @property
    def summary(self) -> Dict[str, Any]:
        s = dict(self.ctx.recorder.summary) if self.ctx else {}
        s.update(self.meta)
        return s

    def _write_summary(self) -> None:
        atomic_write_json(self.run_dir / SUMMARY, self.summary)


def _rank_worker(rank: int, world_size: int, container: dict, run_dir: str) -> None:
    cfg = OmegaConf.create(container)
    exp = Experiment(cfg, run_dir, rank=rank, world_size=world_size)
    exp.run_id = ensure_run_id(Path(run_dir), cfg)
    exp._run_rank()
