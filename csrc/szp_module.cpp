// Python binding of the szp CPU codec (module moeserve._szp_cpu).
//
// In: numpy arrays owned by moeserve.codecs.szp (values as raw bit patterns, payload as uint8).
// Out: a new uint8 payload (encode) or values written into the caller's array (decode_into, or later by a
//      DecodePool thread: submit returns a PendingDecode to poll or wait on).
// The GIL is released around every pass over the data.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "szp_codec.h"
#include "szp_decode_pool.h"
#include "slot_cache.h"

namespace py = pybind11;

namespace {

size_t dtype_size(int code) {
    if (code == szp::kF32) return 4;
    if (code == szp::kF16 || code == szp::kBF16) return 2;
    throw std::invalid_argument("unknown szp dtype code " + std::to_string(code));
}

const void* values_of(const py::array& x, int dtype) {
    if (!(x.flags() & py::array::c_style) || size_t(x.itemsize()) != dtype_size(dtype))
        throw std::invalid_argument("szp needs a C-contiguous array whose item size matches its dtype code");
    return x.data();
}

py::array_t<uint8_t> encode(const py::array& x, int dtype, float step, double eb) {
    const void* values = values_of(x, dtype);
    if (!(step > 0.0f) || !(eb >= 0.0))
        throw std::invalid_argument("szp needs a positive step and a non-negative error bound");
    szp::EncodePlan plan;
    {
        py::gil_scoped_release nogil;
        plan = szp::plan_encode(dtype, values, x.size(), step, eb);
    }
    py::array_t<uint8_t> out(plan.payload_bytes());
    szp_u8* p = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        szp::write_payload(plan, values, eb, p);
    }
    return out;
}

// Where a decode into `out` writes, after checking that out can receive out_dtype values.
void* decode_target(py::array& out, int out_dtype) {
    if (!(out.flags() & py::array::c_style) || !out.writeable() || size_t(out.itemsize()) != dtype_size(out_dtype))
        throw std::invalid_argument("szp decodes into a writable C-contiguous array matching the output dtype code");
    return out.mutable_data();
}

// The decode of `payload` into `out`, after checking that out can receive it.
szp::DecodeTask decode_task(const py::array_t<uint8_t, py::array::c_style>& payload, py::array& out, int out_dtype) {
    void* target = decode_target(out, out_dtype);
    const szp::Header h = szp::read_header(payload.data(), payload.size());
    if (h.n != szp_u64(out.size()))
        throw std::invalid_argument("the output array's size differs from the number of values in the payload");
    return szp::DecodeTask{payload.data(), size_t(payload.size()), target, out_dtype};
}

void decode_into(const py::array_t<uint8_t, py::array::c_style>& payload, py::array& out, int out_dtype) {
    const szp::DecodeTask t = decode_task(payload, out, out_dtype);
    py::gil_scoped_release nogil;
    szp::decode(t.payload, t.size, t.out, t.out_dtype);
}

// A submitted job plus the arrays it reads and writes, which must outlive it: dropping the handle early
// waits for the job instead of letting a worker write into freed memory.
class PendingDecode {
  public:
    PendingDecode(std::shared_ptr<szp::DecodeJob> job, std::vector<py::object> buffers)
        : job_(std::move(job)), buffers_(std::move(buffers)) {}
    ~PendingDecode() {
        if (!job_->done()) {
            py::gil_scoped_release nogil;
            job_->wait();
        }
    }
    bool done() const { return job_->done(); }
    void wait() {
        const std::string* error;
        {
            py::gil_scoped_release nogil;
            error = &job_->wait();
        }
        if (!error->empty()) throw szp::FormatError(*error);
    }
    double seconds() const { return job_->seconds(); }

  private:
    std::shared_ptr<szp::DecodeJob> job_;
    std::vector<py::object> buffers_;
};

// jobs: (payload, out, out_dtype) triples, decoded in order by one worker; urgent jobs jump the queue.
std::unique_ptr<PendingDecode> submit(szp::DecodePool& pool, const py::list& jobs, bool urgent) {
    std::vector<szp::DecodeTask> tasks;
    std::vector<py::object> buffers;
    for (const py::handle item : jobs) {
        const py::tuple job = item.cast<py::tuple>();
        auto payload = job[0].cast<py::array_t<uint8_t, py::array::c_style>>();
        auto out = job[1].cast<py::array>();
        tasks.push_back(decode_task(payload, out, job[2].cast<int>()));
        buffers.push_back(payload);
        buffers.push_back(out);
    }
    auto pending = std::make_shared<szp::DecodeJob>(std::move(tasks));
    pool.submit(pending, urgent);
    return std::make_unique<PendingDecode>(std::move(pending), std::move(buffers));
}

