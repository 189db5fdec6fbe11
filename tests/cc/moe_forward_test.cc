// CPU MoE forward (mxmoe_moe_forward) against a naive per-(token, slot) loop written from the
// semantics in mxmoe.h / moe_forward.cc: fp32 softmax with format::ExpF32, top-k with ties to the
// lower id, optional renormalisation; per slot: quantize the hidden row, GEMM1 on the dequantized
// operands in double rounded to the activation dtype, silu(gate) * up in fp32 rounded, quantize,
// GEMM2 in double rounded, and the fp32 weighted sum over slots rounded once.
//
// The library sums each 32-block's exact dot in double in block order, the naive loop sums
// element by element; both round to bf16, which can (rarely) differ by one ulp at a near-tie and
// then move a quantized code. So the check is: relative L2 error <= 1e-3 and at least 95% of the
// outputs bit-identical (in practice all, or all but a handful).
//
// Cases: router logits fp32/bf16 with and without renormalisation, tied logits, precomputed
// top-k with a repeated expert, expert_map with non-local experts (tokens with no local expert
// get 0), one token, zero tokens, fp16 activations, H = I = 2880, a misaligned workspace. A
// wrong routing (e.g. ties broken towards the higher id) changes whole rows, far beyond the
// tolerance.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "mxmoe/format.h"
#include "mxmoe/mxmoe.h"
#include "tests/cc/expect.h"

