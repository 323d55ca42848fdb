// The szp CPU codec: OpenMP encoder and decoder over raw buffers, no Python and no torch.
//
// In:  values of the stored dtype (fp32/fp16/bf16 bit patterns), the step and the absolute bound.
// Out: one szp payload (header, chunk table, rate bytes, data), byte-identical to the GPU encoder's.
// The binding in szp_module.cpp owns the buffers; these functions only read and write them.
#pragma once

#include <cstddef>
#include <stdexcept>

#include "szp_format.h"

namespace szp {

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

// Pass 1: rate byte of every block and data bytes of every chunk. dtype is a valid code (the binding checks);
// a non-finite value would simply be stored raw, but the Python layer refuses those before calling.
void encode_sizes(int dtype, const void* x, szp_u64 n, float step, double eb, szp_u8* rates, szp_u64* chunk_bytes);

// Pass 2: write the data region, given the rates of pass 1 and the chunk offsets (exclusive scan of pass 1).
void encode_data(int dtype, const void* x, szp_u64 n, float step, double eb, const szp_u8* rates,
                 const szp_u64* chunk_offsets, szp_u8* data);

// Decode a whole payload into out (out_dtype values, n of them). Throws FormatError on a malformed payload.
void decode(const szp_u8* payload, size_t size, void* out, int out_dtype);

}  // namespace szp
