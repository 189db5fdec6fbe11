// Element access for the CPU backend: loads and stores of bf16/fp16/fp32/int32 at any byte
// address (through memcpy, so the CPU backend needs no pointer alignment), and the single
// rounding of a double result to an output dtype.
//
// Every conversion goes through mxmoe/format.h, the contract shared with the CUDA kernels.
#ifndef MXMOE_CPU_ELEMENT_IO_H_
#define MXMOE_CPU_ELEMENT_IO_H_

#include <stdint.h>
#include <string.h>

#include <cmath>

#include "mxmoe/format.h"
#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace cpu {

inline uint16_t LoadU16(const void* base, int64_t index) {
  uint16_t v;
  memcpy(&v, static_cast<const uint8_t*>(base) + index * 2, 2);
  return v;
}

inline void StoreU16(void* base, int64_t index, uint16_t v) {
  memcpy(static_cast<uint8_t*>(base) + index * 2, &v, 2);
}

inline int32_t LoadI32(const int32_t* base, int64_t index) {
  int32_t v;
  memcpy(&v, reinterpret_cast<const uint8_t*>(base) + index * 4, 4);
  return v;
}

inline void StoreI32(int32_t* base, int64_t index, int32_t v) {
  memcpy(reinterpret_cast<uint8_t*>(base) + index * 4, &v, 4);
}

inline float LoadF32(const float* base, int64_t index) {
  float v;
  memcpy(&v, reinterpret_cast<const uint8_t*>(base) + index * 4, 4);
  return v;
}

inline void StoreF32(float* base, int64_t index, float v) {
  memcpy(reinterpret_cast<uint8_t*>(base) + index * 4, &v, 4);
}

// Element `index` of a bf16/fp16/fp32 array as fp32 (exact for every dtype).
inline float LoadAsFloat(const void* base, int32_t dtype, int64_t index) {
  switch (dtype) {
    case MXMOE_DTYPE_BF16:
      return format::Bf16ToFloat(LoadU16(base, index));
    case MXMOE_DTYPE_FP16:
      return format::Fp16ToFloat(LoadU16(base, index));
    default:
      return LoadF32(static_cast<const float*>(base), index);
  }
}

// `count` consecutive elements starting at `index`, as fp32.
inline void LoadRowAsFloat(const void* base, int32_t dtype, int64_t index, int64_t count,
                           float* out) {
  if (dtype == MXMOE_DTYPE_BF16) {
    for (int64_t i = 0; i < count; ++i) out[i] = format::Bf16ToFloat(LoadU16(base, index + i));
  } else if (dtype == MXMOE_DTYPE_FP16) {
    for (int64_t i = 0; i < count; ++i) out[i] = format::Fp16ToFloat(LoadU16(base, index + i));
  } else {
    memcpy(out, static_cast<const uint8_t*>(base) + index * 4, static_cast<size_t>(count) * 4);
  }
}

// fp32 value rounded (nearest even) to `dtype` and back: what storing it would keep.
inline float RoundToDtype(float v, int32_t dtype) {
  if (dtype == MXMOE_DTYPE_BF16) return format::Bf16ToFloat(format::FloatToBf16(v));
  if (dtype == MXMOE_DTYPE_FP16) return format::Fp16ToFloat(format::FloatToFp16(v));
  return v;
}

// Stores fp32 `v` at element `index`, rounded to nearest even in `dtype`.
inline void StoreFromFloat(void* base, int32_t dtype, int64_t index, float v) {
  if (dtype == MXMOE_DTYPE_BF16) {
    StoreU16(base, index, format::FloatToBf16(v));
  } else if (dtype == MXMOE_DTYPE_FP16) {
    StoreU16(base, index, format::FloatToFp16(v));
  } else {
    StoreF32(static_cast<float*>(base), index, v);
  }
}

// double -> float rounded to odd: truncate towards zero, then set the last bit if anything was
// cut off. Rounding that result to nearest-even in a format at least 2 bits narrower (bf16,
// fp16) equals rounding the double directly, so GEMM results are rounded exactly once.
inline float RoundToOddFloat(double d) {
  float f = static_cast<float>(d);
  if (std::isnan(d) || static_cast<double>(f) == d) return f;
  uint32_t bits = format::FloatBits(f);
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) bits -= 1;  // one step towards zero
  return format::BitsFloat(bits | 1u);
}

// Stores double `v` rounded once (nearest even) to bf16/fp16 (fp32: rounded to nearest even).
inline void StoreFromDouble(void* base, int32_t dtype, int64_t index, double v) {
  if (dtype == MXMOE_DTYPE_FP32) {
    StoreF32(static_cast<float*>(base), index, static_cast<float>(v));
  } else {
    StoreFromFloat(base, dtype, index, RoundToOddFloat(v));
  }
}

// memset that accepts a NULL pointer for an empty range (memset(NULL, 0, 0) is undefined).
inline void ZeroBytes(void* ptr, int64_t bytes) {
  if (bytes > 0) memset(ptr, 0, static_cast<size_t>(bytes));
}

inline int64_t DtypeBytes(int32_t dtype) { return dtype == MXMOE_DTYPE_FP32 ? 4 : 2; }

}  // namespace cpu
}  // namespace mxmoe

#endif  // MXMOE_CPU_ELEMENT_IO_H_
