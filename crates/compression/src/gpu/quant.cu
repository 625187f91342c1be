// Quantization of an f16 (or bf16, or f32) tensor into a compressed buffer (format
// version 1, see the crate documentation of `compression`), on the GPU.
// Compiled at run time by NVRTC; needs no CUDA header.
//
// The output is the CPU's `quantize_into`, byte for byte: header, codes,
// zero padding, scales, mins. Every number is computed with the operations
// of `params.rs`, in the same order and precision:
//   lo, hi   = the group's smallest and largest value (f32; a zero lo is +0)
//   asym:    min   = largest f16 <= lo                 (f16_round_down, f64)
//            range = f64(hi) - f64(min)                 (f64 subtraction)
//            scale = range > 0 ? smallest f16 >= range / max_code : 0
//   sym:     amax  = max(|lo|, |hi|) (f32), scale = smallest f16 >=
//            (lo == hi ? amax : amax / (2^(bits-1) - 1))
//   inv      = scale > 0 ? 1.0 / f64(scale) : 0        (f64 division)
//   code     = rne(clamp((f64(x) - origin) * inv + bias, lo_code, max_code))
// All f64 arithmetic goes through the __d*_rn intrinsics, which NVRTC never
// fuses into an FMA (plain `a * b + c` would be contracted under the default
// --fmad=true and round differently from the CPU's separate multiply and
// add). f64 division by `/` is IEEE round-to-nearest on the GPU (the
// prec-div option concerns f32 only); __ddiv_rn says so explicitly.
//
// Non-quantizable values (NaN, infinities, f32 beyond +-65504) are found
// like the CPU finds them (|bits| > bits of 65504) and reported through a
// status word: atomicMin of their flat index, so the host names the lowest
// one, as the CPU does. The output is unspecified then.
//
// Two kernels, picked on the host:
// - rows: f16 input, groups along the innermost dim with no padding
//   (inner == 1, dim_len % group_size == 0: the KV cache), group size 8 to
//   256 with group_size / 8 a power of two, 16-byte aligned input and
//   output. A lane loads 16 bytes (8 values); the group_size / 8 lanes of a
//   group reduce min and max by shuffles; each lane stores its 8 codes (4
//   or 8 bytes), so a warp's loads and stores are contiguous.
// - any: a thread per group, any layout, dtype and alignment. With inner >
//   1 (groups along a dim that is not the last) neighbouring threads read
//   neighbouring columns, so loads are coalesced.

typedef unsigned long long u64;
typedef long long i64;
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

// The 64-byte header, written as it is (the host builds it).
struct Header {
    u64 w[8];
};
static_assert(sizeof(Header) == 64, "Header must match the Rust struct");

#define TLQ_THREADS 256
// |bits| of 65504.0f: anything above is NaN, infinite or out of f16 range.
#define TLQ_F16_MAX_BITS 0x477FE000u

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ bool bad_value(float v) {
    return (__float_as_uint(v) & 0x7fffffffu) > TLQ_F16_MAX_BITS;
}

// f16 bits of the two f16 numbers around v (finite, |v| <= 65504): the
// largest <= v (`down`) and the smallest >= v (`up`). The arithmetic of
// `f16_bracket` in params.rs, step for step.
__device__ __forceinline__ void f16_bracket(double v, u16& down, u16& up) {
    const double a = fabs(v);
    const int exp = (int)((__double_as_longlong(a) >> 52) & 0x7ff) - 1023;
    const int e = exp > -14 ? exp : -14;
    const double to_units = __longlong_as_double((i64)(1023 + 10 - e) << 52);
    const double k = __dmul_rn(a, to_units);  // exact: a power of two
    const u32 k_floor = (u32)k;               // 0 <= k < 2048: truncation
    const u32 k_ceil = k_floor + ((double)k_floor < k ? 1u : 0u);
    const u32 base = ((u32)(e + 15) << 10) - 1024u;
    const u16 mag_lo = (u16)(base + k_floor);
    const u16 mag_hi = (u16)(base + k_ceil);
    if (__double_as_longlong(v) < 0) {  // sign bit, as is_sign_negative
        down = (u16)(0x8000u | mag_hi);
        up = (u16)(0x8000u | mag_lo);
    } else {
        down = mag_lo;
        up = mag_hi;
    }
}

__device__ __forceinline__ u16 f16_round_up(double v) {
    u16 d, u;
    f16_bracket(v, d, u);
    return u;
}

__device__ __forceinline__ u16 f16_round_down(double v) {
    u16 d, u;
    f16_bracket(v, d, u);
    return d;
}

__device__ __forceinline__ double f16_to_f64(u16 h) {
    return (double)h2f(h);  // exact
}

// `GroupParams`: the stored scale and min, and the encoding constants.
struct Params {
    u16 scale;
    u16 min;
    double origin, inv, bias, lo, hi;
};

