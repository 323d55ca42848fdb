// szp format: constants, layout and the scalar rules every implementation must share.
//
// Included by the C++ codec (csrc/, host compiler) and by the GPU kernels (kernels/*.cu, nvcc, NVRTC or
// hiprtc). Everything that decides a bit of the stream lives here once, so the CPU and GPU encoders write
// identical bytes and both decoders produce identical values. docs/szp-format.md is the prose of this file.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__) || defined(__CUDACC_RTC__) || defined(__HIPCC_RTC__)
#define SZP_HD __host__ __device__ __forceinline__
#else
#define SZP_HD inline
#endif

// The device pass of a GPU compiler: use its intrinsics. The host pass and host compilers use <cmath>.
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define SZP_DEVICE_COMPILE 1
#endif
#if !defined(__CUDACC_RTC__) && !defined(__HIPCC_RTC__)
#include <cmath>
#include <cstring>
#endif

// Runtime compilers have no <cstdint>; these widths hold on every target we build for.
typedef unsigned char szp_u8;
typedef unsigned short szp_u16;
typedef unsigned int szp_u32;
typedef unsigned long long szp_u64;
static_assert(sizeof(szp_u16) == 2 && sizeof(szp_u32) == 4 && sizeof(szp_u64) == 8, "szp needs 16/32/64-bit ints");

