// CPU grouped GEMM (NT, MXFP4 x MXFP4 -> bf16/fp16): c[rows of e] = A[rows of e] x B[e]^T.
//
// Numerics (the reference every GPU GEMM is checked against): for each 32-element block the dot
// product of the codes' twice-values (integers in [-12, 12]) is computed exactly in int32, scaled
// by 2^(sa - 127) * 2^(sb - 127) / 4 in double (exact: a power of two times an integer below
// 2^13), and accumulated over K in double in block order; the sum is rounded once to the output
// dtype (round-to-odd to fp32, then nearest-even, see element_io.h). A scale byte 0xFF is NaN.
//
// Work: each expert's output is cut into items of up to kChunkRows rows x kTileCols columns.
// An item decodes its B tile (kTileCols weight rows) once into int16 twice-values and double
// scales, then walks its rows kTileRows at a time, decoding each A tile once. The inner kernel
// computes 4 output columns per A row with SSE2 integer multiply-adds when available; the
// portable loop computes the same integers and the same double operations in the same order,
// so both give identical bits.
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cc/cpu/cpu_backend.h"
#include "cc/cpu/element_io.h"
#include "cc/cpu/mxfp4_block.h"
#include "cc/cpu/parallel.h"
#include "mxmoe/format.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace mxmoe {
namespace cpu {
namespace {

constexpr int64_t kTileRows = 32;    // A rows decoded at once
constexpr int64_t kTileCols = 64;    // B rows (output columns) decoded per item
constexpr int64_t kChunkRows = 256;  // A rows per item, so large experts spread over threads

// Twice the value of the low and high code of every byte.
struct CodePairTable {
  int16_t twice[256][2];
  CodePairTable() {
    for (int byte = 0; byte < 256; ++byte) {
      twice[byte][0] = static_cast<int16_t>(format::E2M1TwiceValue(byte & 0xF));
      twice[byte][1] = static_cast<int16_t>(format::E2M1TwiceValue(byte >> 4));
    }
  }
};

// 2^(s - 127) * multiplier as double for every scale byte s; NaN for 0xFF.
struct ScaleTable {
  double value[256];
  explicit ScaleTable(double multiplier) {
    for (int s = 0; s < 255; ++s) value[s] = std::ldexp(multiplier, s - 127);
    value[255] = std::nan("");
  }
};

const CodePairTable& CodePairs() {
  static const CodePairTable table;
  return table;
}
// A's factor carries the 1/4 that turns a product of twice-values back into a product of values.
const ScaleTable& AScales() {
  static const ScaleTable table(0.25);
  return table;
}
const ScaleTable& BScales() {
  static const ScaleTable table(1.0);
  return table;
}

// Where expert e's weight row j and its scales live, whatever the weight format.
class WeightView {
 public:
  explicit WeightView(const mxmoe_expert_weights& w)
      : packed_(w.packed),
        scales_(w.scales),
        swizzled_(w.format == MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4),
        n_(w.n),
        k_(w.k),
        scale_cols_(w.k / kBlock) {
    if (w.format == MXMOE_WEIGHT_FORMAT_PREPARED) {  // CPU prepared = LINEAR codes then scales
      scales_ = w.packed + int64_t{w.num_experts} * w.n * (w.k / 2);
    }
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

// A tile of decoded rows: twice-values [rows, k] and per-block scale factors [rows, k/32].
struct DecodedTile {
  std::vector<int16_t> values;
  std::vector<double> factors;
  void Resize(int64_t rows, int64_t k) {
    values.resize(static_cast<size_t>(rows * k));
    factors.resize(static_cast<size_t>(rows * (k / kBlock)));
  }
};

// Decodes row `r` of a tile from its packed codes and its scale bytes (scale_of(block)).
template <typename ScaleOf>
void DecodeRow(const uint8_t* packed, int64_t k, const ScaleOf& scale_of, const ScaleTable& table,
               int16_t* values, double* factors) {
  const CodePairTable& pairs = CodePairs();
  for (int64_t i = 0; i < k / 2; ++i) {
    values[2 * i] = pairs.twice[packed[i]][0];
    values[2 * i + 1] = pairs.twice[packed[i]][1];
  }
  for (int64_t b = 0; b < k / kBlock; ++b) factors[b] = table.value[scale_of(b)];
}

inline int32_t BlockDot(const int16_t* a, const int16_t* b) {
  int32_t sum = 0;
  for (int i = 0; i < kBlock; ++i) sum += int32_t{a[i]} * int32_t{b[i]};
  return sum;
}

// acc[c] for one A row and `cols` (<= 4 when vectorised) B rows: sum over blocks of
// dot * (fa * fb), added in block order.
void RowTimesColumns(const int16_t* a, const double* fa, const int16_t* const* b,
                     const double* const* fb, int cols, int64_t blocks, double* acc) {
#if defined(__SSE2__)
  if (cols == 4) {
    __m128d acc01 = _mm_setzero_pd();
    __m128d acc23 = _mm_setzero_pd();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t o = blk * kBlock;
      __m128i p[4];
      for (int c = 0; c < 4; ++c) {
        __m128i s = _mm_setzero_si128();
        for (int i = 0; i < kBlock; i += 8) {
          const __m128i va = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + o + i));
          const __m128i vb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[c] + o + i));
          s = _mm_add_epi32(s, _mm_madd_epi16(va, vb));
        }
        p[c] = s;
      }
      // Transpose-reduce the four 4-lane partial sums into [dot0, dot1, dot2, dot3].
      const __m128i t01 = _mm_add_epi32(_mm_unpacklo_epi32(p[0], p[1]),
                                        _mm_unpackhi_epi32(p[0], p[1]));
      const __m128i t23 = _mm_add_epi32(_mm_unpacklo_epi32(p[2], p[3]),
                                        _mm_unpackhi_epi32(p[2], p[3]));
      const __m128i dots = _mm_add_epi32(_mm_unpacklo_epi64(t01, t23),
                                         _mm_unpackhi_epi64(t01, t23));
      const __m128d d01 = _mm_cvtepi32_pd(dots);
      const __m128d d23 = _mm_cvtepi32_pd(_mm_unpackhi_epi64(dots, dots));
      const __m128d a_factor = _mm_set1_pd(fa[blk]);
      const __m128d f01 = _mm_mul_pd(a_factor, _mm_set_pd(fb[1][blk], fb[0][blk]));
      const __m128d f23 = _mm_mul_pd(a_factor, _mm_set_pd(fb[3][blk], fb[2][blk]));
      acc01 = _mm_add_pd(acc01, _mm_mul_pd(d01, f01));
      acc23 = _mm_add_pd(acc23, _mm_mul_pd(d23, f23));
    }
    _mm_storeu_pd(acc, acc01);
    _mm_storeu_pd(acc + 2, acc23);
    return;
  }
