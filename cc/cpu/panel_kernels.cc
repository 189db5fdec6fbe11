// The CPU GEMM's panel kernels (see panel.h for the layouts and the arithmetic they share): a
// portable loop, SSE2 (the x86-64 baseline), AVX2 and AVX-512 VNNI, chosen at run time. The AVX2
// and AVX-512 functions are compiled for those instruction sets through function attributes (the
// rest of the library stays baseline x86-64) and only called when the CPU reports them
// (__builtin_cpu_supports). No kernel uses FMA: every product is exact and
// every sum is rounded on its own, as in the portable loop.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <initializer_list>
#include <type_traits>

#include "cc/cpu/activation_simd.h"
#include "cc/cpu/mxfp4_block.h"
#include "cc/cpu/panel.h"

#if defined(__x86_64__) || defined(__i386__)
#define MXMOE_CPU_X86 1
#include <immintrin.h>
#endif

namespace mxmoe {
namespace cpu {

const CodeByte* CodeByteTable() {
  struct Table {
    CodeByte entries[256];
    Table() {
      for (int byte = 0; byte < 256; ++byte) {
        const int lo = format::E2M1TwiceValue(byte & 0xF);
        const int hi = format::E2M1TwiceValue(byte >> 4);
        entries[byte] = {{static_cast<uint8_t>(lo + kCodeBias),
                          static_cast<uint8_t>(hi + kCodeBias)},
                         {static_cast<int8_t>(lo), static_cast<int8_t>(hi)},
                         static_cast<int8_t>(lo + hi)};
      }
    }
  };
  static const Table table;
  return table.entries;
}

void PadPanelColumn(int64_t blocks, int col, uint8_t* panel) {
  for (int64_t b = 0; b < blocks; ++b) {
    for (int i = 0; i < kBlock; ++i) panel[PanelCodeIndex(b, col, i)] = kCodeBias;
    panel[PanelScaleIndex(blocks, b, col)] = kPaddingScale;
  }
}

namespace {

// Calls f(std::integral_constant<int, R>{}) for R = num_rows (1 .. kMaxPanelRows - 1), else
// R = kMaxPanelRows: the row counts the vector kernels are instantiated for.
template <typename F>
void WithRowCount(int num_rows, F&& f) {
  static_assert(kMaxPanelRows == 4, "one case per row count below kMaxPanelRows");
  switch (num_rows) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    default:
      return f(std::integral_constant<int, kMaxPanelRows>{});
  }
}

void ScalarKernel(const uint8_t* panel, int64_t blocks, const int8_t* a_codes,
                  const double* a_factors, const int32_t* a_corrections, int num_rows,
                  double* acc) {
  const int64_t k = blocks * kBlock;
  for (int r = 0; r < num_rows; ++r) {
    const int8_t* a = a_codes + r * k;
    for (int c = 0; c < kPanelCols; ++c) {
      double sum = 0.0;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        for (int i = 0; i < kBlock; ++i) {
          dot += (int32_t{panel[PanelCodeIndex(b, c, i)]} - kCodeBias) * a[b * kBlock + i];
        }
        const double factor =
            a_factors[r * blocks + b] * BFactor(panel[PanelScaleIndex(blocks, b, c)]);
        sum += static_cast<double>(dot) * factor;
      }
      acc[r * kPanelCols + c] = sum;
    }
  }
  (void)a_corrections;  // the portable loop removes the bias per product instead
}

#if defined(MXMOE_CPU_X86)

inline int32_t Load4(const int8_t* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}

// SSE2: per A row and block, 16-bit multiply-adds of zero-extended codes by the sign-extended A
// group (repeated for two columns), reduced to 8 column dots.
void Sse2Kernel(const uint8_t* panel, int64_t blocks, const int8_t* a_codes,
                const double* a_factors, const int32_t* a_corrections, int num_rows,
                double* acc) {
  const int64_t k = blocks * kBlock;
  const __m128i zero = _mm_setzero_si128();
  for (int r = 0; r < num_rows; ++r) {
    const int8_t* a = a_codes + r * k;
    __m128d sum[4] = {_mm_setzero_pd(), _mm_setzero_pd(), _mm_setzero_pd(), _mm_setzero_pd()};
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* codes = panel + b * kPanelBlockCodeBytes;
      __m128i part[4] = {zero, zero, zero, zero};  // int32 pairs of columns 01, 23, 45, 67
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) {
        const __m128i a8 = _mm_cvtsi32_si128(Load4(a + b * kBlock + 4 * q));
        const __m128i a4 = _mm_unpacklo_epi8(a8, _mm_cmpgt_epi8(zero, a8));
        const __m128i a_pair = _mm_unpacklo_epi64(a4, a4);
        const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 32 * q));
        const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 32 * q + 16));
        part[0] = _mm_add_epi32(part[0], _mm_madd_epi16(_mm_unpacklo_epi8(lo, zero), a_pair));
        part[1] = _mm_add_epi32(part[1], _mm_madd_epi16(_mm_unpackhi_epi8(lo, zero), a_pair));
        part[2] = _mm_add_epi32(part[2], _mm_madd_epi16(_mm_unpacklo_epi8(hi, zero), a_pair));
        part[3] = _mm_add_epi32(part[3], _mm_madd_epi16(_mm_unpackhi_epi8(hi, zero), a_pair));
      }
      const __m128i correction = _mm_set1_epi32(a_corrections[r * blocks + b]);
      __m128i dots[2];
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m128 x = _mm_castsi128_ps(part[2 * h]);
        const __m128 y = _mm_castsi128_ps(part[2 * h + 1]);
        const __m128i even = _mm_castps_si128(_mm_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0)));
        const __m128i odd = _mm_castps_si128(_mm_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
        dots[h] = _mm_sub_epi32(_mm_add_epi32(even, odd), correction);
      }
      const __m128d fa = _mm_set1_pd(a_factors[r * blocks + b]);
      const uint8_t* s = panel + PanelScaleIndex(blocks, b, 0);
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        const __m128i d = p % 2 == 0 ? dots[p / 2] : _mm_unpackhi_epi64(dots[p / 2], dots[p / 2]);
        const __m128d fb = _mm_set_pd(BFactor(s[2 * p + 1]), BFactor(s[2 * p]));
        sum[p] = _mm_add_pd(sum[p], _mm_mul_pd(_mm_cvtepi32_pd(d), _mm_mul_pd(fa, fb)));
      }
    }
    for (int p = 0; p < 4; ++p) _mm_storeu_pd(acc + r * kPanelCols + 2 * p, sum[p]);
  }
}

