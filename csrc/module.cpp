// The Python module fastloss._C. Importing it loads the library, whose static initialisers
// register the ops with torch; the few functions here only report how it was built and let
// tests pick the CPU kernels. No torch headers: ops are reached through torch.ops.fastloss.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "common/block_queue.h"
#include "common/cpu_features.h"
#include "losses/losses_kernels.h"
#include "quant/quant_kernels.h"

#ifndef FASTLOSS_CUDA_ARCHS
#define FASTLOSS_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastloss compiled kernels";
#if defined(FASTLOSS_WITH_CUDA)
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.attr("cuda_archs") = FASTLOSS_CUDA_ARCHS;
  m.def("cpu_supports_avx2", &fastloss::cpu_supports_avx2_fma,
        "Whether this CPU has AVX2, FMA and F16C (and the OS enables them).");
  m.def("cpu_supports_avx512", &fastloss::cpu_supports_avx512,
        "Whether this CPU has AVX512F (and the OS enables it).");
  m.def("cpu_supports_amx", &fastloss::cpu_supports_amx_bf16,
        "Whether this CPU has AMX-BF16 (with AVX-512), the OS lets this process use it, and "
        "this build has the AMX kernels.");
  m.def("cpu_supports_amx_int8", &fastloss::cpu_supports_amx_int8,
        "Whether cpu_supports_amx() and the CPU has AMX-INT8 (the low-bit GEMV's small batches).");
  m.def("cpu_isa", [] { return fastloss::cpu_isa_name(fastloss::active_cpu_isa()); },
        "The instruction set the CPU kernels run with now: 'amx', 'avx512', 'avx2' or 'generic'.");
  m.def("set_cpu_isa", &fastloss::set_cpu_isa, pybind11::arg("name"),
        "Choose the CPU kernels: 'auto', 'amx', 'avx512', 'avx2' or 'generic'. False if unavailable.");
  m.def(
      "_store_floats",
      [](const std::vector<float>& values, int dtype) {
        // bits of each value stored as float32 (0), float16 (1) or bfloat16 (2)
        const auto t = fastloss::ScalarType(dtype);
        const size_t size = t == fastloss::ScalarType::f32 ? 4 : 2;
        std::vector<uint8_t> raw(values.size() * size);
        fastloss::store_floats_cpu(values.data(), raw.data(), int64_t(values.size()), t);
        std::vector<uint32_t> bits(values.size());
        for (size_t i = 0; i < values.size(); ++i) {
          uint32_t b = 0;
          std::memcpy(&b, raw.data() + i * size, size);
          bits[i] = b;
        }
        return bits;
      },
      pybind11::arg("values"), pybind11::arg("dtype"),
      "Test helper: the bits the CPU kernels store for each float (dtype 0 f32, 1 f16, 2 bf16).");
  m.def(
      "_quant_amx_gemv_slots",
      [](int bits, int64_t K, int64_t group, int64_t M, bool codebook) -> int64_t {
        if (group < 1 || K < 0) return 0;
        fastloss::QuantWeight w;
        w.bits = bits, w.K = K, w.group = group;
        static const float entry = 0.f;
        w.codebook = codebook ? &entry : nullptr;
        return fastloss::quant_amx_gemv_slots(w, M);
      },
      pybind11::arg("bits"), pybind11::arg("K"), pybind11::arg("group"), pybind11::arg("M"),
      pybind11::arg("codebook") = false,
      "Test helper: the groups per tile column set of the AMX-INT8 GEMV for a float32 x of M rows "
      "(0: that path does not apply, here or with the active CPU kernels).");
  m.def(
      "_block_queue_takes",
      [](int64_t count, int threads, bool hold_first) {
        // each block's (thread, order in that thread, from its own range) as taken by `threads`
        // threads; hold_first: thread 0 takes one block, then waits until the others have
        // found nothing left (they steal the rest of its range)
        if (count < 0 || count >= (int64_t(1) << 32)) throw pybind11::value_error("count must be in [0, 2^32)");
        fastloss::BlockQueue queue(count, threads);
        std::vector<std::vector<int64_t>> takes(static_cast<size_t>(count));
        std::atomic<int> finished{0};
        std::atomic<bool> first_taken{false};
        std::vector<std::thread> team;
        for (int t = 0; t < queue.threads(); ++t) {
          team.emplace_back([&, t] {
            bool forward = true;
            for (int64_t b, n = 0; (b = queue.next(t, &forward)) >= 0; ++n) {
              takes[size_t(b)].insert(takes[size_t(b)].end(), {t, n, forward ? 1 : 0});
              if (t == 0 && hold_first) {
                first_taken.store(true);
                while (finished.load() < queue.threads() - 1) std::this_thread::yield();
              }
            }
            finished.fetch_add(1);
          });
          // (the others start once thread 0 holds its first block: else they could take it)
          if (t == 0 && hold_first && count > 0)
            while (!first_taken.load()) std::this_thread::yield();
        }
        for (auto& thread : team) thread.join();
        return takes;
      },
      pybind11::arg("count"), pybind11::arg("threads"), pybind11::arg("hold_first") = false,
      "Test helper: how a BlockQueue's blocks were taken (one [thread, order, own] per taking).");
}
