// The CUDA kernels' limits (cuda::CanImplement*, the functions cc/src/validate.cc asks for the
// size query and the run alike) checked on the CPU: they are host code with no CUDA call, so no
// GPU is needed. Covers the cases where the kernels used to disagree with the contract:
//   - n = 0 is valid (validate accepts it and the CPU computes it): every GPU backend implements
//     it (nothing to write), whatever else the shape says;
//   - the sm90 limits (n % 32, k > 0, n and k < 2^30, rows, the experts' shared memory, which
//     depends on the token tile chosen for the problem) and sm100's (n % 8, k > 0, < 2^31) are
//     UNSUPPORTED with a message naming the value;
//   - the quantizers' (k, expert count);
//   - and, through the C API on the CPU, that the contract's statuses hold: a short or NULL
//     prepared buffer is INVALID_ARGUMENT, a short workspace WORKSPACE_TOO_SMALL, a NULL one
//     INVALID_ARGUMENT, SWIZZLED weights for prepare_weights INVALID_ARGUMENT "must be LINEAR".
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <string>
#include <vector>

#include "cc/cuda/grouped_gemm.h"
#include "cc/cuda/quantize.h"
#include "mxmoe/mxmoe.h"
#include "tests/cc/expect.h"

namespace {

using mxmoe_test::failures;
constexpr mxmoe_status OK = MXMOE_STATUS_OK;
constexpr mxmoe_status INVALID = MXMOE_STATUS_INVALID_ARGUMENT;
constexpr mxmoe_status UNSUPPORTED = MXMOE_STATUS_UNSUPPORTED;
constexpr int kSms = 132;  // H100 SXM; the tile choice depends on it
constexpr int64_t k2p30 = int64_t{1} << 30;

// `status` is `want`, and for a failure the last error contains every needle.
void Expect(const char* what, mxmoe_status status, mxmoe_status want,
            const std::vector<std::string>& needles = {}) {
  const std::string message = status == OK ? "" : mxmoe_last_error();
  EXPECT(status == want, "%s: got %s (%s), expected %s", what, mxmoe_status_string(status),
         message.c_str(), mxmoe_status_string(want));
  for (const std::string& needle : needles) {
    EXPECT(message.find(needle) != std::string::npos, "%s: message '%s' lacks '%s'", what,
           message.c_str(), needle.c_str());
  }
}

void TestSm90GroupedGemm() {
  using mxmoe::cuda::CanImplementGroupedGemmSm90;
  // Model shapes, decode and prefill: K = N = 2880 (not multiples of 128), 128 and 256 experts.
  Expect("gpt-oss decode", CanImplementGroupedGemmSm90(4, 5760, 2880, 128, kSms), OK);
  Expect("qwen3 prefill", CanImplementGroupedGemmSm90(65536, 1536, 2048, 128, kSms), OK);
  Expect("deepseek prefill", CanImplementGroupedGemmSm90(131072, 4096, 7168, 256, kSms), OK);
  Expect("one row", CanImplementGroupedGemmSm90(1, 32, 32, 1, kSms), OK);
  Expect("no rows", CanImplementGroupedGemmSm90(0, 64, 64, 8, kSms), OK);
  // n = 0: nothing to write, implemented whatever k and the expert count are.
  Expect("n = 0", CanImplementGroupedGemmSm90(100, 0, 2880, 8, kSms), OK);
  Expect("n = 0, k = 0", CanImplementGroupedGemmSm90(100, 0, 0, 65536, kSms), OK);
  Expect("n % 32", CanImplementGroupedGemmSm90(100, 48, 64, 8, kSms), UNSUPPORTED,
         {"grouped_gemm (sm90)", "n must be a multiple of 32", "48"});
  Expect("k = 0", CanImplementGroupedGemmSm90(100, 64, 0, 8, kSms), UNSUPPORTED,
         {"k = 0", "empty reduction"});
  Expect("n = 2^30", CanImplementGroupedGemmSm90(100, k2p30, 64, 8, kSms), UNSUPPORTED,
         {"n and k must be < 2^30", std::to_string(k2p30)});
  Expect("k = 2^30", CanImplementGroupedGemmSm90(100, 64, k2p30, 8, kSms), UNSUPPORTED,
         {"k=" + std::to_string(k2p30)});
  Expect("rows = 2^31", CanImplementGroupedGemmSm90(int64_t{1} << 31, 64, 64, 8, kSms),
         UNSUPPORTED, {"rows must be below 2^31 - 256", "2147483648"});
  Expect("rows = 2^31 - 256", CanImplementGroupedGemmSm90((int64_t{1} << 31) - 256, 64, 64, 8,
                                                          kSms),
         OK);
  // The activation conversion keeps 2 * (E + 1) int32 in 48 KB: at most 6143 experts.
  Expect("6144 experts", CanImplementGroupedGemmSm90(6144, 64, 64, 6144, kSms), UNSUPPORTED,
         {"num_experts must be at most 6143", "6144"});
  // 2000 experts fit next to the ring of a narrow (decode) tile, not next to the 128-token tile
  // that a prefill of 256 rows per expert gets: the limit depends on the problem, and the size
  // query sees it.
  Expect("2000 experts, decode", CanImplementGroupedGemmSm90(2000, 64, 64, 2000, kSms), OK);
  Expect("2000 experts, prefill", CanImplementGroupedGemmSm90(2000 * 256, 64, 64, 2000, kSms),
         UNSUPPORTED, {"num_experts = 2000", "shared memory", "token tile 128"});
}

void TestSm90PrepareWeights() {
  using mxmoe::cuda::CanImplementPrepareWeightsSm90;
  mxmoe_expert_weights w = {};
  w.num_experts = 4;
  w.n = 2880;
  w.k = 2880;
  Expect("prepare 2880x2880", CanImplementPrepareWeightsSm90(w), OK);
  w.n = 0;
  Expect("prepare n = 0", CanImplementPrepareWeightsSm90(w), OK);
  w.n = 48;
  Expect("prepare n % 32", CanImplementPrepareWeightsSm90(w), UNSUPPORTED,
         {"prepare_weights (sm90)", "weights.n must be a multiple of 32", "48"});
  w.n = 64;
  w.k = k2p30;
  Expect("prepare k = 2^30", CanImplementPrepareWeightsSm90(w), UNSUPPORTED, {"< 2^30"});
}

void TestSm100GroupedGemm() {
  using mxmoe::cuda::CanImplementGroupedGemmSm100;
  Expect("sm100 2880", CanImplementGroupedGemmSm100(2880, 2880), OK);
  Expect("sm100 n = 8", CanImplementGroupedGemmSm100(8, 32), OK);
  Expect("sm100 n = 0", CanImplementGroupedGemmSm100(0, 0), OK);
  Expect("sm100 n % 8", CanImplementGroupedGemmSm100(12, 32), UNSUPPORTED,
         {"grouped_gemm (sm100)", "n must be a multiple of 8", "12"});
  Expect("sm100 k = 0", CanImplementGroupedGemmSm100(64, 0), UNSUPPORTED, {"k = 0"});
  Expect("sm100 n = 2^31", CanImplementGroupedGemmSm100(int64_t{1} << 31, 32), UNSUPPORTED,
         {"below 2^31"});
}

void TestQuantizers() {
  using mxmoe::cuda::CanImplementExpertsQuantize;
  using mxmoe::cuda::CanImplementRowQuantize;
  Expect("quantize k = 7168", CanImplementRowQuantize("quantize", 7168), OK);
  Expect("quantize k = 2^33", CanImplementRowQuantize("quantize", int64_t{1} << 33), OK);
  Expect("quantize k > 2^33", CanImplementRowQuantize("quantize", (int64_t{1} << 33) + 32),
         UNSUPPORTED, {"quantize", "k = 8589934624", "too large"});
  Expect("experts 6143", CanImplementExpertsQuantize("experts_quantize", 2880, 6143), OK);
  Expect("experts 6144", CanImplementExpertsQuantize("experts_quantize", 2880, 6144),
         UNSUPPORTED, {"experts_quantize", "num_experts must be at most 6143", "6144"});
}

// The contract's statuses for buffers, through the C API on the CPU (the CUDA backends no longer
// check these themselves, so they follow the same statuses).
void TestContractStatuses() {
  const mxmoe_device cpu = {MXMOE_DEVICE_CPU, 0};
  // A grouped GEMM with n = 0: valid, nothing is written.
  const int32_t offsets[3] = {0, 1, 3};
  const int32_t blockscale_offsets[3] = {0, 128, 256};
  std::vector<uint8_t> a(3 * 16, 0);
  std::vector<uint8_t> a_scales(256 * 4, 127);
  mxmoe_grouped_gemm_args g = {};
  g.rows = 3;
  g.n = 0;
  g.k = 32;
  g.num_experts = 2;
  g.a = a.data();
  g.a_scales = a_scales.data();
  g.a_scale_rows = 256;
  g.b = {2, 0, 32, MXMOE_WEIGHT_FORMAT_LINEAR, 0, nullptr, nullptr};
  g.expert_offsets = offsets;
  g.blockscale_offsets = blockscale_offsets;
  g.c = nullptr;  // [3, 0]: no bytes
  g.c_dtype = MXMOE_DTYPE_BF16;
  g.device = cpu;
  size_t bytes = 1;
  Expect("grouped_gemm n = 0 size", mxmoe_grouped_gemm_workspace_size(&g, &bytes), OK);
  std::vector<uint8_t> workspace(bytes + 1);
  Expect("grouped_gemm n = 0", mxmoe_grouped_gemm(&g, workspace.data(), bytes, nullptr), OK);

  // prepare_weights: short or NULL prepared buffer -> INVALID_ARGUMENT; SWIZZLED -> "LINEAR".
  std::vector<uint8_t> packed(2 * 64 * 16, 0x11);
  std::vector<uint8_t> scales(2 * 64 * 1, 127);
  mxmoe_prepare_weights_args p = {};
  p.weights = {2, 64, 32, MXMOE_WEIGHT_FORMAT_LINEAR, 0, packed.data(), scales.data()};
  p.device = cpu;
  size_t needed = 0;
  Expect("prepare size", mxmoe_prepare_weights_size(&p, &needed), OK);
  EXPECT(needed > 0, "prepared size %zu", needed);
  std::vector<uint8_t> prepared(needed);
  p.prepared = prepared.data();
  p.prepared_bytes = needed - 1;
  Expect("prepared short", mxmoe_prepare_weights(&p, nullptr), INVALID,
         {"prepared_bytes must be at least " + std::to_string(needed)});
  p.prepared = nullptr;
  p.prepared_bytes = needed;
  Expect("prepared NULL", mxmoe_prepare_weights(&p, nullptr), INVALID,
         {"prepared must not be NULL"});
  p.prepared = prepared.data();
  p.weights.format = MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4;
  Expect("prepare SWIZZLED", mxmoe_prepare_weights(&p, nullptr), INVALID,
         {"weights.format must be LINEAR (0) for prepare_weights, got 1"});

  // A workspace: short -> WORKSPACE_TOO_SMALL, NULL -> INVALID_ARGUMENT (the MoE needs one).
  std::vector<uint16_t> hidden(2 * 64, 0x3F80);  // bf16 1.0
  std::vector<uint16_t> output(2 * 64);
  std::vector<uint8_t> w13_packed(2 * 64 * 32, 0x22), w13_scales(2 * 64 * 2, 127);
  std::vector<uint8_t> w2_packed(2 * 64 * 16, 0x33), w2_scales(2 * 64 * 1, 127);
  const int32_t topk_ids[2] = {0, 1};
  const float topk_weights[2] = {1.0f, 1.0f};
  mxmoe_moe_forward_args m = {};
  m.num_tokens = 2;
  m.hidden_size = 64;
  m.intermediate_size = 32;
  m.num_global_experts = 2;
  m.num_local_experts = 2;
  m.top_k = 1;
  m.hidden_states = hidden.data();
  m.activation_dtype = MXMOE_DTYPE_BF16;
  m.topk_ids = topk_ids;
  m.topk_weights = topk_weights;
  m.w13 = {2, 64, 64, MXMOE_WEIGHT_FORMAT_LINEAR, 0, w13_packed.data(), w13_scales.data()};
  m.w2 = {2, 64, 32, MXMOE_WEIGHT_FORMAT_LINEAR, 0, w2_packed.data(), w2_scales.data()};
  m.output = output.data();
  m.device = cpu;
  size_t moe_bytes = 0;
  Expect("moe size", mxmoe_moe_forward_workspace_size(&m, &moe_bytes), OK);
  EXPECT(moe_bytes > 0, "moe workspace %zu", moe_bytes);
  std::vector<uint8_t> moe_workspace(moe_bytes);
  Expect("moe workspace short", mxmoe_moe_forward(&m, moe_workspace.data(), moe_bytes - 1, nullptr),
         MXMOE_STATUS_WORKSPACE_TOO_SMALL, {"workspace_bytes must be at least"});
  Expect("moe workspace NULL", mxmoe_moe_forward(&m, nullptr, moe_bytes, nullptr), INVALID,
         {"workspace must not be NULL"});
  Expect("moe", mxmoe_moe_forward(&m, moe_workspace.data(), moe_bytes, nullptr), OK);
}

}  // namespace

int main() {
  TestSm90GroupedGemm();
  TestSm90PrepareWeights();
  TestSm100GroupedGemm();
  TestQuantizers();
  TestContractStatuses();
  if (failures != 0) {
    fprintf(stderr, "kernel_limits_test: %d failure(s)\n", failures);
    return 1;
  }
  printf("kernel_limits_test: all passed\n");
  return 0;
}
