// Device building blocks of the MXFP4 quantization kernels (cc/cuda/quantize.cu): a 32-bit fast
// divider, 16-byte vector loads, and the per-lane step of the quantization rule, in which four
// consecutive lanes of a warp share one 32-element block (8 elements, one 16-byte load, each).
//
// Limits: every function here assumes all 32 lanes of the warp call it together (the block amax
// is reduced with warp shuffles); lanes whose unit is out of range still call it and discard the
// result. The rule is mxmoe/format.h's (ScaleFromAmax, QuantMultiplier, the SiLU constants), so the
// CPU backend and these kernels share one definition. The other pieces are faster equivalents of
// format.h functions, each with its argument and each checked bit for bit against format.h on
// every input by tests/gpu/quantize_lane_test.cu: hardware bf16/fp16 conversions (exact),
// EncodeE2M1x2 (FloatToE2M1 on two products at once) and, for the kernel variants behind knobs
// (cc/cuda/quantize.cu), ScaleEncodeE2M1x2Bf16 (the same in packed bf16 arithmetic),
// SiluFastF32 (SiluF32 on |g| in [2^-64, 64]) and the SiLU table (SiluF32 of every bf16 gate
// value with 2^-16 <= |g| < 2^7, built in shared memory by each CTA).
#ifndef MXMOE_CUDA_QUANTIZE_DEVICE_CUH_
#define MXMOE_CUDA_QUANTIZE_DEVICE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "mxmoe/format.h"
#include "mxmoe/moe_numerics.h"
#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace cuda {
namespace quant {

constexpr int kElemsPerLane = 8;                                     // one 16-byte bf16/fp16 load
constexpr int kLanesPerBlock = format::kBlockSize / kElemsPerLane;  // 4 lanes share a block

// Unsigned division of n < 2^31 by a runtime constant d in [1, 2^31) with one multiply-high
// (Granlund-Montgomery, as CUTLASS's FastDivmod): q = (umulhi(n, mul) + n) >> shift.
struct FastDivmod {
  uint32_t divisor;
  uint32_t multiplier;
  uint32_t shift;

  static FastDivmod Make(uint32_t d) {
    FastDivmod f;
    f.divisor = d;
    f.shift = 0;
    while ((1ull << f.shift) < d) ++f.shift;
    f.multiplier =
        static_cast<uint32_t>(((1ull << 32) * ((1ull << f.shift) - d)) / d + 1);
    return f;
  }

