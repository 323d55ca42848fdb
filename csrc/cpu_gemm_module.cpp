// Python binding of the CPU grouped GEMM (module moeserve._cpu_gemm).
//
// In: raw data pointers, sizes and strides (in elements) as integers, from moeserve.layers.cpu_gemm, which
//     checks dtypes, devices and layouts on the torch side: no torch headers here, so the extension builds
//     against any torch and never links it.
// Out: the products written into the caller's output buffer. The GIL is released around the arithmetic.
//
// Which instruction set runs is process-wide: the widest the CPU supports, unless the environment variable
// MOESERVE_CPU_ISA (read when the module is imported) or set_isa names another ("scalar", "avx2", "avx512",
// "auto"); all give the same bits (cpu_gemm.h), so forcing one is for tests and benchmarks.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_attention.h"
#include "cpu_gemm.h"

namespace py = pybind11;

namespace {

std::atomic<int> g_isa{int(cpu_gemm::Isa::kScalar)};

template <class P>
P* pointer(uintptr_t address) {
    return reinterpret_cast<P*>(address);
}

void grouped_gemm(int dtype, int w_dtype, uintptr_t a, int64_t a_rows, int64_t a_row_stride, uintptr_t w, int64_t slots,
                  int64_t slot_stride, int64_t n, int64_t k, uintptr_t rows, uintptr_t pair_slots, int64_t pairs,
                  uintptr_t out, int threads) {
    cpu_gemm::Problem p;
    p.dtype = dtype;
    p.w_dtype = w_dtype;
    p.a = pointer<const void>(a);
    p.a_rows = a_rows;
    p.a_row_stride = a_row_stride;
    p.w = pointer<const void>(w);
    p.slots = slots;
    p.slot_stride = slot_stride;
    p.n = n;
    p.k = k;
    p.rows = pointer<const int64_t>(rows);
    p.pair_slots = pointer<const int64_t>(pair_slots);
    p.pairs = pairs;
    p.out = pointer<void>(out);
    const auto isa = cpu_gemm::Isa(g_isa.load());
    py::gil_scoped_release nogil;
    cpu_gemm::grouped_gemm(p, isa, threads);
}

// The kernel on the path chosen here, for moeserve_native's C++ ops (csrc/torch_ops.cpp), which get its address.
// Called without the GIL (from a compiled step's C++ code), it never touches Python.
void entry(const cpu_gemm::Problem* p, int threads) { cpu_gemm::grouped_gemm(*p, cpu_gemm::Isa(g_isa.load()), threads); }

// Paged decode attention (cpu_attention.h) on the same path; pointers as integers, checked by the caller
// (layers/cpu_attention.py) on the torch side.
void paged_decode(int dtype, uintptr_t query, int64_t batch, int64_t heads, int64_t key_dim, uintptr_t k_pool,
                  uintptr_t v_pool, int64_t num_blocks, int64_t block_size, int64_t kv_heads, int64_t value_dim,
                  std::vector<int64_t> k_strides, std::vector<int64_t> v_strides, uintptr_t tables, int64_t table_width,
                  int64_t table_stride, uintptr_t positions, float scale, int64_t window, uintptr_t sinks, uintptr_t out,
                  int threads) {
    if (k_strides.size() != 3 || v_strides.size() != 3)
        throw std::invalid_argument("paged_decode: strides are (block, token, head)");
    cpu_attention::Problem p;
    p.dtype = dtype;
    p.query = pointer<const void>(query);
    p.batch = batch;
    p.heads = heads;
    p.key_dim = key_dim;
    p.k_pool = pointer<const void>(k_pool);
    p.v_pool = pointer<const void>(v_pool);
    p.num_blocks = num_blocks;
    p.block_size = block_size;
    p.kv_heads = kv_heads;
    p.value_dim = value_dim;
    p.k_block_stride = k_strides[0];
    p.k_token_stride = k_strides[1];
    p.k_head_stride = k_strides[2];
    p.v_block_stride = v_strides[0];
    p.v_token_stride = v_strides[1];
    p.v_head_stride = v_strides[2];
    p.tables = pointer<const int64_t>(tables);
    p.table_width = table_width;
    p.table_stride = table_stride;
    p.positions = pointer<const int64_t>(positions);
    p.scale = scale;
    p.window = window;
    p.sinks = pointer<const float>(sinks);
    p.out = pointer<void>(out);
    const auto isa = cpu_gemm::Isa(g_isa.load());
    py::gil_scoped_release nogil;
    cpu_attention::paged_decode(p, isa, threads);
}

void attention_entry(const cpu_attention::Problem* p, int threads) {
    cpu_attention::paged_decode(*p, cpu_gemm::Isa(g_isa.load()), threads);
}

void set_isa(const std::string& name) { g_isa.store(int(cpu_gemm::parse_isa(name))); }

std::string isa() { return cpu_gemm::isa_name(cpu_gemm::Isa(g_isa.load())); }

std::vector<std::string> supported_isas() {
    std::vector<std::string> names;
    for (auto i : {cpu_gemm::Isa::kScalar, cpu_gemm::Isa::kAvx2, cpu_gemm::Isa::kAvx512})
        if (cpu_gemm::cpu_supports(i)) names.push_back(cpu_gemm::isa_name(i));
    return names;
}

}  // namespace

