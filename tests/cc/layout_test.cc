// Scale layouts and the grouped quantizers on the CPU backend:
//   - format::SwizzledOffset against a direct evaluation of the layout (tile, 32-row group,
//     4-column group), and that it is a bijection onto the padded matrix;
//   - mxmoe_swizzle_scales / mxmoe_unswizzle_scales: every byte where the formula says, padding
//     written 0, round trip, unswizzle ignoring padding (batched, K = 2880, rows = 130);
//   - mxmoe_quantize SWIZZLED == LINEAR + swizzle;
//   - mxmoe_experts_quantize and mxmoe_silu_mul_experts_quantize against per-expert
//     mxmoe_quantize calls (experts with 0, 1, 129 rows), untouched rows past the offsets;
//   - mxmoe_quantize_weights (LINEAR and per-expert SWIZZLED) and mxmoe_prepare_weights' CPU
//     format (the GEMM's decoded panels, checked byte by byte against docs/format.md).
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <random>
#include <vector>

#include "mxmoe/format.h"
#include "mxmoe/mxmoe.h"
#include "tests/cc/expect.h"

namespace {

using mxmoe_test::failures;

constexpr mxmoe_device kCpu = {MXMOE_DEVICE_CPU, 0};
constexpr uint8_t kPoison = 0xAB;

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The layout described in words: 128x4 tiles of 512 bytes, row-major over tiles; inside a tile,
// row m = 32 * group + lane sits at lane * 16 + group * 4, column c at + c.
int64_t DirectOffset(int64_t m, int64_t k, int64_t cols) {
  const int64_t tiles_per_row = RoundUp(cols, 4) / 4;
  const int64_t tile = (m / 128) * tiles_per_row + (k / 4);
  const int64_t lane = m % 32;
  const int64_t group = (m % 128) / 32;
  return tile * 512 + lane * 16 + group * 4 + (k % 4);
}

std::vector<uint16_t> RandomBf16(size_t count, std::mt19937& rng, float stddev = 1.0f) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<uint16_t> v(count);
  for (auto& x : v) x = mxmoe::format::FloatToBf16(normal(rng));
  return v;
}

void TestSwizzledOffset() {
  for (int64_t cols : {1, 3, 4, 5, 90, 224}) {
    for (int64_t rows : {1, 31, 128, 130, 300}) {
      const int64_t padded_rows = RoundUp(rows, 128);
      const int64_t padded_cols = RoundUp(cols, 4);
      std::vector<int> hits(padded_rows * padded_cols, 0);
      for (int64_t m = 0; m < padded_rows; ++m) {
        for (int64_t k = 0; k < padded_cols; ++k) {
          const int64_t got = mxmoe::format::SwizzledOffset(m, k, cols);
          const int64_t want = DirectOffset(m, k, cols);
          EXPECT(got == want, "rows=%lld cols=%lld (m=%lld, k=%lld): offset %lld, direct %lld",
                 (long long)rows, (long long)cols, (long long)m, (long long)k, (long long)got,
                 (long long)want);
          if (got >= 0 && got < (int64_t)hits.size()) ++hits[got];
        }
      }
      for (size_t i = 0; i < hits.size(); ++i) {
        EXPECT(hits[i] == 1, "rows=%lld cols=%lld: byte %zu hit %d times", (long long)rows,
               (long long)cols, i, hits[i]);
      }
      EXPECT(mxmoe::format::SwizzledBytes(rows, cols) == padded_rows * padded_cols,
             "SwizzledBytes(%lld, %lld)", (long long)rows, (long long)cols);
    }
  }
}

