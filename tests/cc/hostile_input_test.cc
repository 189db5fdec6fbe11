// Regression tests for hostile inputs that once crashed, hung, overflowed or were silently
// accepted by the C API (docs/hostile-input.md has the table): PREPARED weights whose buffer is
// shorter than their size query, zero-byte operations with huge dimensions, buffer extents that
// overflow int64 in any order, workspace sizes past 2^64, a workspace that overlaps an argument,
// non-finite routing inputs (accepted, confined to their token), and MXMOE_BACKEND changed by
// another thread while calls run. Each case checks the exact status, the message, and that the
// outputs are untouched. Meant to run under ASan + UBSan as well (tools/sanitize.sh), where a
// reintroduced overflow or out-of-bounds read is a report.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <chrono>
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
constexpr uint8_t kPoison = 0xA5;
constexpr mxmoe_status OK = MXMOE_STATUS_OK;
constexpr mxmoe_status INVALID = MXMOE_STATUS_INVALID_ARGUMENT;
constexpr int64_t kTwo62 = int64_t{1} << 62;

bool Untouched(const std::vector<uint8_t>& bytes) {
  for (uint8_t b : bytes) {
    if (b != kPoison) return false;
  }
  return true;
}

void ExpectStatus(const char* what, mxmoe_status got, mxmoe_status want,
                  std::initializer_list<const char*> fragments) {
  EXPECT(got == want, "%s: got %s, want %s (%s)", what, mxmoe_status_string(got),
         mxmoe_status_string(want), mxmoe_last_error());
  for (const char* fragment : fragments) {
    EXPECT(strstr(mxmoe_last_error(), fragment) != nullptr, "%s: '%s' not in \"%s\"", what,
           fragment, mxmoe_last_error());
  }
}

// Values in [-1000, 1000] / 4000.
std::vector<uint16_t> RandomBf16(size_t n, uint32_t seed) {
  return mxmoe_test::LcgBf16(n, seed, 4000.0f);
}

// LINEAR weights [E, n, k] quantized from random bf16, and their CPU PREPARED buffer.
struct Weights {
  int32_t experts;
  int64_t n, k;
  std::vector<uint8_t> packed, scales, prepared;

  Weights(int32_t e, int64_t n_, int64_t k_, uint32_t seed) : experts(e), n(n_), k(k_) {
    const std::vector<uint16_t> w = RandomBf16(static_cast<size_t>(e * n * k), seed);
    packed.resize(static_cast<size_t>(e * n * k / 2));
    scales.resize(static_cast<size_t>(e * n * k / 32));
    mxmoe_quantize_weights_args q{e,           n, k, w.data(), MXMOE_DTYPE_BF16, packed.data(),
                                  scales.data(), MXMOE_SCALE_LAYOUT_LINEAR, kCpu};
    EXPECT_OK(mxmoe_quantize_weights(&q, nullptr));
    mxmoe_prepare_weights_args p{};
    p.weights = Linear();
    p.backend = MXMOE_BACKEND_CPU;
    p.device = kCpu;
    size_t bytes = 0;
    EXPECT_OK(mxmoe_prepare_weights_size(&p, &bytes));
    prepared.resize(bytes);
    p.prepared = prepared.data();
    p.prepared_bytes = bytes;
    EXPECT_OK(mxmoe_prepare_weights(&p, nullptr));
  }
  mxmoe_expert_weights Linear() const {
    mxmoe_expert_weights w{};
    w.num_experts = experts;
    w.n = n;
    w.k = k;
    w.format = MXMOE_WEIGHT_FORMAT_LINEAR;
    w.packed = packed.data();
    w.scales = scales.data();
    return w;
  }
  mxmoe_expert_weights Prepared(size_t claimed) const {
    mxmoe_expert_weights w = Linear();
    w.format = MXMOE_WEIGHT_FORMAT_PREPARED;
    w.backend = MXMOE_BACKEND_CPU;
    w.packed = prepared.data();
    w.scales = nullptr;
    w.prepared_bytes = claimed;
    return w;
  }
};

