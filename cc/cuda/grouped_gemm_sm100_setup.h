// Per-expert problem setup of the sm100 (Blackwell) MXFP4 grouped GEMM, as plain C++ shared by
// the device setup kernel (grouped_gemm_sm100_kernel.cuh) and the CPU unit test
// (tests/cc/grouped_gemm_sm100_setup_test.cc). Everything here is __host__ __device__ (MXMOE_HD
// from format.h) and free of CUDA and CUTLASS types, so g++ compiles it and the test checks the
// very code the GPU runs. Addresses are plain integers (uint64_t): the test feeds fake ones.
//
// What it holds:
//   - ComputeExpertSetupSm100: expert e's problem shape (m_e, n, k), the addresses of its A rows,
//     A scales, B weights, B scales and C rows, row strides, and the scale-factor layouts, from
//     expert_offsets / blockscale_offsets / problem_sizes (device memory on the GPU);
//   - ScaleLayoutSm100 / ScaleLayoutOffsetSm100: the numbers of CUTLASS's SM100 scale-factor
//     layout for 32-element blocks (Sm1xxBlockScaledConfig<32>::tile_atom_to_shape_SFA/SFB):
//       shape  (((32,4), mn_tiles), ((32,4), k_tiles))
//       stride (((16,4), k_tiles*512), (( 0,1), 512))
//     i.e. byte offset of (row, scale column c) = (row/128)*k_tiles*512 + (c/4)*512
//     + (row%32)*16 + ((row/32)%4)*4 + c%4: exactly mxmoe's SWIZZLED_128X4 formula
//     (format::SwizzledOffset), so activation scales are consumed as they are, each expert's
//     starting at byte blockscale_offsets[e] * round_up(k/32, 4). grouped_gemm_sm100_kernel.cuh
//     static_asserts this against CUTLASS's own layout at compile time;
//   - PreparedWeightsLayoutSm100: the buffer mxmoe_prepare_weights writes for sm100;
//   - SwizzledPositionSm100: the inverse of the swizzle (byte offset -> row, column), used by
//     the weight-preparation kernel to write the swizzled scales in coalesced order.
//
// Limits: tiles are 128x128x128 (kTile*); n and k need only be multiples of 32 (k: 16-byte TMA
// row pitch of packed e2m1; n: 16-byte row pitch of the bf16/fp16 output). CUTLASS loads e2m1
// with TMA type CU_TENSOR_MAP_DATA_TYPE_16U4_ALIGN8B, whose rules (cuda.h) are: base address
// 16-byte aligned, innermost extent (k) a multiple of 2, row pitch a multiple of 16 bytes; a
// k of 2880 (pitch 1440 bytes) meets them, so no padding copy of A or B is ever made. Problem
// tails in m, n and k are handled by TMA bounds (loads past m_e/n/k read zeros, stores past them
// are dropped) and by the 128-row / 4-column padding of the swizzled scales, never by the caller.
// The padding scale bytes must be finite (the contract writes 0): the tensor cores apply the
// padding columns to the zero-filled K tail of real rows; a NaN scale (0xFF) would make them NaN.
#ifndef MXMOE_CUDA_GROUPED_GEMM_SM100_SETUP_H_
#define MXMOE_CUDA_GROUPED_GEMM_SM100_SETUP_H_

#include <stdint.h>

#include "mxmoe/format.h"

