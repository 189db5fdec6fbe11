// The C API called from several threads at once (what a serving stack does): each thread runs
// quantize, grouped_gemm and moe_forward on shared read-only inputs with its own outputs and
// workspace, and must get bit for bit the single-threaded results (each call also fans out to
// the CPU backend's worker threads); meanwhile each thread's failed calls must report its own
// message (mxmoe_last_error is thread-local). Run under ThreadSanitizer by tools/sanitize.sh
// (`bazel test --config=tsan //tests/cc:concurrency_test`), where any data race is a failure.
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <string>
#include <thread>
#include <vector>

#include "mxmoe/format.h"
#include "mxmoe/mxmoe.h"
#include "tests/cc/expect.h"
#include "tests/cc/random_bf16.h"

namespace {

using mxmoe_test::failures;

constexpr mxmoe_device kCpu = {MXMOE_DEVICE_CPU, 0};
constexpr int kThreads = 6;
constexpr int kIterations = 3;

// Values in [-1000, 1000] / 3000.
std::vector<uint16_t> RandomBf16(size_t n, uint32_t seed) {
  return mxmoe_test::LcgBf16(n, seed, 3000.0f);
}

struct Problem {
  // MoE: T tokens, E experts, H, I; awkward sizes (an expert gets no token).
  static constexpr int64_t kT = 9, kH = 96, kI = 64;
  static constexpr int32_t kE = 4, kTopK = 2;
  std::vector<uint16_t> hidden = RandomBf16(kT * kH, 1);
  std::vector<uint8_t> w13_packed, w13_scales, w2_packed, w2_scales;
  std::vector<int32_t> topk_ids;
  std::vector<float> topk_weights;

  Problem() {
    Quantize(RandomBf16(kE * 2 * kI * kH, 2), 2 * kI, kH, &w13_packed, &w13_scales);
    Quantize(RandomBf16(kE * kH * kI, 3), kH, kI, &w2_packed, &w2_scales);
    for (int64_t t = 0; t < kT; ++t) {
      topk_ids.push_back(static_cast<int32_t>(t % 3));  // expert 3 is never chosen
      topk_ids.push_back(static_cast<int32_t>((t * 5 + 1) % 3));
      topk_weights.push_back(0.75f);
      topk_weights.push_back(0.25f + 0.01f * t);
    }
  }

  static void Quantize(const std::vector<uint16_t>& w, int64_t n, int64_t k,
                       std::vector<uint8_t>* packed, std::vector<uint8_t>* scales) {
    packed->resize(kE * n * k / 2);
    scales->resize(kE * n * k / 32);
    mxmoe_quantize_weights_args a{kE, n, k, w.data(), MXMOE_DTYPE_BF16, packed->data(),
                                  scales->data(), MXMOE_SCALE_LAYOUT_LINEAR, kCpu};
    EXPECT_OK(mxmoe_quantize_weights(&a, nullptr));
  }

