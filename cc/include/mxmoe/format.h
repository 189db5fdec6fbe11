// The MXFP4 data contract as code: E2M1 codes, the E8M0 scale rule, the swizzled scale layout,
// bf16/fp16 conversions and the fp32 SiLU. Shared, unchanged, by the CPU backend and the CUDA
// kernels (every function is __host__ __device__), so the two cannot drift apart.
//
// Bit-exactness rules for everything here:
//   - build without fast-math and without flush-to-zero (nvcc's default; never -use_fast_math);
//   - no contraction-sensitive expressions: every multiply-add is written as an explicit fmaf or
//     as separately rounded operations (MXMOE_MUL / MXMOE_ADD), so nvcc's FMA contraction and a
//     host compiler without FMA give the same bits.
#ifndef MXMOE_FORMAT_H_
#define MXMOE_FORMAT_H_

#include <stdint.h>
#include <string.h>

#include <cmath>

#if defined(__CUDACC__)
#define MXMOE_HD __host__ __device__ __forceinline__
#else
#define MXMOE_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define MXMOE_MUL(a, b) __fmul_rn((a), (b))
#define MXMOE_ADD(a, b) __fadd_rn((a), (b))
#else
#define MXMOE_MUL(a, b) ((a) * (b))
#define MXMOE_ADD(a, b) ((a) + (b))
#endif

