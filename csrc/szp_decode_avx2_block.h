// The AVX2 block of the szp decoder (szp_codec.h DecodePath::kAvx2), for the translation units that compile it under
// their instruction sets: szp_decode_avx2.cpp (AVX2; signs placed by table) and szp_decode_avx2_bmi2.cpp (+ BMI2's
// pdep, chosen where pdep is fast: Intel, and AMD from Zen 3 on; Zen 1 and 2 run it in microcode, ~10x slower than
// the table). A unit's `#pragma GCC target` names only the features its CPUs have.
//
// Included after that pragma, with szp_decode_chunk.h and szp_plane_bytes.h, like them: everything here is in an
// anonymous namespace, one copy per unit. A block of 32 values decodes in byte lanes while its magnitudes fit 8
// planes (one bit-matrix transpose), in 16-bit lanes up to 16 (two), in 32-bit lanes beyond. The float32 multiply
// and the rounding to the stored and output dtypes are the portable path's (szp_decode.cpp), lane for lane; a
// value's sign is applied after both, which are symmetric, so the bits are those of the signed product.
// Decode speed, the embedded model's experts at rel 1e-3 (bfloat16 stored and out, one thread, Zen 4): 24.8 us an
// expert with the sign applied before the multiply and 8 values a store, 21.7 us after (table), 21.0 us (pdep); 19.4
// and 18.6 us with a lone 9th plane spread to bytes without a transpose and 8 planes read by a plain load
// (szp_plane_bytes.h).
#pragma once

// <immintrin.h>, <cstring> and szp_codec.h come before the unit's pragma (shared headers must not be compiled for
// one instruction set only).

namespace szp {
namespace {

// kPdep: the unit has BMI2, and signs are placed by pdep instead of the table (spread_signs_by_table).
template <bool kPdep>
struct Avx2Block {
    // BF16::from_float's rounding of 8 float32 products: the rounded value is in the high 16 bits of each lane,
    // above 16 bits to ignore. No NaN case: only 0 * inf makes a NaN here (the header refuses a NaN step), and x86
    // makes it the default NaN 0xffc00000, which this rounds to the quiet NaN BF16::from_float gives
    // (tests/test_codecs_szp.py).
    static __m256i bf16_round_high(__m256 f) {
        const __m256i u = _mm256_castps_si256(f);
        return _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
    }