  __device__ __forceinline__ uint32_t Div(uint32_t n) const {
    return (__umulhi(n, multiplier) + n) >> shift;
  }
};

// 16-byte global load of 8 bf16/fp16 values. The input is read exactly once per kernel, so it
// need not stay in L1.
__device__ __forceinline__ uint4 LoadStreaming16(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// 16-bit float formats, as tags. ToFloat is exact for every non-NaN value (bf16 is the top half
// of an fp32; fp16 widens exactly, subnormals included), so the hardware conversion equals
// format::Bf16ToFloat / Fp16ToFloat wherever the result is used (NaN blocks are zeroed).
// FromFloat rounds to nearest even like format::FloatToBf16 / FloatToFp16 (fp16 overflow to
// Inf); the two differ only in NaN payloads, which the quantizer never looks at (any NaN makes
// the block NaN, whatever its bits).
struct Bf16 {
  static constexpr uint32_t kAbsInf = 0x7F80u;  // |x| bits above this are NaN
  __device__ __forceinline__ static float ToFloat(uint32_t h16) {
    return __uint_as_float(h16 << 16);
  }
  __device__ __forceinline__ static uint32_t FromFloat2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

struct Fp16 {
  static constexpr uint32_t kAbsInf = 0x7C00u;
  __device__ __forceinline__ static float ToFloat(uint32_t h16) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(h16)));
  }
  __device__ __forceinline__ static uint32_t FromFloat2(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

// The top 16 bits of an fp32 (its bf16 truncation; exact for powers of two).
__device__ __forceinline__ uint32_t FloatBits16(float f) { return __float_as_uint(f) >> 16; }

// 8 consecutive 16-bit values, element 2i in the low half of word i (little-endian memory order).
struct Lane8 {
  uint32_t w[4];
};

__device__ __forceinline__ Lane8 AsLane8(uint4 v) { return Lane8{{v.x, v.y, v.z, v.w}}; }

template <typename T>
__device__ __forceinline__ float Element(const Lane8& x, int i) {
  return T::ToFloat(i % 2 == 0 ? (x.w[i / 2] & 0xFFFFu) : (x.w[i / 2] >> 16));
}

// Whether a quantize kernel applies an activation to [gate | up] rows first, and how:
// kSilu evaluates format::SiluF32 itself; kFast evaluates SiluFastF32 (the same bits on its
// domain) and falls back to format::SiluF32 for a lane with any input outside that domain;
// kTable (bf16 input only) looks format::SiluF32 up in a shared-memory table of every bf16 gate
// value with 2^-16 <= |g| < 2^7 and evaluates format::SiluF32 for the others; kGeneral is the MoE
// forward's activation step with its model options (BiasActivation below: an optional per-expert
// w13 bias, SiLU or SwiGLU-OAI).
enum class SiluImpl { kNone, kSilu, kFast, kTable, kGeneral };

// y element i = f(gate element i, up element i, i), fp32, each pair rounded to T: the shape of
// every activation below. f is called for the elements in order 0..7.
template <typename T, typename F>
__device__ __forceinline__ Lane8 MapPairs(const Lane8& gate, const Lane8& up, const F& f) {
  Lane8 y;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float v0 = f(Element<T>(gate, 2 * i), Element<T>(up, 2 * i), 2 * i);
    const float v1 = f(Element<T>(gate, 2 * i + 1), Element<T>(up, 2 * i + 1), 2 * i + 1);
    y.w[i] = T::FromFloat2(v0, v1);
  }
  return y;
}

// y = silu(gate) * up in fp32 (format::SiluF32; one rounding for the product), rounded to T.
template <typename T>
__device__ __forceinline__ Lane8 SiluMul(const Lane8& gate, const Lane8& up) {
  return MapPairs<T>(gate, up,
                     [](float g, float u, int) { return MXMOE_MUL(format::SiluF32(g), u); });
}

// The raw bits of one bf16/fp16/fp32 element (16-bit ones in the low half) as fp32 (exact;
// format.h's conversions, the CPU's).
__device__ __forceinline__ float BitsAsFloat(uint32_t raw, int32_t dtype) {
  if (dtype == MXMOE_DTYPE_FP32) return __uint_as_float(raw);
  const uint16_t bits = static_cast<uint16_t>(raw);
  return dtype == MXMOE_DTYPE_BF16 ? format::Bf16ToFloat(bits) : format::Fp16ToFloat(bits);
}

// Element `i` of a bf16/fp16/fp32 array as fp32 (BitsAsFloat of its bits).
__device__ __forceinline__ float LoadAsFloat(const void* base, int32_t dtype, int64_t i) {
  return BitsAsFloat(dtype == MXMOE_DTYPE_FP32 ? static_cast<const uint32_t*>(base)[i]
                                               : static_cast<const uint16_t*>(base)[i],
                     dtype);
}

// v rounded to T and back (format.h's round to nearest even, the CPU's).
template <typename T>
__device__ __forceinline__ float RoundTo(float v);
template <>
__device__ __forceinline__ float RoundTo<Bf16>(float v) {
  return format::Bf16ToFloat(format::FloatToBf16(v));
}
template <>
__device__ __forceinline__ float RoundTo<Fp16>(float v) {
  return format::Fp16ToFloat(format::FloatToFp16(v));
}

// The MoE forward's activation step with its options (docs/format.md, "MoE forward"): the w13
// bias row (when bias != NULL) added to gate and up and each sum rounded to T, then
// SiLU(gate) * up (format::SiluF32) or GPT-OSS's SwiGLU (format::SwigluOaiF32), rounded to T.
struct ActivationSpec {
  const void* bias;    // [E, 2k] or NULL
  int32_t bias_dtype;  // mxmoe_dtype
  int32_t activation;  // mxmoe_activation
  float alpha;         // SwiGLU-OAI
  float limit;
};

// Lane of `column` (its first element) of a row of expert `expert`, k = the activation's width.
template <typename T>
__device__ __forceinline__ Lane8 BiasActivation(const ActivationSpec& a, const Lane8& gate,
                                                const Lane8& up, int64_t expert, int64_t k,
                                                int64_t column) {
  const int64_t bias_row = expert * 2 * k + column;
  return MapPairs<T>(gate, up, [a, bias_row, k](float g, float u, int element) {
    if (a.bias != nullptr) {
      g = RoundTo<T>(MXMOE_ADD(g, LoadAsFloat(a.bias, a.bias_dtype, bias_row + element)));
      u = RoundTo<T>(MXMOE_ADD(u, LoadAsFloat(a.bias, a.bias_dtype, bias_row + k + element)));
    }
    return a.activation == MXMOE_ACTIVATION_SWIGLU_OAI
               ? format::SwigluOaiF32(g, u, a.alpha, a.limit)
               : MXMOE_MUL(format::SiluF32(g), u);
  });
}

// Smallest and largest |g| that SiluFastF32 takes.
constexpr float kSiluFastMin = 0x1p-64f;
constexpr float kSiluFastMax = 64.0f;

// format::SiluF32(g) bit for bit for 2^-64 <= |g| <= 64 (tests/gpu/quantize_lane_test.cu checks
// every fp32 g of that domain), in about 24 instructions instead of about 41 (SASS, sm_90a). On
// that domain format::SiluF32's clamps and its final select are no-ops, and three of its steps
// have cheaper exact equivalents:
//   1. n = rintf(v), v = -g * log2(e) (|v| <= 93): t = v + 1.5 * 2^23 rounds to the nearest even
//      integer (one FADD), t - 1.5 * 2^23 is that integer exactly, and bits(t) = bits(1.5*2^23) + n;
//   2. the scaling by 2^n: e = p * 2^n is a normal fp32 for |n| <= 93 (p in [0.70, 1.42]), so both
//      of format.h's multiplications are exact and equal to adding n to p's exponent field,
//      bits(p) + (n << 23) = bits(p) + (bits(t) << 23) (mod 2^32: bits(1.5*2^23) << 23 == 0);
//   3. the IEEE division g / (1 + e): nvcc's own fast path (reciprocal, one Newton step, one
//      correction), without its range check (FCHK) and the call to the slow path that goes with
//      it: numerator and quotient are normal and far from overflow, the denominator lies in
//      [1, 2^93], where that fast path is the correctly rounded quotient.
// Outside the domain the result is meaningless; *in_domain is cleared (the caller then uses
// format::SiluF32).
__device__ __forceinline__ float SiluFastF32(float g, bool* in_domain) {
  *in_domain = *in_domain & (fabsf(g) >= kSiluFastMin) & (fabsf(g) <= kSiluFastMax);
  const float x = -g;
  const float t = MXMOE_ADD(MXMOE_MUL(x, format::kExpLog2e), 12582912.0f);
  const float n = MXMOE_ADD(t, -12582912.0f);
  const float p = format::ExpPolynomial(format::ExpReduce(x, n));
  const float e = __uint_as_float(__float_as_uint(p) + (__float_as_uint(t) << 23));
  const float d = MXMOE_ADD(1.0f, e);
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(d));
  y = fmaf(fmaf(-d, y, 1.0f), y, y);
  const float q = MXMOE_MUL(g, y);
  return fmaf(fmaf(-d, q, g), y, q);
}

