// Runs the szp GPU kernels (kernels/*.cu) on the host, under an emulation of the CUDA features they use,
// and checks them against the C++ codec (csrc/): identical payload bytes from both encoders, identical
// values from both decoders. Built and run by tests/test_kernels_gpu.py, so the kernels' logic (scans,
// ballots, shuffles, sign-stream assembly) is tested on machines without a GPU. Exit status 0 = all equal.
//
// Emulation: one thread block at a time as 256 fibers (ucontext) on one OS thread, switched only at
// barriers; __shared__ becomes static (one block at a time makes that per-block); __syncthreads is a
// 256-fiber barrier; ballots and shuffles exchange values through a per-group slot array between two
// 32-fiber barriers.
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

struct EmuDim {
    unsigned x = 0, y = 0, z = 0;
};
EmuDim threadIdx, blockIdx;

struct EmuFiber {
    ucontext_t context;
    std::vector<char> stack;
    bool done = false;
};
ucontext_t emu_scheduler;
std::vector<EmuFiber> emu_fibers;
const std::function<void()>* emu_kernel;

void emu_yield() { swapcontext(&emu_fibers[threadIdx.x].context, &emu_scheduler); }

struct EmuBarrier {
    int arrived = 0;
    unsigned generation = 0;
    void wait(int count) {
        const unsigned mine = generation;
        if (++arrived == count) {
            arrived = 0;
            ++generation;
            return;
        }
        while (generation == mine) emu_yield();
    }
};
struct EmuGroup {
    EmuBarrier barrier;
    unsigned long long slot[32];
};
EmuBarrier emu_block_barrier;
EmuGroup emu_groups[8];

void __syncthreads() { emu_block_barrier.wait(256); }

// Every lane of the caller's group publishes v; read(slots) runs between the two barriers.
template <class T, class Read>
auto emu_group_exchange(T v, Read read) {
    EmuGroup& g = emu_groups[threadIdx.x / 32];
    unsigned long long u = 0;
    std::memcpy(&u, &v, sizeof(T));
    g.slot[threadIdx.x & 31] = u;
    g.barrier.wait(32);
    const auto r = read(g.slot);
    g.barrier.wait(32);
    return r;
}
// Lane `src` of the caller's group; out-of-range sources keep the caller's own value (as __shfl_up does).
template <class T>
T emu_exchange(T v, int src) {
    return emu_group_exchange(v, [&](const unsigned long long* slot) {
        T r = v;
        if (src >= 0 && src < 32) std::memcpy(&r, &slot[src], sizeof(T));
        return r;
    });
}
unsigned __ballot_sync(unsigned, bool p) {
    return emu_group_exchange(int(p), [](const unsigned long long* slot) {
        unsigned m = 0;
        for (int i = 0; i < 32; ++i) m |= unsigned(slot[i] != 0) << i;
        return m;
    });
}
template <class T> T __shfl_sync(unsigned, T v, int src, int) { return emu_exchange(v, src); }
template <class T> T __shfl_up_sync(unsigned, T v, int d, int) { return emu_exchange(v, int(threadIdx.x & 31) - d); }
template <class T> T __shfl_xor_sync(unsigned, T v, int m, int) { return emu_exchange(v, int(threadIdx.x & 31) ^ m); }
int __popc(unsigned v) { return __builtin_popcount(v); }
int __clz(int v) { return v ? __builtin_clz(unsigned(v)) : 32; }
unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
float __fmul_rn(float a, float b) { return a * b; }
float __int2float_rn(int i) { return float(i); }
unsigned atomicOr(unsigned* a, unsigned v) { const unsigned old = *a; *a |= v; return old; }

void emu_fiber_main() {
    (*emu_kernel)();
    emu_fibers[threadIdx.x].done = true;
    swapcontext(&emu_fibers[threadIdx.x].context, &emu_scheduler);
}

void emu_launch(unsigned long long grid, const std::function<void()>& kernel) {
    emu_kernel = &kernel;
    for (unsigned long long b = 0; b < grid; ++b) {
        blockIdx.x = unsigned(b);
        emu_fibers.assign(256, EmuFiber{});
        for (auto& f : emu_fibers) {
            f.stack.resize(1 << 16);
            getcontext(&f.context);
            f.context.uc_stack = {f.stack.data(), 0, f.stack.size()};
            f.context.uc_link = nullptr;
            makecontext(&f.context, emu_fiber_main, 0);
        }
        for (bool running = true; running;) {
            running = false;
            for (unsigned t = 0; t < 256; ++t) {
                if (emu_fibers[t].done) continue;
                threadIdx.x = t;
                swapcontext(&emu_scheduler, &emu_fibers[t].context);
                running = true;
            }
        }
    }
}

