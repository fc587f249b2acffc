"""Flow-matching Euler sampler with Wan2.1's shifted sigma schedule.

Wan2.1 samples sigma_i = shift * s_i / (1 + (shift - 1) * s_i) with s = linspace(1, 0, T + 1)[:T]
(`get_sampling_sigmas` in Wan's fm_solvers) and feeds the model timestep t_i = 1000 * sigma_i. The
model predicts the velocity v = noise - x0, and one Euler step is x <- x + (sigma_{i+1} - sigma_i) v
with sigma_T = 0. Euler is stateless, so DualParal's "scheduler copy per block" is just the block's
step index. (DualParal's code uses diffusers' UniPC multistep solver on top of the same sigmas; a
multistep solver would keep per-block history: here the state is the index only. This is the one
deliberate difference from the paper's runs; it changes image quality per step, not the systems
behaviour measured here.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FlowMatchEuler:
    steps: int
    shift: float = 3.0
    num_train_timesteps: int = 1000

    def __post_init__(self):
        s = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)[: self.steps]
        sig = self.shift * s / (1 + (self.shift - 1) * s)
        self.sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).float()  # [T + 1]
        self.timesteps = self.sigmas[:-1] * self.num_train_timesteps  # [T]

    def timestep(self, i: int) -> torch.Tensor:
        return self.timesteps[i]

    def step(self, velocity: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """x at step i -> x at step i + 1 (computed in fp32, returned in x's dtype)."""
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return (x.float() + dt * velocity.float()).to(x.dtype)
