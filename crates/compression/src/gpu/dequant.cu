// Dequantization of a compressed tensor (format version 1, see the crate
// documentation of `compression`) into f16 (or bf16, built with
// TLQ_OUT_BF16), on the GPU. Compiled at run time
// by NVRTC; needs no CUDA header.
//
// Every kernel takes the layout by value (`KernelParams`, the mirror of the
// Rust struct of that name), the address of the whole compressed buffer
// (header included; the header is not read) and the address of the output.
// A code q of a group with f16 scale s and min m decodes, in f32, to
// clamp(m + q * s, -65504, 65504), then rounds to f16 to nearest even: the
// CPU's `dequantize_into`, bit for bit. Symmetric groups use
// m = -2^(bits-1) * s.
//
// Three kernels, picked on the host:
// - cols: groups along a dim that is not innermost (inner % 8 == 0), the
//   weight layout. A thread takes 8 neighbouring groups (8 output columns)
//   of one line; it loads 16-byte chunks of each group's codes and writes
//   one 16-byte row of 8 values per code position. Two builds
//   (TLQ_COLS_SPLIT): `cols`, a thread per 8 groups, two chunks of each at
//   a time, a warp writing 512 contiguous bytes per store (4-bit codes);
//   `cols_split`, a thread per chunk of 8 groups, so that the lanes
//   sharing 8 groups read side by side (8-bit codes).
// - rows: groups along the innermost dim with no padding (inner == 1,
//   dim_len % group_size == 0), the KV-cache layout, where codes and output
//   run in the same order. Each lane loads 16 bytes of codes; the warp
//   stages them in shared memory and each lane then writes 16-byte vectors
//   of 8 values so that the warp's stores are contiguous; the group's scale
//   and min come from the lane that loaded the chunk, by shuffle.
// - any: one value per thread, any shape and alignment (the fallback).
// The fast two need 16-byte aligned buffer and output and group_size *
// bits / 8 a multiple of 16.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

struct KernelParams {
    u64 outer;
    u64 dim_len;
    u64 inner;
    u64 num_groups;
    u64 data_offset;
    u64 scales_offset;
    u64 mins_offset;
    u32 groups_per_line;
    u32 group_size;
    u32 bits;
    u32 symmetric;
};
static_assert(sizeof(KernelParams) == 72, "KernelParams must match the Rust struct");

#define TLQ_THREADS 256
#define TLQ_WARPS (TLQ_THREADS / 32)
#define TLQ_ROWS_UNROLL 2
// The columns kernel reads two 16-byte chunks of each group at a time
// (define TLQ_COLS_PAIRS=0 for one at a time, the first version).
#ifndef TLQ_COLS_PAIRS
#define TLQ_COLS_PAIRS 1
#endif
#if TLQ_COLS_PAIRS
#define TLQ_COLS_BOUNDS __launch_bounds__(TLQ_THREADS, 2)
#else
#define TLQ_COLS_BOUNDS __launch_bounds__(TLQ_THREADS)
#endif
// The columns kernels' build, chosen by the host for each bit width
// (`ColsTuning` in gpu.rs, which sizes the grid to match); the defaults
// here are only for a plain compile. TLQ_COLS_SPLIT: 1 for `cols_split` (a
// work item per 16-byte chunk of 8 groups), 0 for `cols` (per 8 groups).
#ifndef TLQ_COLS_SPLIT
#define TLQ_COLS_SPLIT 1
#endif
// Work items a lane of `cols_split` loads before it stores (1 to 4).
#ifndef TLQ_COLS_ITEMS
#define TLQ_COLS_ITEMS 2
#endif
#ifndef TLQ_SPLIT_MIN_BLOCKS
#define TLQ_SPLIT_MIN_BLOCKS 2
#endif
#define TLQ_SPLIT_BOUNDS __launch_bounds__(TLQ_THREADS, TLQ_SPLIT_MIN_BLOCKS)

// f32 -> f16 with the clamp to +-65504, NaN kept (Rust's f32::clamp keeps
// NaN). Clamping after the round-to-nearest conversion gives the same bits
// as clamping before it: a value past 65504 rounds to 65504 or to infinity,
// and both clamp to 65504. On sm_80 and up: one conversion per pair of
// values and a NaN-keeping min and max on the pair (the saturating
// conversion is not used: it turns infinities into NaN). Elsewhere, or with
// TLQ_PORTABLE_CVT: the clamp in f32, then a plain conversion per value.
#if defined(TLQ_PORTABLE_CVT) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800)
#define TLQ_PAIRED_CLAMP 0
#else
#define TLQ_PAIRED_CLAMP 1
#endif

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// clamp(x, -65504, 65504) that keeps NaN, like Rust's f32::clamp.
__device__ __forceinline__ float clamp_f16(float x) {
    x = x < -65504.0f ? -65504.0f : x;
    return x > 65504.0f ? 65504.0f : x;
}

