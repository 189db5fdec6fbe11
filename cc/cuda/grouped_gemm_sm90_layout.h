// The SM90 grouped GEMM's internal formats, shared by the weight preparation, the activation
// conversion and the GEMM kernel (all __host__ __device__, so host tests can emulate them).
//
// Numerics (docs/perf-notes.md, "Numerics"). Per 128-wide K chunk of one row, block scales s0..s3:
//   mx  = max(s0..s3), ref = mx - 6, d_i = s_i - ref = s_i - mx + 6 <= 6;
//   each E2M1 value v of block i becomes the E4M3 value v * 2^d_i, exact for d_i in [-8, 6]
//   (6 * 2^6 = 384 <= 448; 0.5 * 2^-8 = 2^-9, the smallest E4M3 subnormal). Blocks more than
//   14 binades below the chunk's largest (d_i < -8) are rounded to nearest-even on the E4M3
//   subnormal grid (units of 2^-9), d_i <= -13 flushes to zero: the absolute error per element is
//   at most 2^-10 * 2^(ref-127), i.e. below 2^-18.5 of the largest magnitude the chunk's top
//   block can hold (6 * 2^(mx-127)).
//   The chunk's FP8 product is scaled by 2^(refA-127) * 2^(refB-127) and added to an fp32
//   accumulator. A scale byte 0xFF (NaN) anywhere in the chunk makes that factor NaN.
//   Limits: the two factors are applied one after the other in fp32, so a chunk product can
//   underflow when both scales are tiny (refA + refB < ~-20 in unbiased binades with a small
//   product); no real model's scales come near this.
//
// Prepared weights (PrepareWeightsSm90, also built in the workspace for LINEAR/SWIZZLED input):
//   [E][P = ceil(N/64) panels][C = ceil(K/128) chunks] records of kRecordBytes = 4352 bytes:
//     bytes [0, 4096):    the 64x128 E2M1 codes, permuted so that one 16-byte shared-memory load
//                         per thread and k64 gives its WGMMA A fragments (see CodeByteOffset);
//     bytes [4096, 4352): 64 rows x one 32-bit scale word (PreparedScaleWord): per block b of
//                         the chunk, its E4M3 table's byte offset (TableIndex * 8) in bits
//                         8b+3..8b+7, and the chunk's largest scale mx in the spare bits 0..2 of
//                         bytes 0, 1, 2 (mx bits 0-2, 3-5, 6-7). The GEMM then finds a block's
//                         table with one mask and the chunk factor without a max over 4 bytes.
//   Rows past N and K past the real K hold code 0 and scale 0 (padding is exact zero and never
//   raises a chunk's max). Cost: 4.25 bits per weight, plus the padding of N to 64 and K to 128
//   (K = 2880: +2.2%).
//
// Converted activations (workspace, written per call):
//   a8:       [rows, Kp = C*128] E4M3 bytes, K padded with zeros;
//   a_factor: [C, factor_stride] fp32, 2^(refA - 127) of each (row, chunk) (NaN for a 0xFF
//             scale); factor_stride = round_up(rows, 4) + slack for aligned bulk copies.
#ifndef MXMOE_CUDA_GROUPED_GEMM_SM90_LAYOUT_H_
#define MXMOE_CUDA_GROUPED_GEMM_SM90_LAYOUT_H_

#include <stdint.h>

#include "mxmoe/format.h"

