// Warp primitives of the szp kernels, defined once for CUDA (nvcc, NVRTC) and HIP (hipcc, hiprtc).
//
// The kernels work in groups of 32 lanes: a group codes one szp block (32 values, one bit per lane in a
// plane word). A CUDA warp is one group; an AMD wave64 holds two, so every ballot and shuffle here stays
// inside the caller's group of 32 and masks are always 32 bits. Callers keep all 32 lanes of a group active.
#pragma once

#include "szp_format.h"

#if defined(__HIPCC__) || defined(__HIPCC_RTC__)
#define SZP_HIP 1
#endif

#define SZP_DEVICE __device__ __forceinline__

namespace szp {

constexpr int kGroup = 32;
static_assert(kGroup == kBlockValues, "one lane per value of a block");

// Every szp kernel runs one thread block per chunk with one thread per szp block of it (8 groups).
constexpr int kChunkThreads = kChunkBlocks;
static_assert(kChunkThreads % kGroup == 0 && kChunkThreads == kChunkValues / 32, "scans and sign words per thread");

SZP_DEVICE int group_lane() { return int(threadIdx.x) & (kGroup - 1); }
SZP_DEVICE int group_index() { return int(threadIdx.x) / kGroup; }
SZP_DEVICE szp_u32 lanemask_lt() { return (1u << group_lane()) - 1u; }

SZP_DEVICE szp_u32 group_ballot(bool pred) {
#ifdef SZP_HIP
    // __ballot covers the whole wavefront (32 or 64 lanes); keep this group's 32 bits.
    return szp_u32(__ballot(pred) >> (int(threadIdx.x) & (warpSize - 1) & ~(kGroup - 1)));
#else
    return __ballot_sync(0xffffffffu, pred);
#endif
}

template <class T>
SZP_DEVICE T group_shfl(T v, int src_lane) {
#ifdef SZP_HIP
    return __shfl(v, src_lane, kGroup);
#else
    return __shfl_sync(0xffffffffu, v, src_lane, kGroup);
#endif
}

template <class T>
SZP_DEVICE T group_shfl_up(T v, int delta) {
#ifdef SZP_HIP
    return __shfl_up(v, delta, kGroup);
#else
    return __shfl_up_sync(0xffffffffu, v, delta, kGroup);
#endif
}

template <class T>
SZP_DEVICE T group_shfl_xor(T v, int lane_mask) {
#ifdef SZP_HIP
    return __shfl_xor(v, lane_mask, kGroup);
#else
    return __shfl_xor_sync(0xffffffffu, v, lane_mask, kGroup);
#endif
}

SZP_DEVICE szp_u32 group_or(szp_u32 v) {
    for (int m = kGroup / 2; m > 0; m >>= 1) v |= group_shfl_xor(v, m);
    return v;
}

SZP_DEVICE int popc(szp_u32 v) { return __popc(v); }

}  // namespace szp
