// CPU gathered grouped GEMM (module moeserve._cpu_gemm): out[p, :] = a[rows[p], :] @ weights[slots[p]].T.
//
// The arithmetic is one fixed order, the same on every instruction set, so that a result never depends on
// the machine's vector width, on which other pairs share the call, or on the thread count:
//   - every output element sums over k in 16 float32 lanes, lane = k mod 16, each lane accumulating with a
//     fused multiply-add (fmaf semantics: one rounding) in increasing k, starting from +0;
//   - a K tail that is not a multiple of 16 adds only its real elements to their lanes;
//   - then one tree over the lanes: lane i += lane i + 8 (i < 8), then + 4, + 2, + 1; lane 0 is the result,
//     stored as float32 or rounded to bfloat16 (round to nearest even, as torch).
// AVX-512F (one zmm per output), AVX2+FMA (two ymm per output: lanes 0-7 and 8-15) and portable scalar code
// (std::fmaf) all follow it, so they write identical bytes. The K reduction of an output is never split
// across threads, and tile sizes only decide which outputs are computed together, never how one is summed.
#pragma once

#include <cstdint>
#include <string>

namespace cpu_gemm {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Element types; the codes the Python side passes. a and out share one; the weights take it too, or bfloat16
// under float32 activations (an expert cache slot holding bfloat16-exact weights in half the bytes: widening
// bfloat16 to float32 is exact, so the products are those of the same weights held as float32, bit for bit).
enum DType : int { kF32 = 0, kBF16 = 1 };

// All sizes and strides in elements. weights: slot s, output row n starts at w + s * slot_stride + n * k.
struct Problem {
    int dtype = kF32;
    const void* a = nullptr;  // [a_rows, k], row stride a_row_stride, inner stride 1
    int64_t a_rows = 0;
    int64_t a_row_stride = 0;
    const void* w = nullptr;  // [slots, n, k], inner two dims contiguous
    int64_t slots = 0;
    int64_t slot_stride = 0;
    int64_t n = 0;
    int64_t k = 0;
    const int64_t* rows = nullptr;  // [pairs], each in [0, a_rows); null: pair p reads row p
    const int64_t* pair_slots = nullptr;  // [pairs], each in [0, slots); null: every pair uses slot 0
    int64_t pairs = 0;
    void* out = nullptr;  // [pairs, n] contiguous
    int w_dtype = -1;  // the weights' element type; -1: dtype's
};

bool cpu_supports(Isa isa);
Isa best_isa();  // the widest the CPU (and its OS) supports
const char* isa_name(Isa isa);
// "scalar", "avx2", "avx512"; "auto" gives best_isa(). Throws std::invalid_argument on another name or on an
// ISA this CPU lacks.
Isa parse_isa(const std::string& name);

// Throws std::invalid_argument (before touching memory) when a row or slot index is out of range or a size
// is negative. threads: OpenMP threads (at most; small calls run on the caller's thread alone).
void grouped_gemm(const Problem& p, Isa isa, int threads);

}  // namespace cpu_gemm