__device__ __forceinline__ u16 to_f16(float x) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(clamp_f16(x)));
    return h;
}

// Two values to f16, `lo` in the low half (the first in memory).
__device__ __forceinline__ u32 to_f16x2(float lo, float hi) {
#if TLQ_PAIRED_CLAMP
    u32 r;
    asm("{\n\t"
        "cvt.rn.f16x2.f32 %0, %1, %2;\n\t"
        "min.NaN.f16x2 %0, %0, %3;\n\t"
        "max.NaN.f16x2 %0, %0, %4;\n\t"
        "}"
        : "=r"(r)
        : "f"(hi), "f"(lo), "r"(0x7BFF7BFFu), "r"(0xFBFFFBFFu));
    return r;
#else
    return (u32)to_f16(lo) | ((u32)to_f16(hi) << 16);
#endif
}

// f32 -> bf16 after the same clamp, rounding to nearest even by the bits
// (any architecture), NaN kept quiet with its sign: the `half` crate's
// `bf16::from_f32`, which the CPU's `dequantize_into_bf16` uses.
__device__ __forceinline__ u16 to_bf16(float x) {
    const u32 b = __float_as_uint(clamp_f16(x));
    if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x40u);
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ u32 to_bf16x2(float lo, float hi) {
    return (u32)to_bf16(lo) | ((u32)to_bf16(hi) << 16);
}

// The output type: f16 (the default) or, built with TLQ_OUT_BF16, bf16.
// Either is 2 bytes, so every kernel's addressing is the same.
#ifdef TLQ_OUT_BF16
#define to_out1 to_bf16
#define to_out2 to_bf16x2
#else
#define to_out1 to_f16
#define to_out2 to_f16x2
#endif

// The code's value as a float, exactly, without an integer conversion:
// 2^23 + c has c in its low mantissa bits.
__device__ __forceinline__ float code_value(u32 c) {
    return __uint_as_float(0x4B000000u | c) - 8388608.0f;
}

// m + q * s with one rounding: q * s is exact in f32 (8 + 11 bits), so the
// fused multiply-add equals the CPU's multiply then add.
__device__ __forceinline__ float decode(u32 c, float m, float s) {
    return fmaf(code_value(c), s, m);
}

__device__ __forceinline__ uint4 ld16(const unsigned char* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
}

// One 16-byte store (written out: the compiler otherwise splits some into
// four 4-byte stores). The output is never read back by the kernel.
__device__ __forceinline__ void st16(u16* p, const uint4& v) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}

__device__ __forceinline__ u32 word(const uint4& v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// Code q of a 16-byte chunk of codes (q a compile-time constant).
template <int BITS>
__device__ __forceinline__ u32 code_at(const uint4& v, int q) {
    if (BITS == 4) {
        return (word(v, q >> 3) >> ((q & 7) * 4)) & 15u;
    } else {
        return (word(v, q >> 2) >> ((q & 3) * 8)) & 255u;
    }
}

// The 8 f16 values of a 16-byte vector, as floats.
__device__ __forceinline__ void unpack8(const uint4& v, float* f) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 w = word(v, i);
        f[2 * i] = h2f((u16)(w & 0xffffu));
        f[2 * i + 1] = h2f((u16)(w >> 16));
    }
}

__device__ __forceinline__ u64 div_small(u64 a, u32 b) {
    return (a >> 32) == 0 ? (u64)((u32)a / b) : a / b;
}

// a / b, in 32 bits where both fit.
__device__ __forceinline__ u64 div_fast(u64 a, u64 b) {
    return ((a | b) >> 32) == 0 ? (u64)((u32)a / (u32)b) : a / b;
}

