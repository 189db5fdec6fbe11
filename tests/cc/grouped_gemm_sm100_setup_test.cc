// CPU test of the sm100 grouped GEMM's per-expert setup (cc/cuda/grouped_gemm_sm100_setup.h):
// the same __host__ __device__ code the device setup kernel runs, compiled here by the host
// compiler. No GPU is used or needed; this is the only executed test of the sm100 path (there is
// no Blackwell GPU to run the kernel on), so it checks the setup against the data contract
// (docs/format.md, Scale layouts) from several sides:
//   1. per expert (m = 0, 1, 127, 128, 129; K = 2880 and 4096; N = 2880 and 4096): shape, the
//      addresses of A rows, A scales, B, B scales and C rows, the row strides, and the
//      scale-factor layouts, against the contract's formulas, with and without problem_sizes;
//   2. every scale address the layouts produce (padding rows and columns included) equals the
//      SWIZZLED_128X4 formula, stays inside the expert's slice, and hits each byte once;
//   3. metadata that would read or write out of bounds is rejected (m = 0);
//   4. the prepared-weights layout (sizes, alignment, ~4.25 bits per weight);
//   5. the inverse swizzle used by weight preparation;
//   6. an emulation of the GEMM on the CPU that reads operands only through the setup's
//      addresses and layouts (as CUTLASS does on the GPU) equals a reference that reads the
//      public LINEAR layouts; rows outside the experts stay untouched.
// Plain main(); exit status != 0 on any failure.
#include <stdint.h>
#include <stdio.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cc/cuda/grouped_gemm_sm100_setup.h"
#include "mxmoe/format.h"

namespace {

using mxmoe::cuda::sm100::ComputeExpertSetupSm100;
using mxmoe::cuda::sm100::ExpertSetupSm100;
using mxmoe::cuda::sm100::GroupedGemmSm100Problem;
using mxmoe::cuda::sm100::MakePreparedWeightsLayoutSm100;
using mxmoe::cuda::sm100::MakeScaleLayoutSm100;
using mxmoe::cuda::sm100::PreparedWeightsLayoutSm100;
using mxmoe::cuda::sm100::ScaleLayoutOffsetSm100;
using mxmoe::cuda::sm100::ScaleLayoutSm100;
using mxmoe::cuda::sm100::SwizzledPositionSm100;

int g_checks = 0;
int g_failures = 0;

void Check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    if (g_failures <= 50) fprintf(stderr, "FAILED: %s\n", what.c_str());
  }
}

std::string Str(int64_t v) { return std::to_string(v); }

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t CeilDiv(int64_t x, int64_t d) { return (x + d - 1) / d; }

// The contract's formula, written out again from docs/format.md on purpose (not a call into
// the code under test or format.h).
int64_t ContractSwizzledOffset(int64_t m, int64_t k, int64_t scale_cols) {
  const int64_t num_k_tiles = (scale_cols + 3) / 4;
  return (m / 128 * num_k_tiles + k / 4) * 512 + (m % 32) * 16 + ((m / 32) % 4) * 4 + (k % 4);
}

struct Grouping {
  std::vector<int32_t> expert_offsets;
  std::vector<int32_t> blockscale_offsets;
  std::vector<int32_t> problem_sizes;  // [E, 3]
  int64_t rows = 0;
  int64_t scale_rows = 0;
};

Grouping MakeGrouping(const std::vector<int32_t>& m, int64_t n, int64_t k) {
  Grouping g;
  g.expert_offsets.push_back(0);
  g.blockscale_offsets.push_back(0);
  for (int32_t me : m) {
    g.expert_offsets.push_back(g.expert_offsets.back() + me);
    g.blockscale_offsets.push_back(g.blockscale_offsets.back() +
                                   static_cast<int32_t>(RoundUp(me, 128)));
    g.problem_sizes.push_back(me);
    g.problem_sizes.push_back(static_cast<int32_t>(n));
    g.problem_sizes.push_back(static_cast<int32_t>(k));
  }
  g.rows = g.expert_offsets.back();
  g.scale_rows = g.blockscale_offsets.back();
  return g;
}

