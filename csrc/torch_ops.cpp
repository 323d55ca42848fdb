// moeserve's CPU kernels as C++ torch ops (library moeserve_native), for compiled CPU decode steps.
//
// In:  tensors from a compiled step's C++ wrapper (inductor cpp_wrapper), through the dispatcher.
// Out: kv_write writes the KV pools in place; cpu_grouped_gemm / cpu_linear return new [P, N] / [M, N] tensors;
//      cpu_paged_decode returns decode attention [B, H, Dv];
//      held_expert_slots returns the expert cache slots [T, K] of a MoE layer's routed experts.
//
// The same ops exist as Python kernels (moeserve::kv_write, layers/cpu_gemm.py); a compiled step calling one
// of those goes C++ -> Python -> C++ a few times per layer, which on a small model costs as much as its
// arithmetic. This file is compiled at run time against the installed torch (moeserve/native_ops.py), because the
// extensions built at install time must not depend on torch's headers. The GEMM itself is not compiled here:
// moeserve._cpu_gemm hands over the address of its entry point (bind_cpu_gemm), so both ops run the one kernel,
// with the one instruction-set choice, that the Python ops run, and so does its paged attention kernel
// (bind_cpu_attention). Likewise moeserve._szp_cpu hands over its expert cache's entry point (bind_held_slots;
// csrc/slot_cache.h), which has no Python twin here: moeserve::host_expert_slots is the op for providers without
// that cache.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu_attention.h"
#include "cpu_gemm.h"

namespace {

using GemmEntry = void (*)(const cpu_gemm::Problem*, int threads);
std::atomic<GemmEntry> g_gemm{nullptr};

void bind_cpu_gemm(int64_t address) { g_gemm.store(reinterpret_cast<GemmEntry>(static_cast<uintptr_t>(address))); }

using AttentionEntry = void (*)(const cpu_attention::Problem*, int threads);
std::atomic<AttentionEntry> g_attention{nullptr};

void bind_cpu_attention(int64_t address) {
    g_attention.store(reinterpret_cast<AttentionEntry>(static_cast<uintptr_t>(address)));
}

// The signatures of csrc/decode_team.h ThreadsRunner and csrc/slot_cache.h held_slots_entry (this file is built
// alone at run time, without the extension's headers): they must stay the same.
using ThreadsRunner = void (*)(void* context, void (*body)(void*));
using HeldSlotsEntry = int (*)(const int64_t* ids, int64_t rows, int64_t k, int64_t layer,
                               const int64_t* const* predicted, const int64_t* predicted_layers, int64_t predictions,
                               ThreadsRunner threads, int64_t* out, char* error, int64_t error_size);

// body(context) once on each of torch's intra-op threads: they sit idle while the step waits for its experts.
void on_torch_threads(void* context, void (*body)(void*)) {
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) body(context);
    });
}

std::atomic<HeldSlotsEntry> g_held_slots{nullptr};

void bind_held_slots(int64_t address) {
    g_held_slots.store(reinterpret_cast<HeldSlotsEntry>(static_cast<uintptr_t>(address)));
}

// ids [T, K] -> slots [T, K] of the calling thread's current expert cache (moeserve/offload/native_slots.py),
// after handing it the guesses predicted [T, K] ids for each of predicted_layers.
at::Tensor held_expert_slots(const at::Tensor& ids_in, int64_t layer, at::TensorList predicted_in,
                             at::IntArrayRef predicted_layers) {
    HeldSlotsEntry entry = g_held_slots.load();
    TORCH_CHECK(entry != nullptr, "moeserve_native: bind_held_slots was not called");
    TORCH_CHECK_VALUE(ids_in.dim() == 2 && ids_in.scalar_type() == at::kLong && ids_in.device().is_cpu(),
                      "held_expert_slots needs ids as a [T, K] long CPU tensor");
    TORCH_CHECK_VALUE(predicted_in.size() == predicted_layers.size(),
                      "held_expert_slots needs one predicted layer per prediction");
    const at::Tensor ids = ids_in.contiguous();
    std::vector<at::Tensor> predicted;
    std::vector<const int64_t*> predicted_ids;
    for (const at::Tensor& p : predicted_in) {
        TORCH_CHECK_VALUE(p.sizes() == ids.sizes() && p.scalar_type() == at::kLong && p.device().is_cpu(),
                          "held_expert_slots needs each prediction as ids are: [T, K] long on the CPU");
        predicted.push_back(p.contiguous());
        predicted_ids.push_back(predicted.back().data_ptr<int64_t>());
    }
    at::Tensor out = at::empty(ids.sizes(), ids.options());
    char error[512];
    const int failed = entry(ids.data_ptr<int64_t>(), ids.size(0), ids.size(1), layer, predicted_ids.data(),
                             predicted_layers.data(), int64_t(predicted_ids.size()), &on_torch_threads,
                             out.data_ptr<int64_t>(), error, int64_t(sizeof(error)));
    TORCH_CHECK_VALUE(failed == 0, error);
    return out;
}

