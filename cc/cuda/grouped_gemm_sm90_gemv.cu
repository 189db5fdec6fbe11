// SM90 grouped GEMM for a few rows in all (decode: at most kGemvMaxRows, or kGemvWideMaxRows where
// its grid is a few waves; grouped_gemm_sm90_heuristics.h): a CUDA-core kernel
// that streams the PREPARED weight records (grouped_gemm_sm90_layout.h) from global memory and
// computes exact integer block dots with dp4a, instead of the WGMMA kernel's
// decode -> FP8 WGMMA -> promote chain, whose per-chunk latency dominates when a token tile holds
// one token (docs/perf-notes.md, "The CUDA-core path for few rows, built").
//
// Work: one CTA per (active expert slot, 64-row weight panel); slot j takes the j-th expert with
// rows (a block-wide count over expert_offsets). Its W warps (8, fewer where K has fewer chunks)
// split the panel's 128-wide K chunks (warp w takes chunks w, w + W, ...);
// each warp's first chunk is loaded before the activations are staged, and the next half-chunk's
// loads are in flight while one is computed. Per group of up to 4 of the expert's rows:
//   - the rows' MXFP4 codes are staged in shared memory as int8 twice-values (-12..12), laid out
//     so that a lane's 16-byte load matches the k positions of its 16-byte weight load, and each
//     block's activation factor 2^(sa - 129) as fp32 (0 for padding blocks past K; NaN for a 0xFF
//     scale);
//   - a lane loads, per chunk, the 8 16-byte pieces it owns of the record (rows 16w + g and
//     16w + g + 8 of each 16-row group w, 8 k of each of the chunk's 4 blocks: CodeByteOffset) and
//     the 8 rows' scale words; each 32-bit word (8 codes of one row and block) becomes two int8x4
//     words through prmt tables (magnitude, negated magnitude, and the sign bit replicated as a
//     byte mask), and two dp4a per row give the lane's part of the block's integer dot;
//   - the part is scaled exactly: float(dot) * 2^(s_w - 127) (one multiply: the row's
//     2^(mx - 146) times the block's 2^idx from a 20-entry table; idx 0, the blocks the WGMMA
//     path flushes to zero, gives 0), then fused-multiply-added with the activation factor into
//     an fp32 accumulator per (row, token);
//   - the lanes of a row (4) and the warps (W) are summed in a fixed order, and one thread per
//     (row, token) rounds to bf16/fp16 and stores.
// Numerics: every block dot and its scaling are exact; only the fp32 sum order differs from the
// WGMMA kernel (per lane over its chunks, then 4 lanes, then W warps), and blocks more than 14
// binades below their chunk's largest are computed exactly here (the WGMMA path rounds them onto
// the E4M3 subnormal grid) except those 19 or more binades below, which both paths flush to zero
// (the prepared record keeps only a clamped table index for them). Within docs/format.md's bound.
// Writes: exactly the expert rows [expert_offsets[e], expert_offsets[e+1]) clipped to
// [0, rows), columns < n; nothing else, except with the MoE chain's fused weighted reduce
// (GemvKernelParams::reduce): then also the panel counters and, by each panel's last CTA, the
// panel's columns of every token's output row.
// In the MoE chain (offsets_before_wait) the expert search and the first chunk's weight loads
// come before the PDL wait (pdl.cuh); standalone, the kernel waits first.
// Activation source (GemvSource, a template parameter): standalone, the MXFP4 codes and swizzled
// scales (kMxfp4). In the MoE chain, the 16-bit rows the chain's quantize kernel would read:
// the gathered tokens (kGather, GEMM 1) or GEMM 1's [gate | up] output with SiLU (kSiluMul) or
// the layer's bias and activation (kGeneral, GEMM 2). Each CTA quantizes its expert's rows
// while staging them, with quantize_device.cuh's functions (the quantize kernel's QuantizeTile
// calls the same ones), so the staged codes and factors, and hence the output, are bit for bit
// those of quantize-then-GEMM. The CTAs of one expert (one per weight panel) each repeat that
// work on their own critical path, so it beats the quantize kernel only where the grid is one
// wave (measured; GroupedGemmSm90TakesSource in grouped_gemm_sm90.cu decides).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cc/base/cuda_check.h"
#include "cc/base/status.h"
#include "cc/cuda/grouped_gemm_sm90_kernel.h"
#include "cc/cuda/grouped_gemm_sm90_layout.h"
#include "cc/cuda/pdl.cuh"
#include "cc/cuda/quantize_device.cuh"
#include "cc/cuda/weighted_reduce.cuh"
#include "mxmoe/format.h"