__device__ __forceinline__ Params group_params(float lo, float hi, u32 bits, bool symmetric) {
    Params p;
    const u32 max_code = (1u << bits) - 1u;
    u16 scale;
    if (!symmetric) {
        // A zero lo is +0 (the CPU's rule too: which zero a min/max
        // reduction returns is otherwise unspecified).
        lo = lo == 0.0f ? 0.0f : lo;
        const u16 min = f16_round_down((double)lo);
        const double origin = f16_to_f64(min);
        const double range = __dsub_rn((double)hi, origin);
        scale = range > 0.0 ? f16_round_up(__ddiv_rn(range, (double)max_code)) : (u16)0;
        p.min = min;
        p.origin = origin;
        p.bias = 0.0;
        p.lo = 0.0;
    } else {
        const u32 half = 1u << (bits - 1);
        const float alo = fabsf(lo), ahi = fabsf(hi);
        const double amax = (double)(alo > ahi ? alo : ahi);
        scale = lo == hi ? f16_round_up(amax) : f16_round_up(__ddiv_rn(amax, (double)(half - 1u)));
        p.min = 0;
        p.origin = 0.0;
        p.bias = (double)half;
        p.lo = 1.0;
    }
    p.scale = scale;
    p.hi = (double)max_code;
    const double s = f16_to_f64(scale);
    p.inv = s > 0.0 ? __ddiv_rn(1.0, s) : 0.0;
    return p;
}

// `GroupParams::encode`: the nearest code, ties to even, by adding
// 1.5 * 2^52 (the f64 step there is 1) and taking the low bits.
__device__ __forceinline__ u32 encode(const Params& p, float x) {
    double t = __dadd_rn(__dmul_rn(__dsub_rn((double)x, p.origin), p.inv), p.bias);
    t = t < p.lo ? p.lo : t;
    t = t > p.hi ? p.hi : t;
    return (u32)(__double_as_longlong(__dadd_rn(t, 6755399441055744.0)) & 0xff);
}

__device__ __forceinline__ float load_value(const u16* src, u64 i) {
    return h2f(src[i]);
}

__device__ __forceinline__ float load_value(const float* src, u64 i) {
    return src[i];
}

// A bf16 input value (its bits): widened to f32 exactly by a shift.
struct bf16_bits {
    u16 bits;
};

__device__ __forceinline__ float load_value(const bf16_bits* src, u64 i) {
    return __uint_as_float((u32)src[i].bits << 16);
}

__device__ __forceinline__ void store_u16(unsigned char* p, u16 v) {
    p[0] = (unsigned char)(v & 0xff);
    p[1] = (unsigned char)(v >> 8);
}

// Block 0 writes the header and the zero tail of the data section.
__device__ __forceinline__ void write_header(const KernelParams& p, const Header& h, unsigned char* dst) {
    if (blockIdx.x != 0) return;
    const u32 t = threadIdx.x;
    if (t < 64) dst[t] = (unsigned char)(h.w[t >> 3] >> ((t & 7) * 8));
    const u64 codes_end = p.data_offset + p.num_groups * (u64)(p.group_size * p.bits / 8);
    if (t < 16 && codes_end + t < p.scales_offset) dst[codes_end + t] = 0;
}

template <typename T>
__device__ __forceinline__ void quant_any(const KernelParams& p, const Header& h, const T* __restrict__ src,
                                          unsigned char* __restrict__ dst, u64* __restrict__ status) {
    write_header(p, h, dst);
    const u64 inner = p.inner;
    const u64 L = p.dim_len;
    const u32 G = p.groups_per_line;
    const u32 gs = p.group_size;
    const u32 bits = p.bits;
    const bool symmetric = p.symmetric != 0;
    const u64 gb = (u64)gs * bits / 8;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 k = blockIdx.x * (u64)blockDim.x + threadIdx.x; k < p.num_groups; k += stride) {
        const u64 line = k / inner;
        const u64 i = k - line * inner;
        const u64 o = line / G;
        const u64 g = line - o * G;
        const u64 j0 = g * gs;
        const u32 len = (u32)(L - j0 < gs ? L - j0 : gs);
        const u64 base = (o * L + j0) * inner + i;  // flat index of position 0
        float lo = __int_as_float(0x7f800000), hi = __int_as_float(0xff800000);
        bool bad = false;
        for (u32 q = 0; q < len; ++q) {
            const float v = load_value(src, base + q * inner);
            if (bad_value(v)) {
                atomicMin(status, base + q * inner);  // the group's first
                bad = true;
                break;
            }
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
        if (bad) continue;  // the output is unspecified on error
        const Params prm = group_params(lo, hi, bits, symmetric);
        unsigned char* codes = dst + p.data_offset + k * gb;
        if (bits == 8) {
            for (u32 q = 0; q < gs; ++q) {
                codes[q] = q < len ? (unsigned char)encode(prm, load_value(src, base + q * inner)) : 0;
            }
        } else {
            for (u32 q = 0; q < gs; q += 2) {
                const u32 c0 = q < len ? encode(prm, load_value(src, base + q * inner)) : 0u;
                const u32 c1 = q + 1 < len ? encode(prm, load_value(src, base + (q + 1) * inner)) : 0u;
                codes[q >> 1] = (unsigned char)(c0 | (c1 << 4));
            }
        }
        store_u16(dst + p.scales_offset + 2 * k, prm.scale);
        if (!symmetric) store_u16(dst + p.mins_offset + 2 * k, prm.min);
    }
}

