// Device code of the SM90 W4A4 grouped GEMM (sm_90a only): a persistent, warp-specialised kernel.
//
//   warpgroup 0 (producer, one thread): per (expert, tile) and 128-wide K chunk, one TMA copy of
//     the converted activations [kBlockN rows x 128 bytes, 128B swizzle], one 1-D bulk copy of
//     their chunk factors, and one 1-D bulk copy per 64-row weight panel (4352 bytes: 4-bit codes +
//     prepared scale words) into a kStages-deep shared-memory ring, completing on an mbarrier.
//     The weight copies of the first ring-full are issued before waiting for the activation
//     conversion kernel (programmatic dependent launch).
//   warpgroups 1 and 2 (math, 64 weight rows each): load the 4-bit codes (16 bytes per thread and
//     k64), decode them in registers into E4M3 WGMMA A fragments with prmt over a per-block
//     8-entry table (the block's exponent shift picks the table), run 4 x m64nNk32 FP8 WGMMAs
//     into a chunk accumulator, then promote it into the fp32 accumulator times the weight row's
//     and the token's chunk factors (docs/perf-notes.md). Token tile 128: the two warpgroups
//     take turns issuing their WGMMAs (ping-pong, named barriers 3 and 4).
//   Tiles: (expert, weight tile of 128 rows, token tile of kBlockN rows); every CTA walks the
//   same tile list (prefix sums of per-expert tile counts from expert_offsets, built in shared
//   memory at start), CTA b taking tiles b, b + grid, ... No host synchronisation anywhere.
// Limits: N % 32 == 0 (a half panel is zero-padded), K padded to 128 by the converters.
#ifndef MXMOE_CUDA_GROUPED_GEMM_SM90_KERNEL_CUH_
#define MXMOE_CUDA_GROUPED_GEMM_SM90_KERNEL_CUH_

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cc/base/cuda_check.h"
#include "cc/cuda/expert_search.h"
#include "cc/cuda/grouped_gemm_sm90_kernel.h"
#include "cc/cuda/grouped_gemm_sm90_layout.h"
#include "cc/cuda/pdl.cuh"
#include "cc/cuda/grouped_gemm_sm90_wgmma.h"
#include "mxmoe/format.h"

