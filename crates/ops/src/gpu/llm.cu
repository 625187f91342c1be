// The kernels of decoders with RMSNorm, rotary embeddings, grouped-query
// attention and a gated MLP, compiled at run time by NVRTC through
// tier-cuda's kernel cache, on first use only (`Gpu::llm`).
//
// Device code is templated over the 16-bit storage type T (`__half` or
// `__nv_bfloat16`); each `extern "C"` entry point is instantiated for both,
// named `<name>_f16` and `<name>_bf16`. All arithmetic is f32, each result
// rounded once to T (round to nearest even). No fast math: expf, sinf, cosf,
// sqrtf and divisions are the precise ones, and products whose rounding the
// CPU reference fixes are written with __fmul_rn so they cannot be fused.
// The Rust launchers (llm.rs) check buffer sizes; kernels check their own
// index bounds. The helpers of common.cuh (reductions, NEG_INF, u8/u32/u64)
// come before it.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

// ---------------------------------------------------------------------------
// Conversions.

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The value of a 16-bit pattern (the low 16 bits of `b`) of type T.
template <typename T> __device__ __forceinline__ float bits_to_f(u32 b);
template <> __device__ __forceinline__ float bits_to_f<__half>(u32 b) {
    return __half2float(__ushort_as_half((unsigned short)(b & 0xffffu)));
}
template <> __device__ __forceinline__ float bits_to_f<__nv_bfloat16>(u32 b) {
    return __uint_as_float((b & 0xffffu) << 16);
}

// Eight T values of one 16-byte load (element 0 in the low bits).
template <typename T> __device__ __forceinline__ void unpack8(uint4 u, float* f) {
    f[0] = bits_to_f<T>(u.x);
    f[1] = bits_to_f<T>(u.x >> 16);
    f[2] = bits_to_f<T>(u.y);
    f[3] = bits_to_f<T>(u.y >> 16);
    f[4] = bits_to_f<T>(u.z);
    f[5] = bits_to_f<T>(u.z >> 16);
    f[6] = bits_to_f<T>(u.w);
    f[7] = bits_to_f<T>(u.w >> 16);
}

#define GRID_STRIDE(i, n) \
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

// ---------------------------------------------------------------------------
// Token embeddings: out[r, :] = f32(table[tokens[r], :]); a token outside
// the table (the host checks ids first) writes zeros. One block per row.

template <typename T>
__device__ __forceinline__ void embed_rows_k(const u32* __restrict__ tokens, const T* __restrict__ table, int vocab,
                                             int h, float* __restrict__ out) {
    u64 r = blockIdx.x;
    u32 tok = tokens[r];
    float* o = out + r * h;
    if (tok >= (u32)vocab) {
        for (int c = threadIdx.x; c < h; c += blockDim.x) o[c] = 0.0f;
        return;
    }
    const T* src = table + (u64)tok * h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) o[c] = to_f(src[c]);
}

// This step's mask into the sequences' key masks at column `past`:
// key_mask[b * stride + past + i] = step_mask[b * new_len + i].
extern "C" __global__ void write_mask(const u8* __restrict__ step_mask, int batch, int new_len,
                                      u8* __restrict__ key_mask, int stride, int past) {
    u64 n = (u64)batch * new_len;
    GRID_STRIDE(t, n) {
        u64 b = t / new_len, i = t % new_len;
        key_mask[b * stride + past + i] = step_mask[t];
    }
}

// ---------------------------------------------------------------------------
// RMSNorm of one row of `dim` values as the CPU reference computes it:
// mean = sum(x^2) / dim, inv = 1 / sqrtf(mean + eps), out = w * (x * inv),
// in f32, rounded once to T. `tid` of `nthreads` threads share the row:
// one warp (warp_only) or the whole block. `x` and `out` may be the same row
// (each thread reads before it writes the same elements, and every read of
// the sum is before the reduction).

template <typename In, typename T>
__device__ __forceinline__ void rms_row(const In* x, int dim, const T* __restrict__ w, float eps, T* out, int tid,
                                        int nthreads, bool warp_only, float* red) {
    float s = 0.0f;
    for (int c = tid; c < dim; c += nthreads) {
        float v = to_f(x[c]);
        s += __fmul_rn(v, v);
    }
    s = warp_only ? warp_sum(s) : block_sum(s, red);
    float mean = s / (float)dim;
    float inv = 1.0f / sqrtf(mean + eps);
    for (int c = tid; c < dim; c += nthreads) {
        float v = to_f(x[c]);
        out[c] = from_f<T>(__fmul_rn(to_f(w[c]), __fmul_rn(v, inv)));
    }
}