#include "szp_codec.h"
#include "szp_decode.cu"
#include "szp_encode.cu"

using namespace szp;

// The launch sequence of moeserve/codecs/gpu.py's szp_encode.
template <class S>
std::vector<szp_u8> kernel_encode(const typename S::bits* x, szp_u64 n, float step, double eb) {
    const Layout l = layout_for(n);
    std::vector<szp_u8> buf(l.data_off + l.chunks * (256 * 128 + 1024), 0);
    szp_u64* table = reinterpret_cast<szp_u64*>(buf.data() + l.table_off);
    emu_launch(l.chunks, [&] { szp_encode_sizes_kernel<S>(x, n, step, eb, buf.data() + l.rates_off, table + 1); });
    emu_launch(1, [&] { szp_scan_chunks_kernel(table + 1, l.chunks); });
    emu_launch(l.chunks, [&] {
        szp_encode_data_kernel<S>(x, n, step, eb, buf.data() + l.rates_off, table, buf.data() + l.data_off);
    });
    buf.resize(l.data_off + table[l.chunks]);
    write_header(Header{n, step, S::kCode, table[l.chunks]}, buf.data());
    return buf;
}

std::vector<szp_u8> cpp_encode(int code, const void* x, szp_u64 n, float step, double eb) {
    const EncodePlan plan = plan_encode(code, x, n, step, eb);
    std::vector<szp_u8> payload(plan.payload_bytes());
    write_payload(plan, x, eb, payload.data());
    return payload;
}

template <class S, class O>
bool same_decode(const std::vector<szp_u8>& payload, szp_u64 n, float step) {
    std::vector<typename O::bits> cpp(n), kernel(n, 0x5a5a);
    decode(payload.data(), payload.size(), cpp.data(), O::kCode);
    emu_launch(layout_for(n).chunks, [&] { szp_decode_kernel<S, O>(payload.data(), n, step, kernel.data()); });
    return cpp == kernel;
}

// Gaussian weights with outliers, zeros and values placed on grid midpoints; returns 0 if all agree.
template <class S>
int check(szp_u64 n, double eb, float scale, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> gauss(0, scale);
    std::vector<typename S::bits> x(n);
    for (szp_u64 i = 0; i < n; ++i) {
        float v = gauss(rng);
        if (i % 97 == 0) v *= 40;
        if (i % 89 == 0) v = 0;
        if (i % 83 == 0) v = float(2 * eb * (std::floor(v / (2 * eb)) + 0.5));
        if (i >= 1024 && i < 1088) v = 0;  // two all-zero blocks
        x[i] = S::from_float(v);
    }
    float step = float(2 * eb);
    if (double(step) > 2 * eb) step = std::nextafter(step, 0.0f);
    const auto cpp = cpp_encode(S::kCode, x.data(), n, step, eb);
    const bool bytes = cpp == kernel_encode<S>(x.data(), n, step, eb);
    const bool f32 = same_decode<S, F32>(cpp, n, step), f16 = same_decode<S, F16>(cpp, n, step),
               bf16 = same_decode<S, BF16>(cpp, n, step);
    std::printf("stored=%d n=%llu eb=%g payload=%zu B: encoder bytes %s, decode f32 %s f16 %s bf16 %s\n", S::kCode,
                n, eb, cpp.size(), bytes ? "equal" : "DIFFER", f32 ? "equal" : "DIFFER", f16 ? "equal" : "DIFFER",
                bf16 ? "equal" : "DIFFER");
    return bytes && f32 && f16 && bf16 ? 0 : 1;
}

int main() {
    int failures = 0;
    failures += check<F32>(20000, 1e-3, 0.02f, 1);  // three chunks, the last one partial
    failures += check<BF16>(9001, 1.6e-3, 0.02f, 2);
    failures += check<F16>(8192 + 33, 5e-4, 0.02f, 3);
    failures += check<BF16>(3000, 1e-5, 0.02f, 4);  // half-step and raw blocks
    failures += check<F32>(2000, 1e-9, 1e20f, 5);   // out of the grid's range: raw blocks
    failures += check<F32>(31, 1e-2, 0.02f, 6);     // one partial block
    return failures;
}