PYBIND11_MODULE(_cpu_gemm, m) {
    m.doc() = "CPU grouped GEMM and paged decode attention, each with one summation order on every instruction set "
            "(csrc/cpu_gemm.h, csrc/cpu_attention.h)";
    m.attr("F32") = int(cpu_gemm::kF32);
    m.attr("BF16") = int(cpu_gemm::kBF16);
    const char* forced = std::getenv("MOESERVE_CPU_ISA");
    try {
        set_isa(forced && *forced ? forced : "auto");
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(std::string("MOESERVE_CPU_ISA: ") + e.what());
    }
    m.def("grouped_gemm", &grouped_gemm, py::arg("dtype"), py::arg("w_dtype"), py::arg("a"), py::arg("a_rows"),
          py::arg("a_row_stride"), py::arg("w"), py::arg("slots"), py::arg("slot_stride"), py::arg("n"), py::arg("k"),
          py::arg("rows"), py::arg("pair_slots"), py::arg("pairs"), py::arg("out"), py::arg("threads"),
          "out[p] = a[rows[p]] @ w[pair_slots[p]].T for p < pairs; pointers as integers (rows 0: row p, pair_slots "
          "0: slot 0), strides in elements");
    m.def("entry_address", [] { return reinterpret_cast<uintptr_t>(&entry); },
          "the address of void entry(const cpu_gemm::Problem*, int threads), for moeserve_native's C++ ops");
    m.def("paged_decode", &paged_decode, py::arg("dtype"), py::arg("query"), py::arg("batch"), py::arg("heads"),
          py::arg("key_dim"), py::arg("k_pool"), py::arg("v_pool"), py::arg("num_blocks"), py::arg("block_size"),
          py::arg("kv_heads"), py::arg("value_dim"), py::arg("k_strides"), py::arg("v_strides"), py::arg("tables"),
          py::arg("table_width"), py::arg("table_stride"), py::arg("positions"), py::arg("scale"), py::arg("window"),
          py::arg("sinks"), py::arg("out"), py::arg("threads"),
          "paged decode attention (csrc/cpu_attention.h); pointers as integers (v_pool 0: values from the keys, "
          "sinks 0: none), strides in elements");
    m.def("attention_entry_address", [] { return reinterpret_cast<uintptr_t>(&attention_entry); },
          "the address of void attention_entry(const cpu_attention::Problem*, int threads), for moeserve_native");
    m.def("set_isa", &set_isa, py::arg("name"), "the path later calls take: scalar, avx2, avx512 or auto");
    m.def("isa", &isa, "the path calls take now");
    m.def("supported_isas", &supported_isas, "the paths this CPU can run");
}
