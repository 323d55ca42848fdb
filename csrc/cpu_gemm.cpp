// CPU gathered grouped GEMM: the fixed summation order of cpu_gemm.h on AVX-512F, AVX2+FMA and scalar code.
//
// Decode-sized calls (a few pairs) are GEMVs bound by the memory bandwidth of streaming the weights, so:
//   - pairs are grouped by slot (a counting sort), and a slot's weight rows are read from memory once for
//     all of its pairs: a tile of TP pairs x TN output rows keeps one accumulator per (pair, row), each
//     weight vector loaded once feeds TP fused multiply-adds;
//   - a slot read by one pair (every slot of a batch-1 decode step) is read one row after the other: the
//     matrix is then one sequential stream, which the hardware prefetcher follows at nearly the bandwidth a
//     plain sequential read gets (1024x1024 bfloat16 from memory, one thread of an AMD EPYC: 21.6 GB/s, against
//     17.2 GB/s for 8 rows at once with software prefetch, and ~23 GB/s for a plain sum); rows follow one
//     another fast enough that out-of-order execution overlaps their FMA chains;
//   - several pairs take TN rows at once: TN independent FMA chains per pair (a chain must run in increasing
//     k, so the rows, not k, supply the instruction-level parallelism), and the rows' interleaved streams,
//     each only K values long, are too short for the hardware prefetcher, so each tile prefetches a later
//     tile's rows into L2 (prefetch_next);
//   - a work item is (slot group, block of kBlockRows output rows); OpenMP hands items out statically, and
//     each item sums its outputs over the whole K, so the thread count never changes a bit.
// Activations are packed once per call as float32 rows padded with +0 to a multiple of 16 (bfloat16 is
// widened, exactly), so the inner loops read one layout; float32 rows with K a multiple of 16 are read in
// place. Tile shapes decide only which outputs are computed together: none changes how one is summed.
#include "cpu_gemm.h"

#include "cpu_numbers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define CPU_GEMM_X86 1
// GCC 12 warns about its own _mm512_undefined_* (a self-initialized local, GCC bug 105593) wherever an
// AVX-512 intrinsic built on it is inlined; the warning is about the header's lines, so silence it there.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#define CPU_GEMM_X86 0
#endif

namespace cpu_gemm {

namespace {

constexpr int kLanes = 16;
// Output rows every pair tile of a slot group runs over before the next rows: 8 rows of a 1024-wide float32
// matrix (32 KiB) stay in L1 while each tile of pairs reads them.
constexpr int64_t kRowTile = 8;
// How far ahead of the tile being computed its weights are prefetched (into L2), in bytes: far enough for
// DRAM latency, and a whole tile at least.
constexpr int64_t kPrefetchBytes = 32 << 10;
constexpr int64_t kBlockRows = 16;  // output rows of one work item: small enough to spread any N over threads
// Below this many weight bytes streamed, a parallel region costs more (thread wake-up, a few microseconds)
// than the second thread saves.
constexpr int64_t kParallelMinBytes = int64_t(1) << 18;
// Activation values to widen before packing them is worth a parallel region.
constexpr int64_t kParallelMinPacked = int64_t(1) << 16;

using cpu_numbers::bf16;
using cpu_numbers::lane_tree;
using cpu_numbers::store;
using cpu_numbers::widen;

// A weight row's K tail (K mod 16 values) copied into 16 values whose missing lanes hold -0. The packed
// activations hold +0 there, and fma(+0, -0, acc) = acc + (-0) = acc for every acc (+0 and -0 included),
// so a padded lane adds nothing, as in the scalar path, which never visits it.
template <class T>
inline void tail_of(const T* row, int64_t rem, T* buf) {
    const T neg_zero = sizeof(T) == 4 ? T(-0.0f) : T(0x8000);
    for (int i = 0; i < kLanes; ++i) buf[i] = neg_zero;
    std::memcpy(buf, row, size_t(rem) * sizeof(T));
}

// Software prefetch of a later tile's weights into L2, spread over the current tile's iterations: a tile's TN
// rows lie back to back, so a later tile is TN * K contiguous values, and each chunk of 16 columns of the
// current tile (TN * 16 values) prefetches as many bytes of it. Every row is only K values long (a few KiB),
// too short for the hardware prefetcher to ramp up on each new row stream by itself: without this, 8 rows at
// once ran at about 60% of the bandwidth they reach with it. (One row at a time is one sequential stream, which
// the hardware prefetcher follows better than this: 22 against 18-19 GB/s in a standalone loop.)
template <class T, int TN>
inline void prefetch_next(const T* next, int64_t chunk) {
    if (next == nullptr) return;
    constexpr int kBytes = TN * kLanes * int(sizeof(T));
    const char* p = reinterpret_cast<const char*>(next) + chunk * kBytes;
    for (int b = 0; b < kBytes; b += 64) __builtin_prefetch(p + b, 0, 2);  // prefetcht1
}

// ---- scalar: the definition, in plain C++ (std::fmaf is a correctly rounded fused multiply-add) ---------

struct Scalar {
    static constexpr int kMaxPairs = 1;
    static constexpr int tile_rows(int) { return 1; }

