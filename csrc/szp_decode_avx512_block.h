// The AVX-512 block of the szp decoder (szp_codec.h DecodePath::kAvx512), for the translation units that compile it
// under their instruction sets: szp_decode_avx512.cpp (AVX-512F/BW/VL and BMI2's pdep), szp_decode_avx512_gfni.cpp
// (+ GFNI) and szp_decode_avx512_gfni_bf16.cpp (+ GFNI and AVX512-BF16). A unit's `#pragma GCC target` names only
// the features its CPUs have, so the compiler cannot use an instruction of another unit's anywhere in its code.
//
// Included after that pragma, with szp_decode_chunk.h and szp_plane_bytes.h, like them: everything here is in an
// anonymous namespace, one copy per unit. Up to 8 planes go to bytes by one bit-matrix transpose (szp_plane_bytes.h,
// or one GFNI instruction); past that a plane word is a lane mask as it stands, so each plane costs one doubling and
// one masked add over 32 16-bit lanes (32-bit lanes past 16 planes). A block's nonzero mask comes from its
// magnitudes, so no loop over planes precedes the transpose. The float32 multiply and the rounding to the stored
// and output dtypes are the portable path's (szp_decode.cpp), lane for lane; bfloat16 output is rounded by
// AVX512-BF16's instruction in the unit that has it, where the block's products cannot be denormal.
// Decode speed, the embedded model's experts at rel 1e-3 (bfloat16 stored and out, one thread, Zen 4): 19.6 us an
// expert before the GFNI transpose, the BF16 rounding and the plane-loop removal, 12.1 us after.
#pragma once

// <immintrin.h>, <cstring> and szp_codec.h come before the unit's pragma (shared headers must not be compiled for
// one instruction set only).

namespace szp {
namespace {

constexpr float kMinNormal = 1.17549435e-38f, kMaxFinite = 3.40282347e+38f;

// plane_bytes (szp_plane_bytes.h) with GFNI: one affine transform over GF(2) against the unit vectors transposes
// each qword's 8x8 bit matrix, where plane_bytes takes three rounds of swaps. Byte b of the result, bit i:
// parity(byte 7 - i of the columns AND byte b of the unit vectors) = plane i's bit of value 8j + b.
// (A template, so that a translation unit compiled without GFNI never emits it.)
template <int = 0>
inline __m256i plane_bytes_gfni(const szp_u8* planes, int n) {
    return _mm256_gf2p8affine_epi64_epi8(_mm256_set1_epi64x(0x8040201008040201LL), plane_byte_columns<true>(planes, n), 0);
}

// kBf16Insn: the CPU has AVX512-BF16, whose vcvtne2ps2bf16 rounds two vectors of float32 to bfloat16 in one
// instruction. It rounds as BF16::from_float does (to nearest even) except that it flushes denormal inputs to zero,
// so it is used only for blocks whose step is a normal float: every nonzero product q * step is then normal.
// kGfni: the unit has GFNI, and up to 8 planes are transposed by plane_bytes_gfni.
template <bool kBf16Insn, bool kGfni>
struct Avx512Block {
    // BF16::from_float's rounding of 16 products q * step: the result in the high 16 bits of each lane, above
    // bits to ignore. No NaN case, as on the AVX2 path (szp_decode_avx2_block.h bf16_round_high says why).
    static __m512i bf16_round_high(__m512i u) {
        return _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    }

    template <class S, class O>
    static constexpr bool kVectorEmit = S::kCode != kF16 && O::kCode != kF16;

    // The block's 32 values from their float32 products f[h] (value 16h + l in lane l), emitted as O into dst;
    // with fp16 on either side, the portable emit does it value by value.
    template <class S, class O>
    static void emit32(const __m512 f[2], bool normal_step, typename O::bits* dst) {
        if constexpr (!kVectorEmit<S, O>) {
            float v[kBlockValues];
            _mm512_storeu_ps(v, f[0]);
            _mm512_storeu_ps(v + 16, f[1]);
            for (int i = 0; i < kBlockValues; ++i) dst[i] = emit<S, O>(v[i]);
        } else if constexpr (S::kCode == kF32 && O::kCode == kF32) {
            _mm512_storeu_ps(reinterpret_cast<float*>(dst), f[0]);
            _mm512_storeu_ps(reinterpret_cast<float*>(dst) + 16, f[1]);
        } else if constexpr (O::kCode == kF32) {  // bf16 stored: its value, widened exactly
            const __m512i high_half = _mm512_set1_epi32(int(0xffff0000u));
            for (int h = 0; h < 2; ++h)
                _mm512_storeu_si512(reinterpret_cast<float*>(dst) + 16 * h,
                                    _mm512_and_si512(bf16_round_high(_mm512_castps_si512(f[h])), high_half));
        } else {  // bf16 out
            if constexpr (kBf16Insn) {
                if (normal_step) {
                    _mm512_storeu_si512(dst, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(f[1], f[0])));
                    return;
                }
            }
            // the high 16-bit word of every lane of both halves, in order, in one store
            const __m512i odd_words = _mm512_setr_epi32(
                0x00030001, 0x00070005, 0x000b0009, 0x000f000d, 0x00130011, 0x00170015, 0x001b0019, 0x001f001d,
                0x00230021, 0x00270025, 0x002b0029, 0x002f002d, 0x00330031, 0x00370035, 0x003b0039, 0x003f003d);
            _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(bf16_round_high(_mm512_castps_si512(f[0])), odd_words,
                                                               bf16_round_high(_mm512_castps_si512(f[1]))));
        }
    }

    template <class S, class O>
    static int run(const szp_u8* planes, int n_planes, szp_u64 window, float step, typename O::bits* dst) {
        __m512i mag[2];  // value 16h + l in lane l of mag[h]
        szp_u32 nz;  // bit i set iff value i is nonzero
        if (n_planes <= 8) {
            // one bit-matrix transpose for all planes (szp_plane_bytes.h): no loop over planes, whose trip count
            // (7 or 8 at rel 1e-3) the branch predictor misses often
            __m256i bytes;
            if constexpr (kGfni) bytes = plane_bytes_gfni(planes, n_planes);
            else bytes = plane_bytes(planes, n_planes);
            nz = _mm256_test_epi8_mask(bytes, bytes);
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
            nz = _mm512_test_epi16_mask(acc, acc);
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
            nz = szp_u32(_mm512_test_epi32_mask(mag[0], mag[0])) | szp_u32(_mm512_test_epi32_mask(mag[1], mag[1])) << 16;
        }
        const szp_u32 signs = _pdep_u32(szp_u32(window), nz);
        const __m512 step16 = _mm512_set1_ps(step);
        __m512 f[2];
        for (int h = 0; h < 2; ++h) {
            const __m512i q = _mm512_mask_sub_epi32(mag[h], __mmask16(signs >> (16 * h)), _mm512_setzero_si512(), mag[h]);
            f[h] = _mm512_mul_ps(_mm512_cvtepi32_ps(q), step16);
        }
        emit32<S, O>(f, kBf16Insn && step >= kMinNormal && step <= kMaxFinite, dst);
        return __builtin_popcount(nz);
    }
};

}  // namespace
}  // namespace szp