namespace mxmoe {
namespace cuda {
namespace sm90 {
namespace {

// Warps per CTA: 8, or fewer where K has fewer than 8 chunks.
constexpr int kGemvMaxWarps = 8;
constexpr int kGemvMaxThreads = 32 * kGemvMaxWarps;

// prmt tables: twice the magnitude of E2M1 codes 0..7 as int8, and its negation.
constexpr uint32_t kPosLo = 0x03020100u, kPosHi = 0x0C080604u;
constexpr uint32_t kNegLo = 0xFDFEFF00u, kNegHi = 0xF4F8FAFCu;

// 16-byte streaming load (each weight byte is read once per row group: keep it out of L1). Not
// volatile, so the compiler may batch the loads of a chunk.
__device__ __forceinline__ uint4 LoadWeights16(const void* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}

// Four codes of a prepared word -> four int8 twice-values. `mag` holds the 3-bit magnitudes in
// the low nibbles of its low 16 bits (bit 3 of each nibble clear), `sign` the signs in bits
// 7, 15, 23, 31.
__device__ __forceinline__ uint32_t SignedTwice(uint32_t mag, uint32_t sign) {
  const uint32_t pos = __byte_perm(kPosLo, kPosHi, mag);
  const uint32_t neg = __byte_perm(kNegLo, kNegHi, mag);
  // 0xFF per byte whose bit 7 is set: prmt's sign-replicate selectors (8 + byte). Inline PTX:
  // __byte_perm is specified with 3-bit selectors only.
  uint32_t mask;
  asm("prmt.b32 %0, %1, 0, 0xBA98;" : "=r"(mask) : "r"(sign));
  return (pos & ~mask) | (neg & mask);
}

// 2^e as fp32 for e in [-149, 127] (subnormals included).
__device__ __forceinline__ float Pow2(int e) {
  return e >= -126 ? format::BitsFloat(static_cast<uint32_t>(e + 127) << 23)
                   : format::BitsFloat(1u << (e + 149));
}

// Shared memory (dynamic): the experts' offsets, the staged activations of one row group
// (kGemvMaxTokens x Kp int8), their block factors (kGemvMaxTokens x 4C fp32) and the cross-warp
// partial sums (8 warps x 64 rows x kGemvMaxTokens fp32).
struct GemvSmem {
  int offsets;  // (E + 1) int32
  int act;      // kGemvMaxTokens * Kp bytes, 16-aligned
  int factors;  // kGemvMaxTokens * 4C floats
  int partial;  // kGemvMaxWarps * 64 * kGemvMaxTokens floats
  int pairs;    // the fused reduce: kGemvReduceMaxPairs x (row, weight, expert) int32/fp32
  int y;        // the fused reduce: kGemvReduceMaxPairs x 64 y values (16-bit)
  int bias;     // the fused reduce: kGemvReduceMaxPairs x 64 bias values (fp32)
  int total;
};

__host__ __device__ inline GemvSmem GemvLayout(int num_experts, int num_chunks) {
  GemvSmem s;
  int at = 0;
  s.offsets = at;
  at += static_cast<int>(format::RoundUp(4 * (num_experts + 1), 16));
  s.act = at;
  at += kGemvMaxTokens * num_chunks * kChunkK;
  s.factors = at;
  at += kGemvMaxTokens * num_chunks * 4 * 4;
  s.partial = at;
  at += kGemvMaxWarps * kPanelRows * kGemvMaxTokens * 4;
  s.pairs = at;
  at += kGemvReduceMaxPairs * 3 * 4;
  s.y = at;
  at += kGemvReduceMaxPairs * kPanelRows * 2;
  s.bias = at;
  at += kGemvReduceMaxPairs * kPanelRows * 4;
  s.total = at;
  return s;
}

// Panel row of a lane's row slot i = 2w + rh (16-row group w, upper half rh) for lane group g.
__device__ __forceinline__ int LaneRow(int i, int g) { return 16 * (i >> 1) + g + 8 * (i & 1); }

// Stages one word of 8 MXFP4 codes (element j in bits 4j..4j+3) of staged token `tok`, elements
// k0..k0+7, as int8 twice-values in the lane order of GemvHalfChunk: k = 32s + 16 half + 4t + j
// lives at byte 64q + 16t + 8h + 4 half + j of its chunk, s = 2q + h.
__device__ __forceinline__ void StageCodes(uint8_t* act, int tok, int kp, int k0,
                                           uint32_t codes) {
  uint32_t out[2];
#pragma unroll
  for (int hw = 0; hw < 2; ++hw) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int tv = format::E2M1TwiceValue(static_cast<uint8_t>((codes >> (16 * hw + 4 * j)) &
                                                                 0xFu));
      word |= (static_cast<uint32_t>(tv) & 0xFFu) << (8 * j);
    }
    out[hw] = word;
  }
  const int c = k0 / kChunkK, kk = k0 % kChunkK;
  const int s = kk / 32, kin = kk % 32, half = kin / 16, t = (kin % 16) / 4;
  const int q = s >> 1, h = s & 1;
  uint8_t* dst = act + tok * kp + c * kChunkK + q * 64 + h * 8 + half * 4;
  *reinterpret_cast<uint32_t*>(dst + t * 16) = out[0];
  *reinterpret_cast<uint32_t*>(dst + (t + 1) * 16) = out[1];
}

// A block's activation factor 2^(sa - 129) as fp32: NaN for scale 0xFF, 0 for kPaddingScale (a
// padding block past K, whose codes are zero).
constexpr uint32_t kPaddingScale = 0x100;
__device__ __forceinline__ float BlockFactor(uint32_t sa) {
  return sa == kPaddingScale ? 0.0f
         : sa == 0xFF        ? format::BitsFloat(0x7FC00000u)
                             : Pow2(static_cast<int>(sa) - 129);
}

// Stages rows r0 .. r0 + nt - 1 from MXFP4 codes and swizzled scales (GemvSource::kMxfp4), in
// passes whose loads are all in flight before any is used: items [0, code_items) are one
// (token, 8 codes) each, a 32-bit load; then one (token, block) scale each. Tokens nt..staged-1
// and blocks past K are staged as zeros.
__device__ __forceinline__ void StageMxfp4(const GemvKernelParams& p, int64_t r0, int nt,
                                           int staged, int64_t scale_base, int64_t expert_start,
                                           int kp, uint8_t* act, float* fac, int tid,
                                           int nthreads) {
  const int num_chunks = p.num_chunks;
  const int scale_cols = p.k / 32;
  const int words_per_row = kp / 8;
  const int code_items = staged * words_per_row;
  const int items = code_items + staged * num_chunks * 4;
  constexpr int kUnroll = 4;
  for (int i0 = tid; i0 < items; i0 += kUnroll * nthreads) {
    uint32_t val[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * nthreads;
      val[u] = 0;
      if (i < code_items) {
        const int tok = i / words_per_row, k0 = (i - tok * words_per_row) * 8;
        if (tok < nt && k0 < p.k) {
          val[u] =
              __ldg(reinterpret_cast<const uint32_t*>(p.a + (r0 + tok) * (p.k / 2) + k0 / 2));
        }
      } else if (i < items) {
        const int j = i - code_items;
        const int tok = j / (num_chunks * 4), kb = j - tok * (num_chunks * 4);
        val[u] = kPaddingScale;
        if (tok < nt && kb < scale_cols) {
          const int64_t scale_row = scale_base + (r0 + tok - expert_start);
          val[u] = p.a_scales[format::SwizzledOffset(scale_row, kb, scale_cols)];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * nthreads;
      if (i < code_items) {
        const int tok = i / words_per_row, k0 = (i - tok * words_per_row) * 8;
        StageCodes(act, tok, kp, k0, val[u]);
      } else if (i < items) {
        fac[i - code_items] = BlockFactor(val[u]);
      }
    }
  }
}

// Stages rows r0 .. r0 + nt - 1 of expert e from 16-bit rows (GemvSource kGather, kSiluMul,
// kGeneral), quantized here exactly as the MoE's quantize kernel does (quantize.cu's QuantizeTile:
// the same gather, activation and QuantizeLane), so the staged codes and factors are those that
// kernel's output would give. One lane per 8 elements, four lanes per 32-element block (all 32
// lanes of a warp call QuantizeLane together: the loop bound is warp-uniform); the loads of
// kUnroll lanes per thread are in flight before any is used.
template <typename T, GemvSource kSource>
__device__ __forceinline__ void StageQuantized(const GemvKernelParams& p, int e, int64_t r0,
                                               int nt, int staged, int kp, uint8_t* act,
                                               float* fac, int tid, int nthreads) {
  constexpr bool kPairs = kSource != GemvSource::kGather;  // [gate | up] rows of width 2k
  const uint16_t* src = static_cast<const uint16_t*>(p.src);
  const int64_t row_elems = kPairs ? 2 * int64_t{p.k} : p.k;
  const int lanes_per_row = kp / 8;
  const int lanes = staged * lanes_per_row;
  const int lane = tid & 31;
  // kGeneral (bias loads, SwiGLU) at 4 lanes per thread spills 84 bytes (ptxas, sm_90a); at 2
  // it spills no more than the other kinds.
  constexpr int kUnroll = kSource == GemvSource::kGeneral ? 2 : 4;
  for (int b0 = tid - lane; b0 < lanes; b0 += kUnroll * nthreads) {
    uint4 g[kUnroll], up[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = b0 + u * nthreads + lane;
      const int tok = i / lanes_per_row, k0 = (i - tok * lanes_per_row) * 8;
      valid[u] = i < lanes && tok < nt && k0 < p.k;
      g[u] = make_uint4(0, 0, 0, 0);
      up[u] = make_uint4(0, 0, 0, 0);
      if (valid[u]) {
        int64_t row = r0 + tok;
        if constexpr (kSource == GemvSource::kGather) {
          const int32_t slot = p.row_source[row];
          const int32_t token = slot < 0 ? 0 : slot / p.slots_per_token;
          row = token < p.source_rows ? token : 0;
        }
        const uint16_t* at = src + row * row_elems + k0;
        g[u] = __ldcg(reinterpret_cast<const uint4*>(at));
        if constexpr (kPairs) up[u] = __ldcg(reinterpret_cast<const uint4*>(at + p.k));
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (b0 + u * nthreads >= lanes) break;  // warp-uniform
      const int i = b0 + u * nthreads + lane;
      const int tok = i / lanes_per_row, k0 = (i - tok * lanes_per_row) * 8;
      quant::Lane8 x = quant::AsLane8(g[u]);
      if constexpr (kSource == GemvSource::kSiluMul) {
        if (valid[u]) x = quant::SiluMulChecked<T>(quant::AsLane8(g[u]), quant::AsLane8(up[u]));
      } else if constexpr (kSource == GemvSource::kGeneral) {
        if (valid[u]) {
          x = quant::BiasActivation<T>(p.activation, quant::AsLane8(g[u]),
                                       quant::AsLane8(up[u]), e, p.k, k0);
        }
      }
      const quant::QuantizedLane q = quant::QuantizeLane<T>(x);
      if (i < lanes) {
        StageCodes(act, tok, kp, k0, valid[u] ? q.codes : 0u);
        // The block's 4 lanes are valid alike (k % 32 == 0); its first lane stores the factor.
        if (lane % 4 == 0) fac[i / 4] = BlockFactor(valid[u] ? q.scale : kPaddingScale);
      }
    }
  }
}

// Half q (blocks 2q and 2q + 1) of one chunk for kTok staged tokens: v[w] is the lane's 16-byte
// piece of 16-row group w; acc[i][tok] for the lane's rows i = 2w + rh (row 16w + g + 8rh).
template <int kTok>
__device__ __forceinline__ void GemvHalfChunk(const uint4 (&v)[4], const uint32_t (&sw)[8],
                                              const float (&base)[8], const uint8_t* act,
                                              const float* fac, int c, int q, int kp,
                                              int num_chunks, int t, const float* pow2_idx,
                                              float (&acc)[8][kTok]) {
  uint4 a[kTok];
  float2 fa[kTok];
#pragma unroll
  for (int tok = 0; tok < kTok; ++tok) {
    a[tok] = *reinterpret_cast<const uint4*>(act + tok * kp + c * kChunkK + q * 64 + t * 16);
    fa[tok] = *reinterpret_cast<const float2*>(fac + (tok * num_chunks + c) * 4 + 2 * q);
  }
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const uint32_t words[4] = {v[w].x, v[w].y, v[w].z, v[w].w};  // (h, rh) = 00 01 10 11
#pragma unroll
    for (int hw = 0; hw < 4; ++hw) {
      const int h = hw >> 1, rh = hw & 1, i = 2 * w + rh;
      const uint32_t x = words[hw];
      const uint32_t m = x & 0x77777777u;
      const uint32_t first = SignedTwice(m, x);
      const uint32_t second = SignedTwice(m >> 16, x << 4);
      const float fw = base[i] * pow2_idx[PreparedTableOffset(sw[i], 2 * q + h) >> 3];
#pragma unroll
      for (int tok = 0; tok < kTok; ++tok) {
        const uint32_t af = h ? a[tok].z : a[tok].x;
        const uint32_t as = h ? a[tok].w : a[tok].y;
        const int dot = __dp4a(static_cast<int>(second), static_cast<int>(as),
                               __dp4a(static_cast<int>(first), static_cast<int>(af), 0));
        acc[i][tok] = fmaf(static_cast<float>(dot) * fw, h ? fa[tok].y : fa[tok].x, acc[i][tok]);
      }
    }
  }
}

// A warp's loads of one chunk record straight from global memory: half q's 4 16-byte code
// pieces, or the 8 rows' scale words.
struct GemvLoader {
  const uint8_t* __restrict__ records;  // the panel's first record
  int lane;

  __device__ __forceinline__ void Codes(int c, int q, uint4 (&v)[4]) const {
    const uint8_t* rec = records + static_cast<int64_t>(c) * kRecordBytes;
#pragma unroll
    for (int w = 0; w < 4; ++w) v[w] = LoadWeights16(rec + ((2 * w + q) * 32 + lane) * 16);
  }
  __device__ __forceinline__ void Scales(int c, uint32_t (&sw)[8]) const {
    const uint8_t* rec = records + static_cast<int64_t>(c) * kRecordBytes + kCodeBytes;
    const int g = lane >> 2;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      sw[i] = __ldg(reinterpret_cast<const uint32_t*>(rec + 4 * LaneRow(i, g)));
    }
  }
};

// The warp's chunks (warp, warp + warps, ...) for kTok tokens, in half-chunk steps (the next
// step's loads are in flight while one is computed). v and sw hold the first chunk's half 0 and
// scale words on entry (loaded by the caller, before the activations were staged); on exit,
// with `reload`, they hold them again for the next row group. Leaves the lane's sums in `acc`.
template <int kTok>
__device__ __forceinline__ void GemvPanel(const GemvLoader& ld, uint4 (&v)[4],
                                          uint32_t (&sw)[8], bool reload, const uint8_t* act,
                                          const float* fac, int kp, int num_chunks, int warp,
                                          int warps, const float* pow2_idx,
                                          float (&acc)[8][kTok]) {
  const int t = ld.lane & 3;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int tok = 0; tok < kTok; ++tok) acc[i][tok] = 0.0f;
  }
  for (int c = warp; c < num_chunks; c += warps) {
    // Per row: 2^(mx - 146) (NaN for a 0xFF scale); times the table's 2^idx it is 2^(s_w - 127).
    float base[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int mx = PreparedMaxScale(sw[i]);
      base[i] = mx == 0xFF ? format::BitsFloat(0x7FC00000u) : Pow2(mx - 146);
    }
    uint4 vn[4];
    ld.Codes(c, 1, vn);
    GemvHalfChunk<kTok>(v, sw, base, act, fac, c, 0, kp, num_chunks, t, pow2_idx, acc);
    uint32_t swc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) swc[i] = sw[i];
    const int next = c + warps < num_chunks ? c + warps : (reload ? warp : -1);
    if (next >= 0) {
      ld.Codes(next, 0, v);
      ld.Scales(next, sw);
    }
    GemvHalfChunk<kTok>(vn, swc, base, act, fac, c, 1, kp, num_chunks, t, pow2_idx, acc);
  }
}

