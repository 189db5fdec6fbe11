// CUDA quantization kernels behind mxmoe::cuda::{Quantize, Dequantize, ExpertsQuantize,
// SiluMulExpertsQuantize, SwizzleScales, UnswizzleScales, QuantizeWeights}.
//
// One quantizing kernel serves every entry point. Its work unit is a lane: 8 consecutive
// elements of a row (one 16-byte load; two for SiLU, gate and up), 4 lanes per 32-element block.
// Each data CTA takes kThreads * kUnits consecutive lanes of the flattened [rows, k/8] lane grid
// (rows need not align with CTAs), issues all its loads first, then builds a small table of where
// each of its rows' scales go (this is where the per-expert mapping happens: a binary search in
// the expert offsets, kept in shared memory), then quantizes and stores. kUnits (lanes per thread;
// see UnitsPerThread) is 2 to 8 for large problems and 1 for small ones (more threads, each with a
// short serial chain: the launch latency is what counts there).
// Variants behind benchmark knobs (see VariantFromEnv; the defaults are the measured baseline):
// the fast SiLU, the SiLU table (persistent data CTAs, each building a 32 KB shared-memory table
// of format::SiluF32 over bf16 gate values, then looping over tiles) and the packed bf16
// encoding; all give the same bits.
// Swizzled layouts have padding: CTAs launched before the data CTAs (so that they overlap with
// them instead of forming a tail) zero the padding rows of each matrix's last 128-row tile; the
// lane that writes a row's last scale also zeroes that row's padding columns.
//
// Limits and behaviour:
//   - Arguments are validated by cc/src, these kernels' own limits included: CanImplement*
//     (k <= 2^33; experts <= 6143 so both offset arrays fit in 48 KB of shared memory) is asked
//     by cc/src/validate.cc, and the launchers do not check again. The kernels need input and
//     output 16-byte aligned, packed and swizzled scales 4-byte aligned: the contract's 16 bytes
//     for CUDA data pointers covers them.
//   - No allocation, no synchronisation: every launch can be captured in a CUDA graph. Very large
//     problems (more than 2^30 lanes, e.g. 1.2M rows at k = 7168) are split into several launches
//     on the same stream.
//   - Device-side expert metadata is not trusted. A row r belongs to expert e when
//     expert_offsets[e] <= r < expert_offsets[e+1] for the e that a binary search over
//     expert_offsets finds; a row with no such expert, or whose expert's scale tile would fall
//     outside [0, scale_rows) (blockscale_offsets[e] < 0 or blockscale_offsets[e] +
//     round_up(local_row + 1, 128) > scale_rows), is skipped: neither its packed row nor its
//     scales are written. An expert's padding rows are written only when its whole scale block
//     lies inside [0, scale_rows). Nothing is ever written out of bounds; with invalid metadata
//     some output bytes are simply left unwritten (or, if experts' scale blocks overlap, written
//     by both).
#include "cc/cuda/quantize.h"

#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <type_traits>

#include "cc/base/cuda_check.h"
#include "cc/base/status.h"
#include "cc/cuda/device.h"
#include "cc/cuda/dispatch.h"
#include "cc/cuda/expert_search.h"
#include "cc/cuda/pdl.cuh"
#include "cc/cuda/quantize_device.cuh"
#include "mxmoe/format.h"

