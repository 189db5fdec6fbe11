// The MXFP4 quantization rule on the CPU backend, through the public C API:
//   - hand-computed blocks: exact powers of two, mantissa just below and at 1.75, every E2M1 tie
//     (to the even code), saturation at 6, all-zero and -0 blocks, subnormal inputs, scales
//     clamped at 0 (and the 253 ceiling of finite inputs), NaN and Inf (mxmoe.h's documented
//     rule), fp16 inputs;
//   - random and adversarial rows against an independent reference written from docs/format.md's
//     text (log2/frexp and a nearest-grid search, not format.h's bit tricks);
//   - dequantize: code * 2^(s-127) rounded to bf16/fp16/fp32, NaN scale, overflow to Inf.
// Plain main(); prints every failure with its shape and returns nonzero.
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

uint16_t Bf16(float f) { return mxmoe::format::FloatToBf16(f); }
uint16_t Bf16Bits(uint16_t bits) { return bits; }

struct Quantized {
  std::vector<uint8_t> packed;
  std::vector<uint8_t> scales;
  mxmoe_status status;
};

Quantized QuantizeRows(const std::vector<uint16_t>& input, int64_t rows, int64_t k,
                       int32_t dtype = MXMOE_DTYPE_BF16,
                       int32_t layout = MXMOE_SCALE_LAYOUT_LINEAR) {
  Quantized q;
  q.packed.assign(rows * k / 2, 0xAB);
  const int64_t scale_bytes = layout == MXMOE_SCALE_LAYOUT_LINEAR
                                  ? rows * (k / 32)
                                  : mxmoe::format::SwizzledBytes(rows, k / 32);
  q.scales.assign(scale_bytes, 0xAB);
  mxmoe_quantize_args args = {};
  args.rows = rows;
  args.k = k;
  args.input = input.data();
  args.input_dtype = dtype;
  args.packed = q.packed.data();
  args.scales = q.scales.data();
  args.scale_layout = layout;
  args.device = kCpu;
  q.status = mxmoe_quantize(&args, nullptr);
  return q;
}

uint8_t Code(const Quantized& q, int64_t index) {
  const uint8_t byte = q.packed[index / 2];
  return index % 2 == 0 ? (byte & 0xF) : (byte >> 4);
}

// One block of 32 bf16 values (rest 0) -> scale and codes, checked against expectations.
void ExpectBlock(const char* name, const std::vector<float>& values, uint8_t expected_scale,
                 const std::vector<uint8_t>& expected_codes) {
  std::vector<uint16_t> input(32, 0);
  for (size_t i = 0; i < values.size(); ++i) input[i] = Bf16(values[i]);
  const Quantized q = QuantizeRows(input, 1, 32);
  EXPECT(q.status == MXMOE_STATUS_OK, "%s: status %d: %s", name, q.status, mxmoe_last_error());
  EXPECT(q.scales[0] == expected_scale, "%s: scale %d, expected %d", name, q.scales[0],
         expected_scale);
  for (size_t i = 0; i < expected_codes.size(); ++i) {
    EXPECT(Code(q, i) == expected_codes[i], "%s: element %zu (value %g): code %d, expected %d",
           name, i, i < values.size() ? values[i] : 0.0, Code(q, i), expected_codes[i]);
  }
}

// ---- independent reference (from docs/format.md's text) --------------------------------

// Scale byte: amax rounded up to a power of two when its mantissa (in [1, 2)) is >= 1.75,
// exponent e (biased, fp32 style) -> s = max(e - 2, 0), min 254. Uses frexp, not bit patterns.
int ReferenceScale(float amax) {
  if (amax == 0.0f) return 0;
  if (isinf(amax)) return 253;  // Inf's exponent field is 255: s = 255 - 2
  int exp2;
  const double mant = frexp(static_cast<double>(amax), &exp2);  // amax = mant * 2^exp2, [0.5,1)
  int e = exp2 - 1 + 127;  // biased exponent of amax as if normal
  if (mant * 2.0 >= 1.75) e += 1;
  // fp32 subnormals have biased exponent 0 in the bit rule: anything below 2^-126 counts as
  // e <= 1 (unless rounding brings it to 2^-126), all of which give s = 0 anyway.
  int s = e > 2 ? e - 2 : 0;
  return s < 254 ? s : 254;
}

