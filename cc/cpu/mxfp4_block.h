// One MXFP4 block (32 elements along K) on the CPU: quantize (the contract's rule, via format.h),
// decode, and the double scale factors of the GEMM. Every CPU entry point that produces or reads
// MXFP4 goes through these functions (the GEMM's decoded layouts are in panel.h).
#ifndef MXMOE_CPU_MXFP4_BLOCK_H_
#define MXMOE_CPU_MXFP4_BLOCK_H_

#include <stdint.h>
#include <string.h>

#include <cmath>
#include <limits>

#include "mxmoe/format.h"
#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace cpu {

constexpr int kBlock = format::kBlockSize;        // 32 elements
constexpr int kPackedBlockBytes = kBlock / 2;     // 16 bytes of E2M1 codes

// The vector form of QuantizeBlockPortable (panel_kernels.cc) for the selected panel kernel's
// instruction set (AVX-512 or AVX2), or nullptr for SSE2 and the portable loop: same bits,
// checked by tests/cc/cpu_kernels_test.cc.
using QuantizeBlockFn = uint8_t (*)(const float* x, uint8_t* packed);
QuantizeBlockFn VectorQuantizeBlock();

// Quantizes x[0..31] into packed[0..15] (element 2i in the low nibble) and returns the E8M0
// scale byte. A block holding a NaN: scale 0xFF and all 16 bytes 0. Otherwise the rule of
// format.h literally: +-Inf makes amax Inf, hence scale 253, and saturates to +-6.
inline uint8_t QuantizeBlockPortable(const float* x, uint8_t* packed) {
  float amax = 0.0f;
  bool has_nan = false;
  for (int i = 0; i < kBlock; ++i) {
    if (format::IsNaN(x[i])) has_nan = true;
    const float a = std::fabs(x[i]);
    amax = a > amax ? a : amax;
  }
  if (has_nan) {
    memset(packed, 0, kPackedBlockBytes);
    return format::kScaleNaN;
  }
  const uint8_t scale = format::ScaleFromAmax(amax);
  // 2^(127 - scale), exact products; 0 for scale 0 (signed zeros, vLLM's rule).
  const float multiplier = format::QuantMultiplier(scale);
  for (int i = 0; i < kPackedBlockBytes; ++i) {
    const uint8_t lo = format::FloatToE2M1(MXMOE_MUL(x[2 * i], multiplier));
    const uint8_t hi = format::FloatToE2M1(MXMOE_MUL(x[2 * i + 1], multiplier));
    packed[i] = static_cast<uint8_t>(lo | (hi << 4));
  }
  return scale;
}

inline uint8_t QuantizeBlock(const float* x, uint8_t* packed) {
  static const QuantizeBlockFn vector = VectorQuantizeBlock();
  return vector != nullptr ? vector(x, packed) : QuantizeBlockPortable(x, packed);
}

// Decodes a block to fp32: code value * 2^(scale - 127), one fp32 multiply (exact unless it
// overflows to Inf; scale 0xFF gives NaN).
inline void DequantizeBlock(const uint8_t* packed, uint8_t scale, float* out) {
  const float scale_value = format::ScaleToFloat(scale);
  for (int i = 0; i < kPackedBlockBytes; ++i) {
    out[2 * i] = MXMOE_MUL(format::E2M1ToFloat(packed[i] & 0xF), scale_value);
    out[2 * i + 1] = MXMOE_MUL(format::E2M1ToFloat(packed[i] >> 4), scale_value);
  }
}

// 2^(s - 127) * multiplier in double for every scale byte s (exact), quiet NaN for 0xFF.
struct ScaleFactorTable {
  double value[256];
  explicit ScaleFactorTable(double multiplier) {
    for (int s = 0; s < 255; ++s) value[s] = std::ldexp(multiplier, s - 127);
    value[255] = std::numeric_limits<double>::quiet_NaN();
  }
};

// The GEMM's factor of an A block: 2^(s - 127) / 4 (the 1/4 turns a product of twice-values back
// into a product of values).
inline double AFactor(uint8_t scale) {
  static const ScaleFactorTable table(0.25);
  return table.value[scale];
}
// The GEMM's factor of a B block: 2^(s - 127).
inline double BFactor(uint8_t scale) {
  static const ScaleFactorTable table(1.0);
  return table.value[scale];
}

// Byte index of scale (row, col) of one [rows, cols] scale matrix in `layout`.
inline int64_t ScaleIndex(int32_t layout, int64_t row, int64_t col, int64_t cols) {
  return layout == MXMOE_SCALE_LAYOUT_LINEAR ? row * cols + col
                                             : format::SwizzledOffset(row, col, cols);
}

// Bytes of one [rows, cols] scale matrix in `layout` (swizzled: padding included).
inline int64_t ScaleMatrixBytes(int32_t layout, int64_t rows, int64_t cols) {
  return layout == MXMOE_SCALE_LAYOUT_LINEAR ? rows * cols : format::SwizzledBytes(rows, cols);
}

}  // namespace cpu
}  // namespace mxmoe

#endif  // MXMOE_CPU_MXFP4_BLOCK_H_
