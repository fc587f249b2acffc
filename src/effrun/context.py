"""The small context a technique or a family receives (never the whole Experiment).

Fields: cfg (the resolved config: read it, do not mutate it), mode, rank, world_size, is_main,
device, run_dir, run_id, recorder, family (the task family, None in plan mode without one).
Methods: build_model() (the family's model, untransformed), start_recorder(...) (attach the sinks
once a loop knows its length), and collectives that are no-ops in one process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from effrun.metrics.recorder import Recorder


@dataclass
class Context:
    cfg: Any
    mode: str
    run_dir: Path
    run_id: str = ""
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    recorder: Recorder = field(default_factory=Recorder)
    family: Any = None
    techniques: List[Any] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def hardware(self):
        return self.cfg.hardware

    def build_model(self):
        from effrun.errors import UserError

        if self.family is None:
            raise UserError("this run has no task family to build a model from", key="model")
        return self.family.build_model()

    def peak_tflops(self) -> Optional[float]:
        return (self.cfg.hardware.peak_tflops or {}).get(self.cfg.run.dtype)

    # --- sinks ---------------------------------------------------------------------------------
    def start_recorder(self, total_steps: Optional[int], title: str, resume_from_step: int = 0) -> Recorder:
        """Attach the sinks (rank 0 only) to the run's one recorder; summary values set so far stay."""
        if self.is_main and not self.recorder.sinks:
            from omegaconf import OmegaConf

            from effrun.sinks import build_sinks

            self.recorder.sinks = build_sinks(self.cfg.logger, self.run_dir, self.run_id,
                                              OmegaConf.to_container(self.cfg, resolve=True), total_steps, title,
                                              resume_from_step=resume_from_step)
        return self.recorder

    # --- collectives (no-ops in one process) ---------------------------------------------------
    def _dist(self):
        if self.world_size <= 1:
            return None
        import torch.distributed as dist

        return dist if dist.is_available() and dist.is_initialized() else None

    def barrier(self) -> None:
        d = self._dist()
        if d is not None:
            d.barrier()

    def all_gather_object(self, obj) -> list:
        d = self._dist()
        if d is None:
            return [obj]
        out = [None] * self.world_size
        d.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        d = self._dist()
        if d is None:
            return obj
        box = [obj]
        d.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce(self, values: List[float], op: str = "sum") -> List[float]:
        """Reduce a few control scalars over ranks. The tensor lives on the collective's device
        (CUDA under NCCL, which rejects CPU tensors), float64 so sums of losses stay exact."""
        d = self._dist()
        if d is None:
            return list(values)
        import torch

        dev = self.device if d.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        d.all_reduce(t, op={"sum": d.ReduceOp.SUM, "max": d.ReduceOp.MAX, "min": d.ReduceOp.MIN}[op])
        return t.cpu().tolist()