namespace mxmoe {
namespace cuda {
namespace {

using quant::Bf16;
using quant::FastDivmod;
using quant::Fp16;
using quant::kElemsPerLane;
using quant::kLanesPerBlock;
using quant::SiluImpl;

constexpr int kThreads = 256;
// Dequantize: lanes per thread and per CTA.
constexpr int kDequantizeUnits = 4;
constexpr int kUnitsPerCta = kThreads * kDequantizeUnits;
// Rows the lanes of a quantizing CTA can touch: k >= 32 means >= 4 lanes per row, and CTAs start
// at multiples of kThreads * kUnits (a multiple of 4), so at most that / 4 rows, +1 for safety.
template <int kUnits>
struct Tile {
  static constexpr int kLanes = kThreads * kUnits;
  static constexpr int kMaxRows = kLanes / kLanesPerBlock + 1;
};
// Lane indices inside one launch stay below 2^30, so 32-bit arithmetic never overflows.
constexpr int64_t kMaxUnitsPerLaunch = int64_t{1} << 30;
// At most this many CTAs zero padding (each loops over its share of the matrices).
constexpr int32_t kMaxPaddingCtas = 1024;
// Expert offsets and blockscale offsets both live in shared memory.
constexpr int32_t kMaxSharedExperts = 48 * 1024 / 8 - 1;

// Where a row's scales go.
enum class ScaleMap {
  kLinear,          // scales[row * scale_cols + k]
  kSwizzledGroups,  // matrix g = row / group_rows, swizzled, at byte g * group_bytes
  kExperts,         // matrix = the row's expert, swizzled, at row blockscale_offsets[e]
};

struct RowsParams {
  const void* input;
  uint8_t* packed;
  uint8_t* scales;
  int64_t row_begin;          // first row of this launch
  uint32_t units;             // lanes in this launch (launch rows * k / 8)
  uint32_t padding_ctas;      // CTAs [0, padding_ctas) zero scale padding, the others quantize
  uint32_t tiles;             // kThreads * kUnits lanes each (persistent kernels loop over them)
  FastDivmod lanes_per_row;   // k / 8
  int64_t input_row_elems;    // elements from one input row to the next: k, or 2k for SiLU
  int64_t up_offset_elems;    // SiLU: where `up` starts in a row (= k)
  int32_t scale_cols;         // k / 32
  int32_t padded_scale_cols;  // round_up(k / 32, 4), swizzled maps
  // kSwizzledGroups.
  int64_t group_rows;
  int64_t group_bytes;
  int32_t num_groups;
  // kExperts.
  const int32_t* expert_offsets;
  const int32_t* blockscale_offsets;
  int32_t num_experts;
  int64_t scale_rows;
  // kExperts, the MoE's gather: the input row of sorted row r is row_source[r] / source_divisor
  // (the slot's token), clamped into [0, source_rows); NULL: row r itself.
  const int32_t* row_source;
  FastDivmod source_divisor;
  uint32_t source_rows;
  // SiluImpl::kGeneral: the activation's options.
  quant::ActivationSpec activation;
};

// Byte offset of scale (row, 0) for the swizzled maps, or -1 when the row is skipped (invalid
// expert metadata). Offsets of the other columns follow from the layout: + (k/4)*512 + k%4.
// s_offsets: kExperts: expert_offsets [E+1] then blockscale_offsets [E+1], in shared memory.
// kExperts: *expert is the row's expert (0 for a skipped row: in bounds of a per-expert bias).
template <ScaleMap kMap>
__device__ int64_t RowScaleBase(const RowsParams& p, const int32_t* s_offsets, int64_t row,
                                int32_t* expert) {
  *expert = 0;
  if constexpr (kMap == ScaleMap::kSwizzledGroups) {
    const int64_t group = row / p.group_rows;
    const int64_t local = row - group * p.group_rows;
    return group * p.group_bytes + format::SwizzledOffset(local, 0, p.scale_cols);
  } else {
    static_assert(kMap == ScaleMap::kExperts, "linear rows need no table");
    if (row > INT32_MAX) return -1;
    const int32_t r = static_cast<int32_t>(row);
    // Largest e in [0, E) with offsets[e] <= r: skips empty experts that start at r.
    const int lo = ExpertOfRow(s_offsets, p.num_experts, r);
    const int32_t begin = s_offsets[lo];
    const int32_t end = s_offsets[lo + 1];
    if (r < begin || r >= end) return -1;
    const int64_t local = static_cast<int64_t>(r) - begin;
    const int64_t scale_row = s_offsets[p.num_experts + 1 + lo];
    if (scale_row < 0 ||
        scale_row + format::RoundUp(local + 1, format::kSwizzleRows) > p.scale_rows) {
      return -1;
    }
    *expert = lo;
    return scale_row * p.padded_scale_cols + format::SwizzledOffset(local, 0, p.scale_cols);
  }
}

// Zeroes the padding rows [m, round_up(m, 128)) of swizzled matrices (all padded columns): one
// CTA per matrix (CTAs loop when there are more matrices than padding CTAs). An expert's offsets
// are read straight from global memory (three loads): no shared memory, no barrier, so a padding
// CTA for an empty expert ends at once. Within a 512-byte tile, 4-byte word p holds rows
// (p % 4) * 32 + p / 4 for the tile's 4 columns, so the CTA writes whole words in address order.
template <ScaleMap kMap>
__device__ void ZeroScalePaddingRows(const RowsParams& p) {
  const int32_t k_tiles = p.padded_scale_cols / format::kSwizzleCols;
  const int32_t num_matrices = kMap == ScaleMap::kExperts ? p.num_experts : p.num_groups;
  const int32_t stride = static_cast<int32_t>(p.padding_ctas);
  for (int32_t g = static_cast<int32_t>(blockIdx.x); g < num_matrices; g += stride) {
    int64_t m;
    int64_t base;
    if constexpr (kMap == ScaleMap::kExperts) {
      m = static_cast<int64_t>(p.expert_offsets[g + 1]) - p.expert_offsets[g];
      if (m <= 0) continue;
      const int64_t scale_row = p.blockscale_offsets[g];
      if (scale_row < 0 || scale_row + format::RoundUp(m, format::kSwizzleRows) > p.scale_rows) {
        continue;
      }
      base = scale_row * p.padded_scale_cols;
    } else {
      m = p.group_rows;
      base = g * p.group_bytes;
    }
    const int32_t valid_rows_in_tile = static_cast<int32_t>(m % format::kSwizzleRows);
    if (valid_rows_in_tile == 0) continue;
    uint32_t* tile = reinterpret_cast<uint32_t*>(
        p.scales + base + (m / format::kSwizzleRows) * k_tiles * format::kSwizzleTileBytes);
    for (int32_t w = threadIdx.x; w < k_tiles * 128; w += kThreads) {
      const int32_t word = w & 127;
      const int32_t row_in_tile = (word & 3) * 32 + (word >> 2);
      if (row_in_tile >= valid_rows_in_tile) tile[w] = 0;
    }
  }
}

// Loads expert_offsets and blockscale_offsets into shared memory (kExperts), then syncs.
__device__ void LoadExpertOffsets(const RowsParams& p, int32_t* s_offsets) {
  for (int i = threadIdx.x; i <= p.num_experts; i += kThreads) {
    s_offsets[i] = p.expert_offsets[i];
    s_offsets[p.num_experts + 1 + i] = p.blockscale_offsets[i];
  }
  __syncthreads();
}

// The input row that sorted row `row` reads: itself, or (the MoE's gather) its slot's token.
__device__ __forceinline__ int64_t SourceRow(const RowsParams& p, int64_t row) {
  if (p.row_source == nullptr) return row;
  const int32_t slot = p.row_source[row];
  const uint32_t token = slot < 0 ? 0u : p.source_divisor.Div(static_cast<uint32_t>(slot));
  return token < p.source_rows ? token : 0;
}

// Quantizes the kThreads * kUnits lanes from cta_unit0 on. kLoadOffsets: load the expert offsets
// into shared memory here (after issuing the input loads); otherwise the caller has.
// s_silu_table: SiluImpl::kTable's table in shared memory, else unused. s_row_expert: the
// experts of the rows (SiluImpl::kGeneral's bias), else unused.
template <typename T, SiluImpl kSilu, ScaleMap kMap, int kUnits, quant::Encode kEncode,
          bool kLoadOffsets>
__device__ __forceinline__ void QuantizeTile(const RowsParams& p, int32_t* s_offsets,
                                             int64_t* s_row_scale_base, int32_t* s_row_expert,
                                             const float* s_silu_table, uint32_t cta_unit0) {
  // 1. All loads first. Lanes past the end re-read the last lane (in bounds) so that every lane of
  //    the warp takes part in the block reductions; they store nothing.
  const uint32_t lanes_per_row = p.lanes_per_row.divisor;
  uint4 gate_or_x[kUnits];
  uint4 up[kUnits];
  uint32_t row_in_launch[kUnits];
  uint32_t lane_in_row[kUnits];
#pragma unroll
  for (int i = 0; i < kUnits; ++i) {
    const uint32_t u = min(cta_unit0 + i * kThreads + threadIdx.x, p.units - 1);
    row_in_launch[i] = p.lanes_per_row.Div(u);
    lane_in_row[i] = u - row_in_launch[i] * lanes_per_row;
    const uint16_t* row_ptr = static_cast<const uint16_t*>(p.input) +
                              SourceRow(p, p.row_begin + row_in_launch[i]) * p.input_row_elems;
    gate_or_x[i] = quant::LoadStreaming16(row_ptr + lane_in_row[i] * kElemsPerLane);
    if constexpr (kSilu != SiluImpl::kNone) {
      up[i] = quant::LoadStreaming16(row_ptr + p.up_offset_elems + lane_in_row[i] * kElemsPerLane);
    }
  }

  // 2. Scale base of every row this CTA touches (experts: binary search in shared memory).
  uint32_t first_row = 0;
  if constexpr (kMap != ScaleMap::kLinear) {
    if constexpr (kMap == ScaleMap::kExperts && kLoadOffsets) LoadExpertOffsets(p, s_offsets);
    first_row = p.lanes_per_row.Div(cta_unit0);
    const uint32_t last_row = p.lanes_per_row.Div(
        min(cta_unit0 + uint32_t{Tile<kUnits>::kLanes}, p.units) - 1);
    for (uint32_t t = threadIdx.x; t <= last_row - first_row; t += kThreads) {
      int32_t expert;
      s_row_scale_base[t] = RowScaleBase<kMap>(p, s_offsets, p.row_begin + first_row + t, &expert);
      if constexpr (kSilu == SiluImpl::kGeneral) s_row_expert[t] = expert;
    }
    __syncthreads();
  }

  // 3. Quantize and store.
#pragma unroll
  for (int i = 0; i < kUnits; ++i) {
    quant::Lane8 x;
    if constexpr (kSilu == SiluImpl::kGeneral) {
      static_assert(kMap == ScaleMap::kExperts, "the bias is per expert");
      x = quant::BiasActivation<T>(p.activation, quant::AsLane8(gate_or_x[i]),
                                   quant::AsLane8(up[i]),
                                   s_row_expert[row_in_launch[i] - first_row],
                                   p.up_offset_elems, lane_in_row[i] * kElemsPerLane);
    } else if constexpr (kSilu == SiluImpl::kTable) {
      x = quant::SiluMulTable(s_silu_table, quant::AsLane8(gate_or_x[i]), quant::AsLane8(up[i]));
    } else if constexpr (kSilu == SiluImpl::kFast) {
      x = quant::SiluMulChecked<T>(quant::AsLane8(gate_or_x[i]), quant::AsLane8(up[i]));
    } else if constexpr (kSilu == SiluImpl::kSilu) {
      x = quant::SiluMul<T>(quant::AsLane8(gate_or_x[i]), quant::AsLane8(up[i]));
    } else {
      x = quant::AsLane8(gate_or_x[i]);
    }
    const quant::QuantizedLane q = quant::QuantizeLane<T, kEncode>(x);

    const bool in_range = cta_unit0 + i * kThreads + threadIdx.x < p.units;
    const int64_t row = p.row_begin + row_in_launch[i];
    int64_t scale_base;
    if constexpr (kMap == ScaleMap::kLinear) {
      scale_base = row * p.scale_cols;
    } else {
      scale_base = s_row_scale_base[row_in_launch[i] - first_row];
    }
    if (in_range && scale_base >= 0) {
      reinterpret_cast<uint32_t*>(p.packed)[row * lanes_per_row + lane_in_row[i]] = q.codes;
      if (lane_in_row[i] % kLanesPerBlock == 0) {
        const int32_t block = static_cast<int32_t>(lane_in_row[i] / kLanesPerBlock);
        if constexpr (kMap == ScaleMap::kLinear) {
          p.scales[scale_base + block] = q.scale;
        } else {
          uint8_t* s = p.scales + scale_base +
                       (block / format::kSwizzleCols) * format::kSwizzleTileBytes +
                       block % format::kSwizzleCols;
          *s = q.scale;
          if (block == p.scale_cols - 1) {  // this row's padding columns, same 4-byte word
            for (int32_t c = 1; c < p.padded_scale_cols - p.scale_cols + 1; ++c) s[c] = 0;
          }
        }
      }
    }
  }
}

// Shared-memory bytes before SiluImpl::kTable's table (the expert offsets, 16-byte aligned).
__host__ __device__ constexpr size_t SiluTableOffset(int32_t num_experts) {
  return (static_cast<size_t>(num_experts + 1) * 8 + 15) / 16 * 16;
}

template <typename T, SiluImpl kSilu, ScaleMap kMap, int kUnits, quant::Encode kEncode>
__global__ void __launch_bounds__(kThreads) QuantizeRowsKernel(const RowsParams p) {
  // kExperts: expert_offsets [E+1] then blockscale_offsets [E+1]; SiluImpl::kTable: then, from
  // SiluTableOffset on, the SiLU table.
  extern __shared__ int32_t s_offsets[];
  // Swizzled maps: scale byte offset of (row first_row + i, column 0), -1 = skip the row.
  __shared__ int64_t s_row_scale_base[Tile<kUnits>::kMaxRows];
  // SiluImpl::kGeneral: the expert of row first_row + i.
  __shared__ int32_t s_row_expert[kSilu == SiluImpl::kGeneral ? Tile<kUnits>::kMaxRows : 1];
  PdlWait();  // programmatic dependent launch: cc/cuda/pdl.cuh
  PdlLaunchDependents();

  if (blockIdx.x < p.padding_ctas) {
    if constexpr (kMap != ScaleMap::kLinear) ZeroScalePaddingRows<kMap>(p);
    return;
  }
  if constexpr (kSilu == SiluImpl::kTable) {
    // Persistent: each data CTA builds the table once and takes tiles blockIdx, + data CTAs, ...
    static_assert(kMap == ScaleMap::kExperts, "the SiLU kernels map rows to experts");
    float* s_silu_table = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(s_offsets) +
                                                   SiluTableOffset(p.num_experts));
    quant::BuildSiluTable(s_silu_table, threadIdx.x, kThreads);
    LoadExpertOffsets(p, s_offsets);  // synchronises: the table is complete too
    const uint32_t data_ctas = gridDim.x - p.padding_ctas;
    for (uint32_t tile = blockIdx.x - p.padding_ctas; tile < p.tiles; tile += data_ctas) {
      QuantizeTile<T, kSilu, kMap, kUnits, kEncode, false>(p, s_offsets, s_row_scale_base,
                                                           s_row_expert, s_silu_table,
                                                           tile * uint32_t{Tile<kUnits>::kLanes});
      __syncthreads();  // s_row_scale_base is rewritten by the next tile
    }
  } else {
    QuantizeTile<T, kSilu, kMap, kUnits, kEncode, true>(
        p, s_offsets, s_row_scale_base, s_row_expert, nullptr,
        (blockIdx.x - p.padding_ctas) * uint32_t{Tile<kUnits>::kLanes});
  }
}

// ---- Dequantize ------------------------------------------------------------------------------

struct DequantizeParams {
  const uint8_t* packed;
  const uint8_t* scales;
  void* output;
  int64_t row_begin;
  uint32_t units;
  FastDivmod lanes_per_row;
  int32_t scale_cols;
  bool swizzled;
};

template <mxmoe_dtype kOut>
__device__ __forceinline__ void StoreOutput8(void* out, int64_t unit, const float (&v)[8]) {
  if constexpr (kOut == MXMOE_DTYPE_FP32) {
    float4* o = static_cast<float4*>(out) + 2 * unit;
    o[0] = make_float4(v[0], v[1], v[2], v[3]);
    o[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t lo;
      uint32_t hi;
      if constexpr (kOut == MXMOE_DTYPE_BF16) {
        lo = format::FloatToBf16(v[2 * i]);
        hi = format::FloatToBf16(v[2 * i + 1]);
      } else {
        lo = format::FloatToFp16(v[2 * i]);
        hi = format::FloatToFp16(v[2 * i + 1]);
      }
      w[i] = lo | (hi << 16);
    }
    static_cast<uint4*>(out)[unit] = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Each thread turns kDequantizeUnits lanes of 8 codes (one 32-bit word each) into 8 outputs.
template <mxmoe_dtype kOut>
__global__ void __launch_bounds__(kThreads) DequantizeKernel(const DequantizeParams p) {
  const uint32_t cta_unit0 = blockIdx.x * static_cast<uint32_t>(kUnitsPerCta);
#pragma unroll
  for (int i = 0; i < kDequantizeUnits; ++i) {
    const uint32_t u = cta_unit0 + i * kThreads + threadIdx.x;
    if (u >= p.units) break;
    const uint32_t r = p.lanes_per_row.Div(u);
    const uint32_t lane = u - r * p.lanes_per_row.divisor;
    const int64_t row = p.row_begin + r;
    const int64_t unit = row * p.lanes_per_row.divisor + lane;
    const uint32_t codes = reinterpret_cast<const uint32_t*>(p.packed)[unit];
    const int64_t block = lane / kLanesPerBlock;
    const int64_t scale_offset = p.swizzled ? format::SwizzledOffset(row, block, p.scale_cols)
                                            : row * p.scale_cols + block;
    const float scale = format::ScaleToFloat(p.scales[scale_offset]);
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      v[j] = MXMOE_MUL(format::E2M1ToFloat(static_cast<uint8_t>((codes >> (4 * j)) & 0xF)), scale);
    }
    StoreOutput8<kOut>(p.output, unit, v);
  }
}

// ---- Scale layout conversion -----------------------------------------------------------------

struct SwizzleParams {
  const uint8_t* input;
  uint8_t* output;
  int64_t batch;
  int64_t rows;
  int64_t cols;
  int64_t swizzled_bytes;  // per matrix, padding included
};

// One thread per 4-byte word of the swizzled output (4 scale columns of one row), padding
// included: every output byte is written, padding as 0.
__global__ void __launch_bounds__(kThreads) SwizzleScalesKernel(const SwizzleParams p) {
  const int64_t padded_cols = format::RoundUp(p.cols, format::kSwizzleCols);
  const int64_t padded_rows = format::RoundUp(p.rows, format::kSwizzleRows);
  const int64_t words_per_matrix = padded_rows * padded_cols / 4;
  const int64_t total = p.batch * words_per_matrix;
  for (int64_t w = blockIdx.x * int64_t{kThreads} + threadIdx.x; w < total;
       w += int64_t{gridDim.x} * kThreads) {
    const int64_t b = w / words_per_matrix;
    const int64_t in_matrix = w - b * words_per_matrix;
    const int64_t tile = in_matrix / 128;
    const int64_t word = in_matrix % 128;
    const int64_t k_tiles = padded_cols / 4;
    const int64_t m = tile / k_tiles * 128 + (word & 3) * 32 + (word >> 2);
    const int64_t k0 = tile % k_tiles * 4;
    uint32_t value = 0;
    if (m < p.rows) {
      const uint8_t* src = p.input + (b * p.rows + m) * p.cols;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (k0 + j < p.cols) value |= static_cast<uint32_t>(src[k0 + j]) << (8 * j);
      }
    }
    const int64_t offset = b * p.swizzled_bytes + format::SwizzledOffset(m, k0, p.cols);
    *reinterpret_cast<uint32_t*>(p.output + offset) = value;
  }
}

// One thread per byte of the linear output; padding of the swizzled input is never read.
__global__ void __launch_bounds__(kThreads) UnswizzleScalesKernel(const SwizzleParams p) {
  const int64_t total = p.batch * p.rows * p.cols;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * kThreads) {
    const int64_t k = i % p.cols;
    const int64_t bm = i / p.cols;
    const int64_t m = bm % p.rows;
    const int64_t b = bm / p.rows;
    p.output[i] = p.input[b * p.swizzled_bytes + format::SwizzledOffset(m, k, p.cols)];
  }
}

// ---- Host side -------------------------------------------------------------------------------

// Lanes per launch. MXMOE_QUANTIZE_LANES_PER_LAUNCH lowers the limit: a test knob that exercises
// split launches on small inputs (read per call; getenv costs far less than a launch).
int64_t MaxUnitsPerLaunch() {
  if (const char* env = getenv("MXMOE_QUANTIZE_LANES_PER_LAUNCH")) {
    const long long v = atoll(env);
    if (v > 0 && v < kMaxUnitsPerLaunch) return v;
  }
  return kMaxUnitsPerLaunch;
}

int32_t CtasFor(int64_t units, int units_per_thread) {
  const int64_t per_cta = int64_t{kThreads} * units_per_thread;
  return static_cast<int32_t>((units + per_cta - 1) / per_cta);
}

// Lanes per thread (the kernel's kUnits). Small problems (the kUnits = 4 grid would not fill
// every SM twice): 1, so that each thread's serial chain (load, search, SiLU, store) is short and
// the work spreads over as many SMs as possible (H100: 20-45% faster than 4 at T <= 64). Otherwise,
// without SiLU, 4 (4 independent 16-byte loads in flight per thread), or 8 once there are at least
// 16 such CTAs per SM: fewer CTAs, less per-CTA set-up (H100: 0-3% faster than 4, about the
// run-to-run spread). With SiLU the kernel is bound by instruction issue, not by loads in flight:
// 2 (40 registers, against 64 for 4 and 110 for 8; 2 and 4 measured within 3% of each other, 8
// 15% slower). MXMOE_QUANTIZE_UNITS=1|2|4|8 overrides the choice (a benchmark knob, read per call;
// bench/bench_quantize.py records the variants).
int UnitsPerThread(int64_t lanes, bool silu, int sm_count) {
  if (const char* env = getenv("MXMOE_QUANTIZE_UNITS")) {
    const int v = atoi(env);
    if (v == 1 || v == 2 || v == 4 || v == 8) return v;
  }
  const int64_t threads_per_sm_pair = int64_t{2} * sm_count * kThreads;
  if (lanes < threads_per_sm_pair * 4) return 1;
  if (silu) return 2;
  return lanes >= threads_per_sm_pair * 8 * 8 ? 8 : 4;
}

// Kernel variants under test (benchmark knobs, read per call; defaults are the measured
// baseline). MXMOE_QUANTIZE_SILU=fast selects SiluImpl::kFast for the fused SiLU kernels;
// MXMOE_QUANTIZE_SILU=table selects SiluImpl::kTable for bf16 input when every persistent CTA
// gets at least kTableMinTilesPerCta tiles (building the table costs about as much as 23 tiles'
// SiLUs of one thread), kFast otherwise; MXMOE_QUANTIZE_ENCODE=bf16 the packed bf16 encoding for
// bf16 input; MXMOE_QUANTIZE_TABLE_CTAS_PER_SM=1..8 the kTable kernels' persistent CTAs per SM
// (default 4: each builds its own table); MXMOE_QUANTIZE_TABLE_MIN_TILES=N replaces
// kTableMinTilesPerCta (0: the table for any size; tests). All give the same bits as the defaults
// (tests/gpu/quantize_lane_test.cu; the GPU pytest suite compares with the CPU backend under
// each).
constexpr int kTableCtasPerSm = 4;
constexpr int64_t kTableMinTilesPerCta = 8;

bool EnvIs(const char* name, const char* value) {
  const char* env = getenv(name);
  return env != nullptr && strcmp(env, value) == 0;
}

struct KernelVariant {
  bool fast_silu;
  bool table_silu;
  bool bf16_encode;
  int32_t table_ctas;  // persistent data CTAs of the kTable kernels
  int64_t table_min_tiles_per_cta;
};

KernelVariant VariantFromEnv(int sm_count) {
  int table_ctas_per_sm = kTableCtasPerSm;
  if (const char* env = getenv("MXMOE_QUANTIZE_TABLE_CTAS_PER_SM")) {
    const int v = atoi(env);
    if (v >= 1 && v <= 8) table_ctas_per_sm = v;
  }
  int64_t min_tiles = kTableMinTilesPerCta;
  if (const char* env = getenv("MXMOE_QUANTIZE_TABLE_MIN_TILES")) {
    const long long v = atoll(env);
    if (v >= 0) min_tiles = v;
  }
  return {EnvIs("MXMOE_QUANTIZE_SILU", "fast"), EnvIs("MXMOE_QUANTIZE_SILU", "table"),
          EnvIs("MXMOE_QUANTIZE_ENCODE", "bf16"), table_ctas_per_sm * sm_count, min_tiles};
}

template <typename T, SiluImpl kSilu, ScaleMap kMap, int kUnits, quant::Encode kEncode>
mxmoe_status LaunchRows(const RowsParams& p, int32_t data_ctas, size_t smem,
                        cudaStream_t stream) {
  MXMOE_CUDA_RETURN_IF_ERROR(LaunchPdl(QuantizeRowsKernel<T, kSilu, kMap, kUnits, kEncode>,
                                       dim3(p.padding_ctas + data_ctas), dim3(kThreads), smem,
                                       stream, p));
  return MXMOE_STATUS_OK;
}

template <typename T, SiluImpl kSilu, ScaleMap kMap, quant::Encode kEncode>
mxmoe_status LaunchRowsWithUnits(RowsParams p, int units_per_thread, size_t smem,
                                 int32_t persistent_ctas, cudaStream_t stream) {
  int32_t data_ctas = CtasFor(p.units, units_per_thread);
  p.tiles = static_cast<uint32_t>(data_ctas);
  if constexpr (kSilu == SiluImpl::kTable) {
    data_ctas = std::min(data_ctas, persistent_ctas);
    smem = SiluTableOffset(p.num_experts) + quant::kSiluTableBytes;
  }
  if (p.padding_ctas + data_ctas == 0) return MXMOE_STATUS_OK;
  return DispatchValue<1, 2, 4, 8>(units_per_thread, "units per thread", [&](auto units) {
    return LaunchRows<T, kSilu, kMap, decltype(units)::value, kEncode>(p, data_ctas, smem,
                                                                       stream);
  });
}

// Picks the kernel variant: SiLU implementation (kSilu is kNone, kSilu or kGeneral here; only
// kSilu has faster variants) and encoding.
template <typename T, SiluImpl kSilu, ScaleMap kMap>
mxmoe_status LaunchRowsVariant(const RowsParams& p, int units_per_thread, size_t smem,
                               KernelVariant variant, cudaStream_t stream) {
  if constexpr (kSilu == SiluImpl::kSilu) {
    if (variant.table_silu) {
      variant.table_silu = false;
      if constexpr (std::is_same<T, Bf16>::value && kMap == ScaleMap::kExperts) {
        const int64_t tiles = CtasFor(p.units, units_per_thread);
        const size_t table_smem = SiluTableOffset(p.num_experts) + quant::kSiluTableBytes;
        if (tiles >= variant.table_min_tiles_per_cta * variant.table_ctas &&
            table_smem <= 48 * 1024) {
          return LaunchRowsVariant<T, SiluImpl::kTable, kMap>(p, units_per_thread, smem, variant,
                                                              stream);
        }
      }
      variant.fast_silu = true;
    }
    if (variant.fast_silu) {
      variant.fast_silu = false;
      return LaunchRowsVariant<T, SiluImpl::kFast, kMap>(p, units_per_thread, smem, variant,
                                                         stream);
    }
  }
  if constexpr (std::is_same<T, Bf16>::value) {
    if (variant.bf16_encode) {
      return LaunchRowsWithUnits<T, kSilu, kMap, quant::Encode::kBf16Packed>(
          p, units_per_thread, smem, variant.table_ctas, stream);
    }
  }
  return LaunchRowsWithUnits<T, kSilu, kMap, quant::Encode::kFloat>(p, units_per_thread, smem,
                                                                    variant.table_ctas, stream);
}

// Quantizes `rows` rows of `base` (k = 8 * lanes per row) in launches of at most
// MaxUnitsPerLaunch() lanes; the padding CTAs go with the first launch.
template <SiluImpl kImpl, ScaleMap kMap>
mxmoe_status QuantizeRows(RowsParams base, int64_t rows, int64_t k, int32_t dtype,
                          int32_t padding_ctas, int device, cudaStream_t stream) {
  const int64_t lanes_per_row = k / kElemsPerLane;  // <= kMaxUnitsPerLaunch (CanImplement*)
  if (lanes_per_row <= 0) return MXMOE_STATUS_OK;
  base.lanes_per_row = FastDivmod::Make(static_cast<uint32_t>(lanes_per_row));
  base.scale_cols = static_cast<int32_t>(k / format::kBlockSize);
  base.padded_scale_cols =
      static_cast<int32_t>(format::RoundUp(base.scale_cols, format::kSwizzleCols));
  const size_t smem =
      kMap == ScaleMap::kExperts ? (static_cast<size_t>(base.num_experts) + 1) * 8 : 0;
  int sm_count = 0;
  MXMOE_RETURN_IF_ERROR(MultiprocessorCount(device, &sm_count));
  const int units_per_thread =
      UnitsPerThread(rows * lanes_per_row, kImpl != SiluImpl::kNone, sm_count);
  const KernelVariant variant = VariantFromEnv(sm_count);
  const int64_t rows_per_launch = std::max<int64_t>(1, MaxUnitsPerLaunch() / lanes_per_row);
  bool first = true;
  for (int64_t row_begin = 0; row_begin < rows || first; row_begin += rows_per_launch) {
    RowsParams p = base;
    const int64_t launch_rows = std::min(rows_per_launch, rows - row_begin);
    p.row_begin = row_begin;
    p.units = static_cast<uint32_t>(launch_rows * lanes_per_row);
    p.padding_ctas = first ? padding_ctas : 0;
    first = false;
    MXMOE_RETURN_IF_ERROR(DispatchActivationDtype(dtype, "input dtype", [&](auto input_dtype) {
      using T = std::conditional_t<decltype(input_dtype)::value == MXMOE_DTYPE_BF16, Bf16, Fp16>;
      return LaunchRowsVariant<T, kImpl, kMap>(p, units_per_thread, smem, variant, stream);
    }));
  }
  return MXMOE_STATUS_OK;
}

// Quantize and QuantizeWeights: `groups` matrices of `group_rows` rows each.
mxmoe_status QuantizeMatrices(int64_t groups, int64_t group_rows, int64_t k, const void* input,
                              int32_t dtype, uint8_t* packed, uint8_t* scales,
                              int32_t scale_layout, int device, void* stream) {
  const int64_t rows = groups * group_rows;
  if (rows == 0 || k == 0) return MXMOE_STATUS_OK;
  const bool swizzled = scale_layout == MXMOE_SCALE_LAYOUT_SWIZZLED_128X4;

  RowsParams p{};
  p.input = input;
  p.packed = packed;
  p.scales = scales;
  p.input_row_elems = k;
  const auto s = static_cast<cudaStream_t>(stream);
  if (!swizzled) {
    return QuantizeRows<SiluImpl::kNone, ScaleMap::kLinear>(p, rows, k, dtype, 0, device, s);
  }
  p.group_rows = group_rows;
  p.group_bytes = format::SwizzledBytes(group_rows, k / format::kBlockSize);
  p.num_groups = static_cast<int32_t>(groups);
  const int32_t padding_ctas =
      group_rows % format::kSwizzleRows == 0
          ? 0
          : static_cast<int32_t>(std::min<int64_t>(groups, kMaxPaddingCtas));
  return QuantizeRows<SiluImpl::kNone, ScaleMap::kSwizzledGroups>(p, rows, k, dtype,
                                                                  padding_ctas, device, s);
}

}  // namespace

