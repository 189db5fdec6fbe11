// CPU conversion of batched E8M0 scale matrices between the LINEAR and SWIZZLED_128X4 layouts.
// Swizzle writes every byte of each padded [round_up(rows,128), round_up(cols,4)] matrix (padding
// as 0); unswizzle reads only the unpadded positions.
#include <stdint.h>

#include <algorithm>

#include "cc/cpu/cpu_backend.h"
#include "cc/cpu/parallel.h"
#include "mxmoe/format.h"

namespace mxmoe {
namespace cpu {

mxmoe_status SwizzleScales(const mxmoe_swizzle_scales_args& args) {
  const int64_t rows = args.rows;
  const int64_t cols = args.cols;
  const int64_t padded_rows = format::RoundUp(rows, format::kSwizzleRows);
  const int64_t padded_cols = format::RoundUp(cols, format::kSwizzleCols);
  const int64_t swizzled_bytes = padded_rows * padded_cols;
  // One item = one padded row of one matrix; the swizzle is a bijection onto the padded matrix.
  const int64_t items = args.batch * padded_rows;
  ParallelFor(items, std::max<int64_t>(1, 4096 / std::max<int64_t>(padded_cols, 1)),
              [&](int64_t begin, int64_t end) {
                for (int64_t item = begin; item < end; ++item) {
                  const int64_t b = item / padded_rows;
                  const int64_t r = item % padded_rows;
                  const uint8_t* in = args.input + b * rows * cols + r * cols;
                  uint8_t* out = args.output + b * swizzled_bytes;
                  for (int64_t c = 0; c < padded_cols; ++c) {
                    out[format::SwizzledOffset(r, c, cols)] =
                        (r < rows && c < cols) ? in[c] : uint8_t{0};
                  }
                }
              });
  return MXMOE_STATUS_OK;
}

mxmoe_status UnswizzleScales(const mxmoe_swizzle_scales_args& args) {
  const int64_t rows = args.rows;
  const int64_t cols = args.cols;
  const int64_t swizzled_bytes = format::SwizzledBytes(rows, cols);
  const int64_t items = args.batch * rows;
  ParallelFor(items, std::max<int64_t>(1, 4096 / std::max<int64_t>(cols, 1)),
              [&](int64_t begin, int64_t end) {
                for (int64_t item = begin; item < end; ++item) {
                  const int64_t b = item / rows;
                  const int64_t r = item % rows;
                  const uint8_t* in = args.input + b * swizzled_bytes;
                  uint8_t* out = args.output + b * rows * cols + r * cols;
                  for (int64_t c = 0; c < cols; ++c) {
                    out[c] = in[format::SwizzledOffset(r, c, cols)];
                  }
                }
              });
  return MXMOE_STATUS_OK;
}

}  // namespace cpu
}  // namespace mxmoe