template <int kTok>
__device__ __forceinline__ void GemvGroup(const GemvLoader& ld, uint4 (&v)[4], uint32_t (&sw)[8],
                                          bool reload, const uint8_t* act, const float* fac,
                                          float* partial, int kp, int num_chunks, int warp,
                                          int warps, const float* pow2_idx) {
  const int lane = ld.lane;
  float acc[8][kTok];
  GemvPanel<kTok>(ld, v, sw, reload, act, fac, kp, num_chunks, warp, warps, pow2_idx, acc);
  // Sum the 4 lanes of each row (t = lane & 3), then lane t = 0 writes the warp's partials.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int tok = 0; tok < kTok; ++tok) {
      float x = acc[i][tok];
      x += __shfl_xor_sync(0xFFFFFFFFu, x, 1);
      x += __shfl_xor_sync(0xFFFFFFFFu, x, 2);
      acc[i][tok] = x;
    }
  }
  if ((lane & 3) == 0) {
    const int g = lane >> 2;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int row = LaneRow(i, g);
#pragma unroll
      for (int tok = 0; tok < kTok; ++tok) {
        partial[(warp * kPanelRows + row) * kGemvMaxTokens + tok] = acc[i][tok];
      }
    }
  }
}

// The fused weighted reduce of one panel's columns [64 panel, 64 panel + 64) for every token,
// run by the panel's last CTA once every CTA of the panel has stored its y rows (or, with no rows
// at all, by slot 0's CTA: every output is then zero). The pairs' y (and bias) go to shared memory
// with all their loads in flight at once; then one thread per (token, 8 columns) runs
// weighted_reduce.cuh's ReduceEight, the arithmetic of the reduce kernel.
template <typename T>
__device__ __forceinline__ void GemvFusedReduceAs(const GemvKernelParams& p, int panel,
                                                  const int32_t* pair_row,
                                                  const float* pair_weight,
                                                  const int32_t* pair_expert, uint8_t* y_smem,
                                                  float* bias_smem, int tid, int nthreads) {
  const ReduceParams& r = p.reduce;
  const int pairs = static_cast<int>(r.num_tokens) * r.slots_per_token;
  const int col0 = panel * kPanelRows;
  const int vecs = min(kPanelRows, p.n - col0) / 8;  // n % 32 == 0: whole 8-column vectors
  const bool with_bias = r.bias != nullptr;
  uint16_t* ys = reinterpret_cast<uint16_t*>(y_smem);
  for (int i = tid; i < pairs * vecs; i += nthreads) {
    const int pair = i / vecs, vec = i % vecs;
    const int32_t row = pair_row[pair];
    if (row < 0) continue;
    const int64_t column = col0 + 8 * vec;
    *reinterpret_cast<uint4*>(ys + pair * kPanelRows + 8 * vec) = __ldcg(
        reinterpret_cast<const uint4*>(r.expert_outputs + row * int64_t{r.hidden_size} + column));
    if (with_bias) {
      const int64_t b = static_cast<int64_t>(pair_expert[pair]) * r.hidden_size + column;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        bias_smem[pair * kPanelRows + 8 * vec + j] =
            quant::LoadAsFloat(r.bias, r.bias_dtype, b + j);
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < static_cast<int>(r.num_tokens) * vecs; i += nthreads) {
    const int token = i / vecs, vec = i % vecs;
    const int first = token * r.slots_per_token;
    const uint4 out = ReduceEight<T>(
        r.slots_per_token, with_bias, [&](int s) { return pair_row[first + s]; },
        [&](int s) { return pair_weight[first + s]; },
        [&](int s, int32_t) {
          return quant::AsLane8(
              *reinterpret_cast<const uint4*>(ys + (first + s) * kPanelRows + 8 * vec));
        },
        [&](int s, int j) { return bias_smem[(first + s) * kPanelRows + 8 * vec + j]; });
    *reinterpret_cast<uint4*>(r.output + token * int64_t{r.hidden_size} + col0 + 8 * vec) = out;
  }
}

__device__ __forceinline__ void GemvFusedReduce(const GemvKernelParams& p, int panel,
                                                const int32_t* pair_row, const float* pair_weight,
                                                const int32_t* pair_expert, uint8_t* y_smem,
                                                float* bias_smem, int tid, int nthreads) {
  if (p.c_is_fp16) {
    GemvFusedReduceAs<quant::Fp16>(p, panel, pair_row, pair_weight, pair_expert, y_smem,
                                   bias_smem, tid, nthreads);
  } else {
    GemvFusedReduceAs<quant::Bf16>(p, panel, pair_row, pair_weight, pair_expert, y_smem,
                                   bias_smem, tid, nthreads);
  }
}

template <GemvSource kSource>
__global__ void __launch_bounds__(kGemvMaxThreads, kGemvCtasPerSm)
    GroupedGemvSm90Kernel(GemvKernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float pow2_idx[kNumTables];
  __shared__ int warp_counts[kGemvMaxWarps];
  __shared__ int chosen_expert;
  const GemvSmem layout = GemvLayout(p.num_experts, p.num_chunks);
  int32_t* eo = reinterpret_cast<int32_t*>(smem + layout.offsets);
  uint8_t* act = smem + layout.act;
  float* fac = reinterpret_cast<float*>(smem + layout.factors);
  float* partial = reinterpret_cast<float*>(smem + layout.partial);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int slot = static_cast<int>(blockIdx.x) / p.num_panels;
  const int panel = static_cast<int>(blockIdx.x) % p.num_panels;
  const int num_experts = p.num_experts;
  const int nthreads = static_cast<int>(blockDim.x);

  // Programmatic dependent launch (cc/cuda/pdl.cuh). From the MoE chain (offsets_before_wait)
  // the expert offsets, the routing's pairs and the prepared weights were final before the kernel
  // right before this one started, so the expert search and the first weight loads overlap its
  // tail; only the activations (and c) wait.
  const bool early = p.offsets_before_wait != 0;
  if (!early) {
    PdlWait();
    PdlLaunchDependents();
  }
  const bool fused = p.reduce.output != nullptr;
  int32_t* pair_row = reinterpret_cast<int32_t*>(smem + layout.pairs);
  float* pair_weight = reinterpret_cast<float*>(pair_row + kGemvReduceMaxPairs);
  int32_t* pair_expert = pair_row + 2 * kGemvReduceMaxPairs;
  uint8_t* reduce_y = smem + layout.y;
  float* reduce_bias = reinterpret_cast<float*>(smem + layout.bias);
  for (int i = tid; i <= num_experts; i += nthreads) eo[i] = __ldg(p.expert_offsets + i);
  if (tid < kNumTables) pow2_idx[tid] = tid == 0 ? 0.0f : Pow2(tid);
  if (tid == 0) chosen_expert = -1;
  if (fused && tid < p.reduce.num_tokens * p.reduce.slots_per_token) {
    const ReduceParams& r = p.reduce;
    const int token = tid / r.slots_per_token, s = tid % r.slots_per_token;
    pair_row[tid] = r.slot_row[tid];
    pair_weight[tid] = s < r.top_k ? r.topk_weights[token * r.top_k + s] : 1.0f;
    pair_expert[tid] = r.local_expert[tid];
  }
  __syncthreads();

  // The slot-th expert with rows in [0, rows): each thread counts a contiguous range of experts,
  // a block-wide exclusive scan finds the range that holds it.
  auto clipped = [&](int e, int64_t* begin, int64_t* end) {
    int64_t b = eo[e], en = eo[e + 1];
    b = b < 0 ? 0 : b;
    en = en > p.rows ? p.rows : en;
    *begin = b;
    *end = en;
    return en > b;
  };
  const int per_thread = (num_experts + nthreads - 1) / nthreads;
  const int e_lo = tid * per_thread;
  const int e_hi = min(e_lo + per_thread, num_experts);
  int count = 0;
  for (int e = e_lo; e < e_hi; ++e) {
    int64_t b, en;
    count += clipped(e, &b, &en) ? 1 : 0;
  }
  int incl = count;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xFFFFFFFFu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_counts[warp] = incl;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += warp_counts[w];
  const int excl = before + incl - count;
  if (slot >= excl && slot < excl + count) {
    int seen = excl;
    for (int e = e_lo; e < e_hi; ++e) {
      int64_t b, en;
      if (clipped(e, &b, &en)) {
        if (seen == slot) {
          chosen_expert = e;
          break;
        }
        ++seen;
      }
    }
  }
  __syncthreads();
  const int e = chosen_expert;
  const int warps = nthreads >> 5;
  int active = 0;  // experts with rows: the CTAs of each panel that store and count themselves
  for (int w = 0; w < warps; ++w) active += warp_counts[w];

  const int num_chunks = p.num_chunks;
  const int kp = num_chunks * kChunkK;
  GemvLoader ld;
  ld.records = p.prepared + (static_cast<int64_t>(e < 0 ? 0 : e) * p.num_panels + panel) *
                                num_chunks * kRecordBytes;
  ld.lane = lane;
  // The first chunk's weights go out before the activations are staged (and, early, before the
  // wait).
  uint4 v[4];
  uint32_t sw[8];
  if (e >= 0 && warp < num_chunks) {
    ld.Codes(warp, 0, v);
    ld.Scales(warp, sw);
  }
  if (early) {
    PdlWait();
    PdlLaunchDependents();
  }
  if (e < 0) {  // fewer active experts than slots
    // No expert has rows at all: slot 0's CTAs write the (zero) reduce of every panel.
    if (fused && active == 0 && slot == 0) {
      GemvFusedReduce(p, panel, pair_row, pair_weight, pair_expert, reduce_y, reduce_bias, tid,
                      nthreads);
    }
    return;
  }
  int64_t row_begin, row_end;
  clipped(e, &row_begin, &row_end);
  const int64_t expert_start = eo[e];
  const int64_t scale_base =
      kSource == GemvSource::kMxfp4 ? __ldg(p.blockscale_offsets + e) : 0;

  for (int64_t r0 = row_begin; r0 < row_end; r0 += kGemvMaxTokens) {
    const int nt = static_cast<int>(row_end - r0 < kGemvMaxTokens ? row_end - r0
                                                                  : kGemvMaxTokens);
    const int staged = nt == 3 ? 4 : nt;  // three rows run the four-row pass, the fourth zero
    if (r0 != row_begin) __syncthreads();  // the previous group's reads of act/fac/partial
    if constexpr (kSource == GemvSource::kMxfp4) {
      StageMxfp4(p, r0, nt, staged, scale_base, expert_start, kp, act, fac, tid, nthreads);
    } else if (p.c_is_fp16) {
      StageQuantized<quant::Fp16, kSource>(p, e, r0, nt, staged, kp, act, fac, tid, nthreads);
    } else {
      StageQuantized<quant::Bf16, kSource>(p, e, r0, nt, staged, kp, act, fac, tid, nthreads);
    }
    __syncthreads();
    const bool reload = r0 + kGemvMaxTokens < row_end;  // another row group follows
    if (nt == 1) {
      GemvGroup<1>(ld, v, sw, reload, act, fac, partial, kp, num_chunks, warp, warps, pow2_idx);
    } else if (nt == 2) {
      GemvGroup<2>(ld, v, sw, reload, act, fac, partial, kp, num_chunks, warp, warps, pow2_idx);
    } else {
      GemvGroup<4>(ld, v, sw, reload, act, fac, partial, kp, num_chunks, warp, warps, pow2_idx);
    }
    __syncthreads();
    // One thread per (row, token): the warps' partials in warp order, one rounding, one store.
    const int used_warps = num_chunks < warps ? num_chunks : warps;
    for (int i = tid; i < kPanelRows * nt; i += nthreads) {
      const int tok = i / kPanelRows, r = i % kPanelRows;
      const int col = panel * kPanelRows + r;
      if (col >= p.n) continue;
      float sum = 0.0f;
      for (int w = 0; w < used_warps; ++w) {
        sum += partial[(w * kPanelRows + r) * kGemvMaxTokens + tok];
      }
      const uint16_t bits = p.c_is_fp16 ? __half_as_ushort(__float2half_rn(sum))
                                        : __bfloat16_as_ushort(__float2bfloat16_rn(sum));
      static_cast<uint16_t*>(p.c)[(r0 + tok) * p.n + col] = bits;
    }
  }
  if (fused) {
    // Every thread's y stores reach the device scope before the CTA counts itself; the panel's
    // last CTA then reads all of them (from L2: ld.global.cg).
    __shared__ int last_cta;
    __threadfence();
    __syncthreads();
    if (tid == 0) last_cta = atomicAdd(p.reduce_counters + panel, 1) == active - 1;
    __syncthreads();
    if (last_cta) {
      __threadfence();
      GemvFusedReduce(p, panel, pair_row, pair_weight, pair_expert, reduce_y, reduce_bias, tid,
                      nthreads);
    }
  }
#endif
}

}  // namespace