mxmoe_status ExpertsQuantizeRows(const ExpertsQuantizeJob& job, void* stream) {
  if (job.rows == 0 || job.k == 0 || job.num_experts <= 0) return MXMOE_STATUS_OK;

  RowsParams p{};
  p.input = job.input;
  p.packed = job.packed;
  p.scales = job.scales;
  p.input_row_elems = job.activation == ExpertsActivation::kNone ? job.k : 2 * job.k;
  p.up_offset_elems = job.k;
  p.expert_offsets = job.expert_offsets;
  p.blockscale_offsets = job.blockscale_offsets;
  p.num_experts = job.num_experts;
  p.scale_rows = job.scale_rows;
  if (job.row_source != nullptr) {
    p.row_source = job.row_source;
    p.source_divisor = FastDivmod::Make(static_cast<uint32_t>(job.slots_per_token));
    p.source_rows = static_cast<uint32_t>(job.source_rows);
  }
  p.activation = {job.bias, job.bias_dtype, job.activation_kind, job.swiglu_alpha,
                  job.swiglu_limit};
  // One padding CTA per expert (up to kMaxPaddingCtas): the CTAs of empty experts end after two
  // loads, and a non-empty expert's padding (up to 127 rows) gets a whole CTA.
  const int32_t padding_ctas = std::min<int32_t>(job.num_experts, kMaxPaddingCtas);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (job.activation) {
    case ExpertsActivation::kNone:
      return QuantizeRows<SiluImpl::kNone, ScaleMap::kExperts>(p, job.rows, job.k,
                                                               job.input_dtype, padding_ctas,
                                                               job.device, s);
    case ExpertsActivation::kSiluMul:
      return QuantizeRows<SiluImpl::kSilu, ScaleMap::kExperts>(p, job.rows, job.k,
                                                               job.input_dtype, padding_ctas,
                                                               job.device, s);
    case ExpertsActivation::kGeneral:
      return QuantizeRows<SiluImpl::kGeneral, ScaleMap::kExperts>(p, job.rows, job.k,
                                                                  job.input_dtype, padding_ctas,
                                                                  job.device, s);
  }
  return Fail(MXMOE_STATUS_INTERNAL, "experts quantize: unexpected activation ",
              static_cast<int>(job.activation));
}