namespace mxmoe {
namespace cuda {
namespace sm90 {

constexpr int kThreads = 384;        // 3 warpgroups
constexpr int kTileRows = 128;       // weight rows per tile (2 math warpgroups x 64)
// Every math thread arrives on a stage's empty barrier after its last shared-memory read of the
// stage (as CUTLASS's consumer_release does): each thread's arrive releases its own reads, so the
// producer's next bulk copy into the stage is ordered after all of them (a per-warp arrive after
// __syncwarp also works on hardware, but compute-sanitizer racecheck cannot see that ordering).
constexpr int kEmptyArrivals = 256;

template <int kBlockN>
struct Traits {
  static_assert(kBlockN % 16 == 0 && kBlockN >= 16 && kBlockN <= 128,
                "token tile must be 16, 32, 64 or 128 (accumulators: 2 x kBlockN/2 registers)");
  static constexpr int kActBytes = kBlockN * kChunkK;  // E4M3, multiple of 1024 (128B swizzle)
  static constexpr int kWeightBytes = 2 * kRecordBytes;
  static constexpr int kStageBytes = GemmStageBytes(kBlockN);
  static constexpr int kStages = GemmStages(kBlockN);
  static constexpr int kCtasPerSm = GemmCtasPerSm(kBlockN);
  static constexpr int kWeightOffset = kActBytes;
  static constexpr int kFactorOffset = kActBytes + kWeightBytes;  // 128-byte aligned
  static constexpr int kFactorBytes = GemmFactorBytes(kBlockN);
  static_assert(kFactorOffset % 128 == 0, "TMA destination must be 128-byte aligned");
  static_assert(kFactorOffset + kFactorBytes <= kStageBytes, "stage overflow");
  static constexpr int kEpilogueOffset = GemmEpilogueOffset(kBlockN);
  static constexpr int kBarrierOffset = GemmBarrierOffset(kBlockN);
  static constexpr int kExpertOffsetBytes = GemmExpertOffset(kBlockN);
  static_assert(kNumTables == 20, "table count mismatch");
};

// ---- PTX wrappers ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void MbarInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void MbarArriveExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "MXMOE_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra MXMOE_WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void BulkCopyG2S(uint32_t dst, const void* src, uint32_t bytes,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void TmaLoad2d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving accumulator accesses across the asynchronous WGMMA.
__device__ __forceinline__ void FenceOperand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void FenceOperand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// K-major operand, 128-byte swizzle: 8-row atoms of 1024 bytes (stride byte offset 1024), for
// k32 step s (+32 bytes of K inside the 128-byte swizzled row, +2 in the address field). Built
// from two 32-bit halves: the stage is 1024-byte aligned, so adding 2s never carries out of the
// low word, and the high word is a constant (no 64-bit adds per WGMMA).
__device__ __forceinline__ uint64_t SwizzledKMajorDesc(uint32_t smem_addr, int s) {
  const uint32_t lo = (((smem_addr & 0x3FFFF) >> 4) + 2 * s) | (1u << 16);
  const uint32_t hi = (1024 >> 4) | (1u << 30);
  uint64_t d;
  asm("mov.b64 %0, {%1, %2};" : "=l"(d) : "r"(lo), "r"(hi));
  return d;
}

// 8 prepared codes (see CodeByteOffset) -> two words of 4 E4M3 bytes.
__device__ __forceinline__ void DecodeWord(uint32_t x, uint2 table, uint32_t* first,
                                           uint32_t* second) {
  const uint32_t m = x & 0x77777777u;
  *first = __byte_perm(table.x, table.y, m) | (x & 0x80808080u);
  *second = __byte_perm(table.x, table.y, m >> 16) | ((x << 4) & 0x80808080u);
}

// ---- tile scheduler -------------------------------------------------------------------------

struct Tile {
  int expert;
  int weight_tile;  // 128-row tile index along N
  int row_base;     // first token row of this tile
  int rows_valid;   // token rows of this tile that belong to the expert (1..kBlockN)
};

// Within an expert, tiles go token-tile-major: the CTAs running at one time share a few token
// tiles and sweep the expert's weight tiles, so both stay in L2 (weight-tile-major order made
// every weight tile re-read the expert's activations from DRAM).
template <int kBlockN>
__device__ __forceinline__ Tile DecodeTile(int t, const int32_t* eo, const int32_t* prefix,
                                           int num_experts, int weight_tiles) {
  // Largest e with prefix[e] <= t; experts with no tiles have prefix[e] == prefix[e+1].
  const int e = ExpertOfRow(prefix, num_experts, t);
  const int m = max(0, eo[e + 1] - eo[e]);
  const int local = t - prefix[e];
  const int j = local / weight_tiles;
  Tile tile;
  tile.expert = e;
  tile.weight_tile = local - j * weight_tiles;
  tile.row_base = eo[e] + j * kBlockN;
  tile.rows_valid = min(kBlockN, m - j * kBlockN);
  return tile;
}

__device__ __forceinline__ void NamedBarrierSync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void NamedBarrierArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// Named barriers: 0 = __syncthreads, 1 and 2 = each math warpgroup's epilogue, 3 and 4 = "math
// warpgroup 0 / 1 may issue its WGMMAs" (the ping-pong order, see the main loop).
constexpr int kOrderBarrier = 3;

// Decodes one chunk's weight fragments from stage `st` into `a`; returns the weight rows' chunk
// factors. `tables`: the kNumTables E4M3 tables in static shared memory (so that a block's table
// is one LDS at [prepared offset + constant]).
template <int kBlockN>
__device__ __forceinline__ void DecodeChunk(const uint8_t* st, int mwg, int warp, int lane, int g,
                                            const uint2* tables, uint32_t (&a)[4][4], float* fb0,
                                            float* fb1) {
  using T = Traits<kBlockN>;
  const uint8_t* rec = st + T::kWeightOffset + mwg * kRecordBytes;
  const uint32_t sc0 = *reinterpret_cast<const uint32_t*>(rec + kCodeBytes + 4 * (16 * warp + g));
  const uint32_t sc1 =
      *reinterpret_cast<const uint32_t*>(rec + kCodeBytes + 4 * (16 * warp + g + 8));
  const uint4 q0 = *reinterpret_cast<const uint4*>(rec + ((warp * 2 + 0) * 32 + lane) * 16);
  const uint4 q1 = *reinterpret_cast<const uint4*>(rec + ((warp * 2 + 1) * 32 + lane) * 16);
  const uint8_t* tbytes = reinterpret_cast<const uint8_t*>(tables);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const uint32_t x0 = s == 0 ? q0.x : s == 1 ? q0.z : s == 2 ? q1.x : q1.z;
    const uint32_t x1 = s == 0 ? q0.y : s == 1 ? q0.w : s == 2 ? q1.y : q1.w;
    const uint2 tb0 = *reinterpret_cast<const uint2*>(tbytes + PreparedTableOffset(sc0, s));
    const uint2 tb1 = *reinterpret_cast<const uint2*>(tbytes + PreparedTableOffset(sc1, s));
    DecodeWord(x0, tb0, &a[s][0], &a[s][2]);
    DecodeWord(x1, tb1, &a[s][1], &a[s][3]);
  }
  *fb0 = ChunkFactor(PreparedMaxScale(sc0));
  *fb1 = ChunkFactor(PreparedMaxScale(sc1));
}

// Issues one chunk's 4 WGMMAs into `t` (asynchronous; committed as one group). `a` must stay
// untouched until the group completes (the WGMMA reads it asynchronously).
template <int kBlockN>
__device__ __forceinline__ void IssueWgmmas(const uint8_t* st, uint32_t (&a)[4][4],
                                            float (&t)[kBlockN / 2]) {
  const uint32_t st_addr = SmemAddr(st);
  // Pin the decoded fragments before the fence: otherwise the compiler sinks the decode between
  // the WGMMAs and ptxas must inject a warpgroup.arrive before each (C7519).
#pragma unroll
  for (int s = 0; s < 4; ++s) {
#pragma unroll
    for (int i = 0; i < 4; ++i) FenceOperand(a[s][i]);
  }
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) FenceOperand(t[i]);
  WgmmaFence();
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    WgmmaE4m3Rs<kBlockN>::Run(t, a[s], SwizzledKMajorDesc(st_addr, s), s);
  }
  WgmmaCommit();
}

