// CPU expert-weight quantization ([E, n, k] bf16/fp16 -> MXFP4, LINEAR or per-expert swizzled
// scales) and the CPU's PREPARED format: the GEMM's decoded B panels (panel.h), written once.
#include <stdint.h>
#include <string.h>

#include "cc/cpu/cpu_backend.h"
#include "cc/cpu/element_io.h"
#include "cc/cpu/mxfp4_block.h"
#include "cc/cpu/panel.h"
#include "cc/cpu/parallel.h"
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
  // E * ceil(n / 8) panels of PanelBytes(k / 32) bytes; saturates (no buffer can be that large).
  const uint64_t panels =
      static_cast<uint64_t>(weights.num_experts) * static_cast<uint64_t>((weights.n + 7) / 8);
  const uint64_t panel_bytes = static_cast<uint64_t>(PanelBytes(weights.k / kBlock));
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(panels, panel_bytes, &bytes) || bytes > SIZE_MAX) return SIZE_MAX;
  return static_cast<size_t>(bytes);
}

mxmoe_status PrepareWeights(const mxmoe_prepare_weights_args& args) {
  const mxmoe_expert_weights& w = args.weights;
  if (w.k == 0) return MXMOE_STATUS_OK;  // no panel bytes at all
  const int64_t panels = (w.n + kPanelCols - 1) / kPanelCols;
  const int64_t panel_bytes = PanelBytes(w.k / kBlock);
  ParallelFor(int64_t{w.num_experts} * panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      DecodePanel(w, i / panels, i % panels, args.prepared + i * panel_bytes);
    }
  });
  return MXMOE_STATUS_OK;
}

}  // namespace cpu
}  // namespace mxmoe
