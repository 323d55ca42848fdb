// The szp decoder's AVX2 block with BMI2's pdep for the signs (szp_decode_avx2_block.h), for CPUs where pdep is fast.
#include "szp_codec.h"

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx2,popcnt,bmi2")
#include "szp_decode_chunk.h"
#include "szp_plane_bytes.h"
#include "szp_decode_avx2_block.h"

namespace szp {
ChunkDecoder chunk_decoder_avx2_bmi2(int s, int o) { return chunk_decoder_for<Avx2Block<true>>(s, o); }
}  // namespace szp
#pragma GCC pop_options

#else

namespace szp {
ChunkDecoder chunk_decoder_avx2_bmi2(int, int) { return nullptr; }
}  // namespace szp

#endif
