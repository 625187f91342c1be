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
        float angle = __fmul_rn((float)positions[r], inv_freq[i]);
        float c = cosf(angle), s = sinf(angle);
        T* p = x + (r * heads + h) * (u64)hd;
        float x1 = to_f(p[i]), x2 = to_f(p[i + half]);
        p[i] = from_f<T>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
        p[i + half] = from_f<T>(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
    }
}

// gate = silu(gate) * up, silu(g) = g / (1 + expf(-g)).
template <typename T> __device__ __forceinline__ void silu_mul_k(T* gate, const T* __restrict__ up, u64 n) {
    GRID_STRIDE(i, n) {
        float g = to_f(gate[i]);
        float u = to_f(up[i]);
        gate[i] = from_f<T>(__fmul_rn(g / (1.0f + expf(-g)), u));
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
// Decode attention: one new query per sequence over `total` cached
// positions, grouped-query heads read together. Block (b, kvh, c):
// blockIdx.x = (b * kv_heads + kvh) * chunks + c, chunks = group / gc with
// group = heads / kv_heads; the block takes query heads kvh * group + c * gc
// .. + gc (gc <= ATTN_GMAX, dividing group), all of which read kv head kvh,
// so each key and value row is read once for gc heads. ATTN_THREADS
// threads. q rows [batch][heads * hd]; keys, values [batch][kv_heads][cap]
// [hd]; out rows [batch][heads * hd]. hd a multiple of 8, at most 256;
// every pointer but out and the mask 16-byte aligned.
//
// A group of G lanes (G = hd / 8 rounded up to a power of two) holds one
// key or value row, 8 values (16 bytes) per lane; the groups of the block
// walk the positions, UNROLL rows each at a time in flight.
// 1. scores: for each of the gc heads, each group's dot product q . k_j
//    reduced by shuffles within the group, times `scale`, into shared
//    memory (masked: -inf), row i of the block's gc rows of `total`;
// 2. block softmax over each row in shared memory (f32);
// 3. each lane accumulates p_ij * v_j for its 8 dimensions over its group's
//    positions, for every head i; groups are summed by shuffles within a
//    warp, then warps through shared memory (reusing the scores' room), a
//    head at a time; out = sum / total weight, rounded once to T. Fully
//    masked rows give zeros.
// Dynamic shared memory: max(gc * total, warps * G * 8) floats.

#define ATTN_UNROLL 4
#define ATTN_GMAX 4
template <typename T>
__device__ __forceinline__ void attn_decode_k(const T* __restrict__ q, const T* __restrict__ keys,
                                              const T* __restrict__ values, const u8* __restrict__ key_mask,
                                              int stride, int heads, int kv_heads, int hd, int cap, int total,
                                              float scale, int gc, T* __restrict__ out) {
    extern __shared__ float smem[];
    __shared__ float red[32];
    int group = heads / kv_heads;
    int chunks = group / gc;
    u64 blk = blockIdx.x;
    int c = (int)(blk % chunks);
    blk /= chunks;
    int kvh = (int)(blk % kv_heads);
    u64 b = blk / kv_heads;
    int h0 = kvh * group + c * gc;
    int g8 = hd >> 3;
    int G = 1;
    while (G < g8) G <<= 1;
    int lane = threadIdx.x & (G - 1), grp = threadIdx.x / G, ng = blockDim.x / G;
    bool active = lane < g8;
    float* sc = smem;

    float qf[ATTN_GMAX][8];
#pragma unroll
    for (int i = 0; i < ATTN_GMAX; i++) {
        if (active && i < gc) {
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

    // 1. Scores, a row of `total` per head.
    for (int base = 0; base < total; base += ATTN_UNROLL * ng) {
        uint4 kv[ATTN_UNROLL];
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
            int j = base + grp + u * ng;
            if (active && j < total && m[j] != 0) {
                kv[u] = *(const uint4*)(kb + (u64)j * hd);
            } else {
                kv[u] = make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
            float f[8];
            unpack8<T>(kv[u], f);
            int j = base + grp + u * ng;
#pragma unroll
            for (int i = 0; i < ATTN_GMAX; i++) {
                if (i < gc) {  // uniform across the block
                    float dot = 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; e++) dot += qf[i][e] * f[e];
                    for (int o = G >> 1; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                    if (lane == 0 && j < total) sc[i * total + j] = m[j] != 0 ? dot * scale : NEG_INF;
                }
            }
        }
    }
    __syncthreads();

    // 2. Softmax of each head's row.
    float inv[ATTN_GMAX];
#pragma unroll
    for (int i = 0; i < ATTN_GMAX; i++) inv[i] = i < gc ? shared_softmax(sc + i * total, total, red) : 0.0f;

    // 3. Weighted values, every head from one read of each value row.
    float acc[ATTN_GMAX][8];
#pragma unroll
    for (int i = 0; i < ATTN_GMAX; i++) {
#pragma unroll
        for (int e = 0; e < 8; e++) acc[i][e] = 0.0f;
    }
    for (int base = 0; base < total; base += ATTN_UNROLL * ng) {
        uint4 vv[ATTN_UNROLL];
        float p[ATTN_UNROLL][ATTN_GMAX];
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
            int j = base + grp + u * ng;
            bool any = false;
#pragma unroll
            for (int i = 0; i < ATTN_GMAX; i++) {
                p[u][i] = (i < gc && j < total) ? sc[i * total + j] : 0.0f;
                any = any || p[u][i] != 0.0f;
            }
            if (active && any) {
                vv[u] = *(const uint4*)(vb + (u64)j * hd);
            } else {
                vv[u] = make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; u++) {
            float f[8];
            unpack8<T>(vv[u], f);
#pragma unroll
            for (int i = 0; i < ATTN_GMAX; i++) {
#pragma unroll
                for (int e = 0; e < 8; e++) acc[i][e] += p[u][i] * f[e];
            }
        }
    }
    // Groups of a warp with the same lane hold the same dimensions.
#pragma unroll
    for (int i = 0; i < ATTN_GMAX; i++) {
        if (i < gc) {
            for (int o = G; o < 32; o <<= 1) {
#pragma unroll
                for (int e = 0; e < 8; e++) acc[i][e] += __shfl_xor_sync(0xffffffffu, acc[i][e], o);
            }
        }
    }
    __syncthreads();  // every read of the scores is done: reuse their room
    float* part = smem;
    int warp = threadIdx.x >> 5, nw = blockDim.x >> 5, dpad = G * 8;
#pragma unroll
    for (int i = 0; i < ATTN_GMAX; i++) {
        if (i < gc) {
            if ((threadIdx.x & 31) < G && active) {
#pragma unroll
                for (int e = 0; e < 8; e++) part[warp * dpad + lane * 8 + e] = acc[i][e];
            }
            __syncthreads();
            for (int d = threadIdx.x; d < hd; d += blockDim.x) {
                float t = 0.0f;
                for (int w = 0; w < nw; w++) t += part[w * dpad + d];
                out[(b * heads + h0 + i) * (u64)hd + d] = from_f<T>(t * inv[i]);
            }
            __syncthreads();  // the next head reuses `part`
        }
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
    extern "C" __global__ void silu_mul_##SFX(T* gate, const T* __restrict__ up, u64 n) {                         \
        silu_mul_k<T>(gate, up, n);                                                                                \
    }                                                                                                              \
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
    extern "C" __global__ void attn_decode_##SFX(const T* __restrict__ q, const T* __restrict__ keys,             \
                                                 const T* __restrict__ values, const u8* __restrict__ key_mask,    \
                                                 int stride, int heads, int kv_heads, int hd, int cap, int total,  \
                                                 float scale, int gc, T* __restrict__ out) {                       \
        attn_decode_k<T>(q, keys, values, key_mask, stride, heads, kv_heads, hd, cap, total, scale, gc, out);      \
    }                                                                                                              \
    extern "C" __global__ void fill_uniform_##SFX(T* out, u64 n, u64 seed, float scale) {                        \
        fill_uniform_k<T>(out, n, seed, scale);                                                                    \
    }                                                                                                              \
    extern "C" __global__ void fill_##SFX(T* out, u64 n, float value) { fill_k<T>(out, n, value); }

LLM_ENTRIES(__half, f16)
LLM_ENTRIES(__nv_bfloat16, bf16)
