// The loop every CPU quantizer shares: rows of K elements -> packed E2M1 rows + one E8M0 scale
// per block, threads over rows. Callers say where a row comes from and where each scale goes.
#ifndef MXMOE_CPU_QUANTIZE_ROWS_H_
#define MXMOE_CPU_QUANTIZE_ROWS_H_

#include <stdint.h>

#include <algorithm>
#include <vector>

#include "cc/cpu/mxfp4_block.h"
#include "cc/cpu/parallel.h"

namespace mxmoe {
namespace cpu {

// For each row r in [0, rows): load_row(r, float* dst) writes its k values as fp32; the codes go
// to packed + r * k/2 and the scale of block b to *scale_address(r, b).
template <typename LoadRow, typename ScaleAddress>
void QuantizeRows(int64_t rows, int64_t k, const LoadRow& load_row, uint8_t* packed,
                  const ScaleAddress& scale_address) {
  if (k == 0) return;
  const int64_t min_rows = std::max<int64_t>(1, (int64_t{1} << 16) / k);
  ParallelFor(rows, min_rows, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(k));
    for (int64_t r = begin; r < end; ++r) {
      load_row(r, row.data());
      uint8_t* packed_row = packed + r * (k / 2);
      for (int64_t b = 0; b < k / kBlock; ++b) {
        *scale_address(r, b) =
            QuantizeBlock(row.data() + b * kBlock, packed_row + b * kPackedBlockBytes);
      }
    }
  });
}

}  // namespace cpu
}  // namespace mxmoe

#endif  // MXMOE_CPU_QUANTIZE_ROWS_H_