// SiluMul<T> with SiluFastF32; *in_domain says whether every gate value was in its domain
// (if not, the result must be discarded).
template <typename T>
__device__ __forceinline__ Lane8 SiluMulFast(const Lane8& gate, const Lane8& up,
                                             bool* in_domain) {
  *in_domain = true;
  return MapPairs<T>(gate, up, [in_domain](float g, float u, int) {
    return MXMOE_MUL(SiluFastF32(g, in_domain), u);
  });
}

// SiluMul<T> bit for bit: SiluMulFast, and where a gate value fell outside its domain (rare:
// |gate| < 2^-64, zeros included, or > 64) the reference SiluMul.
template <typename T>
__device__ __forceinline__ Lane8 SiluMulChecked(const Lane8& gate, const Lane8& up) {
  bool in_domain;
  const Lane8 y = SiluMulFast<T>(gate, up, &in_domain);
  return in_domain ? y : SiluMul<T>(gate, up);
}

// The SiLU table of SiluImpl::kTable: entry i < kSiluTableSpan is format::SiluF32 of the bf16 with
// bits kSiluTableFirst + i (the magnitudes 2^-16 = 0x3780 up to, not including, 2^7 = 0x4300: 23
// binades of 128 values), entry kSiluTableNegative + i that of its negative. The negative half
// starts at a power of two so that the sign bit maps to an index bit; every index the lookup can
// form (out-of-range values included) lies inside the table.
constexpr uint32_t kSiluTableFirst = 0x3780u;
constexpr uint32_t kSiluTableSpan = 0x4300u - kSiluTableFirst;  // 2944
constexpr uint32_t kSiluTableNegative = 4096u;
constexpr int kSiluTableEntries = static_cast<int>(2 * kSiluTableNegative);  // 32 KB
constexpr int kSiluTableBytes = kSiluTableEntries * 4;

