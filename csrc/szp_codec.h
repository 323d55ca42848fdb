// The szp CPU codec: OpenMP encoder and decoder over raw buffers, no Python and no torch.
//
// In:  values of the stored dtype (fp32/fp16/bf16 bit patterns), the step and the absolute bound.
// Out: one szp payload (header, chunk table, rate bytes, data), byte-identical to the GPU encoder's.
// The binding in szp_module.cpp owns the buffers; these functions only read and write them.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <vector>

#include "szp_format.h"

namespace szp {

// Below this many chunks (64k values) a pass runs on the calling thread: waking an OpenMP team costs more
// than it saves, and a decode worker of the offloading runtime must not fan out into more threads.
constexpr szp_u64 kParallelMinChunks = 8;

struct Header {
    szp_u64 n;           // number of values
    float step;          // grid step (<= 2 * eb)
    int dtype;           // stored dtype code
    szp_u64 data_bytes;  // bytes of the data region
};

// Thrown for a payload that is not a well-formed szp stream; the binding turns it into ValueError.
struct FormatError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

void write_header(const Header& h, szp_u8* out);
Header read_header(const szp_u8* payload, size_t size);  // checks magic, constants and the total size

// Encoding, in two calls so the caller can allocate the payload in between (dtype is a valid code; a
// non-finite value would simply be stored raw, but the Python layer refuses those before calling).
struct EncodePlan {
    Layout layout;
    Header header;
    std::vector<szp_u8> rates;    // rate byte of every block
    std::vector<szp_u64> table;   // chunk offsets in the data region, then its size
    size_t payload_bytes() const { return layout.data_off + header.data_bytes; }
};

// Pass 1: rates and chunk sizes (in parallel), then the chunk table.
EncodePlan plan_encode(int dtype, const void* x, szp_u64 n, float step, double eb);

// Pass 2: the whole payload (header, table, rates, data) into out, plan.payload_bytes() long.
void write_payload(const EncodePlan& plan, const void* x, double eb, szp_u8* out);

// Decode a whole payload into out (out_dtype values, n of them). Throws FormatError on a malformed payload.
// Runs on the decode path set last (below); every path writes the same values.
void decode(const szp_u8* payload, size_t size, void* out, int out_dtype);
// The chunks [first, last) of a payload into out (the whole output array), on the calling thread only: the unit
// a team of threads splits one payload's decode by (slot_cache.cpp). Every call checks the chunk table's ends,
// so the calls covering all chunks refuse exactly what decode refuses. decode_chunk_count: the payload's chunks.
szp_u64 decode_chunk_count(const szp_u8* payload, size_t size);
void decode_chunks(const szp_u8* payload, size_t size, void* out, int out_dtype, szp_u64 first, szp_u64 last);

// ---- decode paths: one per instruction set, chosen at run time ----------------------------------------------
// scalar: the portable code (4-lane vector extensions, every target); avx2: AVX2, signs placed by BMI2's pdep
// where it is fast or by table (Avx2Level, below); avx512: AVX-512F/BW with BMI2's pdep.
enum class DecodePath : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
bool decode_path_supported(DecodePath path);  // the CPU (and its OS) can run it
DecodePath best_decode_path();
void set_decode_path(DecodePath path);  // for later decode calls of every thread; the caller checks support
DecodePath decode_path();
const char* decode_path_name(DecodePath path);
DecodePath parse_decode_path(const char* name);  // "auto" = best; throws std::invalid_argument otherwise

// One chunk of a payload into out (the whole output array); false where its bytes disagree with its rates.
typedef bool (*ChunkDecoder)(const szp_u8* payload, const Layout& l, const Header& h, szp_u64 chunk, void* out);
// The x86 paths' chunk decoders (szp_decode_avx2.cpp, szp_decode_avx512*.cpp) for stored dtype s and output dtype o;
// null off x86-64.
ChunkDecoder chunk_decoder_avx2(int s, int o);  // the unit of avx2_level() (below)
ChunkDecoder chunk_decoder_avx2_bmi2(int s, int o);
ChunkDecoder chunk_decoder_avx512(int s, int o);  // the unit of avx512_level() (below)
ChunkDecoder chunk_decoder_avx512_gfni(int s, int o);
ChunkDecoder chunk_decoder_avx512_gfni_bf16(int s, int o);

// The AVX2 path's levels (szp_decode_avx2.cpp): signs placed by table (base) or by BMI2's pdep (bmi2). Both write
// the same bytes; the default is pdep where the CPU runs it fast. Later decodes take the level set last (set only
// a supported one).
enum class Avx2Level : int { kBase = 0, kBmi2 = 1 };
bool avx2_level_supported(Avx2Level level);
Avx2Level default_avx2_level();
void set_avx2_level(Avx2Level level);
Avx2Level avx2_level();

// The AVX-512 path's instruction sets beyond AVX-512F/BW/VL (szp_decode_avx512.cpp): every level writes the same
// bytes; later decodes take the level set last (set only one the CPU has: up to widest_avx512_level()).
enum class Avx512Level : int { kBase = 0, kGfni = 1, kGfniBf16 = 2 };
Avx512Level widest_avx512_level();
void set_avx512_level(Avx512Level level);
Avx512Level avx512_level();

}  // namespace szp