    template <class W, class O, int TP, int TN>
    static void tile(const float* const* a, const W* w, int64_t k, O* const* out, const W*) {
        static_assert(TP == 1 && TN == 1, "the scalar path computes one output at a time");
        float lanes[kLanes] = {};
        for (int64_t i = 0; i < k; ++i) lanes[i % kLanes] = std::fmaf(a[0][i], widen(w[i]), lanes[i % kLanes]);
        store(out[0], lane_tree(lanes));
    }
};

#if CPU_GEMM_X86

// ---- AVX-512F: one zmm accumulator per (pair, row) --------------------------------------------------------

#define AVX512 __attribute__((target("avx512f")))

AVX512 inline __m512 load16_512(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 load16_512(const bf16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // zero-extend, shift up
}

AVX512 inline float tree_512(__m512 v) {
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    const __m256 s8 = _mm256_add_ps(lo, hi);  // lane i + lane i+8
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));  // + 4
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));  // + 2
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));  // + 1
}

template <class W, class O, int TP, int TN>
AVX512 void tile_512(const float* const* a, const W* w, int64_t k, O* const* out, const W* next) {
    __m512 acc[TP][TN];
#pragma GCC unroll 16
    for (int i = 0; i < TP; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < TN; ++j) acc[i][j] = _mm512_setzero_ps();
    const int64_t full = k - k % kLanes;
    for (int64_t c = 0; c < full; c += kLanes) {
        prefetch_next<W, TN>(next, c / kLanes);
        __m512 av[TP];
#pragma GCC unroll 16
        for (int i = 0; i < TP; ++i) av[i] = _mm512_loadu_ps(a[i] + c);
#pragma GCC unroll 16
        for (int j = 0; j < TN; ++j) {
            const __m512 wv = load16_512(w + j * k + c);
#pragma GCC unroll 16
            for (int i = 0; i < TP; ++i) acc[i][j] = _mm512_fmadd_ps(av[i], wv, acc[i][j]);
        }
    }
    if (full < k) {
        W buf[kLanes];
#pragma GCC unroll 16
        for (int j = 0; j < TN; ++j) {
            tail_of(w + j * k + full, k - full, buf);
            const __m512 wv = load16_512(buf);
#pragma GCC unroll 16
            for (int i = 0; i < TP; ++i) acc[i][j] = _mm512_fmadd_ps(_mm512_loadu_ps(a[i] + full), wv, acc[i][j]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < TP; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < TN; ++j) store(out[i] + j, tree_512(acc[i][j]));
}

struct Avx512 {
    // Of the 32 zmm registers: 4 pairs x 4 rows take 16 accumulators + 4 activations + 1 weight vector; one
    // pair (a batch-1 GEMV) takes one row at a time, one sequential stream (see the top of this file).
    static constexpr int kMaxPairs = 4;
    static constexpr int tile_rows(int pairs) { return pairs == 1 ? 1 : 4; }

    template <class W, class O, int TP, int TN>
    static void tile(const float* const* a, const W* w, int64_t k, O* const* out, const W* next) {
        tile_512<W, O, TP, TN>(a, w, k, out, next);
    }
};

// ---- AVX2 + FMA: two ymm accumulators per (pair, row), lanes 0-7 and 8-15 ---------------------------------

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 inline __m256 load8_256(const float* p) { return _mm256_loadu_ps(p); }
AVX2 inline __m256 load8_256(const bf16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // zero-extend, shift up
}

AVX2 inline float tree_256(__m256 lo, __m256 hi) {
    const __m256 s8 = _mm256_add_ps(lo, hi);  // lane i + lane i+8
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));  // + 4
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));  // + 2
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));  // + 1
}

