// The szp decoder's AVX2 path (see szp_codec.h, DecodePath).
//
// Compiled under `#pragma GCC target` with the chunk loop (szp_decode_chunk.h, anonymous namespace) included
// after it, so loop and block inline into one function per dtype pair, and no AVX2 copy of a shared inline
// function can reach the other paths at link time: the shared headers are included before the pragma. A block
// of 32 values decodes in byte lanes while its magnitudes fit 16 planes (planes 0-7 and 8-15 apart, each group
// by one bit-matrix transpose), in 32-bit lanes beyond. Signs are
// placed by table (pdep is slow on AMD before Zen 3); the float32 multiply and the rounding to the stored and
// output dtypes are the portable path's (szp_decode.cpp), lane for lane.
#include "szp_codec.h"

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx2,popcnt")
#include "szp_decode_chunk.h"
#include "szp_plane_bytes.h"

namespace szp {
namespace {

struct Avx2Block {
    // bf16 rounding (BF16::from_float) of 8 products q * step, left in the high 16 bits of each lane with the low
    // 16 zero. No NaN case: only 0 * inf makes a NaN here (the header refuses a NaN step), and x86 makes it the
    // default NaN 0xffc00000, which this rounds to the quiet NaN BF16::from_float gives (tests/test_codecs_szp.py).
    static __m256i bf16_round_high(__m256i u) {
        const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                                 _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
        return _mm256_and_si256(rounded, _mm256_set1_epi32(int(0xffff0000u)));
    }

    template <class S, class O>
    static constexpr bool kVectorEmit8 = S::kCode != kF16 && O::kCode != kF16;

    // Values 8g .. 8g + 7 as float32, emitted as O into dst (8 values), or kept in v for a scalar emit.
    template <class S, class O>
    static void emit8(__m256 f, typename O::bits* dst, float* v) {
        if constexpr (!kVectorEmit8<S, O>) {
            _mm256_storeu_ps(v, f);
        } else if constexpr (S::kCode == kF32 && O::kCode == kF32) {
            _mm256_storeu_ps(reinterpret_cast<float*>(dst), f);
        } else {
            const __m256i high = bf16_round_high(_mm256_castps_si256(f));
            if constexpr (O::kCode == kF32) {
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), high);
            } else {
                const __m256i r = _mm256_srli_epi32(high, 16);
                const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), packed);
            }
        }
    }

    template <class S, class O>
    static int run(const szp_u8* planes, int n_planes, szp_u64 window, float step, typename O::bits* dst) {
        __m256i mag[4];  // value 8g + l in lane l of mag[g]
        // in scalar code, so that the signs' table walk (spread_signs_by_table) need not wait for the transposes
        // (a tenth slower when it took nz from them)
        const szp_u32 nz = nonzero_mask(planes, n_planes);
        const __m256i bits32 = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        if (n_planes <= 8) {
            const __m256i bytes = plane_bytes(planes, n_planes);
            const __m128i low = _mm256_castsi256_si128(bytes), high = _mm256_extracti128_si256(bytes, 1);
            mag[0] = _mm256_cvtepu8_epi32(low);
            mag[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(low, 8));
            mag[2] = _mm256_cvtepu8_epi32(high);
            mag[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(high, 8));
        } else if (n_planes <= 16) {
            // planes 0-7 and 8-15 to bytes, then (low, high) bytes to 16-bit magnitudes: values 0-7 | 16-23, then
            // 8-15 | 24-31
            const __m256i low = plane_bytes(planes, 8), high = plane_bytes(planes + 32, n_planes - 8);
            const __m256i first = _mm256_unpacklo_epi8(low, high), second = _mm256_unpackhi_epi8(low, high);
            mag[0] = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(first));
            mag[1] = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(second));
            mag[2] = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(first, 1));
            mag[3] = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(second, 1));
        } else {
            for (int g = 0; g < 4; ++g) mag[g] = _mm256_setzero_si256();
            for (int p = n_planes - 1; p >= 0; --p) {
                szp_u32 w;
                std::memcpy(&w, planes + 4 * p, 4);
                for (int g = 0; g < 4; ++g) {
                    const __m256i word = _mm256_set1_epi32(int(w >> (8 * g)));
                    const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(word, bits32), bits32);
                    mag[g] = _mm256_sub_epi32(_mm256_add_epi32(mag[g], mag[g]), set);
                }
            }
        }
        const szp_u32 signs = spread_signs_by_table(window, nz);
        const __m256 step8 = _mm256_set1_ps(step);
        float v[kBlockValues];
        for (int g = 0; g < 4; ++g) {
            const __m256i neg = _mm256_cmpeq_epi32(
                _mm256_and_si256(_mm256_set1_epi32(int(signs >> (8 * g))), bits32), bits32);  // -1 where negative
            const __m256i q = _mm256_sub_epi32(_mm256_xor_si256(mag[g], neg), neg);
            emit8<S, O>(_mm256_mul_ps(_mm256_cvtepi32_ps(q), step8), dst + 8 * g, v + 8 * g);
        }
        if constexpr (!kVectorEmit8<S, O>)
            for (int i = 0; i < kBlockValues; ++i) dst[i] = emit<S, O>(v[i]);
        return __builtin_popcount(nz);
    }
};

}  // namespace

ChunkDecoder chunk_decoder_avx2(int s, int o) { return chunk_decoder_for<Avx2Block>(s, o); }

}  // namespace szp
#pragma GCC pop_options

#else

namespace szp {
ChunkDecoder chunk_decoder_avx2(int, int) { return nullptr; }
}  // namespace szp

#endif