void TestSwizzleApi() {
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> byte(0, 255);
  const int64_t batch = 3;
  for (int64_t rows : {1, 130, 256}) {
    for (int64_t cols : {1, 90, 4}) {
      const int64_t bytes = RoundUp(rows, 128) * RoundUp(cols, 4);
      std::vector<uint8_t> linear(batch * rows * cols);
      for (auto& b : linear) b = static_cast<uint8_t>(byte(rng));
      std::vector<uint8_t> swizzled(batch * bytes, kPoison);
      mxmoe_swizzle_scales_args args = {batch, rows, cols, linear.data(), swizzled.data(), kCpu};
      EXPECT_OK(mxmoe_swizzle_scales(&args, nullptr));
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t m = 0; m < RoundUp(rows, 128); ++m) {
          for (int64_t k = 0; k < RoundUp(cols, 4); ++k) {
            const uint8_t want = (m < rows && k < cols) ? linear[(b * rows + m) * cols + k] : 0;
            const uint8_t got = swizzled[b * bytes + DirectOffset(m, k, cols)];
            EXPECT(got == want, "swizzle batch=%lld rows=%lld cols=%lld [%lld][%lld][%lld]: %d, "
                   "expected %d", (long long)batch, (long long)rows, (long long)cols, (long long)b,
                   (long long)m, (long long)k, got, want);
          }
        }
      }
      // Unswizzle ignores padding: fill it with garbage first.
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t m = 0; m < RoundUp(rows, 128); ++m) {
          for (int64_t k = 0; k < RoundUp(cols, 4); ++k) {
            if (m >= rows || k >= cols) swizzled[b * bytes + DirectOffset(m, k, cols)] = 0x77;
          }
        }
      }
      std::vector<uint8_t> back(batch * rows * cols + 16, kPoison);
      mxmoe_swizzle_scales_args un = {batch, rows, cols, swizzled.data(), back.data(), kCpu};
      EXPECT_OK(mxmoe_unswizzle_scales(&un, nullptr));
      EXPECT(memcmp(back.data(), linear.data(), linear.size()) == 0,
             "unswizzle round trip differs (batch=%lld rows=%lld cols=%lld)", (long long)batch,
             (long long)rows, (long long)cols);
      for (int i = 0; i < 16; ++i) {
        EXPECT(back[linear.size() + i] == kPoison, "unswizzle wrote past its output");
      }
    }
  }
}

struct QuantizedRows {
  std::vector<uint8_t> packed;
  std::vector<uint8_t> scales;
};

QuantizedRows Quantize(const uint16_t* input, int64_t rows, int64_t k, int32_t layout) {
  QuantizedRows q;
  q.packed.assign(rows * k / 2, kPoison);
  q.scales.assign(layout == MXMOE_SCALE_LAYOUT_LINEAR ? rows * (k / 32)
                                                      : RoundUp(rows, 128) * RoundUp(k / 32, 4),
                  kPoison);
  mxmoe_quantize_args args = {};
  args.rows = rows;
  args.k = k;
  args.input = input;
  args.input_dtype = MXMOE_DTYPE_BF16;
  args.packed = q.packed.data();
  args.scales = q.scales.data();
  args.scale_layout = layout;
  args.device = kCpu;
  EXPECT_OK(mxmoe_quantize(&args, nullptr));
  return q;
}

void TestQuantizeSwizzledEqualsLinearPlusSwizzle() {
  std::mt19937 rng(5);
  const int64_t rows = 130;
  const int64_t k = 2880;
  const std::vector<uint16_t> input = RandomBf16(rows * k, rng);
  const QuantizedRows linear = Quantize(input.data(), rows, k, MXMOE_SCALE_LAYOUT_LINEAR);
  const QuantizedRows swizzled = Quantize(input.data(), rows, k, MXMOE_SCALE_LAYOUT_SWIZZLED_128X4);
  EXPECT(linear.packed == swizzled.packed, "codes depend on the scale layout (rows=%lld k=%lld)",
         (long long)rows, (long long)k);
  std::vector<uint8_t> reswizzled(swizzled.scales.size(), kPoison);
  mxmoe_swizzle_scales_args args = {1, rows, k / 32, linear.scales.data(), reswizzled.data(), kCpu};
  EXPECT_OK(mxmoe_swizzle_scales(&args, nullptr));
  EXPECT(reswizzled == swizzled.scales, "quantize SWIZZLED != LINEAR + swizzle (rows=%lld k=%lld)",
         (long long)rows, (long long)k);
}

struct Grouping {
  std::vector<int32_t> expert_offsets;
  std::vector<int32_t> blockscale_offsets;
};

Grouping MakeGrouping(const std::vector<int32_t>& counts) {
  Grouping g;
  g.expert_offsets = {0};
  g.blockscale_offsets = {0};
  for (int32_t m : counts) {
    g.expert_offsets.push_back(g.expert_offsets.back() + m);
    g.blockscale_offsets.push_back(g.blockscale_offsets.back() + RoundUp(m, 128));
  }
  return g;
}