// Rows of f32 (row r at x + offset + r * ld) into T rows of dim. With
// `warp_rows`, a warp per row (blockDim.x / 32 rows per block), else a block
// per row.
template <typename T>
__device__ __forceinline__ void rms_norm_f32_k(const float* __restrict__ x, u64 offset, u64 ld, int rows, int dim,
                                               const T* __restrict__ w, float eps, T* __restrict__ out,
                                               int warp_rows) {
    __shared__ float red[32];
    if (warp_rows) {
        u64 row = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
        if (row >= (u64)rows) return;
        rms_row<float, T>(x + offset + row * ld, dim, w, eps, out + row * dim, threadIdx.x & 31, 32, true, red);
    } else {
        u64 row = blockIdx.x;
        rms_row<float, T>(x + offset + row * ld, dim, w, eps, out + row * dim, threadIdx.x, blockDim.x, false, red);
    }
}

// The same on T rows of dim, in place (a per-head q/k norm).
template <typename T>
__device__ __forceinline__ void rms_norm_inplace_k(T* x, int rows, int dim, const T* __restrict__ w, float eps,
                                                   int warp_rows) {
    __shared__ float red[32];
    if (warp_rows) {
        u64 row = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
        if (row >= (u64)rows) return;
        T* p = x + row * dim;
        rms_row<T, T>(p, dim, w, eps, p, threadIdx.x & 31, 32, true, red);
    } else {
        T* p = x + (u64)blockIdx.x * dim;
        rms_row<T, T>(p, dim, w, eps, p, threadIdx.x, blockDim.x, false, red);
    }
}

// ---------------------------------------------------------------------------
// Rotary embeddings, Hugging Face's rotate-half, in place: row r (heads x
// hd values) by the angle positions[r] * inv_freq[i] (an f32 product), for
// i < hd / 2: x[i] = x1 c - x2 s, x[i + hd/2] = x2 c + x1 s. A thread per
// (row, head, i).