namespace mxmoe {
namespace format {

constexpr int kBlockSize = 32;          // elements per E8M0 scale
constexpr int kSwizzleRows = 128;       // swizzled layout pads rows to this
constexpr int kSwizzleCols = 4;         // ... and scale columns to this
constexpr int kSwizzleTileBytes = 512;  // one 128x4 tile
constexpr uint8_t kScaleNaN = 0xFF;

MXMOE_HD uint32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

MXMOE_HD float BitsFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

MXMOE_HD bool IsNaN(float f) { return (FloatBits(f) & 0x7FFFFFFFu) > 0x7F800000u; }

// ---- E2M1 ------------------------------------------------------------------------------------

// Twice the magnitude of codes 0..7, an integer: 0 1 2 3 4 6 8 12. Codes 0, 1 are the
// subnormals (0, 0.5); from code 2 on, (1 + mantissa bit / 2) * 2^(exponent - 1), i.e. twice
// the value is (2 + mantissa bit) << (exponent - 1).
MXMOE_HD int E2M1TwiceMagnitude(uint8_t code) {
  const int m = code & 7;
  return m < 2 ? m : (2 + (m & 1)) << ((m >> 1) - 1);
}

// Magnitude of codes 0..7; codes 8..15 are the negatives (8 = -0).
MXMOE_HD float E2M1ToFloat(uint8_t code) {
  const float mag = 0.5f * static_cast<float>(E2M1TwiceMagnitude(code));
  return (code & 8) ? -mag : mag;
}

// Twice the signed value of a code, as an integer in [-12, 12]; products of two such integers
// are exact, which is what the CPU GEMM's integer block dot relies on.
MXMOE_HD int E2M1TwiceValue(uint8_t code) {
  const int twice = E2M1TwiceMagnitude(code);
  return (code & 8) ? -twice : twice;
}

// Round-to-nearest-even onto the E2M1 grid, saturating at +-6, sign kept (-0.1 -> code 8).
// v must not be NaN (callers handle NaN blocks before this).
// The magnitude code is the number of decision thresholds below |v| (midpoints of the grid;
// "<" vs "<=" at each midpoint sends the tie to the even code): 0.25 0.75 1.25 1.75 2.5 3.5 5.
// Branch-free on purpose: the if-chain it replaces ran 4x slower on the CPU (mispredictions on
// random data) and diverges on GPUs; checked equal to the chain on all 2^32 non-NaN inputs.
MXMOE_HD uint8_t FloatToE2M1(float v) {
  const uint8_t sign = (FloatBits(v) >> 31) ? 8 : 0;
  const float a = fabsf(v);
  const int mag = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) +
                  (a >= 3.5f) + (a > 5.0f);  // +-Inf: 7, saturated
  return static_cast<uint8_t>(sign | mag);
}

// ---- E8M0 scale rule -------------------------------------------------------------------------

// Scale byte for a block whose largest magnitude is `amax` (fp32, not NaN, >= 0 or +Inf).
// r = (bits + 2^21) & 0xFF800000 rounds amax up to the next power of two when its mantissa is
// >= 1.75; e = r >> 23; s = e > 2 ? e - 2 : 0; s = min(s, 254).
MXMOE_HD uint8_t ScaleFromAmax(float amax) {
  const uint32_t bits = FloatBits(amax);
  const uint32_t rounded = (bits + (1u << 21)) & 0xFF800000u;
  const uint32_t e = rounded >> 23;
  uint32_t s = e > 2 ? e - 2 : 0;
  return static_cast<uint8_t>(s < 254 ? s : 254);
}

// What a block's elements are multiplied by before FloatToE2M1: 2^(127 - s) for s in [1, 254]
// (s = 254 gives the subnormal 2^-127), and 0 for s = 0. Scale byte 0 (amax below about
// 2^-125, amax = 0 included) turns every element into a signed zero (codes 0 and 8), as vLLM's
// quantizer does (its output scale is 0 when the E8M0 value is 0), rather than scaling the
// block by 2^127.
MXMOE_HD float QuantMultiplier(uint8_t s) {
  if (s == 0) return 0.0f;
  const int exp = 254 - static_cast<int>(s);  // biased exponent of 2^(127-s)
  return exp > 0 ? BitsFloat(static_cast<uint32_t>(exp) << 23) : BitsFloat(1u << 22);
}

// 2^(s - 127) as an fp32 (s in [0, 254]; s = 0 gives the subnormal 2^-127; 0xFF gives NaN).
MXMOE_HD float ScaleToFloat(uint8_t s) {
  if (s == kScaleNaN) return BitsFloat(0x7FC00000u);
  return s > 0 ? BitsFloat(static_cast<uint32_t>(s) << 23) : BitsFloat(1u << 22);
}

// ---- Integer helpers --------------------------------------------------------------------------

// x / d rounded up and x rounded up to a multiple of m, for x >= 0 and d, m >= 1 (constexpr, so
// kernels can static_assert with them).
MXMOE_HD constexpr int64_t CeilDiv(int64_t x, int64_t d) { return (x + d - 1) / d; }
MXMOE_HD constexpr int64_t RoundUp(int64_t x, int64_t m) { return CeilDiv(x, m) * m; }

// ---- Swizzled 128x4 scale layout -------------------------------------------------------------

// Byte offset of scale (row m, scale column k) of a matrix with `scale_cols` = K/32 columns.
MXMOE_HD int64_t SwizzledOffset(int64_t m, int64_t k, int64_t scale_cols) {
  const int64_t num_k_tiles = (scale_cols + kSwizzleCols - 1) / kSwizzleCols;
  return (m / 128 * num_k_tiles + k / 4) * kSwizzleTileBytes + (m % 32) * 16 +
         ((m / 32) % 4) * 4 + (k % 4);
}

// Bytes of a swizzled [rows, scale_cols] matrix, padding included.
MXMOE_HD int64_t SwizzledBytes(int64_t rows, int64_t scale_cols) {
  return RoundUp(rows, kSwizzleRows) * RoundUp(scale_cols, kSwizzleCols);
}

// Scale rows that always suffice for `rows` activation rows grouped over `num_experts` experts
// without reading the per-expert counts: blockscale_offsets[E] = sum of round_up(m_e, 128)
// exceeds the rows by at most 127 per non-empty expert, and at most min(rows, E) experts are
// non-empty. The sum is a multiple of 128, so the bound is rounded down to one (the one rounding
// rule: py/mxmoe/ops.py's default scale_rows on a GPU follows it).
MXMOE_HD constexpr int64_t MaxScaleRows(int64_t rows, int64_t num_experts) {
  return (rows + (kSwizzleRows - 1) * (rows < num_experts ? rows : num_experts)) / kSwizzleRows *
         kSwizzleRows;
}

// ---- bf16 / fp16 ---------------------------------------------------------------------------

MXMOE_HD float Bf16ToFloat(uint16_t h) { return BitsFloat(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
MXMOE_HD uint16_t FloatToBf16(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  const uint32_t lsb = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7FFFu + lsb) >> 16);
}

MXMOE_HD float Fp16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  if (exp == 0x1F) return BitsFloat(sign | 0x7F800000u | (man << 13));
  if (exp != 0) return BitsFloat(sign | ((exp + 112u) << 23) | (man << 13));
  // Zero or subnormal: man * 2^-24, exact in fp32.
  const float mag = static_cast<float>(man) * BitsFloat(0x33800000u);  // 2^-24
  return sign ? -mag : mag;
}

// Round to nearest even, overflow to Inf, NaN stays NaN.
MXMOE_HD uint16_t FloatToFp16(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to Inf
  if (a < 0x38800000u) {
    // Result is fp16-subnormal (or zero): units of 2^-24, round half to even.
    const float mag = BitsFloat(a);
    // mag * 2^24 is exact (a power-of-two scaling of an fp32 normal or subnormal).
    const float units = mag * 16777216.0f;
    float r = rintf(units);  // current rounding mode: nearest even
    return sign | static_cast<uint16_t>(r);
  }
  const uint32_t lsb = (a >> 13) & 1u;
  const uint32_t rounded = a + 0xFFFu + lsb;
  return sign | static_cast<uint16_t>(((rounded >> 13) - (112u << 10)) & 0x7FFFu);
}