// Decode + issue (see the two functions above).
template <int kBlockN>
__device__ __forceinline__ void IssueChunk(const uint8_t* st, int mwg, int warp, int lane, int g,
                                           const uint2* tables, uint32_t (&a)[4][4],
                                           float (&t)[kBlockN / 2], float* fb0, float* fb1) {
  DecodeChunk<kBlockN>(st, mwg, warp, lane, g, tables, a, fb0, fb1);
  IssueWgmmas<kBlockN>(st, a, t);
}

// acc += t * weight-row factor * token factor (the fp32 promotion of one chunk's FP8 product).
template <int kBlockN>
__device__ __forceinline__ void PromoteChunk(const uint8_t* st, int row_shift, int t4,
                                             float (&t)[kBlockN / 2], float (&acc)[kBlockN / 2],
                                             float fb0, float fb1) {
  using T = Traits<kBlockN>;
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) FenceOperand(t[i]);
  const float* fa = reinterpret_cast<const float*>(st + T::kFactorOffset) + row_shift;
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
    const float f0 = fa[8 * j + 2 * t4], f1 = fa[8 * j + 2 * t4 + 1];
    acc[4 * j + 0] = fmaf(t[4 * j + 0] * fb0, f0, acc[4 * j + 0]);
    acc[4 * j + 1] = fmaf(t[4 * j + 1] * fb0, f1, acc[4 * j + 1]);
    acc[4 * j + 2] = fmaf(t[4 * j + 2] * fb1, f0, acc[4 * j + 2]);
    acc[4 * j + 3] = fmaf(t[4 * j + 3] * fb1, f1, acc[4 * j + 3]);
  }
}

