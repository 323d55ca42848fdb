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
constexpr int kVecs = kBlockValues / 4;

// kLaneBit[j] holds, per lane, the bit of value 4j + l in a plane word or a per-value mask word.
#define SZP_LANE_BITS(j) {1u << (4 * j), 1u << (4 * j + 1), 1u << (4 * j + 2), 1u << (4 * j + 3)}
constexpr u32x4 kLaneBit[kVecs] = {SZP_LANE_BITS(0), SZP_LANE_BITS(1), SZP_LANE_BITS(2), SZP_LANE_BITS(3),
                                   SZP_LANE_BITS(4), SZP_LANE_BITS(5), SZP_LANE_BITS(6), SZP_LANE_BITS(7)};
#undef SZP_LANE_BITS

inline u32x4 splat(szp_u32 v) { return u32x4{} + v; }

}  // namespace szp
