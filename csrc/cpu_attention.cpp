// CPU paged decode attention: the definition and its fixed order are in cpu_attention.h.
//
// One (row, head) item is a loop over the row's positions: a dot product per key (AVX-512F: one zmm of 16
// lanes; AVX2+FMA: two ymm, lanes 0-7 and 8-15; scalar: std::fmaf per lane), then exp and a multiply-add of
// the value row into float32 accumulators. The paths differ only in how many lanes one instruction handles,
// never in what each lane computes, so they write the same bytes. Items run on OpenMP threads when the call
// has enough work; each item's arithmetic stays on one thread.
#include "cpu_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_numbers.h"

#if defined(__x86_64__) || defined(__i386__)
#define CPU_ATTENTION_X86 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#define CPU_ATTENTION_X86 0
#endif

namespace cpu_attention {

namespace {

using cpu_numbers::bf16;
using cpu_numbers::store;
using cpu_numbers::widen;

constexpr int kLanes = 16;
// Below this many multiply-adds (keys and values read, over all rows and heads) a call runs on the caller's
// thread: waking a team costs more than a small decode step's attention.
constexpr int64_t kParallelMinWork = int64_t(1) << 16;

// Per thread, grown as needed and kept: a decode step allocates nothing.
struct Scratch {
    std::vector<float> query;  // the item's query widened to float32, +0 up to a multiple of 16
    std::vector<float> scores;  // [positions read]
    std::vector<float> values;  // [value_dim] accumulators
};

Scratch& scratch() {
    thread_local Scratch s;
    return s;
}

// The last key_dim % 16 entries of a key, the other lanes -0.0: a lane's product +0 * -0 = -0 leaves its sum as
// it is (x + -0 = x for every x, -0 included), exactly as if the lane were skipped.
template <class T>
inline void tail_of(const T* key, int64_t rem, T* buf) {
    const T neg_zero = sizeof(T) == 4 ? T(-0.0f) : T(0x8000);
    for (int i = 0; i < kLanes; ++i) buf[i] = neg_zero;
    std::memcpy(buf, key, size_t(rem) * sizeof(T));
}

// ---- scalar: the definition --------------------------------------------------------------------------------

struct Scalar {
    template <class T>
    static float dot(const float* q, const T* k, int64_t n) {
        float lanes[kLanes] = {};
        for (int64_t i = 0; i < n; ++i) lanes[i % kLanes] = std::fmaf(q[i], widen(k[i]), lanes[i % kLanes]);
        return cpu_numbers::lane_tree(lanes);
    }

    template <class T>
    static void add_scaled(float e, const T* v, float* acc, int64_t n) {
        for (int64_t i = 0; i < n; ++i) acc[i] = std::fmaf(e, widen(v[i]), acc[i]);
    }

    template <class T>
    static void attend(const Problem& p, int64_t b, int64_t h);
};

#if CPU_ATTENTION_X86

#define AVX512 __attribute__((target("avx512f")))

AVX512 inline __m512 load16_512(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 load16_512(const bf16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// cpu_numbers::lane_tree on lanes 0-7 (`lo`) and 8-15 (`hi`) in registers: the same additions of the same
// operands in the same order (lane i + lane i + 8, then + 4, + 2, + 1), so the same bits, without a round
// trip through memory per key.
__attribute__((target("avx"))) inline float tree_8x2(__m256 lo, __m256 hi) {
    const __m256 s8 = _mm256_add_ps(lo, hi);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

AVX512 inline float tree_512(__m512 v) {
    return tree_8x2(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

struct Avx512 {
    template <class T>
    AVX512 static float dot(const float* q, const T* k, int64_t n) {
        __m512 acc = _mm512_setzero_ps();
        const int64_t full = n - n % kLanes;
        for (int64_t i = 0; i < full; i += kLanes) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16_512(k + i), acc);
        if (full < n) {
            T buf[kLanes];
            tail_of(k + full, n - full, buf);
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + full), load16_512(buf), acc);
        }
        return tree_512(acc);
    }

    template <class T>
    AVX512 static void add_scaled(float e, const T* v, float* acc, int64_t n) {
        const __m512 ev = _mm512_set1_ps(e);
        const int64_t full = n - n % kLanes;
        for (int64_t i = 0; i < full; i += kLanes)
            _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(ev, load16_512(v + i), _mm512_loadu_ps(acc + i)));
        for (int64_t i = full; i < n; ++i) acc[i] = std::fmaf(e, widen(v[i]), acc[i]);
    }

    template <class T>
    AVX512 static void attend(const Problem& p, int64_t b, int64_t h);
};

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 inline __m256 load8_256(const float* p) { return _mm256_loadu_ps(p); }
AVX2 inline __m256 load8_256(const bf16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

struct Avx2 {
    template <class T>
    AVX2 static float dot(const float* q, const T* k, int64_t n) {
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();  // lanes 0-7 and 8-15
        const int64_t full = n - n % kLanes;
        for (int64_t i = 0; i < full; i += kLanes) {
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8_256(k + i), lo);
            hi = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8_256(k + i + 8), hi);
        }
        if (full < n) {
            T buf[kLanes];
            tail_of(k + full, n - full, buf);
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(q + full), load8_256(buf), lo);
            hi = _mm256_fmadd_ps(_mm256_loadu_ps(q + full + 8), load8_256(buf + 8), hi);
        }
        return tree_8x2(lo, hi);
    }

