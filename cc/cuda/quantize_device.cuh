// Device building blocks of the MXFP4 quantization kernels (cc/cuda/quantize.cu): a 32-bit fast
// divider, 16-byte vector loads, and the per-lane step of the quantization rule, in which four
// consecutive lanes of a warp share one 32-element block (8 elements, one 16-byte load, each).
//
// Limits: every function here assumes all 32 lanes of the warp call it together (the block amax
// is reduced with warp shuffles); lanes whose unit is out of range still call it and discard the
// result. The rule is mxmoe/format.h's (ScaleFromAmax, QuantMultiplier, the SiLU constants), so the
// CPU backend and these kernels share one definition. Three pieces are faster equivalents of
// format.h functions, each with its argument and each checked bit for bit against format.h on
// every input by tests/gpu/quantize_lane_test.cu: hardware bf16/fp16 conversions (exact),
// EncodeE2M1x2 (FloatToE2M1 on two products at once).
#ifndef MXMOE_CUDA_QUANTIZE_DEVICE_CUH_
#define MXMOE_CUDA_QUANTIZE_DEVICE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mxmoe/format.h"

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

// 8 consecutive 16-bit values, element 2i in the low half of word i (little-endian memory order).
struct Lane8 {
  uint32_t w[4];
};

__device__ __forceinline__ Lane8 AsLane8(uint4 v) { return Lane8{{v.x, v.y, v.z, v.w}}; }

template <typename T>
__device__ __forceinline__ float Element(const Lane8& x, int i) {
  return T::ToFloat(i % 2 == 0 ? (x.w[i / 2] & 0xFFFFu) : (x.w[i / 2] >> 16));
}

// y = silu(gate) * up in fp32 (format::SiluF32; one rounding for the product), rounded to T.
template <typename T>
__device__ __forceinline__ Lane8 SiluMul(const Lane8& gate, const Lane8& up) {
  Lane8 y;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float v[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float g = Element<T>(gate, 2 * i + j);
      v[j] = MXMOE_MUL(format::SiluF32(g), Element<T>(up, 2 * i + j));
    }
    y.w[i] = T::FromFloat2(v[0], v[1]);
  }
  return y;
}

// E2M1 codes of two fp32 values (products x * 2^(127-s) of the quantization rule, |v| < 8 or
// +-Inf, never NaN): element v0's code in bits 0..3, v1's in bits 16..19. Bit-identical to
// format::FloatToE2M1 on each (tests/gpu/quantize_lane_test.cu checks every 16-bit input at
// every scale), in about 14 instructions for the pair instead of a branch chain per element:
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
template <typename T>
__device__ __forceinline__ QuantizedLane QuantizeLane(const Lane8& x) {
  uint32_t m = __vmaxu2(__vmaxu2(x.w[0] & 0x7FFF7FFFu, x.w[1] & 0x7FFF7FFFu),
                        __vmaxu2(x.w[2] & 0x7FFF7FFFu, x.w[3] & 0x7FFF7FFFu));
  m = max(m & 0xFFFFu, m >> 16);
  m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, 1));
  m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, 2));

  QuantizedLane out;
  const bool has_nan = m > T::kAbsInf;
  out.scale = has_nan ? format::kScaleNaN : format::ScaleFromAmax(T::ToFloat(m));
  const float multiplier = format::QuantMultiplier(has_nan ? 0 : out.scale);
  uint32_t bytes[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t c = EncodeE2M1x2(MXMOE_MUL(Element<T>(x, 2 * i), multiplier),
                                    MXMOE_MUL(Element<T>(x, 2 * i + 1), multiplier));
    bytes[i] = c | (c >> 12);  // byte 0 = code(2i) | code(2i+1) << 4
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
