// Number helpers the CPU kernels share (cpu_gemm.cpp, cpu_attention.cpp): bfloat16 widening and rounding, and
// the fixed 16-lane summation tree of cpu_gemm.h.
#pragma once

#include <cstdint>
#include <cstring>

namespace cpu_numbers {

typedef uint16_t bf16;

inline float widen(float v) { return v; }
inline float widen(bf16 v) {
    const uint32_t u = uint32_t(v) << 16;  // bfloat16 is the high half of a float32: exact
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline bf16 round_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline void store(float* dst, float v) { *dst = v; }
inline void store(bf16* dst, float v) { *dst = round_bf16(v); }

// The lane tree of cpu_gemm.h on 16 values: lane i += lane i + 8 (i < 8), then + 4, + 2, + 1.
inline float lane_tree(float* l) {
    for (int i = 0; i < 8; ++i) l[i] = l[i] + l[i + 8];
    for (int i = 0; i < 4; ++i) l[i] = l[i] + l[i + 4];
    for (int i = 0; i < 2; ++i) l[i] = l[i] + l[i + 2];
    return l[0] + l[1];
}

}  // namespace cpu_numbers