// Nearest E2M1 grid value, ties to the even code, saturating; sign kept.
int ReferenceCode(double v) {
  static const double grid[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  const int sign = signbit(v) ? 8 : 0;
  const double a = fabs(v);
  if (a >= 6) return sign | 7;
  int best = 0;
  for (int c = 1; c < 8; ++c) {
    const double d = fabs(a - grid[c]);
    const double best_d = fabs(a - grid[best]);
    if (d < best_d || (d == best_d && c % 2 == 0)) best = c;
  }
  return sign | best;
}

void TestHandComputedBlocks() {
  // amax 4 = 2^2: e = 129, s = 127, values unscaled.
  ExpectBlock("power of two amax=4", {4, 2, 1, 0.5, -4, -0.5, 3, 1.5}, 127,
              {6, 4, 2, 1, 14, 9, 5, 3});
  // amax 1: s = 125, multiplier 4: 1 -> 4.
  ExpectBlock("power of two amax=1", {1, 0.5, 0.25, 0.125}, 125, {6, 4, 2, 1});
  // Mantissa just below 1.75 (bf16 0x3FDF = 1.7421875): no round-up, s = 125, 6.97 -> 6.
  ExpectBlock("mantissa below 1.75", {1.7421875f, 1.0f}, 125, {7, 6});
  // Mantissa exactly 1.75: rounds up to 2, s = 126, 1.75 * 2 = 3.5 -> 4 (tie to even code 6).
  ExpectBlock("mantissa at 1.75", {1.75f, 1.0f}, 126, {6, 4});
  // Every tie with scale 1 (amax 4): 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
  ExpectBlock("ties to even", {4, 0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, -0.25f, -0.75f, -1.25f,
                               -1.75f, -2.5f, -3.5f},
              127, {6, 0, 2, 2, 4, 4, 6, 8, 10, 10, 12, 12, 14});
  // 5 is a tie only below amax 6 with scale 1: amax 5.5 (mantissa 1.375) keeps s = 127.
  ExpectBlock("tie 5 -> 4", {5.5f, 5.0f, -5.0f}, 127, {7, 6, 14});
  // Just above a tie goes up: 0.251953125 (bf16 0x3E81) -> 0.5.
  ExpectBlock("just above tie", {4, 0.251953125f, 0.75390625f}, 127, {6, 1, 2});
  // Saturation: amax 6.5 (mantissa 1.625 < 1.75) keeps s = 127; 6.5 -> 6, -6.5 -> -6.
  ExpectBlock("saturation at 6", {6.5f, -6.5f, 6.0f}, 127, {7, 15, 7});
  // All-zero block: s = 0, all codes 0.
  ExpectBlock("all zero", {}, 0, std::vector<uint8_t>(32, 0));
  // -0 keeps its sign like an IEEE conversion: code 8 (the block's amax is still 0: s = 0).
  ExpectBlock("negative zero", {-0.0f, 0.0f, -0.0f}, 0, {8, 0, 8});
  // Tiny negative values round to -0 (code 8).
  ExpectBlock("tiny negative to -0", {4, -0.125f, 0.125f}, 127, {6, 8, 0});
  // Scale clamped at 0: amax 2^-125 has e = 2 -> s = 0, and scale byte 0 zeroes the block with
  // the sign kept (vLLM's quantizer), instead of multiplying by 2^127 (which would give 4, 2).
  ExpectBlock("scale clamped at 0 (e=2)", {ldexpf(1, -125), -ldexpf(1, -126), ldexpf(1, -126)}, 0,
              {0, 8, 0});
  // e = 3 -> s = 1.
  ExpectBlock("scale 1 (e=3)", {ldexpf(1, -124), ldexpf(1, -125)}, 1, {6, 4});
}

void TestSubnormals() {
  // bf16 subnormals (exponent field 0): value = mantissa * 2^-133. The fp32 bit rule sees
  // exponent 0: s = 0, and scale byte 0 zeroes the block, signs kept (vLLM's rule; a 2^127
  // multiplier would have given codes 2, 1, 2, 8, 0).
  std::vector<uint16_t> input(32, 0);
  input[0] = Bf16Bits(0x0040);  // 2^-127
  input[1] = Bf16Bits(0x0020);  // 2^-128
  input[2] = Bf16Bits(0x8030);  // -1.5 * 2^-128 -> -0 (code 8)
  input[3] = Bf16Bits(0x8010);  // -2^-129 -> -0 (code 8)
  input[4] = Bf16Bits(0x0001);  // 2^-133
  const Quantized q = QuantizeRows(input, 1, 32);
  EXPECT(q.status == MXMOE_STATUS_OK, "subnormals: status %d", q.status);
  EXPECT(q.scales[0] == 0, "subnormals: scale %d, expected 0", q.scales[0]);
  const uint8_t expected[5] = {0, 0, 8, 8, 0};
  for (int i = 0; i < 5; ++i) {
    EXPECT(Code(q, i) == expected[i], "subnormals: element %d code %d, expected %d", i,
           Code(q, i), expected[i]);
  }
  // A block of only the smallest subnormal: s = 0, codes 0.
  std::vector<uint16_t> tiny(32, Bf16Bits(0x0001));
  const Quantized t = QuantizeRows(tiny, 1, 32);
  EXPECT(t.scales[0] == 0 && t.packed[0] == 0, "tiny block: scale %d byte0 %d", t.scales[0],
         t.packed[0]);
}

void TestScaleCeiling() {
  using mxmoe::format::BitsFloat;
  using mxmoe::format::ScaleFromAmax;
  // Finite inputs never exceed 253: FLT_MAX (and the bf16 maximum) round up to 2^128 -> e = 255.
  EXPECT(ScaleFromAmax(BitsFloat(0x7F7FFFFFu)) == 253, "FLT_MAX scale %d",
         ScaleFromAmax(BitsFloat(0x7F7FFFFFu)));
  EXPECT(ScaleFromAmax(BitsFloat(0x7F7F0000u)) == 253, "bf16 max scale");
  EXPECT(ScaleFromAmax(ldexpf(1, 127)) == 252, "2^127 scale %d", ScaleFromAmax(ldexpf(1, 127)));
  EXPECT(ScaleFromAmax(INFINITY) == 253, "Inf scale %d", ScaleFromAmax(INFINITY));
  // The min(s, 254) clamp only matters for bit patterns past Inf (NaN payloads >= 0x7FE00000),
  // which quantize never passes (NaN blocks get 0xFF first). It must still clamp.
  EXPECT(ScaleFromAmax(BitsFloat(0x7FE00000u)) == 254, "clamp at 254: %d",
         ScaleFromAmax(BitsFloat(0x7FE00000u)));
  for (uint32_t exp = 0; exp < 255; ++exp) {
    for (uint32_t man : {0u, 0x5FFFFFu, 0x600000u, 0x7FFFFFu}) {
      const float amax = BitsFloat((exp << 23) | man);
      const int got = ScaleFromAmax(amax);
      const int want = ReferenceScale(amax);
      EXPECT(got == want, "ScaleFromAmax(bits 0x%08x) = %d, reference %d", (exp << 23) | man, got,
             want);
    }
  }
  // Largest bf16 through the API: scale 253, 1.99 * 2^127 / 2^126 = 3.98 -> 4.
  ExpectBlock("bf16 max", {BitsFloat(0x7F7F0000u), -BitsFloat(0x7F7F0000u), ldexpf(1, 126)}, 253,
              {6, 14, 2});
}

void TestNanAndInf() {
  // Two blocks: a NaN in block 0 poisons only block 0 (scale 0xFF, all 16 bytes 0).
  std::vector<uint16_t> input(64, Bf16(1.0f));
  input[5] = 0x7FC0;  // NaN
  input[40] = Bf16(2.0f);
  const Quantized q = QuantizeRows(input, 1, 64);
  EXPECT(q.status == MXMOE_STATUS_OK, "nan: status %d", q.status);
  EXPECT(q.scales[0] == 0xFF, "nan block scale %d, expected 255", q.scales[0]);
  for (int i = 0; i < 16; ++i) EXPECT(q.packed[i] == 0, "nan block byte %d = %d", i, q.packed[i]);
  EXPECT(q.scales[1] == 126, "block after nan: scale %d, expected 126", q.scales[1]);
  EXPECT(Code(q, 32) == 4 && Code(q, 40) == 6, "block after nan: codes %d %d", Code(q, 32),
         Code(q, 40));
  // A negative NaN is a NaN too.
  std::vector<uint16_t> neg(32, 0);
  neg[31] = 0xFFC1;
  EXPECT(QuantizeRows(neg, 1, 32).scales[0] == 0xFF, "negative nan");
  // +-Inf: amax Inf -> scale 253; Inf -> +6, -Inf -> -6, finite values against 2^126.
  ExpectBlock("inf", {INFINITY, -INFINITY, 1.0f, ldexpf(1, 126), -ldexpf(3, 126)}, 253,
              {7, 15, 0, 2, 13});
  // NaN and Inf in the same block: NaN wins.
  ExpectBlock("nan and inf", {INFINITY, NAN, 1.0f}, 0xFF, {0, 0, 0});
}

void TestFp16Input() {
  std::vector<uint16_t> input(32, 0);
  const float values[6] = {4.0f, 0.75f, -2.5f, 65504.0f / 16384.0f, 6.0e-8f, -1.0f};
  for (int i = 0; i < 6; ++i) input[i] = mxmoe::format::FloatToFp16(values[i]);
  const Quantized q = QuantizeRows(input, 1, 32, MXMOE_DTYPE_FP16);
  EXPECT(q.status == MXMOE_STATUS_OK, "fp16: status %d", q.status);
  EXPECT(q.scales[0] == 127, "fp16: scale %d, expected 127", q.scales[0]);
  const uint8_t expected[6] = {6, 2, 12, 6, 0, 10};  // 3.998 -> 4
  for (int i = 0; i < 6; ++i) {
    EXPECT(Code(q, i) == expected[i], "fp16: element %d code %d, expected %d", i, Code(q, i),
           expected[i]);
  }
}

// Random and adversarial rows vs the independent reference, LINEAR and SWIZZLED.
void TestAgainstReference() {
  std::mt19937 rng(1234);
  const int64_t rows = 37;
  const int64_t k = 2880;
  std::vector<uint16_t> input(rows * k);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-140, 130);
  std::uniform_int_distribution<int> bits16(0, 0xFFFF);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < k; ++i) {
      float v;
      switch (r % 4) {
        case 0:  // plain normal data
          v = normal(rng);
          break;
        case 1:  // wide dynamic range per element
          v = ldexpf(normal(rng), exponent(rng) % 60);
          break;
        case 2:  // random bit patterns (includes subnormals, Inf, NaN)
          v = mxmoe::format::Bf16ToFloat(static_cast<uint16_t>(bits16(rng)));
          break;
        default:  // grid points and ties times a per-block power of two
          v = ldexpf(0.25f * static_cast<float>(bits16(rng) % 25) * (bits16(rng) % 2 ? -1 : 1),
                     (i / 32) % 20 - 10);
      }
      input[r * k + i] = Bf16(v);
    }
  }
  for (int32_t layout : {MXMOE_SCALE_LAYOUT_LINEAR, MXMOE_SCALE_LAYOUT_SWIZZLED_128X4}) {
    const Quantized q = QuantizeRows(input, rows, k, MXMOE_DTYPE_BF16, layout);
    EXPECT(q.status == MXMOE_STATUS_OK, "reference rows: status %d", q.status);
    int reported = 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t b = 0; b < k / 32; ++b) {
        float amax = 0.0f;
        bool nan = false;
        for (int i = 0; i < 32; ++i) {
          const float v = mxmoe::format::Bf16ToFloat(input[r * k + b * 32 + i]);
          if (isnan(v)) nan = true;
          amax = fmaxf(amax, fabsf(v));
        }
        const int64_t scale_index = layout == MXMOE_SCALE_LAYOUT_LINEAR
                                        ? r * (k / 32) + b
                                        : mxmoe::format::SwizzledOffset(r, b, k / 32);
        const int want_scale = nan ? 0xFF : ReferenceScale(amax);
        const int got_scale = q.scales[scale_index];
        if (got_scale != want_scale && reported++ < 10) {
          EXPECT(false, "rows=%lld k=%lld layout=%d row %lld block %lld: scale %d, reference %d",
                 (long long)rows, (long long)k, layout, (long long)r, (long long)b, got_scale,
                 want_scale);
        }
        for (int i = 0; i < 32; ++i) {
          const float v = mxmoe::format::Bf16ToFloat(input[r * k + b * 32 + i]);
          const int want = nan ? 0 : ReferenceCode(ldexp(static_cast<double>(v), 127 - want_scale));
          const int got = Code(q, r * k + b * 32 + i);
          if (got != want && reported++ < 10) {
            EXPECT(false, "rows=%lld k=%lld row %lld element %lld (value %g, scale %d): code %d, "
                   "reference %d", (long long)rows, (long long)k, (long long)r,
                   (long long)(b * 32 + i), v, want_scale, got, want);
          }
        }
      }
    }
  }
}