// One rotated pair (a, b) = (x[i], x[i + hd/2]) at `position` by
// frequency `freq`, in place.
template <typename T> __device__ __forceinline__ void rotate_pair(T& a, T& b, int position, float freq) {
    float angle = __fmul_rn((float)position, freq);
    float c = cosf(angle), s = sinf(angle);
    float x1 = to_f(a), x2 = to_f(b);
    a = from_f<T>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
    b = from_f<T>(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
}

template <typename T>
__device__ __forceinline__ void rope_k(T* x, int rows, int heads, int hd, const int* __restrict__ positions,
                                       const float* __restrict__ inv_freq) {
    int half = hd >> 1;
    u64 per_row = (u64)heads * half;
    u64 n = (u64)rows * per_row;
    GRID_STRIDE(t, n) {
        u64 r = t / per_row;
        int rest = (int)(t % per_row);
        int h = rest / half, i = rest % half;
        T* p = x + (r * heads + h) * (u64)hd;
        rotate_pair<T>(p[i], p[i + half], positions[r], inv_freq[i]);
    }
}

// The stacked q/k/v product's rows (row r: heads x hd values of q, then
// kv_heads x hd of k, then of v) into q [rows][heads][hd], k and v
// [rows][kv_heads][hd]; with `rotate`, q and k rotated as rope_k does (the
// same f32 products, so the same values as a split then rope_k). A thread
// per (row, head of the stack, i < hd / 2).
template <typename T>
__device__ __forceinline__ void split_qkv_k(const T* __restrict__ qkv, int rows, int heads, int kv_heads, int hd,
                                            const int* __restrict__ positions, const float* __restrict__ inv_freq,
                                            int rotate, T* __restrict__ q, T* __restrict__ k, T* __restrict__ v) {
    int half = hd >> 1;
    int stack = heads + 2 * kv_heads;
    u64 per_row = (u64)stack * half;
    u64 n = (u64)rows * per_row;
    GRID_STRIDE(t, n) {
        u64 r = t / per_row;
        int rest = (int)(t % per_row);
        int h = rest / half, i = rest % half;
        const T* src = qkv + (r * stack + h) * (u64)hd;
        T* dst;
        if (h < heads) {
            dst = q + (r * heads + h) * (u64)hd;
        } else if (h < heads + kv_heads) {
            dst = k + (r * kv_heads + (h - heads)) * (u64)hd;
        } else {
            dst = v + (r * kv_heads + (h - heads - kv_heads)) * (u64)hd;
        }
        T a = src[i], b = src[i + half];
        if (rotate && h < heads + kv_heads) rotate_pair<T>(a, b, positions[r], inv_freq[i]);
        dst[i] = a;
        dst[i + half] = b;
    }
}

// The stacked gate/up product's rows (row r: n gate values, then n up
// values) in place: gate = silu(gate) * up, silu(g) = g / (1 + expf(-g)),
// leaving each row's first n values the down product's input (row stride
// 2n).
template <typename T> __device__ __forceinline__ void silu_mul_k(T* gate_up, u64 rows, int n) {
    u64 total = rows * (u64)n;
    GRID_STRIDE(t, total) {
        u64 r = t / n;
        int c = (int)(t % n);
        T* p = gate_up + r * 2 * (u64)n;
        float g = to_f(p[c]);
        float u = to_f(p[n + c]);
        p[c] = from_f<T>(__fmul_rn(g / (1.0f + expf(-g)), u));
    }
}

// out[r, c] += bias[c] over rows x n.
template <typename T> __device__ __forceinline__ void add_bias_k(T* out, u64 rows, int n, const T* __restrict__ bias) {
    u64 total = rows * n;
    GRID_STRIDE(i, total) { out[i] = from_f<T>(to_f(out[i]) + to_f(bias[i % n])); }
}

// ---------------------------------------------------------------------------
// Keys and values of this step (rows b * new_len + i of kv_heads * hd) into
// the cache, [batch][kv_head][cap][hd], at position past + i. `vec8`: hd a
// multiple of 8 and every pointer 16-byte aligned, copy 16 bytes at a time.
// One block per row.

template <typename T>
__device__ __forceinline__ void store_kv_k(const T* __restrict__ k, const T* __restrict__ v, int new_len, int kv_heads,
                                           int hd, int past, int cap, T* __restrict__ keys, T* __restrict__ values,
                                           int vec8) {
    u64 r = blockIdx.x;
    u64 b = r / new_len, i = r % new_len;
    int width = kv_heads * hd;
    u64 src = r * width;
    int step = vec8 ? 8 : 1;
    for (int e0 = threadIdx.x * step; e0 < width; e0 += blockDim.x * step) {
        int hh = e0 / hd, d = e0 % hd;
        u64 dst = ((b * kv_heads + hh) * cap + past + i) * hd + d;
        if (vec8) {
            *(uint4*)(keys + dst) = *(const uint4*)(k + src + e0);
            *(uint4*)(values + dst) = *(const uint4*)(v + src + e0);
        } else {
            keys[dst] = k[src + e0];
            values[dst] = v[src + e0];
        }
    }
}

// Rows [batch * s][heads * hd] to heads [batch][heads][s][hd] (to_heads), or
// back. One block per row; 16 bytes at a time with `vec8`.
template <typename T>
__device__ __forceinline__ void transpose_heads_k(const T* __restrict__ src, T* __restrict__ dst, int s, int heads,
                                                  int hd, int to_heads, int vec8) {
    u64 r = blockIdx.x;
    u64 b = r / s, i = r % s;
    int width = heads * hd;
    int step = vec8 ? 8 : 1;
    for (int e0 = threadIdx.x * step; e0 < width; e0 += blockDim.x * step) {
        int hh = e0 / hd, d = e0 % hd;
        u64 row_i = r * width + e0;
        u64 head_i = ((b * heads + hh) * s + i) * hd + d;
        u64 from = to_heads ? row_i : head_i;
        u64 to = to_heads ? head_i : row_i;
        if (vec8) {
            *(uint4*)(dst + to) = *(const uint4*)(src + from);
        } else {
            dst[to] = src[from];
        }
    }
}

// ---------------------------------------------------------------------------
// Causal masked softmax of attention scores, in place: rows [nb][heads][s],
// `total` keys each. Row R is query i = R % s of local sequence
// R / (heads * s) (sequence b0 + that of the key mask); key j is visible
// when j <= past + i and key_mask[b * stride + j] != 0. Softmax in f32 over
// the visible keys, the others 0; a row with none visible becomes zeros.
// One block per row: up to 8 keys per thread kept in registers (total <=
// 8 * blockDim.x), else three passes over the row.

#define SM_PER_THREAD 8
template <typename T>
__device__ __forceinline__ void softmax_causal_k(T* scores, int total, int s, int heads, int past,
                                                 const u8* __restrict__ key_mask, int stride, int b0) {
    __shared__ float red[32];
    u64 r = blockIdx.x;
    int i = (int)(r % s);
    u64 b = (u64)b0 + r / ((u64)heads * s);
    T* row = scores + r * total;
    const u8* m = key_mask + b * stride;
    int qpos = past + i;
    if (total <= SM_PER_THREAD * (int)blockDim.x) {
        float v[SM_PER_THREAD];
        float mx = NEG_INF;
#pragma unroll
        for (int k = 0; k < SM_PER_THREAD; k++) {
            int j = threadIdx.x + k * blockDim.x;
            v[k] = NEG_INF;
            if (j < total && j <= qpos && m[j] != 0) {
                v[k] = to_f(row[j]);
                mx = fmaxf(mx, v[k]);
            }
        }
        mx = block_max(mx, red);
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < SM_PER_THREAD; k++) {
            float p = (v[k] == NEG_INF || mx == NEG_INF) ? 0.0f : expf(v[k] - mx);
            v[k] = p;
            sum += p;
        }
        sum = block_sum(sum, red);
        float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
        for (int k = 0; k < SM_PER_THREAD; k++) {
            int j = threadIdx.x + k * blockDim.x;
            if (j < total) row[j] = from_f<T>(v[k] * inv);
        }
    } else {
        float mx = NEG_INF;
        for (int j = threadIdx.x; j < total; j += blockDim.x) {
            if (j <= qpos && m[j] != 0) mx = fmaxf(mx, to_f(row[j]));
        }
        mx = block_max(mx, red);
        float sum = 0.0f;
        if (mx != NEG_INF) {
            for (int j = threadIdx.x; j < total; j += blockDim.x) {
                if (j <= qpos && m[j] != 0) sum += expf(to_f(row[j]) - mx);
            }
        }
        sum = block_sum(sum, red);
        float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        for (int j = threadIdx.x; j < total; j += blockDim.x) {
            float p = (mx != NEG_INF && j <= qpos && m[j] != 0) ? expf(to_f(row[j]) - mx) * inv : 0.0f;
            row[j] = from_f<T>(p);
        }
    }
}