// The bits of BFactor(0xFF) (the NaN factor), for the vector kernels' blends.
inline int64_t NanFactorBits() {
  const double nan_value = BFactor(0xFF);
  int64_t bits;
  memcpy(&bits, &nan_value, sizeof(bits));
  return bits;
}

// 2^(s - 127) for 4 scale bytes (as int64 lanes), NaN for 0xFF: the double's exponent field
// built directly, so it equals BFactor bit for bit.
__attribute__((target("avx2"))) inline __m256d ScaleFactors4(__m256i s, __m256i nan_bits) {
  const __m256i bits = _mm256_slli_epi64(_mm256_add_epi64(s, _mm256_set1_epi64x(1023 - 127)), 52);
  const __m256i is_nan = _mm256_cmpeq_epi64(s, _mm256_set1_epi64x(0xFF));
  return _mm256_castsi256_pd(_mm256_blendv_epi8(bits, nan_bits, is_nan));
}

// AVX2: per block, the panel's 8 code registers (one per 4-element group, 8 columns each) meet
// each A row's broadcast groups with unsigned-by-signed byte multiply-adds; the 16-bit partial
// sums stay below 2^15 (8 groups * 2 * 24 * 12 = 4608), then one 16-bit multiply-add by 1 gives
// the 8 column dots in int32 lanes: no horizontal reduction.
template <int kRows>
__attribute__((target("avx2"))) void Avx2KernelRows(const uint8_t* panel, int64_t blocks,
                                                    const int8_t* a_codes,
                                                    const double* a_factors,
                                                    const int32_t* a_corrections, double* acc) {
  const int64_t k = blocks * kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i nan_bits = _mm256_set1_epi64x(NanFactorBits());
  // Fully unrolled (GCC's -O2 does not unroll by itself), so that the arrays live in registers.
  __m256d sum_lo[kRows];
  __m256d sum_hi[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) sum_lo[r] = sum_hi[r] = _mm256_setzero_pd();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* codes = panel + b * kPanelBlockCodeBytes;
    const __m128i s8 =
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(panel + PanelScaleIndex(blocks, b, 0)));
    const __m256d fb_lo = ScaleFactors4(_mm256_cvtepu8_epi64(s8), nan_bits);
    const __m256d fb_hi = ScaleFactors4(_mm256_cvtepu8_epi64(_mm_srli_si128(s8, 4)), nan_bits);
    __m256i part[kRows];
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      const __m256i codes_q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * q));
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const __m256i a_q = _mm256_set1_epi32(Load4(a_codes + r * k + b * kBlock + 4 * q));
        const __m256i p = _mm256_maddubs_epi16(codes_q, a_q);
        part[r] = q == 0 ? p : _mm256_add_epi16(part[r], p);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m256i dots = _mm256_sub_epi32(_mm256_madd_epi16(part[r], ones),
                                            _mm256_set1_epi32(a_corrections[r * blocks + b]));
      const __m256d fa = _mm256_set1_pd(a_factors[r * blocks + b]);
      const __m256d d_lo = _mm256_cvtepi32_pd(_mm256_castsi256_si128(dots));
      const __m256d d_hi = _mm256_cvtepi32_pd(_mm256_extracti128_si256(dots, 1));
      sum_lo[r] = _mm256_add_pd(sum_lo[r], _mm256_mul_pd(d_lo, _mm256_mul_pd(fa, fb_lo)));
      sum_hi[r] = _mm256_add_pd(sum_hi[r], _mm256_mul_pd(d_hi, _mm256_mul_pd(fa, fb_hi)));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    _mm256_storeu_pd(acc + r * kPanelCols, sum_lo[r]);
    _mm256_storeu_pd(acc + r * kPanelCols + 4, sum_hi[r]);
  }
}