template <class W, class O, int TP, int TN>
AVX2 void tile_256(const float* const* a, const W* w, int64_t k, O* const* out, const W* next) {
    __m256 lo[TP][TN], hi[TP][TN];
#pragma GCC unroll 16
    for (int i = 0; i < TP; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < TN; ++j) lo[i][j] = hi[i][j] = _mm256_setzero_ps();
    const int64_t full = k - k % kLanes;
    for (int64_t c = 0; c < full; c += kLanes) {
        prefetch_next<W, TN>(next, c / kLanes);
        // One half at a time keeps the live registers at 2*TP*TN accumulators + TP + 1.
        __m256 av[TP];
#pragma GCC unroll 16
        for (int i = 0; i < TP; ++i) av[i] = _mm256_loadu_ps(a[i] + c);
#pragma GCC unroll 16
        for (int j = 0; j < TN; ++j) {
            const __m256 wv = load8_256(w + j * k + c);
#pragma GCC unroll 16
            for (int i = 0; i < TP; ++i) lo[i][j] = _mm256_fmadd_ps(av[i], wv, lo[i][j]);
        }
#pragma GCC unroll 16
        for (int i = 0; i < TP; ++i) av[i] = _mm256_loadu_ps(a[i] + c + 8);
#pragma GCC unroll 16
        for (int j = 0; j < TN; ++j) {
            const __m256 wv = load8_256(w + j * k + c + 8);
#pragma GCC unroll 16
            for (int i = 0; i < TP; ++i) hi[i][j] = _mm256_fmadd_ps(av[i], wv, hi[i][j]);
        }
    }
    if (full < k) {
        W buf[kLanes];
#pragma GCC unroll 16
        for (int j = 0; j < TN; ++j) {
            tail_of(w + j * k + full, k - full, buf);
            const __m256 wlo = load8_256(buf), whi = load8_256(buf + 8);
#pragma GCC unroll 16
            for (int i = 0; i < TP; ++i) {
                lo[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(a[i] + full), wlo, lo[i][j]);
                hi[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(a[i] + full + 8), whi, hi[i][j]);
            }
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < TP; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < TN; ++j) store(out[i] + j, tree_256(lo[i][j], hi[i][j]));
}

struct Avx2 {
    // Of the 16 ymm registers: 2 pairs x 2 rows take 8 accumulators + 2 activations + 1 weight vector (one half
    // at a time); one pair takes one row at a time, one sequential stream (see the top of this file).
    static constexpr int kMaxPairs = 2;
    static constexpr int tile_rows(int pairs) { return pairs == 1 ? 1 : 2; }

    template <class W, class O, int TP, int TN>
    static void tile(const float* const* a, const W* w, int64_t k, O* const* out, const W* next) {
        tile_256<W, O, TP, TN>(a, w, k, out, next);
    }
};

#endif  // CPU_GEMM_X86

// ---- the driver: grouping, packing, work items -------------------------------------------------------------

struct Group {
    int64_t slot, begin, end;  // pairs order[begin, end) all use `slot`
};

// Reused by every call from one thread, so a steady stream of calls allocates nothing.
struct Scratch {
    std::vector<int64_t> count, order;
    std::vector<Group> groups;
    std::vector<float> packed;
    std::vector<const float*> act;
};

Scratch& scratch() {
    static thread_local Scratch s;
    return s;
}

// Kern::tile<W, O, TP, TN> for a row count TN <= MaxTN known only at run time (the last rows of a matrix).
template <class W, class O, class Kern, int TP, int MaxTN>
void short_tile(int64_t tn, const float* const* a, const W* w, int64_t k, O* const* out) {
    if constexpr (MaxTN > 1) {
        if (tn < MaxTN) return short_tile<W, O, Kern, TP, MaxTN - 1>(tn, a, w, k, out);
    }
    Kern::template tile<W, O, TP, MaxTN>(a, w, k, out, nullptr);
}

// rn rows (starting at w, `left` rows to the matrix's end) for TP pairs: tiles of the kernel's tile_rows(TP),
// each prefetching one further on.
template <class W, class O, class Kern, int TP>
void pair_rows(const float* const* a, const W* w, int64_t k, int64_t rn, int64_t left, O* const* out) {
    constexpr int64_t kTN = Kern::tile_rows(TP);
    const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / std::max<int64_t>(1, kTN * k * int64_t(sizeof(W))));
    O* o[TP];
    for (int64_t r = 0; r < rn; r += kTN) {
        for (int i = 0; i < TP; ++i) o[i] = out[i] + r;
        const W* at = w + r * k;
        if (r + kTN <= rn) {
            // the tile `ahead` tiles on, while it lies inside the matrix (prefetches never fault, but need not
            // fetch what nothing reads); a single row's sequential stream is left to the hardware prefetcher
            const W* next = kTN > 1 && r + (ahead + 1) * kTN <= left ? at + ahead * kTN * k : nullptr;
            Kern::template tile<W, O, TP, kTN>(a, at, k, o, next);
        } else if constexpr (kTN > 1) {
            short_tile<W, O, Kern, TP, kTN - 1>(rn - r, a, at, k, o);
        }
    }
}

