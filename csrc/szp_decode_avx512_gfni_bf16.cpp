// The szp decoder's AVX-512 block with GFNI's transpose and AVX512-BF16's rounding (szp_decode_avx512_block.h).
#include "szp_codec.h"

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,bmi2,popcnt,gfni,avx512bf16")
#include "szp_decode_chunk.h"
#include "szp_plane_bytes.h"
#include "szp_decode_avx512_block.h"

namespace szp {
ChunkDecoder chunk_decoder_avx512_gfni_bf16(int s, int o) { return chunk_decoder_for<Avx512Block<true, true>>(s, o); }
}  // namespace szp
#pragma GCC pop_options

#else

namespace szp {
ChunkDecoder chunk_decoder_avx512_gfni_bf16(int, int) { return nullptr; }
}  // namespace szp

#endif
