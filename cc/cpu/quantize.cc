// CPU quantize / dequantize of rows, per-expert activation quantization and the fused
// SiLU-and-mul + per-expert quantization. Arguments arrive validated by cc/src; the rule itself
// is format.h's (through cc/cpu/mxfp4_block.h).
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "cc/cpu/activation_simd.h"
#include "cc/cpu/cpu_backend.h"
#include "cc/cpu/element_io.h"
#include "cc/cpu/mxfp4_block.h"
#include "cc/cpu/panel.h"
#include "cc/cpu/parallel.h"
#include "cc/cpu/quantize_rows.h"

namespace mxmoe {
namespace cpu {
namespace {

// Quantizes rows [0, expert_offsets[E]) that `load_row` produces (k values each) into `packed`
// and per-expert swizzled scales: expert e's [m_e, k/32] scale matrix starts at scale row
// blockscale_offsets[e]. Its padding bytes, and only those of scale rows below
// blockscale_offsets[E], are written 0.
template <typename LoadRow>
void QuantizeGroupedRows(int64_t k, int32_t num_experts, const int32_t* expert_offsets,
                         const int32_t* blockscale_offsets, const LoadRow& load_row,
                         uint8_t* packed, uint8_t* scales) {
  std::vector<int64_t> offsets(num_experts + 1);
  std::vector<int64_t> scale_offsets(num_experts + 1);
  for (int32_t e = 0; e <= num_experts; ++e) {
    offsets[e] = LoadI32(expert_offsets, e);
    scale_offsets[e] = LoadI32(blockscale_offsets, e);
  }
  const int64_t scale_cols = k / kBlock;
  const int64_t padded_cols = format::RoundUp(scale_cols, format::kSwizzleCols);
  ZeroBytes(scales, scale_offsets[num_experts] * padded_cols);
  auto scale_address = [&](int64_t row, int64_t block) {
    const int64_t e =
        std::upper_bound(offsets.begin(), offsets.end(), row) - offsets.begin() - 1;
    return scales + scale_offsets[e] * padded_cols +
           format::SwizzledOffset(row - offsets[e], block, scale_cols);
  };
  QuantizeRows(offsets[num_experts], k, load_row, packed, scale_address);
}

}  // namespace

mxmoe_status Quantize(const mxmoe_quantize_args& args) {
  const int64_t scale_cols = args.k / kBlock;
  if (args.scale_layout == MXMOE_SCALE_LAYOUT_SWIZZLED_128X4) {
    ZeroBytes(args.scales, format::SwizzledBytes(args.rows, scale_cols));
  }
  auto load_row = [&](int64_t row, float* out) {
    LoadRowAsFloat(args.input, args.input_dtype, row * args.k, args.k, out);
  };
  auto scale_address = [&](int64_t row, int64_t block) {
    return args.scales + ScaleIndex(args.scale_layout, row, block, scale_cols);
  };
  QuantizeRows(args.rows, args.k, load_row, args.packed, scale_address);
  return MXMOE_STATUS_OK;
}

mxmoe_status Dequantize(const mxmoe_dequantize_args& args) {
  const int64_t k = args.k;
  if (k == 0) return MXMOE_STATUS_OK;
  const int64_t scale_cols = k / kBlock;
  const int64_t min_rows = std::max<int64_t>(1, (int64_t{1} << 16) / k);
  ParallelFor(args.rows, min_rows, [&](int64_t begin, int64_t end) {
    float values[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < scale_cols; ++b) {
        const uint8_t scale = args.scales[ScaleIndex(args.scale_layout, r, b, scale_cols)];
        DequantizeBlock(args.packed + r * (k / 2) + b * kPackedBlockBytes, scale, values);
        for (int i = 0; i < kBlock; ++i) {
          StoreFromFloat(args.output, args.output_dtype, r * k + b * kBlock + i, values[i]);
        }
      }
    }
  });
  return MXMOE_STATUS_OK;
}

mxmoe_status ExpertsQuantize(const mxmoe_experts_quantize_args& args) {
  auto load_row = [&](int64_t row, float* out) {
    LoadRowAsFloat(args.input, args.input_dtype, row * args.k, args.k, out);
  };
  QuantizeGroupedRows(args.k, args.num_experts, args.expert_offsets, args.blockscale_offsets,
                      load_row, args.packed, args.scales);
  return MXMOE_STATUS_OK;
}

// y = silu(gate) * up in fp32, rounded to the input dtype: the value a separate silu-and-mul
// kernel would have stored before quantizing. One body, compiled twice (panel.h,
// ActivationUsesFma): the same bits either way.
__attribute__((always_inline)) inline void SiluMulRowBody(const void* input, int32_t dtype,
                                                          int64_t row, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const float gate = LoadAsFloat(input, dtype, row * 2 * n + j);
    const float up = LoadAsFloat(input, dtype, row * 2 * n + n + j);
    out[j] = RoundToDtype(MXMOE_MUL(format::SiluF32(gate), up), dtype);
  }
}

void SiluMulRow(const void* input, int32_t dtype, int64_t row, int64_t n, float* out) {
  SiluMulRowBody(input, dtype, row, n, out);
}

MXMOE_CPU_FMA_TARGET void SiluMulRowFma(const void* input, int32_t dtype, int64_t row, int64_t n,
                                        float* out) {
#if defined(__x86_64__)
  if (dtype == MXMOE_DTYPE_BF16) {  // eight lanes at a time (activation_simd.h)
    const uint16_t* in = static_cast<const uint16_t*>(input) + row * 2 * n;
    SiluMulBf16Row(in, in + n, n, out);
    return;
  }
#endif
  SiluMulRowBody(input, dtype, row, n, out);
}

mxmoe_status SiluMulExpertsQuantize(const mxmoe_silu_mul_experts_quantize_args& args) {
  const int64_t n = args.n;
  const auto row_fn = ActivationUsesFma() ? SiluMulRowFma : SiluMulRow;
  auto load_row = [&](int64_t row, float* out) {
    row_fn(args.input, args.input_dtype, row, n, out);
  };
  QuantizeGroupedRows(n, args.num_experts, args.expert_offsets, args.blockscale_offsets,
                      load_row, args.packed, args.scales);
  return MXMOE_STATUS_OK;
}

}  // namespace cpu
}  // namespace mxmoe