// pair_rows for a pair count tp <= TP known only at run time.
template <class W, class O, class Kern, int TP = Kern::kMaxPairs>
void rows_for(int tp, const float* const* a, const W* w, int64_t k, int64_t rn, int64_t left, O* const* out) {
    if constexpr (TP > 1) {
        if (tp < TP) return rows_for<W, O, Kern, TP - 1>(tp, a, w, k, rn, left, out);
    }
    pair_rows<W, O, Kern, TP>(a, w, k, rn, left, out);
}

inline int64_t row_of(const Problem& p, int64_t pair) { return p.rows == nullptr ? pair : p.rows[pair]; }

// T: the activations' and outputs' element type; W: the weights' (T, or bfloat16 under float32 activations).
template <class T, class W, class Kern>
void run(const Problem& p, int threads) {
    const int64_t P = p.pairs, N = p.n, K = p.k;
    Scratch& s = scratch();

    // Pairs grouped by slot, ascending slot, each slot's pairs in ascending pair order (a counting sort).
    s.order.resize(size_t(P));
    s.groups.clear();
    if (p.pair_slots == nullptr) {  // one slot (a plain linear layer): one group, in pair order
        for (int64_t q = 0; q < P; ++q) s.order[size_t(q)] = q;
        s.groups.push_back(Group{0, 0, P});
    } else {
        s.count.assign(size_t(p.slots) + 1, 0);
        for (int64_t q = 0; q < P; ++q) ++s.count[size_t(p.pair_slots[q]) + 1];
        for (int64_t v = 0; v < p.slots; ++v) s.count[size_t(v) + 1] += s.count[size_t(v)];
        for (int64_t q = 0; q < P; ++q) s.order[size_t(s.count[size_t(p.pair_slots[q])]++)] = q;
        for (int64_t q = 0; q < P; ++q) {
            const int64_t slot = p.pair_slots[s.order[size_t(q)]];
            if (s.groups.empty() || s.groups.back().slot != slot) s.groups.push_back(Group{slot, q, q});
            s.groups.back().end = q + 1;
        }
    }

    // Each pair's activation row as float32, padded with +0 to a multiple of 16: every row of `a` once when
    // the pairs read at least as many (tokens x experts per token), else every pair's row.
    const T* a = static_cast<const T*>(p.a);
    const int64_t padded_k = (K + kLanes - 1) / kLanes * kLanes;
    s.act.resize(size_t(P));
    if (sizeof(T) == 4 && padded_k == K) {  // float32 read in place
        for (int64_t q = 0; q < P; ++q)
            s.act[size_t(q)] = reinterpret_cast<const float*>(a + row_of(p, q) * p.a_row_stride);
    } else {
        const bool by_row = p.rows != nullptr && p.a_rows <= P;
        const int64_t count = by_row ? p.a_rows : P;
        s.packed.resize(size_t(count * padded_k));
        float* packed = s.packed.data();
        const bool parallel = threads > 1 && count > 1 && count * K >= kParallelMinPacked;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
        for (int64_t r = 0; r < count; ++r) {
            const T* src = a + (by_row ? r : row_of(p, r)) * p.a_row_stride;
            float* dst = packed + r * padded_k;
            for (int64_t i = 0; i < K; ++i) dst[i] = widen(src[i]);
            for (int64_t i = K; i < padded_k; ++i) dst[i] = 0.0f;
        }
        for (int64_t q = 0; q < P; ++q) s.act[size_t(q)] = packed + (by_row ? p.rows[q] : q) * padded_k;
    }

    const int64_t num_groups = int64_t(s.groups.size());
    const int64_t blocks = (N + kBlockRows - 1) / kBlockRows;
    const int64_t items = num_groups * blocks;
    const bool parallel = threads > 1 && items > 1 && num_groups * N * K * int64_t(sizeof(W)) >= kParallelMinBytes;
    const W* w = static_cast<const W*>(p.w);
    T* out = static_cast<T*>(p.out);
    const Group* groups = s.groups.data();
    const int64_t* order = s.order.data();
    const float* const* act = s.act.data();

    // Groups of one size (every slot of a batch-1 step has one pair): group-major items, so each thread reads
    // whole matrices or long runs of one, sequential streams. Groups of different sizes: block-major items, a
    // static split giving each thread a range of row blocks of every group, so they spread evenly.
    bool one_size = true;
    for (int64_t i = 1; i < num_groups; ++i)
        one_size = one_size && groups[i].end - groups[i].begin == groups[0].end - groups[0].begin;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t item = 0; item < items; ++item) {
        const Group& g = groups[one_size ? item / blocks : item % num_groups];
        const int64_t n0 = (one_size ? item % blocks : item / num_groups) * kBlockRows, n1 = std::min(N, n0 + kBlockRows);
        const W* slot_w = w + g.slot * p.slot_stride;
        const float* ap[Kern::kMaxPairs] = {};
        T* op[Kern::kMaxPairs] = {};
        // Row tiles outside, pair tiles inside: a tile's weight rows stay in L1 while every pair reads them.
        for (int64_t n = n0; n < n1; n += kRowTile) {
            const int64_t rn = std::min(kRowTile, n1 - n);
            for (int64_t q = g.begin; q < g.end; q += Kern::kMaxPairs) {
                const int tp = int(std::min<int64_t>(Kern::kMaxPairs, g.end - q));
                for (int i = 0; i < tp; ++i) {
                    const int64_t pair = order[q + i];
                    ap[i] = act[pair];
                    op[i] = out + pair * N + n;
                }
                rows_for<W, T, Kern>(tp, ap, slot_w + n * K, K, rn, N - n, op);
            }
        }
    }
}