  mxmoe_expert_weights Weights(const std::vector<uint8_t>& packed,
                               const std::vector<uint8_t>& scales, int64_t n, int64_t k) const {
    mxmoe_expert_weights w{};
    w.num_experts = kE;
    w.n = n;
    w.k = k;
    w.format = MXMOE_WEIGHT_FORMAT_LINEAR;
    w.packed = packed.data();
    w.scales = scales.data();
    return w;
  }
};

// One thread's results: the quantized hidden states, GEMM1 on them, and the whole MoE layer.
struct Results {
  std::vector<uint8_t> packed, scales, gemm, moe;
  bool operator==(const Results& o) const {
    return packed == o.packed && scales == o.scales && gemm == o.gemm && moe == o.moe;
  }
};

Results Run(const Problem& p) {
  using P = Problem;
  Results r;
  // Per-expert quantization of the hidden rows (3, 0, 4, 2 rows) and GEMM1 on them.
  const int32_t eo[] = {0, 3, 3, 7, 9};
  const int32_t bo[] = {0, 128, 128, 256, 384};
  r.packed.assign(P::kT * P::kH / 2, 0);
  r.scales.assign(384 * 4, 0);
  mxmoe_experts_quantize_args q{P::kT,          P::kH, P::kE, p.hidden.data(), MXMOE_DTYPE_BF16,
                                eo,             bo,    r.packed.data(),         r.scales.data(),
                                384,            kCpu};
  EXPECT_OK(mxmoe_experts_quantize(&q, nullptr));
  r.gemm.assign(P::kT * 2 * P::kI * 2, 0);
  mxmoe_grouped_gemm_args g{};
  g.rows = P::kT;
  g.n = 2 * P::kI;
  g.k = P::kH;
  g.num_experts = P::kE;
  g.a = r.packed.data();
  g.a_scales = r.scales.data();
  g.a_scale_rows = 384;
  g.b = p.Weights(p.w13_packed, p.w13_scales, 2 * P::kI, P::kH);
  g.expert_offsets = eo;
  g.blockscale_offsets = bo;
  g.c = r.gemm.data();
  g.c_dtype = MXMOE_DTYPE_BF16;
  g.device = kCpu;
  EXPECT_OK(mxmoe_grouped_gemm(&g, nullptr, 0, nullptr));

  mxmoe_moe_forward_args m{};
  m.num_tokens = P::kT;
  m.hidden_size = P::kH;
  m.intermediate_size = P::kI;
  m.num_global_experts = P::kE;
  m.num_local_experts = P::kE;
  m.top_k = P::kTopK;
  m.hidden_states = p.hidden.data();
  m.activation_dtype = MXMOE_DTYPE_BF16;
  m.topk_ids = p.topk_ids.data();
  m.topk_weights = p.topk_weights.data();
  m.w13 = p.Weights(p.w13_packed, p.w13_scales, 2 * P::kI, P::kH);
  m.w2 = p.Weights(p.w2_packed, p.w2_scales, P::kH, P::kI);
  m.device = kCpu;
  r.moe.assign(P::kT * P::kH * 2, 0);
  m.output = r.moe.data();
  size_t bytes = 0;
  EXPECT_OK(mxmoe_moe_forward_workspace_size(&m, &bytes));
  std::vector<uint8_t> workspace(bytes);
  EXPECT_OK(mxmoe_moe_forward(&m, workspace.data(), workspace.size(), nullptr));
  return r;
}

// A failed call whose message names this thread's own value, then a successful call that must
// clear it, interleaved with the other threads doing the same.
void CheckOwnErrors(int thread) {
  for (int i = 0; i < 20; ++i) {
    const int64_t k = 33 + 32 * (thread * 100 + i);  // never a multiple of 32
    mxmoe_quantize_args a{};
    a.rows = 1;
    a.k = k;
    a.device = kCpu;
    const mxmoe_status s = mxmoe_quantize(&a, nullptr);
    const std::string want = "got " + std::to_string(k);
    EXPECT(s == MXMOE_STATUS_INVALID_ARGUMENT && strstr(mxmoe_last_error(), want.c_str()),
           "thread %d: expected '%s' in \"%s\"", thread, want.c_str(), mxmoe_last_error());
    mxmoe_backend backend;
    EXPECT_OK(mxmoe_backend_for_device(kCpu, &backend));
    EXPECT(mxmoe_last_error()[0] == '\0', "thread %d: success kept \"%s\"", thread,
           mxmoe_last_error());
  }
}

}  // namespace

int main() {
  const Problem problem;
  const Results reference = Run(problem);
  std::vector<int> mismatches(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kIterations; ++i) {
        if (!(Run(problem) == reference)) ++mismatches[t];
        CheckOwnErrors(t);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int t = 0; t < kThreads; ++t) {
    EXPECT(mismatches[t] == 0, "thread %d: %d of %d runs differ from the single-threaded run", t,
           mismatches[t], kIterations);
  }
  if (failures != 0) {
    fprintf(stderr, "concurrency_test: %d failures\n", failures);
    return 1;
  }
  printf("concurrency_test: %d threads x %d runs identical to the single-threaded run\n",
         kThreads, kIterations);
  return 0;
}