// pool [num_blocks, block_size, G, Dh] <- entries [N, G, Dh] at flat positions slots [N]: index_copy_'s result. Where
// both are contiguous in one dtype the rows are copied here directly: a compiled step writes twice per layer, and
// index_copy_'s dispatch and iterator setup cost more than copying a decode step's few rows.
void write_rows(const at::Tensor& pool, const at::Tensor& slots, const at::Tensor& entries) {
    at::Tensor rows = pool.view({-1, pool.size(2), pool.size(3)});
    const bool direct = rows.is_contiguous() && entries.is_contiguous() && entries.dim() == 3 &&
                        entries.scalar_type() == rows.scalar_type() && entries.size(1) == rows.size(1) &&
                        entries.size(2) == rows.size(2) && slots.dim() == 1 && slots.is_contiguous() &&
                        slots.scalar_type() == at::kLong && slots.size(0) == entries.size(0) &&
                        slots.device().is_cpu() && entries.device().is_cpu() && rows.device().is_cpu();
    if (!direct) {
        rows.index_copy_(0, slots, entries);
        return;
    }
    const int64_t n = slots.size(0), count = rows.size(0);
    const int64_t* at_row = slots.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
        TORCH_CHECK_INDEX(at_row[i] >= 0 && at_row[i] < count, "kv_write: slot ", at_row[i], " is out of range for a pool of ",
                          count, " positions");
    const int64_t row_bytes = entries.size(1) * entries.size(2) * int64_t(entries.element_size());
    char* dst = static_cast<char*>(rows.data_ptr());
    const char* src = static_cast<const char*>(entries.data_ptr());
    for (int64_t i = 0; i < n; ++i) std::memcpy(dst + at_row[i] * row_bytes, src + i * row_bytes, size_t(row_bytes));
}

void kv_write(at::Tensor k_pool, std::optional<at::Tensor> v_pool, const at::Tensor& slots, const at::Tensor& keys,
              const std::optional<at::Tensor>& values) {
    write_rows(k_pool, slots, keys);
    if (v_pool.has_value()) {
        TORCH_CHECK_VALUE(values.has_value(), "kv_write: a value pool needs values");
        write_rows(*v_pool, slots, *values);
    }
}

int dtype_code(const at::Tensor& t) {
    if (t.scalar_type() == at::kFloat) return cpu_gemm::kF32;
    if (t.scalar_type() == at::kBFloat16) return cpu_gemm::kBF16;
    TORCH_CHECK_VALUE(false, "the CPU GEMM takes float32 and bfloat16, not ", t.scalar_type());
    return -1;
}

// weights [S, N, K] with each slot's [N, K] matrix contiguous (layers/cpu_gemm.py _slots_contiguous)
bool slots_contiguous(const at::Tensor& w) {
    const int64_t n = w.size(1), k = w.size(2);
    return n * k == 0 || ((k == 1 || w.stride(2) == 1) && (n == 1 || w.stride(1) == k));
}