template <class T, class W>
void run_isa(const Problem& p, Isa isa, int threads) {
#if CPU_GEMM_X86
    if (isa == Isa::kAvx512) return run<T, W, Avx512>(p, threads);
    if (isa == Isa::kAvx2) return run<T, W, Avx2>(p, threads);
#endif
    (void)isa;
    run<T, W, Scalar>(p, threads);
}

}  // namespace

bool cpu_supports(Isa isa) {
#if CPU_GEMM_X86
    if (isa == Isa::kAvx512) return __builtin_cpu_supports("avx512f");
    if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    if (isa != Isa::kScalar) return false;
#endif
    return true;
}

Isa best_isa() {
    for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
        if (cpu_supports(isa)) return isa;
    return Isa::kScalar;
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::kAvx512: return "avx512";
        case Isa::kAvx2: return "avx2";
        default: return "scalar";
    }
}

Isa parse_isa(const std::string& name) {
    if (name == "auto") return best_isa();
    for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
        if (name != isa_name(isa)) continue;
        if (!cpu_supports(isa)) throw std::invalid_argument("this CPU cannot run the " + name + " path");
        return isa;
    }
    throw std::invalid_argument("unknown CPU GEMM path '" + name + "' (scalar, avx2, avx512 or auto)");
}

void grouped_gemm(const Problem& p, Isa isa, int threads) {
    const int w_dtype = p.w_dtype < 0 ? p.dtype : p.w_dtype;
    if (p.dtype != kF32 && p.dtype != kBF16) throw std::invalid_argument("cpu_gemm: unknown dtype code");
    if (w_dtype != p.dtype && !(p.dtype == kF32 && w_dtype == kBF16))
        throw std::invalid_argument(
            "cpu_gemm: the weights must be in the activations' dtype, or bfloat16 under float32");
    if (p.pairs < 0 || p.n < 0 || p.k < 0 || p.slots < 0 || p.a_rows < 0)
        throw std::invalid_argument("cpu_gemm: sizes must not be negative");
    if (p.rows == nullptr && p.pairs > p.a_rows)
        throw std::invalid_argument("cpu_gemm: " + std::to_string(p.pairs) + " pairs read rows 0.. of only " +
                                    std::to_string(p.a_rows));
    if (p.pair_slots == nullptr && p.pairs > 0 && p.slots < 1)
        throw std::invalid_argument("cpu_gemm: pairs use slot 0 of no slots");
    for (int64_t q = 0; q < p.pairs; ++q) {
        if (p.rows != nullptr && (p.rows[q] < 0 || p.rows[q] >= p.a_rows))
            throw std::invalid_argument("cpu_gemm: pair " + std::to_string(q) + " reads row " +
                                        std::to_string(p.rows[q]) + " of " + std::to_string(p.a_rows));
        if (p.pair_slots != nullptr && (p.pair_slots[q] < 0 || p.pair_slots[q] >= p.slots))
            throw std::invalid_argument("cpu_gemm: pair " + std::to_string(q) + " uses slot " +
                                        std::to_string(p.pair_slots[q]) + " of " + std::to_string(p.slots));
    }
    if (p.pairs == 0 || p.n == 0) return;
    threads = std::max(threads, 1);
    if (p.dtype == kBF16) return run_isa<bf16, bf16>(p, isa, threads);
    if (w_dtype == kBF16) return run_isa<float, bf16>(p, isa, threads);
    run_isa<float, float>(p, isa, threads);
}

}  // namespace cpu_gemm
