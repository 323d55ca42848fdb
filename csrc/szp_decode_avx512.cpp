// The szp decoder's AVX-512 path (see szp_codec.h, DecodePath): AVX-512F/BW, with BMI2's pdep for the signs.
//
// Built like the AVX2 path (szp_decode_avx2.cpp): the shared headers before `#pragma GCC target`, the chunk loop
// after it. Up to 8 planes go to bytes by one bit-matrix transpose (szp_plane_bytes.h); past that a plane word is
// a lane mask as it stands, so each plane costs one doubling and one masked add over 32 16-bit lanes (32-bit lanes
// past 16 planes). The float32 multiply and the rounding to the stored and output
// dtypes are the portable path's (szp_decode.cpp), lane for lane.
#include "szp_codec.h"

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx2,bmi2,popcnt")
#include "szp_decode_chunk.h"
#include "szp_plane_bytes.h"

namespace szp {
namespace {

struct Avx512Block {
    static szp_u32 spread(szp_u64 window, szp_u32 nz) { return _pdep_u32(szp_u32(window), nz); }

    // bf16 rounding (BF16::from_float) of 16 products q * step, in the high 16 bits of each lane with the low 16
    // zero; no NaN case, as on the AVX2 path (szp_decode_avx2.cpp bf16_round_high says why).
    static __m512i bf16_round_high(__m512i u) {
        const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
        return _mm512_and_si512(rounded, _mm512_set1_epi32(int(0xffff0000u)));
    }

    template <class S, class O>
    static constexpr bool kVectorEmit16 = S::kCode != kF16 && O::kCode != kF16;

    // 16 values as float32, emitted as O into dst, or kept in v for a scalar emit.
    template <class S, class O>
    static void emit16(__m512 f, typename O::bits* dst, float* v) {
        if constexpr (!kVectorEmit16<S, O>) {
            _mm512_storeu_ps(v, f);
        } else if constexpr (S::kCode == kF32 && O::kCode == kF32) {
            _mm512_storeu_ps(reinterpret_cast<float*>(dst), f);
        } else {
            const __m512i high = bf16_round_high(_mm512_castps_si512(f));
            if constexpr (O::kCode == kF32)
                _mm512_storeu_si512(dst, high);
            else
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(high, 16)));
        }
    }

    template <class S, class O>
    static void run(const szp_u8* planes, int n_planes, szp_u32 signs, float step, typename O::bits* dst) {
        __m512i mag[2];  // value 16h + l in lane l of mag[h]
        if (n_planes <= 8) {
            // one bit-matrix transpose for all planes (szp_plane_bytes.h): no loop over planes, whose trip count
            // (7 or 8 at rel 1e-3) the branch predictor misses often
            const __m256i bytes = plane_bytes(planes, n_planes);
            mag[0] = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(bytes));
            mag[1] = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(bytes, 1));
        } else if (n_planes <= 16) {
            const __m512i one = _mm512_set1_epi16(1);
            __m512i acc = _mm512_setzero_si512();  // value i in 16-bit lane i
            for (int p = n_planes - 1; p >= 0; --p) {
                szp_u32 w;
                std::memcpy(&w, planes + 4 * p, 4);
                const __m512i doubled = _mm512_add_epi16(acc, acc);
                acc = _mm512_mask_add_epi16(doubled, __mmask32(w), doubled, one);
            }
            mag[0] = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(acc));
            mag[1] = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(acc, 1));
        } else {
            const __m512i one = _mm512_set1_epi32(1);
            mag[0] = mag[1] = _mm512_setzero_si512();
            for (int p = n_planes - 1; p >= 0; --p) {
                szp_u32 w;
                std::memcpy(&w, planes + 4 * p, 4);
                for (int h = 0; h < 2; ++h) {
                    const __m512i doubled = _mm512_add_epi32(mag[h], mag[h]);
                    mag[h] = _mm512_mask_add_epi32(doubled, __mmask16(w >> (16 * h)), doubled, one);
                }
            }
        }
        const __m512 step16 = _mm512_set1_ps(step);
        float v[kBlockValues];
        for (int h = 0; h < 2; ++h) {
            const __m512i q = _mm512_mask_sub_epi32(mag[h], __mmask16(signs >> (16 * h)), _mm512_setzero_si512(), mag[h]);
            emit16<S, O>(_mm512_mul_ps(_mm512_cvtepi32_ps(q), step16), dst + 16 * h, v + 16 * h);
        }
        if constexpr (!kVectorEmit16<S, O>)
            for (int i = 0; i < kBlockValues; ++i) dst[i] = emit<S, O>(v[i]);
    }
};

}  // namespace

ChunkDecoder chunk_decoder_avx512(int s, int o) { return chunk_decoder_for<Avx512Block>(s, o); }

}  // namespace szp
#pragma GCC pop_options

#else

namespace szp {
ChunkDecoder chunk_decoder_avx512(int, int) { return nullptr; }
}  // namespace szp

#endif
