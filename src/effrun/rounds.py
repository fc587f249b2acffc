"""What the one infer loop runs: a session of timed rounds (families and target runners build them).

A round is one unit of inference work the loop times: a prefill or a decode step of a language
model (one or several tokens, whatever the decoding strategy accepts), a timed batch forward of an
image model, a sampler iteration of a video diffusion model, a kernel run in a browser. The loop
calls every technique's before_round / after_round around it and logs one row per round.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional


@dataclass
class Round:
    kind: str                      # "prefill", "decode", "warmup", "timed", "iteration", ...
    run: Callable[[], int]         # does the work, returns the units it produced
    info: Dict[str, Any] = field(default_factory=dict)  # e.g. tokens fed to the model
    row: Dict[str, Any] = field(default_factory=dict)   # filled by run(): extra row values


class InferSession:
    unit: str = "tokens"
    warmup_rounds: int = 0        # rounds excluded from throughput (speed protocols)
    first_is_latency: bool = False  # round 0 is a prefill: its time is the TTFT

    def rounds(self) -> Iterator[Round]:
        raise NotImplementedError

    def total_rounds(self) -> Optional[int]:
        return None

    def finish(self, recorder) -> None:
        pass