// One 16-byte chunk of codes of each of 8 neighbouring groups: rows j ..
// j + CP - 1 of their 8 columns (rows at or past `len` are padding).
template <int BITS>
__device__ __forceinline__ void cols_chunk(const uint4 (&w)[8], const float (&mn)[8], const float (&sc)[8],
                                           u16* __restrict__ col, u64 j, u64 len, u64 inner) {
    const int CP = 128 / BITS;
#pragma unroll
    for (int q = 0; q < CP; ++q) {
        if (j + q < len) {
            uint4 v;
            v.x = to_out2(decode(code_at<BITS>(w[0], q), mn[0], sc[0]), decode(code_at<BITS>(w[1], q), mn[1], sc[1]));
            v.y = to_out2(decode(code_at<BITS>(w[2], q), mn[2], sc[2]), decode(code_at<BITS>(w[3], q), mn[3], sc[3]));
            v.z = to_out2(decode(code_at<BITS>(w[4], q), mn[4], sc[4]), decode(code_at<BITS>(w[5], q), mn[5], sc[5]));
            v.w = to_out2(decode(code_at<BITS>(w[6], q), mn[6], sc[6]), decode(code_at<BITS>(w[7], q), mn[7], sc[7]));
            st16(col + (j + q) * inner, v);
        }
    }
}

template <int BITS>
__device__ __forceinline__ void cols(const KernelParams& p, const unsigned char* __restrict__ buf,
                                     u16* __restrict__ out) {
    const int CP = 128 / BITS;  // codes per 16-byte chunk
    const u64 inner = p.inner;
    const u64 len = p.dim_len;
    const u32 G = p.groups_per_line;
    const u32 gs = p.group_size;
    const u32 gb = gs * BITS / 8;
    const u32 chunks = gb / 16;
    const u64 nblk = inner / 8;
    const u64 total = p.outer * G * nblk;
    const float half_code = (float)(1u << (BITS - 1));
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 t = blockIdx.x * (u64)blockDim.x + threadIdx.x; t < total; t += stride) {
        const u64 line = t / nblk;
        const u64 blk = t - line * nblk;
        const u64 o = div_small(line, G);
        const u32 g = (u32)(line - o * G);
        const u64 k0 = line * inner + blk * 8;  // first of the 8 groups
        float sc[8], mn[8];
        unpack8(ld16(buf + p.scales_offset + 2 * k0), sc);
        if (p.symmetric) {
#pragma unroll
            for (int r = 0; r < 8; ++r) mn[r] = -half_code * sc[r];
        } else {
            unpack8(ld16(buf + p.mins_offset + 2 * k0), mn);
        }
        const unsigned char* codes = buf + p.data_offset + k0 * gb;
        u16* col = out + o * len * inner + blk * 8;
        u64 j = (u64)g * gs;  // output row of the chunk's first code
#if TLQ_COLS_PAIRS
        // Two chunks of each group at a time: the two halves of each
        // 32-byte sector are asked for together, and twice the bytes are in
        // flight per thread.
        for (u32 c = 0; c < chunks; c += 2, j += 2 * CP) {
            const bool two = c + 1 < chunks;
            uint4 a[8], b[8];
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                a[r] = ld16(codes + (u64)r * gb + 16u * c);
                b[r] = two ? ld16(codes + (u64)r * gb + 16u * (c + 1)) : a[r];
            }
            cols_chunk<BITS>(a, mn, sc, col, j, len, inner);
            if (two) cols_chunk<BITS>(b, mn, sc, col, j + CP, len, inner);
        }
#else
        for (u32 c = 0; c < chunks; ++c, j += CP) {
            uint4 w[8];
#pragma unroll
            for (int r = 0; r < 8; ++r) w[r] = ld16(codes + (u64)r * gb + 16u * c);
            cols_chunk<BITS>(w, mn, sc, col, j, len, inner);
        }
#endif
    }
}

