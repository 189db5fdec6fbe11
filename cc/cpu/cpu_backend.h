// The CPU backend: the bit-exact reference implementation of every mxmoe entry point (the data
// contract of docs/format.md, through mxmoe/format.h). Every function receives arguments
// already validated by cc/src (shapes, dtypes, pointers, offsets, ids), runs synchronously on
// the calling thread plus worker threads (cc/cpu/parallel.h), and writes only its outputs.
//
// Numerics beyond the quantization rule (the reference the CUDA backends are checked against):
//   - GroupedGemm: per 32-block, an exact integer dot of twice-values of the E2M1 codes, times
//     2^(sa + sb - 254 - 2) in double, accumulated over K in double, rounded once to the output
//     dtype (a scale 0xFF makes the element NaN). Essentially the exact product.
//   - MoeForward: see moe_forward.cc's header for routing, order and rounding.
//
// Prepared weights (MXMOE_WEIGHT_FORMAT_PREPARED with backend CPU): the GEMM's decoded B panels
// (panel.h): for each expert, ceil(n / 8) panels of 8 weight rows, each 32-block stored as 256
// bytes of biased twice-values in the kernels' interleaved order, then 8 scale bytes per block;
// E * ceil(n / 8) * (k / 32) * 264 bytes (about 1.03 bytes per weight, 1.9x the LINEAR bytes).
// The GEMM reads it without decoding; LINEAR/SWIZZLED weights are decoded per call.
//
// Threads: parallel.h (a persistent pool, MXMOE_CPU_THREADS). Calls may come from any number of
// threads at once.
#ifndef MXMOE_CPU_CPU_BACKEND_H_
#define MXMOE_CPU_CPU_BACKEND_H_

#include <stddef.h>

#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace cpu {

mxmoe_status Quantize(const mxmoe_quantize_args& args);
mxmoe_status Dequantize(const mxmoe_dequantize_args& args);
mxmoe_status ExpertsQuantize(const mxmoe_experts_quantize_args& args);
mxmoe_status SiluMulExpertsQuantize(const mxmoe_silu_mul_experts_quantize_args& args);
mxmoe_status SwizzleScales(const mxmoe_swizzle_scales_args& args);
mxmoe_status UnswizzleScales(const mxmoe_swizzle_scales_args& args);
mxmoe_status QuantizeWeights(const mxmoe_quantize_weights_args& args);

size_t PrepareWeightsSize(const mxmoe_expert_weights& weights);
mxmoe_status PrepareWeights(const mxmoe_prepare_weights_args& args);

// The CPU GEMM needs no caller workspace (its scratch is host memory allocated per call, before
// anything is written to c: a failed call leaves c untouched).
size_t GroupedGemmWorkspaceSize(const mxmoe_grouped_gemm_args& args);
mxmoe_status GroupedGemm(const mxmoe_grouped_gemm_args& args);

namespace internal {
// Tests only: makes every following GroupedGemm throw std::bad_alloc at `where` until reset with
// kNone (kScratch: the scratch allocation; kDecodeWorker: a worker decoding A).
enum class GemmFailure : int { kNone = 0, kScratch = 1, kDecodeWorker = 2 };
void SetGemmFailureForTesting(GemmFailure where);
}  // namespace internal

mxmoe_status MoeForwardWorkspaceSize(const mxmoe_moe_forward_args& args, size_t* bytes);
mxmoe_status MoeForward(const mxmoe_moe_forward_args& args, void* workspace,
                        size_t workspace_bytes);

}  // namespace cpu
}  // namespace mxmoe

#endif  // MXMOE_CPU_CPU_BACKEND_H_
