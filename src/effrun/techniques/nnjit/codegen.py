"""Emit WebAssembly SIMD matmul / batch-matmul kernels for one `Tile`, straight from the loop nest.

No C compiler: the loop nest below is written out as WebAssembly text and assembled by Debian's
`wabt` (`wat2wasm`). The kernel is specialised to one problem (batch, M, K, N: row-major
A[b, M, K], B[b, K, N], C[b, M, N], M a multiple of mr, N of nr) and exports
`mm(pa, pb, pc)` (byte offsets into the imported memory `env.mem`).

Loop nest (GotoBLAS-style cache blocking; nb / kb / mb are the cache blocks the L1 rule models):

    for b:                                         # batch
      for n0 in 0..N step nb:                      # B panel columns
        for k0 in 0..K step kb:                    # reduction block (A mb x kb, B kb x nb in L1)
          for m0 in 0..M step mb:
            for n1 in n0..min(n0+nb, N) step nr:
              for m1 in m0..min(m0+mb, M) step mr:
                acc[mr][nr/4] = k0 == 0 ? 0 : C[m1.., n1..]          # v128 locals
                for k in k0..min(k0+kb, K):  (unrolled by 4, remainder loop)
                  bv[j] = v128.load B[k, n1 + 4j]                   # nr/4 vectors
                  av[i] = v128.load32_splat A[m1 + i, k]            # mr broadcasts
                  acc[i][j] += av[i] * bv[j]                        # f32x4.mul + f32x4.add
                C[m1.., n1..] = acc
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from effrun.errors import UserError

from .space import F32, VEC, Tile

UNROLL = 4
SETUP_HINT = "install it with `bash scripts/setup/browser.sh` (apt-get install -y chromium wabt)"


@dataclass(frozen=True)
class Problem:
    """One (batch) matmul: C[b] = A[b] @ B[b]; dims as the kernel sees them (already padded)."""
    batch: int
    M: int
    K: int
    N: int

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.M * self.K * self.N

    def key(self) -> str:
        return f"b{self.batch}_m{self.M}_k{self.K}_n{self.N}"


def check_dims(dims, key: str = "technique.shapes") -> None:
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise UserError(f"shape {tuple(dims)} has a dimension {d!r}; every dimension must be an "
                            f"integer >= 1", key=key)


def _pages(nbytes: int) -> int:
    return max(1, -(-nbytes // 65536))


def memory_layout(p: Problem) -> Tuple[int, int, int, int]:
    """(pa, pb, pc, total bytes): A, B, C placed one after another, 64-byte aligned."""
    def al(x):
        return -(-x // 64) * 64
    pa = 0
    pb = al(pa + p.batch * p.M * p.K * F32)
    pc = al(pb + p.batch * p.K * p.N * F32)
    end = al(pc + p.batch * p.M * p.N * F32)
    return pa, pb, pc, end


def emit_wat(p: Problem, t: Tile, mem_pages: Optional[int] = None) -> str:
    if p.M % t.mr or p.N % t.nr or t.nr % VEC:
        raise ValueError(f"tile {t} does not fit problem {p} (mr | M, nr | N, 4 | nr needed)")
    M, K, N = p.M, p.K, p.N
    mr, nv = t.mr, t.nr // VEC
    pages = mem_pages or _pages(memory_layout(p)[3])
    rowA, rowB, rowC = K * F32, N * F32, N * F32
    L: List[str] = []
    w = L.append
    w("(module")
    w(f'  (import "env" "mem" (memory {pages}))')
    w('  (func (export "mm") (param $pa i32) (param $pb i32) (param $pc i32)')
    for name in ("b", "n0", "k0", "m0", "n1", "m1", "nend", "kend", "mend", "ap", "bp", "cp", "cnt",
                 "pa0", "pb0", "pc0"):
        w(f"    (local ${name} i32)")
    for i in range(mr):
        for j in range(nv):
            w(f"    (local $c{i}_{j} v128)")
    for i in range(mr):
        w(f"    (local $a{i} v128)")
    for j in range(nv):
        w(f"    (local $b{j} v128)")

    def step(u: int) -> None:
        """One k step at unroll offset u: loads of B and A, then the rank-1 update."""
        for j in range(nv):
            w(f"    (local.set $b{j} (v128.load offset={u * rowB + 16 * j} align=4 (local.get $bp)))")
        for i in range(mr):
            w(f"    (local.set $a{i} (v128.load32_splat offset={i * rowA + u * F32} align=4 (local.get $ap)))")
        for i in range(mr):
            for j in range(nv):
                w(f"    (local.set $c{i}_{j} (f32x4.add (local.get $c{i}_{j}) "
                  f"(f32x4.mul (local.get $a{i}) (local.get $b{j}))))")

    # batch loop
    w("    (local.set $pa0 (local.get $pa)) (local.set $pb0 (local.get $pb)) (local.set $pc0 (local.get $pc))")
    w("    (local.set $b (i32.const 0))")
    w("    (block $bdone (loop $bloop")
    w("    (local.set $n0 (i32.const 0))")
    w("    (block $n0done (loop $n0loop")
    w(f"    (local.set $nend (select (i32.add (local.get $n0) (i32.const {t.nb})) (i32.const {N}) "
      f"(i32.lt_u (i32.add (local.get $n0) (i32.const {t.nb})) (i32.const {N}))))")
    w("    (local.set $k0 (i32.const 0))")
    w("    (block $k0done (loop $k0loop")
    w(f"    (local.set $kend (select (i32.add (local.get $k0) (i32.const {t.kb})) (i32.const {K}) "
      f"(i32.lt_u (i32.add (local.get $k0) (i32.const {t.kb})) (i32.const {K}))))")
    w("    (local.set $m0 (i32.const 0))")
    w("    (block $m0done (loop $m0loop")
    w(f"    (local.set $mend (select (i32.add (local.get $m0) (i32.const {t.mb})) (i32.const {M}) "
      f"(i32.lt_u (i32.add (local.get $m0) (i32.const {t.mb})) (i32.const {M}))))")
    w("    (local.set $n1 (local.get $n0))")
    w("    (block $n1done (loop $n1loop")
    w("    (local.set $m1 (local.get $m0))")
    w("    (block $m1done (loop $m1loop")
    # C tile pointer
    w(f"    (local.set $cp (i32.add (local.get $pc0) (i32.mul (i32.add (i32.mul (local.get $m1) "
      f"(i32.const {N})) (local.get $n1)) (i32.const {F32}))))")
    # init accumulators: zero on the first k block, else load the partial sums
    w("    (if (i32.eqz (local.get $k0)) (then")
    for i in range(mr):
        for j in range(nv):
            w(f"    (local.set $c{i}_{j} (v128.const i32x4 0 0 0 0))")
    w("    ) (else")
    for i in range(mr):
        for j in range(nv):
            w(f"    (local.set $c{i}_{j} (v128.load offset={i * rowC + 16 * j} align=4 (local.get $cp)))")
    w("    ))")
    # A / B pointers at (m1, k0) and (k0, n1)
    w(f"    (local.set $ap (i32.add (local.get $pa0) (i32.mul (i32.add (i32.mul (local.get $m1) "
      f"(i32.const {K})) (local.get $k0)) (i32.const {F32}))))")
    w(f"    (local.set $bp (i32.add (local.get $pb0) (i32.mul (i32.add (i32.mul (local.get $k0) "
      f"(i32.const {N})) (local.get $n1)) (i32.const {F32}))))")
    # unrolled main k loop
    w(f"    (local.set $cnt (i32.shr_u (i32.sub (local.get $kend) (local.get $k0)) (i32.const 2)))")
    w("    (if (local.get $cnt) (then")
    w("    (loop $kloop")
    for u in range(UNROLL):
        step(u)
    w(f"    (local.set $ap (i32.add (local.get $ap) (i32.const {UNROLL * F32})))")
    w(f"    (local.set $bp (i32.add (local.get $bp) (i32.const {UNROLL * rowB})))")
    w("    (local.set $cnt (i32.sub (local.get $cnt) (i32.const 1)))")
    w("    (br_if $kloop (local.get $cnt))")
    w("    )))")
    # remainder k loop
    w(f"    (local.set $cnt (i32.and (i32.sub (local.get $kend) (local.get $k0)) (i32.const {UNROLL - 1})))")
    w("    (if (local.get $cnt) (then")
    w("    (loop $krem")
    step(0)
    w(f"    (local.set $ap (i32.add (local.get $ap) (i32.const {F32})))")
    w(f"    (local.set $bp (i32.add (local.get $bp) (i32.const {rowB})))")
    w("    (local.set $cnt (i32.sub (local.get $cnt) (i32.const 1)))")
    w("    (br_if $krem (local.get $cnt))")
    w("    )))")
    # store the tile
    for i in range(mr):
        for j in range(nv):
            w(f"    (v128.store offset={i * rowC + 16 * j} align=4 (local.get $cp) (local.get $c{i}_{j}))")
    # loop tails
    w(f"    (local.set $m1 (i32.add (local.get $m1) (i32.const {mr})))")
    w("    (br_if $m1loop (i32.lt_u (local.get $m1) (local.get $mend)))")
    w("    ))")
    w(f"    (local.set $n1 (i32.add (local.get $n1) (i32.const {t.nr})))")
    w("    (br_if $n1loop (i32.lt_u (local.get $n1) (local.get $nend)))")
    w("    ))")
    w("    (local.set $m0 (local.get $mend))")
    w(f"    (br_if $m0loop (i32.lt_u (local.get $m0) (i32.const {M})))")
    w("    ))")
    w("    (local.set $k0 (local.get $kend))")
    w(f"    (br_if $k0loop (i32.lt_u (local.get $k0) (i32.const {K})))")
    w("    ))")
    w("    (local.set $n0 (local.get $nend))")
    w(f"    (br_if $n0loop (i32.lt_u (local.get $n0) (i32.const {N})))")
    w("    ))")
    w(f"    (local.set $pa0 (i32.add (local.get $pa0) (i32.const {M * K * F32})))")
    w(f"    (local.set $pb0 (i32.add (local.get $pb0) (i32.const {K * N * F32})))")
    w(f"    (local.set $pc0 (i32.add (local.get $pc0) (i32.const {M * N * F32})))")
    w("    (local.set $b (i32.add (local.get $b) (i32.const 1)))")
    w(f"    (br_if $bloop (i32.lt_u (local.get $b) (i32.const {p.batch})))")
    w("    ))")
    w("  )")
    w(")")
    return "\n".join(L) + "\n"


def find_wat2wasm() -> str:
    exe = shutil.which("wat2wasm")
    if not exe:
        raise UserError(f"wat2wasm (Debian package wabt) is not installed; {SETUP_HINT}",
                        key="hardware")
    return exe


class Assembler:
    """wat2wasm with an on-disk cache keyed by the text's hash; records its own time."""

    def __init__(self, cache_dir: Optional[str] = None):
        self.exe = find_wat2wasm()
        self.cache_dir = cache_dir
        self.seconds = 0.0
        self.count = 0

    def assemble(self, wat: str) -> bytes:
        t0 = time.perf_counter()
        h = hashlib.sha256(wat.encode()).hexdigest()[:24]
        path = os.path.join(self.cache_dir, h + ".wasm") if self.cache_dir else None
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
        else:
            with tempfile.TemporaryDirectory(prefix="nnjit-wat-") as d:
                src, out = os.path.join(d, "k.wat"), os.path.join(d, "k.wasm")
                with open(src, "w") as f:
                    f.write(wat)
                r = subprocess.run([self.exe, src, "-o", out], capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"wat2wasm failed: {r.stderr.strip()[:400]}")
                with open(out, "rb") as f:
                    data = f.read()
            if path:
                os.makedirs(self.cache_dir, exist_ok=True)
                tmp = path + f".{os.getpid()}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
        self.seconds += time.perf_counter() - t0
        self.count += 1
        return data

    def kernel(self, p: Problem, t: Tile, mem_pages: Optional[int] = None) -> bytes:
        return self.assemble(emit_wat(p, t, mem_pages))
