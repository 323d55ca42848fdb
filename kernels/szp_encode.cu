// szp GPU encoder, byte-identical to the C++ encoder (csrc/szp_encode.cpp): three launches on one stream.
//
//   szp_encode_sizes_kernel   one thread block per chunk: rate byte of every block, data bytes of the chunk
//   szp_scan_chunks_kernel    one thread block: chunk sizes -> chunk offsets, in place in the chunk table
//   szp_encode_data_kernel    one thread block per chunk: planes, raw blocks and the sign stream
// In: n values of dtype S on the device. Out: the caller's zeroed buffer laid out as in szp_format.h (the
// host writes the 32-byte header). The only scratch is shared memory.
#include "block_scan.cuh"

namespace szp {

// The block held by a group (value `lane` in each lane), coded like code_block() on the CPU: the step grid,
// else the half-step grid, else raw. Returns the rate byte; *q gets this lane's integer (0 if raw).
template <class S>
SZP_DEVICE szp_u8 code_group(typename S::bits x, bool valid, float step, double eb, int* q) {
    for (int half = 0; half < 2; ++half) {
        const float s = half ? block_step(kHalfStepFlag, step) : step;
        int qi = 0;
        const bool ok = !valid || quantize<S>(x, make_grid(s), eb, &qi);
        if (group_ballot(!ok) == 0) {
            *q = valid ? qi : 0;
            const szp_u32 mag = *q < 0 ? 0u - szp_u32(*q) : szp_u32(*q);
            return szp_u8(rate_of(group_or(mag)) | (half ? kHalfStepFlag : 0));
        }
    }
    *q = 0;
    return kRawRate;
}

}  // namespace szp

template <class S>
__global__ void __launch_bounds__(szp::kChunkThreads)
szp_encode_sizes_kernel(const typename S::bits* __restrict__ x, szp_u64 n, float step, double eb,
                        szp_u8* __restrict__ rates, szp_u64* __restrict__ chunk_bytes) {
    using namespace szp;
    constexpr int kGroups = kChunkThreads / kGroup;
    __shared__ szp_u32 s_bytes[kGroups], s_nnz[kGroups];
    const Layout l = layout_for(n);
    const szp_u64 chunk = blockIdx.x, first = chunk * kChunkBlocks;
    const int lane = group_lane();
    szp_u32 bytes = 0, nnz = 0;  // this group's share of the chunk
    for (int j = group_index(); j < kChunkBlocks && first + j < l.blocks; j += kGroups) {
        const szp_u64 idx = (first + j) * kBlockValues + lane;
        int q;
        const szp_u8 r = code_group<S>(idx < n ? x[idx] : typename S::bits(0), idx < n, step, eb, &q);
        if (lane == 0) rates[first + j] = r;
        bytes += block_bytes(r, sizeof(typename S::bits));
        nnz += popc(group_ballot(q != 0));
    }
    if (lane == 0) {
        s_bytes[group_index()] = bytes;
        s_nnz[group_index()] = nnz;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        szp_u64 total = 0, total_nnz = 0;
        for (int g = 0; g < kGroups; ++g) {
            total += s_bytes[g];
            total_nnz += s_nnz[g];
        }
        chunk_bytes[chunk] = total + 4 * ((total_nnz + 31) / 32);
    }
}

// Inclusive scan of `count` chunk sizes in place: entry c becomes the offset of chunk c + 1.
__global__ void __launch_bounds__(szp::kChunkThreads)
szp_scan_chunks_kernel(szp_u64* __restrict__ sizes, szp_u64 count) {
    using namespace szp;
    szp_u64 carry = 0;
    for (szp_u64 base = 0; base < count; base += kChunkThreads) {
        const szp_u64 i = base + threadIdx.x;
        const szp_u64 v = i < count ? sizes[i] : 0;
        szp_u64 tile_total;
        const szp_u64 before = block_exclusive_scan<kChunkThreads>(v, &tile_total);
        if (i < count) sizes[i] = carry + before + v;
        carry += tile_total;
    }
}

