// CPU grouped GEMM (NT, MXFP4 x MXFP4 -> bf16/fp16/fp32): c[rows of e] = A[rows of e] x B[e]^T.
//
// Numerics (the reference every GPU GEMM is checked against): for each 32-element block the dot
// product of the codes' twice-values (integers in [-12, 12]) is computed exactly in int32, scaled
// by 2^(sa - 127) * 2^(sb - 127) / 4 in double (exact: a power of two times an integer below
// 2^13), and accumulated over K in double in block order; the sum is rounded once to the output
// dtype (round-to-odd to fp32, then nearest-even, see element_io.h). A scale byte 0xFF is NaN.
//
// Work: A is decoded once per call (panel.h's decoded A, all rows, in parallel). B is read as
// panels of 8 output columns: straight from PREPARED weights (prepare_weights stores them
// decoded), or decoded per call from LINEAR/SWIZZLED weights into per-thread scratch. Each
// expert's output is cut into items of up to kItemRows rows x kItemPanels panels; a panel kernel
// (panel.h: portable, SSE2, AVX2 or AVX-512 VNNI, chosen at run time, identical bits) computes up
// to 4 rows x 8 columns at a time, or 4 rows x 16 columns (two panels) where a pair kernel exists
// (AVX-512 VNNI).
//
// Failure: every allocation (offsets, items, decoded A, panel scratch) and every step that can
// throw happens before the first write to c; the compute phase allocates nothing and throws
// nothing, so a failed call (status INTERNAL, "out of host memory") leaves c untouched.
#include <stdint.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <vector>

#include "cc/cpu/cpu_backend.h"
#include "cc/cpu/element_io.h"
#include "cc/cpu/mxfp4_block.h"
#include "cc/cpu/panel.h"
#include "cc/cpu/parallel.h"
#include "mxmoe/format.h"

namespace mxmoe {
namespace cpu {
namespace {

constexpr int64_t kItemRows = 128;  // A rows per item (panels decoded per call are reused)
constexpr int64_t kItemPanels = 8;  // panels (64 output columns) per item

std::atomic<int> g_failure_for_testing{0};

void MaybeFailForTesting(internal::GemmFailure where) {
  if (g_failure_for_testing.load(std::memory_order_relaxed) == static_cast<int>(where)) {
    throw std::bad_alloc();
  }
}

// Where expert e's LINEAR/SWIZZLED weight row j and its scales live.
class WeightView {
 public:
  explicit WeightView(const mxmoe_expert_weights& w)
      : packed_(w.packed),
        scales_(w.scales),
        swizzled_(w.format == MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4),
        n_(w.n),
        k_(w.k),
        scale_cols_(w.k / kBlock) {
    expert_scale_bytes_ = swizzled_ ? format::SwizzledBytes(n_, scale_cols_) : n_ * scale_cols_;
  }
  const uint8_t* Row(int64_t e, int64_t j) const { return packed_ + (e * n_ + j) * (k_ / 2); }
  uint8_t Scale(int64_t e, int64_t j, int64_t block) const {
    const int64_t within = swizzled_ ? format::SwizzledOffset(j, block, scale_cols_)
                                     : j * scale_cols_ + block;
    return scales_[e * expert_scale_bytes_ + within];
  }