namespace {

template <mxmoe_dtype kOut>
mxmoe_status LaunchDequantize(const DequantizeParams& base, int64_t rows, int64_t lanes_per_row,
                              cudaStream_t stream) {
  const int64_t rows_per_launch = std::max<int64_t>(1, MaxUnitsPerLaunch() / lanes_per_row);
  for (int64_t row_begin = 0; row_begin < rows; row_begin += rows_per_launch) {
    DequantizeParams p = base;
    p.row_begin = row_begin;
    p.units = static_cast<uint32_t>(std::min(rows_per_launch, rows - row_begin) * lanes_per_row);
    DequantizeKernel<kOut><<<CtasFor(p.units, kDequantizeUnits), kThreads, 0, stream>>>(p);
    MXMOE_CUDA_RETURN_IF_LAUNCH_ERROR();
  }
  return MXMOE_STATUS_OK;
}

// Grid for the grid-stride swizzle kernels: enough CTAs to fill any current GPU, no more.
int32_t GridStrideCtas(int64_t items) {
  return static_cast<int32_t>(std::min<int64_t>((items + kThreads - 1) / kThreads, 16384));
}

}  // namespace

mxmoe_status CanImplementRowQuantize(const char* op, int64_t k) {
  if (k / kElemsPerLane > kMaxUnitsPerLaunch) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, op, ": k = ", k,
                " is too large for the CUDA kernels (at most ", kMaxUnitsPerLaunch * kElemsPerLane,
                ")");
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status CanImplementExpertsQuantize(const char* op, int64_t k, int32_t num_experts) {
  MXMOE_RETURN_IF_ERROR(CanImplementRowQuantize(op, k));
  if (num_experts > kMaxSharedExperts) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, op, ": num_experts must be at most ", kMaxSharedExperts,
                " for the CUDA kernel (both offset arrays in 48 KB of shared memory), got ",
                num_experts);
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status Quantize(const mxmoe_quantize_args& args, void* stream) {
  return QuantizeMatrices(1, args.rows, args.k, args.input, args.input_dtype,
                          args.packed, args.scales, args.scale_layout, args.device.id, stream);
}