int64_t GemvSmemBytes(int32_t num_experts, int64_t k) {
  return GemvLayout(num_experts, static_cast<int>(NumChunks(k))).total;
}

mxmoe_status LaunchGemvKernel(const GemvKernelParams& params, int num_slots,
                              cudaStream_t stream) {
  const int64_t grid = static_cast<int64_t>(num_slots) * params.num_panels;
  if (grid == 0) return MXMOE_STATUS_OK;
  // 8 warps, fewer only where K has fewer chunks. Fewer warps so that a large grid fits one wave
  // was measured slower at 2-4 rows per expert (longer chains per warp; docs/perf-notes.md).
  int warps = kGemvMaxWarps;
  while (warps > 1 && warps > params.num_chunks) warps /= 2;
  const int smem = GemvLayout(params.num_experts, params.num_chunks).total;
  auto launch = [&](auto kernel) {
    MXMOE_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    MXMOE_CUDA_RETURN_IF_ERROR(LaunchPdl(kernel, dim3(static_cast<unsigned>(grid)),
                                         dim3(32 * warps), smem, stream, params));
    return MXMOE_STATUS_OK;
  };
  switch (params.source) {
    case GemvSource::kMxfp4:
      return launch(GroupedGemvSm90Kernel<GemvSource::kMxfp4>);
    case GemvSource::kGather:
      return launch(GroupedGemvSm90Kernel<GemvSource::kGather>);
    case GemvSource::kSiluMul:
      return launch(GroupedGemvSm90Kernel<GemvSource::kSiluMul>);
    case GemvSource::kGeneral:
      return launch(GroupedGemvSm90Kernel<GemvSource::kGeneral>);
  }
  return Fail(MXMOE_STATUS_INTERNAL, "grouped_gemm (sm90 CUDA-core): unexpected source ",
              static_cast<int>(params.source));
}

}  // namespace sm90
}  // namespace cuda
}  // namespace mxmoe