// Compares grouped quantizer output with per-expert mxmoe_quantize(SWIZZLED) of `values`.
void CheckGrouped(const char* what, const std::vector<uint16_t>& values, int64_t k,
                  const Grouping& g, const std::vector<uint8_t>& packed,
                  const std::vector<uint8_t>& scales, int64_t extra_rows,
                  int64_t extra_scale_rows) {
  const int32_t num_experts = static_cast<int32_t>(g.expert_offsets.size()) - 1;
  const int64_t padded_cols = RoundUp(k / 32, 4);
  for (int32_t e = 0; e < num_experts; ++e) {
    const int64_t m = g.expert_offsets[e + 1] - g.expert_offsets[e];
    if (m == 0) continue;
    const QuantizedRows want = Quantize(values.data() + g.expert_offsets[e] * k, m, k,
                                        MXMOE_SCALE_LAYOUT_SWIZZLED_128X4);
    EXPECT(memcmp(packed.data() + g.expert_offsets[e] * k / 2, want.packed.data(),
                  want.packed.size()) == 0,
           "%s: expert %d (m=%lld, k=%lld) codes differ", what, e, (long long)m, (long long)k);
    EXPECT(memcmp(scales.data() + g.blockscale_offsets[e] * padded_cols, want.scales.data(),
                  want.scales.size()) == 0,
           "%s: expert %d (m=%lld, k=%lld) swizzled scales differ", what, e, (long long)m,
           (long long)k);
  }
  const int64_t rows = g.expert_offsets.back();
  for (int64_t i = rows * k / 2; i < (rows + extra_rows) * k / 2; ++i) {
    EXPECT(packed[i] == kPoison, "%s: packed byte %lld past expert_offsets[E] was written", what,
           (long long)i);
  }
  const int64_t scale_rows = g.blockscale_offsets.back();
  const int64_t scale_end = (scale_rows + extra_scale_rows) * padded_cols;
  for (int64_t i = scale_rows * padded_cols; i < scale_end; ++i) {
    EXPECT(scales[i] == kPoison, "%s: scale byte %lld past blockscale_offsets[E] was written",
           what, (long long)i);
  }
}

void TestExpertsQuantize() {
  std::mt19937 rng(11);
  for (int64_t k : {64, 2880}) {
    const std::vector<int32_t> counts = {3, 0, 1, 129, 0, 40};
    const Grouping g = MakeGrouping(counts);
    const int64_t extra_rows = 5;
    const int64_t extra_scale_rows = 7;
    const int64_t rows = g.expert_offsets.back() + extra_rows;
    const int64_t scale_rows = g.blockscale_offsets.back() + extra_scale_rows;
    const int64_t padded_cols = RoundUp(k / 32, 4);
    const std::vector<uint16_t> input = RandomBf16(rows * k, rng, 2.0f);
    std::vector<uint8_t> packed(rows * k / 2, kPoison);
    std::vector<uint8_t> scales(scale_rows * padded_cols, kPoison);
    mxmoe_experts_quantize_args args = {};
    args.rows = rows;
    args.k = k;
    args.num_experts = static_cast<int32_t>(counts.size());
    args.input = input.data();
    args.input_dtype = MXMOE_DTYPE_BF16;
    args.expert_offsets = g.expert_offsets.data();
    args.blockscale_offsets = g.blockscale_offsets.data();
    args.packed = packed.data();
    args.scales = scales.data();
    args.scale_rows = scale_rows;
    args.device = kCpu;
    EXPECT_OK(mxmoe_experts_quantize(&args, nullptr));
    CheckGrouped("experts_quantize", input, k, g, packed, scales, extra_rows, extra_scale_rows);

    // SiLU-and-mul: the same layout, of y = silu(gate) * up rounded to bf16.
    const std::vector<uint16_t> gate_up = RandomBf16(rows * 2 * k, rng, 3.0f);
    std::vector<uint16_t> y(rows * k);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < k; ++j) {
        const float gate = mxmoe::format::Bf16ToFloat(gate_up[r * 2 * k + j]);
        const float up = mxmoe::format::Bf16ToFloat(gate_up[r * 2 * k + k + j]);
        y[r * k + j] = mxmoe::format::FloatToBf16(mxmoe::format::SiluF32(gate) * up);
      }
    }
    std::fill(packed.begin(), packed.end(), kPoison);
    std::fill(scales.begin(), scales.end(), kPoison);
    mxmoe_silu_mul_experts_quantize_args silu = {};
    silu.rows = rows;
    silu.n = k;
    silu.num_experts = args.num_experts;
    silu.input = gate_up.data();
    silu.input_dtype = MXMOE_DTYPE_BF16;
    silu.expert_offsets = g.expert_offsets.data();
    silu.blockscale_offsets = g.blockscale_offsets.data();
    silu.packed = packed.data();
    silu.scales = scales.data();
    silu.scale_rows = scale_rows;
    silu.device = kCpu;
    EXPECT_OK(mxmoe_silu_mul_experts_quantize(&silu, nullptr));
    CheckGrouped("silu_mul_experts_quantize", y, k, g, packed, scales, extra_rows,
                 extra_scale_rows);
  }
}