// The columns kernel with a work item per chunk: item x is chunk x % chunks
// of the 8 neighbouring groups x / chunks (numbered like the threads of
// `cols`), so the lanes of a warp that share 8 groups read their chunks side
// by side and a warp load covers whole 32-byte sectors of a few groups,
// where `cols` has each lane read 16 bytes of a different 128-byte line.
// Each warp takes TLQ_COLS_ITEMS runs of 32 neighbouring items at a time
// (lane l: items l, l + 32, ..), all loads first.
template <int BITS>
__device__ __forceinline__ void cols_split(const KernelParams& p, const unsigned char* __restrict__ buf,
                                           u16* __restrict__ out) {
    const int CP = 128 / BITS;  // codes per 16-byte chunk
    const int U = TLQ_COLS_ITEMS;
    const u64 inner = p.inner;
    const u64 len = p.dim_len;
    const u32 G = p.groups_per_line;
    const u32 gs = p.group_size;
    const u32 gb = gs * BITS / 8;
    const u32 chunks = gb / 16;
    const u64 nblk = inner / 8;
    const u64 items = p.outer * G * nblk * chunks;
    const float half_code = (float)(1u << (BITS - 1));
    const u32 lane = threadIdx.x & 31u;
    const u64 gwarp = (blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5;
    const u64 nwarps = ((u64)gridDim.x * blockDim.x) >> 5;
    const unsigned char* data = buf + p.data_offset;
    for (u64 first = gwarp * (32 * U); first < items; first += nwarps * (32 * U)) {
        uint4 w[U][8];
        float sc[U][8], mn[U][8];
        u16* col[U];
        u64 j[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const u64 x = first + 32 * u + lane;
            col[u] = nullptr;
            if (x < items) {
                const u64 t = div_small(x, chunks);  // the 8 groups, as in `cols`
                const u32 c = (u32)(x - t * chunks);
                const u64 line = div_fast(t, nblk);
                const u64 blk = t - line * nblk;
                const u64 o = div_small(line, G);
                const u32 g = (u32)(line - o * G);
                const u64 k0 = t * 8;  // = line * inner + blk * 8
                unpack8(ld16(buf + p.scales_offset + 2 * k0), sc[u]);
                if (p.symmetric) {
#pragma unroll
                    for (int r = 0; r < 8; ++r) mn[u][r] = -half_code * sc[u][r];
                } else {
                    unpack8(ld16(buf + p.mins_offset + 2 * k0), mn[u]);
                }
                const unsigned char* codes = data + k0 * gb + 16u * c;
#pragma unroll
                for (int r = 0; r < 8; ++r) w[u][r] = ld16(codes + (u64)r * gb);
                col[u] = out + o * len * inner + blk * 8;
                j[u] = (u64)g * gs + (u64)c * CP;
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (col[u] != nullptr) cols_chunk<BITS>(w[u], mn[u], sc[u], col[u], j[u], len, inner);
        }
    }
}

template <int BITS>
__device__ __forceinline__ void rows(const KernelParams& p, const unsigned char* __restrict__ buf,
                                     u16* __restrict__ out) {
    const u32 VPC = BITS == 4 ? 4 : 2;  // 8-value output vectors per 16-byte chunk
    __shared__ uint4 stage[TLQ_WARPS][TLQ_ROWS_UNROLL * 32];
    const u32 gb = p.group_size * BITS / 8;
    const u32 cpg = gb / 16;  // chunks per group
    const u64 nchunks = p.num_groups * cpg;
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    const u64 gwarp = (blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5;
    const u64 nwarps = ((u64)gridDim.x * blockDim.x) >> 5;
    const float half_code = (float)(1u << (BITS - 1));
    const unsigned char* data = buf + p.data_offset;
    const u16* scales = reinterpret_cast<const u16*>(buf + p.scales_offset);
    const u16* mins = reinterpret_cast<const u16*>(buf + p.mins_offset);
    for (u64 span = gwarp * TLQ_ROWS_UNROLL; span * 32 < nchunks; span += nwarps * TLQ_ROWS_UNROLL) {
        float sc[TLQ_ROWS_UNROLL], mn[TLQ_ROWS_UNROLL];
#pragma unroll
        for (int u = 0; u < TLQ_ROWS_UNROLL; ++u) {
            const u64 chunk = (span + u) * 32 + lane;
            sc[u] = 0.0f;
            mn[u] = 0.0f;
            if (chunk < nchunks) {
                stage[warp][u * 32 + lane] = ld16(data + chunk * 16);
                const u64 k = div_small(chunk, cpg);
                sc[u] = h2f(__ldg(scales + k));
                mn[u] = p.symmetric ? -half_code * sc[u] : h2f(__ldg(mins + k));
            }
        }
        __syncwarp();
#pragma unroll
        for (int u = 0; u < TLQ_ROWS_UNROLL; ++u) {
            const u64 first = (span + u) * 32;  // first chunk of this span
#pragma unroll
            for (u32 q = 0; q < VPC; ++q) {
                const u32 v = q * 32 + lane;  // output vector within the span
                const u32 src = v / VPC;      // the lane that loaded its chunk
                const float s = __shfl_sync(0xffffffffu, sc[u], src);
                const float m = __shfl_sync(0xffffffffu, mn[u], src);
                if (first + src < nchunks) {
                    uint4 o;
                    if (BITS == 4) {
                        const u32 w = reinterpret_cast<const u32*>(&stage[warp][u * 32])[v];
                        o.x = to_out2(decode(w & 15u, m, s), decode((w >> 4) & 15u, m, s));
                        o.y = to_out2(decode((w >> 8) & 15u, m, s), decode((w >> 12) & 15u, m, s));
                        o.z = to_out2(decode((w >> 16) & 15u, m, s), decode((w >> 20) & 15u, m, s));
                        o.w = to_out2(decode((w >> 24) & 15u, m, s), decode(w >> 28, m, s));
                    } else {
                        const uint2 w = reinterpret_cast<const uint2*>(&stage[warp][u * 32])[v];
                        o.x = to_out2(decode(w.x & 255u, m, s), decode((w.x >> 8) & 255u, m, s));
                        o.y = to_out2(decode((w.x >> 16) & 255u, m, s), decode(w.x >> 24, m, s));
                        o.z = to_out2(decode(w.y & 255u, m, s), decode((w.y >> 8) & 255u, m, s));
                        o.w = to_out2(decode((w.y >> 16) & 255u, m, s), decode(w.y >> 24, m, s));
                    }
                    st16(out + (first * VPC + v) * 8, o);
                }
            }
        }
        __syncwarp();
    }
}

#if TLQ_COLS_SPLIT
extern "C" __global__ void TLQ_SPLIT_BOUNDS
    tlq_dequant_cols4(const KernelParams p, const unsigned char* __restrict__ buf, u16* __restrict__ out) {
    cols_split<4>(p, buf, out);
}
#else
extern "C" __global__ void TLQ_COLS_BOUNDS
    tlq_dequant_cols4(const KernelParams p, const unsigned char* __restrict__ buf, u16* __restrict__ out) {
    cols<4>(p, buf, out);
}
#endif

#if TLQ_COLS_SPLIT
extern "C" __global__ void TLQ_SPLIT_BOUNDS
    tlq_dequant_cols8(const KernelParams p, const unsigned char* __restrict__ buf, u16* __restrict__ out) {
    cols_split<8>(p, buf, out);
}
#else
extern "C" __global__ void TLQ_COLS_BOUNDS
    tlq_dequant_cols8(const KernelParams p, const unsigned char* __restrict__ buf, u16* __restrict__ out) {
    cols<8>(p, buf, out);
}
#endif

extern "C" __global__ void __launch_bounds__(TLQ_THREADS)
    tlq_dequant_rows4(const KernelParams p, const unsigned char* __restrict__ buf, u16* __restrict__ out) {
    rows<4>(p, buf, out);
}

extern "C" __global__ void __launch_bounds__(TLQ_THREADS)
    tlq_dequant_rows8(const KernelParams p, const unsigned char* __restrict__ buf, u16* __restrict__ out) {
    rows<8>(p, buf, out);
}

// Little-endian u16 at any byte address.
__device__ __forceinline__ u16 ld_u16(const unsigned char* p) {
    return (u16)(p[0] | (p[1] << 8));
}

extern "C" __global__ void __launch_bounds__(TLQ_THREADS)
    tlq_dequant_any(const KernelParams p, const unsigned char* __restrict__ buf, u16* __restrict__ out) {
    const u64 inner = p.inner;
    const u64 line_len = p.dim_len * inner;
    const u64 numel = p.outer * line_len;
    const u32 gs = p.group_size;
    const u32 bits = p.bits;
    const u64 gb = (u64)gs * bits / 8;
    const float half_code = (float)(1u << (bits - 1));
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 e = blockIdx.x * (u64)blockDim.x + threadIdx.x; e < numel; e += stride) {
        const u64 o = e / line_len;
        const u64 rem = e - o * line_len;
        const u64 j = rem / inner;
        const u64 i = rem - j * inner;
        const u64 g = j / gs;
        const u32 pos = (u32)(j - g * gs);
        const u64 k = (o * p.groups_per_line + g) * inner + i;
        const unsigned char* grp = buf + p.data_offset + k * gb;
        const u32 c = bits == 4 ? (u32)(grp[pos >> 1] >> ((pos & 1u) * 4)) & 15u : (u32)grp[pos];
        const float s = h2f(ld_u16(buf + p.scales_offset + 2 * k));
        const float m = p.symmetric ? -half_code * s : h2f(ld_u16(buf + p.mins_offset + 2 * k));
        out[e] = to_out1(decode(c, m, s));
    }
}