    // Bit 31 of lane l: bit 8g + l of signs32's lanes (the other bits are not cleared).
    static __m256i sign_bits32(__m256i signs32, int g) {
        const __m256i shift =
            _mm256_sub_epi32(_mm256_set1_epi32(31 - 8 * g), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        return _mm256_sllv_epi32(signs32, shift);
    }

    template <class S, class O>
    static constexpr bool kVectorEmit = S::kCode != kF16 && O::kCode != kF16;

    // The block's 32 values from their magnitudes (value 8g + l in lane l of mag[g]) and signs (bit i: value i is
    // negative; never set for a zero), emitted as O into dst. A product's sign is applied after the multiply and the
    // bfloat16 rounding, both of which are symmetric, so the bits are those of the signed product.
    template <class S, class O>
    static void emit32(const __m256i mag[4], szp_u32 signs, float step, typename O::bits* dst) {
        const __m256 step8 = _mm256_set1_ps(step);
        const __m256i signs32 = _mm256_set1_epi32(int(signs));
        if constexpr (!kVectorEmit<S, O>) {
            float v[kBlockValues];
            for (int g = 0; g < 4; ++g) {
                const __m256i neg = _mm256_srai_epi32(sign_bits32(signs32, g), 31);  // -1 where negative
                const __m256i q = _mm256_sub_epi32(_mm256_xor_si256(mag[g], neg), neg);
                _mm256_storeu_ps(v + 8 * g, _mm256_mul_ps(_mm256_cvtepi32_ps(q), step8));
            }
            for (int i = 0; i < kBlockValues; ++i) dst[i] = emit<S, O>(v[i]);
        } else if constexpr (O::kCode == kF32) {
            const __m256i sign_bit = _mm256_set1_epi32(int(0x80000000u));
            const __m256i high_half = _mm256_set1_epi32(int(0xffff0000u));
            for (int g = 0; g < 4; ++g) {
                const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(mag[g]), step8);
                // float32 stored: the product; bfloat16 stored: its rounding, widened exactly
                const __m256i bits = S::kCode == kF32 ? _mm256_castps_si256(f)
                                                      : _mm256_and_si256(bf16_round_high(f), high_half);
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst) + g,
                                    _mm256_or_si256(bits, _mm256_and_si256(sign_bits32(signs32, g), sign_bit)));
            }
        } else {  // bfloat16 out, 16 values a store
            // bit i of a 16-bit word to bit 15 of lane i: a multiply by 2^(15 - i)
            const __m256i to_top = _mm256_setr_epi16(-32768, 16384, 8192, 4096, 2048, 1024, 512, 256, 128, 64, 32, 16,
                                                     8, 4, 2, 1);
            const __m256i sign_bit = _mm256_set1_epi16(-32768);
            for (int h = 0; h < 2; ++h) {
                const __m256 first = _mm256_mul_ps(_mm256_cvtepi32_ps(mag[2 * h]), step8);
                const __m256 second = _mm256_mul_ps(_mm256_cvtepi32_ps(mag[2 * h + 1]), step8);
                const __m256i low = _mm256_srli_epi32(bf16_round_high(first), 16);
                const __m256i high = _mm256_srli_epi32(bf16_round_high(second), 16);
                // packus interleaves the 128-bit halves (values 0-3, 8-11, 4-7, 12-15); the permute restores order
                const __m256i rounded = _mm256_permute4x64_epi64(_mm256_packus_epi32(low, high), 0xd8);
                const __m256i neg = _mm256_and_si256(
                    _mm256_mullo_epi16(_mm256_set1_epi16(short(signs >> (16 * h))), to_top), sign_bit);
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst) + h, _mm256_or_si256(rounded, neg));
            }
        }
    }

    template <class S, class O>
    static int run(const szp_u8* planes, int n_planes, szp_u64 window, float step, typename O::bits* dst) {
        __m256i mag[4];  // value 8g + l in lane l of mag[g]
        szp_u32 signs, nz;
        if (n_planes <= 8) {
            const __m256i bytes = plane_bytes(planes, n_planes);
            const __m128i low = _mm256_castsi256_si128(bytes), high = _mm256_extracti128_si256(bytes, 1);
            mag[0] = _mm256_cvtepu8_epi32(low);
            mag[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(low, 8));
            mag[2] = _mm256_cvtepu8_epi32(high);
            mag[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(high, 8));
            // for pdep from the magnitudes; the table walk starts sooner from the planes in scalar code (a tenth
            // slower when it took nz from the transpose)
            if constexpr (kPdep) nz = ~szp_u32(_mm256_movemask_epi8(_mm256_cmpeq_epi8(bytes, _mm256_setzero_si256())));
            else nz = nonzero_mask(planes, n_planes);
        } else if (n_planes <= 16) {
            nz = nonzero_mask(planes, n_planes);
            // planes 0-7 and 8-15 to bytes, then (low, high) bytes to 16-bit magnitudes: values 0-7 | 16-23, then
            // 8-15 | 24-31
            const __m256i low = plane_bytes(planes, 8), high = plane_bytes(planes + 32, n_planes - 8);
            const __m256i first = _mm256_unpacklo_epi8(low, high), second = _mm256_unpackhi_epi8(low, high);
            mag[0] = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(first));
            mag[1] = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(second));
            mag[2] = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(first, 1));
            mag[3] = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(second, 1));
        } else {
            nz = nonzero_mask(planes, n_planes);
            const __m256i bits32 = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
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
        if constexpr (kPdep) signs = _pdep_u32(szp_u32(window), nz);
        else signs = spread_signs_by_table(window, nz);
        emit32<S, O>(mag, signs, step, dst);
        return __builtin_popcount(nz);
    }
};

}  // namespace
}  // namespace szp