// The CPU backend needs no alignment: bf16 input, int32 offsets and outputs at odd addresses give
// the same bytes as aligned ones.
void TestUnalignedPointers() {
  std::mt19937 rng(19);
  const int64_t k = 64;
  const Grouping g = MakeGrouping({3, 0, 2});
  const int64_t rows = 5, padded_cols = RoundUp(k / 32, 4), scale_rows = 256;
  const std::vector<uint16_t> input = RandomBf16(rows * k, rng);
  auto run = [&](size_t shift, std::vector<uint8_t>* packed_out, std::vector<uint8_t>* scales_out) {
    std::vector<uint8_t> in(input.size() * 2 + shift), off(16 + shift), bs(16 + shift);
    std::vector<uint8_t> packed(rows * k / 2 + shift), scales(scale_rows * padded_cols + shift);
    memcpy(in.data() + shift, input.data(), input.size() * 2);
    memcpy(off.data() + shift, g.expert_offsets.data(), 16);
    memcpy(bs.data() + shift, g.blockscale_offsets.data(), 16);
    mxmoe_experts_quantize_args args = {};
    args.rows = rows;
    args.k = k;
    args.num_experts = 3;
    args.input = in.data() + shift;
    args.input_dtype = MXMOE_DTYPE_BF16;
    args.expert_offsets = reinterpret_cast<const int32_t*>(off.data() + shift);
    args.blockscale_offsets = reinterpret_cast<const int32_t*>(bs.data() + shift);
    args.packed = packed.data() + shift;
    args.scales = scales.data() + shift;
    args.scale_rows = scale_rows;
    args.device = kCpu;
    EXPECT_OK(mxmoe_experts_quantize(&args, nullptr));
    packed_out->assign(packed.begin() + shift, packed.end());
    scales_out->assign(scales.begin() + shift, scales.end());
  };
  std::vector<uint8_t> packed0, scales0, packed1, scales1;
  run(0, &packed0, &scales0);
  run(1, &packed1, &scales1);
  EXPECT(packed0 == packed1 && scales0 == scales1, "odd addresses change the result");
}

void TestSiluMulFp16() {
  // fp16 path: y rounded to fp16 (not bf16) before quantization.
  std::mt19937 rng(13);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  const int64_t n = 32;
  std::vector<uint16_t> gate_up(2 * n);
  for (auto& v : gate_up) v = mxmoe::format::FloatToFp16(normal(rng));
  std::vector<uint16_t> y(n);
  for (int64_t j = 0; j < n; ++j) {
    const float gate = mxmoe::format::Fp16ToFloat(gate_up[j]);
    const float up = mxmoe::format::Fp16ToFloat(gate_up[n + j]);
    y[j] = mxmoe::format::FloatToFp16(mxmoe::format::SiluF32(gate) * up);
  }
  mxmoe_quantize_args q = {};
  std::vector<uint8_t> want_packed(n / 2), want_scales(512);
  q.rows = 1;
  q.k = n;
  q.input = y.data();
  q.input_dtype = MXMOE_DTYPE_FP16;
  q.packed = want_packed.data();
  q.scales = want_scales.data();
  q.scale_layout = MXMOE_SCALE_LAYOUT_SWIZZLED_128X4;
  q.device = kCpu;
  EXPECT_OK(mxmoe_quantize(&q, nullptr));
  const Grouping g = MakeGrouping({1});
  std::vector<uint8_t> packed(n / 2, kPoison), scales(512, kPoison);
  mxmoe_silu_mul_experts_quantize_args silu = {1, n, 1, gate_up.data(), MXMOE_DTYPE_FP16,
                                               g.expert_offsets.data(), g.blockscale_offsets.data(),
                                               packed.data(), scales.data(), 128, kCpu};
  EXPECT_OK(mxmoe_silu_mul_experts_quantize(&silu, nullptr));
  EXPECT(packed == want_packed && scales == want_scales, "fp16 silu_mul differs from reference");
}