GroupedGemmSm100Problem MakeProblem(const Grouping& g, int64_t n, int64_t k, int32_t num_experts) {
  GroupedGemmSm100Problem p;
  p.num_experts = num_experts;
  p.rows = g.rows;
  p.n = n;
  p.k = k;
  p.a_scale_rows = g.scale_rows;
  // Fake, distinct, 256-aligned device addresses; only arithmetic is checked.
  p.a = 0x100000000ull;
  p.a_scales = 0x200000000ull;
  p.b = 0x300000000ull;
  p.b_scales = 0x400000000ull;
  p.c = 0x500000000ull;
  p.c_element_bytes = 2;
  return p;
}

// Checks a scale layout against the contract for a [rows, k] operand whose padded slice starts at
// `slice_base`: every (row, col) of the padded slice maps to base + contract offset, inside the
// slice, each byte exactly once.
void CheckScaleLayout(const ScaleLayoutSm100& layout, uint64_t base, uint64_t slice_base,
                      int64_t rows, int64_t k, const std::string& ctx) {
  const int64_t scale_cols = k / 32;
  const int64_t padded_rows = RoundUp(rows, 128);
  const int64_t padded_cols = RoundUp(scale_cols, 4);
  const int64_t slice_bytes = padded_rows * padded_cols;
  Check(layout.mn_tiles == CeilDiv(rows, 128), ctx + " mn_tiles=" + Str(layout.mn_tiles));
  Check(layout.k_tiles == CeilDiv(k, 128), ctx + " k_tiles=" + Str(layout.k_tiles));
  Check(layout.mn_tile_stride == CeilDiv(k, 128) * 512,
        ctx + " mn_tile_stride=" + Str(layout.mn_tile_stride));
  Check(base == slice_base, ctx + " scale base");
  std::vector<uint8_t> hits(static_cast<size_t>(slice_bytes), 0);
  int64_t bad = 0;
  for (int64_t r = 0; r < padded_rows; ++r) {
    for (int64_t c = 0; c < padded_cols; ++c) {
      const uint64_t address = base + static_cast<uint64_t>(ScaleLayoutOffsetSm100(layout, r, c));
      const int64_t rel = static_cast<int64_t>(address - slice_base);
      const bool ok = rel == ContractSwizzledOffset(r, c, scale_cols) &&
                      rel == mxmoe::format::SwizzledOffset(r, c, scale_cols) && rel >= 0 &&
                      rel < slice_bytes;
      if (!ok) {
        if (bad++ < 3) {
          Check(false, ctx + " scale (" + Str(r) + ", " + Str(c) + ") at " + Str(rel) +
                           ", contract says " + Str(ContractSwizzledOffset(r, c, scale_cols)));
        }
        continue;
      }
      ++hits[static_cast<size_t>(rel)];
    }
  }
  Check(bad == 0, ctx + " scale addresses off the contract: " + Str(bad));
  int64_t not_once = 0;
  for (uint8_t h : hits) not_once += h != 1;
  Check(not_once == 0, ctx + " bytes of the padded scale slice not hit exactly once: " +
                           Str(not_once) + " of " + Str(slice_bytes));
}