extern "C" __global__ void __launch_bounds__(TLQ_THREADS)
    tlq_quant_any_f16(const KernelParams p, const Header h, const u16* __restrict__ src,
                      unsigned char* __restrict__ dst, u64* __restrict__ status) {
    quant_any<u16>(p, h, src, dst, status);
}

extern "C" __global__ void __launch_bounds__(TLQ_THREADS)
    tlq_quant_any_bf16(const KernelParams p, const Header h, const bf16_bits* __restrict__ src,
                       unsigned char* __restrict__ dst, u64* __restrict__ status) {
    quant_any<bf16_bits>(p, h, src, dst, status);
}

extern "C" __global__ void __launch_bounds__(TLQ_THREADS)
    tlq_quant_any_f32(const KernelParams p, const Header h, const float* __restrict__ src,
                      unsigned char* __restrict__ dst, u64* __restrict__ status) {
    quant_any<float>(p, h, src, dst, status);
}

// The rows kernel: chunk c (8 values, 16 bytes of input) is lane c % 32 of
// a warp; its group is c / LPG, with LPG = group_size / 8 lanes per group
// (a power of two, at most 32, so a group never straddles warps).
template <int BITS>
__device__ __forceinline__ void quant_rows(const KernelParams& p, const Header& h, const u16* __restrict__ src,
                                           unsigned char* __restrict__ dst, u64* __restrict__ status) {
    write_header(p, h, dst);
    const u32 lpg = p.group_size / 8;
    const bool symmetric = p.symmetric != 0;
    const u64 nchunks = p.num_groups * lpg;
    const u32 lane = threadIdx.x & 31u;
    const u64 gwarp = (blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5;
    const u64 nwarps = ((u64)gridDim.x * blockDim.x) >> 5;
    unsigned char* data = dst + p.data_offset;
    for (u64 first = gwarp * 32; first < nchunks; first += nwarps * 32) {
        const u64 c = first + lane;
        const bool live = c < nchunks;
        float v[8];
        float lo = __int_as_float(0x7f800000), hi = __int_as_float(0xff800000);
        u32 bad = 0;
        if (live) {
            const uint4 w = __ldg(reinterpret_cast<const uint4*>(src) + c);
            const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                v[2 * r] = h2f((u16)(ws[r] & 0xffffu));
                v[2 * r + 1] = h2f((u16)(ws[r] >> 16));
            }
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                if (bad_value(v[r]) && !bad) {
                    atomicMin(status, c * 8 + r);
                    bad = 1;
                }
                lo = v[r] < lo ? v[r] : lo;
                hi = v[r] > hi ? v[r] : hi;
            }
        }
        // Reduce over the lanes of the group (aligned runs of lpg lanes).
        for (u32 off = 1; off < lpg; off <<= 1) {
            const float olo = __shfl_xor_sync(0xffffffffu, lo, off);
            const float ohi = __shfl_xor_sync(0xffffffffu, hi, off);
            bad |= __shfl_xor_sync(0xffffffffu, bad, off);
            lo = olo < lo ? olo : lo;
            hi = ohi > hi ? ohi : hi;
        }
        if (!live || bad) continue;  // the output is unspecified on error
        const Params prm = group_params(lo, hi, BITS, symmetric);
        if (BITS == 4) {
            u32 word = 0;
#pragma unroll
            for (int r = 0; r < 8; ++r) word |= encode(prm, v[r]) << (4 * r);
            reinterpret_cast<u32*>(data)[c] = word;
        } else {
            uint2 word = make_uint2(0u, 0u);
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                word.x |= encode(prm, v[r]) << (8 * r);
                word.y |= encode(prm, v[4 + r]) << (8 * r);
            }
            reinterpret_cast<uint2*>(data)[c] = word;
        }
        if ((lane & (lpg - 1)) == 0) {
            const u64 k = c / lpg;
            reinterpret_cast<u16*>(dst + p.scales_offset)[k] = prm.scale;
            if (!symmetric) reinterpret_cast<u16*>(dst + p.mins_offset)[k] = prm.min;
        }
    }
}

extern "C" __global__ void __launch_bounds__(TLQ_THREADS)
    tlq_quant_rows4(const KernelParams p, const Header h, const u16* __restrict__ src,
                    unsigned char* __restrict__ dst, u64* __restrict__ status) {
    quant_rows<4>(p, h, src, dst, status);
}

extern "C" __global__ void __launch_bounds__(TLQ_THREADS)
    tlq_quant_rows8(const KernelParams p, const Header h, const u16* __restrict__ src,
                    unsigned char* __restrict__ dst, u64* __restrict__ status) {
    quant_rows<8>(p, h, src, dst, status);
}