namespace mxmoe {
namespace cuda {
namespace sm100 {

// CTA tile of the single kernel configuration (1-SM UMMA, cluster 1x1x1). A K or N that is not a
// multiple of 128 costs the MMA work of the padded tile and nothing in memory traffic: for
// K = N = 2880 (22.5 tiles) the last K tile and the last N tile are half empty, so the tensor
// cores do 23/22.5 = 2.2% extra work on each of those dimensions; TMA does not fetch the
// out-of-bounds bytes (it fills zeros) and does not store past n.
constexpr int kTileM = 128;
constexpr int kTileN = 128;
constexpr int kTileK = 128;

// Bytes of one 128-row x 4-scale-column atom of the swizzled scale layout.
constexpr int64_t kScaleAtomBytes = format::kSwizzleTileBytes;  // 512

// Width in bytes (= scale columns, padded to 4) of one row of swizzled scales of a K-wide matrix.
MXMOE_HD constexpr int64_t SwizzledScaleRowBytes(int64_t k) {
  return format::RoundUp(k / format::kBlockSize, format::kSwizzleCols);
}

// The dynamic values of CUTLASS's SM100 scale-factor layout for one operand of one expert
// (rows = m_e for A, n for B). The rest of the layout is static (see the file comment).
struct ScaleLayoutSm100 {
  int32_t mn_tiles;        // ceil(rows / 128)
  int32_t k_tiles;         // ceil(k / 128) = ceil((k/32) / 4)
  int64_t mn_tile_stride;  // bytes between consecutive 128-row tiles: k_tiles * 512
};

MXMOE_HD constexpr ScaleLayoutSm100 MakeScaleLayoutSm100(int64_t rows, int64_t k) {
  ScaleLayoutSm100 layout{};
  layout.mn_tiles = static_cast<int32_t>(format::CeilDiv(rows, format::kSwizzleRows));
  layout.k_tiles =
      static_cast<int32_t>(format::CeilDiv(k, format::kBlockSize * format::kSwizzleCols));
  layout.mn_tile_stride = static_cast<int64_t>(layout.k_tiles) * kScaleAtomBytes;
  return layout;
}

// Byte offset of scale (row, scale column) under `layout`, written the way CUTLASS's layout
// computes it (sum of coordinate x stride over its modes), not by calling SwizzledOffset, so the
// test comparing the two is a real check.
MXMOE_HD constexpr int64_t ScaleLayoutOffsetSm100(const ScaleLayoutSm100& layout, int64_t row,
                                        int64_t scale_col) {
  const int64_t row_in_32 = row % 32;
  const int64_t row_32_block = (row / 32) % 4;
  const int64_t row_tile = row / 128;
  const int64_t col_in_4 = scale_col % 4;
  const int64_t col_tile = scale_col / 4;
  return row_in_32 * 16 + row_32_block * 4 + row_tile * layout.mn_tile_stride + col_in_4 * 1 +
         col_tile * kScaleAtomBytes;
}

// Inverse of the swizzle inside one [round_up(rows,128), round_up(cols,4)] swizzled matrix:
// the (row, scale column) stored at byte `offset`. Padding positions give row >= rows or
// col >= cols (the caller writes 0 there).
MXMOE_HD constexpr void SwizzledPositionSm100(int64_t offset, int64_t scale_cols, int64_t* row,
                                    int64_t* col) {
  const int64_t k_tiles = format::CeilDiv(scale_cols, format::kSwizzleCols);
  const int64_t atom = offset / kScaleAtomBytes;
  const int64_t r = offset % kScaleAtomBytes;  // = (m%32)*16 + ((m/32)%4)*4 + k%4
  *row = (atom / k_tiles) * 128 + ((r % 16) / 4) * 32 + r / 16;
  *col = (atom % k_tiles) * 4 + r % 4;
}

// The buffer mxmoe_prepare_weights writes for the sm100 backend (MXMOE_WEIGHT_FORMAT_PREPARED),
// for E experts of [n, k] weights:
//   [0, packed_bytes)                     e2m1 codes, [E, n, k/2], unchanged from LINEAR
//   [scales_offset, + scales_bytes)       E8M0 scales, [E, round_up(n,128), round_up(k/32,4)],
//                                         each expert swizzled 128x4 on its own, padding 0
// = the SWIZZLED_128X4 weight format in one buffer, the scales starting 256-byte aligned.
// Size: k/2 + round_up(n,128) * round_up(k/32,4) / n bytes per row, i.e. 4 + 8/32 = 4.25 bits per
// weight plus padding (n = k = 2880: 4.26 bits). K and N tails are not padded in memory (TMA
// bounds handle them), only the scales' 128-row / 4-column atoms are.
struct PreparedWeightsLayoutSm100 {
  int64_t packed_offset;
  int64_t packed_bytes;
  int64_t expert_packed_bytes;  // n * k / 2
  int64_t scales_offset;
  int64_t scales_bytes;
  int64_t expert_scale_bytes;  // round_up(n,128) * round_up(k/32,4)
  int64_t total_bytes;
};

MXMOE_HD constexpr PreparedWeightsLayoutSm100 MakePreparedWeightsLayoutSm100(
    int64_t num_experts, int64_t n, int64_t k) {
  PreparedWeightsLayoutSm100 layout{};
  layout.expert_packed_bytes = n * (k / 2);
  layout.expert_scale_bytes = format::RoundUp(n, format::kSwizzleRows) * SwizzledScaleRowBytes(k);
  layout.packed_offset = 0;
  layout.packed_bytes = num_experts * layout.expert_packed_bytes;
  layout.scales_offset = format::RoundUp(layout.packed_bytes, 256);
  layout.scales_bytes = num_experts * layout.expert_scale_bytes;
  layout.total_bytes = layout.scales_offset + layout.scales_bytes;
  return layout;
}

// What is uniform over the experts of one grouped GEMM call. Addresses are device addresses on
// the GPU, arbitrary integers in the test.
struct GroupedGemmSm100Problem {
  int32_t num_experts;
  int64_t rows;          // rows of a and c
  int64_t n;
  int64_t k;
  int64_t a_scale_rows;  // rows of the swizzled activation-scale buffer
  uint64_t a;            // [rows, k/2] e2m1
  uint64_t a_scales;     // [a_scale_rows, round_up(k/32,4)]; expert e's from blockscale_offsets[e]
  uint64_t b;            // [E, n, k/2] e2m1
  uint64_t b_scales;     // [E, round_up(n,128), round_up(k/32,4)], swizzled per expert
  uint64_t c;            // [rows, n] bf16/fp16
  int32_t c_element_bytes;
};

// Everything CUTLASS needs for expert e. The kernel turns the addresses into typed pointers, the
// row strides into cute strides (make_cute_packed_stride) and builds the scale layouts with
// CUTLASS's own tile_atom_to_shape_SFA/SFB (which equal sfa/sfb, see the static_asserts).
struct ExpertSetupSm100 {
  int32_t m;  // rows of this expert; 0 = nothing to do (empty or rejected, see `rejected`)
  int32_t n;
  int32_t k;
  int32_t rejected;    // 1 when the metadata was inconsistent or out of bounds (then m = 0)
  int64_t first_row;   // expert_offsets[e]
  int64_t first_scale_row;  // blockscale_offsets[e]
  uint64_t a;          // a + first_row * k/2
  uint64_t a_scales;   // a_scales + first_scale_row * round_up(k/32,4)
  uint64_t b;          // b + e * n*k/2
  uint64_t b_scales;   // b_scales + e * round_up(n,128)*round_up(k/32,4)
  uint64_t c;          // c + first_row * n * c_element_bytes
  int64_t a_row_stride;  // elements between rows: k (e2m1 elements, two per byte)
  int64_t b_row_stride;  // k
  int64_t c_row_stride;  // n
  ScaleLayoutSm100 sfa;  // rows m (padded to 128 by the layout)
  ScaleLayoutSm100 sfb;  // rows n
};

// The setup of expert e (0 <= e < num_experts). Pure function of its inputs; the device kernel
// runs it with one thread per expert.
//
// m_e = problem_sizes[3e] when problem_sizes is given (vLLM semantics), otherwise
// expert_offsets[e+1] - expert_offsets[e]. problem_sizes' n and k are not read: the call's n and
// k govern (they also size the weights). On the GPU the metadata cannot be validated before the
// launch without a host synchronisation, so an expert whose metadata would make the kernel read
// or write out of bounds is skipped instead (m = 0, rejected = 1; its output rows are left
// unwritten): negative offsets or m_e, m_e larger than its expert_offsets span, rows past `rows`,
// scale rows past `a_scale_rows`. The CPU backend reports such metadata as INVALID_ARGUMENT.
MXMOE_HD ExpertSetupSm100 ComputeExpertSetupSm100(const GroupedGemmSm100Problem& p, int32_t e,
                                                  const int32_t* expert_offsets,
                                                  const int32_t* blockscale_offsets,
                                                  const int32_t* problem_sizes) {
  const int64_t first_row = expert_offsets[e];
  const int64_t span = static_cast<int64_t>(expert_offsets[e + 1]) - first_row;
  int64_t m = problem_sizes != nullptr ? problem_sizes[3 * e] : span;
  const int64_t first_scale_row = blockscale_offsets[e];
  const int64_t scale_row_bytes = SwizzledScaleRowBytes(p.k);

  const bool in_bounds = first_row >= 0 && m >= 0 && m <= span && first_row + m <= p.rows &&
                         first_scale_row >= 0 &&
                         first_scale_row + format::RoundUp(m, format::kSwizzleRows) <=
                             p.a_scale_rows;
  if (!in_bounds) m = 0;

  ExpertSetupSm100 s;
  s.m = static_cast<int32_t>(m);
  s.n = static_cast<int32_t>(p.n);
  s.k = static_cast<int32_t>(p.k);
  s.rejected = in_bounds ? 0 : 1;
  // A rejected expert keeps in-range addresses (those of row 0), never used since m = 0.
  s.first_row = in_bounds ? first_row : 0;
  s.first_scale_row = in_bounds ? first_scale_row : 0;
  s.a = p.a + static_cast<uint64_t>(s.first_row * (p.k / 2));
  s.a_scales = p.a_scales + static_cast<uint64_t>(s.first_scale_row * scale_row_bytes);
  const PreparedWeightsLayoutSm100 w = MakePreparedWeightsLayoutSm100(p.num_experts, p.n, p.k);
  s.b = p.b + static_cast<uint64_t>(e * w.expert_packed_bytes);
  s.b_scales = p.b_scales + static_cast<uint64_t>(e * w.expert_scale_bytes);
  s.c = p.c + static_cast<uint64_t>(s.first_row * p.n * p.c_element_bytes);
  s.a_row_stride = p.k;
  s.b_row_stride = p.k;
  s.c_row_stride = p.n;
  s.sfa = MakeScaleLayoutSm100(m, p.k);
  s.sfb = MakeScaleLayoutSm100(p.n, p.k);
  return s;
}

}  // namespace sm100
}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_GROUPED_GEMM_SM100_SETUP_H_