py::tuple read_header(const py::array_t<uint8_t, py::array::c_style>& payload) {
    const szp::Header h = szp::read_header(payload.data(), payload.size());
    return py::make_tuple(h.n, h.step, h.dtype, h.data_bytes);
}

py::bytes write_header(szp_u64 n, float step, int dtype, szp_u64 data_bytes) {
    char buf[szp::kHeaderBytes];
    szp::write_header(szp::Header{n, step, dtype, data_bytes}, reinterpret_cast<szp_u8*>(buf));
    return py::bytes(buf, sizeof(buf));
}

py::dict layout(szp_u64 n) {
    const szp::Layout l = szp::layout_for(n);
    py::dict d;
    d["blocks"] = l.blocks;
    d["chunks"] = l.chunks;
    d["table_off"] = l.table_off;
    d["rates_off"] = l.rates_off;
    d["data_off"] = l.data_off;
    return d;
}

int openmp_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Threads of later encode/decode calls made from the calling thread (e.g. 1 per worker thread of a pool).
void set_openmp_threads(int n) {
    if (n < 1) throw std::invalid_argument("the number of threads must be at least 1");
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
}

void set_isa(const std::string& name) { szp::set_decode_path(szp::parse_decode_path(name.c_str())); }

std::string isa() { return szp::decode_path_name(szp::decode_path()); }

std::vector<std::string> supported_isas() {
    std::vector<std::string> names;
    for (auto path : {szp::DecodePath::kScalar, szp::DecodePath::kAvx2, szp::DecodePath::kAvx512})
        if (szp::decode_path_supported(path)) names.push_back(szp::decode_path_name(path));
    return names;
}

// The avx2 path's levels (szp_codec.h Avx2Level) by name: how it places the signs.
constexpr const char* kAvx2LevelNames[] = {"base", "bmi2"};

std::vector<std::string> avx2_levels() {
    std::vector<std::string> names;
    if (szp::decode_path_supported(szp::DecodePath::kAvx2))
        for (szp::Avx2Level level : {szp::Avx2Level::kBase, szp::Avx2Level::kBmi2})
            if (szp::avx2_level_supported(level)) names.push_back(kAvx2LevelNames[int(level)]);
    return names;
}

void set_avx2_level(const std::string& name) {
    const std::vector<std::string> names = avx2_levels();  // base, then bmi2 where supported: index = level
    for (size_t level = 0; level < names.size(); ++level)
        if (names[level] == name) return szp::set_avx2_level(szp::Avx2Level(level));
    throw std::invalid_argument("the avx2 decode path has no level '" + name + "' on this CPU");
}

std::string avx2_level() { return kAvx2LevelNames[int(szp::avx2_level())]; }

// The avx512 path's levels (szp_codec.h Avx512Level) by name: what it adds to AVX-512F/BW/VL.
constexpr const char* kAvx512LevelNames[] = {"base", "gfni", "gfni+bf16"};

std::vector<std::string> avx512_levels() {
    std::vector<std::string> names;
    if (szp::decode_path_supported(szp::DecodePath::kAvx512))
        for (int level = 0; level <= int(szp::widest_avx512_level()); ++level) names.push_back(kAvx512LevelNames[level]);
    return names;
}

void set_avx512_level(const std::string& name) {
    const std::vector<std::string> names = avx512_levels();
    for (size_t level = 0; level < names.size(); ++level)
        if (names[level] == name) return szp::set_avx512_level(szp::Avx512Level(level));
    throw std::invalid_argument("the avx512 decode path has no level '" + name + "' on this CPU");
}

std::string avx512_level() { return kAvx512LevelNames[int(szp::avx512_level())]; }