namespace mxmoe {
namespace cuda {
namespace sm90 {

constexpr int kPanelRows = 64;    // weight rows per math warpgroup (WGMMA M)
constexpr int kChunkK = 128;      // K per exponent-folding chunk (4 E8M0 blocks)
constexpr int kCodeBytes = kPanelRows * kChunkK / 2;  // 4096
constexpr int kScaleBytes = kPanelRows * 4;            // 256
constexpr int kRecordBytes = kCodeBytes + kScaleBytes;  // 4352, a multiple of 16 (bulk copy)
constexpr int kNumTables = 20;    // E4M3 tables for d = -13 .. 6 (index d + 13)
constexpr int kTableOffset = 13;

MXMOE_HD int64_t NumPanels(int64_t n) { return format::CeilDiv(n, kPanelRows); }
MXMOE_HD int64_t NumChunks(int64_t k) { return format::CeilDiv(k, kChunkK); }

MXMOE_HD int64_t PreparedBytes(int64_t num_experts, int64_t n, int64_t k) {
  return num_experts * NumPanels(n) * NumChunks(k) * kRecordBytes;
}

// E4M3 byte of the E2M1 magnitude `twice`/2 (twice in {0,1,2,3,4,6,8,12}) times 2^d, rounded to
// nearest-even where it is not exact (d < -8). Works in units of 2^-9 (the E4M3 subnormal step):
// units 0..15 are the byte itself (subnormals and the first normal binade).
MXMOE_HD uint8_t E4m3OfTwiceMagnitude(int twice, int d) {
  const int sh = d + 8;  // value = twice * 2^(d-1) = twice * 2^sh units
  uint32_t u;
  if (sh >= 0) {
    u = static_cast<uint32_t>(twice) << sh;
  } else {
    const int s = -sh;
    const uint32_t q = static_cast<uint32_t>(twice) >> s;
    const uint32_t r = static_cast<uint32_t>(twice) & ((1u << s) - 1);
    const uint32_t half = 1u << (s - 1);
    u = q + ((r > half || (r == half && (q & 1u))) ? 1u : 0u);
  }
  if (u < 16) return static_cast<uint8_t>(u);
  int e = 0;
  while ((u >> (e + 1)) != 0) ++e;  // floor(log2(u)) >= 4
  return static_cast<uint8_t>(((e - 2) << 3) | ((u >> (e - 3)) & 7u));
}

// The 8-byte table (magnitudes of codes 0..7, times 2^d) as two words for prmt.
MXMOE_HD void E4m3Table(int d, uint32_t* lo, uint32_t* hi) {
  const int twice[8] = {0, 1, 2, 3, 4, 6, 8, 12};
  uint32_t w[2] = {0, 0};
  for (int i = 0; i < 8; ++i) {
    w[i / 4] |= static_cast<uint32_t>(E4m3OfTwiceMagnitude(twice[i], d)) << (8 * (i % 4));
  }
  *lo = w[0];
  *hi = w[1];
}

// Table index of a block with scale s in a chunk whose largest scale is mx.
MXMOE_HD int TableIndex(int s, int mx) {
  const int idx = s - mx + 6 + kTableOffset;
  return idx < 0 ? 0 : idx;  // s <= mx, so idx <= 19
}

// Largest of the 4 scale bytes packed in a word (a chunk's 4 block scales).
MXMOE_HD int MaxScaleByte(uint32_t w) {
#if defined(__CUDA_ARCH__)
  const uint32_t m = __vmaxu4(w, w >> 16);
  return static_cast<int>(max(m & 0xFFu, (m >> 8) & 0xFFu));
#else
  uint32_t m = 0;
  for (int i = 0; i < 4; ++i) m = ((w >> (8 * i)) & 0xFFu) > m ? ((w >> (8 * i)) & 0xFFu) : m;
  return static_cast<int>(m);
#endif
}

// The prepared scale word of one row and chunk from its 4 block scales (padding blocks: 0).
MXMOE_HD uint32_t PreparedScaleWord(const uint8_t (&scales)[4]) {
  int mx = 0;
  for (int b = 0; b < 4; ++b) mx = scales[b] > mx ? scales[b] : mx;
  uint32_t w = 0;
  for (int b = 0; b < 4; ++b) w |= static_cast<uint32_t>(TableIndex(scales[b], mx) * 8) << (8 * b);
  const uint32_t m = static_cast<uint32_t>(mx);
  return w | (m & 7u) | ((m & 0x38u) << 5) | ((m & 0xC0u) << 10);
}
// Byte offset of block b's table (in an array of kNumTables uint2) in a prepared scale word.
MXMOE_HD uint32_t PreparedTableOffset(uint32_t w, int b) { return (w >> (8 * b)) & 0xF8u; }
// The chunk's largest scale from a prepared scale word.
MXMOE_HD int PreparedMaxScale(uint32_t w) {
  return static_cast<int>((w & 7u) | ((w >> 5) & 0x38u) | ((w >> 10) & 0xC0u));
}

// 2^(mx - 6 - 127) as fp32 (the chunk factor of a chunk whose largest scale is mx); NaN for 0xFF.
// Written with selects (no branches): it sits on the GEMM's per-chunk critical path.
MXMOE_HD float ChunkFactor(int mx) {
  const int biased = mx - 6;  // biased exponent of 2^(mx - 133)
  const uint32_t normal = static_cast<uint32_t>(biased) << 23;
  const uint32_t subnormal = 1u << ((biased + 22) & 31);  // 2^(mx-133) = 2^-149 * 2^(mx+16)
  const uint32_t bits = biased >= 1 ? normal : subnormal;
  return format::BitsFloat(mx == 0xFF ? 0x7FC00000u : bits);
}

// Where the prepared record keeps the code of (row r in [0,64), column kk in [0,128)):
// the byte offset of its 32-bit word and the bit positions of its magnitude (3 bits) and sign.
// A thread (warp w, lane = 4g + t) loads 16 bytes per k64 at ((w*2 + q)*32 + lane)*16: for
// k32 step s = 2q + h, word h*2 + 0 holds row 16w+g, word h*2 + 1 row 16w+g+8. Each word holds
// 8 codes: "first" k 32s+4t+j (WGMMA register a0/a1, byte j) with magnitude at bits 4j..4j+2 and
// sign at bit 8j+7; "second" k 32s+16+4t+j (a2/a3, byte j), magnitude at 16+4j, sign at 8j+3.
// Decoding is then: m = x & 0x77777777; first = prmt(T, m) | (x & 0x80808080);
// second = prmt(T, m >> 16) | ((x << 4) & 0x80808080).
struct CodePosition {
  int word_byte_offset;
  int mag_shift;
  int sign_shift;
};

MXMOE_HD CodePosition CodeByteOffset(int r, int kk) {
  const int w = r / 16, rr = r % 16, g = rr % 8, row_hi = rr / 8;
  const int s = kk / 32, kin = kk % 32, t = (kin % 16) / 4, j = kin % 4, second = kin / 16;
  const int lane = 4 * g + t, q = s / 2, h = s % 2;
  CodePosition p;
  p.word_byte_offset = ((w * 2 + q) * 32 + lane) * 16 + h * 8 + row_hi * 4;
  p.mag_shift = second ? 16 + 4 * j : 4 * j;
  p.sign_shift = second ? 8 * j + 3 : 8 * j + 7;
  return p;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_GROUPED_GEMM_SM90_LAYOUT_H_