mxmoe_status QuantizeWeights(const mxmoe_quantize_weights_args& args, void* stream) {
  return QuantizeMatrices(args.num_experts, args.n, args.k, args.weights,
                          args.weights_dtype, args.packed, args.scales, args.scale_layout,
                          args.device.id, stream);
}

// The two public per-expert quantize calls as one job: the same fields, the width named `k` in
// one and `n` (the output width) in the other.
template <typename Args>
ExpertsQuantizeJob PublicExpertsJob(const Args& args, int64_t width,
                                    ExpertsActivation activation) {
  ExpertsQuantizeJob job;
  job.rows = args.rows;
  job.k = width;
  job.num_experts = args.num_experts;
  job.input = args.input;
  job.input_dtype = args.input_dtype;
  job.expert_offsets = args.expert_offsets;
  job.blockscale_offsets = args.blockscale_offsets;
  job.packed = args.packed;
  job.scales = args.scales;
  job.scale_rows = args.scale_rows;
  job.device = args.device.id;
  job.activation = activation;
  return job;
}

mxmoe_status ExpertsQuantize(const mxmoe_experts_quantize_args& args, void* stream) {
  return ExpertsQuantizeRows(PublicExpertsJob(args, args.k, ExpertsActivation::kNone), stream);
}

mxmoe_status SiluMulExpertsQuantize(const mxmoe_silu_mul_experts_quantize_args& args,
                                    void* stream) {
  return ExpertsQuantizeRows(PublicExpertsJob(args, args.n, ExpertsActivation::kSiluMul), stream);
}