void TestQuantizeWeightsAndPrepare() {
  std::mt19937 rng(17);
  const int32_t experts = 3;
  const int64_t n = 130;
  const int64_t k = 96;
  const std::vector<uint16_t> weights = RandomBf16(experts * n * k, rng, 0.05f);
  const QuantizedRows want = Quantize(weights.data(), experts * n, k, MXMOE_SCALE_LAYOUT_LINEAR);
  for (int32_t layout : {MXMOE_SCALE_LAYOUT_LINEAR, MXMOE_SCALE_LAYOUT_SWIZZLED_128X4}) {
    const int64_t expert_scale_bytes =
        layout == MXMOE_SCALE_LAYOUT_LINEAR ? n * (k / 32) : RoundUp(n, 128) * RoundUp(k / 32, 4);
    std::vector<uint8_t> packed(experts * n * k / 2, kPoison);
    std::vector<uint8_t> scales(experts * expert_scale_bytes, kPoison);
    mxmoe_quantize_weights_args args = {experts, n, k, weights.data(), MXMOE_DTYPE_BF16,
                                        packed.data(), scales.data(), layout, kCpu};
    EXPECT_OK(mxmoe_quantize_weights(&args, nullptr));
    EXPECT(packed == want.packed, "quantize_weights layout %d: codes differ (E=%d n=%lld k=%lld)",
           layout, experts, (long long)n, (long long)k);
    for (int32_t e = 0; e < experts; ++e) {
      const QuantizedRows expert = Quantize(weights.data() + e * n * k, n, k, layout);
      EXPECT(memcmp(scales.data() + e * expert_scale_bytes, expert.scales.data(),
                    expert_scale_bytes) == 0,
             "quantize_weights layout %d: expert %d scales differ", layout, e);
    }
  }
  // CPU prepared format (docs/format.md): per expert, ceil(n / 8) panels of 8 weight rows; per
  // 32-block 256 bytes, element i of panel column c at (i / 4) * 32 + c * 4 + i % 4 holding its
  // twice-value + 12, then 8 scale bytes per block; padding columns value 0, scale 127.
  mxmoe_prepare_weights_args prep = {};
  prep.weights = {experts, n, k, MXMOE_WEIGHT_FORMAT_LINEAR, 0, want.packed.data(),
                  want.scales.data()};
  prep.backend = MXMOE_BACKEND_AUTO;
  prep.device = kCpu;
  size_t bytes = 0;
  EXPECT_OK(mxmoe_prepare_weights_size(&prep, &bytes));
  const int64_t blocks = k / 32;
  const int64_t panels = (n + 7) / 8;
  const int64_t panel_bytes = blocks * (256 + 8);
  EXPECT(bytes == static_cast<size_t>(experts * panels * panel_bytes),
         "prepared size %zu, expected %lld", bytes, (long long)(experts * panels * panel_bytes));
  std::vector<uint8_t> prepared(bytes + 8, kPoison);
  prep.prepared = prepared.data();
  prep.prepared_bytes = bytes;
  EXPECT_OK(mxmoe_prepare_weights(&prep, nullptr));
  int64_t wrong = 0;
  for (int32_t e = 0; e < experts; ++e) {
    for (int64_t j = 0; j < panels * 8; ++j) {
      const uint8_t* panel = prepared.data() + (e * panels + j / 8) * panel_bytes;
      const int c = static_cast<int>(j % 8);
      for (int64_t i = 0; i < k; ++i) {
        const int64_t b = i / 32;
        const int e_in = static_cast<int>(i % 32);
        int want_value = 12;
        if (j < n) {
          const uint8_t byte = want.packed[((e * n + j) * k + i) / 2];
          const uint8_t code = i % 2 ? byte >> 4 : byte & 0xF;
          want_value = mxmoe::format::E2M1TwiceValue(code) + 12;
        }
        wrong += panel[b * 256 + (e_in / 4) * 32 + c * 4 + e_in % 4] != want_value;
      }
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t want_scale = j < n ? want.scales[(e * n + j) * blocks + b] : 127;
        wrong += panel[blocks * 256 + b * 8 + c] != want_scale;
      }
    }
  }
  EXPECT(wrong == 0, "%lld prepared bytes differ from the documented panel layout",
         (long long)wrong);
  EXPECT(prepared[bytes] == kPoison, "prepare_weights wrote past prepared_bytes");
}

}  // namespace

int main() {
  TestSwizzledOffset();
  TestSwizzleApi();
  TestQuantizeSwizzledEqualsLinearPlusSwizzle();
  TestExpertsQuantize();
  TestSiluMulFp16();
  TestUnalignedPointers();
  TestQuantizeWeightsAndPrepare();
  if (failures != 0) {
    fprintf(stderr, "layout_test: %d failure(s)\n", failures);
    return 1;
  }
  printf("layout_test: all passed\n");
  return 0;
}
