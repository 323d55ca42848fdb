// szp CPU decoder: chunks in parallel (OpenMP), blocks in order inside a chunk.
//
// Every offset read from the payload is bounds-checked, so a malformed payload raises FormatError instead of
// reading out of bounds; well-formedness beyond that is the Blob checksum's job.
#include <atomic>
#include <cstring>

#include "szp_codec.h"
#include "szp_simd.h"

namespace szp {

namespace {

szp_u32 load_u32(const szp_u8* p) {
    szp_u32 v;
    std::memcpy(&v, p, 4);
    return v;
}

szp_u64 load_u64(const szp_u8* p) {
    szp_u64 v;
    std::memcpy(&v, p, 8);
    return v;
}

// 64 bits of the sign stream starting at byte `byte`, zero past `len` (the stream is only 4-byte padded).
szp_u64 sign_window(const szp_u8* signs, szp_u64 byte, szp_u64 len) {
    szp_u64 w = 0;
    std::memcpy(&w, signs + byte, len - byte < 8 ? len - byte : 8);
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
// four positions at a time.
szp_u32 spread_signs(szp_u64 window, szp_u32 nz) {
    if (nz == 0xffffffffu) return szp_u32(window);
    szp_u32 s = 0;
    for (int shift = 0; shift < kBlockValues; shift += 4) {
        const szp_u32 m = (nz >> shift) & 15u;
        s |= szp_u32(kSpread.bits[m][window & 15u]) << shift;
        window >>= (0x4332322132212110ull >> (4 * m)) & 15u;  // popcount of the nibble m
    }
    return s;
}

// kByteLanes.lanes[b]: the 8 bits of byte b, one per 16-bit lane (lane l = bit l).
struct ByteLaneTable {
    alignas(16) szp_u16 lanes[256][8];
    constexpr ByteLaneTable() : lanes() {
        for (int b = 0; b < 256; ++b)
            for (int l = 0; l < 8; ++l) lanes[b][l] = szp_u16((b >> l) & 1);
    }
};
constexpr ByteLaneTable kByteLanes;

// Magnitudes of a block from its bit-planes (bit i of plane p is bit p of value i), value 4j + l in lane l of
// mag[j]. Up to 16 planes, each plane byte looks its 8 bits up as 8 16-bit lanes and shifts them into place:
// 4 table loads per plane instead of 8 mask-and-compare steps (a third faster decode on x86-64 SSE2).
inline void plane_magnitudes(const szp_u8* planes, int n_planes, u32x4 mag[kVecs]) {
    if (n_planes <= 16) {
        u16x8 acc[kBlockValues / 8] = {};  // value 8k + l in lane l of acc[k]
        for (int p = n_planes - 1; p >= 0; --p) {
            const szp_u32 w = load_u32(planes + 4 * p);
            for (int k = 0; k < kBlockValues / 8; ++k) {
                u16x8 bits;
                std::memcpy(&bits, kByteLanes.lanes[(w >> (8 * k)) & 255u], sizeof(bits));
                acc[k] = (acc[k] << 1) | bits;
            }
        }
        for (int j = 0; j < kVecs; ++j) {
            u16x4 half;
            std::memcpy(&half, reinterpret_cast<const szp_u16*>(acc) + 4 * j, sizeof(half));
            mag[j] = __builtin_convertvector(half, u32x4);
        }
        return;
    }
    for (int j = 0; j < kVecs; ++j) mag[j] = u32x4{};
    for (int p = 0; p < n_planes; ++p) {
        const u32x4 w = splat(load_u32(planes + 4 * p)), bit = splat(1u << p);
        for (int j = 0; j < kVecs; ++j) mag[j] |= u32x4((w & kLaneBit[j]) != 0) & bit;
    }
}

// One coded block: magnitudes from the bit-planes, signs from the spread sign mask, then the reconstruction
// rule. Writes all 32 values to dst.
template <class S, class O>
void decode_block(const szp_u8* planes, int n_planes, szp_u32 signs, float step, typename O::bits* dst) {
    u32x4 mag[kVecs];
    plane_magnitudes(planes, n_planes, mag);
    float v[kBlockValues];
    const u32x4 s = splat(signs);
    for (int j = 0; j < kVecs; ++j) {
        const i32x4 neg = (s & kLaneBit[j]) != 0;  // -1 where negative
        const f32x4 f = __builtin_convertvector((i32x4(mag[j]) ^ neg) - neg, f32x4) * step;
        if constexpr (kVectorEmit<S, O>) emit4<S, O>(f, dst + 4 * j);
        else std::memcpy(v + 4 * j, &f, sizeof(f));
    }
    if constexpr (!kVectorEmit<S, O>)
        for (int i = 0; i < kBlockValues; ++i) dst[i] = emit<S, O>(v[i]);
}

// Decodes chunk c; returns false if its bytes are inconsistent with its rates and table entries.
template <class S, class O>
bool decode_chunk(const szp_u8* payload, const Layout& l, const Header& h, szp_u64 c, typename O::bits* out) {
    typedef typename S::bits T;
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
        szp_u32 nz = 0;  // bit i set iff value i is nonzero: the OR of the planes
        for (int p = 0; p < n_planes; ++p) nz |= load_u32(cursor + 4 * p);
        const int nnz = __builtin_popcount(nz);
        if (sign_pos + nnz > 8 * sign_len) return false;
        const szp_u64 window = nnz ? sign_window(signs, sign_pos >> 3, sign_len) >> (sign_pos & 7) : 0;
        const float step = block_step(rates[b], h.step);
        if (count == kBlockValues) {
            decode_block<S, O>(cursor, n_planes, spread_signs(window, nz), step, dst);
        } else {
            typename O::bits tail[kBlockValues];
            decode_block<S, O>(cursor, n_planes, spread_signs(window, nz), step, tail);
            std::memcpy(dst, tail, count * sizeof(tail[0]));
        }
        cursor += 4 * n_planes;
        sign_pos += nnz;
    }
    return 4 * ((sign_pos + 31) / 32) == sign_len;
}

template <class S, class O>
void decode_all(const szp_u8* payload, const Layout& l, const Header& h, void* out) {
    std::atomic<bool> ok{load_u64(payload + l.table_off) == 0 &&
                         load_u64(payload + l.table_off + 8 * l.chunks) == h.data_bytes};
#pragma omp parallel for schedule(dynamic, 4) if (l.chunks >= kParallelMinChunks)
    for (long long c = 0; c < (long long)l.chunks; ++c)
        if (!decode_chunk<S, O>(payload, l, h, c, static_cast<typename O::bits*>(out))) ok = false;
    if (!ok) throw FormatError("the szp payload's chunk table, rates and data disagree; the blob is corrupt");
}

template <class S>
void decode_to(const szp_u8* payload, const Layout& l, const Header& h, void* out, int out_dtype) {
    switch (out_dtype) {
        case kF32: return decode_all<S, F32>(payload, l, h, out);
        case kF16: return decode_all<S, F16>(payload, l, h, out);
        case kBF16: return decode_all<S, BF16>(payload, l, h, out);
    }
    throw FormatError("unknown output dtype code");
}

}  // namespace

void decode(const szp_u8* payload, size_t size, void* out, int out_dtype) {
    const Header h = read_header(payload, size);
    const Layout l = layout_for(h.n);
    switch (h.dtype) {
        case kF32: return decode_to<F32>(payload, l, h, out, out_dtype);
        case kF16: return decode_to<F16>(payload, l, h, out, out_dtype);
        case kBF16: return decode_to<BF16>(payload, l, h, out, out_dtype);
    }
}

}  // namespace szp