// The small MoE problem the tests below vary: T tokens, E experts with LINEAR w13 [E, 2I, H] and
// w2 [E, H, I], top_k slots, bf16 activations, on the CPU. Inputs, outputs and routing are the
// caller's.
mxmoe_moe_forward_args SmallMoe(int64_t t, int64_t hidden, int64_t inter, int32_t top_k,
                                const Weights& w13, const Weights& w2) {
  mxmoe_moe_forward_args m{};
  m.num_tokens = t;
  m.hidden_size = hidden;
  m.intermediate_size = inter;
  m.num_global_experts = w13.experts;
  m.num_local_experts = w13.experts;
  m.top_k = top_k;
  m.activation_dtype = MXMOE_DTYPE_BF16;
  m.w13 = w13.Linear();
  m.w2 = w2.Linear();
  m.device = kCpu;
  return m;
}

// ---- PREPARED weights carry their length --------------------------------------------------------

void TestPreparedBytes() {
  const int32_t e = 3;
  const int64_t rows = 5, n = 64, k = 96;
  Weights b(e, n, k, 1);
  // A: 5 rows over experts {2, 0, 3}, quantized per expert.
  const std::vector<uint16_t> x = RandomBf16(static_cast<size_t>(rows * k), 2);
  const int32_t eo[] = {0, 2, 2, 5};
  const int32_t bo[] = {0, 128, 128, 256};
  std::vector<uint8_t> a(static_cast<size_t>(rows * k / 2));
  std::vector<uint8_t> a_scales(static_cast<size_t>(256 * 4));
  mxmoe_experts_quantize_args q{rows, k, e, x.data(), MXMOE_DTYPE_BF16, eo, bo, a.data(),
                                a_scales.data(), 256, kCpu};
  EXPECT_OK(mxmoe_experts_quantize(&q, nullptr));

  mxmoe_grouped_gemm_args g{};
  g.rows = rows;
  g.n = n;
  g.k = k;
  g.num_experts = e;
  g.a = a.data();
  g.a_scales = a_scales.data();
  g.a_scale_rows = 256;
  g.expert_offsets = eo;
  g.blockscale_offsets = bo;
  g.c_dtype = MXMOE_DTYPE_BF16;
  g.device = kCpu;
  std::vector<uint8_t> want(static_cast<size_t>(rows * n * 2), kPoison);
  g.b = b.Linear();
  g.c = want.data();
  EXPECT_OK(mxmoe_grouped_gemm(&g, nullptr, 0, nullptr));
  std::vector<uint8_t> got(want.size(), kPoison);
  g.c = got.data();
  g.b = b.Prepared(b.prepared.size());
  EXPECT_OK(mxmoe_grouped_gemm(&g, nullptr, 0, nullptr));
  EXPECT(got == want, "PREPARED and LINEAR weights give different results");

  const std::string needed = std::to_string(b.prepared.size());
  for (size_t claimed : {size_t{0}, size_t{1}, b.prepared.size() - 1}) {
    std::vector<uint8_t> c(want.size(), kPoison);
    g.c = c.data();
    g.b = b.Prepared(claimed);
    ExpectStatus("grouped_gemm with a short PREPARED buffer", mxmoe_grouped_gemm(&g, nullptr, 0,
                                                                                  nullptr),
                 INVALID, {"b.prepared_bytes must be at least", needed.c_str()});
    EXPECT(Untouched(c), "c written by a rejected call (claimed %zu)", claimed);
  }
  // The case: 64 experts of 4096 x 4096 declared over a 1-byte buffer (once a
  // heap-buffer-overflow read in the CPU GEMM).
  {
    const uint8_t one = 0;
    std::vector<int32_t> eo64(65, 0), bo64(65, 0);
    eo64.back() = 0;
    std::vector<uint8_t> c;
    mxmoe_grouped_gemm_args h = g;
    h.rows = 0;
    h.n = 4096;
    h.k = 4096;
    h.num_experts = 64;
    h.a_scale_rows = 0;
    h.expert_offsets = eo64.data();
    h.blockscale_offsets = bo64.data();
    h.c = nullptr;
    h.b = mxmoe_expert_weights{64, 4096, 4096, MXMOE_WEIGHT_FORMAT_PREPARED, MXMOE_BACKEND_CPU,
                               &one, nullptr, 1};
    ExpectStatus("64 x 4096 x 4096 PREPARED over 1 byte", mxmoe_grouped_gemm(&h, nullptr, 0,
                                                                             nullptr),
                 INVALID, {"b.prepared_bytes must be at least", "got 1"});
    // The size query checks the same (shapes and the claimed length, no data).
    size_t bytes = 12345;
    ExpectStatus("size query, 1-byte PREPARED", mxmoe_grouped_gemm_workspace_size(&h, &bytes),
                 INVALID, {"b.prepared_bytes"});
    EXPECT(bytes == 12345, "a failed size query wrote *bytes");
  }

  // MoE forward: w13 / w2 PREPARED, one of them short.
  const int64_t t = 4, hidden = 64, inter = 32;
  Weights w13(2, 2 * inter, hidden, 3), w2(2, hidden, inter, 4);
  const std::vector<uint16_t> hs = RandomBf16(static_cast<size_t>(t * hidden), 5);
  const std::vector<int32_t> ids = {0, 1, 1, 0};
  const std::vector<float> weights = {1.0f, 0.5f, 0.25f, 2.0f};
  mxmoe_moe_forward_args m = SmallMoe(t, hidden, inter, 1, w13, w2);
  m.hidden_states = hs.data();
  m.topk_ids = ids.data();
  m.topk_weights = weights.data();
  m.w13 = w13.Prepared(w13.prepared.size());
  m.w2 = w2.Prepared(w2.prepared.size() / 2);
  std::vector<uint8_t> out(static_cast<size_t>(t * hidden * 2), kPoison);
  m.output = out.data();
  size_t ws_bytes = 0;
  ExpectStatus("moe size query, short w2", mxmoe_moe_forward_workspace_size(&m, &ws_bytes),
               INVALID, {"w2.prepared_bytes must be at least"});
  std::vector<uint8_t> ws(1 << 20);
  ExpectStatus("moe_forward, short w2", mxmoe_moe_forward(&m, ws.data(), ws.size(), nullptr),
               INVALID, {"w2.prepared_bytes must be at least"});
  EXPECT(Untouched(out), "moe output written by a rejected call");
  m.w2 = w2.Prepared(w2.prepared.size());
  EXPECT_OK(mxmoe_moe_forward_workspace_size(&m, &ws_bytes));
  ws.assign(ws_bytes, 0);
  EXPECT_OK(mxmoe_moe_forward(&m, ws.data(), ws.size(), nullptr));
}

