// szp CPU decoder: chunks in parallel (OpenMP), blocks in order inside a chunk, on the chosen decode path.
//
// This file holds the portable ("scalar") path, the choice of path and the parallel loop; the chunk loop is
// szp_decode_chunk.h, the AVX2 and AVX-512 blocks are szp_decode_avx2.cpp and szp_decode_avx512_block.h. Every
// path reconstructs each value with the same integer steps, one float32 multiply and the same rounding, so all
// write identical bytes.
// Every offset read from the payload is bounds-checked, so a malformed payload raises FormatError instead of
// reading out of bounds; well-formedness beyond that is the Blob checksum's job.
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>

#include "szp_codec.h"
#include "szp_simd.h"
#include "szp_decode_chunk.h"

namespace szp {

namespace {

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

// The portable block: magnitudes from the bit-planes, signs from the spread sign mask, then the
// reconstruction rule. Writes all 32 values to dst; returns the sign bits it took.
struct PortableBlock {
    template <class S, class O>
    static int run(const szp_u8* planes, int n_planes, szp_u64 window, float step, typename O::bits* dst) {
        const szp_u32 nz = nonzero_mask(planes, n_planes);
        u32x4 mag[kVecs];
        plane_magnitudes(planes, n_planes, mag);
        float v[kBlockValues];
        const u32x4 s = splat(spread_signs_by_table(window, nz));
        for (int j = 0; j < kVecs; ++j) {
            const i32x4 neg = (s & kLaneBit[j]) != 0;  // -1 where negative
            const f32x4 f = __builtin_convertvector((i32x4(mag[j]) ^ neg) - neg, f32x4) * step;
            if constexpr (kVectorEmit<S, O>) emit4<S, O>(f, dst + 4 * j);
            else std::memcpy(v + 4 * j, &f, sizeof(f));
        }
        if constexpr (!kVectorEmit<S, O>)
            for (int i = 0; i < kBlockValues; ++i) dst[i] = emit<S, O>(v[i]);
        return __builtin_popcount(nz);
    }
};

std::atomic<int> g_path{-1};  // -1: not chosen yet, the best path on first use

ChunkDecoder chunk_decoder(DecodePath path, int s, int o) {
    switch (path) {
        case DecodePath::kAvx512: return chunk_decoder_avx512(s, o);
        case DecodePath::kAvx2: return chunk_decoder_avx2(s, o);
        case DecodePath::kScalar: break;
    }
    return chunk_decoder_for<PortableBlock>(s, o);
}

// The chunk table starts at 0 and ends at the data's size (each chunk's decoder checks its own entries).
bool table_ends_agree(const szp_u8* payload, const Layout& l, const Header& h) {
    return load_u64(payload + l.table_off) == 0 && load_u64(payload + l.table_off + 8 * l.chunks) == h.data_bytes;
}

void decode_all(ChunkDecoder decode_one, const szp_u8* payload, const Layout& l, const Header& h, void* out) {
    std::atomic<bool> ok{table_ends_agree(payload, l, h)};
#pragma omp parallel for schedule(dynamic, 4) if (l.chunks >= kParallelMinChunks)
    for (long long c = 0; c < (long long)l.chunks; ++c)
        if (!decode_one(payload, l, h, szp_u64(c), out)) ok = false;
    if (!ok) throw FormatError("the szp payload's chunk table, rates and data disagree; the blob is corrupt");
}

}  // namespace

bool decode_path_supported(DecodePath path) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (path == DecodePath::kAvx512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2") &&
               chunk_decoder_avx512(kF32, kF32) != nullptr;
    if (path == DecodePath::kAvx2) return __builtin_cpu_supports("avx2") && chunk_decoder_avx2(kF32, kF32) != nullptr;
#endif
    return path == DecodePath::kScalar;
}

DecodePath best_decode_path() {
    for (DecodePath path : {DecodePath::kAvx512, DecodePath::kAvx2})
        if (decode_path_supported(path)) return path;
    return DecodePath::kScalar;
}

void set_decode_path(DecodePath path) { g_path.store(int(path)); }

DecodePath decode_path() {
    int path = g_path.load();
    if (path < 0) {
        path = int(best_decode_path());
        g_path.store(path);
    }
    return DecodePath(path);
}

const char* decode_path_name(DecodePath path) {
    switch (path) {
        case DecodePath::kAvx512: return "avx512";
        case DecodePath::kAvx2: return "avx2";
        case DecodePath::kScalar: break;
    }
    return "scalar";
}

DecodePath parse_decode_path(const char* name) {
    const std::string wanted(name);
    if (wanted == "auto") return best_decode_path();
    for (DecodePath path : {DecodePath::kScalar, DecodePath::kAvx2, DecodePath::kAvx512}) {
        if (wanted != decode_path_name(path)) continue;
        if (!decode_path_supported(path)) throw std::invalid_argument("this CPU cannot run the " + wanted + " path");
        return path;
    }
    throw std::invalid_argument("unknown szp decode path '" + wanted + "' (scalar, avx2, avx512 or auto)");
}

void decode(const szp_u8* payload, size_t size, void* out, int out_dtype) {
    const Header h = read_header(payload, size);
    if (out_dtype != kF32 && out_dtype != kF16 && out_dtype != kBF16) throw FormatError("unknown output dtype code");
    decode_all(chunk_decoder(decode_path(), h.dtype, out_dtype), payload, layout_for(h.n), h, out);
}

szp_u64 decode_chunk_count(const szp_u8* payload, size_t size) { return layout_for(read_header(payload, size).n).chunks; }

void decode_chunks(const szp_u8* payload, size_t size, void* out, int out_dtype, szp_u64 first, szp_u64 last) {
    const Header h = read_header(payload, size);
    if (out_dtype != kF32 && out_dtype != kF16 && out_dtype != kBF16) throw FormatError("unknown output dtype code");
    const Layout l = layout_for(h.n);
    if (first > last || last > l.chunks) throw std::invalid_argument("a chunk range past the payload's chunks");
    const ChunkDecoder decode_one = chunk_decoder(decode_path(), h.dtype, out_dtype);
    bool ok = table_ends_agree(payload, l, h);
    for (szp_u64 c = first; ok && c < last; ++c) ok = decode_one(payload, l, h, c, out);
    if (!ok) throw FormatError("the szp payload's chunk table, rates and data disagree; the blob is corrupt");
}

}  // namespace szp
