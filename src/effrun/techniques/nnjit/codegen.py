"""Emit WebAssembly SIMD matmul / batch-matmul kernels for one `Tile`, straight from the loop nest.

No C compiler: the loop nest below is written out as WebAssembly text and assembled by Debian's
`wabt` (`wat2wasm`). The kernel is specialised to one problem (batch, M, K, N: row-major
A[b, M, K], B[b, K, N], C[b, M, N], M a multiple of mr, N of nr) and exports
`mm(pa, pb, pc, ps)` (byte offsets into the imported memory `env.mem`; ps: scratch for packing).

Loop nest (GotoBLAS-style; the packed blocks are exactly what the L1 rule sizes: the A block
mb x kb and the B block kb x nb, contiguous, so no cache-set conflicts from long row strides):

    for b:                                          # batch
      for k0 in 0..K step kb:
        pack A[:, k0:k0+kb] -> Ap[M/mr][kb][mr]      # each A element packed once overall
        for n0 in 0..N step nb:
          pack B[k0:k0+kb, n0:n0+nb] -> Bp[nb/nr][kb][nr]      # each B element packed once
          for m0 in 0..M step mb:
            for n1 in n0..min(n0+nb, N) step nr:
              for m1 in m0..min(m0+mb, M) step mr:
                acc[mr][nr/4] = k0 == 0 ? 0 : C[m1.., n1..]          # v128 locals
                for k in k0..min(k0+kb, K):  (unrolled by 4, remainder loop)
                  bv[j] = v128.load Bp[n1 panel][k][4j]             # nr/4 vectors
                  av[i] = v128.load32_splat Ap[m1 panel][k][i]      # mr broadcasts
                  acc[i][j] += av[i] * bv[j]                        # f32x4.mul + f32x4.add
                C[m1.., n1..] = acc

Packing is inside the timed call for every matmul (B is a runtime input in its natural layout),
weights included, where a deployment could pack a constant weight once.
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


def memory_layout(p: Problem) -> Tuple[int, int, int, int, int]:
    """(pa, pb, pc, ps, total bytes): A, B, C, then packing scratch (A panel M x K + B block K x N,
    enough for any tile), 64-byte aligned."""
    def al(x):
        return -(-x // 64) * 64
    pa = 0
    pb = al(pa + p.batch * p.M * p.K * F32)
    pc = al(pb + p.batch * p.K * p.N * F32)
    ps = al(pc + p.batch * p.M * p.N * F32)
    end = al(ps + (p.M * p.K + p.K * p.N) * F32)
    return pa, pb, pc, ps, end


def emit_wat(p: Problem, t: Tile, mem_pages: Optional[int] = None) -> str:
    if p.M % t.mr or p.N % t.nr or t.nr % VEC:
        raise ValueError(f"tile {t} does not fit problem {p} (mr | M, nr | N, 4 | nr needed)")
    M, K, N = p.M, p.K, p.N
    mr, nr, nv = t.mr, t.nr, t.nr // VEC
    kb = min(t.kb, K)
    pages = mem_pages or _pages(memory_layout(p)[4])
    rowA, rowB, rowC = K * F32, N * F32, N * F32
    L: List[str] = []
    w = L.append

    def get(x):
        return f"(local.get ${x})"

    def setl(x, v):
        w(f"    (local.set ${x} {v})")

    def c(v):
        return f"(i32.const {v})"

    def add(a, b):
        return f"(i32.add {a} {b})"

    def mul(a, b):
        return f"(i32.mul {a} {b})"

    def mn(a, b):
        return f"(select {a} {b} (i32.lt_u {a} {b}))"

    w("(module")
    w(f'  (import "env" "mem" (memory {pages}))')
    w('  (func (export "mm") (param $pa i32) (param $pb i32) (param $pc i32) (param $ps i32)')
    for name in ("b", "n0", "k0", "m0", "n1", "m1", "nend", "kend", "mend", "kbc", "ap", "bp", "cp", "cnt",
                 "pa0", "pb0", "pc0", "apk", "bpk", "src", "dst", "i"):
        w(f"    (local ${name} i32)")
    for i in range(mr):
        for j in range(nv):
            w(f"    (local $c{i}_{j} v128)")
    for i in range(mr):
        w(f"    (local $a{i} v128)")
    for j in range(nv):
        w(f"    (local $b{j} v128)")

    def step(u: int) -> None:
        """One k step at unroll offset u: loads of the packed B and A, then the rank-1 update."""
        for j in range(nv):
            w(f"    (local.set $b{j} (v128.load offset={u * nr * F32 + 16 * j} align=4 (local.get $bp)))")
        for i in range(mr):
            w(f"    (local.set $a{i} (v128.load32_splat offset={u * mr * F32 + i * F32} align=4 (local.get $ap)))")
        for i in range(mr):
            for j in range(nv):
                w(f"    (local.set $c{i}_{j} (f32x4.add (local.get $c{i}_{j}) "
                  f"(f32x4.mul (local.get $a{i}) (local.get $b{j}))))")

    setl("apk", get("ps"))                                   # packed A panel: M x kb
    setl("bpk", add(get("ps"), c(M * kb * F32)))             # packed B block: kb x nb
    setl("pa0", get("pa"))
    setl("pb0", get("pb"))
    setl("pc0", get("pc"))
    setl("b", c(0))
    w("    (block $bdone (loop $bloop")
    setl("k0", c(0))
    w("    (block $k0done (loop $k0loop")
    setl("kend", mn(add(get("k0"), c(kb)), c(K)))
    setl("kbc", f"(i32.sub {get('kend')} {get('k0')})")
    # -- pack A[:, k0:kend] into [M/mr][kbc][mr]
    setl("m1", c(0))
    setl("dst", get("apk"))
    w("    (loop $pam")
    setl("src", add(get("pa0"), mul(add(mul(get("m1"), c(K)), get("k0")), c(F32))))
    setl("i", get("kbc"))
    w("    (loop $pak")
    for i in range(mr):
        w(f"    (f32.store offset={i * F32} align=4 (local.get $dst) "
          f"(f32.load offset={i * rowA} align=4 (local.get $src)))")
    setl("src", add(get("src"), c(F32)))
    setl("dst", add(get("dst"), c(mr * F32)))
    setl("i", f"(i32.sub {get('i')} {c(1)})")
    w("    (br_if $pak (local.get $i)))")
    setl("m1", add(get("m1"), c(mr)))
    w(f"    (br_if $pam (i32.lt_u {get('m1')} {c(M)})))")
    setl("n0", c(0))
    w("    (block $n0done (loop $n0loop")
    setl("nend", mn(add(get("n0"), c(t.nb)), c(N)))
    # -- pack B[k0:kend, n0:nend] into [nb/nr][kbc][nr]
    setl("n1", get("n0"))
    setl("dst", get("bpk"))
    w("    (loop $pbn")
    setl("src", add(get("pb0"), mul(add(mul(get("k0"), c(N)), get("n1")), c(F32))))
    setl("i", get("kbc"))
    w("    (loop $pbk")
    for j in range(nv):
        w(f"    (v128.store offset={16 * j} align=4 (local.get $dst) "
          f"(v128.load offset={16 * j} align=4 (local.get $src)))")
    setl("src", add(get("src"), c(rowB)))
    setl("dst", add(get("dst"), c(nr * F32)))
    setl("i", f"(i32.sub {get('i')} {c(1)})")
    w("    (br_if $pbk (local.get $i)))")
    setl("n1", add(get("n1"), c(nr)))
    w(f"    (br_if $pbn (i32.lt_u {get('n1')} {get('nend')})))")
    setl("m0", c(0))
    w("    (block $m0done (loop $m0loop")
    setl("mend", mn(add(get("m0"), c(t.mb)), c(M)))
    setl("n1", get("n0"))
    w("    (block $n1done (loop $n1loop")
    setl("m1", get("m0"))
    w("    (block $m1done (loop $m1loop")
    setl("cp", add(get("pc0"), mul(add(mul(get("m1"), c(N)), get("n1")), c(F32))))
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
    # packed panels: A panel of m1 (stride kbc*mr floats), B panel of n1 within the block
    setl("ap", add(get("apk"), mul(mul(get("m1"), get("kbc")), c(F32))))
    setl("bp", add(get("bpk"), mul(mul(f"(i32.sub {get('n1')} {get('n0')})", get("kbc")), c(F32))))
    setl("cnt", f"(i32.shr_u {get('kbc')} {c(2)})")
    w("    (if (local.get $cnt) (then")
    w("    (loop $kloop")
    for u in range(UNROLL):
        step(u)
    setl("ap", add(get("ap"), c(UNROLL * mr * F32)))
    setl("bp", add(get("bp"), c(UNROLL * nr * F32)))
    setl("cnt", f"(i32.sub {get('cnt')} {c(1)})")
    w("    (br_if $kloop (local.get $cnt))")
    w("    )))")
    setl("cnt", f"(i32.and {get('kbc')} {c(UNROLL - 1)})")
    w("    (if (local.get $cnt) (then")
    w("    (loop $krem")
    step(0)
    setl("ap", add(get("ap"), c(mr * F32)))
    setl("bp", add(get("bp"), c(nr * F32)))
    setl("cnt", f"(i32.sub {get('cnt')} {c(1)})")
    w("    (br_if $krem (local.get $cnt))")
    w("    )))")
    for i in range(mr):
        for j in range(nv):
            w(f"    (v128.store offset={i * rowC + 16 * j} align=4 (local.get $cp) (local.get $c{i}_{j}))")
    setl("m1", add(get("m1"), c(mr)))
    w("    (br_if $m1loop (i32.lt_u (local.get $m1) (local.get $mend)))")
    w("    ))")
    setl("n1", add(get("n1"), c(nr)))
    w("    (br_if $n1loop (i32.lt_u (local.get $n1) (local.get $nend)))")
    w("    ))")
    setl("m0", get("mend"))
    w(f"    (br_if $m0loop (i32.lt_u (local.get $m0) {c(M)}))")
    w("    ))")
    setl("n0", get("nend"))
    w(f"    (br_if $n0loop (i32.lt_u (local.get $n0) {c(N)}))")
    w("    ))")
    setl("k0", get("kend"))
    w(f"    (br_if $k0loop (i32.lt_u (local.get $k0) {c(K)}))")
    w("    ))")
    setl("pa0", add(get("pa0"), c(M * K * F32)))
    setl("pb0", add(get("pb0"), c(K * N * F32)))
    setl("pc0", add(get("pc0"), c(M * N * F32)))
    setl("b", add(get("b"), c(1)))
    w(f"    (br_if $bloop (i32.lt_u (local.get $b) {c(p.batch)}))")
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
