// A serving stack's view of mxmoe: C++ that includes only <mxmoe/mxmoe.h> and links only the core
// library (no Python, no torch). It
//   1. quantizes random bf16 expert weights to MXFP4 once, at "load time";
//   2. quantizes routed activations per expert and runs the grouped GEMM;
//   3. runs a whole MoE layer (router logits -> top-k -> two grouped GEMMs -> weighted sum);
// on the CPU backend, and checks both against its own naive double-precision loops over the
// dequantized operands. Exits nonzero on a mismatch.
//
// Shapes are GPT-OSS-like in spirit but small enough for seconds on a laptop core: hidden 576 and
// intermediate 320 are multiples of 32 but not of 128 (like GPT-OSS's 2880).
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <numeric>
#include <random>
#include <vector>

#include "mxmoe/mxmoe.h"

namespace {

constexpr mxmoe_device kCpu = {MXMOE_DEVICE_CPU, 0};

// bf16 <-> float (round to nearest even), so this file needs nothing but mxmoe.h.
uint16_t ToBf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
float FromBf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
float RoundBf16(double v) { return FromBf16(ToBf16(static_cast<float>(v))); }

bool Check(mxmoe_status status, const char* what) {
  if (status == MXMOE_STATUS_OK) return true;
  fprintf(stderr, "%s failed: %s: %s\n", what, mxmoe_status_string(status), mxmoe_last_error());
  return false;
}

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Expert weights [E, n, k] quantized once: packed codes + LINEAR scales, and their fp32 values.
struct ExpertWeights {
  int32_t experts;
  int64_t n, k;
  std::vector<uint16_t> original;  // bf16, for the unquantized comparison
  std::vector<uint8_t> packed, scales;
  std::vector<float> dequantized;
  mxmoe_expert_weights View() const {
    return {experts, n, k, MXMOE_WEIGHT_FORMAT_LINEAR, MXMOE_BACKEND_AUTO, packed.data(),
            scales.data()};
  }
};

bool LoadWeights(int32_t experts, int64_t n, int64_t k, std::mt19937& rng, ExpertWeights* w) {
  std::normal_distribution<float> normal(0.0f, 1.0f / sqrtf(static_cast<float>(k)));
  w->experts = experts;
  w->n = n;
  w->k = k;
  w->original.resize(experts * n * k);
  for (auto& v : w->original) v = ToBf16(normal(rng));
  w->packed.resize(experts * n * k / 2);
  w->scales.resize(experts * n * k / 32);
  const mxmoe_quantize_weights_args q = {experts, n, k, w->original.data(), MXMOE_DTYPE_BF16,
                                         w->packed.data(), w->scales.data(),
                                         MXMOE_SCALE_LAYOUT_LINEAR, kCpu};
  if (!Check(mxmoe_quantize_weights(&q, nullptr), "mxmoe_quantize_weights")) return false;
  w->dequantized.resize(experts * n * k);
  const mxmoe_dequantize_args d = {experts * n, k, w->packed.data(), w->scales.data(),
                                   MXMOE_SCALE_LAYOUT_LINEAR, w->dequantized.data(),
                                   MXMOE_DTYPE_FP32, kCpu};
  return Check(mxmoe_dequantize(&d, nullptr), "mxmoe_dequantize(weights)");
}

// x [rows, k] bf16 -> MXFP4 -> fp32 values (what the kernels see), via the public API.
bool QuantizeDequantize(const uint16_t* x, int64_t rows, int64_t k, std::vector<float>* out) {
  std::vector<uint8_t> packed(rows * k / 2), scales(rows * k / 32);
  const mxmoe_quantize_args q = {rows, k, x, MXMOE_DTYPE_BF16, packed.data(), scales.data(),
                                 MXMOE_SCALE_LAYOUT_LINEAR, kCpu};
  if (!Check(mxmoe_quantize(&q, nullptr), "mxmoe_quantize")) return false;
  out->resize(rows * k);
  const mxmoe_dequantize_args d = {rows, k, packed.data(), scales.data(),
                                   MXMOE_SCALE_LAYOUT_LINEAR, out->data(), MXMOE_DTYPE_FP32,
                                   kCpu};
  return Check(mxmoe_dequantize(&d, nullptr), "mxmoe_dequantize");
}

double RelativeL2(const std::vector<float>& got, const std::vector<float>& want) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    err += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    ref += static_cast<double>(want[i]) * want[i];
  }
  return sqrt(err / std::max(ref, 1e-300));
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// Part 2: routed activations (rows grouped by expert) x w13 through the grouped GEMM.
bool GroupedGemm(const ExpertWeights& w13, std::mt19937& rng) {
  const int32_t experts = w13.experts;
  const int64_t k = w13.k, n = w13.n;
  // Uneven routing, one expert empty, one with a single row.
  std::vector<int32_t> counts(experts);
  for (int32_t e = 0; e < experts; ++e) counts[e] = (e == 1) ? 0 : (e == 2 ? 1 : 3 + (rng() % 20));
  std::vector<int32_t> offsets = {0}, scale_offsets = {0};
  for (int32_t m : counts) {
    offsets.push_back(offsets.back() + m);
    scale_offsets.push_back(scale_offsets.back() + static_cast<int32_t>(RoundUp(m, 128)));
  }
  const int64_t rows = offsets.back();
  const int64_t scale_cols = RoundUp(k / 32, 4);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint16_t> x(rows * k);
  for (auto& v : x) v = ToBf16(normal(rng));
  std::vector<uint8_t> a(rows * k / 2), a_scales(scale_offsets.back() * scale_cols);
  mxmoe_experts_quantize_args q = {};
  q.rows = rows;
  q.k = k;
  q.num_experts = experts;
  q.input = x.data();
  q.input_dtype = MXMOE_DTYPE_BF16;
  q.expert_offsets = offsets.data();
  q.blockscale_offsets = scale_offsets.data();
  q.packed = a.data();
  q.scales = a_scales.data();
  q.scale_rows = scale_offsets.back();
  q.device = kCpu;
  if (!Check(mxmoe_experts_quantize(&q, nullptr), "mxmoe_experts_quantize")) return false;

  std::vector<uint16_t> c(rows * n);
  mxmoe_grouped_gemm_args g = {};
  g.rows = rows;
  g.n = n;
  g.k = k;
  g.num_experts = experts;
  g.a = a.data();
  g.a_scales = a_scales.data();
  g.a_scale_rows = scale_offsets.back();
  g.b = w13.View();
  g.expert_offsets = offsets.data();
  g.blockscale_offsets = scale_offsets.data();
  g.c = c.data();
  g.c_dtype = MXMOE_DTYPE_BF16;
  g.device = kCpu;
  size_t workspace_bytes = 0;
  if (!Check(mxmoe_grouped_gemm_workspace_size(&g, &workspace_bytes), "workspace size")) {
    return false;
  }
  std::vector<uint8_t> workspace(workspace_bytes);
  const auto start = std::chrono::steady_clock::now();
  if (!Check(mxmoe_grouped_gemm(&g, workspace.data(), workspace.size(), nullptr),
             "mxmoe_grouped_gemm")) {
    return false;
  }
  const double seconds = Seconds(start);

  // Reference: each expert's activations dequantized from their swizzled scales, then a double
  // loop against the dequantized weights, rounded to bf16 once.
  std::vector<float> got(rows * n), want(rows * n);
  for (int32_t e = 0; e < experts; ++e) {
    const int64_t m = counts[e];
    if (m == 0) continue;
    std::vector<float> xa(m * k);
    const mxmoe_dequantize_args d = {m, k, a.data() + offsets[e] * k / 2,
                                     a_scales.data() + scale_offsets[e] * scale_cols,
                                     MXMOE_SCALE_LAYOUT_SWIZZLED_128X4, xa.data(),
                                     MXMOE_DTYPE_FP32, kCpu};
    if (!Check(mxmoe_dequantize(&d, nullptr), "mxmoe_dequantize(activations)")) return false;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const float* wr = &w13.dequantized[(e * n + j) * k];
        double sum = 0;
        for (int64_t kk = 0; kk < k; ++kk) sum += static_cast<double>(xa[i * k + kk]) * wr[kk];
        want[(offsets[e] + i) * n + j] = RoundBf16(sum);
        got[(offsets[e] + i) * n + j] = FromBf16(c[(offsets[e] + i) * n + j]);
      }
    }
  }
  const double rel = RelativeL2(got, want);
  printf("grouped GEMM  E=%d rows=%lld n=%lld k=%lld: rel L2 vs float64 reference %.2e (%.3f s)\n",
         experts, (long long)rows, (long long)n, (long long)k, rel, seconds);
  if (!(rel <= 2e-3)) {
    fprintf(stderr, "grouped GEMM mismatch: relative L2 error %.3e > 2e-3\n", rel);
    return false;
  }
  return true;
}

