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
// The per-expert quantize behind ExpertsQuantize and SiluMulExpertsQuantize, with the MoE
// forward's two extras (cc/cuda/moe_forward_cuda.cu; internal: its callers have validated the
// arguments):
//   - a gather: sorted row r quantizes input row row_source[r] / slots_per_token (the slot's
//     token; a value outside [0, source_rows) reads row 0, and the row's own metadata decides
//     whether anything is written), so that rows = an upper bound on the sorted rows suffices;
//   - the general activation step: the input rows are [gate | up] (2k wide), an optional w13 bias
//     [E, 2k] is added to both and rounded, then SiLU(gate) * up or SwiGLU-OAI.
enum class ExpertsActivation { kNone, kSiluMul, kGeneral };
struct ExpertsQuantizeJob {
  int64_t rows = 0;
  int64_t k = 0;  // the quantized width
  int32_t num_experts = 0;
  const void* input = nullptr;
  int32_t input_dtype = 0;
  const int32_t* expert_offsets = nullptr;
  const int32_t* blockscale_offsets = nullptr;
  uint8_t* packed = nullptr;
  uint8_t* scales = nullptr;
  int64_t scale_rows = 0;
  int device = 0;
  const int32_t* row_source = nullptr;  // [rows] or NULL
  int32_t slots_per_token = 1;
  int64_t source_rows = 0;
  ExpertsActivation activation = ExpertsActivation::kNone;
  const void* bias = nullptr;  // kGeneral
  int32_t bias_dtype = 0;
  int32_t activation_kind = 0;  // mxmoe_activation
  float swiglu_alpha = 0.0f;
  float swiglu_limit = 0.0f;
};
mxmoe_status ExpertsQuantizeRows(const ExpertsQuantizeJob& job, void* stream);

mxmoe_status SwizzleScales(const mxmoe_swizzle_scales_args& args, void* stream);
mxmoe_status UnswizzleScales(const mxmoe_swizzle_scales_args& args, void* stream);
mxmoe_status QuantizeWeights(const mxmoe_quantize_weights_args& args, void* stream);

}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_QUANTIZE_H_
