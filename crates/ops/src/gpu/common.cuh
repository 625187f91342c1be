// Device helpers shared by every NVRTC source of the op layer (prepended to
// kernels.cu and llm.cu when they are compiled).

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets it.
// `red` is 32 floats of shared memory; safe to call again right after.
__device__ float block_sum(float v, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.0f;
    return warp_sum(t);
}

__device__ float block_max(float v, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : NEG_INF;
    return warp_max(t);
}

// Softmax over `total` f32 scores in shared memory, in place: each becomes
// exp(score - max), a masked one (-inf) 0, every one 0 when all are masked;
// returns 1 / their sum (0 when all are masked) for the caller to scale by.
// Every thread of the block calls it; it ends with a barrier, so the
// scores may be read by any thread after.
__device__ float shared_softmax(float* sc, int total, float* red) {
    float mx = NEG_INF;
    for (int j = threadIdx.x; j < total; j += blockDim.x) mx = fmaxf(mx, sc[j]);
    mx = block_max(mx, red);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < total; j += blockDim.x) {
        float p = (mx == NEG_INF || sc[j] == NEG_INF) ? 0.0f : expf(sc[j] - mx);
        sc[j] = p;
        sum += p;
    }
    sum = block_sum(sum, red);
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    __syncthreads();
    return inv;
}