// Part 3: the whole MoE layer from router logits, and the same layer computed naively.
bool MoeLayer(const ExpertWeights& w13, const ExpertWeights& w2, std::mt19937& rng) {
  const int64_t tokens = 16, hidden = w13.k, inter = w2.k;
  const int32_t experts = w13.experts, top_k = 2;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint16_t> x(tokens * hidden);
  for (auto& v : x) v = ToBf16(normal(rng));
  std::vector<float> logits(tokens * experts);
  for (auto& v : logits) v = 2.0f * normal(rng);

  std::vector<uint16_t> out(tokens * hidden);
  mxmoe_moe_forward_args args = {};
  args.num_tokens = tokens;
  args.hidden_size = hidden;
  args.intermediate_size = inter;
  args.num_global_experts = experts;
  args.num_local_experts = experts;
  args.top_k = top_k;
  args.renormalize = 1;
  args.hidden_states = x.data();
  args.activation_dtype = MXMOE_DTYPE_BF16;
  args.router_logits = logits.data();
  args.router_logits_dtype = MXMOE_DTYPE_FP32;
  args.w13 = w13.View();
  args.w2 = w2.View();
  args.output = out.data();
  args.device = kCpu;
  size_t workspace_bytes = 0;
  if (!Check(mxmoe_moe_forward_workspace_size(&args, &workspace_bytes), "moe workspace size")) {
    return false;
  }
  std::vector<uint8_t> workspace(workspace_bytes);
  const auto start = std::chrono::steady_clock::now();
  if (!Check(mxmoe_moe_forward(&args, workspace.data(), workspace.size(), nullptr),
             "mxmoe_moe_forward")) {
    return false;
  }
  const double seconds = Seconds(start);

  // Naive layer: double softmax and top-k, then per (token, slot) the quantized pipeline
  // (quantize -> GEMM1 -> bf16 -> silu*up -> bf16 -> quantize -> GEMM2 -> bf16), and the same
  // layer without any quantization for reference.
  std::vector<float> got(tokens * hidden), want(tokens * hidden), unquantized(tokens * hidden);
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<double> p(experts);
    const double m = *std::max_element(&logits[t * experts], &logits[t * experts] + experts);
    double sum = 0;
    for (int32_t e = 0; e < experts; ++e) sum += p[e] = exp(logits[t * experts + e] - m);
    for (auto& v : p) v /= sum;
    std::vector<int32_t> order(experts);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
    double selected = 0;
    for (int32_t s = 0; s < top_k; ++s) selected += p[order[s]];

    std::vector<float> xq;
    if (!QuantizeDequantize(&x[t * hidden], 1, hidden, &xq)) return false;
    std::vector<double> acc(hidden, 0.0), acc_unquantized(hidden, 0.0);
    for (int32_t s = 0; s < top_k; ++s) {
      const int32_t e = order[s];
      const double weight = p[e] / selected;
      for (int pass = 0; pass < 2; ++pass) {  // 0: quantized pipeline, 1: unquantized bf16
        const bool quantized = pass == 0;
        std::vector<double> gate_up(2 * inter);
        for (int64_t j = 0; j < 2 * inter; ++j) {
          double dot = 0;
          for (int64_t i = 0; i < hidden; ++i) {
            const double xv = quantized ? xq[i] : FromBf16(x[t * hidden + i]);
            const double wv = quantized ? w13.dequantized[(e * 2 * inter + j) * hidden + i]
                                        : FromBf16(w13.original[(e * 2 * inter + j) * hidden + i]);
            dot += xv * wv;
          }
          gate_up[j] = RoundBf16(dot);
        }
        std::vector<uint16_t> y(inter);
        for (int64_t j = 0; j < inter; ++j) {
          const double g = gate_up[j];
          y[j] = ToBf16(static_cast<float>(g / (1.0 + exp(-g)) * gate_up[inter + j]));
        }
        std::vector<float> yq(inter);
        if (quantized) {
          if (!QuantizeDequantize(y.data(), 1, inter, &yq)) return false;
        } else {
          for (int64_t j = 0; j < inter; ++j) yq[j] = FromBf16(y[j]);
        }
        for (int64_t h = 0; h < hidden; ++h) {
          double dot = 0;
          for (int64_t i = 0; i < inter; ++i) {
            const double wv = quantized ? w2.dequantized[(e * hidden + h) * inter + i]
                                        : FromBf16(w2.original[(e * hidden + h) * inter + i]);
            dot += yq[i] * wv;
          }
          (quantized ? acc : acc_unquantized)[h] += weight * RoundBf16(dot);
        }
      }
    }
    for (int64_t h = 0; h < hidden; ++h) {
      want[t * hidden + h] = RoundBf16(acc[h]);
      unquantized[t * hidden + h] = RoundBf16(acc_unquantized[h]);
      got[t * hidden + h] = FromBf16(out[t * hidden + h]);
    }
  }
  const double rel = RelativeL2(got, want);
  printf("MoE forward   T=%lld H=%lld I=%lld E=%d top-%d: rel L2 vs reference with the same "
         "quantization %.2e (%.3f s)\n",
         (long long)tokens, (long long)hidden, (long long)inter, experts, top_k, rel, seconds);
  printf("              rel L2 vs the unquantized bf16 layer %.2e (quantization error, report "
         "only)\n",
         RelativeL2(got, unquantized));
  if (!(rel <= 5e-3)) {
    fprintf(stderr, "MoE forward mismatch: relative L2 error %.3e > 5e-3\n", rel);
    return false;
  }
  return true;
}

}  // namespace

int main() {
  printf("mxmoe %s, CPU backend", mxmoe_version());
  mxmoe_backend backend;
  if (mxmoe_backend_for_device(kCpu, &backend) == MXMOE_STATUS_OK) {
    printf(" ('%s' serves host pointers; %d CUDA device(s) visible)\n", mxmoe_backend_name(backend),
           mxmoe_cuda_device_count());
  } else {
    printf("\n");
  }
  std::mt19937 rng(2024);
  const int32_t experts = 8;
  const int64_t hidden = 576, inter = 320;
  ExpertWeights w13, w2;
  const auto start = std::chrono::steady_clock::now();
  if (!LoadWeights(experts, 2 * inter, hidden, rng, &w13) ||
      !LoadWeights(experts, hidden, inter, rng, &w2)) {
    return 1;
  }
  printf("weights       w13 [%d, %lld, %lld], w2 [%d, %lld, %lld] quantized to MXFP4 (%.3f s)\n",
         experts, (long long)(2 * inter), (long long)hidden, experts, (long long)hidden,
         (long long)inter, Seconds(start));
  if (!GroupedGemm(w13, rng)) return 1;
  if (!MoeLayer(w13, w2, rng)) return 1;
  printf("OK\n");
  return 0;
}