mxmoe_status Dequantize(const mxmoe_dequantize_args& args, void* stream) {
  if (args.rows == 0 || args.k == 0) return MXMOE_STATUS_OK;
  const int64_t lanes_per_row = args.k / kElemsPerLane;  // <= kMaxUnitsPerLaunch (CanImplement*)
  DequantizeParams p{};
  p.packed = args.packed;
  p.scales = args.scales;
  p.output = args.output;
  p.lanes_per_row = FastDivmod::Make(static_cast<uint32_t>(lanes_per_row));
  p.scale_cols = static_cast<int32_t>(args.k / format::kBlockSize);
  p.swizzled = args.scale_layout == MXMOE_SCALE_LAYOUT_SWIZZLED_128X4;
  const auto s = static_cast<cudaStream_t>(stream);
  return DispatchValue<MXMOE_DTYPE_BF16, MXMOE_DTYPE_FP16, MXMOE_DTYPE_FP32>(
      args.output_dtype, "output dtype", [&](auto output_dtype) {
        return LaunchDequantize<decltype(output_dtype)::value>(p, args.rows, lanes_per_row, s);
      });
}

mxmoe_status SwizzleScales(const mxmoe_swizzle_scales_args& args, void* stream) {
  SwizzleParams p{args.input, args.output, args.batch, args.rows, args.cols,
                  format::SwizzledBytes(args.rows, args.cols)};
  const int64_t words = args.batch * p.swizzled_bytes / 4;
  if (words == 0) return MXMOE_STATUS_OK;
  SwizzleScalesKernel<<<GridStrideCtas(words), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  MXMOE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return MXMOE_STATUS_OK;
}

mxmoe_status UnswizzleScales(const mxmoe_swizzle_scales_args& args, void* stream) {
  SwizzleParams p{args.input, args.output, args.batch, args.rows, args.cols,
                  format::SwizzledBytes(args.rows, args.cols)};
  const int64_t bytes = args.batch * args.rows * args.cols;
  if (bytes == 0) return MXMOE_STATUS_OK;
  UnswizzleScalesKernel<<<GridStrideCtas(bytes), kThreads, 0,
                          static_cast<cudaStream_t>(stream)>>>(p);
  MXMOE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return MXMOE_STATUS_OK;
}

}  // namespace cuda
}  // namespace mxmoe