namespace {

using mxmoe_test::failures;

using mxmoe::format::Bf16ToFloat;
using mxmoe::format::Fp16ToFloat;
using mxmoe::format::FloatToBf16;
using mxmoe::format::FloatToFp16;

constexpr mxmoe_device kCpu = {MXMOE_DEVICE_CPU, 0};
constexpr uint16_t kPoison16 = 0x7BCD;

float ToFloat(uint16_t h, int32_t dtype) {
  return dtype == MXMOE_DTYPE_BF16 ? Bf16ToFloat(h) : Fp16ToFloat(h);
}
uint16_t FromFloat(float f, int32_t dtype) {
  return dtype == MXMOE_DTYPE_BF16 ? FloatToBf16(f) : FloatToFp16(f);
}
float Round(float f, int32_t dtype) { return ToFloat(FromFloat(f, dtype), dtype); }
// A double rounded once to bf16/fp16 (via exact-enough long double where available: the sums
// here have far fewer significant bits than a double, so float(double) then round is exact
// except at ties, which the tolerance covers).
float RoundDouble(double d, int32_t dtype) { return Round(static_cast<float>(d), dtype); }

double CodeValue(uint8_t code) {
  static const double grid[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  return (code & 8 ? -1 : 1) * grid[code & 7];
}
double ScaleValue(uint8_t s) { return s == 0xFF ? NAN : ldexp(1.0, s - 127); }

// Quantized matrix [rows, k] with LINEAR scales, decoded to double on demand.
struct Mxfp4 {
  int64_t rows = 0, k = 0;
  std::vector<uint8_t> packed, scales;
  double At(int64_t r, int64_t i) const {
    const uint8_t byte = packed[(r * k + i) / 2];
    return CodeValue(i % 2 ? byte >> 4 : byte & 0xF) * ScaleValue(scales[r * (k / 32) + i / 32]);
  }
};

Mxfp4 QuantizeRows(const uint16_t* x, int64_t rows, int64_t k, int32_t dtype) {
  Mxfp4 q;
  q.rows = rows;
  q.k = k;
  q.packed.resize(rows * k / 2);
  q.scales.resize(rows * (k / 32));
  mxmoe_quantize_args args = {rows, k, x, dtype, q.packed.data(), q.scales.data(),
                              MXMOE_SCALE_LAYOUT_LINEAR, kCpu};
  EXPECT_OK(mxmoe_quantize(&args, nullptr));
  return q;
}

struct Case {
  std::string name;
  int64_t tokens, hidden, inter;
  int32_t global_experts, local_experts, top_k;
  int32_t renormalize = 1;
  int32_t act_dtype = MXMOE_DTYPE_BF16;
  int32_t logits_dtype = MXMOE_DTYPE_FP32;  // -1: precomputed top-k
  bool use_map = false;
  bool tied_logits = false;
  bool misaligned_workspace = false;
};

struct Routing {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

// The documented routing, from the logits as the library reads them.
Routing ReferenceRouting(const Case& c, const std::vector<float>& logits) {
  Routing r;
  const int32_t e_count = c.global_experts;
  for (int64_t t = 0; t < c.tokens; ++t) {
    std::vector<float> p(e_count);
    float m = -INFINITY;
    for (int32_t e = 0; e < e_count; ++e) m = std::max(m, logits[t * e_count + e]);
    float sum = 0.0f;
    for (int32_t e = 0; e < e_count; ++e) {
      p[e] = mxmoe::format::ExpF32(logits[t * e_count + e] - m);
      sum += p[e];
    }
    for (auto& v : p) v /= sum;
    std::vector<int32_t> order(e_count);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
    float selected = 0.0f;
    for (int32_t s = 0; s < c.top_k; ++s) selected += p[order[s]];
    for (int32_t s = 0; s < c.top_k; ++s) {
      r.ids.push_back(order[s]);
      r.weights.push_back(c.renormalize ? p[order[s]] / selected : p[order[s]]);
    }
  }
  return r;
}

void RunCase(const Case& c) {
  std::mt19937 rng(static_cast<unsigned>(c.tokens * 7 + c.hidden + c.global_experts));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t T = c.tokens, H = c.hidden, I = c.inter;
  const int32_t dtype = c.act_dtype;
  const std::string shape = c.name + " (T=" + std::to_string(T) + " H=" + std::to_string(H) +
                            " I=" + std::to_string(I) + " E=" + std::to_string(c.global_experts) +
                            "/" + std::to_string(c.local_experts) +
                            " k=" + std::to_string(c.top_k) + ")";

  std::vector<uint16_t> hidden(T * H);
  for (auto& v : hidden) v = FromFloat(normal(rng), dtype);
  // Weights: quantized from random bf16/fp16 (LINEAR).
  auto make_weights = [&](int64_t n, int64_t k, float stddev) {
    std::vector<uint16_t> w(int64_t{c.local_experts} * n * k);
    for (auto& v : w) v = FromFloat(normal(rng) * stddev, dtype);
    return QuantizeRows(w.data(), int64_t{c.local_experts} * n, k, dtype);
  };
  const Mxfp4 w13 = make_weights(2 * I, H, 1.0f / sqrtf(static_cast<float>(H)));
  const Mxfp4 w2 = make_weights(H, I, 1.0f / sqrtf(static_cast<float>(I)));

  // Routing inputs.
  std::vector<float> logits_f32(T * c.global_experts);
  std::vector<uint8_t> logits_raw;
  for (auto& v : logits_f32) v = c.tied_logits ? static_cast<float>(rng() % 3) : 2.0f * normal(rng);
  Routing routing;
  if (c.logits_dtype == MXMOE_DTYPE_FP32) {
    logits_raw.resize(logits_f32.size() * 4);
    memcpy(logits_raw.data(), logits_f32.data(), logits_raw.size());
    routing = ReferenceRouting(c, logits_f32);
  } else if (c.logits_dtype >= 0) {
    logits_raw.resize(logits_f32.size() * 2);
    for (size_t i = 0; i < logits_f32.size(); ++i) {
      const uint16_t h = FromFloat(logits_f32[i], c.logits_dtype);
      memcpy(&logits_raw[2 * i], &h, 2);
      logits_f32[i] = ToFloat(h, c.logits_dtype);
    }
    routing = ReferenceRouting(c, logits_f32);
  } else {
    // Precomputed: random ids (token 0 repeats an expert) and arbitrary weights.
    for (int64_t t = 0; t < T; ++t) {
      for (int32_t s = 0; s < c.top_k; ++s) {
        routing.ids.push_back(t == 0 && s == 1 ? routing.ids[0] : rng() % c.global_experts);
        routing.weights.push_back(0.25f + 0.5f * (rng() % 100) / 100.0f);
      }
    }
  }
  std::vector<int32_t> expert_map;
  if (c.use_map) {
    expert_map.assign(c.global_experts, -1);
    for (int32_t l = 0; l < c.local_experts; ++l) expert_map[(3 * l + 1) % c.global_experts] = l;
  }

  // Naive reference.
  std::vector<float> want(T * H);
  for (int64_t t = 0; t < T; ++t) {
    const Mxfp4 x = QuantizeRows(&hidden[t * H], 1, H, dtype);
    std::vector<float> acc(H, 0.0f);
    for (int32_t s = 0; s < c.top_k; ++s) {
      const int32_t global = routing.ids[t * c.top_k + s];
      const int32_t e = c.use_map ? expert_map[global] : global;
      if (e < 0) continue;
      std::vector<float> gate_up(2 * I);
      for (int64_t j = 0; j < 2 * I; ++j) {
        double sum = 0;
        for (int64_t i = 0; i < H; ++i) sum += x.At(0, i) * w13.At(e * 2 * I + j, i);
        gate_up[j] = RoundDouble(sum, dtype);
      }
      std::vector<uint16_t> y(I);
      for (int64_t j = 0; j < I; ++j) {
        y[j] = FromFloat(mxmoe::format::SiluF32(gate_up[j]) * gate_up[I + j], dtype);
      }
      const Mxfp4 yq = QuantizeRows(y.data(), 1, I, dtype);
      const float w = routing.weights[t * c.top_k + s];
      for (int64_t h = 0; h < H; ++h) {
        double sum = 0;
        for (int64_t i = 0; i < I; ++i) sum += yq.At(0, i) * w2.At(e * H + h, i);
        acc[h] += w * RoundDouble(sum, dtype);
      }
    }
    for (int64_t h = 0; h < H; ++h) want[t * H + h] = Round(acc[h], dtype);
  }

  // Library.
  mxmoe_moe_forward_args args = {};
  args.num_tokens = T;
  args.hidden_size = H;
  args.intermediate_size = I;
  args.num_global_experts = c.global_experts;
  args.num_local_experts = c.local_experts;
  args.top_k = c.top_k;
  args.renormalize = c.renormalize;
  args.hidden_states = hidden.data();
  args.activation_dtype = dtype;
  if (c.logits_dtype >= 0) {
    args.router_logits = logits_raw.data();
    args.router_logits_dtype = c.logits_dtype;
  } else {
    args.topk_ids = routing.ids.data();
    args.topk_weights = routing.weights.data();
  }
  args.expert_map = c.use_map ? expert_map.data() : nullptr;
  args.w13 = {c.local_experts, 2 * I, H, MXMOE_WEIGHT_FORMAT_LINEAR, 0, w13.packed.data(),
              w13.scales.data()};
  args.w2 = {c.local_experts, H, I, MXMOE_WEIGHT_FORMAT_LINEAR, 0, w2.packed.data(),
             w2.scales.data()};
  std::vector<uint16_t> out(T * H + 8, kPoison16);
  args.output = out.data();
  args.device = kCpu;
  size_t bytes = 0;
  EXPECT_OK(mxmoe_moe_forward_workspace_size(&args, &bytes));
  std::vector<uint8_t> workspace(bytes + 1);
  uint8_t* base = workspace.data() + (c.misaligned_workspace ? 1 : 0);
  EXPECT_OK(mxmoe_moe_forward(&args, base, bytes, nullptr));

  double err2 = 0, ref2 = 0;
  int64_t identical = 0;
  for (int64_t i = 0; i < T * H; ++i) {
    const double got = ToFloat(out[i], dtype);
    err2 += (got - want[i]) * (got - want[i]);
    ref2 += static_cast<double>(want[i]) * want[i];
    identical += (got == want[i]);
  }
  const double rel = ref2 > 0 ? sqrt(err2 / ref2) : sqrt(err2);
  EXPECT(rel <= 1e-3, "%s: relative L2 error %.3e vs the naive loop", shape.c_str(), rel);
  EXPECT(identical >= 0.95 * T * H, "%s: only %lld of %lld outputs bit-identical", shape.c_str(),
         (long long)identical, (long long)(T * H));
  for (int i = 0; i < 8; ++i) {
    EXPECT(out[T * H + i] == kPoison16, "%s: wrote past output", shape.c_str());
  }
  printf("%-58s rel L2 %.2e, %lld/%lld identical, workspace %zu bytes\n", shape.c_str(), rel,
         (long long)identical, (long long)(T * H), bytes);
}

// Zero tokens: OK, nothing written.
void TestZeroTokens() {
  std::vector<uint8_t> w(1, 0);
  mxmoe_moe_forward_args args = {};
  args.num_tokens = 0;
  args.hidden_size = 32;
  args.intermediate_size = 32;
  args.num_global_experts = 2;
  args.num_local_experts = 2;
  args.top_k = 1;
  args.activation_dtype = MXMOE_DTYPE_BF16;
  std::vector<uint8_t> packed(2 * 64 * 16), scales(2 * 64);
  args.w13 = {2, 64, 32, MXMOE_WEIGHT_FORMAT_LINEAR, 0, packed.data(), scales.data()};
  args.w2 = {2, 32, 32, MXMOE_WEIGHT_FORMAT_LINEAR, 0, packed.data(), scales.data()};
  args.device = kCpu;
  size_t bytes = 1;
  EXPECT_OK(mxmoe_moe_forward_workspace_size(&args, &bytes));
  std::vector<uint8_t> workspace(bytes + 1);
  EXPECT_OK(mxmoe_moe_forward(&args, workspace.data(), bytes, nullptr));
}

}  // namespace

int main() {
  std::vector<Case> cases;
  cases.push_back({"logits fp32, renormalize", 5, 64, 96, 8, 8, 2});
  Case no_renorm{"logits bf16, no renormalize", 7, 96, 64, 6, 6, 3};
  no_renorm.renormalize = 0;
  no_renorm.logits_dtype = MXMOE_DTYPE_BF16;
  cases.push_back(no_renorm);
  Case ties{"tied logits (ties to the lower id)", 6, 32, 32, 5, 5, 2};
  ties.tied_logits = true;
  cases.push_back(ties);
  Case given{"precomputed top-k, repeated expert", 4, 64, 64, 4, 4, 3};
  given.logits_dtype = -1;
  cases.push_back(given);
  Case mapped{"expert_map (3 of 8 local), misaligned workspace", 9, 64, 32, 8, 3, 2};
  mapped.use_map = true;
  mapped.misaligned_workspace = true;
  cases.push_back(mapped);
  cases.push_back({"one token", 1, 64, 64, 4, 4, 4});
  Case fp16{"fp16 activations, fp16 logits", 3, 64, 64, 4, 4, 2};
  fp16.act_dtype = MXMOE_DTYPE_FP16;
  fp16.logits_dtype = MXMOE_DTYPE_FP16;
  cases.push_back(fp16);
  cases.push_back({"H = I = 2880", 2, 2880, 2880, 4, 4, 2});
  for (const Case& c : cases) RunCase(c);
  TestZeroTokens();
  if (failures != 0) {
    fprintf(stderr, "moe_forward_test: %d failure(s)\n", failures);
    return 1;
  }
  printf("moe_forward_test: all passed\n");
  return 0;
}
