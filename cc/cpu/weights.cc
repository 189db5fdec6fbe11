// CPU expert-weight quantization ([E, n, k] bf16/fp16 -> MXFP4, LINEAR or per-expert swizzled
// scales) and the CPU's PREPARED format (LINEAR codes, then LINEAR scales, in one buffer; see
// cpu_backend.h).
#include <stdint.h>
#include <string.h>

#include "cc/cpu/cpu_backend.h"
#include "cc/cpu/element_io.h"
#include "cc/cpu/mxfp4_block.h"
#include "cc/cpu/quantize_rows.h"

namespace mxmoe {
namespace cpu {

mxmoe_status QuantizeWeights(const mxmoe_quantize_weights_args& args) {
  const int64_t n = args.n;
  const int64_t k = args.k;
  const int64_t scale_cols = k / kBlock;
  const int64_t expert_scale_bytes = ScaleMatrixBytes(args.scale_layout, n, scale_cols);
  if (args.scale_layout == MXMOE_SCALE_LAYOUT_SWIZZLED_128X4) {
    ZeroBytes(args.scales, args.num_experts * expert_scale_bytes);
  }
  // Rows of all experts are one [E * n, k] matrix; only the scale address is per expert.
  auto load_row = [&](int64_t row, float* out) {
    LoadRowAsFloat(args.weights, args.weights_dtype, row * k, k, out);
  };
  auto scale_address = [&](int64_t row, int64_t block) {
    const int64_t e = row / n;
    return args.scales + e * expert_scale_bytes +
           ScaleIndex(args.scale_layout, row % n, block, scale_cols);
  };
  QuantizeRows(args.num_experts * n, k, load_row, args.packed, scale_address);
  return MXMOE_STATUS_OK;
}

size_t PrepareWeightsSize(const mxmoe_expert_weights& weights) {
  const int64_t rows = int64_t{weights.num_experts} * weights.n;
  return static_cast<size_t>(rows * (weights.k / 2 + weights.k / kBlock));
}

mxmoe_status PrepareWeights(const mxmoe_prepare_weights_args& args) {
  const mxmoe_expert_weights& w = args.weights;
  const int64_t rows = int64_t{w.num_experts} * w.n;
  const int64_t packed_bytes = rows * (w.k / 2);
  if (packed_bytes > 0) memcpy(args.prepared, w.packed, static_cast<size_t>(packed_bytes));
  const int64_t scale_bytes = rows * (w.k / kBlock);
  if (scale_bytes > 0) {
    memcpy(args.prepared + packed_bytes, w.scales, static_cast<size_t>(scale_bytes));
  }
  return MXMOE_STATUS_OK;
}

}  // namespace cpu
}  // namespace mxmoe