// ---------------------------------------------------------------------------
// Decode attention, flash-decoding style: one new query per sequence over
// `total` cached positions, the positions cut into chunks that separate
// blocks read at the same time, then merged.
//
// q rows [batch][heads * hd]; keys, values [batch][kv_heads][cap][hd]; out
// rows [batch][heads * hd]; position j of sequence b is visible where
// key_mask[b * stride + j] != 0. hd a multiple of 8, at most 256; q, keys
// and values 16-byte aligned. Query head h reads kv head h / group (group =
// heads / kv_heads). A block takes up to GC of a group's heads (GC = gc: 1,
// 2 or 4, at most G below; the last block of a group takes what is left
// where GC does not divide it), so it reads each key and value row once for
// all of them.
//
// attn_split: block ((b * kv_heads + kvh) * hchunks + c) * nsplit + s, with
// hchunks = ceil(group / GC), takes query heads h0 = kvh * group + c * GC ..
// h0 + nh - 1 (nh = min(GC, group - c * GC)) and positions s * chunk ..
// min((s + 1) * chunk, total) - 1. ATTN_THREADS threads in groups of G lanes
// (G = hd / 8 rounded up to a power of two), a lane holding 8 dimensions (16
// bytes) of a row. The groups walk the chunk ATTN_ROWS rows each at a time
// (rows base + grp + u * ng, u < ATTN_ROWS, ng groups), software pipelined:
// while one step's key and value rows are used, the next step's are in
// flight (and the mask bytes of the step after), so a thread always has
// 2 * ATTN_ROWS 16-byte loads outstanding, also while it computes (Little's
// law: an SM needs tens of KB in flight to keep up with HBM). A step:
//  - the GC dot products q_i . k_j are summed over the group's lanes by a
//    transposed butterfly (group_sum_heads) that leaves head i's sum on the
//    G / GC lanes i * G / GC .. of the group, head i's "owners"; times
//    `scale`, -inf where the position is masked (its rows are not read);
//  - online softmax per group: the owners of head i keep the running max m
//    of its scores and the sum l of exp(score - m); every lane keeps acc[i]
//    (its 8 dimensions of sum exp(score - m) v_j, f32) for each head; when m
//    rises, l and acc are scaled by exp(old m - new m).
// At the end the block merges its groups, each scaled to the block's max
// (shuffles within a warp, then the warps through shared memory:
// ATTN_WARPS * GC * G * 8 floats of dynamic shared memory). With nsplit ==
// 1 it writes out = acc / l, rounded once to T (zeros where no position is
// visible). Otherwise it writes the chunk's partial p = (b * heads + h) *
// nsplit + s of each of its heads: part_acc[p * hd + d] = acc (f32,
// unnormalised) and part_ml[p] = (m, l) (-inf and 0 where the chunk sees
// nothing), and attn_combine merges the chunks.
//
// attn_combine: block r = b * heads + h, COMBINE_THREADS threads: M = max_s
// m_s, w_s = exp(m_s - M) (0 where m_s = -inf, in nsplit floats of dynamic
// shared memory), out[r * hd + d] = sum_s w_s acc_s[d] / sum_s w_s l_s,
// rounded once to T (zeros where every l_s is 0).
//
// Measured on an H100 (case E's shape, 64 sequences of 544 positions, 32/8
// heads of 128, bf16): 60 us a call, 2.4 TB/s of keys and values, where
// the previous two-pass kernel took 116 us.

#define ATTN_THREADS 256
#define ATTN_WARPS (ATTN_THREADS / 32)
#define ATTN_ROWS 2
#define FULL_MASK 0xffffffffu