at::Tensor run(const at::Tensor& a_in, const at::Tensor* rows, const at::Tensor* slots, const at::Tensor& w,
               int64_t num_slots, int64_t slot_stride, int64_t n, int64_t k) {
    GemmEntry gemm = g_gemm.load();
    TORCH_CHECK(gemm != nullptr, "moeserve_native: bind_cpu_gemm was not called");
    const int dtype = dtype_code(a_in);
    TORCH_CHECK_VALUE(w.scalar_type() == a_in.scalar_type() ||
                          (a_in.scalar_type() == at::kFloat && w.scalar_type() == at::kBFloat16),
                      "the CPU GEMM needs the weights in a's dtype, or bfloat16 under float32 a");
    TORCH_CHECK_VALUE(a_in.dim() == 2 && a_in.size(1) == k, "the CPU GEMM needs a as [R, ", k, "]");
    TORCH_CHECK_VALUE(a_in.device().is_cpu() && w.device().is_cpu(), "the CPU GEMM needs CPU tensors");
    const at::Tensor a = a_in.size(1) <= 1 || a_in.stride(1) == 1 ? a_in : a_in.contiguous();
    at::Tensor row_index, slot_index;
    int64_t pairs = a.size(0);
    if (rows != nullptr) {
        for (const at::Tensor* t : {rows, slots})
            TORCH_CHECK_VALUE(t->dim() == 1 && t->scalar_type() == at::kLong && t->device().is_cpu(),
                              "the CPU GEMM needs rows and slots as 1-D long CPU tensors");
        TORCH_CHECK_VALUE(rows->size(0) == slots->size(0), "the CPU GEMM needs one row and one slot per pair");
        row_index = rows->contiguous();
        slot_index = slots->contiguous();
        pairs = rows->size(0);
    }
    at::Tensor out = at::empty({pairs, n}, a.options());
    cpu_gemm::Problem p;
    p.dtype = dtype;
    p.w_dtype = dtype_code(w);
    p.a = a.data_ptr();
    p.a_rows = a.size(0);
    p.a_row_stride = a.stride(0);
    p.w = w.data_ptr();
    p.slots = num_slots;
    p.slot_stride = slot_stride;
    p.n = n;
    p.k = k;
    p.rows = rows != nullptr ? row_index.data_ptr<int64_t>() : nullptr;
    p.pair_slots = rows != nullptr ? slot_index.data_ptr<int64_t>() : nullptr;
    p.pairs = pairs;
    p.out = out.data_ptr();
    gemm(&p, at::get_num_threads());  // checks every row and slot index before reading
    return out;
}

at::Tensor cpu_grouped_gemm(const at::Tensor& a, const at::Tensor& rows, const at::Tensor& slots,
                            const at::Tensor& weights) {
    TORCH_CHECK_VALUE(weights.dim() == 3 && slots_contiguous(weights),
                      "the CPU GEMM needs weights [S, N, Kdim] with each slot's matrix contiguous");
    return run(a, &rows, &slots, weights, weights.size(0), weights.stride(0), weights.size(1), weights.size(2));
}

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& weight) {
    TORCH_CHECK_VALUE(weight.dim() == 2 && slots_contiguous(weight.unsqueeze(0)),
                      "the CPU GEMM needs weight [N, Kdim] contiguous");
    return run(x, nullptr, nullptr, weight, 1, 0, weight.size(0), weight.size(1));
}

// act(gate) * up through ATen's own kernels, those the eager expert runs (layers/moe.py MoeBlock._activate; the
// product here in place, which rounds alike): an opaque call keeps inductor from generating its own activation
// code, which rounds differently, so an expert a compiled step computes from a stack equals one computed
// through the host path bit for bit.
at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, c10::string_view act) {
    at::Tensor activated;
    if (act == "silu") {
        activated = at::silu(gate);
    } else if (act == "gelu") {
        activated = at::gelu(gate);
    } else if (act == "gelu_pytorch_tanh") {
        activated = at::gelu(gate, "tanh");
    } else if (act == "relu") {
        activated = at::relu(gate);
    } else {
        TORCH_CHECK_VALUE(false, "gated_activation: unknown activation ", act, "; expected silu, gelu, gelu_pytorch_tanh or relu");
    }
    return activated.mul_(up);
}