void TestDequantize() {
  // Row 0: scale 127 codes 0..15; row 1: NaN scale; row 2: scale 254 (6 * 2^127 overflows);
  // row 3: scale 0 (subnormal results).
  const int64_t rows = 4;
  const int64_t k = 32;
  std::vector<uint8_t> packed(rows * k / 2, 0);
  for (int i = 0; i < 16; ++i) packed[i / 2] |= static_cast<uint8_t>(i << (4 * (i % 2)));
  for (int r = 1; r < 4; ++r) {
    for (int i = 0; i < 8; ++i) packed[r * 16 + i] = packed[i];
  }
  std::vector<uint8_t> scales = {127, 0xFF, 254, 0};
  for (int32_t dtype : {MXMOE_DTYPE_BF16, MXMOE_DTYPE_FP16, MXMOE_DTYPE_FP32}) {
    std::vector<uint8_t> out(rows * k * 4, 0xCD);
    mxmoe_dequantize_args args = {};
    args.rows = rows;
    args.k = k;
    args.packed = packed.data();
    args.scales = scales.data();
    args.scale_layout = MXMOE_SCALE_LAYOUT_LINEAR;
    args.output = out.data();
    args.output_dtype = dtype;
    args.device = kCpu;
    EXPECT(mxmoe_dequantize(&args, nullptr) == MXMOE_STATUS_OK, "dequantize dtype %d: %s", dtype,
           mxmoe_last_error());
    auto value = [&](int64_t index) -> float {
      if (dtype == MXMOE_DTYPE_FP32) {
        float f;
        memcpy(&f, &out[index * 4], 4);
        return f;
      }
      uint16_t h;
      memcpy(&h, &out[index * 2], 2);
      return dtype == MXMOE_DTYPE_BF16 ? mxmoe::format::Bf16ToFloat(h)
                                       : mxmoe::format::Fp16ToFloat(h);
    };
    const double grid[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
    for (int i = 0; i < 16; ++i) {
      const double want = (i & 8 ? -1 : 1) * grid[i & 7];
      EXPECT(value(i) == want, "dtype %d code %d: %g, expected %g", dtype, i, value(i), want);
      EXPECT(isnan(value(32 + i)), "dtype %d NaN scale code %d: %g", dtype, i, value(32 + i));
    }
    // Scale 254: 0.5 * 2^127 = 2^126 (finite in bf16/fp32, Inf in fp16), 6 * 2^127 -> Inf.
    EXPECT(isinf(value(64 + 7)) && value(64 + 7) > 0, "dtype %d: 6 * 2^127 = %g", dtype,
           value(64 + 7));
    const double half = dtype == MXMOE_DTYPE_FP16 ? INFINITY : ldexp(1.0, 126);
    EXPECT(value(64 + 1) == half, "dtype %d: 0.5 * 2^127 = %g", dtype, value(64 + 1));
    // Scale 0: 0.5 * 2^-127 = 2^-128 (bf16/fp32 subnormal, 0 in fp16).
    const double tiny = dtype == MXMOE_DTYPE_FP16 ? 0.0 : ldexp(1.0, -128);
    EXPECT(value(96 + 1) == tiny, "dtype %d: 0.5 * 2^-127 = %g", dtype, value(96 + 1));
  }
}

// quantize -> dequantize is within half a grid step of the input (for finite, non-saturating
// blocks) and dequantize -> quantize reproduces the codes and scales exactly.
void TestRoundTrip() {
  std::mt19937 rng(99);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const int64_t rows = 5;
  const int64_t k = 96;
  std::vector<uint16_t> input(rows * k);
  for (auto& v : input) v = Bf16(normal(rng));
  const Quantized q = QuantizeRows(input, rows, k);
  std::vector<uint16_t> deq(rows * k);
  mxmoe_dequantize_args args = {};
  args.rows = rows;
  args.k = k;
  args.packed = q.packed.data();
  args.scales = q.scales.data();
  args.scale_layout = MXMOE_SCALE_LAYOUT_LINEAR;
  args.output = deq.data();
  args.output_dtype = MXMOE_DTYPE_BF16;
  args.device = kCpu;
  EXPECT(mxmoe_dequantize(&args, nullptr) == MXMOE_STATUS_OK, "round trip dequantize");
  const Quantized again = QuantizeRows(deq, rows, k);
  EXPECT(again.packed == q.packed, "requantized codes differ (rows=%lld k=%lld)", (long long)rows,
         (long long)k);
  EXPECT(again.scales == q.scales, "requantized scales differ");
  for (int64_t i = 0; i < rows * k; ++i) {
    const double x = mxmoe::format::Bf16ToFloat(input[i]);
    const double y = mxmoe::format::Bf16ToFloat(deq[i]);
    const double step = ldexp(1.0, q.scales[i / 32] - 127);  // grid step at most 2 * scale
    EXPECT(fabs(x - y) <= step + 1e-30 || fabs(y) == 6 * step, "element %lld: %g -> %g",
           (long long)i, x, y);
  }
}

}  // namespace

int main() {
  TestHandComputedBlocks();
  TestSubnormals();
  TestScaleCeiling();
  TestNanAndInf();
  TestFp16Input();
  TestAgainstReference();
  TestDequantize();
  TestRoundTrip();
  if (failures != 0) {
    fprintf(stderr, "quantize_rule_test: %d failure(s)\n", failures);
    return 1;
  }
  printf("quantize_rule_test: all passed\n");
  return 0;
}
