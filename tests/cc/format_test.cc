// mxmoe/format.h against independent references: the E2M1 value table, E8M0 scale values,
// bf16/fp16 conversions (exhaustive over 16-bit patterns, and random fp32 values against
// round-to-nearest-even computed in double), ExpF32's accuracy against double exp, SiluF32's
// special values and its agreement with g / (1 + ExpF32(-g)), and the integer helpers (RoundUp,
// CeilDiv, the MaxScaleRows bound against an exhaustive maximum). format.h is shared by the CPU backend and the CUDA kernels, so a mistake here
// would be invisible to CPU-vs-GPU comparisons.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <random>
#include <vector>

#include "mxmoe/format.h"
#include "tests/cc/expect.h"

namespace {

using mxmoe_test::failures;

using namespace mxmoe::format;

void TestE2M1Table() {
  const double magnitudes[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  for (int code = 0; code < 16; ++code) {
    const double want = (code & 8 ? -1 : 1) * magnitudes[code & 7];
    EXPECT(E2M1ToFloat(code) == want, "E2M1ToFloat(%d) = %g, expected %g", code,
           E2M1ToFloat(code), want);
    EXPECT(E2M1TwiceValue(code) == 2 * want, "E2M1TwiceValue(%d) = %d, expected %g", code,
           E2M1TwiceValue(code), 2 * want);
    // Every grid value converts back to its own code (0 and -0 included).
    EXPECT(FloatToE2M1(E2M1ToFloat(code)) == code, "FloatToE2M1(E2M1ToFloat(%d)) = %d", code,
           FloatToE2M1(E2M1ToFloat(code)));
  }
  EXPECT(FloatToE2M1(INFINITY) == 7 && FloatToE2M1(-INFINITY) == 15, "Inf saturates");
  // Every float within 64 ulps of each rounding midpoint and grid point, both signs, against a
  // nearest-grid search in double with ties to the even code.
  const float points[] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 0.5f, 1.0f, 1.5f,
                          2.0f, 3.0f, 4.0f, 6.0f, 0.0f};
  for (float p : points) {
    for (int d = -64; d <= 64; ++d) {
      const int64_t bits = static_cast<int64_t>(FloatBits(p)) + d;
      if (bits < 0) continue;
      for (float sign : {1.0f, -1.0f}) {
        const float v = sign * BitsFloat(static_cast<uint32_t>(bits));
        int best = 0;
        for (int c = 1; c < 8; ++c) {
          const double dc = fabs(fabs(v) - E2M1ToFloat(c));
          const double db = fabs(fabs(v) - E2M1ToFloat(best));
          if (dc < db || (dc == db && c % 2 == 0)) best = c;
        }
        const int want = (signbit(v) ? 8 : 0) | best;
        EXPECT(FloatToE2M1(v) == want, "FloatToE2M1(%a) = %d, expected %d", v, FloatToE2M1(v),
               want);
      }
    }
  }
  EXPECT(FloatToE2M1(1e30f) == 7, "large saturates");
}

void TestScaleValues() {
  for (int s = 0; s < 255; ++s) {
    EXPECT(ScaleToFloat(s) == ldexp(1.0, s - 127), "ScaleToFloat(%d) = %g", s, ScaleToFloat(s));
    // Scale byte 0 zeroes the block (vLLM's rule); every other byte multiplies by 2^(127-s).
    const double want = s == 0 ? 0.0 : ldexp(1.0, 127 - s);
    EXPECT(QuantMultiplier(s) == want, "QuantMultiplier(%d) = %g", s, QuantMultiplier(s));
  }
  EXPECT(isnan(ScaleToFloat(0xFF)), "ScaleToFloat(0xFF) must be NaN");
}

// Round-to-nearest-even of a double to a binary format with `mantissa_bits` fraction bits and
// minimum normal exponent `min_exp`, maximum finite `max_finite`; Inf on overflow.
double RoundNearestEven(double x, int mantissa_bits, int min_exp, double max_finite) {
  if (isnan(x) || x == 0 || isinf(x)) return x;
  int e;
  frexp(fabs(x), &e);  // |x| in [2^(e-1), 2^e)
  int exp = e - 1;
  if (exp < min_exp) exp = min_exp;  // subnormal spacing
  const double ulp = ldexp(1.0, exp - mantissa_bits);
  const double r = nearbyint(x / ulp) * ulp;  // default rounding mode: nearest even
  // Overflow: rounds to Inf when |x| >= max_finite + ulp(max)/2.
  int emax;
  frexp(max_finite, &emax);
  const double half_ulp_max = ldexp(1.0, emax - 1 - mantissa_bits) / 2;
  if (fabs(x) >= max_finite + half_ulp_max) return copysign(INFINITY, x);
  return r;
}

void TestHalfConversions() {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    // bf16 -> float is a shift; back must be the identity for non-NaN.
    const float b = Bf16ToFloat(h);
    if (!isnan(b)) {
      EXPECT(FloatToBf16(b) == h, "bf16 0x%04x round trip -> 0x%04x", h, FloatToBf16(b));
    }
    // fp16 -> float against the formula.
    const float f = Fp16ToFloat(h);
    const int exp = (h >> 10) & 0x1F;
    const int man = h & 0x3FF;
    double want;
    if (exp == 0x1F) {
      want = man ? NAN : INFINITY;
    } else if (exp == 0) {
      want = ldexp(man, -24);
    } else {
      want = ldexp(1024 + man, exp - 25);
    }
    if (h & 0x8000) want = -want;
    if (isnan(want)) {
      EXPECT(isnan(f), "fp16 0x%04x should be NaN", h);
    } else {
      EXPECT(f == want, "Fp16ToFloat(0x%04x) = %g, expected %g", h, f, want);
      EXPECT(FloatToFp16(f) == h, "fp16 0x%04x round trip -> 0x%04x", h, FloatToFp16(f));
    }
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = any(rng);
    // Bias half the samples towards the fp16 range and to ties.
    if (i % 2) {
      u = (u & 0x8000FFFFu) | ((0x30 + (u >> 16) % 0x18) << 23) | (i % 4 == 1 ? 0x1000 : 0);
    }
    const float x = BitsFloat(u);
    if (isnan(x)) continue;
    const double bf = RoundNearestEven(x, 7, -126, 3.3895313892515355e38);
    EXPECT(Bf16ToFloat(FloatToBf16(x)) == bf, "FloatToBf16(%a) = %a, expected %a", x,
           Bf16ToFloat(FloatToBf16(x)), bf);
    const double hf = RoundNearestEven(x, 10, -14, 65504.0);
    const float got = Fp16ToFloat(FloatToFp16(x));
    EXPECT(got == hf || (got == 0 && hf == 0), "FloatToFp16(%a) = %a, expected %a", x, got, hf);
  }
}

