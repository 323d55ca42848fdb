// Exclusive prefix sum across one thread block: shuffles inside each 32-lane group, then a pass over the
// group totals in shared memory. kThreads / 32 is small (8), so the second level is a plain loop.
#pragma once

#include "portability.cuh"

namespace szp {

// Every thread of the block must call it (it synchronizes); `*total` receives the sum over all threads.
template <int kThreads, class T>
SZP_DEVICE T block_exclusive_scan(T v, T* total) {
    static_assert(kThreads % kGroup == 0, "whole groups only");
    __shared__ T group_sums[kThreads / kGroup];
    T x = v;
    for (int d = 1; d < kGroup; d <<= 1) {
        const T y = group_shfl_up(x, d);
        if (group_lane() >= d) x += y;
    }
    __syncthreads();  // a previous call may still be reading group_sums
    if (group_lane() == kGroup - 1) group_sums[group_index()] = x;
    __syncthreads();
    T before = 0, sum = 0;
    for (int g = 0; g < kThreads / kGroup; ++g) {
        before += g < group_index() ? group_sums[g] : T(0);
        sum += group_sums[g];
    }
    *total = sum;
    return before + x - v;
}

}  // namespace szp