// ---- zero-byte operations and the int64 extent rule -------------------------------------------

template <typename Call>
double Seconds(const Call& call) {
  const auto start = std::chrono::steady_clock::now();
  call();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void TestZeroByteOperations() {
  // Once a hang: cols = 0 with rows = 2^62 looped 2^62 times over zero bytes.
  mxmoe_swizzle_scales_args s{1, kTwo62, 0, nullptr, nullptr, kCpu};
  double took = Seconds([&] {
    ExpectStatus("swizzle rows=2^62 cols=0", mxmoe_swizzle_scales(&s, nullptr), OK, {});
    ExpectStatus("unswizzle rows=2^62 cols=0", mxmoe_unswizzle_scales(&s, nullptr), OK, {});
  });
  EXPECT(took < 1.0, "zero-byte swizzles took %.2f s", took);
  // The same with every other entry point that loops over rows.
  mxmoe_quantize_args q{};
  q.rows = kTwo62 / 2;
  q.k = 0;
  q.input_dtype = MXMOE_DTYPE_BF16;
  q.scale_layout = MXMOE_SCALE_LAYOUT_SWIZZLED_128X4;
  q.device = kCpu;
  mxmoe_dequantize_args d{kTwo62 / 4, 0, nullptr, nullptr, MXMOE_SCALE_LAYOUT_LINEAR, nullptr,
                          MXMOE_DTYPE_FP32, kCpu};
  const int32_t zeros[2] = {0, 0};
  mxmoe_experts_quantize_args eq{kTwo62 / 2, 0, 1, nullptr, MXMOE_DTYPE_BF16, zeros, zeros,
                                 nullptr, nullptr, 0, kCpu};
  mxmoe_quantize_weights_args qw{1, kTwo62 / 2, 0, nullptr, MXMOE_DTYPE_BF16, nullptr, nullptr,
                                 MXMOE_SCALE_LAYOUT_LINEAR, kCpu};
  took = Seconds([&] {
    ExpectStatus("quantize rows=2^61 k=0", mxmoe_quantize(&q, nullptr), OK, {});
    ExpectStatus("dequantize rows=2^60 k=0", mxmoe_dequantize(&d, nullptr), OK, {});
    ExpectStatus("experts_quantize rows=2^61 k=0", mxmoe_experts_quantize(&eq, nullptr), OK, {});
    ExpectStatus("quantize_weights n=2^61 k=0", mxmoe_quantize_weights(&qw, nullptr), OK, {});
  });
  EXPECT(took < 1.0, "zero-byte operations took %.2f s", took);

  // Extents that multiply past int64 are rejected whatever their order and even at 0 bytes
  // (once accepted or rejected depending on where the zero stood).
  const int64_t big = int64_t{1} << 40;
  for (const auto& dims : {std::vector<int64_t>{0, big, big}, std::vector<int64_t>{big, big, 0},
                           std::vector<int64_t>{big, 0, big}}) {
    mxmoe_swizzle_scales_args z{dims[0], dims[1], dims[2], nullptr, nullptr, kCpu};
    const std::string what = "swizzle [" + std::to_string(dims[0]) + ", " +
                             std::to_string(dims[1]) + ", " + std::to_string(dims[2]) + "]";
    ExpectStatus(what.c_str(), mxmoe_swizzle_scales(&z, nullptr), INVALID,
                 {"size of input", "overflows int64"});
    ExpectStatus(what.c_str(), mxmoe_unswizzle_scales(&z, nullptr), INVALID, {"overflows int64"});
  }
  // Found by the fuzzer: n = INT64_MIN once overflowed doubling it for the input's columns.
  mxmoe_silu_mul_experts_quantize_args sq{};
  sq.rows = 1;
  sq.n = INT64_MIN;
  sq.num_experts = 1;
  sq.input_dtype = MXMOE_DTYPE_BF16;
  sq.device = kCpu;
  ExpectStatus("silu_mul n=INT64_MIN", mxmoe_silu_mul_experts_quantize(&sq, nullptr), INVALID,
               {"n must be >= 0"});
  q.rows = kTwo62;  // [2^62, 0] bf16: 2^63 bytes of extent
  ExpectStatus("quantize [2^62, 0] bf16", mxmoe_quantize(&q, nullptr), INVALID,
               {"size of input", "overflows int64"});
}

// ---- size arithmetic ----------------------------------------------------------------------------

void TestWorkspaceSizeOverflow() {
  // Once OK with a size wrapped past 2^64.
  mxmoe_moe_forward_args m{};
  m.num_tokens = 7;
  m.hidden_size = 244571238902554240;
  m.intermediate_size = 32;
  m.num_global_experts = 7;
  m.num_local_experts = 7;
  m.top_k = 6;
  m.activation_dtype = MXMOE_DTYPE_BF16;
  m.w13 = mxmoe_expert_weights{7, 64, m.hidden_size, MXMOE_WEIGHT_FORMAT_LINEAR, 0, nullptr,
                               nullptr, 0};
  m.w2 = mxmoe_expert_weights{7, m.hidden_size, 32, MXMOE_WEIGHT_FORMAT_LINEAR, 0, nullptr,
                              nullptr, 0};
  m.device = kCpu;
  size_t bytes = 777;
  const mxmoe_status s = mxmoe_moe_forward_workspace_size(&m, &bytes);
  ExpectStatus("moe workspace T=7 H=2.4e17 E=7 top_k=6", s, INVALID, {"overflows int64"});
  EXPECT(bytes == 777, "a failed size query wrote %zu", bytes);
  // Just inside: every slice and their sum computed without wrapping (the size is huge but
  // exact, and the query says so).
  for (int64_t h : {int64_t{32}, int64_t{1} << 20, int64_t{1} << 40}) {
    m.hidden_size = h;
    m.w13.k = h;
    m.w2.n = h;
    bytes = 0;
    const mxmoe_status ok = mxmoe_moe_forward_workspace_size(&m, &bytes);
    EXPECT(ok == OK || ok == INVALID, "H=%lld: %s", static_cast<long long>(h),
           mxmoe_last_error());
    if (ok == OK) {
      // At least the gathered activations: 42 rows of H bf16.
      EXPECT(bytes >= static_cast<size_t>(42 * h * 2), "H=%lld: %zu bytes is too small",
             static_cast<long long>(h), bytes);
    }
  }
}

// ---- workspace overlapping an argument ------------------------------------------------------------

void TestWorkspaceOverlap() {
  const int64_t t = 4, hidden = 64, inter = 32;
  Weights w13(2, 2 * inter, hidden, 6), w2(2, hidden, inter, 7);
  // topk_ids sits at the start of a buffer large enough to hold a workspace, so that a
  // regression corrupts nothing outside it.
  std::vector<int32_t> ids(1 << 18, 0);
  ids[1] = ids[2] = 1;
  const std::vector<float> weights = {1.0f, 0.5f, 0.25f, 2.0f};
  mxmoe_moe_forward_args m = SmallMoe(t, hidden, inter, 1, w13, w2);
  m.topk_ids = ids.data();
  m.topk_weights = weights.data();
  size_t needed = 0;
  EXPECT_OK(mxmoe_moe_forward_workspace_size(&m, &needed));
  EXPECT(needed <= ids.size() * 4, "workspace of %zu bytes", needed);
  // One allocation holding the hidden states, the output and room for a workspace.
  const size_t hidden_bytes = static_cast<size_t>(t * hidden * 2);
  std::vector<uint8_t> arena(2 * hidden_bytes + needed + 64, kPoison);
  const std::vector<uint16_t> hs = RandomBf16(static_cast<size_t>(t * hidden), 8);
  memcpy(arena.data(), hs.data(), hidden_bytes);
  m.hidden_states = arena.data();
  uint8_t* output = arena.data() + hidden_bytes;
  m.output = output;
  uint8_t* free_space = output + hidden_bytes;
  EXPECT_OK(mxmoe_moe_forward(&m, free_space, needed, nullptr));
  const std::vector<uint8_t> want(output, output + hidden_bytes);
  // Once silently a wrong result: the workspace overwrote the inputs it was computed from.
  struct Case {
    const char* what;
    uint8_t* workspace;
    const char* names;
  };
  const Case cases[] = {
      {"workspace over hidden_states", arena.data(), "hidden_states"},
      {"workspace over the output", output + 8, "output"},
      {"workspace over topk_ids", reinterpret_cast<uint8_t*>(ids.data()), "topk_ids"},
  };
  for (const Case& c : cases) {
    memset(output, kPoison, hidden_bytes);
    ExpectStatus(c.what, mxmoe_moe_forward(&m, c.workspace, needed, nullptr), INVALID,
                 {"workspace", "overlaps", c.names});
    EXPECT(Untouched(std::vector<uint8_t>(output, output + hidden_bytes)),
           "%s: the output was written", c.what);
  }
  EXPECT(memcmp(arena.data(), hs.data(), hidden_bytes) == 0, "hidden_states changed");
  EXPECT_OK(mxmoe_moe_forward(&m, free_space, needed, nullptr));
  EXPECT(memcmp(output, want.data(), hidden_bytes) == 0, "the result changed");
}

// ---- non-finite routing inputs -------------------------------------------------------------------

void TestNonFiniteRouting() {
  // One policy for router logits and topk weights (mxmoe.h): accepted, confined to their token.
  // Once NaN logits were accepted but NaN weights rejected.
  const int64_t t = 5, hidden = 64, inter = 32;
  const int32_t e = 3;
  Weights w13(e, 2 * inter, hidden, 9), w2(e, hidden, inter, 10);
  const std::vector<uint16_t> hs = RandomBf16(static_cast<size_t>(t * hidden), 11);
  mxmoe_moe_forward_args m = SmallMoe(t, hidden, inter, 2, w13, w2);
  m.renormalize = 1;
  m.hidden_states = hs.data();
  size_t bytes = 0;
  EXPECT_OK(mxmoe_moe_forward_workspace_size(&m, &bytes));
  std::vector<uint8_t> ws(bytes);
  const size_t row_bytes = static_cast<size_t>(hidden * 2);
  auto run = [&](std::vector<uint8_t>* out) {
    out->assign(static_cast<size_t>(t) * row_bytes, kPoison);
    m.output = out->data();
    return mxmoe_moe_forward(&m, ws.data(), ws.size(), nullptr);
  };
  auto same_rows_except = [&](const std::vector<uint8_t>& a, const std::vector<uint8_t>& b,
                              std::initializer_list<int64_t> skip) {
    for (int64_t r = 0; r < t; ++r) {
      bool skipped = false;
      for (int64_t s : skip) skipped |= s == r;
      if (!skipped && memcmp(a.data() + r * row_bytes, b.data() + r * row_bytes, row_bytes)) {
        return false;
      }
    }
    return true;
  };
  // Precomputed top-k: a NaN weight in token 1, an Inf weight in token 3.
  std::vector<int32_t> ids = {0, 1, 1, 2, 2, 0, 0, 2, 1, 0};
  std::vector<float> weights = {0.5f, 0.5f, 0.25f, 0.75f, 1.0f, 0.0f, 0.3f, 0.7f, 0.9f, 0.1f};
  m.topk_ids = ids.data();
  m.topk_weights = weights.data();
  std::vector<uint8_t> clean, dirty;
  EXPECT_OK(run(&clean));
  weights[2] = NAN;
  weights[7] = INFINITY;
  ExpectStatus("NaN and Inf topk_weights", run(&dirty), OK, {});
  EXPECT(same_rows_except(clean, dirty, {1, 3}), "non-finite weights changed other tokens");
  // Router logits: a NaN in token 0, +Inf in token 4.
  std::vector<float> logits(static_cast<size_t>(t * e));
  for (size_t j = 0; j < logits.size(); ++j) logits[j] = 0.37f * static_cast<float>(j % 7) - 1;
  m.topk_ids = nullptr;
  m.topk_weights = nullptr;
  m.router_logits = logits.data();
  m.router_logits_dtype = MXMOE_DTYPE_FP32;
  EXPECT_OK(run(&clean));
  logits[1] = NAN;
  logits[13] = INFINITY;
  ExpectStatus("NaN and Inf router logits", run(&dirty), OK, {});
  EXPECT(same_rows_except(clean, dirty, {0, 4}), "non-finite logits changed other tokens");
}

// ---- MXMOE_BACKEND changed by another thread ------------------------------------------------------

void TestBackendEnvRace() {
  // Once a SEGV inside getenv: every call read MXMOE_BACKEND while another thread changed the
  // environment. Now it is read once; these calls must neither crash nor change backend.
  mxmoe_backend first = MXMOE_BACKEND_AUTO;
  EXPECT_OK(mxmoe_backend_for_device(kCpu, &first));
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    for (int i = 0; i < 2000 && !stop.load(); ++i) {
      setenv("MXMOE_BACKEND", i % 2 ? "sm90" : "tpu", 1);
      // A growing environment makes setenv reallocate environ, which is what crashed getenv.
      setenv(("MXMOE_HOSTILE_TEST_" + std::to_string(i)).c_str(), "x", 1);
    }
  });
  std::vector<std::thread> readers;
  std::atomic<int> changed{0};
  for (int r = 0; r < 4; ++r) {
    readers.emplace_back([&] {
      for (int i = 0; i < 2000; ++i) {
        mxmoe_backend b = MXMOE_BACKEND_AUTO;
        if (mxmoe_backend_for_device(kCpu, &b) != OK || b != first) ++changed;
      }
    });
  }
  for (std::thread& th : readers) th.join();
  stop = true;
  writer.join();
  EXPECT(changed.load() == 0, "%d calls saw a different backend after MXMOE_BACKEND changed",
         changed.load());
  for (int i = 0; i < 2000; ++i) unsetenv(("MXMOE_HOSTILE_TEST_" + std::to_string(i)).c_str());
  unsetenv("MXMOE_BACKEND");
}

}  // namespace

int main() {
  unsetenv("MXMOE_BACKEND");
  TestPreparedBytes();
  TestZeroByteOperations();
  TestWorkspaceSizeOverflow();
  TestWorkspaceOverlap();
  TestNonFiniteRouting();
  TestBackendEnvRace();
  if (failures != 0) {
    fprintf(stderr, "hostile_input_test: %d failures\n", failures);
    return 1;
  }
  printf("hostile_input_test: all cases passed\n");
  return 0;
}
