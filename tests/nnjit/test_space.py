"""The lite space, the pruning rules' survivor counts, the large space (no browser needed)."""
from __future__ import annotations

import itertools
import re

import pytest

from effrun.techniques.nnjit.codegen import Problem, emit_wat
from effrun.techniques.nnjit.space import (BLOCKS, MAX_ACCUMULATORS, REG_BLOCKS, GpuTile, PruneRule, Tile,
                                           gpu_registers, gpu_space, l1_bytes, large_space, lite_space,
                                           prune, simd_registers)


def test_lite_space_size():
    # 22 (mb, mr) pairs with mr | mb, same for (nb, nr), times 7 kb values
    pairs = sum(1 for b in BLOCKS for r in REG_BLOCKS if b % r == 0)
    assert pairs == 22
    assert len(lite_space()) == 22 * 22 * 7 == 3388


# documented in docs/techniques/nnjit.md: derived by hand from the two rules
DOCUMENTED = {
    (16, 32): [(16, 16, 256), (32, 32, 128), (64, 64, 64), (128, 128, 32), (256, 256, 16)],     # (mb, nb, kb), mr=4 nr=8
    (16, 48): [(16, 32, 256), (32, 16, 256), (32, 64, 128), (64, 32, 128), (64, 128, 64), (128, 64, 64),
               (128, 256, 32), (256, 128, 32)],
}


@pytest.mark.parametrize("regs,l1_kb", sorted(DOCUMENTED))
def test_documented_survivors(regs, l1_kb):
    kept = prune(lite_space(), PruneRule(regs, l1_kb * 1024))
    assert [(t.mb, t.nb, t.kb) for t in kept] == sorted(DOCUMENTED[(regs, l1_kb)])
    assert {(t.mr, t.nr) for t in kept} == {(4, 8)}


def test_other_devices_survivor_counts():
    # 32 registers (e.g. AArch64 NEON): (8, 8) uses 16 + 8 + 2 = 26 of 32 (81 %), the only tile in [25.6, 32]
    kept = prune(lite_space(), PruneRule(32, 32 * 1024))
    assert {(t.mr, t.nr) for t in kept} == {(8, 8)} and len(kept) == 5
    # looser occupancies keep more (the knobs are real): 16 registers, any occupancy
    assert len(prune(lite_space(), PruneRule(16, 32 * 1024, 0.0, 0.0))) > 100


def test_the_original_codes_device_table():
    """nnjit-web's own device settings (CPU_SIMD128_REGISTERS, CPU_MAX_L1_CACHE_SIZE): x86 laptops 16 / 32 KiB,
    phones 32 / no L1 rule (-1), the default 32 / 64 KiB; V8 on x86-64 keeps xmm15 as scratch (15 allocatable)."""
    count = lambda regs, l1: len(prune(lite_space(), PruneRule(regs, l1)))  # noqa: E731
    assert count(16, 32 * 1024) == 5 and count(15, 32 * 1024) == 5      # 14 registers lie in both ranges
    assert count(32, 64 * 1024) == 4
    # no L1 rule: (8, 8) with 8 | mb and 8 | nb (6 x 6 block sizes) x 7 kb
    phones = prune(lite_space(), PruneRule(32, 0))
    assert len(phones) == 6 * 6 * 7 == 252 and {(t.mr, t.nr) for t in phones} == {(8, 8)}
    assert prune(lite_space(), PruneRule(32, -1)) == phones


def test_rules_match_brute_force_definition():
    """Re-state the rules independently (counting v128 values, bytes of panels) over the raw product."""
    rule = PruneRule(16, 32 * 1024)
    brute = []
    for mb, kb, nb, mr, nr in itertools.product(BLOCKS, BLOCKS, BLOCKS, REG_BLOCKS, REG_BLOCKS):
        if mb % mr or nb % nr or mr > mb or nr > nb:
            continue
        vregs = mr * nr / 4 + mr + nr / 4
        l1 = 4 * kb * (mb + nb)
        if 12.8 <= vregs <= 16 and 0.9 * 32768 <= l1 <= 32768:
            brute.append(Tile(mb, nb, kb, mr, nr))
    assert sorted(brute) == prune(lite_space(), rule)


@pytest.mark.parametrize("mr,nr", [(4, 8), (8, 8), (2, 16), (3, 12)])
def test_register_formula_counts_the_kernels_v128_values(mr, nr):
    """The footprint the rule prices is exactly the v128 locals the generated kernel declares."""
    wat = emit_wat(Problem(1, 24, 8, 48), Tile(24, 48, 8, mr, nr))
    assert len(re.findall(r"\(local \$\w+ v128\)", wat)) == simd_registers(Tile(24, 48, 8, mr, nr))


def test_l1_formula():
    assert l1_bytes(Tile(64, 64, 64, 4, 8)) == (64 * 64 + 64 * 64) * 4 == 32768


def test_large_space_is_every_divisor_split():
    M, N, K = 12, 16, 6
    space = large_space(M, N, K)
    brute = set()
    for mb in range(1, M + 1):
        for mr in range(1, mb + 1):
            for nb in range(4, N + 1, 4):
                for nr in range(4, nb + 1, 4):
                    for kb in range(1, K + 1):
                        if M % mb or mb % mr or N % nb or nb % nr or K % kb:
                            continue
                        if mr * nr // 4 <= MAX_ACCUMULATORS:
                            brute.add(Tile(mb, nb, kb, mr, nr))
    assert set(space) == brute and len(space) == len(brute)


def test_large_space_size_for_bert_projection():
    # documented: 384 x 768 x 768 -> 134,982 points (vs 5 survivors of the pruned lite space)
    assert len(large_space(384, 768, 768)) == 134982


def test_gpu_rule():
    space = gpu_space(max_regs_per_thread=24, max_threads=64, shared_bytes=4096)
    assert space and all(gpu_registers(g) <= 24 and g.wg_m * g.wg_n <= 64 for g in space)
    assert GpuTile(4, 4, 4, 4) in space and GpuTile(4, 4, 8, 4) not in space    # 8 + 8 + 64 > 24
