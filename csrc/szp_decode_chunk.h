// The szp chunk loop, shared by the decoder's instruction-set paths (szp_decode.cpp, szp_decode_avx2.cpp,
// szp_decode_avx512*.cpp).
//
// In:  one chunk of a payload (its table entries, rate bytes, planes and sign stream) and a Block policy that
//      decodes one coded block: Block::run<S, O>(planes, n_planes, window, step, dst) writes its 32 values, taking
//      one sign bit from the low end of window per nonzero value, and returns how many it took.
// Out: the chunk's values in out, or false where the chunk's bytes disagree with its rates and table.
//
// Everything here is in an anonymous namespace and included after an ISA file's `#pragma GCC target`, so each
// path gets its own copy compiled (and inlined) for its instruction set, and no copy can stand in for another
// at link time. Every offset read from the payload is bounds-checked.
#pragma once

#include <cstring>

#include "szp_codec.h"

namespace szp {
namespace {

inline szp_u32 load_u32(const szp_u8* p) {
    szp_u32 v;
    std::memcpy(&v, p, 4);
    return v;
}

inline szp_u64 load_u64(const szp_u8* p) {
    szp_u64 v;
    std::memcpy(&v, p, 8);
    return v;
}

// Bit i set iff value i of a block is nonzero: the OR of its planes, in scalar code.
inline szp_u32 nonzero_mask(const szp_u8* planes, int n_planes) {
    szp_u32 nz = 0;
    for (int p = 0; p < n_planes; ++p) nz |= load_u32(planes + 4 * p);
    return nz;
}

// 64 bits of the sign stream starting at byte `byte`, zero past `len` (the stream is only 4-byte padded).
inline szp_u64 sign_window(const szp_u8* signs, szp_u64 byte, szp_u64 len) {
    if (len - byte >= 8) return load_u64(signs + byte);  // a fixed-size load, not a memcpy call per block
    szp_u64 w = 0;
    std::memcpy(&w, signs + byte, len - byte);
    return w;
}

// kSpread.bits[m][w]: the low bits of w moved onto the set bits of the 4-bit mask m (a 4-bit pdep).
struct SpreadTable {
    szp_u8 bits[16][16];
    constexpr SpreadTable() : bits() {
        for (int m = 0; m < 16; ++m)
            for (int w = 0; w < 16; ++w)
                for (int i = 0, k = 0; i < 4; ++i)
                    if (m >> i & 1) bits[m][w] |= szp_u8(((w >> k++) & 1) << i);
    }
};
constexpr SpreadTable kSpread;

// The sign stream holds one bit per nonzero value; move those bits onto the positions set in nz (a pdep),
// four positions at a time, for CPUs without a fast pdep instruction.
inline szp_u32 spread_signs_by_table(szp_u64 window, szp_u32 nz) {
    if (nz == 0xffffffffu) return szp_u32(window);
    szp_u32 s = 0;
    for (int shift = 0; shift < kBlockValues; shift += 4) {
        const szp_u32 m = (nz >> shift) & 15u;
        s |= szp_u32(kSpread.bits[m][window & 15u]) << shift;
        window >>= (0x4332322132212110ull >> (4 * m)) & 15u;  // popcount of the nibble m
    }
    return s;
}

// Decodes chunk c; returns false if its bytes are inconsistent with its rates and table entries.
template <class Block, class S, class O>
bool decode_chunk(const szp_u8* payload, const Layout& l, const Header& h, szp_u64 c, void* out_values) {
    typedef typename S::bits T;
    typename O::bits* out = static_cast<typename O::bits*>(out_values);
    const szp_u64 off0 = load_u64(payload + l.table_off + 8 * c), off1 = load_u64(payload + l.table_off + 8 * (c + 1));
    if (off0 > off1 || off1 > h.data_bytes) return false;
    const szp_u64 b0 = c * kChunkBlocks, b_end = b0 + kChunkBlocks < l.blocks ? b0 + kChunkBlocks : l.blocks;
    const szp_u8* rates = payload + l.rates_off;
    szp_u64 plane_bytes = 0;
    for (szp_u64 b = b0; b < b_end; ++b) {
        if (!rate_is_valid(rates[b])) return false;
        plane_bytes += block_bytes(rates[b], sizeof(T));
    }
    if (plane_bytes > off1 - off0) return false;
    const szp_u8* cursor = payload + l.data_off + off0;
    const szp_u8* signs = cursor + plane_bytes;
    const szp_u64 sign_len = off1 - off0 - plane_bytes;
    szp_u64 sign_pos = 0;  // bit index into this chunk's sign stream
    for (szp_u64 b = b0; b < b_end; ++b) {
        const szp_u64 base = b * kBlockValues;
        const int count = h.n - base < kBlockValues ? int(h.n - base) : kBlockValues;
        typename O::bits* dst = out + base;
        if (rates[b] == kRawRate) {
            for (int i = 0; i < count; ++i) {
                T v;
                std::memcpy(&v, cursor + i * sizeof(T), sizeof(T));
                dst[i] = emit<S, O>(S::to_float(v));
            }
            cursor += kBlockValues * sizeof(T);
            continue;
        }
        const int n_planes = rates[b] & kMaxRate;
        // the sign bits from this block's first on; the block takes one per nonzero value
        const szp_u64 window = sign_window(signs, sign_pos >> 3, sign_len) >> (sign_pos & 7);
        const float step = block_step(rates[b], h.step);
        int nnz;
        if (count == kBlockValues) {
            nnz = Block::template run<S, O>(cursor, n_planes, window, step, dst);
        } else {
            typename O::bits tail[kBlockValues];
            nnz = Block::template run<S, O>(cursor, n_planes, window, step, tail);
            std::memcpy(dst, tail, count * sizeof(tail[0]));
        }
        sign_pos += nnz;
        if (sign_pos > 8 * sign_len) return false;
        cursor += 4 * n_planes;
    }
    return 4 * ((sign_pos + 31) / 32) == sign_len;
}

// The chunk decoder of one path for the stored dtype s and output dtype o (both valid codes).
template <class Block>
ChunkDecoder chunk_decoder_for(int s, int o) {
    static constexpr ChunkDecoder kTable[3][3] = {
        {decode_chunk<Block, F32, F32>, decode_chunk<Block, F32, F16>, decode_chunk<Block, F32, BF16>},
        {decode_chunk<Block, F16, F32>, decode_chunk<Block, F16, F16>, decode_chunk<Block, F16, BF16>},
        {decode_chunk<Block, BF16, F32>, decode_chunk<Block, BF16, F16>, decode_chunk<Block, BF16, BF16>},
    };
    return kTable[s][o];
}

}  // namespace
}  // namespace szp
