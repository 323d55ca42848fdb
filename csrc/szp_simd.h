// 4-lane vectors (GCC/Clang vector extensions) for the bit-plane transposes of the CPU codec.
//
// 4 x 32 bits is the width every x86-64 (SSE2) and ARM64 (NEON) target has, so the compiler never has to
// split or scalarize these; a block of 32 values is 8 such vectors, value 4j + l in lane l of vector j.
#pragma once

#include "szp_format.h"

namespace szp {

typedef szp_u32 u32x4 __attribute__((vector_size(16)));
typedef int i32x4 __attribute__((vector_size(16)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef szp_u16 u16x8 __attribute__((vector_size(16)));
typedef szp_u16 u16x4 __attribute__((vector_size(8)));
constexpr int kVecs = kBlockValues / 4;

// kLaneBit[j] holds, per lane, the bit of value 4j + l in a plane word or a per-value mask word.
#define SZP_LANE_BITS(j) {1u << (4 * j), 1u << (4 * j + 1), 1u << (4 * j + 2), 1u << (4 * j + 3)}
constexpr u32x4 kLaneBit[kVecs] = {SZP_LANE_BITS(0), SZP_LANE_BITS(1), SZP_LANE_BITS(2), SZP_LANE_BITS(3),
                                   SZP_LANE_BITS(4), SZP_LANE_BITS(5), SZP_LANE_BITS(6), SZP_LANE_BITS(7)};
#undef SZP_LANE_BITS

inline u32x4 splat(szp_u32 v) { return u32x4{} + v; }

// BF16::from_float of szp_format.h on 4 lanes (same rounding, same NaN rule), result in the low 16 bits.
inline u32x4 bf16_bits(f32x4 f) {
    const u32x4 u = u32x4(f);
    const u32x4 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded;
}

// emit<S, O> of szp_format.h on 4 lanes, for the dtype pairs without fp16 (fp16 rounding stays scalar).
template <class S, class O>
constexpr bool kVectorEmit = S::kCode != kF16 && O::kCode != kF16;

template <class S, class O>
inline void emit4(f32x4 v, typename O::bits* dst) {
    const u32x4 bits = S::kCode == kBF16 || O::kCode == kBF16 ? bf16_bits(v) : u32x4(v);
    if constexpr (O::kCode == kF32) {
        const u32x4 out = S::kCode == kBF16 ? bits << 16 : bits;  // bf16 -> fp32 is exact
        std::memcpy(dst, &out, sizeof(out));
    } else {
        const u16x4 out = __builtin_convertvector(bits, u16x4);
        std::memcpy(dst, &out, sizeof(out));
    }
}

}  // namespace szp
