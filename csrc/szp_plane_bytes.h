// Bit planes to byte magnitudes with AVX2, for the szp decoder's x86 paths (szp_decode_avx2.cpp, szp_decode_avx512.cpp).
//
// Included after an ISA file's `#pragma GCC target` (AVX2 or wider), like szp_decode_chunk.h: each path gets its
// own copy, in an anonymous namespace.
#pragma once

#include <immintrin.h>

#include <cstring>

#include "szp_codec.h"

namespace szp {
namespace {

// Planes [0, n) of 8 (n <= 8; the others read as zero) as columns of bytes: qword j gathers byte j of every plane,
// plane p in byte p (kHighestFirst: in byte 7 - p), an 8x8 bit matrix (bit b of byte p: plane p's bit of value 8j + b).
template <bool kHighestFirst>
inline __m256i plane_byte_columns(const szp_u8* planes, int n) {
    // dword p: plane p (a plain load where all 8 are there: half the blocks at rel 1e-3)
    const __m256i words =
        n == 8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(planes))
               : _mm256_maskload_epi32(reinterpret_cast<const int*>(planes),
                                       _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    // in each half, dword j := byte j of its 4 planes (highest first if asked); then qword j := byte j of all 8
    const __m256i by_byte = kHighestFirst
        ? _mm256_shuffle_epi8(words, _mm256_setr_epi8(12, 8, 4, 0, 13, 9, 5, 1, 14, 10, 6, 2, 15, 11, 7, 3,
                                                      12, 8, 4, 0, 13, 9, 5, 1, 14, 10, 6, 2, 15, 11, 7, 3))
        : _mm256_shuffle_epi8(words, _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                                      0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    return kHighestFirst ? _mm256_permutevar8x32_epi32(by_byte, _mm256_setr_epi32(4, 0, 5, 1, 6, 2, 7, 3))
                         : _mm256_permutevar8x32_epi32(by_byte, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// One plane's bits as bytes: byte i is 1 where value i's bit is set, in ~5 instructions.
inline __m256i plane_bits(const szp_u8* plane) {
    szp_u32 word;
    std::memcpy(&word, plane, 4);
    // byte i := byte i / 8 of the word, then its bit i % 8
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(int(word)), _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2,
                                                       2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ull));
    return _mm256_min_epu8(_mm256_and_si256(spread, bit), _mm256_set1_epi8(1));
}

// Planes [0, n) of 8 (n <= 8; the others read as zero) to the 8-bit magnitudes they make: value i in byte i.
// Three rounds of swaps transpose each qword's bit matrix, so byte b holds value 8j + b's bits of every plane: ~20
// instructions for 8 planes against ~7 a plane for one plane at a time (at rel 1e-3 nearly every block has 7 or 8).
// A lone plane is spread without the transpose: the 9th plane of the AVX2 path's 9-16 plane blocks, a third of
// the embedded model's bfloat16 blocks at rel 1e-3 (the half-step grid's extra bit).
inline __m256i plane_bytes(const szp_u8* planes, int n) {
    if (n == 1) return plane_bits(planes);
    __m256i x = plane_byte_columns<false>(planes, n);
    // transpose each qword's 8x8 bit matrix (row = byte, column = bit): swap 1x1, then 2x2, then 4x4 blocks
    __m256i t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 7)), _mm256_set1_epi64x(0x00AA00AA00AA00AALL));
    x = _mm256_xor_si256(_mm256_xor_si256(x, t), _mm256_slli_epi64(t, 7));
    t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 14)), _mm256_set1_epi64x(0x0000CCCC0000CCCCLL));
    x = _mm256_xor_si256(_mm256_xor_si256(x, t), _mm256_slli_epi64(t, 14));
    t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 28)), _mm256_set1_epi64x(0x00000000F0F0F0F0LL));
    return _mm256_xor_si256(_mm256_xor_si256(x, t), _mm256_slli_epi64(t, 28));
}

}  // namespace
}  // namespace szp