// The sum over a group of G lanes of each lane's d[i], i < GC, left on the
// owners of head i: the lanes with lane / (G / GC) == i (GC <= G, both
// powers of two). Each of the first log2(GC) steps, at offset o, halves the
// values a lane holds: the lane with bit o set keeps the upper half and
// sends the lower one to its partner, which keeps the lower half; the steps
// after them are a plain butterfly. GC - 1 + log2(G / GC) shuffles in all,
// where summing each head over the group would take GC * log2(G).
template <int GC>
__device__ __forceinline__ float group_sum_heads(const float (&d)[GC], int lane, int G) {
    int o = G >> 1;
    float v;
    if constexpr (GC == 4) {
        bool hi = (lane & o) != 0;
        float k0 = (hi ? d[2] : d[0]) + __shfl_xor_sync(FULL_MASK, hi ? d[0] : d[2], o);
        float k1 = (hi ? d[3] : d[1]) + __shfl_xor_sync(FULL_MASK, hi ? d[1] : d[3], o);
        o >>= 1;
        hi = (lane & o) != 0;
        v = (hi ? k1 : k0) + __shfl_xor_sync(FULL_MASK, hi ? k0 : k1, o);
        o >>= 1;
    } else if constexpr (GC == 2) {
        bool hi = (lane & o) != 0;
        v = (hi ? d[1] : d[0]) + __shfl_xor_sync(FULL_MASK, hi ? d[0] : d[1], o);
        o >>= 1;
    } else {
        v = d[0];
    }
    for (; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Whether rows base + grp + u * ng (u < ATTN_ROWS) are in the chunk (below
// j1) and visible.
__device__ __forceinline__ void attn_visible(const u8* __restrict__ m, int base, int j1, int grp, int ng,
                                             bool (&vis)[ATTN_ROWS]) {
#pragma unroll
    for (int u = 0; u < ATTN_ROWS; u++) {
        int j = base + grp + u * ng;
        vis[u] = j < j1 && m[j] != 0;
    }
}

// This lane's 16 bytes of the key and value rows base + grp + u * ng that
// are visible; zeros for the others, which are not read.
template <typename T>
__device__ __forceinline__ void attn_load(const T* __restrict__ kb, const T* __restrict__ vb, int base, int grp,
                                          int ng, int hd, bool active, const bool (&vis)[ATTN_ROWS],
                                          uint4 (&kr)[ATTN_ROWS], uint4 (&vr)[ATTN_ROWS]) {
#pragma unroll
    for (int u = 0; u < ATTN_ROWS; u++) {
        u64 off = (u64)(base + grp + u * ng) * hd;
        if (active && vis[u]) {
            kr[u] = *(const uint4*)(kb + off);
            vr[u] = *(const uint4*)(vb + off);
        } else {
            kr[u] = make_uint4(0, 0, 0, 0);
            vr[u] = make_uint4(0, 0, 0, 0);
        }
    }
}

// One step of a group's online softmax over ATTN_ROWS rows: the scores of
// the head this lane owns (mx, l its running max and sum), then every
// head's weighted values into acc (this lane's 8 dimensions).
template <typename T, int GC>
__device__ __forceinline__ void attn_rows(const uint4 (&kr)[ATTN_ROWS], const uint4 (&vr)[ATTN_ROWS],
                                          const bool (&vis)[ATTN_ROWS], const float (&qf)[GC][8], float scale,
                                          int lane, int G, int gbase, int sub, float& mx, float& l,
                                          float (&acc)[GC][8]) {
    float sc[ATTN_ROWS];
    float nm = mx;
#pragma unroll
    for (int u = 0; u < ATTN_ROWS; u++) {
        float f[8];
        unpack8<T>(kr[u], f);
        float d[GC];
#pragma unroll
        for (int i = 0; i < GC; i++) {
            float t = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; e++) t += qf[i][e] * f[e];
            d[i] = t;
        }
        float dot = group_sum_heads<GC>(d, lane, G);
        sc[u] = vis[u] ? dot * scale : NEG_INF;
        nm = fmaxf(nm, sc[u]);
    }
    // Nothing visible yet: everything stays 0.
    float r = nm == NEG_INF ? 1.0f : expf(mx - nm);
    float p[ATTN_ROWS];
    float ps = 0.0f;
#pragma unroll
    for (int u = 0; u < ATTN_ROWS; u++) {
        p[u] = sc[u] == NEG_INF ? 0.0f : expf(sc[u] - nm);
        ps += p[u];
    }
    l = l * r + ps;
    mx = nm;
#pragma unroll
    for (int i = 0; i < GC; i++) {
        float ri = __shfl_sync(FULL_MASK, r, gbase + i * sub);
#pragma unroll
        for (int e = 0; e < 8; e++) acc[i][e] *= ri;
    }
#pragma unroll
    for (int u = 0; u < ATTN_ROWS; u++) {
        float f[8];
        unpack8<T>(vr[u], f);
#pragma unroll
        for (int i = 0; i < GC; i++) {
            float pi = __shfl_sync(FULL_MASK, p[u], gbase + i * sub);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[i][e] += pi * f[e];
        }
    }
}

template <typename T, int GC>
__device__ __forceinline__ void attn_split_body(const T* __restrict__ q, const T* __restrict__ keys,
                                                const T* __restrict__ values, const u8* __restrict__ key_mask,
                                                int stride, int heads, int kv_heads, int hd, int cap, int total,
                                                float scale, int chunk, int nsplit, float* __restrict__ part_acc,
                                                float2* __restrict__ part_ml, T* __restrict__ out, float* smem) {
    __shared__ float sm_m[ATTN_WARPS][GC], sm_l[ATTN_WARPS][GC], sm_w[ATTN_WARPS][GC], sm_ml[2][GC];
    int group = heads / kv_heads;
    u64 blk = blockIdx.x;
    int s = (int)(blk % nsplit);
    blk /= nsplit;
    int hchunks = (group + GC - 1) / GC;
    int c = (int)(blk % hchunks);
    blk /= hchunks;
    int kvh = (int)(blk % kv_heads);
    u64 b = blk / kv_heads;
    int h0 = kvh * group + c * GC;
    int nh = min(GC, group - c * GC);  // heads of the group left for this block
    int j0 = s * chunk;
    int j1 = min(j0 + chunk, total);

    int g8 = hd >> 3;
    int G = 1;
    while (G < g8) G <<= 1;
    int lane = threadIdx.x & (G - 1), grp = threadIdx.x / G, ng = ATTN_THREADS / G;
    bool active = lane < g8;
    int sub = G / GC;                            // owners of one head
    int gbase = (threadIdx.x & 31) & ~(G - 1);  // the group's first lane in its warp

    float qf[GC][8];
#pragma unroll
    for (int i = 0; i < GC; i++) {
        if (active && i < nh) {
            unpack8<T>(*(const uint4*)(q + (b * heads + h0 + i) * (u64)hd + lane * 8), qf[i]);
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) qf[i][e] = 0.0f;
        }
    }
    u64 head_off = ((b * kv_heads + kvh) * (u64)cap) * hd + lane * 8;
    const T* kb = keys + head_off;
    const T* vb = values + head_off;
    const u8* m = key_mask + b * stride;

    float mx = NEG_INF, l = 0.0f;  // of the head this lane owns
    float acc[GC][8];
#pragma unroll
    for (int i = 0; i < GC; i++) {
#pragma unroll
        for (int e = 0; e < 8; e++) acc[i][e] = 0.0f;
    }
    int step = ATTN_ROWS * ng;
    bool vis[ATTN_ROWS], nvis[ATTN_ROWS];
    uint4 kr[ATTN_ROWS], vr[ATTN_ROWS];
    attn_visible(m, j0, j1, grp, ng, vis);
    // Software pipelined: the next step's rows are loaded while this
    // step's are used, the mask bytes of the step after that too.
    attn_load<T>(kb, vb, j0, grp, ng, hd, active, vis, kr, vr);
    attn_visible(m, j0 + step, j1, grp, ng, nvis);
    for (int base = j0; base < j1; base += step) {
        uint4 kn[ATTN_ROWS], vn[ATTN_ROWS];
        bool nnvis[ATTN_ROWS];
        attn_load<T>(kb, vb, base + step, grp, ng, hd, active, nvis, kn, vn);
        attn_visible(m, base + 2 * step, j1, grp, ng, nnvis);
        attn_rows<T, GC>(kr, vr, vis, qf, scale, lane, G, gbase, sub, mx, l, acc);
#pragma unroll
        for (int u = 0; u < ATTN_ROWS; u++) {
            kr[u] = kn[u];
            vr[u] = vn[u];
            vis[u] = nvis[u];
            nvis[u] = nnvis[u];
        }
    }

    // Merge the groups of each warp (the partner at offset o holds the same
    // dimensions and owns the same head), each scaled to their common max.
    for (int o = G; o < 32; o <<= 1) {
        float mo = __shfl_xor_sync(FULL_MASK, mx, o);
        float lo = __shfl_xor_sync(FULL_MASK, l, o);
        float nm = fmaxf(mx, mo);
        float f = mx == NEG_INF ? 0.0f : expf(mx - nm);
        float fo = mo == NEG_INF ? 0.0f : expf(mo - nm);
        l = l * f + lo * fo;
        mx = nm;
#pragma unroll
        for (int i = 0; i < GC; i++) {
            float fi = __shfl_sync(FULL_MASK, f, gbase + i * sub);
            float foi = __shfl_sync(FULL_MASK, fo, gbase + i * sub);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                float other = __shfl_xor_sync(FULL_MASK, acc[i][e], o);
                acc[i][e] = acc[i][e] * fi + other * foi;
            }
        }
    }
    // Then the warps, through shared memory: each warp's first group.
    int warp = threadIdx.x >> 5, dpad = G * 8;
    if ((threadIdx.x & 31) < G) {
        if (lane % sub == 0) {
            sm_m[warp][lane / sub] = mx;
            sm_l[warp][lane / sub] = l;
        }
        if (active) {
#pragma unroll
            for (int i = 0; i < GC; i++) {
#pragma unroll
                for (int e = 0; e < 8; e++) smem[(warp * GC + i) * dpad + lane * 8 + e] = acc[i][e];
            }
        }
    }
    __syncthreads();
    if (threadIdx.x < GC) {
        int i = threadIdx.x;
        float bm = NEG_INF;
        for (int w = 0; w < ATTN_WARPS; w++) bm = fmaxf(bm, sm_m[w][i]);
        float bl = 0.0f;
        for (int w = 0; w < ATTN_WARPS; w++) {
            float ww = sm_m[w][i] == NEG_INF ? 0.0f : expf(sm_m[w][i] - bm);
            sm_w[w][i] = ww;
            bl += sm_l[w][i] * ww;
        }
        sm_ml[0][i] = bm;
        sm_ml[1][i] = bl;
    }
    __syncthreads();
    for (int t = threadIdx.x; t < nh * hd; t += ATTN_THREADS) {
        int i = t / hd, d = t % hd;
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; w++) a += smem[(w * GC + i) * dpad + d] * sm_w[w][i];
        u64 row = b * heads + h0 + i;
        if (nsplit == 1) {
            float bl = sm_ml[1][i];
            float inv = bl > 0.0f ? 1.0f / bl : 0.0f;
            out[row * hd + d] = from_f<T>(a * inv);
        } else {
            u64 p = row * nsplit + s;
            part_acc[p * hd + d] = a;
            if (d == 0) part_ml[p] = make_float2(sm_ml[0][i], sm_ml[1][i]);
        }
    }
}