// 1 + 2: per-expert setup against the contract.
void TestExpertSetup(int64_t n, int64_t k, bool with_problem_sizes) {
  const std::vector<int32_t> m = {0, 1, 127, 128, 129, 0};
  const Grouping g = MakeGrouping(m, n, k);
  const int32_t num_experts = static_cast<int32_t>(m.size());
  const GroupedGemmSm100Problem p = MakeProblem(g, n, k, num_experts);
  const int64_t scale_row_bytes = RoundUp(k / 32, 4);
  for (int32_t e = 0; e < num_experts; ++e) {
    const std::string ctx = "expert " + Str(e) + " (m=" + Str(m[e]) + " n=" + Str(n) +
                            " k=" + Str(k) +
                            (with_problem_sizes ? ", problem_sizes)" : ", offsets only)");
    const ExpertSetupSm100 s = ComputeExpertSetupSm100(
        p, e, g.expert_offsets.data(), g.blockscale_offsets.data(),
        with_problem_sizes ? g.problem_sizes.data() : nullptr);
    Check(s.rejected == 0, ctx + " rejected");
    Check(s.m == m[e] && s.n == n && s.k == k,
          ctx + " shape " + Str(s.m) + "x" + Str(s.n) + "x" + Str(s.k));
    Check(s.first_row == g.expert_offsets[e], ctx + " first_row=" + Str(s.first_row));
    Check(s.first_scale_row == g.blockscale_offsets[e],
          ctx + " first_scale_row=" + Str(s.first_scale_row));
    Check(s.a == p.a + static_cast<uint64_t>(g.expert_offsets[e] * (k / 2)), ctx + " a address");
    Check(s.a_scales ==
              p.a_scales + static_cast<uint64_t>(g.blockscale_offsets[e] * scale_row_bytes),
          ctx + " a_scales address");
    Check(s.b == p.b + static_cast<uint64_t>(e * n * (k / 2)), ctx + " b address");
    Check(s.b_scales == p.b_scales + static_cast<uint64_t>(e * RoundUp(n, 128) * scale_row_bytes),
          ctx + " b_scales address");
    Check(s.c == p.c + static_cast<uint64_t>(g.expert_offsets[e] * n * 2), ctx + " c address");
    Check(s.a_row_stride == k && s.b_row_stride == k && s.c_row_stride == n,
          ctx + " row strides " + Str(s.a_row_stride) + "/" + Str(s.b_row_stride) + "/" +
              Str(s.c_row_stride));
    // TMA: every operand address of every expert is 16-byte aligned given aligned bases.
    Check(s.a % 16 == 0 && s.a_scales % 16 == 0 && s.b % 16 == 0 && s.b_scales % 16 == 0 &&
              s.c % 16 == 0,
          ctx + " 16-byte alignment");
    CheckScaleLayout(s.sfa, s.a_scales,
                     p.a_scales + static_cast<uint64_t>(g.blockscale_offsets[e] * scale_row_bytes),
                     m[e], k, ctx + " SFA");
    // The expert's A-scale slice ends where the next expert's begins (blockscale_offsets).
    Check(static_cast<int64_t>(s.sfa.mn_tiles) * 128 ==
              g.blockscale_offsets[e + 1] - g.blockscale_offsets[e],
          ctx + " SFA rows vs blockscale_offsets");
    CheckScaleLayout(s.sfb, s.b_scales,
                     p.b_scales + static_cast<uint64_t>(e * RoundUp(n, 128) * scale_row_bytes), n,
                     k, ctx + " SFB");
  }
}

// problem_sizes' n and k are not read (the call's govern); m is.
void TestProblemSizesNAndKIgnored() {
  const Grouping g = MakeGrouping({5, 7}, 2880, 2880);
  const GroupedGemmSm100Problem p = MakeProblem(g, 2880, 2880, 2);
  const int32_t sizes[] = {5, 1, 1, 3, 0, 99};
  const ExpertSetupSm100 s0 =
      ComputeExpertSetupSm100(p, 0, g.expert_offsets.data(), g.blockscale_offsets.data(), sizes);
  const ExpertSetupSm100 s1 =
      ComputeExpertSetupSm100(p, 1, g.expert_offsets.data(), g.blockscale_offsets.data(), sizes);
  Check(s0.m == 5 && s0.n == 2880 && s0.k == 2880 && s0.rejected == 0, "problem_sizes n/k ignored");
  Check(s1.m == 3 && s1.rejected == 0 && s1.sfa.mn_tiles == 1,
        "problem_sizes m (3) smaller than the offsets' span (7) is used");
}