// Fills `table` (kSiluTableEntries floats, shared memory) with format::SiluF32 itself, threads
// [0, threads) of the CTA; the caller synchronises before use. The unused gaps hold zeros.
// (SiluFastF32 would build it in about 60% of the time; the reference keeps this variant's
// exactness independent of the fast path's.)
__device__ __forceinline__ void BuildSiluTable(float* table, int tid, int threads) {
  for (int i = tid; i < kSiluTableEntries; i += threads) {
    const uint32_t j = static_cast<uint32_t>(i) & (kSiluTableNegative - 1);
    float s = 0.0f;
    if (j < kSiluTableSpan) {
      const uint32_t sign = static_cast<uint32_t>(i) >= kSiluTableNegative ? 0x8000u : 0u;
      s = format::SiluF32(__uint_as_float((sign | (kSiluTableFirst + j)) << 16));
    }
    table[i] = s;
  }
}

// The table entry of the bf16 gate value with bits h (16 bits; garbage outside the table's
// range, where *in_table is cleared).
__device__ __forceinline__ float SiluTableEntry(const float* table, uint32_t h, bool* in_table) {
  const uint32_t index = (h & 0x7FFFu) - kSiluTableFirst;  // wraps below the range
  *in_table = *in_table & (index < kSiluTableSpan);
  return table[(index & (kSiluTableNegative - 1)) | ((h >> 3) & kSiluTableNegative)];
}

// format::SiluF32 of the bf16 with bits h, evaluated (the table's fallback).
__device__ __forceinline__ float SiluEvaluated(uint32_t h) {
  return format::SiluF32(__uint_as_float(h << 16));
}

// format::SiluF32 for the bf16 h: the table entry, or evaluated outside the table's range.
__device__ __forceinline__ float SiluTableF32(const float* table, uint32_t h) {
  bool in_table = true;
  const float s = SiluTableEntry(table, h, &in_table);
  return in_table ? s : SiluEvaluated(h);
}

// SiluMul<Bf16> through the table: 8 lookups, then, only if one of them fell outside the
// table's range (rare for activations: below 2^-16 or from 2^7 on), those evaluated.
__device__ __forceinline__ Lane8 SiluMulTable(const float* table, const Lane8& gate,
                                              const Lane8& up) {
  float s[8];
  bool in[8];
  bool all_in = true;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    in[j] = true;
    const uint32_t h = j % 2 == 0 ? gate.w[j / 2] & 0xFFFFu : gate.w[j / 2] >> 16;
    s[j] = SiluTableEntry(table, h, &in[j]);
    all_in = all_in & in[j];
  }
  if (!all_in) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t h = j % 2 == 0 ? gate.w[j / 2] & 0xFFFFu : gate.w[j / 2] >> 16;
      if (!in[j]) s[j] = SiluEvaluated(h);
    }
  }
  Lane8 y;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    y.w[i] = Bf16::FromFloat2(MXMOE_MUL(s[2 * i], Element<Bf16>(up, 2 * i)),
                              MXMOE_MUL(s[2 * i + 1], Element<Bf16>(up, 2 * i + 1)));
  }
  return y;
}