void TestExpAndSilu() {
  // ExpF32 within a few ulp of the correctly rounded exp over the whole useful range.
  double worst = 0;
  float worst_x = 0;
  for (float x = -103.0f; x < 88.7f; x += 0.000731f * (1 + fabsf(x))) {
    const double want = exp(static_cast<double>(x));
    const float got = ExpF32(x);
    const double ulp = want < ldexp(1.0, -126) ? ldexp(1.0, -149)
                                                : ldexp(1.0, ilogb(want) - 23);
    const double err = fabs(got - want) / ulp;
    if (err > worst) {
      worst = err;
      worst_x = x;
    }
  }
  EXPECT(worst <= 4.0, "ExpF32 worst error %g ulp at x=%a", worst, worst_x);
  printf("ExpF32 worst error: %.3f ulp (x=%a)\n", worst, worst_x);
  EXPECT(ExpF32(0.0f) == 1.0f, "ExpF32(0) = %a", ExpF32(0.0f));
  EXPECT(isinf(ExpF32(100.0f)), "ExpF32(100) must be Inf");
  EXPECT(ExpF32(-200.0f) == 0.0f, "ExpF32(-200) must be 0");
  EXPECT(isnan(ExpF32(NAN)), "ExpF32(NaN) must be NaN");
  // SiLU: specials and accuracy.
  EXPECT(SiluF32(0.0f) == 0.0f, "silu(0)");
  EXPECT(isinf(SiluF32(INFINITY)) && SiluF32(INFINITY) > 0, "silu(+Inf) = %g", SiluF32(INFINITY));
  EXPECT(SiluF32(-INFINITY) == 0.0f && signbit(SiluF32(-INFINITY)), "silu(-Inf) = %g",
         SiluF32(-INFINITY));
  EXPECT(isnan(SiluF32(NAN)), "silu(NaN)");
  double silu_worst = 0;
  for (float g = -80.0f; g < 80.0f; g += 0.00917f) {
    const double want = g / (1.0 + exp(-static_cast<double>(g)));
    const double err = fabs(SiluF32(g) - want) / fmax(fabs(want), 1e-30);
    silu_worst = fmax(silu_worst, err);
  }
  EXPECT(silu_worst < 1e-6, "SiluF32 worst relative error %g", silu_worst);
  // SiluF32 skips ExpF32's early returns; on a spread of inputs it still equals the definition
  // g / (1 + ExpF32(-g)) bit for bit (the GPU lane test checks every fp32 input).
  std::mt19937 rng(7);
  for (int i = 0; i < 1000000; ++i) {
    const float g = BitsFloat(static_cast<uint32_t>(rng()));
    if (IsNaN(g) || g < -88.72f) continue;  // NaN: both NaN; below -88.72 silu is -0 by choice
    const float want = g / (1.0f + ExpF32(-g));
    EXPECT(FloatBits(SiluF32(g)) == FloatBits(want), "SiluF32(%a) = %a, g / (1 + ExpF32(-g)) = %a",
           g, SiluF32(g), want);
  }
}

