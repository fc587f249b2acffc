"""nn-JIT.web's tuning spaces for Wasm SIMD matmul and its hardware-aware pruning rules.

A candidate kernel is a `Tile`: cache blocks (mb rows of A / C, nb columns of B / C, kb of the
reduction), register blocks (mr x nr accumulators; nr is split by the vector width 4 and
vectorised as f32x4).

- The *lite* space (the paper's): mb, nb, kb in {4, 8, ..., 256}; mr, nr in {4, 8, 16, 32};
  mr | mb and nr | nb. 22 (mb, mr) pairs x 22 (nb, nr) pairs x 7 kb = 3,388 points.
- Hardware-aware pruning (the paper's rules, re-derived):
    SIMD registers live in the micro-kernel: mr * (nr / 4) accumulators + mr broadcast A values
    + nr / 4 B vectors; must be <= the device's SIMD registers and >= 80 % of them.
    L1 footprint of one cache block: (mb * kb + kb * nb) * 4 bytes; must be <= L1 and >= 90 % of it.
  With 16 registers only (mr, nr) = (4, 8) uses 12.8..16 of them (14); with a 32 KiB L1,
  kb * (mb + nb) must lie in [7373, 8192] -> mb = nb = 8192 / (2 kb) for kb in 16..256:
  5 survivors. A 48 KiB L1 gives 8 (mb != nb pairs). See docs/techniques/nnjit.md.
- The *large* space (the baseline's): TVM define_split style, every divisor split of the (padded)
  problem dims: mr | mb | M, nr | nb | N with 4 | nr, kb | K; register tiles limited to 256
  v128 accumulators so that a module stays within what a Wasm engine compiles (V8's local limit).
- WebGPU rule (correctness path only): square thread tiles (mr == nr) whose registers per thread
  mr + nr + mr * nr stay within the per-thread limit.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

VEC = 4                       # f32x4: Wasm SIMD's only float width
F32 = 4                       # bytes
BLOCKS = (4, 8, 16, 32, 64, 128, 256)
REG_BLOCKS = (4, 8, 16, 32)
MAX_ACCUMULATORS = 256        # v128 accumulators in one register tile (large space cap)


@dataclass(frozen=True, order=True)
class Tile:
    mb: int
    nb: int
    kb: int
    mr: int
    nr: int

    def key(self) -> str:
        return f"mb{self.mb}_nb{self.nb}_kb{self.kb}_mr{self.mr}_nr{self.nr}"

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Dict[str, int]) -> "Tile":
        return Tile(**{k: int(d[k]) for k in ("mb", "nb", "kb", "mr", "nr")})


def simd_registers(t: Tile) -> int:
    """v128 values live in the micro-kernel: accumulators + A broadcasts + B vectors."""
    return t.mr * (t.nr // VEC) + t.mr + t.nr // VEC


def l1_bytes(t: Tile) -> int:
    """Bytes of one cache block's A (mb x kb) and B (kb x nb) panels."""
    return (t.mb * t.kb + t.kb * t.nb) * F32


def lite_space() -> List[Tile]:
    out = []
    for mb, mr, nb, nr, kb in itertools.product(BLOCKS, REG_BLOCKS, BLOCKS, REG_BLOCKS, BLOCKS):
        if mb % mr == 0 and nb % nr == 0:
            out.append(Tile(mb, nb, kb, mr, nr))
    return out


@dataclass(frozen=True)
class PruneRule:
    registers: int                     # device SIMD registers (128-bit)
    l1_bytes: int                      # device L1 data cache; <= 0: no L1 rule (the original's phones)
    reg_min: float = 0.8               # minimum register occupancy
    l1_min: float = 0.9                # minimum L1 occupancy

    def keeps(self, t: Tile) -> bool:
        if t.mr > t.mb or t.nr > t.nb:
            return False
        r, b = simd_registers(t), l1_bytes(t)
        if not self.reg_min * self.registers <= r <= self.registers:
            return False
        return self.l1_bytes <= 0 or self.l1_min * self.l1_bytes <= b <= self.l1_bytes


def prune(space: Sequence[Tile], rule: PruneRule) -> List[Tile]:
    return sorted(t for t in space if rule.keeps(t))


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def large_space(M: int, N: int, K: int) -> List[Tile]:
    """Every divisor split of the problem (TVM define_split style) with a vectorisable nr."""
    ys = [(mb, mr) for mb in _divisors(M) for mr in _divisors(mb)]
    xs = [(nb, nr) for nb in _divisors(N) if nb % VEC == 0 for nr in _divisors(nb) if nr % VEC == 0]
    ks = _divisors(K)
    return [Tile(mb, nb, kb, mr, nr) for (mb, mr), (nb, nr), kb in itertools.product(ys, xs, ks)
            if mr * (nr // VEC) <= MAX_ACCUMULATORS]


def large_space_size(M: int, N: int, K: int) -> int:
    return len(large_space(M, N, K))


def random_order(space: Sequence[Tile], seed: int) -> Iterator[Tile]:
    """Uniform sampling without replacement."""
    idx = list(range(len(space)))
    random.Random(seed).shuffle(idx)
    for i in idx:
        yield space[i]


def fits(t: Tile, M: int, N: int) -> bool:
    """The kernel's register tile must divide the (padded) output."""
    return M % t.mr == 0 and N % t.nr == 0


def pad_to(x: int, m: int) -> int:
    return -(-x // m) * m


# ---- WebGPU (correctness only): workgroup / thread tiling ----------------------------------------

@dataclass(frozen=True)
class GpuTile:
    wg_m: int          # threads per workgroup along M
    wg_n: int          # threads per workgroup along N
    t: int             # thread tile: t x t outputs per thread (mr == nr)
    kb: int            # k block staged through workgroup memory

    def key(self) -> str:
        return f"wg{self.wg_m}x{self.wg_n}_t{self.t}_kb{self.kb}"


def gpu_registers(g: GpuTile) -> int:
    return g.t + g.t + g.t * g.t


def gpu_space(max_regs_per_thread: int = 255, max_threads: int = 256,
              shared_bytes: int = 16384) -> List[GpuTile]:
    out = []
    for wm, wn, t, kb in itertools.product((4, 8, 16), (4, 8, 16), (1, 2, 4, 8), (4, 8, 16)):
        if wm * wn > max_threads or gpu_registers(GpuTile(wm, wn, t, kb)) > max_regs_per_thread:
            continue
        if (wm * t * kb + kb * wn * t) * F32 > shared_bytes:
            continue
        out.append(GpuTile(wm, wn, t, kb))
    return out


def survivors_table(registers_l1: Sequence[Tuple[int, int]],
                    reg_min: float = 0.8, l1_min: float = 0.9) -> List[Dict]:
    """Survivor counts for several (registers, L1 bytes) devices (for docs and the benchmark)."""
    space = lite_space()
    rows = []
    for regs, l1 in registers_l1:
        kept = prune(space, PruneRule(regs, l1, reg_min, l1_min))
        rows.append({"registers": regs, "l1_kib": l1 // 1024, "lite": len(space), "survivors": len(kept),
                     "register_tiles": sorted({(t.mr, t.nr) for t in kept})})
    return rows


def detect_l1_bytes() -> Optional[int]:
    """This machine's L1 data cache per core (sysfs), or None."""
    import glob
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(d + "/level") as f:
                level = f.read().strip()
            with open(d + "/type") as f:
                kind = f.read().strip()
            if level == "1" and kind in ("Data", "Unified"):
                with open(d + "/size") as f:
                    s = f.read().strip()
                mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1], 1)
                return int(s.rstrip("KM")) * mult
        except OSError:
            continue
    return None
