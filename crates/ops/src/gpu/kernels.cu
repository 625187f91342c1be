// The GPU engine's kernels (compiled at run time by NVRTC through
// tier-cuda's kernel cache). f16 storage, f32 arithmetic. Every kernel
// checks its own bounds; the Rust launchers check buffer sizes. The
// helpers of common.cuh (reductions, NEG_INF, u8/u32/u64) come before it.

#include <cuda_fp16.h>

union H8 {
    uint4 u;
    __half2 h[4];
};

// Hidden states of the new tokens: token embedding (or what `hidden`
// already holds, after a projection) plus a learned position embedding. The
// position of a real token is the number of real tokens before it in its
// sequence (`past_real[b]` of them in earlier steps, plus those of this
// step's mask up to it), looked up at position + pos_offset; padding looks
// up row pad_row.
// Also records this step's mask in the sequence's key mask at `past`.
// Grid: one block per row (batch x new_len).
extern "C" __global__ void embed(const u32* __restrict__ tokens, const u8* __restrict__ step_mask,
                                 const int* __restrict__ past_real, const __half* __restrict__ tok_table,
                                 const __half* __restrict__ pos_table, int h, int new_len, int add_tokens,
                                 float* hidden, __half* __restrict__ hidden16, u8* __restrict__ key_mask,
                                 int mask_stride, int past, int pos_offset, int pad_row) {
    int r = blockIdx.x;
    int b = r / new_len, s = r % new_len;
    const u8* m = step_mask + (u64)b * new_len;
    int count = 0;
    for (int base = 0; base <= s; base += blockDim.x) {
        int i = base + threadIdx.x;
        count += __syncthreads_count(i <= s && m[i] != 0);
    }
    int real = m[s] != 0;
    u64 idx = real ? (u64)(past_real[b] + count - 1 + pos_offset) : (u64)pad_row;
    if (threadIdx.x == 0) key_mask[(u64)b * mask_stride + past + s] = (u8)real;
    u64 tok = tokens[r];
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        u64 o = (u64)r * h + c;
        float t = add_tokens ? __half2float(tok_table[tok * h + c]) : hidden[o];
        t += __half2float(pos_table[idx * h + c]);
        hidden[o] = t;
        hidden16[o] = __float2half(t);
    }
}

// Token embeddings of width e (before project_in). One block per row.
extern "C" __global__ void gather_tokens(const u32* __restrict__ tokens, const __half* __restrict__ table, int e,
                                         __half* __restrict__ out) {
    u64 r = blockIdx.x;
    u64 tok = tokens[r];
    for (int c = threadIdx.x; c < e; c += blockDim.x) out[r * e + c] = table[tok * e + c];
}

// Layer norm of each f32 row (epsilon eps), optional affine parameters (null
// pointers: none). Writes f16 to y16 and, where y32 is not null, f32 to y32
// (which may be x itself). One block per row; each thread keeps its (up to
// LN_PER_THREAD) values in registers, so the row is read once.
#define LN_PER_THREAD 16
extern "C" __global__ void layer_norm(const float* x, int dim, float eps, const __half* __restrict__ w,
                                      const __half* __restrict__ bias, float* y32, __half* __restrict__ y16) {
    __shared__ float red[32];
    u64 off = (u64)blockIdx.x * dim;
    const float* row = x + off;
    float v[LN_PER_THREAD];
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < LN_PER_THREAD; k++) {
        int i = threadIdx.x + k * blockDim.x;
        v[k] = i < dim ? row[i] : 0.0f;
        s += v[k];
    }
    float mean = block_sum(s, red) / dim;
    float q = 0.0f;
#pragma unroll
    for (int k = 0; k < LN_PER_THREAD; k++) {
        int i = threadIdx.x + k * blockDim.x;
        float d = i < dim ? v[k] - mean : 0.0f;
        q += d * d;
    }
    float var = block_sum(q, red) / dim;
    float inv = 1.0f / sqrtf(var + eps);
#pragma unroll
    for (int k = 0; k < LN_PER_THREAD; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i < dim) {
            float t = (v[k] - mean) * inv;
            if (w) t *= __half2float(w[i]);
            if (bias) t += __half2float(bias[i]);
            if (y32) y32[off + i] = t;
            y16[off + i] = __float2half(t);
        }
    }
}

// The last row of each sequence (new_len rows each), as f32 and f16.
// One block per sequence.
extern "C" __global__ void gather_last(const float* __restrict__ hidden, int new_len, int h,
                                       float* __restrict__ out32, __half* __restrict__ out16) {
    u64 b = blockIdx.x;
    const float* src = hidden + (b * new_len + new_len - 1) * h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        float t = src[c];
        out32[b * h + c] = t;
        out16[b * h + c] = __float2half(t);
    }
}

