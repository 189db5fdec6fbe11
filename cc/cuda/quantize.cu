// Placeholder until the CUDA quantization kernels land (issue 3): every entry point reports
// UNSUPPORTED with a message instead of silently falling back to another backend.
#include "cc/cuda/quantize.h"
#include "cc/src/status.h"

namespace mxmoe {
namespace cuda {
namespace {
mxmoe_status NotYet(const char* op) {
  return Fail(MXMOE_STATUS_UNSUPPORTED, op, ": no CUDA kernel in this build yet (CPU backend only)");
}
}  // namespace

mxmoe_status Quantize(const mxmoe_quantize_args&, void*) { return NotYet("quantize"); }
mxmoe_status Dequantize(const mxmoe_dequantize_args&, void*) { return NotYet("dequantize"); }
mxmoe_status ExpertsQuantize(const mxmoe_experts_quantize_args&, void*) {
  return NotYet("experts_quantize");
}
mxmoe_status SiluMulExpertsQuantize(const mxmoe_silu_mul_experts_quantize_args&, void*) {
  return NotYet("silu_mul_experts_quantize");
}
mxmoe_status SwizzleScales(const mxmoe_swizzle_scales_args&, void*) {
  return NotYet("swizzle_scales");
}
mxmoe_status UnswizzleScales(const mxmoe_swizzle_scales_args&, void*) {
  return NotYet("unswizzle_scales");
}
mxmoe_status QuantizeWeights(const mxmoe_quantize_weights_args&, void*) {
  return NotYet("quantize_weights");
}

}  // namespace cuda
}  // namespace mxmoe