void Avx2Kernel(const uint8_t* panel, int64_t blocks, const int8_t* a_codes,
                const double* a_factors, const int32_t* a_corrections, int num_rows,
                double* acc) {
  WithRowCount(num_rows, [&](auto rows) {
    Avx2KernelRows<decltype(rows)::value>(panel, blocks, a_codes, a_factors, a_corrections, acc);
  });
}

// QuantizeBlockPortable on 4 x 8 lanes (AVX2): the same NaN test, the same amax (a maximum is
// exact), the scale rule of format.h (scalar, once per block), the same fp32 products and the 7
// threshold comparisons of format::FloatToE2M1, each lane's all-ones mask subtracted as -1.
__attribute__((target("avx2"))) uint8_t QuantizeBlockAvx2(const float* x, uint8_t* packed) {
  __m256 v[4];
  __m256 unordered = _mm256_setzero_ps();
  __m256 amax8 = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(x + 8 * j);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v[j], v[j], _CMP_UNORD_Q));
    amax8 = _mm256_max_ps(amax8, _mm256_and_ps(v[j], abs_mask));
  }
  if (_mm256_movemask_ps(unordered) != 0) {
    memset(packed, 0, kPackedBlockBytes);
    return format::kScaleNaN;
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const uint8_t scale = format::ScaleFromAmax(_mm_cvtss_f32(m4));
  const __m256 multiplier = _mm256_set1_ps(format::QuantMultiplier(scale));
  const float thresholds[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
  __m256i codes[4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m256 q = _mm256_mul_ps(v[j], multiplier);
    const __m256 a = _mm256_and_ps(q, abs_mask);
    __m256i mag = _mm256_setzero_si256();
#pragma GCC unroll 7
    for (int t = 0; t < 7; ++t) {  // ties: > where the even code is below, >= where above
      const __m256 edge = _mm256_set1_ps(thresholds[t]);
      const __m256 hit = t % 2 == 0 ? _mm256_cmp_ps(a, edge, _CMP_GT_OQ)
                                    : _mm256_cmp_ps(a, edge, _CMP_GE_OQ);
      mag = _mm256_sub_epi32(mag, _mm256_castps_si256(hit));
    }
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(q), 28),
                                          _mm256_set1_epi32(8));
    codes[j] = _mm256_or_si256(mag, sign);
  }
  // 32 int32 codes -> 32 bytes in element order (the packs work per 128-bit lane), then bytes 2i
  // and 2i+1 -> one byte, element 2i in the low nibble.
  const __m256i words = _mm256_packus_epi16(_mm256_packus_epi32(codes[0], codes[1]),
                                            _mm256_packus_epi32(codes[2], codes[3]));
  const __m256i bytes =
      _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  const __m256i merged = _mm256_or_si256(_mm256_and_si256(bytes, _mm256_set1_epi16(0x0F)),
                                         _mm256_slli_epi16(_mm256_srli_epi16(bytes, 8), 4));
  const __m256i narrow = _mm256_permute4x64_epi64(_mm256_packus_epi16(merged, merged), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(packed), _mm256_castsi256_si128(narrow));
  return scale;
}