// 3: metadata that would go out of bounds is rejected, never followed.
void TestRejection() {
  const int64_t n = 2880;
  const int64_t k = 2880;
  struct Case {
    const char* name;
    std::vector<int32_t> offsets;
    std::vector<int32_t> blockscale;
    std::vector<int32_t> sizes;  // empty = nullptr
    int64_t rows;
    int64_t scale_rows;
    std::vector<int32_t> want_m;
  };
  const std::vector<Case> cases = {
      {"consistent", {0, 3, 3, 10}, {0, 128, 128, 256}, {}, 10, 256, {3, 0, 7}},
      {"decreasing offsets", {0, 5, 3, 10}, {0, 128, 128, 256}, {}, 10, 256, {5, 0, 7}},
      {"rows past the end", {0, 3, 3, 11}, {0, 128, 128, 256}, {}, 10, 256, {3, 0, 0}},
      {"negative offset", {-4, 3, 3, 10}, {0, 128, 128, 256}, {}, 10, 256, {0, 0, 7}},
      {"scale rows past the end", {0, 3, 3, 10}, {0, 128, 128, 200}, {}, 10, 255, {3, 0, 0}},
      {"negative scale row", {0, 3, 3, 10}, {-128, 0, 0, 128}, {}, 10, 256, {0, 0, 7}},
      {"problem m past its span", {0, 3, 3, 10}, {0, 128, 128, 256},
       {4, n, k, 0, n, k, 7, n, k}, 10, 256, {0, 0, 7}},
      {"negative problem m", {0, 3, 3, 10}, {0, 128, 128, 256},
       {3, n, k, -1, n, k, 7, n, k}, 10, 256, {3, 0, 7}},
  };
  for (const Case& c : cases) {
    GroupedGemmSm100Problem p = MakeProblem(Grouping{}, n, k, 3);
    p.rows = c.rows;
    p.a_scale_rows = c.scale_rows;
    for (int32_t e = 0; e < 3; ++e) {
      const ExpertSetupSm100 s =
          ComputeExpertSetupSm100(p, e, c.offsets.data(), c.blockscale.data(),
                                  c.sizes.empty() ? nullptr : c.sizes.data());
      const std::string ctx = std::string(c.name) + ": expert " + Str(e);
      Check(s.m == c.want_m[e], ctx + " m=" + Str(s.m) + ", want " + Str(c.want_m[e]));
      if (s.rejected) {
        Check(s.m == 0 && s.a == p.a && s.a_scales == p.a_scales && s.c == p.c &&
                  s.sfa.mn_tiles == 0,
              ctx + " rejected expert must have m=0 and in-range addresses");
      }
    }
  }
}

// 4: prepared-weights layout.
void TestPreparedLayout() {
  struct Shape {
    int64_t e, n, k;
  };
  for (const Shape& sh : {Shape{128, 2880, 2880}, Shape{128, 5760, 2880}, Shape{1, 4096, 4096},
                          Shape{3, 96, 2880}, Shape{0, 2880, 2880}, Shape{1, 8, 32},
                          Shape{3, 40, 96}}) {
    const std::string ctx =
        "prepared layout E=" + Str(sh.e) + " n=" + Str(sh.n) + " k=" + Str(sh.k);
    const PreparedWeightsLayoutSm100 w = MakePreparedWeightsLayoutSm100(sh.e, sh.n, sh.k);
    const int64_t scale_bytes = RoundUp(sh.n, 128) * RoundUp(sh.k / 32, 4);
    Check(w.packed_offset == 0 && w.packed_bytes == sh.e * sh.n * sh.k / 2, ctx + " packed");
    Check(w.expert_packed_bytes == sh.n * sh.k / 2, ctx + " expert packed bytes");
    Check(w.scales_offset >= w.packed_bytes && w.scales_offset % 256 == 0 &&
              w.scales_offset - w.packed_bytes < 256,
          ctx + " scales_offset=" + Str(w.scales_offset));
    Check(w.expert_scale_bytes == scale_bytes && w.scales_bytes == sh.e * scale_bytes,
          ctx + " scale bytes");
    Check(w.total_bytes == w.scales_offset + w.scales_bytes, ctx + " total");
    if (sh.e > 0 && sh.n >= 2880) {  // small n: the 128-row scale padding dominates
      const double bits = 8.0 * static_cast<double>(w.total_bytes) /
                          static_cast<double>(sh.e * sh.n * sh.k);
      Check(bits >= 4.25 && bits < 4.25 + 0.2, ctx + " bits per weight " + std::to_string(bits));
    }
  }
  const PreparedWeightsLayoutSm100 exact = MakePreparedWeightsLayoutSm100(1, 4096, 4096);
  Check(exact.total_bytes * 8 == 4096LL * 4096 * 17 / 4, "4096x4096 is exactly 4.25 bits/weight");
}