// layers/cpu_attention.py paged_decode's twin: the same checks, the one kernel (moeserve._cpu_gemm's entry).
at::Tensor cpu_paged_decode(const at::Tensor& query_in, const at::Tensor& k_pool, const std::optional<at::Tensor>& v_pool,
                            const at::Tensor& tables_in, const at::Tensor& positions_in, double scale, int64_t window,
                            const std::optional<at::Tensor>& sinks_in, int64_t value_dim) {
    AttentionEntry attention = g_attention.load();
    TORCH_CHECK(attention != nullptr, "moeserve_native: bind_cpu_attention was not called");
    const int dtype = dtype_code(query_in);
    TORCH_CHECK_VALUE(query_in.dim() == 3 && k_pool.dim() == 4 && tables_in.dim() == 2 && positions_in.dim() == 1,
                      "the CPU paged attention needs query [B, H, Dk], pools [blocks, block_size, G, D], tables [B, n] "
                      "and positions [B]");
    const at::Tensor& values = v_pool.has_value() ? *v_pool : k_pool;
    TORCH_CHECK_VALUE(k_pool.scalar_type() == query_in.scalar_type() && values.scalar_type() == query_in.scalar_type(),
                      "the CPU paged attention needs query and pools of one dtype");
    TORCH_CHECK_VALUE(k_pool.size(3) == query_in.size(2) && query_in.size(1) % k_pool.size(2) == 0,
                      "the CPU paged attention: the query does not fit the K pool");
    TORCH_CHECK_VALUE(!v_pool.has_value() || (values.dim() == 4 && values.size(0) == k_pool.size(0) &&
                                              values.size(1) == k_pool.size(1) && values.size(2) == k_pool.size(2) &&
                                              values.size(3) == value_dim),
                      "the CPU paged attention: the V pool does not match the K pool and value size");
    TORCH_CHECK_VALUE(k_pool.stride(3) == 1 && values.stride(3) == 1,
                      "the CPU paged attention needs each pool entry's values contiguous");
    TORCH_CHECK_VALUE(tables_in.scalar_type() == at::kLong && positions_in.scalar_type() == at::kLong &&
                          tables_in.size(0) == query_in.size(0) && positions_in.size(0) == query_in.size(0),
                      "the CPU paged attention needs long tables and positions with one row per query row");
    for (const at::Tensor* t : {&query_in, &k_pool, &values, &tables_in, &positions_in})
        TORCH_CHECK_VALUE(t->device().is_cpu(), "the CPU paged attention needs CPU tensors");
    const at::Tensor query = query_in.contiguous(), tables = tables_in.contiguous(), positions = positions_in.contiguous();
    at::Tensor sinks;
    if (sinks_in.has_value()) sinks = sinks_in->to(at::kFloat).contiguous();
    at::Tensor out = at::empty({query.size(0), query.size(1), value_dim}, query.options());
    cpu_attention::Problem p;
    p.dtype = dtype;
    p.query = query.data_ptr();
    p.batch = query.size(0);
    p.heads = query.size(1);
    p.key_dim = query.size(2);
    p.k_pool = k_pool.data_ptr();
    p.v_pool = v_pool.has_value() ? values.data_ptr() : nullptr;
    p.num_blocks = k_pool.size(0);
    p.block_size = k_pool.size(1);
    p.kv_heads = k_pool.size(2);
    p.value_dim = value_dim;
    p.k_block_stride = k_pool.stride(0);
    p.k_token_stride = k_pool.stride(1);
    p.k_head_stride = k_pool.stride(2);
    p.v_block_stride = values.stride(0);
    p.v_token_stride = values.stride(1);
    p.v_head_stride = values.stride(2);
    p.tables = tables.data_ptr<int64_t>();
    p.table_width = tables.size(1);
    p.table_stride = tables.stride(0);
    p.positions = positions.data_ptr<int64_t>();
    p.scale = float(scale);
    p.window = window;
    p.sinks = sinks.defined() ? sinks.data_ptr<float>() : nullptr;
    p.out = out.data_ptr();
    attention(&p, at::get_num_threads());  // checks every position and block before reading
    return out;
}

}  // namespace

TORCH_LIBRARY(moeserve_native, m) {
    m.def("bind_cpu_gemm(int address) -> ()", &bind_cpu_gemm);
    m.def("kv_write(Tensor(a!) k_pool, Tensor(b!)? v_pool, Tensor slots, Tensor keys, Tensor? values) -> ()");
    m.def("cpu_grouped_gemm(Tensor a, Tensor rows, Tensor slots, Tensor weights) -> Tensor");
    m.def("cpu_linear(Tensor x, Tensor weight) -> Tensor");
    m.def("bind_held_slots(int address) -> ()", &bind_held_slots);
    m.def("held_expert_slots(Tensor ids, int layer, Tensor[] predicted, int[] predicted_layers) -> Tensor");
    m.def("gated_activation(Tensor gate, Tensor up, str act) -> Tensor");
    m.def("bind_cpu_attention(int address) -> ()", &bind_cpu_attention);
    m.def("cpu_paged_decode(Tensor query, Tensor k_pool, Tensor? v_pool, Tensor tables, Tensor positions, float scale, "
          "int window, Tensor? sinks, int value_dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeserve_native, CPU, m) {
    m.impl("kv_write", &kv_write);
    m.impl("cpu_grouped_gemm", &cpu_grouped_gemm);
    m.impl("cpu_linear", &cpu_linear);
    m.impl("held_expert_slots", &held_expert_slots);
    m.impl("gated_activation", &gated_activation);
    m.impl("cpu_paged_decode", &cpu_paged_decode);
}