 private:
  const uint8_t* packed_;
  const uint8_t* scales_;
  bool swizzled_;
  int64_t n_;
  int64_t k_;
  int64_t scale_cols_;
  int64_t expert_scale_bytes_;
};

struct WorkItem {
  int32_t expert;
  int64_t row_begin;    // within the expert
  int64_t panel_begin;  // within the expert
};

}  // namespace

namespace internal {
void SetGemmFailureForTesting(GemmFailure where) {
  g_failure_for_testing.store(static_cast<int>(where), std::memory_order_relaxed);
}
}  // namespace internal

void DecodePanel(const mxmoe_expert_weights& w, int64_t expert, int64_t panel, uint8_t* out) {
  const WeightView view(w);
  const int64_t blocks = w.k / kBlock;
  for (int c = 0; c < kPanelCols; ++c) {
    const int64_t j = panel * kPanelCols + c;
    if (j >= w.n) {
      PadPanelColumn(blocks, c, out);
      continue;
    }
    DecodePanelColumn(
        view.Row(expert, j), blocks, [&](int64_t b) { return view.Scale(expert, j, b); }, c, out);
  }
}

size_t GroupedGemmWorkspaceSize(const mxmoe_grouped_gemm_args&) { return 0; }

mxmoe_status GroupedGemm(const mxmoe_grouped_gemm_args& args) {
  const int64_t n = args.n;
  const int64_t k = args.k;
  const int64_t blocks = k / kBlock;
  const int64_t padded_scale_cols = format::RoundUp(blocks, format::kSwizzleCols);
  const int32_t num_experts = args.num_experts;
  std::vector<int64_t> offsets(num_experts + 1);
  std::vector<int64_t> scale_offsets(num_experts + 1);
  for (int32_t e = 0; e <= num_experts; ++e) {
    offsets[e] = LoadI32(args.expert_offsets, e);
    scale_offsets[e] = LoadI32(args.blockscale_offsets, e);
  }
  const int64_t rows = offsets[num_experts];
  if (k == 0) {  // empty sums: every output element is +0
    for (int64_t i = 0; i < rows * n; ++i) StoreFromDouble(args.c, args.c_dtype, i, 0.0);
    return MXMOE_STATUS_OK;
  }

  // Every allocation of the call, before anything is written to c.
  const int64_t panels = (n + kPanelCols - 1) / kPanelCols;
  const bool prepared = args.b.format == MXMOE_WEIGHT_FORMAT_PREPARED;
  std::vector<WorkItem> items;
  for (int32_t e = 0; e < num_experts; ++e) {
    for (int64_t r = 0; r < offsets[e + 1] - offsets[e]; r += kItemRows) {
      for (int64_t p = 0; p < panels; p += kItemPanels) items.push_back({e, r, p});
    }
  }
  MaybeFailForTesting(internal::GemmFailure::kScratch);
  std::vector<int8_t> a_codes(static_cast<size_t>(rows * k));
  std::vector<double> a_factors(static_cast<size_t>(rows * blocks));
  std::vector<int32_t> a_corrections(static_cast<size_t>(rows * blocks));
  const int64_t panel_bytes = PanelBytes(blocks);
  std::vector<uint8_t> panel_scratch;
  if (!prepared) {
    panel_scratch.resize(static_cast<size_t>(MaxThreads() * kItemPanels * panel_bytes));
  }

  // Decoded A (writes only scratch; may throw like the allocations above).
  ParallelFor(rows, 16, [&](int64_t begin, int64_t end) {
    MaybeFailForTesting(internal::GemmFailure::kDecodeWorker);
    int32_t e = static_cast<int32_t>(
        std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1);
    for (int64_t row = begin; row < end; ++row) {
      while (row >= offsets[e + 1]) ++e;
      const int64_t i = row - offsets[e];  // row within the expert
      const uint8_t* scales = args.a_scales + scale_offsets[e] * padded_scale_cols;
      DecodeARow(
          args.a + row * (k / 2), blocks,
          [&](int64_t b) { return scales[format::SwizzledOffset(i, b, blocks)]; },
          &a_codes[row * k], &a_factors[row * blocks], &a_corrections[row * blocks]);
    }
  });

  // Compute: no allocation, nothing that throws, from here on.
  const PanelKernel kernel = PanelKernelFor(SelectedKernelIsa());
  const PanelPairKernel pair_kernel = PanelPairKernelFor(SelectedKernelIsa());
  const StoreBf16PanelRowFn store_bf16_row =
      args.c_dtype == MXMOE_DTYPE_BF16 ? VectorStoreBf16PanelRow() : nullptr;
  ParallelForWithSlot(static_cast<int64_t>(items.size()), 1, [&](int slot, int64_t begin,
                                                                int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const WorkItem& item = items[it];
      const int32_t e = item.expert;
      const int64_t panel_end = std::min(panels, item.panel_begin + kItemPanels);
      const uint8_t* panel_base;
      if (prepared) {
        panel_base = args.b.packed + (e * panels + item.panel_begin) * panel_bytes;
      } else {
        uint8_t* scratch = panel_scratch.data() + slot * kItemPanels * panel_bytes;
        for (int64_t p = item.panel_begin; p < panel_end; ++p) {
          DecodePanel(args.b, e, p, scratch + (p - item.panel_begin) * panel_bytes);
        }
        panel_base = scratch;
      }
      const int64_t row_end = std::min(offsets[e + 1] - offsets[e], item.row_begin + kItemRows);
      // Panels in pairs where a pair kernel exists (one A load serves 16 columns), else one by
      // one; acc rows are `width` panels wide.
      for (int64_t p = item.panel_begin; p < panel_end;) {
        const uint8_t* panel = panel_base + (p - item.panel_begin) * panel_bytes;
        const int width = pair_kernel != nullptr && p + 1 < panel_end ? 2 : 1;
        for (int64_t r0 = item.row_begin; r0 < row_end; r0 += kMaxPanelRows) {
          const int tile_rows = static_cast<int>(std::min<int64_t>(kMaxPanelRows, row_end - r0));
          const int64_t row = offsets[e] + r0;
          double acc[kMaxPanelRows * 2 * kPanelCols];
          if (width == 2) {
            pair_kernel(panel, panel + panel_bytes, blocks, &a_codes[row * k],
                        &a_factors[row * blocks], &a_corrections[row * blocks], tile_rows, acc);
          } else {
            kernel(panel, blocks, &a_codes[row * k], &a_factors[row * blocks],
                   &a_corrections[row * blocks], tile_rows, acc);
          }
          for (int r = 0; r < tile_rows; ++r) {
            for (int h = 0; h < width; ++h) {
              const int64_t pp = p + h;
              const int cols = static_cast<int>(std::min<int64_t>(kPanelCols, n - pp * kPanelCols));
              const double* row_acc = &acc[(r * width + h) * kPanelCols];
              const int64_t at = (row + r) * n + pp * kPanelCols;
              if (store_bf16_row != nullptr && cols == kPanelCols) {
                store_bf16_row(row_acc, reinterpret_cast<uint16_t*>(args.c) + at);
                continue;
              }
              for (int c = 0; c < cols; ++c) {
                StoreFromDouble(args.c, args.c_dtype, at + c, row_acc[c]);
              }
            }
          }
        }
        p += width;
      }
    }
  });
  return MXMOE_STATUS_OK;
}

}  // namespace cpu
}  // namespace mxmoe