// RoundUp / CeilDiv, and MaxScaleRows against the exact maximum of sum(round_up(m_e, 128)) over
// every split of `rows` rows among E experts (dynamic programming over small cases): the bound
// must hold for every split and be reached by one.
void TestIntegerHelpers() {
  static_assert(CeilDiv(0, 128) == 0 && CeilDiv(1, 128) == 1 && CeilDiv(128, 128) == 1 &&
                    CeilDiv(129, 128) == 2,
                "CeilDiv");
  static_assert(RoundUp(0, 4) == 0 && RoundUp(90, 4) == 92 && RoundUp(92, 4) == 92, "RoundUp");
  constexpr int kMaxRows = 300;
  for (int experts = 1; experts <= 4; ++experts) {
    // best[r] = largest sum of round_up(m_e, 128) with sum(m_e) = r over the experts so far.
    std::vector<int64_t> best(kMaxRows + 1, -1);
    best[0] = 0;
    for (int e = 0; e < experts; ++e) {
      std::vector<int64_t> next(kMaxRows + 1, -1);
      for (int r = 0; r <= kMaxRows; ++r) {
        for (int m = 0; m <= r; ++m) {
          if (best[r - m] >= 0) next[r] = std::max(next[r], best[r - m] + RoundUp(m, 128));
        }
      }
      best = next;
    }
    for (int rows = 0; rows <= kMaxRows; ++rows) {
      EXPECT(MaxScaleRows(rows, experts) == best[rows],
             "MaxScaleRows(%d, %d) = %lld, the largest sum of round_up(m_e, 128) is %lld", rows,
             experts, static_cast<long long>(MaxScaleRows(rows, experts)),
             static_cast<long long>(best[rows]));
    }
  }
  // Many experts, few rows: at most `rows` experts are non-empty.
  EXPECT(MaxScaleRows(3, 65536) == 3 * 128, "MaxScaleRows(3, 65536) = %lld",
         static_cast<long long>(MaxScaleRows(3, 65536)));
}

}  // namespace

int main() {
  TestE2M1Table();
  TestScaleValues();
  TestHalfConversions();
  TestExpAndSilu();
  TestIntegerHelpers();
  if (failures != 0) {
    fprintf(stderr, "format_test: %d failure(s)\n", failures);
    return 1;
  }
  printf("format_test: all passed\n");
  return 0;
}
