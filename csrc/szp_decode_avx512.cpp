// The szp decoder's AVX-512 path (see szp_codec.h, DecodePath): AVX-512F/BW/VL, with BMI2's pdep for the signs.
//
// Built like the AVX2 path (szp_decode_avx2.cpp): the shared headers before `#pragma GCC target`, the chunk loop
// and the block (szp_decode_avx512_block.h) after it. This unit compiles the block without GFNI and AVX512-BF16 and
// takes the widest unit whose instructions the CPU has (Avx512Level): GFNI and AVX512-BF16 (Zen 4, Sapphire
// Rapids), GFNI alone (Ice Lake), or neither (Skylake-X; also Cooper Lake, whose AVX512-BF16 comes without GFNI).
#include "szp_codec.h"

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#include <atomic>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,bmi2,popcnt")
#include "szp_decode_chunk.h"
#include "szp_plane_bytes.h"
#include "szp_decode_avx512_block.h"

namespace szp {

namespace {
std::atomic<int> g_level{-1};  // the Avx512Level later decodes take; -1: the widest the CPU has, on first use
}  // namespace

Avx512Level widest_avx512_level() {
    if (__builtin_cpu_supports("gfni") && __builtin_cpu_supports("avx512bf16")) return Avx512Level::kGfniBf16;
    return __builtin_cpu_supports("gfni") ? Avx512Level::kGfni : Avx512Level::kBase;
}

void set_avx512_level(Avx512Level level) { g_level.store(int(level)); }

Avx512Level avx512_level() {
    int level = g_level.load();
    if (level < 0) {
        level = int(widest_avx512_level());
        g_level.store(level);
    }
    return Avx512Level(level);
}

ChunkDecoder chunk_decoder_avx512(int s, int o) {
    switch (avx512_level()) {
        case Avx512Level::kGfniBf16: return chunk_decoder_avx512_gfni_bf16(s, o);
        case Avx512Level::kGfni: return chunk_decoder_avx512_gfni(s, o);
        case Avx512Level::kBase: break;
    }
    return chunk_decoder_for<Avx512Block<false, false>>(s, o);
}

}  // namespace szp
#pragma GCC pop_options

#else

namespace szp {
Avx512Level widest_avx512_level() { return Avx512Level::kBase; }
void set_avx512_level(Avx512Level) {}
Avx512Level avx512_level() { return Avx512Level::kBase; }
ChunkDecoder chunk_decoder_avx512(int, int) { return nullptr; }
}  // namespace szp

#endif