// Two vectors of 4 64-bit lane masks as 8 32-bit lane masks in element order.
MXMOE_CPU_FMA_TARGET inline __m256i NarrowMasks(__m256d lo, __m256d hi) {
  const __m256 two =
      _mm256_shuffle_ps(_mm256_castpd_ps(lo), _mm256_castpd_ps(hi), _MM_SHUFFLE(2, 0, 2, 0));
  return _mm256_permute4x64_epi64(_mm256_castps_si256(two), _MM_SHUFFLE(3, 1, 2, 0));
}

// StoreFromDouble to bf16 for one panel row (AVX2): element_io.h's RoundToOddFloat literally -
// the nearest-even float, one step towards zero where it is larger in magnitude than the double,
// the last bit set where inexact, NaN as the conversion makes it - then FloatToBf16
// (RoundToBf16X8). The FMA target only because RoundToBf16X8 has it; no FMA is used.
MXMOE_CPU_FMA_TARGET void StoreBf16PanelRowAvx2(const double* acc, uint16_t* out) {
  const __m256d abs_mask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFF));
  __m128 f[2];
  __m256d over[2], inexact[2];
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const __m256d d = _mm256_loadu_pd(acc + 4 * h);
    f[h] = _mm256_cvtpd_ps(d);  // nearest even (MXCSR's default, as static_cast<float>)
    const __m256d back = _mm256_cvtps_pd(f[h]);
    over[h] = _mm256_cmp_pd(_mm256_and_pd(back, abs_mask), _mm256_and_pd(d, abs_mask),
                            _CMP_GT_OQ);
    inexact[h] = _mm256_cmp_pd(back, d, _CMP_NEQ_OQ);  // false for NaN
  }
  __m256i u = _mm256_castps_si256(_mm256_set_m128(f[1], f[0]));
  u = _mm256_add_epi32(u, NarrowMasks(over[0], over[1]));  // -1 where the float is too large
  u = _mm256_or_si256(u, _mm256_and_si256(NarrowMasks(inexact[0], inexact[1]),
                                          _mm256_set1_epi32(1)));
  const __m256i bits = _mm256_srli_epi32(RoundToBf16X8(_mm256_castsi256_ps(u)), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_packus_epi32(_mm256_castsi256_si128(bits),
                                    _mm256_extracti128_si256(bits, 1)));
}