template <typename T>
__device__ __forceinline__ void attn_split_k(const T* __restrict__ q, const T* __restrict__ keys,
                                             const T* __restrict__ values, const u8* __restrict__ key_mask,
                                             int stride, int heads, int kv_heads, int hd, int cap, int total,
                                             float scale, int gc, int chunk, int nsplit,
                                             float* __restrict__ part_acc, float2* __restrict__ part_ml,
                                             T* __restrict__ out) {
    extern __shared__ float attn_smem[];
    if (gc == 4) {
        attn_split_body<T, 4>(q, keys, values, key_mask, stride, heads, kv_heads, hd, cap, total, scale, chunk,
                              nsplit, part_acc, part_ml, out, attn_smem);
    } else if (gc == 2) {
        attn_split_body<T, 2>(q, keys, values, key_mask, stride, heads, kv_heads, hd, cap, total, scale, chunk,
                              nsplit, part_acc, part_ml, out, attn_smem);
    } else {
        attn_split_body<T, 1>(q, keys, values, key_mask, stride, heads, kv_heads, hd, cap, total, scale, chunk,
                              nsplit, part_acc, part_ml, out, attn_smem);
    }
}

template <typename T>
__device__ __forceinline__ void attn_combine_k(const float* __restrict__ part_acc,
                                               const float2* __restrict__ part_ml, int nsplit, int hd,
                                               T* __restrict__ out) {
    extern __shared__ float comb_w[];
    __shared__ float red[32];
    u64 r = blockIdx.x;
    const float2* ml = part_ml + r * nsplit;
    float mx = NEG_INF;
    for (int s = threadIdx.x; s < nsplit; s += blockDim.x) mx = fmaxf(mx, ml[s].x);
    mx = block_max(mx, red);
    float sum = 0.0f;
    for (int s = threadIdx.x; s < nsplit; s += blockDim.x) {
        float2 v = ml[s];
        float w = v.x == NEG_INF ? 0.0f : expf(v.x - mx);
        comb_w[s] = w;
        sum += v.y * w;
    }
    sum = block_sum(sum, red);  // its barriers also publish comb_w
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    const float* a = part_acc + r * nsplit * (u64)hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float t = 0.0f;
        for (int s = 0; s < nsplit; s++) t += a[(u64)s * hd + d] * comb_w[s];
        out[r * hd + d] = from_f<T>(t * inv);
    }
}