// E2M1 codes of two fp32 values (products x * QuantMultiplier(s) of the quantization rule,
// |v| < 8 or +-Inf, never NaN): element v0's code in bits 0..3, v1's in bits 16..19.
// Bit-identical to format::FloatToE2M1 on each (tests/gpu/quantize_lane_test.cu checks every
// 16-bit input at every scale), in about 14 instructions for the pair instead of a branch chain
// per element:
//   1. Round both to fp16 in one instruction. Every |v| >= 2^-14 that can occur is exact in fp16
//      (a bf16 or fp16 significand times a power of two); smaller ones may round, but stay far
//      below 0.25, the first rounding threshold, and keep their sign (-tiny -> code 8).
//   2. Clamp |v| to 6 (the saturation point; Inf included).
//   3. Round to the E2M1 grid with one fp16 addition: C = 2^9 * max(binade(|v|), 1) has an ulp
//      of half the grid spacing in |v|'s binade (0.5 below 2, 1 in [2,4), 2 in [4,6]), so
//      t = |v| + C rounds to nearest even exactly as the rule does, and t - C (as integers) is
//      the number n of grid steps; the code is n + 2 * log2(max(binade, 1)).
__device__ __forceinline__ uint32_t EncodeE2M1x2(float v0, float v1) {
  const __half2 h2 = __floats2half2_rn(v0, v1);
  const uint32_t h = *reinterpret_cast<const uint32_t*>(&h2);
  const uint32_t a = __vminu2(h & 0x7FFF7FFFu, 0x46004600u);           // min(|v|, 6)
  const uint32_t binade = __vmaxu2(a & 0x7C007C00u, 0x3C003C00u);      // max(2^floor(log2|v|), 1)
  const uint32_t magic = binade + 0x24002400u;                          // 2^9 * binade
  const __half2 t2 = __hadd2(*reinterpret_cast<const __half2*>(&a),
                             *reinterpret_cast<const __half2*>(&magic));
  const uint32_t t = *reinterpret_cast<const uint32_t*>(&t2);
  // (binade - 1.0) >> 9 is 2 * log2(binade) in each half; (h >> 12) & 8 is the sign as bit 3.
  const uint32_t exponent_and_sign = ((binade - 0x3C003C00u) >> 9) | ((h >> 12) & 0x00080008u);
  return t - magic + exponent_and_sign;  // no borrow between halves: t >= magic in each
}

// EncodeE2M1x2 for two bf16 products v = x * 2^(127-s) held in one word (element 0 in the low
// half), computed without leaving bf16: the same rounding trick in bf16 arithmetic. x * 2^(127-s)
// is exact in bf16 (a power-of-two scaling of a bf16) unless it is below 2^-126, far under 0.25,
// where only its sign matters; C = 2^6 * max(binade(|v|), 1) has an ulp of half the E2M1 grid
// spacing in |v|'s binade, so bf16(|v| + C) - C counts the grid steps, ties to even, exactly as
// format::FloatToE2M1. Element 0's code lands in bits 0..3, element 1's in bits 16..19.
__device__ __forceinline__ uint32_t EncodeE2M1x2Bf16(uint32_t v) {
  const uint32_t a = __vminu2(v & 0x7FFF7FFFu, 0x40C040C0u);        // min(|v|, 6)
  const uint32_t binade = __vmaxu2(a & 0x7F807F80u, 0x3F803F80u);   // max(2^floor(log2|v|), 1)
  const uint32_t magic = binade + 0x03000300u;                       // 2^6 * binade
  const __nv_bfloat162 t2 = __hadd2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                    *reinterpret_cast<const __nv_bfloat162*>(&magic));
  const uint32_t t = *reinterpret_cast<const uint32_t*>(&t2);
  // (binade - 1.0) >> 6 is 2 * log2(binade) in each half; (v >> 12) & 8 is the sign as bit 3.
  const uint32_t exponent_and_sign = ((binade - 0x3F803F80u) >> 6) | ((v >> 12) & 0x00080008u);
  return t - magic + exponent_and_sign;  // no borrow between halves: t >= magic in each
}