// SlotCache plus the Python objects it points into (payload arrays, the slot pool's memory), kept alive as long
// as it is.
class PySlotCache {
  public:
    PySlotCache(int num_slots, const std::vector<int64_t>& cycle, int64_t experts, int helpers,
                const std::string& eviction)
        : cache_(num_slots, cycle, experts, helpers, eviction_order(eviction)) {}
    static szp::SlotCache::Eviction eviction_order(const std::string& name) {
        if (name == "lru") return szp::SlotCache::Eviction::kLru;
        if (name == "lfu") return szp::SlotCache::Eviction::kLfu;
        throw std::invalid_argument("eviction '" + name + "' is not known; use lru or lfu");
    }
    // matrices: slot's gate, up and down as writable C-contiguous arrays of the pool's memory (one dtype code).
    void set_target(int slot, const py::list& matrices, int out_dtype) {
        std::vector<void*> out;
        std::vector<int64_t> sizes;
        for (const py::handle item : matrices) {
            auto a = item.cast<py::array>();
            out.push_back(decode_target(a, out_dtype));
            sizes.push_back(int64_t(a.size()));
            keep_.push_back(py::reinterpret_borrow<py::object>(item));
        }
        if (numel_.empty()) numel_ = sizes;
        if (sizes != numel_) throw std::invalid_argument("every slot's matrices have the same sizes");
        cache_.set_target(slot, out, out_dtype);
    }
    // payloads: the expert's gate, up and down szp payloads (set_target first: their sizes are checked against a slot's).
    void set_source(int64_t layer, int64_t expert, const py::list& payloads, int64_t nbytes) {
        std::vector<const szp_u8*> data;
        std::vector<size_t> sizes;
        for (size_t m = 0; m < payloads.size(); ++m) {
            auto p = payloads[m].cast<py::array_t<uint8_t, py::array::c_style>>();
            const szp::Header h = szp::read_header(p.data(), p.size());
            if (m >= numel_.size() || h.n != szp_u64(numel_[m]))
                throw std::invalid_argument("a payload's number of values differs from its slot matrix's");
            data.push_back(p.data());
            sizes.push_back(size_t(p.size()));
            keep_.push_back(p);
        }
        cache_.set_source(layer, expert, data, sizes, nbytes);
    }
    std::vector<int64_t> hold(int64_t layer, const std::vector<int64_t>& experts) {
        py::gil_scoped_release nogil;  // it may decode, which needs no Python
        return cache_.hold(layer, experts);
    }
    void guess(int64_t layer, const std::vector<int64_t>& experts) { cache_.guess(layer, experts); }
    void release() { cache_.release(); }
    void begin_step(int64_t tokens) { cache_.begin_step(tokens); }
    py::dict take_counters() {
        const szp::SlotCache::Counters c = cache_.take_counters();
        py::dict d;
        d["hits"] = c.hits;
        d["misses"] = c.misses;
        d["miss_bytes"] = c.miss_bytes;
        d["prefetches_issued"] = c.prefetches_issued;
        d["prefetches_used"] = c.prefetches_used;
        d["prefetch_bytes"] = c.prefetch_bytes;
        d["prefetch_used_bytes"] = c.prefetch_used_bytes;
        d["prefetch_bytes_wasted"] = c.prefetch_bytes_wasted;
        for (const auto& [name, counts] : {std::pair{"prefetches_issued_at", &c.prefetches_issued_at},
                                           std::pair{"prefetches_used_at", &c.prefetches_used_at}}) {
            py::dict by_distance;
            for (size_t distance = 1; distance < counts->size(); ++distance)
                if ((*counts)[distance]) by_distance[py::int_(distance)] = (*counts)[distance];
            d[name] = by_distance;
        }
        d["decode_seconds"] = c.decode_seconds;
        d["wait_seconds"] = c.wait_seconds;
        return d;
    }
    std::vector<std::vector<int64_t>> entries() const { return cache_.entries(); }
    int pinned() const { return cache_.pinned(); }

  private:
    std::vector<int64_t> numel_;  // per matrix, from the first slot
    std::vector<py::object> keep_;
    szp::SlotCache cache_;  // last, so destroyed first: its helpers may still decode into keep_'s arrays
};

}  // namespace