namespace szp {

// ---- format constants -------------------------------------------------------------------------------------
constexpr int kBlockValues = 32;              // values per block: one bit-plane is one 32-bit word
constexpr int kChunkBlocks = 256;             // blocks per chunk: the unit of the offset table and of one CTA
constexpr int kChunkValues = kBlockValues * kChunkBlocks;
// Rate byte: bits 0-4 = number of magnitude bit-planes (|q| <= 2^30 + 1 always fits 31), bit 5 = the block
// uses the half-step grid (step / 2), 255 = the block is stored verbatim in the stored dtype. 64..254: invalid.
constexpr szp_u8 kRawRate = 255;
constexpr szp_u8 kHalfStepFlag = 32;
constexpr int kMaxRate = 31;
constexpr double kMaxQuotient = 1073741824.0; // 2^30: |x / step| at or above this is stored raw
constexpr szp_u32 kHeaderBytes = 32;
constexpr szp_u32 kHeaderMagic = 0x31505a53u;  // "SZP1" little-endian

// Stored / output dtype codes, shared with the Python Blob header.
enum Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// ---- layout -----------------------------------------------------------------------------------------------
// payload = header (32 B) | chunk table ((chunks+1) x u64) | rate bytes (blocks, zero-padded to 16 B) | data
struct Layout {
    szp_u64 n, blocks, chunks, table_off, rates_off, data_off;
};

SZP_HD Layout layout_for(szp_u64 n) {
    Layout l;
    l.n = n;
    l.blocks = (n + kBlockValues - 1) / kBlockValues;
    l.chunks = (l.blocks + kChunkBlocks - 1) / kChunkBlocks;
    l.table_off = kHeaderBytes;
    l.rates_off = l.table_off + 8 * (l.chunks + 1);
    // 16-byte padding keeps every plane word of the data region 4-byte aligned (table and header are 8-aligned).
    l.data_off = l.rates_off + ((l.blocks + 15) / 16) * 16;
    return l;
}

// Bytes of one block's plane/raw payload, decided by its rate byte alone (this is what the prefix sum adds).
SZP_HD szp_u32 block_bytes(szp_u8 rate, int stored_size) {
    return rate == kRawRate ? szp_u32(kBlockValues * stored_size) : 4u * (rate & kMaxRate);
}

SZP_HD bool rate_is_valid(szp_u8 rate) { return rate < 2 * kHalfStepFlag || rate == kRawRate; }

// ---- bit-exact float conversions (round to nearest even, subnormals kept) ---------------------------------
SZP_HD szp_u32 f32_bits(float f) {
#ifdef SZP_DEVICE_COMPILE
    return __float_as_uint(f);
#else
    szp_u32 u;
    std::memcpy(&u, &f, 4);
    return u;
#endif
}

SZP_HD float bits_f32(szp_u32 u) {
#ifdef SZP_DEVICE_COMPILE
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

// Each dtype tag gives the storage type of one value and exact conversions to and from float.
struct F32 {
    typedef szp_u32 bits;
    static constexpr int kCode = kF32;
    SZP_HD static float to_float(bits b) { return bits_f32(b); }
    SZP_HD static bits from_float(float f) { return f32_bits(f); }
};

struct BF16 {
    typedef szp_u16 bits;
    static constexpr int kCode = kBF16;
    SZP_HD static float to_float(bits b) { return bits_f32(szp_u32(b) << 16); }
    SZP_HD static bits from_float(float f) {
        szp_u32 u = f32_bits(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return bits((u >> 16) | 0x40u);  // NaN stays a quiet NaN
        // Round half to even on the 16 dropped bits; a carry into the exponent correctly yields Inf.
        return bits((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
};

struct F16 {
    typedef szp_u16 bits;
    static constexpr int kCode = kF16;
    SZP_HD static float to_float(bits h) {
        szp_u32 sign = szp_u32(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
        if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13));
        if (e == 0) return bits_f32(sign | f32_bits(float(m) * 5.9604644775390625e-8f));  // m * 2^-24, exact
        return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
    }
    SZP_HD static bits from_float(float f) {
        szp_u32 u = f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
        if (a > 0x7f800000u) return bits(sign | 0x7e00u);
        if (a >= 0x477ff000u) return bits(sign | 0x7c00u);  // >= 65520 rounds to Inf
        if (a < 0x38800000u) {                                // below 2^-14: fp16 subnormal or zero
            if (a <= 0x33000000u) return bits(sign);          // <= 2^-25 rounds (ties to even) to zero
            szp_u32 e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126u - e;
            szp_u32 r = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
            r += (rem > half || (rem == half && (r & 1u))) ? 1u : 0u;
            return bits(sign | r);
        }
        szp_u32 r = a - 0x38000000u;  // rebias the exponent from 127 to 15
        return bits(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
    }
};

// ---- the quantization rule --------------------------------------------------------------------------------
template <class A, class B> struct same_type { static constexpr bool value = false; };
template <class A> struct same_type<A, A> { static constexpr bool value = true; };

// Reconstruction of integer q: one fp32 multiply, rounded to the stored dtype S. The decoder converts that
// S value to the output dtype afterwards, so a wider output dtype sees exactly the value the encoder checked.
SZP_HD float grid_value(int q, float step) {
#ifdef SZP_DEVICE_COMPILE
    return __fmul_rn(__int2float_rn(q), step);  // _rn: never contracted, same rounding as the host
#else
    return float(q) * step;
#endif
}

template <class S>
SZP_HD float reconstruct(int q, float step) {
    return S::to_float(S::from_float(grid_value(q, step)));
}

// Decoder output rule: the reconstruction of q as output dtype O (one rounding to S, then an exact or
// narrowing conversion to O). Also used for raw blocks via a float that S represents exactly.
template <class S, class O>
SZP_HD typename O::bits emit(float v) {
    if constexpr (same_type<S, O>::value) return S::from_float(v);
    else return O::from_float(S::to_float(S::from_float(v)));
}

// The grid of a block: its step and the float64 reciprocal the encoder multiplies by to find q.
struct Grid {
    float step;
    double inv;
};

SZP_HD Grid make_grid(float step) { return Grid{step, 1.0 / double(step)}; }
SZP_HD float block_step(szp_u8 rate, float step) { return rate & kHalfStepFlag ? step * 0.5f : step; }

// Encoder rule for one value on one grid: q = rint(x / step); if the reconstruction misses |r - x| <= eb (in
// float64), try the neighbour toward x once; report failure if that misses too or x / step is out of range.
// A block whose values do not all pass on the step grid is re-coded on the half-step grid (where rounding to
// the stored dtype can no longer push a value out of the bound), and stored raw if even that fails.
// The first candidate: q = rint(x / step), or 0 (which then fails the check) where |x / step| >= 2^30.
SZP_HD int nearest_q(double x, Grid g) {
    const double t = x * g.inv;
    return int(rint(fabs(t) < kMaxQuotient ? t : 0.0));
}

template <class S>
SZP_HD bool within_bound(int q, double x, float step, double eb) {
    return fabs(double(reconstruct<S>(q, step)) - x) <= eb;
}

template <class S>
SZP_HD bool quantize(typename S::bits xb, Grid g, double eb, int* q_out) {
    const double x = double(S::to_float(xb));
    int q = nearest_q(x, g);
    if (within_bound<S>(q, x, g.step, eb)) {
        *q_out = q;
        return true;
    }
    q += double(reconstruct<S>(q, g.step)) > x ? -1 : 1;
    *q_out = q;
    return within_bound<S>(q, x, g.step, eb);
}

// Number of magnitude bit-planes needed for magnitudes up to m (0 for m == 0).
SZP_HD int rate_of(szp_u32 m) {
#ifdef SZP_DEVICE_COMPILE
    return 32 - __clz(int(m));
#else
    return m ? 32 - __builtin_clz(m) : 0;
#endif
}

}  // namespace szp