// ---- the kernel -------------------------------------------------------------------------------

template <int kBlockN>
__global__ void __launch_bounds__(kThreads, GemmCtasPerSm(kBlockN))
    GroupedGemmSm90Kernel(const __grid_constant__ CUtensorMap act_map,
                          const GemmKernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using T = Traits<kBlockN>;
  extern __shared__ uint8_t smem_raw[];
  // Aligned up to 1024 (128B swizzle atoms) by pointer arithmetic on the shared array, so that
  // the compiler keeps knowing it is shared memory: LDS with 32-bit addresses instead of generic
  // 64-bit LD (the version that rounded a uintptr_t made every stage, table and factor access
  // generic).
  uint8_t* smem = smem_raw + ((1024u - (SmemAddr(smem_raw) & 1023u)) & 1023u);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + T::kBarrierOffset);
  uint64_t* empty = full + T::kStages;
  __shared__ uint2 tables[kNumTables];  // static: constant addresses (see DecodeChunk)
  int32_t* eo = reinterpret_cast<int32_t*>(smem + T::kExpertOffsetBytes);
  int32_t* prefix = eo + p.num_experts + 1;

  const int tid = threadIdx.x;
  const int num_experts = p.num_experts;
  const int weight_tiles = (p.n + kTileRows - 1) / kTileRows;

  if (tid == 0) {
    for (int s = 0; s < T::kStages; ++s) {
      MbarInit(SmemAddr(&full[s]), 1);
      MbarInit(SmemAddr(&empty[s]), kEmptyArrivals);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (tid < kNumTables) {
    uint32_t lo, hi;
    E4m3Table(tid - kTableOffset, &lo, &hi);
    tables[tid] = make_uint2(lo, hi);
  }
  for (int i = tid; i <= num_experts; i += kThreads) eo[i] = p.expert_offsets[i];
  __syncthreads();
  if (tid < 32) {
    // Tile counts per expert, exclusive prefix over experts: each lane sums a contiguous range,
    // then a warp scan of the lane totals.
    const int per_lane = (num_experts + 31) / 32;
    const int begin = min(num_experts, tid * per_lane);
    const int end = min(num_experts, begin + per_lane);
    int running = 0;
    for (int e = begin; e < end; ++e) {
      const int m = max(0, eo[e + 1] - eo[e]);
      running += (m + kBlockN - 1) / kBlockN * weight_tiles;
      prefix[e + 1] = running;
    }
    int offset = running;
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xFFFFFFFFu, offset, d);
      if (tid >= d) offset += v;
    }
    offset -= running;  // exclusive
    for (int e = begin; e < end; ++e) prefix[e + 1] += offset;
    if (tid == 0) prefix[0] = 0;
  }
  __syncthreads();
  const int total_tiles = prefix[num_experts];
  const int num_chunks = p.num_chunks;
  const int64_t expert_bytes =
      static_cast<int64_t>(p.num_panels) * num_chunks * kRecordBytes;

  if (tid < 128) {
    // ------------------------------------------------------------------ producer
    if constexpr (T::kCtasPerSm == 1) {
      asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    }
    if (tid == 0) {
      int stage = 0;
      uint32_t phase = 0;
      // The weights do not depend on the activation conversion kernel before this one in the
      // stream: arm the first ring-full of stages of this CTA's first tile and start their weight
      // copies now, then wait for the conversion (programmatic dependent launch; a no-op when
      // launched without the attribute) and add the activation copies. At decode the weights
      // are nearly all the bytes, so the conversion's latency hides under the weight stream.
      const int t0 = blockIdx.x;
      int armed = 0;
      if (t0 < total_tiles) {
        const Tile tile = DecodeTile<kBlockN>(t0, eo, prefix, num_experts, weight_tiles);
        const int panel0 = tile.weight_tile * 2;
        const int panels = min(2, p.num_panels - panel0);
        const uint32_t bytes = T::kActBytes + T::kFactorBytes + panels * kRecordBytes;
        const uint8_t* wsrc = p.prepared + tile.expert * expert_bytes +
                              static_cast<int64_t>(panel0) * num_chunks * kRecordBytes;
        armed = min(num_chunks, T::kStages);
        for (int c = 0; c < armed; ++c) {
          // Fresh barriers: the empty waits of the first pass would return at once.
          const uint32_t bar = SmemAddr(&full[c]);
          uint8_t* st = smem + c * T::kStageBytes;
          MbarArriveExpectTx(bar, bytes);
          BulkCopyG2S(SmemAddr(st + T::kWeightOffset), wsrc + c * kRecordBytes, kRecordBytes,
                      bar);
          if (panels == 2) {
            BulkCopyG2S(SmemAddr(st + T::kWeightOffset + kRecordBytes),
                        wsrc + (static_cast<int64_t>(num_chunks) + c) * kRecordBytes,
                        kRecordBytes, bar);
          }
        }
      }
      PdlWait();  // cc/cuda/pdl.cuh
      for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
        const Tile tile = DecodeTile<kBlockN>(t, eo, prefix, num_experts, weight_tiles);
        const int panel0 = tile.weight_tile * 2;
        const int panels = min(2, p.num_panels - panel0);
        const uint32_t bytes = T::kActBytes + T::kFactorBytes + panels * kRecordBytes;
        const uint8_t* wsrc = p.prepared + tile.expert * expert_bytes +
                              static_cast<int64_t>(panel0) * num_chunks * kRecordBytes;
        for (int c = 0; c < num_chunks; ++c) {
          const uint32_t bar = SmemAddr(&full[stage]);
          uint8_t* st = smem + stage * T::kStageBytes;
          const bool pre = t == t0 && c < armed;  // armed above, weights in flight
          if (!pre) {
            MbarWait(SmemAddr(&empty[stage]), phase ^ 1);
            MbarArriveExpectTx(bar, bytes);
          }
          TmaLoad2d(SmemAddr(st), &act_map, c * kChunkK, tile.row_base, bar);
          BulkCopyG2S(SmemAddr(st + T::kFactorOffset),
                      p.factors + c * p.factor_stride + (tile.row_base & ~3), T::kFactorBytes, bar);
          if (!pre) {
            BulkCopyG2S(SmemAddr(st + T::kWeightOffset), wsrc + c * kRecordBytes, kRecordBytes,
                        bar);
            if (panels == 2) {
              BulkCopyG2S(SmemAddr(st + T::kWeightOffset + kRecordBytes),
                          wsrc + (static_cast<int64_t>(num_chunks) + c) * kRecordBytes,
                          kRecordBytes, bar);
            }
          }
          if (++stage == T::kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    // ------------------------------------------------------------------ math warpgroups
    if constexpr (T::kCtasPerSm == 1) {
      asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    }
    const int mwg = tid / 128 - 1;  // 0 or 1: which 64-row panel of the tile
    const int warp = (tid / 32) % 4;
    const int lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    int stage = 0;
    uint32_t phase = 0;
    // Chunk accumulators (two for token tiles <= 64, where the registers allow overlapping one
    // chunk's WGMMAs with the previous chunk's promotion) and their A fragments.
    constexpr bool kDoubleBuffer = kBlockN <= 64 && T::kCtasPerSm == 1;
    // Ping-pong (token tile 128): the two math warpgroups take turns on the tensor cores, one
    // issuing its chunk's WGMMAs while the other promotes its previous chunk and decodes the
    // next, instead of both issuing at once, both waiting, both promoting (the tensor cores
    // idle during the promotion). Named barrier kOrderBarrier + w: "warpgroup w may issue";
    // warpgroup 1 lets warpgroup 0 go first.
    const bool ordered = !kDoubleBuffer && T::kCtasPerSm == 1 && p.pingpong != 0;
    if (ordered && mwg == 1 && static_cast<int>(blockIdx.x) < total_tiles) {
      NamedBarrierArrive(kOrderBarrier, 256);
    }
    float acc[kBlockN / 2];
    float tmp[kBlockN / 2];
    float tmp_odd[kDoubleBuffer ? kBlockN / 2 : 1];
    uint32_t a_even[4][4];
    uint32_t a_odd[kDoubleBuffer ? 4 : 1][4];
    for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
      const Tile tile = DecodeTile<kBlockN>(t, eo, prefix, num_experts, weight_tiles);
      const int panel = tile.weight_tile * 2 + mwg;
      const bool active = panel < p.num_panels;
#pragma unroll
      for (int i = 0; i < kBlockN / 2; ++i) acc[i] = 0.0f;
      const int row_shift = tile.row_base & 3;
      if (!active) {
        // Half-empty last weight tile: keep the ring's phases (and the ping-pong order) in step.
        const bool last_tile = t + static_cast<int>(gridDim.x) >= total_tiles;
        for (int c = 0; c < num_chunks; ++c) {
          if (ordered) {
            NamedBarrierSync(kOrderBarrier + mwg, 256);
            if (!(mwg == 1 && last_tile && c == num_chunks - 1)) {
              NamedBarrierArrive(kOrderBarrier + 1 - mwg, 256);
            }
          }
          MbarWait(SmemAddr(&full[stage]), phase);
          MbarArrive(SmemAddr(&empty[stage]));
          if (++stage == T::kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      } else if constexpr (kDoubleBuffer) {
        // Two chunk accumulators: chunk c's WGMMAs run while chunk c-1 is promoted. Written as
        // two straight-line halves (even chunks -> tmp, odd chunks -> tmp_odd) so that ptxas sees
        // which accumulator is in flight and keeps the WGMMAs asynchronous.
        float fb0, fb1, pfb0, pfb1;
        MbarWait(SmemAddr(&full[stage]), phase);
        IssueChunk<kBlockN>(smem + stage * T::kStageBytes, mwg, warp, lane, g, tables, a_even, tmp,
                            &pfb0, &pfb1);
        int prev_stage = stage;
        if (++stage == T::kStages) {
          stage = 0;
          phase ^= 1;
        }
        int c = 1;
        while (true) {
          if (c >= num_chunks) {
            WgmmaWait<0>();
            PromoteChunk<kBlockN>(smem + prev_stage * T::kStageBytes, row_shift, t4, tmp, acc,
                                  pfb0, pfb1);
            MbarArrive(SmemAddr(&empty[prev_stage]));
            break;
          }
          MbarWait(SmemAddr(&full[stage]), phase);
          IssueChunk<kBlockN>(smem + stage * T::kStageBytes, mwg, warp, lane, g, tables, a_odd,
                              tmp_odd, &fb0, &fb1);
          WgmmaWait<1>();
          PromoteChunk<kBlockN>(smem + prev_stage * T::kStageBytes, row_shift, t4, tmp, acc, pfb0,
                                pfb1);
          MbarArrive(SmemAddr(&empty[prev_stage]));
          prev_stage = stage;
          pfb0 = fb0;
          pfb1 = fb1;
          if (++stage == T::kStages) {
            stage = 0;
            phase ^= 1;
          }
          ++c;
          if (c >= num_chunks) {
            WgmmaWait<0>();
            PromoteChunk<kBlockN>(smem + prev_stage * T::kStageBytes, row_shift, t4, tmp_odd, acc,
                                  pfb0, pfb1);
            MbarArrive(SmemAddr(&empty[prev_stage]));
            break;
          }
          MbarWait(SmemAddr(&full[stage]), phase);
          IssueChunk<kBlockN>(smem + stage * T::kStageBytes, mwg, warp, lane, g, tables, a_even,
                              tmp, &fb0, &fb1);
          WgmmaWait<1>();
          PromoteChunk<kBlockN>(smem + prev_stage * T::kStageBytes, row_shift, t4, tmp_odd, acc,
                                pfb0, pfb1);
          MbarArrive(SmemAddr(&empty[prev_stage]));
          prev_stage = stage;
          pfb0 = fb0;
          pfb1 = fb1;
          if (++stage == T::kStages) {
            stage = 0;
            phase ^= 1;
          }
          ++c;
        }
      } else {
        const bool last_tile = t + static_cast<int>(gridDim.x) >= total_tiles;
        for (int c = 0; c < num_chunks; ++c) {
          MbarWait(SmemAddr(&full[stage]), phase);
          const uint8_t* st = smem + stage * T::kStageBytes;
          float fb0, fb1;
          DecodeChunk<kBlockN>(st, mwg, warp, lane, g, tables, a_even, &fb0, &fb1);
          if (ordered) NamedBarrierSync(kOrderBarrier + mwg, 256);
          IssueWgmmas<kBlockN>(st, a_even, tmp);
          // Hand the tensor cores to the other warpgroup (warpgroup 1 skips its very last hand-
          // over, which nobody waits for: every sync has exactly one matching arrive).
          if (ordered && !(mwg == 1 && last_tile && c == num_chunks - 1)) {
            NamedBarrierArrive(kOrderBarrier + 1 - mwg, 256);
          }
          WgmmaWait<0>();
          PromoteChunk<kBlockN>(st, row_shift, t4, tmp, acc, fb0, fb1);
          MbarArrive(SmemAddr(&empty[stage]));
          if (++stage == T::kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
      if (active) {
        // Epilogue: acc(weight row, token) -> bf16/fp16 -> shared [token][row] -> 16-byte
        // coalesced stores of C[token, 64 rows of the panel], masked to the expert's tokens, the
        // rows of C and N (N % 32 == 0, so an 8-column piece is all in or all out).
        uint8_t* epi = smem + T::kEpilogueOffset + mwg * kBlockN * kEpilogueRowBytes;
        NamedBarrierSync(1 + mwg, 128);  // the previous tile's reads of `epi` are done
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
          for (int v = 0; v < 2; ++v) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const float x = acc[4 * j + 2 * r + v];
              const uint16_t bits = p.c_is_fp16 ? __half_as_ushort(__float2half_rn(x))
                                                : __bfloat16_as_ushort(__float2bfloat16_rn(x));
              const int token = 8 * j + 2 * t4 + v;
              const int row = 16 * warp + g + 8 * r;
              *reinterpret_cast<uint16_t*>(epi + token * kEpilogueRowBytes + row * 2) = bits;
            }
          }
        }
        NamedBarrierSync(1 + mwg, 128);
        const int wtid = tid % 128;
        const int n0 = panel * kPanelRows;
#pragma unroll
        for (int id = wtid; id < kBlockN * 8; id += 128) {
          const int token = id >> 3, part = id & 7;
          const int64_t row = static_cast<int64_t>(tile.row_base) + token;
          if (token < tile.rows_valid && row < p.rows && n0 + part * 8 < p.n) {
            const uint4 v =
                *reinterpret_cast<const uint4*>(epi + token * kEpilogueRowBytes + part * 16);
            *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p.c) + row * p.n + n0 + part * 8) = v;
          }
        }
      }
    }
  }
#endif
}

template <int kBlockN>
mxmoe_status LaunchGemmKernelN(const GemmKernelLaunch& launch, cudaStream_t stream) {
  const size_t smem = GemmKernelSmemBytes(kBlockN, launch.params.num_experts);
  MXMOE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      GroupedGemmSm90Kernel<kBlockN>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      static_cast<int>(smem)));
  MXMOE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      GroupedGemmSm90Kernel<kBlockN>, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
  // Programmatic dependent launch (cc/cuda/pdl.cuh): the prologue (barriers, tables, tile prefix
  // sums, the first weight copies) overlaps the activation conversion kernel before it in the
  // stream (also inside CUDA graphs).
  MXMOE_CUDA_RETURN_IF_ERROR(LaunchPdl(GroupedGemmSm90Kernel<kBlockN>, dim3(launch.grid),
                                       dim3(kThreads), smem, stream, launch.act_map,
                                       launch.params));
  return MXMOE_STATUS_OK;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_GROUPED_GEMM_SM90_KERNEL_CUH_