    template <class T>
    AVX2 static void add_scaled(float e, const T* v, float* acc, int64_t n) {
        const __m256 ev = _mm256_set1_ps(e);
        const int64_t full = n - n % 8;
        for (int64_t i = 0; i < full; i += 8)
            _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(ev, load8_256(v + i), _mm256_loadu_ps(acc + i)));
        for (int64_t i = full; i < n; ++i) acc[i] = std::fmaf(e, widen(v[i]), acc[i]);
    }

    template <class T>
    AVX2 static void attend(const Problem& p, int64_t b, int64_t h);
};

#endif  // CPU_ATTENTION_X86

inline int64_t first_position(const Problem& p, int64_t position) {
    return p.window > 0 ? std::max<int64_t>(0, position - p.window + 1) : 0;
}

// One (row b, head h) item, as cpu_attention.h defines it. Inlined into each kernel's own `attend`, compiled
// for that kernel's instruction set, so that its dot and add_scaled inline too (a function of the default
// target cannot inline them: a call per key and value).
template <class T, class Kern>
__attribute__((always_inline)) inline void attend_item(const Problem& p, int64_t b, int64_t h) {
    Scratch& s = scratch();
    const int64_t key_dim = p.key_dim, value_dim = p.value_dim;
    const int64_t g = h / (p.heads / p.kv_heads);
    const int64_t padded = (key_dim + kLanes - 1) / kLanes * kLanes;
    if (int64_t(s.query.size()) < padded) s.query.resize(size_t(padded));
    const T* q = static_cast<const T*>(p.query) + (b * p.heads + h) * key_dim;
    for (int64_t i = 0; i < key_dim; ++i) s.query[size_t(i)] = widen(q[i]);
    for (int64_t i = key_dim; i < padded; ++i) s.query[size_t(i)] = 0.0f;

    const int64_t position = p.positions[b], first = first_position(p, position), count = position - first + 1;
    if (int64_t(s.scores.size()) < count) s.scores.resize(size_t(count));
    const int64_t* table = p.tables + b * p.table_stride;
    const T* keys = static_cast<const T*>(p.k_pool);
    const T* values = p.v_pool == nullptr ? keys : static_cast<const T*>(p.v_pool);
    const bool shared = p.v_pool == nullptr;
    const int64_t vb = shared ? p.k_block_stride : p.v_block_stride, vt = shared ? p.k_token_stride : p.v_token_stride,
                  vh = shared ? p.k_head_stride : p.v_head_stride;

    float top = -std::numeric_limits<float>::infinity();
    for (int64_t t = first; t <= position; ++t) {
        const T* key = keys + table[t / p.block_size] * p.k_block_stride + (t % p.block_size) * p.k_token_stride +
                       g * p.k_head_stride;
        const float score = Kern::dot(s.query.data(), key, key_dim) * p.scale;
        s.scores[size_t(t - first)] = score;
        top = std::max(top, score);
    }
    if (p.sinks != nullptr) top = std::max(top, p.sinks[h]);

    if (int64_t(s.values.size()) < value_dim) s.values.resize(size_t(value_dim));
    float* acc = s.values.data();
    std::fill(acc, acc + value_dim, 0.0f);
    float total = 0.0f;
    for (int64_t t = first; t <= position; ++t) {
        const float e = std::exp(s.scores[size_t(t - first)] - top);
        total += e;
        const T* value = values + table[t / p.block_size] * vb + (t % p.block_size) * vt + g * vh;
        Kern::add_scaled(e, value, acc, value_dim);
    }
    if (p.sinks != nullptr) total += std::exp(p.sinks[h] - top);
    T* out = static_cast<T*>(p.out) + (b * p.heads + h) * value_dim;
    for (int64_t i = 0; i < value_dim; ++i) store(out + i, acc[i] / total);
}

