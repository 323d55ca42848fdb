// szp CPU encoder: two passes over chunks in parallel (sizes, then data), with a serial scan between them.
// Re-quantizing in pass 2 costs less than keeping 4 bytes of q per value between the passes.
#include <cstring>
#include <vector>

#include "szp_codec.h"
#include "szp_simd.h"

namespace szp {

namespace {

// One block's code: the rate byte, and for a non-raw block the integers and their nonzero count.
struct BlockCode {
    szp_u8 rate;
    int nnz;
    int q[kBlockValues];
};

// Codes one block on one grid; false if a value cannot be placed within eb. Values past the end of the
// tensor (last block) count as q = 0. The first loop is quantize()'s first candidate for every value,
// written branch-free so the compiler vectorizes it; quantize() itself redoes only the values it missed.
template <class S>
bool code_on_grid(const typename S::bits* x, int count, Grid g, double eb, BlockCode* bc) {
    double xs[kBlockValues];
    for (int i = 0; i < kBlockValues; ++i) xs[i] = i < count ? double(S::to_float(x[i])) : 0.0;
    szp_u32 missed = 0;  // bit i: value i needs quantize()'s second candidate
    for (int i = 0; i < kBlockValues; ++i) {
        bc->q[i] = nearest_q(xs[i], g);
        missed |= szp_u32(!within_bound<S>(bc->q[i], xs[i], g.step, eb)) << i;
    }
    for (; missed; missed &= missed - 1) {
        const int i = __builtin_ctz(missed);
        if (!quantize<S>(x[i], g, eb, &bc->q[i])) return false;
    }
    szp_u32 any_bits = 0;  // OR of magnitudes: its highest bit is the highest bit of the maximum
    int nnz = 0;
    for (int i = 0; i < kBlockValues; ++i) {
        any_bits |= bc->q[i] < 0 ? 0u - szp_u32(bc->q[i]) : szp_u32(bc->q[i]);
        nnz += bc->q[i] != 0;
    }
    bc->rate = szp_u8(rate_of(any_bits));
    bc->nnz = nnz;
    return true;
}

// The step grid, else the half-step grid, else raw: see quantize() in szp_format.h.
template <class S>
void code_block(const typename S::bits* x, int count, float step, double eb, BlockCode* bc) {
    if (code_on_grid<S>(x, count, make_grid(step), eb, bc)) return;
    if (code_on_grid<S>(x, count, make_grid(block_step(kHalfStepFlag, step)), eb, bc)) {
        bc->rate |= kHalfStepFlag;
        return;
    }
    bc->rate = kRawRate;
    bc->nnz = 0;
}

template <class S>
void sizes(const typename S::bits* x, szp_u64 n, float step, double eb, szp_u8* rates, szp_u64* chunk_bytes) {
    const Layout l = layout_for(n);
#pragma omp parallel for schedule(static) if (l.chunks >= kParallelMinChunks)
    for (long long c = 0; c < (long long)l.chunks; ++c) {
        BlockCode bc;
        szp_u64 bytes = 0, nnz = 0;
        const szp_u64 b0 = szp_u64(c) * kChunkBlocks;
        const szp_u64 b_end = b0 + kChunkBlocks < l.blocks ? b0 + kChunkBlocks : l.blocks;
        for (szp_u64 b = b0; b < b_end; ++b) {
            const szp_u64 base = b * kBlockValues;
            const int count = n - base < kBlockValues ? int(n - base) : kBlockValues;
            code_block<S>(x + base, count, step, eb, &bc);
            rates[b] = bc.rate;
            bytes += block_bytes(bc.rate, sizeof(typename S::bits));
            nnz += bc.nnz;
        }
        chunk_bytes[c] = bytes + 4 * ((nnz + 31) / 32);
    }
}

template <class S>
void data(const typename S::bits* x, szp_u64 n, float step, double eb, const szp_u8* rates,
          const szp_u64* offsets, szp_u8* out) {
    typedef typename S::bits T;
    const Layout l = layout_for(n);
#pragma omp parallel for schedule(static) if (l.chunks >= kParallelMinChunks)
    for (long long c = 0; c < (long long)l.chunks; ++c) {
        BlockCode bc;
        szp_u32 signs[kChunkValues / 32] = {};  // this chunk's sign stream, one bit per nonzero q
        szp_u32 sign_bits = 0;
        szp_u8* cursor = out + offsets[c];
        const szp_u64 b0 = szp_u64(c) * kChunkBlocks;
        const szp_u64 b_end = b0 + kChunkBlocks < l.blocks ? b0 + kChunkBlocks : l.blocks;
        for (szp_u64 b = b0; b < b_end; ++b) {
            const szp_u64 base = b * kBlockValues;
            const int count = n - base < kBlockValues ? int(n - base) : kBlockValues;
            if (rates[b] == kRawRate) {
                std::memcpy(cursor, x + base, count * sizeof(T));  // the tail past count stays zero
                cursor += kBlockValues * sizeof(T);
                continue;
            }
            code_block<S>(x + base, count, step, eb, &bc);
            const int planes = bc.rate & kMaxRate;
            u32x4 mag[kVecs];
            for (int j = 0; j < kVecs; ++j) {
                i32x4 q;
                std::memcpy(&q, bc.q + 4 * j, sizeof(q));
                mag[j] = u32x4(q < 0 ? -q : q);
            }
            for (int p = 0; p < planes; ++p) {
                u32x4 acc = {};  // lane l collects the plane bits of values l, 4 + l, 8 + l, ...
                for (int j = 0; j < kVecs; ++j) acc |= (u32x4{} - ((mag[j] >> p) & 1u)) & kLaneBit[j];
                const szp_u32 plane = acc[0] | acc[1] | acc[2] | acc[3];
                std::memcpy(cursor + 4 * p, &plane, 4);
            }
            cursor += 4 * planes;
            for (int i = 0; i < kBlockValues; ++i) {
                if (bc.q[i] == 0) continue;
                signs[sign_bits >> 5] |= szp_u32(bc.q[i] < 0) << (sign_bits & 31);
                ++sign_bits;
            }
        }
        std::memcpy(cursor, signs, 4 * ((sign_bits + 31) / 32));
    }
}

}  // namespace

double inv_step_of(float step) { return 1.0 / double(step); }

EncodePlan plan_encode(int dtype, const void* x, szp_u64 n, float step, double eb) {
    EncodePlan plan;
    plan.layout = layout_for(n);
    plan.rates.resize(plan.layout.blocks);
    plan.table.assign(plan.layout.chunks + 1, 0);
    szp_u64* chunk_bytes = plan.table.data() + 1;
    switch (dtype) {
        case kF32: sizes<F32>(static_cast<const szp_u32*>(x), n, step, eb, plan.rates.data(), chunk_bytes); break;
        case kF16: sizes<F16>(static_cast<const szp_u16*>(x), n, step, eb, plan.rates.data(), chunk_bytes); break;
        case kBF16: sizes<BF16>(static_cast<const szp_u16*>(x), n, step, eb, plan.rates.data(), chunk_bytes); break;
    }
    for (size_t c = 1; c < plan.table.size(); ++c) plan.table[c] += plan.table[c - 1];  // sizes -> offsets
    plan.header = Header{n, step, dtype, plan.table.back()};
    return plan;
}

void write_payload(const EncodePlan& plan, const void* x, double eb, szp_u8* out) {
    const Layout& l = plan.layout;
    const Header& h = plan.header;
    std::memset(out, 0, plan.payload_bytes());
    write_header(h, out);
    std::memcpy(out + l.table_off, plan.table.data(), 8 * plan.table.size());
    std::memcpy(out + l.rates_off, plan.rates.data(), plan.rates.size());
    const szp_u8* rates = plan.rates.data();
    const szp_u64* offsets = plan.table.data();
    szp_u8* region = out + l.data_off;
    switch (h.dtype) {
        case kF32: return data<F32>(static_cast<const szp_u32*>(x), h.n, h.step, eb, rates, offsets, region);
        case kF16: return data<F16>(static_cast<const szp_u16*>(x), h.n, h.step, eb, rates, offsets, region);
        case kBF16: return data<BF16>(static_cast<const szp_u16*>(x), h.n, h.step, eb, rates, offsets, region);
    }
}

}  // namespace szp