// GCC 12's AVX-512 headers initialise their "undefined" vectors from themselves, which
// -Wuninitialized reports inside target-attribute functions: a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define MXMOE_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

// 2^(s - 127) for a panel's 8 scale bytes of one block, NaN for 0xFF (BFactor bit for bit).
MXMOE_AVX512_TARGET inline __m512d ScaleFactors8(const uint8_t* scales, __m512i nan_bits) {
  const __m512i s64 =
      _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales)));
  const __m512i bits =
      _mm512_slli_epi64(_mm512_add_epi64(s64, _mm512_set1_epi64(1023 - 127)), 52);
  const __mmask8 is_nan = _mm512_cmpeq_epi64_mask(s64, _mm512_set1_epi64(0xFF));
  return _mm512_castsi512_pd(_mm512_mask_blend_epi64(is_nan, bits, nan_bits));
}

// AVX-512 VNNI: the same layout, two 4-element groups per 64-byte register (groups 2s and 2s+1:
// lanes 0-7 and 8-15 = the 8 columns), the A row's matching groups placed by one permute, and
// unsigned-by-signed dot-accumulates straight into int32; the two halves added give the 8
// column dots, then 8 doubles per instruction.
template <int kRows>
MXMOE_AVX512_TARGET void Avx512KernelRows(const uint8_t* panel, int64_t blocks,
                                          const int8_t* a_codes, const double* a_factors,
                                          const int32_t* a_corrections, double* acc) {
  const int64_t k = blocks * kBlock;
  const __m512i nan_bits = _mm512_set1_epi64(NanFactorBits());
  __m512i pick[4];
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {
    pick[s] = _mm512_inserti64x4(_mm512_set1_epi32(2 * s), _mm256_set1_epi32(2 * s + 1), 1);
  }
  __m512d sum[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) sum[r] = _mm512_setzero_pd();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* codes = panel + b * kPanelBlockCodeBytes;
    const __m512d fb = ScaleFactors8(panel + PanelScaleIndex(blocks, b, 0), nan_bits);
    __m512i codes_s[4];
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) codes_s[s] = _mm512_loadu_si512(codes + 64 * s);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512i a = _mm512_castsi256_si512(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a_codes + r * k + b * kBlock)));
      __m512i dot = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        dot = _mm512_dpbusd_epi32(dot, codes_s[s], _mm512_permutexvar_epi32(pick[s], a));
      }
      const __m256i dots = _mm256_sub_epi32(
          _mm256_add_epi32(_mm512_castsi512_si256(dot), _mm512_extracti64x4_epi64(dot, 1)),
          _mm256_set1_epi32(a_corrections[r * blocks + b]));
      const __m512d fa = _mm512_set1_pd(a_factors[r * blocks + b]);
      sum[r] = _mm512_add_pd(sum[r],
                             _mm512_mul_pd(_mm512_cvtepi32_pd(dots), _mm512_mul_pd(fa, fb)));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) _mm512_storeu_pd(acc + r * kPanelCols, sum[r]);
}


