// szp GPU decoder: one thread block per chunk of 256 szp blocks, writing the caller's output tensor.
//
// In: the payload on the device (layout in szp_format.h), n, the grid step. Out: n values of dtype O.
// No workspace: block offsets come from an in-block prefix sum over the chunk's rate bytes, sign offsets
// from a second one over the blocks' nonzero counts. Every output value is written (no zero-fill pass).
#include "block_scan.cuh"

template <class S, class O>
__global__ void __launch_bounds__(szp::kChunkThreads)
szp_decode_kernel(const szp_u8* __restrict__ payload, szp_u64 n, float step, typename O::bits* __restrict__ out) {
    using namespace szp;
    typedef typename S::bits T;
    __shared__ szp_u32 s_off[kChunkBlocks];   // byte offset of each block's planes in the chunk
    __shared__ szp_u32 s_sign[kChunkBlocks];  // first bit of each block in the chunk's sign stream
    __shared__ szp_u8 s_rate[kChunkBlocks];

    const Layout l = layout_for(n);
    const szp_u64 chunk = blockIdx.x, first = chunk * kChunkBlocks;
    const szp_u8* data = payload + l.data_off + reinterpret_cast<const szp_u64*>(payload + l.table_off)[chunk];

    // Thread t owns block first + t for the two scans.
    const int t = threadIdx.x;
    const szp_u8 rate = first + t < l.blocks ? payload[l.rates_off + first + t] : szp_u8(0);
    szp_u32 plane_bytes;
    const szp_u32 off = block_exclusive_scan<kChunkThreads>(block_bytes(rate, sizeof(T)), &plane_bytes);
    szp_u32 nz = 0;  // the OR of a block's planes marks its nonzero values; raw blocks have no sign bits
    if (rate != kRawRate)
        for (int p = 0; p < (rate & kMaxRate); ++p) nz |= reinterpret_cast<const szp_u32*>(data + off)[p];
    szp_u32 sign_bits;
    const szp_u32 sign0 = block_exclusive_scan<kChunkThreads>(szp_u32(popc(nz)), &sign_bits);
    s_off[t] = off;
    s_sign[t] = sign0;
    s_rate[t] = rate;
    __syncthreads();

    // Each group decodes every 8th block, one value per lane, so a warp's stores are contiguous.
    const szp_u32* signs = reinterpret_cast<const szp_u32*>(data + plane_bytes);
    const int lane = group_lane();
    for (int j = group_index(); j < kChunkBlocks && first + j < l.blocks; j += kChunkThreads / kGroup) {
        const szp_u8 r = s_rate[j];
        const szp_u8* src = data + s_off[j];
        typename O::bits v;
        if (r == kRawRate) {
            v = emit<S, O>(S::to_float(reinterpret_cast<const T*>(src)[lane]));  // raw blocks hold all 32 values
        } else {
            const int planes = r & kMaxRate;
            const szp_u32 word = lane < planes ? reinterpret_cast<const szp_u32*>(src)[lane] : 0u;
            szp_u32 mag = 0;
            for (int p = 0; p < planes; ++p) mag |= ((group_shfl(word, p) >> lane) & 1u) << p;
            const szp_u32 nonzero = group_ballot(mag != 0);
            int q = int(mag);
            if (mag != 0) {
                const szp_u32 bit = s_sign[j] + popc(nonzero & lanemask_lt());
                if ((signs[bit >> 5] >> (bit & 31)) & 1u) q = -q;
            }
            v = emit<S, O>(grid_value(q, block_step(r, step)));
        }
        const szp_u64 idx = (first + j) * kBlockValues + lane;
        if (idx < n) out[idx] = v;
    }
}