template <class T>
void Scalar::attend(const Problem& p, int64_t b, int64_t h) {
    attend_item<T, Scalar>(p, b, h);
}

#if CPU_ATTENTION_X86
template <class T>
AVX512 void Avx512::attend(const Problem& p, int64_t b, int64_t h) {
    attend_item<T, Avx512>(p, b, h);
}

template <class T>
AVX2 void Avx2::attend(const Problem& p, int64_t b, int64_t h) {
    attend_item<T, Avx2>(p, b, h);
}
#endif

template <class T, class Kern>
void run(const Problem& p, int threads) {
    const int64_t items = p.batch * p.heads;
    int64_t work = 0;
    for (int64_t b = 0; b < p.batch; ++b)
        work += (p.positions[b] - first_position(p, p.positions[b]) + 1) * p.heads * (p.key_dim + p.value_dim);
    const bool parallel = threads > 1 && items > 1 && work >= kParallelMinWork;
    (void)parallel;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t item = 0; item < items; ++item) Kern::template attend<T>(p, item / p.heads, item % p.heads);
}

template <class T>
void run_isa(const Problem& p, cpu_gemm::Isa isa, int threads) {
#if CPU_ATTENTION_X86
    if (isa == cpu_gemm::Isa::kAvx512) return run<T, Avx512>(p, threads);
    if (isa == cpu_gemm::Isa::kAvx2) return run<T, Avx2>(p, threads);
#endif
    (void)isa;
    run<T, Scalar>(p, threads);
}

void check(const Problem& p) {
    if (p.dtype != kF32 && p.dtype != kBF16) throw std::invalid_argument("cpu_attention: unknown dtype code");
    if (p.batch < 0 || p.heads <= 0 || p.kv_heads <= 0 || p.key_dim <= 0 || p.value_dim <= 0 || p.block_size <= 0 ||
        p.num_blocks <= 0 || p.table_width <= 0)
        throw std::invalid_argument("cpu_attention: sizes must be positive");
    if (p.heads % p.kv_heads != 0)
        throw std::invalid_argument("cpu_attention: the query heads must be a multiple of the KV heads");
    if (p.v_pool == nullptr && p.value_dim > p.key_dim)
        throw std::invalid_argument("cpu_attention: values read from the keys cannot be wider than the keys");
    for (int64_t b = 0; b < p.batch; ++b) {
        const int64_t position = p.positions[b];
        if (position < 0 || position >= p.table_width * p.block_size)
            throw std::invalid_argument("cpu_attention: row " + std::to_string(b) + "'s position " +
                                        std::to_string(position) + " is outside its block table");
        const int64_t* table = p.tables + b * p.table_stride;
        for (int64_t j = first_position(p, position) / p.block_size; j <= position / p.block_size; ++j)
            if (table[j] < 0 || table[j] >= p.num_blocks)
                throw std::invalid_argument("cpu_attention: row " + std::to_string(b) + " reads block " +
                                            std::to_string(table[j]) + ", outside the pools' " +
                                            std::to_string(p.num_blocks) + " blocks");
    }
}

}  // namespace

void paged_decode(const Problem& p, cpu_gemm::Isa isa, int threads) {
    check(p);
    if (p.dtype == kF32)
        run_isa<float>(p, isa, threads);
    else
        run_isa<bf16>(p, isa, threads);
}

}  // namespace cpu_attention