// QuantizeBlockPortable on 32 lanes: the same NaN test, the same amax (a maximum is exact), the
// scale rule of format.h (scalar, once per block), the same fp32 products and the 7 threshold
// comparisons of format::FloatToE2M1 as lane masks.
MXMOE_AVX512_TARGET uint8_t QuantizeBlockAvx512(const float* x, uint8_t* packed) {
  const __m512 lo = _mm512_loadu_ps(x);
  const __m512 hi = _mm512_loadu_ps(x + 16);
  if ((_mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q)) != 0) {
    memset(packed, 0, kPackedBlockBytes);
    return format::kScaleNaN;
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const uint8_t scale = format::ScaleFromAmax(amax);
  const __m512 multiplier = _mm512_set1_ps(format::QuantMultiplier(scale));
  __m128i codes[2];
  for (int h = 0; h < 2; ++h) {
    const __m512 v = _mm512_mul_ps(h == 0 ? lo : hi, multiplier);
    const __m512 a = _mm512_abs_ps(v);
    const __m512i one = _mm512_set1_epi32(1);
    __m512i mag = _mm512_setzero_si512();
    mag = _mm512_mask_add_epi32(mag, _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.25f), _CMP_GT_OQ),
                                mag, one);
    mag = _mm512_mask_add_epi32(mag, _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.75f), _CMP_GE_OQ),
                                mag, one);
    mag = _mm512_mask_add_epi32(mag, _mm512_cmp_ps_mask(a, _mm512_set1_ps(1.25f), _CMP_GT_OQ),
                                mag, one);
    mag = _mm512_mask_add_epi32(mag, _mm512_cmp_ps_mask(a, _mm512_set1_ps(1.75f), _CMP_GE_OQ),
                                mag, one);
    mag = _mm512_mask_add_epi32(mag, _mm512_cmp_ps_mask(a, _mm512_set1_ps(2.5f), _CMP_GT_OQ),
                                mag, one);
    mag = _mm512_mask_add_epi32(mag, _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.5f), _CMP_GE_OQ),
                                mag, one);
    mag = _mm512_mask_add_epi32(mag, _mm512_cmp_ps_mask(a, _mm512_set1_ps(5.0f), _CMP_GT_OQ),
                                mag, one);
    const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 28),
                                          _mm512_set1_epi32(8));
    codes[h] = _mm512_cvtepi32_epi8(_mm512_or_si512(mag, sign));
  }
  // Bytes 2i and 2i+1 (elements) -> one byte, element 2i in the low nibble.
  const __m256i pairs = _mm256_set_m128i(codes[1], codes[0]);
  const __m256i merged = _mm256_or_si256(_mm256_and_si256(pairs, _mm256_set1_epi16(0x0F)),
                                         _mm256_slli_epi16(_mm256_srli_epi16(pairs, 8), 4));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(packed), _mm256_cvtepi16_epi8(merged));
  return scale;
}

#pragma GCC diagnostic pop

