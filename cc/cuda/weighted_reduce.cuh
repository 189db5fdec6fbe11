// The MoE layer's last step, out[t] = sum over t's slots of w * (y [+ w2 bias, rounded]), as one
// device function with two callers: the WeightedReduceKernel of cc/cuda/moe_forward_cuda.cu (one
// thread per 8 outputs, every T) and the CUDA-core GEMM's fused epilogue
// (cc/cuda/grouped_gemm_sm90_gemv.cu, few rows: the last CTA of a weight panel reduces that
// panel's columns). One home for the arithmetic keeps the two bit-identical: fp32, the slots in
// order, each product and each sum rounded separately (MXMOE_MUL / MXMOE_ADD), a slot's bias
// added to its y and rounded to the activation dtype first, one final rounding to that dtype
// (docs/format.md, "MoE forward").
#ifndef MXMOE_CUDA_WEIGHTED_REDUCE_CUH_
#define MXMOE_CUDA_WEIGHTED_REDUCE_CUH_

#include <stdint.h>

#include "cc/cuda/quantize_device.cuh"
#include "cc/cuda/weighted_reduce.h"
#include "mxmoe/format.h"

namespace mxmoe {
namespace cuda {

// The 8 outputs [column, column + 8) of one token. `row_of(s)` is slot s's sorted row (< 0: skip
// it), `weight_of(s)` its weight, `y_of(s, row)` its 8 y values as a Lane8 and `bias_of(s, j)` the
// bias of column + j for slot s as fp32 (called only with a bias): the callers fetch these from
// global or shared memory; the arithmetic here is the same for both.
template <typename T, typename RowOf, typename WeightOf, typename YOf, typename BiasOf>
__device__ __forceinline__ uint4 ReduceEight(int slots_per_token, bool with_bias, RowOf row_of,
                                             WeightOf weight_of, YOf y_of, BiasOf bias_of) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int s = 0; s < slots_per_token; ++s) {
    const int32_t row = row_of(s);
    if (row < 0) continue;
    const float w = weight_of(s);
    const quant::Lane8 y = y_of(s, row);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float v = quant::Element<T>(y, j);
      if (with_bias) v = quant::RoundTo<T>(MXMOE_ADD(v, bias_of(s, j)));
      acc[j] = MXMOE_ADD(acc[j], MXMOE_MUL(w, v));
    }
  }
  uint4 result;
  result.x = T::FromFloat2(acc[0], acc[1]);
  result.y = T::FromFloat2(acc[2], acc[3]);
  result.z = T::FromFloat2(acc[4], acc[5]);
  result.w = T::FromFloat2(acc[6], acc[7]);
  return result;
}

}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_WEIGHTED_REDUCE_CUH_
