// CUDA quantization kernels (quantize, dequantize, per-expert quantize, fused SiLU-and-mul +
// per-expert quantize, scale swizzling, weight quantization). Every function receives arguments
// already validated by cc/src (shapes, dtypes, null pointers, device) and a cudaStream_t as
// void*; it launches asynchronously, allocates nothing and never synchronises.
#ifndef MXMOE_CUDA_QUANTIZE_H_
#define MXMOE_CUDA_QUANTIZE_H_

#include <stdint.h>

#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace cuda {

// Limits of these kernels beyond the public contract (CUTLASS's can_implement), asked by
// cc/src/validate.cc for every call; the entry points below do not check again. Host code with
// no CUDA call. `op` names the operation in the message.
//   rows of k elements (quantize, dequantize, quantize_weights; k = n for the fused SiLU):
mxmoe_status CanImplementRowQuantize(const char* op, int64_t k);
//   experts_quantize / silu_mul_experts_quantize: also the expert count.
mxmoe_status CanImplementExpertsQuantize(const char* op, int64_t k, int32_t num_experts);


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
