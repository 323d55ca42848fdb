// The szp decoder's AVX2 path (see szp_codec.h, DecodePath): AVX2, signs placed by table.
//
// Compiled under `#pragma GCC target` with the chunk loop (szp_decode_chunk.h) and the block
// (szp_decode_avx2_block.h) included after it, so loop and block inline into one function per dtype pair, and no
// AVX2 copy of a shared inline function can reach the other paths at link time: the shared headers are included
// before the pragma. This unit takes the level the CPU is best at (Avx2Level): pdep's unit
// (szp_decode_avx2_bmi2.cpp) where pdep is fast, this one's table otherwise.
#include "szp_codec.h"

#if defined(__x86_64__) && defined(__GNUC__)

#include <cpuid.h>
#include <immintrin.h>

#include <atomic>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx2,popcnt")
#include "szp_decode_chunk.h"
#include "szp_plane_bytes.h"
#include "szp_decode_avx2_block.h"

namespace szp {

namespace {
std::atomic<int> g_level{-1};  // the Avx2Level later decodes take; -1: default_avx2_level(), on first use

// AMD before family 0x19 (Zen 1 and 2, and Hygon's Zen 1) runs pdep in microcode, at a cost that grows with the
// mask's set bits; everywhere else with BMI2 it is a 3-cycle instruction.
bool pdep_is_fast() {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amd = (ebx == 0x68747541 && edx == 0x69746e65 && ecx == 0x444d4163)     // "AuthenticAMD"
                     || (ebx == 0x6f677948 && edx == 0x6e65476e && ecx == 0x656e6975);  // "HygonGenuine"
    if (!amd) return true;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
    const unsigned family = ((eax >> 8) & 0xf) + ((eax >> 8 & 0xf) == 0xf ? (eax >> 20) & 0xff : 0);
    return family >= 0x19;
}
}  // namespace

bool avx2_level_supported(Avx2Level level) {
    return level == Avx2Level::kBase || (__builtin_cpu_supports("bmi2") && chunk_decoder_avx2_bmi2(kF32, kF32));
}

Avx2Level default_avx2_level() {
    return avx2_level_supported(Avx2Level::kBmi2) && pdep_is_fast() ? Avx2Level::kBmi2 : Avx2Level::kBase;
}

void set_avx2_level(Avx2Level level) { g_level.store(int(level)); }

Avx2Level avx2_level() {
    int level = g_level.load();
    if (level < 0) {
        level = int(default_avx2_level());
        g_level.store(level);
    }
    return Avx2Level(level);
}

ChunkDecoder chunk_decoder_avx2(int s, int o) {
    if (avx2_level() == Avx2Level::kBmi2) return chunk_decoder_avx2_bmi2(s, o);
    return chunk_decoder_for<Avx2Block<false>>(s, o);
}

}  // namespace szp
#pragma GCC pop_options

#else

namespace szp {
bool avx2_level_supported(Avx2Level level) { return level == Avx2Level::kBase; }
Avx2Level default_avx2_level() { return Avx2Level::kBase; }
void set_avx2_level(Avx2Level) {}
Avx2Level avx2_level() { return Avx2Level::kBase; }
ChunkDecoder chunk_decoder_avx2(int, int) { return nullptr; }
}  // namespace szp

#endif