// Keys and values of this step (columns hidden..3*hidden of each qkv row)
// into the cache, [batch][head][cap][hd], at positions past... `vec8`:
// hd is a multiple of 8, copy 16 bytes at a time. One block per row.
extern "C" __global__ void store_kv(const __half* __restrict__ qkv, int hidden, int heads, int hd, int new_len,
                                   int past, int cap, __half* __restrict__ kc, __half* __restrict__ vc, int vec8) {
    u64 r = blockIdx.x;
    u64 b = r / new_len, s = r % new_len;
    const __half* src = qkv + r * 3 * (u64)hidden;
    int step = vec8 ? 8 : 1;
    for (int e0 = threadIdx.x * step; e0 < hidden; e0 += blockDim.x * step) {
        int hh = e0 / hd, d = e0 % hd;
        u64 dst = ((b * heads + hh) * cap + past + s) * hd + d;
        if (vec8) {
            *(uint4*)(kc + dst) = *(const uint4*)(src + hidden + e0);
            *(uint4*)(vc + dst) = *(const uint4*)(src + 2 * hidden + e0);
        } else {
            kc[dst] = src[hidden + e0];
            vc[dst] = src[2 * hidden + e0];
        }
    }
}

// Rows [batch][s][heads * hd] (row pitch `ld`) to heads [batch][heads][s][hd]
// (`to_heads`), or back (row pitch `ld` for the rows). One block per row;
// 16 bytes at a time where hd is a multiple of 8 (`vec8`).
extern "C" __global__ void transpose_heads(const __half* __restrict__ src, __half* __restrict__ dst, int ld,
                                          int new_len, int heads, int hd, int to_heads, int vec8) {
    u64 r = blockIdx.x;
    u64 b = r / new_len, s = r % new_len;
    int hidden = heads * hd;
    int step = vec8 ? 8 : 1;
    for (int e0 = threadIdx.x * step; e0 < hidden; e0 += blockDim.x * step) {
        int hh = e0 / hd, d = e0 % hd;
        u64 row_i = r * ld + e0;
        u64 head_i = ((b * heads + hh) * new_len + s) * hd + d;
        u64 from = to_heads ? row_i : head_i;
        u64 to = to_heads ? head_i : row_i;
        if (vec8) {
            *(uint4*)(dst + to) = *(const uint4*)(src + from);
        } else {
            dst[to] = src[from];
        }
    }
}

// Masked softmax of attention scores, in place: row r of `scores` (f16,
// `total` keys) becomes f16 probabilities. Rows are (sequence b0 + i, head,
// query s); query s sees key j when j <= past + s and the key mask allows
// it; a row that sees nothing becomes zeros. Up to 8 keys per thread, in
// f32.
extern "C" __global__ void softmax_rows(__half* scores, int total, int new_len, int heads, int past,
                                        const u8* __restrict__ key_mask, int mask_stride, int b0) {
    __shared__ float red[32];
    u64 r = blockIdx.x;
    int s = (int)(r % new_len);
    u64 b = b0 + (r / new_len) / heads;
    __half* row = scores + r * total;
    const u8* m = key_mask + b * mask_stride;
    int qpos = past + s;
    float v[8];
    float mx = NEG_INF;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int j = threadIdx.x + k * blockDim.x;
        v[k] = NEG_INF;
        if (j < total && j <= qpos && m[j] != 0) {
            v[k] = __half2float(row[j]);
            mx = fmaxf(mx, v[k]);
        }
    }
    mx = block_max(mx, red);
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        float p = (v[k] == NEG_INF || mx == NEG_INF) ? 0.0f : expf(v[k] - mx);
        v[k] = p;
        sum += p;
    }
    sum = block_sum(sum, red);
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int j = threadIdx.x + k * blockDim.x;
        if (j < total) row[j] = __float2half(v[k] * inv);
    }
}