// EncodeE2M1x2Bf16 of the bf16 pair x2 times the bf16 pair m2 (the scale's multiplier in both
// halves: a normal power of two for scales 1..253, and 0 for scale 0, which gives signed zeros;
// 0..253 is all that bf16 blocks produce, since the largest bf16 magnitude, Inf included, gets
// 253).
__device__ __forceinline__ uint32_t ScaleEncodeE2M1x2Bf16(uint32_t x2, uint32_t m2) {
  const __nv_bfloat162 v2 = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&x2),
                                    *reinterpret_cast<const __nv_bfloat162*>(&m2));
  return EncodeE2M1x2Bf16(*reinterpret_cast<const uint32_t*>(&v2));
}

// How QuantizeLane turns values into codes: kFloat multiplies in fp32 and rounds through fp16
// (EncodeE2M1x2, any T); kBf16Packed multiplies the packed bf16 pairs by the bf16 power of two
// and encodes them in bf16 (EncodeE2M1x2Bf16, T = Bf16 only; fewer instructions, same codes).
enum class Encode { kFloat, kBf16Packed };

// The result of quantizing one lane: 8 E2M1 codes (element i in bits 4i..4i+3) and the scale
// byte of the block the lane belongs to (the same in all 4 lanes of the block).
struct QuantizedLane {
  uint32_t codes;
  uint8_t scale;
};

// Quantizes this lane's 8 values as part of the 32-element block held by the 4 aligned lanes
// (lane % 4 == 0..3) that include it. All 32 lanes of the warp must call this.
//
// amax: the largest |x| of a 16-bit float is the largest (bits & 0x7FFF) as an unsigned integer
// (magnitudes order like their bit patterns), and every NaN lies above the Inf pattern, so one
// integer max gives both amax and the "block holds a NaN" flag, two halves per instruction.
template <typename T, Encode kEncode = Encode::kFloat>
__device__ __forceinline__ QuantizedLane QuantizeLane(const Lane8& x) {
  static_assert(kEncode == Encode::kFloat || std::is_same<T, Bf16>::value,
                "the packed encoding is for bf16 input");
  uint32_t m = __vmaxu2(__vmaxu2(x.w[0] & 0x7FFF7FFFu, x.w[1] & 0x7FFF7FFFu),
                        __vmaxu2(x.w[2] & 0x7FFF7FFFu, x.w[3] & 0x7FFF7FFFu));
  m = max(m & 0xFFFFu, m >> 16);
  m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, 1));
  m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, 2));

  QuantizedLane out;
  const bool has_nan = m > T::kAbsInf;
  out.scale = has_nan ? format::kScaleNaN : format::ScaleFromAmax(T::ToFloat(m));
  const uint8_t multiplier_scale = has_nan ? 0 : out.scale;
  uint32_t bytes[4];
  if constexpr (kEncode == Encode::kBf16Packed) {
    // format::QuantMultiplier as a bf16 pair: the top half of its fp32 bits (a power of two, so
    // exact; 2^-127 is the bf16 subnormal 0x0040, as in fp32).
    const uint32_t m = FloatBits16(format::QuantMultiplier(multiplier_scale));
    const uint32_t m2 = m | (m << 16);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t c = ScaleEncodeE2M1x2Bf16(x.w[i], m2);
      bytes[i] = c | (c >> 12);
    }
  } else {
    const float multiplier = format::QuantMultiplier(multiplier_scale);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t c = EncodeE2M1x2(MXMOE_MUL(Element<T>(x, 2 * i), multiplier),
                                      MXMOE_MUL(Element<T>(x, 2 * i + 1), multiplier));
      bytes[i] = c | (c >> 12);  // byte 0 = code(2i) | code(2i+1) << 4
    }
  }
  const uint32_t codes = __byte_perm(__byte_perm(bytes[0], bytes[1], 0x0040),
                                     __byte_perm(bytes[2], bytes[3], 0x0040), 0x5410);
  out.codes = has_nan ? 0u : codes;  // a NaN block: scale 0xFF, all codes 0
  return out;
}

}  // namespace quant
}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_QUANTIZE_DEVICE_CUH_