// StoreFromDouble to bf16 for one panel row of kPanelCols doubles: element_io.h's
// RoundToOddFloat (truncate toward zero, set the last bit when inexact, NaN as the conversion
// makes it) and format.h's FloatToBf16 (activation_simd.h's RoundToBf16X8), on eight lanes.
MXMOE_AVX512_TARGET void StoreBf16PanelRowAvx512(const double* acc, uint16_t* out) {
  const __m512d d = _mm512_loadu_pd(acc);
  const __m256 t = _mm512_cvt_roundpd_ps(d, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __mmask8 ordered = _mm512_cmp_pd_mask(d, d, _CMP_ORD_Q);
  const __mmask8 inexact =
      _mm512_mask_cmp_pd_mask(ordered, _mm512_cvtps_pd(t), d, _CMP_NEQ_UQ);
  __m256i u = _mm256_castps_si256(t);
  u = _mm256_mask_or_epi32(u, inexact, u, _mm256_set1_epi32(1));
  const __m256i bits = _mm256_srli_epi32(RoundToBf16X8(_mm256_castsi256_ps(u)), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtepi32_epi16(bits));
}

// AVX-512 VNNI over two panels at once (16 columns): per block and 4-element group q, the two
// panels' 32 code bytes of group q fill one 64-byte register (lanes 0-7: panel 0's columns, 8-15:
// panel 1's), and each A row's group q, broadcast, meets it in one unsigned-by-signed
// dot-accumulate. After the 8 groups each lane holds its column's block dot: no permute and no
// horizontal reduction (the one-panel kernel needs both), and every A group loaded serves 16
// columns. acc is [rows][16]: panel 0's columns, then panel 1's.
template <int kRows>
MXMOE_AVX512_TARGET void Avx512PairKernelRows(const uint8_t* panel0, const uint8_t* panel1,
                                              int64_t blocks, const int8_t* a_codes,
                                              const double* a_factors,
                                              const int32_t* a_corrections, double* acc) {
  const int64_t k = blocks * kBlock;
  const __m512i nan_bits = _mm512_set1_epi64(NanFactorBits());
  __m512d sum0[kRows];
  __m512d sum1[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) sum0[r] = sum1[r] = _mm512_setzero_pd();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* codes0 = panel0 + b * kPanelBlockCodeBytes;
    const uint8_t* codes1 = panel1 + b * kPanelBlockCodeBytes;
    const __m512d fb0 = ScaleFactors8(panel0 + PanelScaleIndex(blocks, b, 0), nan_bits);
    const __m512d fb1 = ScaleFactors8(panel1 + PanelScaleIndex(blocks, b, 0), nan_bits);
    __m512i dot[kRows];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) dot[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      const __m512i codes_q = _mm512_inserti64x4(
          _mm512_castsi256_si512(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes0 + 32 * q))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes1 + 32 * q)), 1);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const __m512i a_q = _mm512_set1_epi32(Load4(a_codes + r * k + b * kBlock + 4 * q));
        dot[r] = _mm512_dpbusd_epi32(dot[r], codes_q, a_q);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512i dots =
          _mm512_sub_epi32(dot[r], _mm512_set1_epi32(a_corrections[r * blocks + b]));
      const __m512d fa = _mm512_set1_pd(a_factors[r * blocks + b]);
      const __m512d d0 = _mm512_cvtepi32_pd(_mm512_castsi512_si256(dots));
      const __m512d d1 = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(dots, 1));
      sum0[r] = _mm512_add_pd(sum0[r], _mm512_mul_pd(d0, _mm512_mul_pd(fa, fb0)));
      sum1[r] = _mm512_add_pd(sum1[r], _mm512_mul_pd(d1, _mm512_mul_pd(fa, fb1)));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    _mm512_storeu_pd(acc + r * 2 * kPanelCols, sum0[r]);
    _mm512_storeu_pd(acc + r * 2 * kPanelCols + kPanelCols, sum1[r]);
  }
}

void Avx512PairKernel(const uint8_t* panel0, const uint8_t* panel1, int64_t blocks,
                      const int8_t* a_codes, const double* a_factors,
                      const int32_t* a_corrections, int num_rows, double* acc) {
  WithRowCount(num_rows, [&](auto rows) {
    Avx512PairKernelRows<decltype(rows)::value>(panel0, panel1, blocks, a_codes, a_factors,
                                                a_corrections, acc);
  });
}

void Avx512Kernel(const uint8_t* panel, int64_t blocks, const int8_t* a_codes,
                  const double* a_factors, const int32_t* a_corrections, int num_rows,
                  double* acc) {
  WithRowCount(num_rows, [&](auto rows) {
    Avx512KernelRows<decltype(rows)::value>(panel, blocks, a_codes, a_factors, a_corrections,
                                            acc);
  });
}

#endif  // MXMOE_CPU_X86

bool CpuRuns(KernelIsa isa) {
  switch (isa) {
    case KernelIsa::kScalar:
      return true;
#if defined(MXMOE_CPU_X86)
    case KernelIsa::kSse2:
      return true;
    case KernelIsa::kAvx2:
      return __builtin_cpu_supports("avx2");
    case KernelIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512vnni");
#endif
    default:
      return false;
  }
}

KernelIsa ChooseKernelIsa() {
  if (const char* env = getenv("MXMOE_CPU_KERNEL")) {
    for (KernelIsa isa :
         {KernelIsa::kScalar, KernelIsa::kSse2, KernelIsa::kAvx2, KernelIsa::kAvx512}) {
      if (strcmp(env, KernelIsaName(isa)) == 0 && CpuRuns(isa)) return isa;
    }
  }
  for (KernelIsa isa : {KernelIsa::kAvx512, KernelIsa::kAvx2, KernelIsa::kSse2}) {
    if (CpuRuns(isa)) return isa;
  }
  return KernelIsa::kScalar;
}

