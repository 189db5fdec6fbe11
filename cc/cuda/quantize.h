// CUDA quantization kernels (quantize, dequantize, per-expert quantize, fused SiLU-and-mul +
// per-expert quantize, scale swizzling, weight quantization). Every function receives arguments
// already validated by cc/src (shapes, dtypes, null pointers, device) and a cudaStream_t as
// void*; it launches asynchronously, allocates nothing and never synchronises.
#ifndef MXMOE_CUDA_QUANTIZE_H_
#define MXMOE_CUDA_QUANTIZE_H_

#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace cuda {

mxmoe_status Quantize(const mxmoe_quantize_args& args, void* stream);
mxmoe_status Dequantize(const mxmoe_dequantize_args& args, void* stream);
mxmoe_status ExpertsQuantize(const mxmoe_experts_quantize_args& args, void* stream);
mxmoe_status SiluMulExpertsQuantize(const mxmoe_silu_mul_experts_quantize_args& args,
                                    void* stream);
mxmoe_status SwizzleScales(const mxmoe_swizzle_scales_args& args, void* stream);
mxmoe_status UnswizzleScales(const mxmoe_swizzle_scales_args& args, void* stream);
mxmoe_status QuantizeWeights(const mxmoe_quantize_weights_args& args, void* stream);

}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_QUANTIZE_H_