#endif
  for (int c = 0; c < cols; ++c) {
    double sum = 0.0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const double dot = static_cast<double>(BlockDot(a + blk * kBlock, b[c] + blk * kBlock));
      sum += dot * (fa[blk] * fb[c][blk]);
    }
    acc[c] = sum;
  }
}

struct WorkItem {
  int32_t expert;
  int64_t row_begin;  // within the expert
  int64_t col_begin;
};

}  // namespace

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
  if (k == 0) {  // empty sums: every output element is +0
    for (int64_t i = 0; i < offsets[num_experts] * n; ++i) {
      StoreFromDouble(args.c, args.c_dtype, i, 0.0);
    }
    return MXMOE_STATUS_OK;
  }

  std::vector<WorkItem> items;
  for (int32_t e = 0; e < num_experts; ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    for (int64_t r = 0; r < rows; r += kChunkRows) {
      for (int64_t j = 0; j < n; j += kTileCols) items.push_back({e, r, j});
    }
  }

  const WeightView weights(args.b);
  const ScaleTable& a_table = AScales();
  const ScaleTable& b_table = BScales();
  ParallelFor(static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    DecodedTile a_tile;
    DecodedTile b_tile;
    a_tile.Resize(kTileRows, k);
    b_tile.Resize(kTileCols, k);
    for (int64_t it = begin; it < end; ++it) {
      const WorkItem& item = items[it];
      const int32_t e = item.expert;
      const int64_t rows = offsets[e + 1] - offsets[e];
      const int64_t cols = std::min(kTileCols, n - item.col_begin);
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t j = item.col_begin + c;
        DecodeRow(
            weights.Row(e, j), k, [&](int64_t b) { return weights.Scale(e, j, b); }, b_table,
            &b_tile.values[c * k], &b_tile.factors[c * blocks]);
      }
      const int64_t row_end = std::min(rows, item.row_begin + kChunkRows);
      const uint8_t* a_scales = args.a_scales + scale_offsets[e] * padded_scale_cols;
      for (int64_t r0 = item.row_begin; r0 < row_end; r0 += kTileRows) {
        const int64_t tile_rows = std::min(kTileRows, row_end - r0);
        for (int64_t r = 0; r < tile_rows; ++r) {
          const int64_t i = r0 + r;  // row within the expert
          DecodeRow(
              args.a + (offsets[e] + i) * (k / 2), k,
              [&](int64_t b) { return a_scales[format::SwizzledOffset(i, b, blocks)]; }, a_table,
              &a_tile.values[r * k], &a_tile.factors[r * blocks]);
        }
        for (int64_t r = 0; r < tile_rows; ++r) {
          const int64_t out_row = offsets[e] + r0 + r;
          for (int64_t c = 0; c < cols; c += 4) {
            const int group = static_cast<int>(std::min<int64_t>(4, cols - c));
            const int16_t* b_rows[4];
            const double* b_factors[4];
            for (int g = 0; g < group; ++g) {
              b_rows[g] = &b_tile.values[(c + g) * k];
              b_factors[g] = &b_tile.factors[(c + g) * blocks];
            }
            double acc[4];
            RowTimesColumns(&a_tile.values[r * k], &a_tile.factors[r * blocks], b_rows,
                            b_factors, group, blocks, acc);
            for (int g = 0; g < group; ++g) {
              StoreFromDouble(args.c, args.c_dtype, out_row * n + item.col_begin + c + g,
                              acc[g]);
            }
          }
        }
      }
    }
  });
  return MXMOE_STATUS_OK;
}

}  // namespace cpu
}  // namespace mxmoe