PYBIND11_MODULE(_szp_cpu, m) {
    m.doc() = "szp CPU codec (C++/OpenMP); see docs/szp-format.md";
    py::register_exception<szp::FormatError>(m, "FormatError", PyExc_ValueError);
    m.def("encode", &encode, py::arg("values"), py::arg("dtype"), py::arg("step"), py::arg("eb"));
    m.def("decode_into", &decode_into, py::arg("payload"), py::arg("out"), py::arg("out_dtype"));
    m.def("read_header", &read_header, py::arg("payload"));
    m.def("write_header", &write_header, py::arg("n"), py::arg("step"), py::arg("dtype"), py::arg("data_bytes"));
    m.def("layout", &layout, py::arg("n"));
    m.def("openmp_threads", &openmp_threads);
    m.def("set_openmp_threads", &set_openmp_threads, py::arg("n"));
    // The decode path: MOESERVE_CPU_ISA when the module is imported (as for moeserve._cpu_gemm), else the widest.
    try {
        const char* forced = std::getenv("MOESERVE_CPU_ISA");
        set_isa(forced && *forced ? forced : "auto");
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(std::string("MOESERVE_CPU_ISA: ") + e.what());
    }
    m.def("set_isa", &set_isa, py::arg("name"), "the decode path later calls take: scalar, avx2, avx512 or auto");
    m.def("isa", &isa, "the decode path calls take now");
    m.def("supported_isas", &supported_isas, "the decode paths this CPU can run");
    m.def("avx2_levels", &avx2_levels, "the avx2 path's levels this CPU can run: base (signs by table), bmi2 (by pdep)");
    m.def("set_avx2_level", &set_avx2_level, py::arg("name"), "the level the avx2 path takes from now on");
    m.def("avx2_level", &avx2_level, "the level the avx2 path takes now (by default bmi2 where pdep is fast)");
    m.def("avx512_levels", &avx512_levels, "the avx512 path's levels this CPU can run, narrowest first");
    m.def("set_avx512_level", &set_avx512_level, py::arg("name"), "the level the avx512 path takes from now on");
    m.def("avx512_level", &avx512_level, "the level the avx512 path takes now");
    py::class_<szp::DecodePool>(m, "DecodePool", "Threads that decode szp payloads without holding the GIL.")
        .def(py::init<int, bool>(), py::arg("threads"), py::arg("spare_cores") = true)
        .def("submit", &submit, py::arg("jobs"), py::arg("urgent") = false,
             "Queue (payload, out, out_dtype) decodes (urgent: ahead of the queue); returns a PendingDecode.")
        .def("close", &szp::DecodePool::close, py::call_guard<py::gil_scoped_release>());
    py::class_<PendingDecode>(m, "PendingDecode")
        .def("done", &PendingDecode::done)
        .def("wait", &PendingDecode::wait, "Blocks until decoded; raises FormatError for a malformed payload.")
        .def_property_readonly("seconds", &PendingDecode::seconds);
    py::class_<PySlotCache>(m, "SlotCache", "The expert cache's bookkeeping for compiled CPU steps (csrc/slot_cache.h).")
        .def(py::init<int, const std::vector<int64_t>&, int64_t, int, const std::string&>(), py::arg("num_slots"),
             py::arg("cycle"), py::arg("experts"), py::arg("helpers"), py::arg("eviction") = "lru")
        .def("set_target", &PySlotCache::set_target, py::arg("slot"), py::arg("matrices"), py::arg("out_dtype"))
        .def("set_source", &PySlotCache::set_source, py::arg("layer"), py::arg("expert"), py::arg("payloads"),
             py::arg("nbytes"))
        .def("hold", &PySlotCache::hold, py::arg("layer"), py::arg("experts"),
             "Load and pin `experts` of `layer` until the next hold or release; their slots. FormatError if malformed.")
        .def("guess", &PySlotCache::guess, py::arg("layer"), py::arg("experts"),
             "The experts `layer` is predicted to ask for next, loaded by the next hold of another layer.")
        .def("release", &PySlotCache::release)
        .def("begin_step", &PySlotCache::begin_step, py::arg("tokens"),
             "Make this the cache the calling thread's compiled step reaches (held_slots_address) until release.")
        .def("take_counters", &PySlotCache::take_counters, "OffloadStats' counters since the last take")
        .def("entries", &PySlotCache::entries, "(layer, expert, slot) of every cached expert")
        .def("pinned", &PySlotCache::pinned, "slots pinned now");
    m.def("held_slots_address", [] { return reinterpret_cast<uintptr_t>(&szp::held_slots_entry); },
          "the address of held_slots_entry (slot_cache.h), for the C++ torch op of compiled steps");
    m.attr("BLOCK_VALUES") = szp::kBlockValues;
    m.attr("CHUNK_BLOCKS") = szp::kChunkBlocks;
    m.attr("RAW_RATE") = int(szp::kRawRate);
    m.attr("MAX_RATE") = szp::kMaxRate;
}