// 5: inverse swizzle.
void TestSwizzledPosition() {
  for (int64_t rows : {1, 127, 128, 129, 2880}) {
    for (int64_t cols : {1, 4, 90, 128}) {
      const std::string ctx = "inverse swizzle rows=" + Str(rows) + " cols=" + Str(cols);
      const int64_t total = RoundUp(rows, 128) * RoundUp(cols, 4);
      int64_t inside = 0;
      int64_t bad = 0;
      for (int64_t off = 0; off < total; ++off) {
        int64_t r = -1;
        int64_t c = -1;
        SwizzledPositionSm100(off, cols, &r, &c);
        if (r < 0 || c < 0 || r >= RoundUp(rows, 128) || c >= RoundUp(cols, 4) ||
            ContractSwizzledOffset(r, c, cols) != off) {
          ++bad;
          continue;
        }
        inside += (r < rows && c < cols);
      }
      Check(bad == 0, ctx + ": " + Str(bad) + " offsets do not invert");
      Check(inside == rows * cols, ctx + ": " + Str(inside) + " data positions, want " +
                                       Str(rows * cols));
    }
  }
}

// 6: GEMM emulation through the setup's addresses vs a reference on the LINEAR layouts.
// A decoded row: E2M1 values and one scale per 32-block, as doubles (exact).
struct DecodedRow {
  std::vector<double> values;
  std::vector<double> scales;
};

// `scale_at(block)` returns the row's E8M0 byte of that block, from whichever layout is read.
template <typename ScaleAt>
DecodedRow DecodeRow(const uint8_t* packed, int64_t k, ScaleAt scale_at) {
  DecodedRow row;
  row.values.resize(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) {
    const uint8_t code = (packed[i / 2] >> ((i % 2) * 4)) & 0xF;
    row.values[static_cast<size_t>(i)] = mxmoe::format::E2M1ToFloat(code);
  }
  for (int64_t blk = 0; blk < k / 32; ++blk) {
    row.scales.push_back(mxmoe::format::ScaleToFloat(scale_at(blk)));
  }
  return row;
}

// Per 32-block products in double, summed in double: the same arithmetic for both readers, so
// equal inputs give equal bits.
float Dot(const DecodedRow& a, const DecodedRow& b) {
  // Raw pointers: this loop dominates the test, which Bazel may build unoptimised.
  const double* av = a.values.data();
  const double* bv = b.values.data();
  const double* as = a.scales.data();
  const double* bs = b.scales.data();
  const size_t blocks = a.scales.size();
  double sum = 0.0;
  for (size_t blk = 0; blk < blocks; ++blk, av += 32, bv += 32) {
    double block = 0.0;
    for (int i = 0; i < 32; ++i) block += av[i] * bv[i];
    sum += block * as[blk] * bs[blk];
  }
  return static_cast<float>(sum);
}