// ---- SiLU --------------------------------------------------------------------------------------

// The exp polynomial's constants and steps, in one place. ExpF32InRange below is the definition;
// two other forms perform the same steps on the same constants: the CUDA SiluFastF32
// (cc/cuda/quantize_device.cuh) and the CPU's eight-lane ExpF32InRangeX8
// (cc/cpu/activation_simd.h).
constexpr float kExpLog2e = 1.44269504088896341f;
constexpr float kExpLn2Hi = 0.693145751953125f;  // ln 2 in two parts (Cody-Waite)
constexpr float kExpLn2Lo = 1.428606765330187045e-06f;
// exp(r) on |r| <= ln2/2: degree-6 Taylor/minimax-like polynomial, coefficients highest first.
constexpr float kExpP6 = 1.3888889e-3f;
constexpr float kExpP5 = 8.3333333e-3f;
constexpr float kExpP4 = 4.1666667e-2f;
constexpr float kExpP3 = 1.6666667e-1f;
constexpr float kExpP2 = 0.5f;
constexpr float kExpP1 = 1.0f;
constexpr float kExpP0 = 1.0f;

// r = x - n*ln2, in two steps; fmaf is exactly rounded everywhere.
MXMOE_HD float ExpReduce(float x, float n) {
  const float r = fmaf(n, -kExpLn2Hi, x);
  return fmaf(n, -kExpLn2Lo, r);
}

// The polynomial at r, Horner with fmaf.
MXMOE_HD float ExpPolynomial(float r) {
  float p = kExpP6;
  p = fmaf(p, r, kExpP5);
  p = fmaf(p, r, kExpP4);
  p = fmaf(p, r, kExpP3);
  p = fmaf(p, r, kExpP2);
  p = fmaf(p, r, kExpP1);
  return fmaf(p, r, kExpP0);
}

// exp(x) for x already in [-103.98, 88.72] (ExpF32's range; NaN-free), from +, *, fmaf and bit
// operations only, so host and device agree bit for bit (the libraries' expf differ by an ulp
// between glibc and CUDA). Max error about 2 ulp. The one exp definition: ExpF32 and SiluF32
// both call it.
MXMOE_HD float ExpF32InRange(float x) {
  const float n = rintf(MXMOE_MUL(x, kExpLog2e));
  const float p = ExpPolynomial(ExpReduce(x, n));
  // Multiply by 2^n in two steps so results in the subnormal range stay correct.
  const int ni = static_cast<int>(n);
  const int n1 = ni / 2;
  const int n2 = ni - n1;
  const float s1 = BitsFloat(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = BitsFloat(static_cast<uint32_t>(n2 + 127) << 23);
  return MXMOE_MUL(MXMOE_MUL(p, s1), s2);
}

// exp(x) in fp32 for every input: NaN stays NaN, overflow gives +Inf, underflow 0.
MXMOE_HD float ExpF32(float x) {
  if (IsNaN(x)) return x;
  if (x > 88.72f) return BitsFloat(0x7F800000u);
  if (x < -103.98f) return 0.0f;
  return ExpF32InRange(x);
}

// silu(g) = g / (1 + ExpF32(-g)), fp32, IEEE division (correctly rounded on host and device).
// silu(-Inf) = -0, silu(+Inf) = +Inf, silu(NaN) = NaN. Written without ExpF32's early returns
// (the fused quantize kernel runs it per element): the polynomial runs on -g clamped into its
// range [-103.98, 88.72], which is exactly ExpF32 inside the range; outside it
//   -g > 88.72:   exp overflows, silu is -0 (selected at the end);
//   -g < -103.98: exp(-103.98) < 2^-24, so 1 + e == 1 and g / (1 + e) == g, as with e = 0;
//   NaN:          g / (1 + e) is NaN.
// tests/gpu/quantize_lane_test.cu checks this against g / (1 + ExpF32(-g)) on every fp32 input.
MXMOE_HD float SiluF32(float g) {
  const float e = ExpF32InRange(fminf(fmaxf(-g, -103.98f), 88.72f));
  const float q = g / MXMOE_ADD(1.0f, e);
  return g < -88.72f ? -0.0f : q;
}

}  // namespace format
}  // namespace mxmoe

#endif  // MXMOE_FORMAT_H_