// ---------------------------------------------------------------------------
// Seeded dummy weights: element i is uniform in [-scale, scale), from a
// splitmix64 hash of (seed, i) — the generator of kernels.cu's
// fill_uniform_f16, so the values are the same before rounding to T.

__device__ __forceinline__ u64 mix64(u64 z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float uniform_f(u64 seed, u64 i, float scale) {
    u64 z = mix64(seed ^ mix64(i));
    float x = (float)(z >> 40) * (1.0f / 16777216.0f);
    return (2.0f * x - 1.0f) * scale;
}

template <typename T> __device__ __forceinline__ void fill_uniform_k(T* out, u64 n, u64 seed, float scale) {
    GRID_STRIDE(i, n) { out[i] = from_f<T>(uniform_f(seed, i, scale)); }
}

template <typename T> __device__ __forceinline__ void fill_k(T* out, u64 n, float value) {
    T v = from_f<T>(value);
    GRID_STRIDE(i, n) { out[i] = v; }
}

// ---------------------------------------------------------------------------
// Entry points, one per type.

#define LLM_ENTRIES(T, SFX)                                                                                        \
    extern "C" __global__ void embed_rows_##SFX(const u32* __restrict__ tokens, const T* __restrict__ table,      \
                                                int vocab, int h, float* __restrict__ out) {                       \
        embed_rows_k<T>(tokens, table, vocab, h, out);                                                             \
    }                                                                                                              \
    extern "C" __global__ void rms_norm_f32_##SFX(const float* __restrict__ x, u64 offset, u64 ld, int rows,      \
                                                  int dim, const T* __restrict__ w, float eps,                     \
                                                  T* __restrict__ out, int warp_rows) {                            \
        rms_norm_f32_k<T>(x, offset, ld, rows, dim, w, eps, out, warp_rows);                                       \
    }                                                                                                              \
    extern "C" __global__ void rms_norm_inplace_##SFX(T* x, int rows, int dim, const T* __restrict__ w, float eps, \
                                                      int warp_rows) {                                             \
        rms_norm_inplace_k<T>(x, rows, dim, w, eps, warp_rows);                                                    \
    }                                                                                                              \
    extern "C" __global__ void rope_##SFX(T* x, int rows, int heads, int hd, const int* __restrict__ positions,   \
                                          const float* __restrict__ inv_freq) {                                    \
        rope_k<T>(x, rows, heads, hd, positions, inv_freq);                                                        \
    }                                                                                                              \
    extern "C" __global__ void split_qkv_##SFX(const T* __restrict__ qkv, int rows, int heads, int kv_heads,     \
                                               int hd, const int* __restrict__ positions,                          \
                                               const float* __restrict__ inv_freq, int rotate, T* __restrict__ q,  \
                                               T* __restrict__ k, T* __restrict__ v) {                             \
        split_qkv_k<T>(qkv, rows, heads, kv_heads, hd, positions, inv_freq, rotate, q, k, v);                      \
    }                                                                                                              \
    extern "C" __global__ void silu_mul_##SFX(T* gate_up, u64 rows, int n) { silu_mul_k<T>(gate_up, rows, n); }    \
    extern "C" __global__ void add_bias_##SFX(T* out, u64 rows, int n, const T* __restrict__ bias) {              \
        add_bias_k<T>(out, rows, n, bias);                                                                         \
    }                                                                                                              \
    extern "C" __global__ void store_kv_##SFX(const T* __restrict__ k, const T* __restrict__ v, int new_len,      \
                                              int kv_heads, int hd, int past, int cap, T* __restrict__ keys,       \
                                              T* __restrict__ values, int vec8) {                                  \
        store_kv_k<T>(k, v, new_len, kv_heads, hd, past, cap, keys, values, vec8);                                 \
    }                                                                                                              \
    extern "C" __global__ void transpose_heads_##SFX(const T* __restrict__ src, T* __restrict__ dst, int s,       \
                                                     int heads, int hd, int to_heads, int vec8) {                  \
        transpose_heads_k<T>(src, dst, s, heads, hd, to_heads, vec8);                                              \
    }                                                                                                              \
    extern "C" __global__ void softmax_causal_##SFX(T* scores, int total, int s, int heads, int past,             \
                                                    const u8* __restrict__ key_mask, int stride, int b0) {         \
        softmax_causal_k<T>(scores, total, s, heads, past, key_mask, stride, b0);                                  \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS, 2)                                                  \
        attn_split_##SFX(const T* __restrict__ q, const T* __restrict__ keys, const T* __restrict__ values,        \
                         const u8* __restrict__ key_mask, int stride, int heads, int kv_heads, int hd, int cap,    \
                         int total, float scale, int gc, int chunk, int nsplit, float* __restrict__ part_acc,      \
                         float2* __restrict__ part_ml, T* __restrict__ out) {                                      \
        attn_split_k<T>(q, keys, values, key_mask, stride, heads, kv_heads, hd, cap, total, scale, gc, chunk,      \
                        nsplit, part_acc, part_ml, out);                                                           \
    }                                                                                                              \
    extern "C" __global__ void attn_combine_##SFX(const float* __restrict__ part_acc,                              \
                                                  const float2* __restrict__ part_ml, int nsplit, int hd,          \
                                                  T* __restrict__ out) {                                           \
        attn_combine_k<T>(part_acc, part_ml, nsplit, hd, out);                                                     \
    }                                                                                                              \
    extern "C" __global__ void fill_uniform_##SFX(T* out, u64 n, u64 seed, float scale) {                        \
        fill_uniform_k<T>(out, n, seed, scale);                                                                    \
    }                                                                                                              \
    extern "C" __global__ void fill_##SFX(T* out, u64 n, float value) { fill_k<T>(out, n, value); }

LLM_ENTRIES(__half, f16)
LLM_ENTRIES(__nv_bfloat16, bf16)