template <class S>
__global__ void __launch_bounds__(szp::kChunkThreads)
szp_encode_data_kernel(const typename S::bits* __restrict__ x, szp_u64 n, float step, double eb,
                       const szp_u8* __restrict__ rates, const szp_u64* __restrict__ table,
                       szp_u8* __restrict__ data) {
    using namespace szp;
    typedef typename S::bits T;
    constexpr int kGroups = kChunkThreads / kGroup;
    __shared__ int s_q[kChunkValues];                // 32 KiB: each value is quantized once in this kernel
    __shared__ szp_u32 s_signs[kChunkValues / 32];   // the chunk's sign stream, assembled bit by bit
    __shared__ szp_u32 s_off[kChunkBlocks], s_sign[kChunkBlocks];
    const Layout l = layout_for(n);
    const szp_u64 chunk = blockIdx.x, first = chunk * kChunkBlocks;
    const int t = threadIdx.x, lane = group_lane();

    // 1. Integers of every block, and each block's nonzero count (parked in s_sign until the scan).
    for (int j = group_index(); j < kChunkBlocks && first + j < l.blocks; j += kGroups) {
        const szp_u64 idx = (first + j) * kBlockValues + lane;
        int q;
        code_group<S>(idx < n ? x[idx] : T(0), idx < n, step, eb, &q);
        s_q[j * kBlockValues + lane] = q;
        const szp_u32 nnz = popc(group_ballot(q != 0));
        if (lane == 0) s_sign[j] = nnz;
    }
    s_signs[t] = 0;
    __syncthreads();

    // 2. Block byte offsets and sign-stream offsets: the same two scans the decoder does.
    const bool mine = first + t < l.blocks;
    const szp_u8 rate = mine ? rates[first + t] : szp_u8(0);
    szp_u32 plane_bytes, sign_bits;
    const szp_u32 off = block_exclusive_scan<kChunkThreads>(block_bytes(rate, sizeof(T)), &plane_bytes);
    const szp_u32 sign0 = block_exclusive_scan<kChunkThreads>(mine ? s_sign[t] : 0u, &sign_bits);
    s_off[t] = off;
    s_sign[t] = sign0;
    __syncthreads();

    // 3. Planes (lane p stores plane p) or raw values, and sign bits into shared memory.
    szp_u8* dst = data + table[chunk];
    for (int j = group_index(); j < kChunkBlocks && first + j < l.blocks; j += kGroups) {
        const szp_u64 idx = (first + j) * kBlockValues + lane;
        const szp_u8 r = rates[first + j];
        szp_u8* block = dst + s_off[j];
        if (r == kRawRate) {
            reinterpret_cast<T*>(block)[lane] = idx < n ? x[idx] : T(0);
            continue;
        }
        const int q = s_q[j * kBlockValues + lane];
        const szp_u32 mag = q < 0 ? 0u - szp_u32(q) : szp_u32(q);
        const int planes = r & kMaxRate;
        szp_u32 word = 0;
        for (int p = 0; p < planes; ++p) {
            const szp_u32 plane = group_ballot((mag >> p) & 1u);
            word = lane == p ? plane : word;
        }
        if (lane < planes) reinterpret_cast<szp_u32*>(block)[lane] = word;
        const szp_u32 nonzero = group_ballot(q != 0);
        if (q < 0) {
            const szp_u32 bit = s_sign[j] + popc(nonzero & lanemask_lt());
            atomicOr(&s_signs[bit >> 5], 1u << (bit & 31));
        }
    }
    __syncthreads();
    szp_u32* sign_words = reinterpret_cast<szp_u32*>(dst + plane_bytes);
    for (szp_u32 i = t; i < (sign_bits + 31) / 32; i += kChunkThreads) sign_words[i] = s_signs[i];
}