// Attention of one new token per sequence over the cache: grid (heads,
// batch), `threads` threads; head_dim a multiple of 8 with hd / 8 a power of
// two up to 32: a group of hd / 8 threads holds one key (16 bytes each), and
// the groups of a block walk the keys, UNROLL at a time, so that each thread
// has several 16-byte loads in flight. Scores stay in shared memory.
// Dynamic shared memory: (total + groups * hd) floats.
#define UNROLL 4
extern "C" __global__ void attn_decode(const __half* __restrict__ qkv, int hidden, const __half* __restrict__ kc,
                                       const __half* __restrict__ vc, const u8* __restrict__ key_mask,
                                       int mask_stride, int cap, int total, int heads, int hd, float scale,
                                       __half* __restrict__ out) {
    extern __shared__ float smem[];
    __shared__ float red[32];
    int h = blockIdx.x, b = blockIdx.y;
    int g = hd >> 3;
    int lane = threadIdx.x % g, grp = threadIdx.x / g, ng = blockDim.x / g;
    float* sc = smem;
    float* acc_sh = smem + total;

    H8 qv;
    qv.u = *(const uint4*)(qkv + (u64)b * 3 * hidden + (u64)h * hd + lane * 8);
    float q[8];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __half22float2(qv.h[i]);
        q[2 * i] = f.x * scale;
        q[2 * i + 1] = f.y * scale;
    }
    u64 head_off = ((u64)b * heads + h) * cap * hd + lane * 8;
    const __half* kb = kc + head_off;
    const __half* vb = vc + head_off;
    const u8* m = key_mask + (u64)b * mask_stride;

    for (int base = 0; base < total; base += UNROLL * ng) {
        H8 kv[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int j = base + grp + u * ng;
            if (j < total) {
                kv[u].u = *(const uint4*)(kb + (u64)j * hd);
            } else {
                kv[u].u = make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float2 f = __half22float2(kv[u].h[i]);
                dot += q[2 * i] * f.x + q[2 * i + 1] * f.y;
            }
            for (int o = g >> 1; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            int j = base + grp + u * ng;
            if (lane == 0 && j < total) sc[j] = m[j] != 0 ? dot : NEG_INF;
        }
    }
    __syncthreads();
    float inv = shared_softmax(sc, total, red);

    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0.0f;
    for (int base = 0; base < total; base += UNROLL * ng) {
        H8 vv[UNROLL];
        float p[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int j = base + grp + u * ng;
            p[u] = j < total ? sc[j] : 0.0f;
            if (p[u] != 0.0f) {
                vv[u].u = *(const uint4*)(vb + (u64)j * hd);
            } else {
                vv[u].u = make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float2 f = __half22float2(vv[u].h[i]);
                acc[2 * i] += p[u] * f.x;
                acc[2 * i + 1] += p[u] * f.y;
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 8; i++) acc_sh[grp * hd + lane * 8 + i] = acc[i];
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float t = 0.0f;
        for (int k = 0; k < ng; k++) t += acc_sh[k * hd + d];
        out[(u64)b * hidden + (u64)h * hd + d] = __float2half(t * inv);
    }
}

// Index of the largest logit of each row (the first on ties, as
// torch.argmax). One block per row, blockDim a multiple of 32, <= 1024.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int n, u32* __restrict__ out) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    const float* row = logits + (u64)blockIdx.x * n;
    float best = NEG_INF;
    int idx = n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = row[j];
        if (v > best) {
            best = v;
            idx = j;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > best || (ov == best && oi < idx)) {
            best = ov;
            idx = oi;
        }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
        bv[warp] = best;
        bi[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < nw ? bv[lane] : NEG_INF;
        idx = lane < nw ? bi[lane] : n;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, idx, o);
            if (ov > best || (ov == best && oi < idx)) {
                best = ov;
                idx = oi;
            }
        }
        if (lane == 0) out[blockIdx.x] = idx < n ? (u32)idx : 0u;
    }
}

// y[r, c] = act(y[r, c] + bias[c]) over rows x n (bias may be null): the
// epilogue where cuBLASLt cannot fuse it.
extern "C" __global__ void bias_act_f16(__half* y, const __half* __restrict__ bias, u64 rows, int n, int relu) {
    u64 total = rows * n;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        float t = __half2float(y[i]);
        if (bias) t += __half2float(bias[i % n]);
        if (relu) t = fmaxf(t, 0.0f);
        y[i] = __float2half(t);
    }
}

extern "C" __global__ void bias_act_f32(float* y, const float* __restrict__ bias, u64 rows, int n, int relu) {
    u64 total = rows * n;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        float t = y[i];
        if (bias) t += bias[i % n];
        if (relu) t = fmaxf(t, 0.0f);
        y[i] = t;
    }
}

// Seeded dummy weights: element i is uniform in [-scale, scale), from a
// splitmix64 hash of (seed, i), rounded to f16 (the f32 variant stores the
// same f16-rounded value).
__device__ __forceinline__ u64 mix64(u64 z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ __half uniform_half(u64 seed, u64 i, float scale) {
    u64 z = mix64(seed ^ mix64(i));
    float x = (float)(z >> 40) * (1.0f / 16777216.0f);
    return __float2half((2.0f * x - 1.0f) * scale);
}

extern "C" __global__ void fill_uniform_f16(__half* out, u64 n, u64 seed, float scale) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = uniform_half(seed, i, scale);
}

extern "C" __global__ void fill_uniform_f32(float* out, u64 n, u64 seed, float scale) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = __half2float(uniform_half(seed, i, scale));
}

extern "C" __global__ void fill_f16(__half* out, u64 n, float value) {
    __half v = __float2half(value);
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) out[i] = v;
}

extern "C" __global__ void fill_f32(float* out, u64 n, float value) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) out[i] = value;
}
