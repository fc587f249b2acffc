// effrun InTAR C-simulation runtime: the datapaths of a compute core (matmul, conv, transposed
// conv) and of the special-function units, parameterised by a static instruction (ConfigInst:
// stage, loop bounds) and by the operand routing a stage selects (row source: an array or the
// FIFOs of the producer's parts; sink: arrays and/or FIFOs). Generated code (codegen.py) wires
// one case per (unit, stage) and runs the instruction lists stage by stage.
//
// Integer semantics are those of refs.py: int64 accumulation, arithmetic right shift, saturation
// to the activation type, floor division, shared lookup tables. Storage uses the Xilinx ap_int
// types, so a missing saturation shows up as a wrapped value.
#ifndef EFFRUN_INTAR_RT_H
#define EFFRUN_INTAR_RT_H

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include "ap_int.h"
#include "hls_stream.h"

#ifndef INTAR_MAXROW
#define INTAR_MAXROW 4096
#endif
#define INTAR_MAXPARTS 64
#define INTAR_MAXFIFOS 256
#define INTAR_KMAX 16

namespace intar {

struct ConfigInst {
    int stage;    // which datapath configuration (operand sources / sinks) the unit selects
    int i_bound;  // output rows
    int j_lo;     // first output column of this unit's part
    int j_hi;     // one past the last output column
    int k_bound;  // reduction length (matmul: per group; conv: k*k*Cin) or group length (softmax)
};

[[noreturn]] inline void fail(const char* what, const char* name) {
    std::fprintf(stderr, "csim error: %s (%s)\n", what, name);
    std::exit(3);
}

template <class T> inline long long I(const T& v) { return (long long)v.to_int64(); }

template <class T> inline T sat(long long v) {
    const long long hi = (1LL << (T::width - 1)) - 1, lo = -(1LL << (T::width - 1));
    return T(v > hi ? hi : (v < lo ? lo : v));
}

template <class T> inline T tmin() { return T(-(1LL << (T::width - 1))); }

inline long long floordiv(long long a, long long b) {  // b > 0
    long long q = a / b;
    if ((a % b) != 0 && a < 0) --q;
    return q;
}

inline long long isqrt(long long v) {  // floor(sqrt(v)), v >= 0, exact
    long long r = 0, bit = 1LL << 62;
    while (bit > v) bit >>= 2;
    while (bit != 0) {
        if (v >= r + bit) { v -= r + bit; r = (r >> 1) + bit; } else { r >>= 1; }
        bit >>= 2;
    }
    return r;
}

inline int lut_index(long long x, int shift) {
    long long i = x >> shift;
    i = i < -128 ? -128 : (i > 127 ? 127 : i);
    return (int)i + 128;
}

// A row source: a whole tensor in an array (scratchpad, HBM), or the FIFOs of the producer's
// parts (each part owns the columns [lo, hi) of every row). FIFO rows must be read in order.
template <class T> struct Src {
    const char* name = "?";
    const T* buf = nullptr;
    int ld = 0;
    int np = 0;
    hls::stream<T>* f[INTAR_MAXPARTS];
    int lo[INTAR_MAXPARTS];
    int hi[INTAR_MAXPARTS];
    int next = 0;

    static Src array(const T* b, int ld, const char* name) { Src s; s.buf = b; s.ld = ld; s.name = name; return s; }
    void part(hls::stream<T>* fifo, int l, int h) { f[np] = fifo; lo[np] = l; hi[np] = h; ++np; }

    void row(int r, T* out) {
        if (buf) {
            std::memcpy((void*)out, (const void*)(buf + (long)r * ld), sizeof(T) * ld);
            return;
        }
        if (r != next) fail("FIFO rows read out of order", name);
        ++next;
        for (int p = 0; p < np; ++p)
            for (int c = lo[p]; c < hi[p]; ++c) {
                if (f[p]->empty()) fail("read from an empty FIFO", name);
                out[c] = f[p]->read();
            }
    }
    T at(long r, int c) const { return buf[r * ld + c]; }
};

// A sink: up to two arrays (scratchpad or spill, graph output) and FIFOs (one per consumer part).
template <class T> struct Dst {
    T* buf = nullptr;
    T* buf2 = nullptr;
    int ld = 0;
    int nf = 0;
    hls::stream<T>* f[INTAR_MAXFIFOS];
    void fifo(hls::stream<T>* s) { f[nf++] = s; }
    void put(int r, int c, const T& v) {
        if (buf) buf[(long)r * ld + c] = v;
        if (buf2) buf2[(long)r * ld + c] = v;
        for (int i = 0; i < nf; ++i) f[i]->write(v);
    }
};

// ---------------------------------------------------------------------------------------------
// compute core datapaths
// ---------------------------------------------------------------------------------------------
struct MatmulCfg {
    int G, Kg, Ng, ldb;
    bool trans, causal, relu;
    int shift;
};

template <class A, class B>
inline A matmul_elem(const A* arow, const B* b, const MatmulCfg& c, int i, int j, int kb) {
    const int g = j / c.Ng, n = j % c.Ng;
    if (c.causal && n > i) return tmin<A>();
    long long acc = 0;
    for (int k = 0; k < kb; ++k) {
        long long bv = c.trans ? I(b[(long)n * c.ldb + g * c.Kg + k]) : I(b[(long)k * c.ldb + g * c.Ng + n]);
        acc += I(arow[g * c.Kg + k]) * bv;
    }
    A y = sat<A>(acc >> c.shift);
    if (c.relu && y < 0) y = 0;
    return y;
}

// Row-stream mode: B (weights or a resident activation) on chip, A rows streamed in, output rows
// in order (may feed FIFOs).
template <class A, class B>
void matmul_rows(const ConfigInst& in, Src<A>& a, const B* b, const MatmulCfg& c, Dst<A>& d) {
    static A row[INTAR_MAXROW];
    for (int i = 0; i < in.i_bound; ++i) {
        a.row(i, row);
        for (int j = in.j_lo; j < in.j_hi; ++j) d.put(i, j, matmul_elem(row, b, c, i, j, in.k_bound));
    }
}

// Weight-stream mode: A resident on chip, W streamed once, 16 output columns (one lane group) at a
// time over all rows: output in column-block order, so only arrays may take it.
template <class A, class B>
void matmul_cols(const ConfigInst& in, Src<A>& a, const B* b, const MatmulCfg& c, Dst<A>& d) {
    if (!a.buf) fail("weight-stream matmul needs A resident", a.name);
    if (d.nf) fail("weight-stream matmul cannot feed a FIFO", a.name);
    for (int j0 = in.j_lo; j0 < in.j_hi; j0 += 16)
        for (int i = 0; i < in.i_bound; ++i)
            for (int j = j0; j < in.j_hi && j < j0 + 16; ++j)
                d.put(i, j, matmul_elem(a.buf + (long)i * a.ld, b, c, i, j, in.k_bound));
}

struct ConvCfg {
    int H, W, Cin, k, Cout, pad;  // pad = k/2 (same) or 0 (valid)
    int shift;
    bool relu;
};

// k-row line buffer; input rows are pulled in order as the output rows need them.
template <class A, class W>
void conv2d(const ConfigInst& in, Src<A>& x, const W* w, const ConvCfg& c, Dst<A>& d) {
    static A lb[INTAR_KMAX][INTAR_MAXROW];
    if (c.k > INTAR_KMAX) fail("kernel too large", x.name);
    int have = 0;
    for (int r = 0; r < in.i_bound; ++r) {
        int need = r - c.pad + c.k;
        if (need > c.H) need = c.H;
        while (have < need) { x.row(have, lb[have % c.k]); ++have; }
        for (int j = in.j_lo; j < in.j_hi; ++j) {
            const int col = j / c.Cout, co = j % c.Cout;
            long long acc = 0;
            for (int ki = 0; ki < c.k; ++ki) {
                const int ir = r - c.pad + ki;
                if (ir < 0 || ir >= c.H) continue;
                for (int kj = 0; kj < c.k; ++kj) {
                    const int ic = col - c.pad + kj;
                    if (ic < 0 || ic >= c.W) continue;
                    for (int ci = 0; ci < c.Cin; ++ci)
                        acc += I(lb[ir % c.k][ic * c.Cin + ci]) * I(w[((ki * c.k + kj) * c.Cin + ci) * c.Cout + co]);
                }
            }
            A y = sat<A>(acc >> c.shift);
            if (c.relu && y < 0) y = 0;
            d.put(r, j, y);
        }
    }
}

// Transposed convolution (stride 1), gathered: out[r][c] = sum x[r-ki][c-kj] . w[ki][kj].
template <class A, class W>
void conv_transpose2d(const ConfigInst& in, Src<A>& x, const W* w, const ConvCfg& c, Dst<A>& d) {
    static A lb[INTAR_KMAX][INTAR_MAXROW];
    int have = 0;
    for (int r = 0; r < in.i_bound; ++r) {
        int need = r + 1 < c.H ? r + 1 : c.H;
        while (have < need) { x.row(have, lb[have % c.k]); ++have; }
        for (int j = in.j_lo; j < in.j_hi; ++j) {
            const int col = j / c.Cout, co = j % c.Cout;
            long long acc = 0;
            for (int ki = 0; ki < c.k; ++ki) {
                const int ir = r - ki;
                if (ir < 0 || ir >= c.H) continue;
                for (int kj = 0; kj < c.k; ++kj) {
                    const int ic = col - kj;
                    if (ic < 0 || ic >= c.W) continue;
                    for (int ci = 0; ci < c.Cin; ++ci)
                        acc += I(lb[ir % c.k][ic * c.Cin + ci]) * I(w[((ki * c.k + kj) * c.Cin + ci) * c.Cout + co]);
                }
            }
            A y = sat<A>(acc >> c.shift);
            if (c.relu && y < 0) y = 0;
            d.put(r, j, y);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// special-function units (whole rows; j_lo = 0, j_hi = columns)
// ---------------------------------------------------------------------------------------------
enum MapOp { MAP_RELU = 0, MAP_LUT = 1 };

template <class A>
void sfu_map(const ConfigInst& in, Src<A>& x, int op, const int* lut, int shift, Dst<A>& d) {
    static A row[INTAR_MAXROW];
    for (int i = 0; i < in.i_bound; ++i) {
        x.row(i, row);
        for (int j = in.j_lo; j < in.j_hi; ++j) {
            A v = row[j];
            if (op == MAP_RELU) d.put(i, j, v < 0 ? A(0) : v);
            else d.put(i, j, A(lut[lut_index(I(v), shift)]));
        }
    }
}

enum BinOp { BIN_ADD = 0, BIN_MUL = 1 };

template <class A>
void sfu_binary(const ConfigInst& in, Src<A>& x, Src<A>& y, int op, int shift, Dst<A>& d) {
    static A r0[INTAR_MAXROW], r1[INTAR_MAXROW];
    for (int i = 0; i < in.i_bound; ++i) {
        x.row(i, r0);
        y.row(i, r1);
        for (int j = in.j_lo; j < in.j_hi; ++j) {
            long long v = op == BIN_ADD ? I(r0[j]) + I(r1[j]) : I(r0[j]) * I(r1[j]);
            d.put(i, j, sat<A>(v >> shift));
        }
    }
}

// VAE reparameterisation: z = mu + ((exp(logvar / 2) * eps) >> shift), exp from a table.
template <class A>
void sfu_reparam(const ConfigInst& in, Src<A>& mu, Src<A>& lv, Src<A>& eps, const int* lut, int lv_shift,
                 int shift, Dst<A>& d) {
    static A r0[INTAR_MAXROW], r1[INTAR_MAXROW], r2[INTAR_MAXROW];
    for (int i = 0; i < in.i_bound; ++i) {
        mu.row(i, r0);
        lv.row(i, r1);
        eps.row(i, r2);
        for (int j = in.j_lo; j < in.j_hi; ++j) {
            long long s = lut[lut_index(I(r1[j]), lv_shift)];
            d.put(i, j, sat<A>(I(r0[j]) + ((s * I(r2[j])) >> shift)));
        }
    }
}

// Softmax over groups of k_bound columns: e = LUT[min((max - x) >> shift, 255)], p = (e << q) / sum.
template <class A>
void sfu_softmax(const ConfigInst& in, Src<A>& x, const int* lut, int shift, int q, Dst<A>& d) {
    static A row[INTAR_MAXROW];
    static long long e[INTAR_MAXROW];
    const int n = in.k_bound;
    for (int i = 0; i < in.i_bound; ++i) {
        x.row(i, row);
        for (int g0 = in.j_lo; g0 < in.j_hi; g0 += n) {
            long long mx = I(row[g0]);
            for (int j = g0; j < g0 + n; ++j) mx = I(row[j]) > mx ? I(row[j]) : mx;
            long long sum = 0;
            for (int j = g0; j < g0 + n; ++j) {
                long long idx = (mx - I(row[j])) >> shift;
                e[j] = lut[idx > 255 ? 255 : idx];
                sum += e[j];
            }
            for (int j = g0; j < g0 + n; ++j) d.put(i, j, A(floordiv(e[j] << q, sum)));
        }
    }
}

// Integer LayerNorm: mean and variance by floor division, sd = isqrt(var) + 1, y = (d << q) / sd.
template <class A>
void sfu_layernorm(const ConfigInst& in, Src<A>& x, int q, Dst<A>& d) {
    static A row[INTAR_MAXROW];
    const int n = in.k_bound;
    for (int i = 0; i < in.i_bound; ++i) {
        x.row(i, row);
        long long s = 0;
        for (int j = 0; j < n; ++j) s += I(row[j]);
        const long long mean = floordiv(s, n);
        long long v = 0;
        for (int j = 0; j < n; ++j) { long long t = I(row[j]) - mean; v += t * t; }
        const long long sd = isqrt(floordiv(v, n)) + 1;
        for (int j = in.j_lo; j < in.j_hi; ++j) d.put(i, j, sat<A>(floordiv((I(row[j]) - mean) * (1LL << q), sd)));
    }
}

// Nearest 2x upsampling of (H, W, C) rows: out row r is in row r / 2 with every pixel doubled.
template <class A>
void sfu_upsample2(const ConfigInst& in, Src<A>& x, int W, int C, Dst<A>& d) {
    static A row[INTAR_MAXROW];
    for (int r = 0; r < in.i_bound; ++r) {
        if (r % 2 == 0) x.row(r / 2, row);
        for (int j = in.j_lo; j < in.j_hi; ++j) {
            const int col = j / C, ch = j % C;
            d.put(r, j, row[(col / 2) * C + ch]);
        }
    }
}

// 2x2 max pooling of (H, W, C) rows: out row r from in rows 2r and 2r+1.
template <class A>
void sfu_maxpool2(const ConfigInst& in, Src<A>& x, int W, int C, Dst<A>& d) {
    static A r0[INTAR_MAXROW], r1[INTAR_MAXROW];
    for (int r = 0; r < in.i_bound; ++r) {
        x.row(2 * r, r0);
        x.row(2 * r + 1, r1);
        for (int j = in.j_lo; j < in.j_hi; ++j) {
            const int col = j / C, ch = j % C;
            A m = r0[(2 * col) * C + ch];
            const A cand[3] = {r0[(2 * col + 1) * C + ch], r1[(2 * col) * C + ch], r1[(2 * col + 1) * C + ch]};
            for (int t = 0; t < 3; ++t) m = cand[t] > m ? cand[t] : m;
            d.put(r, j, m);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HBM image files (raw little-endian int16 / int8) and FIFO checks
// ---------------------------------------------------------------------------------------------
template <class T> void load(const char* dir, const char* name, T* dst, long n, int bytes) {
    char path[4096];
    std::snprintf(path, sizeof path, "%s/%s.bin", dir, name);
    FILE* fp = std::fopen(path, "rb");
    if (!fp) fail("cannot open input", path);
    for (long i = 0; i < n; ++i) {
        long long v = 0;
        if (bytes == 2) { int16_t t; if (std::fread(&t, 2, 1, fp) != 1) fail("short input", path); v = t; }
        else { int8_t t; if (std::fread(&t, 1, 1, fp) != 1) fail("short input", path); v = t; }
        dst[i] = T(v);
    }
    std::fclose(fp);
}

template <class T> void save(const char* dir, const char* name, const T* src, long n) {
    char path[4096];
    std::snprintf(path, sizeof path, "%s/%s.out.bin", dir, name);
    FILE* fp = std::fopen(path, "wb");
    if (!fp) fail("cannot write output", path);
    for (long i = 0; i < n; ++i) { int32_t v = (int32_t)I(src[i]); std::fwrite(&v, 4, 1, fp); }
    std::fclose(fp);
}

}  // namespace intar
#endif
