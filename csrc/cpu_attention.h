// CPU paged decode attention (module moeserve._cpu_gemm, beside the GEMM): each query row attends over its
// sequence's cached keys and values read in place from the paged KV pools, through its block table.
//
// For every (row b, head h), with g = h / (heads / kv_heads), p = positions[b] and first = max(0, p - window + 1)
// (0 without a window), over the positions t = first..p (block tables[b][t / block_size], entry t % block_size):
//   s_t = dot(query[b, h], key_t[g]) * scale
//   m   = max(max_t s_t, sink_h)                         (sink_h only where sinks are given)
//   e_t = exp(s_t - m), d = sum_t e_t (+ exp(sink_h - m))
//   out[b, h] = (sum_t e_t * value_t[g]) / d             rounded once to the query's dtype
// in float32, in one fixed order on every instruction set, so a result never depends on the vector width,
// the thread count or the other rows of the call:
//   - a dot product sums in 16 float32 lanes (lane = i mod 16), fused multiply-adds in increasing i, then the
//     lane tree +8, +4, +2, +1 (as the GEMM, cpu_gemm.h);
//   - e_t, d and the value sums in increasing t, each value element with its own fused multiply-add.
// It is not torch's SDPA order: the two agree to float32 rounding, not bit for bit.
#pragma once

#include <cstdint>

#include "cpu_gemm.h"

namespace cpu_attention {

// Element types of query, pools and output (one for all): the GEMM's codes.
using cpu_gemm::kBF16;
using cpu_gemm::kF32;

// Sizes and strides in elements; every key's and value's head_dim entries are contiguous.
struct Problem {
    int dtype = cpu_gemm::kF32;
    const void* query = nullptr;  // [batch, heads, key_dim], rows contiguous
    int64_t batch = 0, heads = 0, key_dim = 0;
    const void* k_pool = nullptr;  // [num_blocks, block_size, kv_heads, key_dim] with the strides below
    const void* v_pool = nullptr;  // likewise with value strides; null: the values are the keys' first value_dim entries
    int64_t num_blocks = 0, block_size = 0, kv_heads = 0, value_dim = 0;
    int64_t k_block_stride = 0, k_token_stride = 0, k_head_stride = 0;
    int64_t v_block_stride = 0, v_token_stride = 0, v_head_stride = 0;
    const int64_t* tables = nullptr;  // [batch, table_width], row stride table_stride
    int64_t table_width = 0, table_stride = 0;
    const int64_t* positions = nullptr;  // [batch]: the newest position of each row (its K/V already written)
    float scale = 1.0f;
    int64_t window = 0;  // <= 0: none
    const float* sinks = nullptr;  // [heads] or null
    void* out = nullptr;  // [batch, heads, value_dim] contiguous
};

// Throws std::invalid_argument (before writing anything) when a size is inconsistent, a position lies outside
// its table or a block it reads outside the pools. threads: OpenMP threads (at most; small calls run alone).
void paged_decode(const Problem& p, cpu_gemm::Isa isa, int threads);

}  // namespace cpu_attention