void TestGemmEmulation(int64_t n, int64_t k, uint32_t seed) {
  const std::vector<int32_t> m = {0, 1, 127, 128, 129};
  const int32_t num_experts = static_cast<int32_t>(m.size());
  const Grouping g = MakeGrouping(m, n, k);
  const int64_t scale_cols = k / 32;
  const int64_t extra_rows = 3;  // rows past expert_offsets[E]: must stay untouched
  const int64_t rows = g.rows + extra_rows;
  std::mt19937 rng(seed);
  auto byte = [&rng]() { return static_cast<uint8_t>(rng() & 0xFF); };
  // Scales near 127 keep products finite and far from fp32/bf16 range limits.
  auto scale = [&rng]() { return static_cast<uint8_t>(120 + rng() % 15); };

  std::vector<uint8_t> a(static_cast<size_t>(rows * k / 2));
  for (auto& x : a) x = byte();
  std::vector<uint8_t> a_scales_linear(static_cast<size_t>(rows * scale_cols));
  for (auto& x : a_scales_linear) x = scale();
  std::vector<uint8_t> b(static_cast<size_t>(num_experts * n * k / 2));
  for (auto& x : b) x = byte();
  std::vector<uint8_t> b_scales_linear(static_cast<size_t>(num_experts * n * scale_cols));
  for (auto& x : b_scales_linear) x = scale();

  // Public swizzled forms: activations per expert at blockscale_offsets, weights per expert.
  const int64_t row_bytes = RoundUp(scale_cols, 4);
  std::vector<uint8_t> a_scales(static_cast<size_t>(g.scale_rows * row_bytes), 0);
  for (int32_t e = 0; e < num_experts; ++e) {
    uint8_t* slice = a_scales.data() + g.blockscale_offsets[e] * row_bytes;
    for (int64_t r = 0; r < m[e]; ++r) {
      for (int64_t c = 0; c < scale_cols; ++c) {
        slice[mxmoe::format::SwizzledOffset(r, c, scale_cols)] =
            a_scales_linear[(g.expert_offsets[e] + r) * scale_cols + c];
      }
    }
  }
  const PreparedWeightsLayoutSm100 w = MakePreparedWeightsLayoutSm100(num_experts, n, k);
  std::vector<uint8_t> b_scales(static_cast<size_t>(w.scales_bytes), 0);
  for (int32_t e = 0; e < num_experts; ++e) {
    uint8_t* slice = b_scales.data() + e * w.expert_scale_bytes;
    for (int64_t off = 0; off < w.expert_scale_bytes; ++off) {  // as the prepare kernel does
      int64_t r = 0;
      int64_t c = 0;
      SwizzledPositionSm100(off, scale_cols, &r, &c);
      slice[off] = (r < n && c < scale_cols) ? b_scales_linear[(e * n + r) * scale_cols + c] : 0;
    }
  }

  constexpr uint16_t kPoison = 0xFFFF;  // a bf16 NaN no result produces
  std::vector<uint16_t> c(static_cast<size_t>(rows * n), kPoison);
  std::vector<uint16_t> want(static_cast<size_t>(rows * n), kPoison);

  GroupedGemmSm100Problem p = MakeProblem(g, n, k, num_experts);
  p.rows = rows;
  p.a = reinterpret_cast<uint64_t>(a.data());
  p.a_scales = reinterpret_cast<uint64_t>(a_scales.data());
  p.b = reinterpret_cast<uint64_t>(b.data());
  p.b_scales = reinterpret_cast<uint64_t>(b_scales.data());
  p.c = reinterpret_cast<uint64_t>(c.data());

  for (int32_t e = 0; e < num_experts; ++e) {
    const ExpertSetupSm100 s = ComputeExpertSetupSm100(p, e, g.expert_offsets.data(),
                                                       g.blockscale_offsets.data(),
                                                       g.problem_sizes.data());
    if (s.m == 0) continue;
    // Emulated kernel: operands only through the setup (addresses, strides, scale layouts).
    const uint8_t* a_base = reinterpret_cast<const uint8_t*>(s.a);
    const uint8_t* a_scale_base = reinterpret_cast<const uint8_t*>(s.a_scales);
    const uint8_t* b_base = reinterpret_cast<const uint8_t*>(s.b);
    const uint8_t* b_scale_base = reinterpret_cast<const uint8_t*>(s.b_scales);
    std::vector<DecodedRow> b_rows;
    std::vector<DecodedRow> b_rows_ref;
    for (int64_t j = 0; j < s.n; ++j) {
      b_rows.push_back(DecodeRow(b_base + j * s.b_row_stride / 2, k, [&](int64_t blk) {
        return b_scale_base[ScaleLayoutOffsetSm100(s.sfb, j, blk)];
      }));
      // Reference: the LINEAR layouts, no setup involved.
      b_rows_ref.push_back(DecodeRow(b.data() + (e * n + j) * k / 2, k, [&](int64_t blk) {
        return b_scales_linear[static_cast<size_t>((e * n + j) * scale_cols + blk)];
      }));
    }
    for (int64_t r = 0; r < s.m; ++r) {
      const DecodedRow a_row = DecodeRow(a_base + r * s.a_row_stride / 2, k, [&](int64_t blk) {
        return a_scale_base[ScaleLayoutOffsetSm100(s.sfa, r, blk)];
      });
      uint16_t* c_row = reinterpret_cast<uint16_t*>(s.c) + r * s.c_row_stride;
      for (int64_t j = 0; j < s.n; ++j) {
        c_row[j] = mxmoe::format::FloatToBf16(Dot(a_row, b_rows[static_cast<size_t>(j)]));
      }
      const int64_t row = g.expert_offsets[e] + r;
      const DecodedRow a_row_ref = DecodeRow(a.data() + row * k / 2, k, [&](int64_t blk) {
        return a_scales_linear[static_cast<size_t>(row * scale_cols + blk)];
      });
      for (int64_t j = 0; j < n; ++j) {
        want[static_cast<size_t>(row * n + j)] =
            mxmoe::format::FloatToBf16(Dot(a_row_ref, b_rows_ref[static_cast<size_t>(j)]));
      }
    }
  }
  int64_t mismatches = 0;
  int64_t first = -1;
  for (size_t i = 0; i < c.size(); ++i) {
    if (c[i] != want[i]) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++mismatches;
    }
  }
  const std::string ctx = "GEMM emulation n=" + Str(n) + " k=" + Str(k) + " m={0,1,127,128,129}";
  Check(mismatches == 0, ctx + ": " + Str(mismatches) + " outputs differ, first at row " +
                             Str(first < 0 ? -1 : first / n) + " col " +
                             Str(first < 0 ? -1 : first % n));
  int64_t touched = 0;
  for (int64_t i = g.rows * n; i < rows * n; ++i) touched += c[static_cast<size_t>(i)] != kPoison;
  Check(touched == 0, ctx + ": " + Str(touched) + " outputs written past expert_offsets[E]");
}

}  // namespace

int main() {
  for (int64_t k : {2880, 4096}) {
    for (int64_t n : {2880, 4096}) {
      TestExpertSetup(n, k, /*with_problem_sizes=*/true);
      TestExpertSetup(n, k, /*with_problem_sizes=*/false);
    }
  }
  TestProblemSizesNAndKIgnored();
  TestRejection();
  TestPreparedLayout();
  TestSwizzledPosition();
  TestGemmEmulation(/*n=*/96, /*k=*/2880, /*seed=*/1);
  TestGemmEmulation(/*n=*/160, /*k=*/4096, /*seed=*/2);
  printf("grouped_gemm_sm100_setup_test: %d checks\n", g_checks);
  printf("%d passed, %d failed\n", g_checks - g_failures, g_failures);
  return g_failures == 0 ? 0 : 1;
}