std::atomic<int> g_forced_isa{-1};

}  // namespace

namespace {

// The vector block quantizer and bf16 epilogue of `isa`, or nullptr where this CPU cannot run
// them (the epilogue's AVX2 form also needs FMA: it shares RoundToBf16X8's target).
QuantizeBlockFn QuantizeBlockFor(KernelIsa isa) {
  if (!CpuRuns(isa)) return nullptr;
#if defined(MXMOE_CPU_X86)
  if (isa == KernelIsa::kAvx512) return QuantizeBlockAvx512;
  if (isa == KernelIsa::kAvx2) return QuantizeBlockAvx2;
#endif
  return nullptr;
}

StoreBf16PanelRowFn StoreBf16PanelRowFor(KernelIsa isa) {
  if (!CpuRuns(isa)) return nullptr;
#if defined(MXMOE_CPU_X86)
  if (isa == KernelIsa::kAvx512) return StoreBf16PanelRowAvx512;
  if (isa == KernelIsa::kAvx2 && __builtin_cpu_supports("fma")) return StoreBf16PanelRowAvx2;
#endif
  return nullptr;
}

}  // namespace

QuantizeBlockFn VectorQuantizeBlock() { return QuantizeBlockFor(SelectedKernelIsa()); }

StoreBf16PanelRowFn VectorStoreBf16PanelRow() { return StoreBf16PanelRowFor(SelectedKernelIsa()); }

namespace internal {
StoreBf16PanelRowFn StoreBf16PanelRowForTesting(KernelIsa isa) {
  return StoreBf16PanelRowFor(isa);
}

QuantizeBlockFn QuantizeBlockForTesting(KernelIsa isa) { return QuantizeBlockFor(isa); }
}  // namespace internal

const char* KernelIsaName(KernelIsa isa) {
  switch (isa) {
    case KernelIsa::kScalar:
      return "scalar";
    case KernelIsa::kSse2:
      return "sse2";
    case KernelIsa::kAvx2:
      return "avx2";
    case KernelIsa::kAvx512:
      return "avx512vnni";
  }
  return "unknown";
}

PanelKernel PanelKernelFor(KernelIsa isa) {
  if (!CpuRuns(isa)) return nullptr;
  switch (isa) {
    case KernelIsa::kScalar:
      return ScalarKernel;
#if defined(MXMOE_CPU_X86)
    case KernelIsa::kSse2:
      return Sse2Kernel;
    case KernelIsa::kAvx2:
      return Avx2Kernel;
    case KernelIsa::kAvx512:
      return Avx512Kernel;
#endif
    default:
      return nullptr;
  }
}

PanelPairKernel PanelPairKernelFor(KernelIsa isa) {
  if (!CpuRuns(isa)) return nullptr;
#if defined(MXMOE_CPU_X86)
  if (isa == KernelIsa::kAvx512) return Avx512PairKernel;
#endif
  return nullptr;
}

bool ActivationUsesFma() {
#if defined(__x86_64__)
  static const bool has_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const KernelIsa isa = SelectedKernelIsa();
  return has_fma && (isa == KernelIsa::kAvx2 || isa == KernelIsa::kAvx512);
#else
  return false;
#endif
}

KernelIsa SelectedKernelIsa() {
  const int forced = g_forced_isa.load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<KernelIsa>(forced);
  static const KernelIsa chosen = ChooseKernelIsa();
  return chosen;
}

namespace internal {
void SetKernelIsaForTesting(KernelIsa isa) {
  g_forced_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
}
void ResetKernelIsaForTesting() { g_forced_isa.store(-1, std::memory_order_relaxed); }
}  // namespace internal

}  // namespace cpu
}  // namespace mxmoe
