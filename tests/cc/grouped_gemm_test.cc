// CPU grouped GEMM (mxmoe_grouped_gemm) against a naive double loop over the dequantized operands
// (decoded here from the E2M1 table and 2^(s-127), independent of the library). The CPU GEMM is
// documented as the exact sum rounded once, so every output element must lie within half a bf16
// (fp16) ulp of the reference, i.e. equal its rounding except at exact ties.
//
// Shapes: K = N = 2880 with small m, an expert with 0 rows, with 1 row, E = 1, E = 256, n not a
// multiple of the kernel's tiles, fp16 output, every weight format (LINEAR, SWIZZLED_128X4,
// PREPARED) giving identical bits, problem_sizes given, NaN and overflowing scales, rows past
// expert_offsets[E] untouched, and a timed E = 128, K = N = 2880 case checked on samples.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <string>
#include <vector>

#include "mxmoe/format.h"
#include "mxmoe/mxmoe.h"
#include "tests/cc/expect.h"

namespace {

using mxmoe_test::failures;

constexpr mxmoe_device kCpu = {MXMOE_DEVICE_CPU, 0};
constexpr uint16_t kPoison16 = 0x7BCD;

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

double CodeValue(uint8_t code) {
  static const double grid[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  return (code & 8 ? -1 : 1) * grid[code & 7];
}

double ScaleValue(uint8_t s) { return s == 0xFF ? NAN : ldexp(1.0, s - 127); }

uint8_t CodeAt(const uint8_t* packed_row, int64_t i) {
  return i % 2 ? packed_row[i / 2] >> 4 : packed_row[i / 2] & 0xF;
}

float ToFloat(uint16_t h, int32_t dtype) {
  return dtype == MXMOE_DTYPE_BF16 ? mxmoe::format::Bf16ToFloat(h)
                                   : mxmoe::format::Fp16ToFloat(h);
}

// Half an ulp of `x` in bf16 (8 significant bits) or fp16 (11 bits, subnormal below 2^-14).
double HalfUlp(double x, int32_t dtype) {
  const int bits = dtype == MXMOE_DTYPE_BF16 ? 8 : 11;
  const int min_exp = dtype == MXMOE_DTYPE_BF16 ? -126 : -14;
  int e = x == 0 ? min_exp : ilogb(x);
  if (e < min_exp) e = min_exp;
  return ldexp(1.0, e - bits);
}

struct Problem {
  std::string name;
  std::vector<int32_t> counts;  // rows per expert
  int64_t n;
  int64_t k;
  int32_t c_dtype = MXMOE_DTYPE_BF16;
  int64_t extra_rows = 3;  // rows of a / c past expert_offsets[E]
  int64_t samples = 0;     // 0: check every element; else this many random ones
};

struct Operands {
  int32_t experts;
  int64_t rows;
  std::vector<int32_t> expert_offsets, blockscale_offsets, problem_sizes;
  std::vector<uint8_t> a, a_scales;              // swizzled per expert
  std::vector<uint8_t> b, b_scales_linear, b_scales_swizzled, b_prepared;
};

Operands MakeOperands(const Problem& p, std::mt19937& rng) {
  Operands o;
  o.experts = static_cast<int32_t>(p.counts.size());
  o.expert_offsets = {0};
  o.blockscale_offsets = {0};
  for (int32_t m : p.counts) {
    o.expert_offsets.push_back(o.expert_offsets.back() + m);
    o.blockscale_offsets.push_back(o.blockscale_offsets.back() + RoundUp(m, 128));
    o.problem_sizes.insert(o.problem_sizes.end(), {m, static_cast<int32_t>(p.n),
                                                   static_cast<int32_t>(p.k)});
  }
  o.rows = o.expert_offsets.back() + p.extra_rows;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> binade(-6.0f, 6.0f);
  // Activations with a per-row dynamic range, quantized per expert.
  std::vector<uint16_t> x(o.rows * p.k);
  for (int64_t r = 0; r < o.rows; ++r) {
    const float row_scale = exp2f(binade(rng));
    for (int64_t i = 0; i < p.k; ++i) {
      x[r * p.k + i] = mxmoe::format::FloatToBf16(normal(rng) * row_scale);
    }
  }
  const int64_t padded_cols = RoundUp(p.k / 32, 4);
  o.a.assign(o.rows * p.k / 2, 0);
  o.a_scales.assign((o.blockscale_offsets.back() + 1) * padded_cols, 0);
  mxmoe_experts_quantize_args q = {};
  q.rows = o.rows;
  q.k = p.k;
  q.num_experts = o.experts;
  q.input = x.data();
  q.input_dtype = MXMOE_DTYPE_BF16;
  q.expert_offsets = o.expert_offsets.data();
  q.blockscale_offsets = o.blockscale_offsets.data();
  q.packed = o.a.data();
  q.scales = o.a_scales.data();
  q.scale_rows = o.blockscale_offsets.back() + 1;
  q.device = kCpu;
  EXPECT_OK(mxmoe_experts_quantize(&q, nullptr));
  if (p.samples > 0) {
    // Large case: random codes and scales directly (quantizing ~10^9 bf16 weights would
    // dominate the test's time); LINEAR scales only.
    o.b.resize(int64_t{o.experts} * p.n * p.k / 2);
    o.b_scales_linear.resize(int64_t{o.experts} * p.n * (p.k / 32));
    std::uniform_int_distribution<uint32_t> any;
    for (size_t i = 0; i < o.b.size(); i += 4) {
      const uint32_t bits = any(rng);
      memcpy(&o.b[i], &bits, std::min<size_t>(4, o.b.size() - i));
    }
    for (auto& sc : o.b_scales_linear) sc = static_cast<uint8_t>(118 + any(rng) % 4);
    return o;
  }
  // Weights, both scale layouts, and the prepared form.
  std::vector<uint16_t> w(int64_t{o.experts} * p.n * p.k);
  for (auto& v : w) v = mxmoe::format::FloatToBf16(normal(rng) * 0.02f);
  o.b.assign(w.size() / 2, 0);
  o.b_scales_linear.assign(int64_t{o.experts} * p.n * (p.k / 32), 0);
  o.b_scales_swizzled.assign(int64_t{o.experts} * RoundUp(p.n, 128) * padded_cols, 0);
  std::vector<uint8_t> b_again(o.b.size());
  mxmoe_quantize_weights_args qw = {o.experts, p.n, p.k, w.data(), MXMOE_DTYPE_BF16,
                                    o.b.data(), o.b_scales_linear.data(),
                                    MXMOE_SCALE_LAYOUT_LINEAR, kCpu};
  EXPECT_OK(mxmoe_quantize_weights(&qw, nullptr));
  qw.packed = b_again.data();
  qw.scales = o.b_scales_swizzled.data();
  qw.scale_layout = MXMOE_SCALE_LAYOUT_SWIZZLED_128X4;
  EXPECT_OK(mxmoe_quantize_weights(&qw, nullptr));
  mxmoe_prepare_weights_args prep = {};
  prep.weights = {o.experts, p.n, p.k, MXMOE_WEIGHT_FORMAT_LINEAR, 0, o.b.data(),
                  o.b_scales_linear.data()};
  prep.device = kCpu;
  size_t bytes = 0;
  EXPECT_OK(mxmoe_prepare_weights_size(&prep, &bytes));
  o.b_prepared.assign(bytes, 0);
  prep.prepared = o.b_prepared.data();
  prep.prepared_bytes = bytes;
  EXPECT_OK(mxmoe_prepare_weights(&prep, nullptr));
  return o;
}

mxmoe_expert_weights Weights(const Operands& o, const Problem& p, int32_t format) {
  mxmoe_expert_weights w = {o.experts, p.n, p.k, format, 0, o.b.data(), nullptr};
  if (format == MXMOE_WEIGHT_FORMAT_LINEAR) w.scales = o.b_scales_linear.data();
  if (format == MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4) w.scales = o.b_scales_swizzled.data();
  if (format == MXMOE_WEIGHT_FORMAT_PREPARED) {
    w.packed = o.b_prepared.data();
    w.backend = MXMOE_BACKEND_CPU;
    w.prepared_bytes = o.b_prepared.size();
  }
  return w;
}

std::vector<uint16_t> RunGemm(const Operands& o, const Problem& p, int32_t format,
                              bool with_problem_sizes, double* seconds = nullptr) {
  std::vector<uint16_t> c(o.rows * p.n, kPoison16);
  mxmoe_grouped_gemm_args args = {};
  args.rows = o.rows;
  args.n = p.n;
  args.k = p.k;
  args.num_experts = o.experts;
  args.a = o.a.data();
  args.a_scales = o.a_scales.data();
  args.a_scale_rows = o.blockscale_offsets.back() + 1;
  args.b = Weights(o, p, format);
  args.expert_offsets = o.expert_offsets.data();
  args.blockscale_offsets = o.blockscale_offsets.data();
  args.problem_sizes = with_problem_sizes ? o.problem_sizes.data() : nullptr;
  args.c = c.data();
  args.c_dtype = p.c_dtype;
  args.device = kCpu;
  size_t workspace_bytes = 1;
  EXPECT_OK(mxmoe_grouped_gemm_workspace_size(&args, &workspace_bytes));
  std::vector<uint8_t> workspace(workspace_bytes);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_OK(mxmoe_grouped_gemm(&args, workspace.data(), workspace.size(), nullptr));
  if (seconds) {
    *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return c;
}

// Reference element (row r of expert e, column j) from the dequantized operands, in double.
double Reference(const Operands& o, const Problem& p, int32_t e, int64_t r, int64_t j) {
  const int64_t blocks = p.k / 32;
  const int64_t i = r - o.expert_offsets[e];
  const uint8_t* a_row = o.a.data() + r * p.k / 2;
  const uint8_t* a_scales = o.a_scales.data() + o.blockscale_offsets[e] * RoundUp(blocks, 4);
  const uint8_t* b_row = o.b.data() + (int64_t{e} * p.n + j) * p.k / 2;
  const uint8_t* b_scales = o.b_scales_linear.data() + (int64_t{e} * p.n + j) * blocks;
  double sum = 0;
  for (int64_t kk = 0; kk < p.k; ++kk) {
    const double av = CodeValue(CodeAt(a_row, kk)) *
                      ScaleValue(a_scales[mxmoe::format::SwizzledOffset(i, kk / 32, blocks)]);
    const double bv = CodeValue(CodeAt(b_row, kk)) * ScaleValue(b_scales[kk / 32]);
    sum += av * bv;
  }
  return sum;
}

void CheckProblem(const Problem& p) {
  std::mt19937 rng(static_cast<unsigned>(p.n * 131 + p.k + p.counts.size()));
  const Operands o = MakeOperands(p, rng);
  double seconds = 0;
  const std::vector<uint16_t> c = RunGemm(o, p, MXMOE_WEIGHT_FORMAT_LINEAR, false, &seconds);
  const std::string shape = p.name + " (E=" + std::to_string(o.experts) +
                            " rows=" + std::to_string(o.expert_offsets.back()) +
                            " n=" + std::to_string(p.n) + " k=" + std::to_string(p.k) + ")";
  // Other weight formats and problem_sizes: the same bits.
  if (p.samples == 0) {
    EXPECT(RunGemm(o, p, MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4, true) == c,
           "%s: SWIZZLED weights differ from LINEAR", shape.c_str());
    EXPECT(RunGemm(o, p, MXMOE_WEIGHT_FORMAT_PREPARED, false) == c,
           "%s: PREPARED weights differ from LINEAR", shape.c_str());
  }
  double err2 = 0, ref2 = 0;
  int64_t checked = 0;
  auto check = [&](int32_t e, int64_t r, int64_t j) {
    const double ref = Reference(o, p, e, r, j);
    const double got = ToFloat(c[r * p.n + j], p.c_dtype);
    err2 += (got - ref) * (got - ref);
    ref2 += ref * ref;
    ++checked;
    EXPECT(fabs(got - ref) <= HalfUlp(ref, p.c_dtype) * (1 + 1e-9),
           "%s: c[%lld, %lld] (expert %d) = %.9g, reference %.9g (more than half an ulp)",
           shape.c_str(), (long long)r, (long long)j, e, got, ref);
  };
  if (p.samples == 0) {
    for (int32_t e = 0; e < o.experts; ++e) {
      for (int64_t r = o.expert_offsets[e]; r < o.expert_offsets[e + 1]; ++r) {
        for (int64_t j = 0; j < p.n; ++j) check(e, r, j);
      }
    }
  } else {
    std::uniform_int_distribution<int64_t> any_row(0, o.expert_offsets.back() - 1);
    std::uniform_int_distribution<int64_t> any_col(0, p.n - 1);
    for (int64_t s = 0; s < p.samples; ++s) {
      const int64_t r = any_row(rng);
      int32_t e = 0;
      while (o.expert_offsets[e + 1] <= r) ++e;
      check(e, r, any_col(rng));
    }
  }
  for (int64_t i = o.expert_offsets.back() * p.n; i < o.rows * p.n; ++i) {
    EXPECT(c[i] == kPoison16, "%s: c element %lld past expert_offsets[E] was written",
           shape.c_str(), (long long)i);
  }
  printf("%-40s %8lld elements checked, rel L2 %.2e, %.3f s\n", shape.c_str(),
         (long long)checked, ref2 > 0 ? sqrt(err2 / ref2) : 0.0, seconds);
}

// NaN scale in A -> NaN outputs for that row; huge scales -> Inf (bf16 overflow).
void TestSpecialScales() {
  Problem p{"special scales", {2}, 8, 32};
  std::mt19937 rng(1);
  Operands o = MakeOperands(p, rng);
  o.a_scales[mxmoe::format::SwizzledOffset(0, 0, 1)] = 0xFF;  // row 0: NaN
  o.a_scales[mxmoe::format::SwizzledOffset(1, 0, 1)] = 254;   // row 1: 2^127
  for (auto& s : o.b_scales_linear) s = 254;                    // weights: 2^127 too
  for (int64_t i = 0; i < p.k / 2; ++i) o.a[p.k / 2 + i] = 0x77;  // row 1 all +6
  for (auto& b : o.b) b = 0x77;                                    // all +6
  const std::vector<uint16_t> c = RunGemm(o, p, MXMOE_WEIGHT_FORMAT_LINEAR, false);
  for (int64_t j = 0; j < p.n; ++j) {
    EXPECT(isnan(ToFloat(c[j], MXMOE_DTYPE_BF16)), "NaN scale: c[0, %lld] = %g", (long long)j,
           ToFloat(c[j], MXMOE_DTYPE_BF16));
    const float v = ToFloat(c[p.n + j], MXMOE_DTYPE_BF16);
    EXPECT(isinf(v) && v > 0, "overflow: c[1, %lld] = %g, expected +Inf", (long long)j, v);
  }
}

// k = 0 is a valid (empty) reduction: every output of a routed row is +0.
void TestEmptyK() {
  std::vector<int32_t> offsets = {0, 2}, scale_offsets = {0, 128};
  std::vector<uint16_t> c(2 * 4, kPoison16);
  uint8_t dummy = 0;
  mxmoe_grouped_gemm_args args = {};
  args.rows = 2;
  args.n = 4;
  args.k = 0;
  args.num_experts = 1;
  args.a = &dummy;
  args.a_scales = &dummy;
  args.a_scale_rows = 128;
  args.b = {1, 4, 0, MXMOE_WEIGHT_FORMAT_LINEAR, 0, &dummy, &dummy};
  args.expert_offsets = offsets.data();
  args.blockscale_offsets = scale_offsets.data();
  args.c = c.data();
  args.c_dtype = MXMOE_DTYPE_BF16;
  args.device = kCpu;
  EXPECT_OK(mxmoe_grouped_gemm(&args, nullptr, 0, nullptr));
  for (uint16_t v : c) EXPECT(v == 0, "k=0: output 0x%04x, expected +0", v);
}

}  // namespace

int main() {
  std::vector<Problem> problems;
  problems.push_back({"K=N=2880, small m, empty expert", {0, 1, 5, 2}, 2880, 2880});
  problems.push_back({"odd n, expert of 130 rows", {0, 1, 130, 3}, 200, 256});
  problems.push_back({"E=1", {33}, 17, 64});
  Problem fp16{"fp16 output", {4, 0, 7}, 70, 96, MXMOE_DTYPE_FP16};
  problems.push_back(fp16);
  {
    std::mt19937 rng(256);
    std::uniform_int_distribution<int> count(0, 3);
    Problem e256{"E=256", {}, 40, 64};
    for (int e = 0; e < 256; ++e) e256.counts.push_back(count(rng));
    problems.push_back(e256);
  }
  {
    Problem big{"E=128 K=N=2880, 4 rows/expert (sampled)", std::vector<int32_t>(128, 4), 2880,
                2880};
    big.samples = 3000;
    problems.push_back(big);
  }
  for (const Problem& p : problems) CheckProblem(p);
  TestSpecialScales();
  TestEmptyK();
  if (failures != 0) {
    fprintf(stderr, "grouped_gemm_test: %d failure(s)\n", failures);
    return 1;
  }
  printf("grouped_gemm_test: all passed\n");
  return 0;
}
