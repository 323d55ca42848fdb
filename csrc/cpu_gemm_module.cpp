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
#include <string>
#include <vector>

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
    m.doc() = "CPU grouped GEMM with one summation order on every instruction set (csrc/cpu_gemm.h)";
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
    m.def("set_isa", &set_isa, py::arg("name"), "the path later calls take: scalar, avx2, avx512 or auto");
    m.def("isa", &isa, "the path calls take now");
    m.def("supported_isas", &supported_isas, "the paths this CPU can run");
}
