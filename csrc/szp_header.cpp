// szp payload header: the only place the host reads or writes its 32 bytes.
#include <cstring>

#include "szp_codec.h"

namespace szp {

namespace {
template <class T>
void put(szp_u8* p, T v) { std::memcpy(p, &v, sizeof(T)); }
template <class T>
T get(const szp_u8* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}
}  // namespace

// 0 magic u32 | 4 block values u16 | 6 chunk blocks u16 | 8 n u64 | 16 step f32 | 20 dtype u8, 3 zero bytes
// | 24 data bytes u64
void write_header(const Header& h, szp_u8* out) {
    std::memset(out, 0, kHeaderBytes);
    put<szp_u32>(out, kHeaderMagic);
    put<szp_u16>(out + 4, kBlockValues);
    put<szp_u16>(out + 6, kChunkBlocks);
    put<szp_u64>(out + 8, h.n);
    put<float>(out + 16, h.step);
    out[20] = szp_u8(h.dtype);
    put<szp_u64>(out + 24, h.data_bytes);
}

Header read_header(const szp_u8* p, size_t size) {
    if (size < kHeaderBytes || get<szp_u32>(p) != kHeaderMagic)
        throw FormatError("the szp payload does not start with an szp header");
    if (get<szp_u16>(p + 4) != kBlockValues || get<szp_u16>(p + 6) != kChunkBlocks)
        throw FormatError("the szp payload uses a block or chunk size this build does not read");
    Header h;
    h.n = get<szp_u64>(p + 8);
    h.step = get<float>(p + 16);
    h.dtype = p[20];
    h.data_bytes = get<szp_u64>(p + 24);
    if (h.dtype > kBF16 || !(h.step > 0.0f) || h.n >> 56)
        throw FormatError("the szp header holds an invalid dtype, step or length");
    const Layout l = layout_for(h.n);
    if (h.data_bytes > size || l.data_off + h.data_bytes != size)
        throw FormatError("the szp payload size does not match the sizes its header records");
    return h;
}

}  // namespace szp
