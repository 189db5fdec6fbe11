// Eight-wide AVX2+FMA forms of format.h's SiluF32 and of the bf16 SiLU-and-mul row, for the CPU
// backend's activation rows (quantize.cc, moe_forward.cc), used when ActivationUsesFma()
// (panel.h). Each lane performs format.h's operations in format.h's order with the same IEEE
// operations (FMA, ROUNDPS in the current rounding mode, MUL, ADD, DIV, integer exponent
// arithmetic), so the bits are SiluF32's; tests/cc/cpu_kernels_test.cc checks SiluF32x8 on every
// 251st fp32 bit pattern and the row functions on random and special bf16 rows.
#ifndef MXMOE_CPU_ACTIVATION_SIMD_H_
#define MXMOE_CPU_ACTIVATION_SIMD_H_

#if defined(__x86_64__)

#include <immintrin.h>
#include <stdint.h>

#include "cc/cpu/element_io.h"
#include "cc/cpu/panel.h"
#include "mxmoe/format.h"

namespace mxmoe {
namespace cpu {

// format::ExpF32InRange on eight lanes already clamped into [-103.98, 88.72].
MXMOE_CPU_FMA_TARGET inline __m256 ExpF32InRangeX8(__m256 x) {
  namespace fmt = ::mxmoe::format;
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(fmt::kExpLog2e)),
                                   _MM_FROUND_CUR_DIRECTION);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-fmt::kExpLn2Hi), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-fmt::kExpLn2Lo), r);
  __m256 p = _mm256_set1_ps(fmt::kExpP6);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(fmt::kExpP5));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(fmt::kExpP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(fmt::kExpP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(fmt::kExpP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(fmt::kExpP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(fmt::kExpP0));
  // ni / 2 truncated toward zero (C's division): add the sign bit before the arithmetic shift.
  const __m256i ni = _mm256_cvttps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(_mm256_add_epi32(ni, _mm256_srli_epi32(ni, 31)), 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

// format::SiluF32 on eight lanes. max_ps returns its second operand when the first is NaN, as
// fmaxf(NaN, lo) returns lo; the final select is false for NaN, as in SiluF32.
MXMOE_CPU_FMA_TARGET inline __m256 SiluF32X8(__m256 g) {
  const __m256 neg = _mm256_xor_ps(g, _mm256_set1_ps(-0.0f));
  const __m256 x = _mm256_min_ps(_mm256_max_ps(neg, _mm256_set1_ps(-103.98f)),
                                 _mm256_set1_ps(88.72f));
  const __m256 e = ExpF32InRangeX8(x);
  const __m256 q = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  const __m256 tiny = _mm256_cmp_ps(g, _mm256_set1_ps(-88.72f), _CMP_LT_OQ);
  return _mm256_blendv_ps(q, _mm256_set1_ps(-0.0f), tiny);
}

// format::FloatToBf16 on eight lanes, left in the upper half of each 32-bit lane (the bf16's
// value as fp32 bits): NaN keeps its top bits and gets the quiet bit, others round to nearest
// even.
MXMOE_CPU_FMA_TARGET inline __m256i RoundToBf16X8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                         _mm256_set1_epi32(0x7F800000));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_and_si256(
      _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), high);
  const __m256i quiet = _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x400000)), high);
  return _mm256_blendv_epi8(rounded, quiet, nan);
}

MXMOE_CPU_FMA_TARGET inline __m256 LoadBf16X8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// out[j] = bf16(silu(gate[j]) * up[j]) as fp32, j < n: the SiLU-and-mul value of a bf16 row.
MXMOE_CPU_FMA_TARGET inline void SiluMulBf16Row(const uint16_t* gate, const uint16_t* up,
                                                int64_t n, float* out) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 y = _mm256_mul_ps(SiluF32X8(LoadBf16X8(gate + j)), LoadBf16X8(up + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), RoundToBf16X8(y));
  }
  for (; j < n; ++j) {
    const float y = MXMOE_MUL(format::SiluF32(format::Bf16ToFloat(LoadU16(gate, j))),
                              format::Bf16ToFloat(LoadU16(up, j)));
    out[j] = format::Bf16ToFloat(format::FloatToBf16(y));
  }
}

// acc[j] += w * y[j] over a bf16 row y, j < n: the weighted reduce's MXMOE_ADD(acc,
// MXMOE_MUL(w, y)) (a multiply, then an add: no FMA), eight lanes at a time.
MXMOE_CPU_FMA_TARGET inline void AccumulateBf16Row(const uint16_t* y, float w, int64_t n,
                                                   float* acc) {
  const __m256 w8 = _mm256_set1_ps(w);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 wy = _mm256_mul_ps(w8, LoadBf16X8(y + j));
    _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), wy));
  }
  for (; j < n; ++j) {
    acc[j] = MXMOE_ADD(acc[j], MXMOE_MUL(w, format::Bf16ToFloat(LoadU16(y, j))));
  }
}

// out[j] = FloatToBf16(acc[j]), j < n, eight lanes at a time.
MXMOE_CPU_FMA_TARGET inline void StoreBf16Row(const float* acc, int64_t n, uint16_t* out) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i bits = _mm256_srli_epi32(RoundToBf16X8(_mm256_loadu_ps(acc + j)), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j),
                     _mm_packus_epi32(_mm256_castsi256_si128(bits),
                                      _mm256_extracti128_si256(bits, 1)));
  }
  for (; j < n; ++j) StoreU16(out, j, format::FloatToBf16(acc[j]));
}

// The same row stored as bf16 (the MoE's intermediate activations).
MXMOE_CPU_FMA_TARGET inline void SiluMulBf16RowToBf16(const uint16_t* gate, const uint16_t* up,
                                                      int64_t n, uint16_t* out) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 y = _mm256_mul_ps(SiluF32X8(LoadBf16X8(gate + j)), LoadBf16X8(up + j));
    const __m256i bits = _mm256_srli_epi32(RoundToBf16X8(y), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits),
                                            _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), packed);
  }
  for (; j < n; ++j) {
    StoreU16(out, j, format::FloatToBf16(MXMOE_MUL(
                         format::SiluF32(format::Bf16ToFloat(LoadU16(gate, j))),
                         format::Bf16ToFloat(LoadU16(up, j)))));
  }
}

}  // namespace cpu
}  // namespace mxmoe

#endif  // __x86_64__

#endif  // MXMOE_CPU_ACTIVATION_SIMD_H_
