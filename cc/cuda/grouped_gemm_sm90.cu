// SM90 (Hopper) backend of the W4A4 MXFP4 grouped GEMM: the entry points of grouped_gemm.h,
// the weight preparation kernel, the per-call activation conversion kernel and the launch of the
// FP8 WGMMA kernel (grouped_gemm_sm90_kernel.cuh).
//
// Per call: (1) if the weights are not PREPARED, prepare them into the workspace (a full pass
// over the weights: pass PREPARED weights for speed); (2) convert the MXFP4 activations into
// E4M3 with per-128-chunk exponent folding plus one fp32 factor per (row, chunk) in the
// workspace; (3) the grouped GEMM. With few rows (the heuristic's `gemv`: at most kGemvMaxRows,
// or up to kGemvWideMaxRows where its grid is small; decode) steps (2) and (3) are one
// CUDA-core kernel instead (grouped_gemm_sm90_gemv.cu) that reads the MXFP4 activations as they
// are. Everything is
// asynchronous on `stream`: no allocation, no host synchronisation (CUDA-graph capturable).
// Per-expert row counts come from expert_offsets on the device; problem_sizes is not read (it
// must agree with expert_offsets).
// Device-side checks: negative m_e counts as 0; writes past `rows` are dropped.
// Limits beyond the public contract live in CanImplementGroupedGemmSm90 /
// CanImplementPrepareWeightsSm90 (n % 32 == 0, k > 0, n and k < 2^30, rows < 2^31 - 256, the
// experts' offsets in shared memory), asked by cc/src/validate.cc for the size query and the run
// alike; the entry points below receive arguments that passed them and do not check again.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <stdint.h>

#include <cstdlib>
#include <mutex>

#include "cc/base/cuda_check.h"
#include "cc/base/status.h"
#include "cc/cuda/device.h"
#include "cc/cuda/dispatch.h"
#include "cc/cuda/expert_search.h"
#include "cc/cuda/grouped_gemm.h"
#include "cc/cuda/grouped_gemm_sm90_heuristics.h"
#include "cc/cuda/grouped_gemm_sm90_kernel.h"
#include "cc/cuda/grouped_gemm_sm90_layout.h"
#include "cc/cuda/pdl.cuh"
#include "mxmoe/format.h"

namespace mxmoe {
namespace cuda {
namespace {

using sm90::kChunkK;
using sm90::kCodeBytes;
using sm90::kNumTables;
using sm90::kPanelRows;
using sm90::kRecordBytes;

constexpr int64_t kSliceAlign = 1024;

// ---- weight preparation ---------------------------------------------------------------------

// One thread per 32-bit word of a prepared record: 1024 code words, then 64 scale words
// (sm90::PreparedScaleWord).
__global__ void PrepareWeightsKernel(const uint8_t* __restrict__ packed,
                                     const uint8_t* __restrict__ scales, int scales_swizzled,
                                     int num_experts, int n, int k, int num_panels,
                                     int num_chunks, uint32_t* __restrict__ out) {
  constexpr int kWords = kRecordBytes / 4;  // 1088
  const int64_t total = static_cast<int64_t>(num_experts) * num_panels * num_chunks * kWords;
  const int scale_cols = k / 32;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int word = static_cast<int>(idx % kWords);
    const int64_t rec = idx / kWords;
    const int c = static_cast<int>(rec % num_chunks);
    const int panel = static_cast<int>((rec / num_chunks) % num_panels);
    const int e = static_cast<int>(rec / (static_cast<int64_t>(num_chunks) * num_panels));
    uint32_t value = 0;
    if (word < kCodeBytes / 4) {
      // word = ((w*2 + q)*32 + lane)*4 + h*2 + row_hi (see CodeByteOffset).
      const int row_hi = word & 1, h = (word >> 1) & 1, lane = (word >> 2) & 31;
      const int wq = word >> 7, q = wq & 1, w = wq >> 1;
      const int g = lane / 4, t = lane % 4, s = 2 * q + h;
      const int r = 16 * w + g + 8 * row_hi;
      const int row = panel * kPanelRows + r;
      if (row < n) {
        const uint8_t* src = packed + (static_cast<int64_t>(e) * n + row) * (k / 2);
#pragma unroll
        for (int second = 0; second < 2; ++second) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int kk = c * kChunkK + 32 * s + 16 * second + 4 * t + j;
            if (kk < k) {
              const uint32_t code = (src[kk / 2] >> (4 * (kk & 1))) & 0xFu;
              const int mag_shift = second ? 16 + 4 * j : 4 * j;
              const int sign_shift = second ? 8 * j + 3 : 8 * j + 7;
              value |= (code & 7u) << mag_shift;
              value |= (code >> 3) << sign_shift;
            }
          }
        }
      }
    } else {
      const int r = word - kCodeBytes / 4;
      const int row = panel * kPanelRows + r;
      uint8_t sb[4] = {0, 0, 0, 0};  // rows past N and blocks past K: scale 0 (codes are 0)
      if (row < n) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int kb = c * 4 + b;
          if (kb < scale_cols) {
            sb[b] = scales_swizzled
                        ? scales[static_cast<int64_t>(e) * format::SwizzledBytes(n, scale_cols) +
                                 format::SwizzledOffset(row, kb, scale_cols)]
                        : scales[(static_cast<int64_t>(e) * n + row) * scale_cols + kb];
          }
        }
      }
      value = sm90::PreparedScaleWord(sb);
    }
    out[idx] = value;
  }
}

mxmoe_status LaunchPrepare(const uint8_t* packed, const uint8_t* scales, bool swizzled,
                           int num_experts, int64_t n, int64_t k, uint8_t* out,
                           cudaStream_t stream) {
  const int64_t words = sm90::PreparedBytes(num_experts, n, k) / 4;
  if (words == 0) return MXMOE_STATUS_OK;
  const int threads = 256;
  const int64_t blocks64 = (words + threads - 1) / threads;
  const int blocks = static_cast<int>(blocks64 < 65535 * 8 ? blocks64 : 65535 * 8);
  PrepareWeightsKernel<<<blocks, threads, 0, stream>>>(
      packed, scales, swizzled ? 1 : 0, num_experts, static_cast<int>(n), static_cast<int>(k),
      static_cast<int>(sm90::NumPanels(n)), static_cast<int>(sm90::NumChunks(k)),
      reinterpret_cast<uint32_t*>(out));
  MXMOE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return MXMOE_STATUS_OK;
}

// ---- activation conversion --------------------------------------------------------------------

// Natural nibble order (element i of a word = nibble i) -> 8 E4M3 bytes through the table.
__device__ __forceinline__ uint2 DecodeNatural(uint32_t x, uint2 table) {
  const uint32_t m = x & 0x77777777u;
  const uint32_t sg = x & 0x88888888u;
  const uint32_t s0 = ((sg & 0x8u) << 4) | ((sg & 0x80u) << 8) | ((sg & 0x800u) << 12) |
                      ((sg & 0x8000u) << 16);
  const uint32_t s1 = ((sg >> 12) & 0x80u) | ((sg >> 8) & 0x8000u) | ((sg >> 4) & 0x800000u) |
                      (sg & 0x80000000u);
  return make_uint2(__byte_perm(table.x, table.y, m) | s0,
                    __byte_perm(table.x, table.y, m >> 16) | s1);
}

// One thread per (row, 32-wide block): 16 bytes of codes and the chunk's 4 scales (one 32-bit
// load when a_scales is 4-byte aligned: a chunk's 4 scale bytes are contiguous in the 128x4
// swizzle) in, 32 E4M3 bytes out; the thread of a chunk's first block writes its fp32 factor.
// Rows past expert_offsets[E] get zeros (they are read by the last tile).
// Decode latency (T = 1) is a chain of dependent loads, so it is kept short: expert_offsets and
// blockscale_offsets are copied into shared memory once per CTA (one coalesced load) and the
// expert search runs there; the codes do not depend on the expert and are loaded before it.
// Dynamic shared memory: 2 * (num_experts + 1) int32.
__global__ void __launch_bounds__(256)
    ConvertActivationsKernel(const uint8_t* __restrict__ a, const uint8_t* __restrict__ a_scales,
                             const int32_t* __restrict__ expert_offsets,
                             const int32_t* __restrict__ blockscale_offsets, int num_experts,
                             int64_t rows, int k, int num_chunks, int64_t factor_stride,
                             int scales_aligned4, uint8_t* __restrict__ a8,
                             float* __restrict__ factor) {
  // Programmatic dependent launch (cc/cuda/pdl.cuh): wait for the quantize step before, then
  // let the GEMM kernel start its prologue; it waits for this grid before reading its outputs.
  PdlWait();
  PdlLaunchDependents();
  extern __shared__ int32_t offsets_smem[];
  int32_t* eo = offsets_smem;
  int32_t* bso = offsets_smem + num_experts + 1;
  __shared__ uint2 tables[kNumTables];
  const int blocks_per_row = num_chunks * 4;
  const int scale_cols = k / 32;
  const int64_t total = rows * blocks_per_row;
  const int64_t kp = static_cast<int64_t>(num_chunks) * kChunkK;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  // The first item's codes: in flight while the offsets are staged.
  auto load_codes = [&](int64_t i) {
    const int64_t row = i / blocks_per_row;
    const int kb = static_cast<int>(i - row * blocks_per_row);
    return kb < scale_cols
               ? __ldg(reinterpret_cast<const uint4*>(a + row * (k / 2) + kb * 16))
               : make_uint4(0, 0, 0, 0);
  };
  uint4 codes = idx < total ? load_codes(idx) : make_uint4(0, 0, 0, 0);
  for (int i = threadIdx.x; i <= num_experts; i += blockDim.x) {
    eo[i] = __ldg(expert_offsets + i);
    bso[i] = __ldg(blockscale_offsets + i);
  }
  if (threadIdx.x < kNumTables) {
    uint32_t lo, hi;
    sm90::E4m3Table(static_cast<int>(threadIdx.x) - sm90::kTableOffset, &lo, &hi);
    tables[threadIdx.x] = make_uint2(lo, hi);
  }
  __syncthreads();
  const int32_t begin_row = eo[0], end_row = eo[num_experts];
  for (; idx < total; idx += stride) {
    const int64_t row = idx / blocks_per_row;
    const int kb = static_cast<int>(idx - row * blocks_per_row);
    const int c = kb >> 2, b = kb & 3;
    uint4* dst = reinterpret_cast<uint4*>(a8 + row * kp + kb * 32);
    const uint4 cur = codes;
    if (idx + stride < total) codes = load_codes(idx + stride);
    if (row >= end_row || row < begin_row) {
      dst[0] = make_uint4(0, 0, 0, 0);
      dst[1] = make_uint4(0, 0, 0, 0);
      if (b == 0) factor[c * factor_stride + row] = 0.0f;
      continue;
    }
    // Expert of this row: largest e with expert_offsets[e] <= row.
    const int lo = ExpertOfRow(eo, num_experts, row);
    const int64_t scale_row = bso[lo] + (row - eo[lo]);
    const int64_t soff = format::SwizzledOffset(scale_row, 4 * c, scale_cols);
    uint32_t sw;
    if (scales_aligned4) {
      sw = __ldg(reinterpret_cast<const uint32_t*>(a_scales + soff));
    } else {
      sw = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) sw |= static_cast<uint32_t>(__ldg(a_scales + soff + j)) << (8 * j);
    }
    // Padding blocks past k/32 (scale bytes of the swizzle's padding) do not count.
    const int valid = scale_cols - 4 * c;
    if (valid < 4) sw &= (1u << (8 * valid)) - 1u;
    const int mx = sm90::MaxScaleByte(sw);
    const int s = static_cast<int>((sw >> (8 * b)) & 0xFFu);
    if (b == 0) factor[c * factor_stride + row] = sm90::ChunkFactor(mx);
    const uint2 table = tables[sm90::TableIndex(s, mx)];
    const uint2 w0 = DecodeNatural(cur.x, table), w1 = DecodeNatural(cur.y, table);
    const uint2 w2 = DecodeNatural(cur.z, table), w3 = DecodeNatural(cur.w, table);
    dst[0] = make_uint4(w0.x, w0.y, w1.x, w1.y);
    dst[1] = make_uint4(w2.x, w2.y, w3.x, w3.y);
  }
}

// ---- tensor maps ------------------------------------------------------------------------------

PFN_cuTensorMapEncodeTiled_v12000 EncodeTiledFn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult result;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &result) == cudaSuccess &&
        result == cudaDriverEntryPointSuccess) {
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
    }
  });
  return fn;
}

mxmoe_status Encode2d(CUtensorMap* map, CUtensorMapDataType type, void* base, uint64_t dim0,
                      uint64_t dim1, uint64_t stride1_bytes, uint32_t box0, uint32_t box1,
                      CUtensorMapSwizzle swizzle, const char* what) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = EncodeTiledFn();
  if (encode == nullptr) {
    return Fail(MXMOE_STATUS_CUDA_ERROR, "grouped_gemm (sm90): cuTensorMapEncodeTiled unavailable");
  }
  const cuuint64_t dims[2] = {dim0, dim1};
  const cuuint64_t strides[1] = {stride1_bytes};
  const cuuint32_t box[2] = {box0, box1};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(map, type, 2, base, dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return Fail(MXMOE_STATUS_CUDA_ERROR, "grouped_gemm (sm90): cuTensorMapEncodeTiled failed for ",
                what, " (CUresult ", static_cast<int>(r), ")");
  }
  return MXMOE_STATUS_OK;
}

// ---- workspace --------------------------------------------------------------------------------

// Floats per chunk row of the activation factors: the rows, padded to 4, plus the slack that the
// kernel's aligned bulk copies may read past the last row (never used: masked tokens).
int64_t FactorStride(int64_t rows) { return format::RoundUp(rows, 4) + sm90::kFactorSlack; }

struct WorkspaceLayout {
  size_t a8_offset, a8_bytes;
  size_t factor_offset, factor_bytes;
  size_t prepared_offset, prepared_bytes;  // 0 bytes when the weights are already PREPARED
  size_t total;
};

WorkspaceLayout Layout(const mxmoe_grouped_gemm_args& args) {
  WorkspaceLayout l;
  const int64_t chunks = sm90::NumChunks(args.k);
  size_t at = 0;
  l.a8_offset = at;
  l.a8_bytes = static_cast<size_t>(args.rows) * chunks * kChunkK;
  at = format::RoundUp(at + l.a8_bytes, kSliceAlign);
  l.factor_offset = at;
  l.factor_bytes = static_cast<size_t>(chunks) * FactorStride(args.rows) * 4;
  at = format::RoundUp(at + l.factor_bytes, kSliceAlign);
  l.prepared_offset = at;
  l.prepared_bytes =
      args.b.format == MXMOE_WEIGHT_FORMAT_PREPARED
          ? 0
          : static_cast<size_t>(sm90::PreparedBytes(args.num_experts, args.n, args.k));
  at = format::RoundUp(at + l.prepared_bytes, kSliceAlign);
  l.total = at + kSliceAlign;  // slack: the caller's pointer is aligned up to kSliceAlign
  return l;
}

bool Aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

// n and k below 2^30 keep every int32 index of the kernels in range.
constexpr int64_t kMaxDim = int64_t{1} << 30;
// Dynamic shared memory of the activation conversion: expert_offsets + blockscale_offsets.
size_t ConvertSmemBytes(int32_t num_experts) {
  return 2 * sizeof(int32_t) * (static_cast<size_t>(num_experts) + 1);
}
constexpr size_t kConvertSmemLimit = 48 * 1024;  // without opting in to more
constexpr size_t kGemmSmemLimit = 227 * 1024;     // sm90's largest dynamic shared memory per CTA

}  // namespace

// ---- entry points -----------------------------------------------------------------------------

mxmoe_status CanImplementPrepareWeightsSm90(const mxmoe_expert_weights& weights) {
  const char* op = "prepare_weights (sm90)";
  if (weights.n % 32 != 0) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, op,
                ": weights.n must be a multiple of 32 (half a 64-row weight panel), got ",
                weights.n);
  }
  if (weights.n >= kMaxDim || weights.k >= kMaxDim) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, op, ": weights.n and weights.k must be < 2^30, got n=",
                weights.n, " k=", weights.k);
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status CanImplementGroupedGemmSm90(int64_t rows, int64_t n, int64_t k, int32_t num_experts,
                                         int num_sms) {
  const char* op = "grouped_gemm (sm90)";
  if (n == 0) return MXMOE_STATUS_OK;  // c has no columns: nothing to compute or write
  if (n % 32 != 0) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, op,
                ": n must be a multiple of 32 (half a 64-row weight panel), got ", n);
  }
  if (k == 0) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, op,
                ": k = 0 (an empty reduction, c = 0) is not implemented by this backend");
  }
  if (n >= kMaxDim || k >= kMaxDim) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, op, ": n and k must be < 2^30, got n=", n, " k=", k);
  }
  if (rows > (int64_t{1} << 31) - 256) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, op, ": rows must be below 2^31 - 256, got ", rows);
  }
  if (ConvertSmemBytes(num_experts) > kConvertSmemLimit) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, op, ": num_experts must be at most ",
                kConvertSmemLimit / 8 - 1,
                " (the activation conversion keeps both offset arrays in 48 KB of shared "
                "memory), got ",
                num_experts);
  }
  // The tile choice depends on the problem, so the size query and the run make the same one.
  const sm90::GemmConfig config =
      sm90::ChooseGemmConfigWithOverride(sm90::GemmProblem{rows, n, k, num_experts, num_sms});
  const size_t smem = sm90::GemmKernelSmemBytes(config.block_n, num_experts);
  if (smem > kGemmSmemLimit) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, op, ": num_experts = ", num_experts,
                " needs ", smem, " bytes of shared memory with token tile ", config.block_n,
                " (rows = ", rows, "), more than the ", kGemmSmemLimit, " an sm90 CTA can have");
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status PrepareWeightsSm90Size(const mxmoe_prepare_weights_args& args, size_t* bytes) {
  *bytes = static_cast<size_t>(
      sm90::PreparedBytes(args.weights.num_experts, args.weights.n, args.weights.k));
  return MXMOE_STATUS_OK;
}

mxmoe_status PrepareWeightsSm90(const mxmoe_prepare_weights_args& args, void* stream) {
  const mxmoe_expert_weights& w = args.weights;
  if (sm90::PreparedBytes(w.num_experts, w.n, w.k) == 0) return MXMOE_STATUS_OK;
  return LaunchPrepare(w.packed, w.scales, w.format == MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4,
                       w.num_experts, w.n, w.k, args.prepared, static_cast<cudaStream_t>(stream));
}

mxmoe_status GroupedGemmSm90WorkspaceSize(const mxmoe_grouped_gemm_args& args, size_t* bytes) {
  *bytes = Layout(args).total;
  return MXMOE_STATUS_OK;
}

mxmoe_status GroupedGemmSm90(const mxmoe_grouped_gemm_args& args, void* workspace,
                             size_t workspace_bytes, void* stream_ptr) {
  bool reduced = false;
  return GroupedGemmSm90Chained(args, workspace, workspace_bytes, stream_ptr, GemmChain{},
                                &reduced);
}

namespace {

// The tile configuration for args (on args.device's multiprocessor count, *num_sms).
sm90::GemmConfig ChainConfig(const mxmoe_grouped_gemm_args& args, int* num_sms,
                             mxmoe_status* status) {
  *status = MultiprocessorCount(args.device.id, num_sms);
  const sm90::GemmProblem problem{args.rows, args.n, args.k, args.num_experts, *num_sms};
  return sm90::ChooseGemmConfigWithOverride(problem);
}

// A quantize step's activation as the CUDA-core kernel's GemvSource.
sm90::GemvSource GemvSourceOf(ExpertsActivation activation) {
  switch (activation) {
    case ExpertsActivation::kNone:
      return sm90::GemvSource::kGather;
    case ExpertsActivation::kSiluMul:
      return sm90::GemvSource::kSiluMul;
    case ExpertsActivation::kGeneral:
      return sm90::GemvSource::kGeneral;
  }
  return sm90::GemvSource::kMxfp4;
}

// Whether the CUDA-core path, chosen by config, takes a source of this kind. By default where
// it pays (docs/perf-notes.md, "The CUDA-core GEMMs quantize their own activations"): every CTA
// of an expert repeats the quantize of its rows, which costs less than the quantize kernel's
// launch only when the grid (slots x weight panels) is one wave of resident CTAs, and the
// general activation (bias loads, SwiGLU) costs more even then. MXMOE_SM90_GEMV_QUANTIZE forces
// it: 0 never, else a mask (1 the gather, 2 the activation, any kind) wherever the path runs.
bool TakesSource(const mxmoe_grouped_gemm_args& args, const sm90::GemmConfig& config,
                 int num_sms, ExpertsActivation activation) {
  if (!config.gemv) return false;
  if (const char* env = getenv("MXMOE_SM90_GEMV_QUANTIZE")) {
    const int bit = activation == ExpertsActivation::kNone ? 1 : 2;
    return (atoi(env) & bit) != 0;
  }
  if (activation == ExpertsActivation::kGeneral) return false;
  return sm90::GemvWaves({args.rows, args.n, args.k, args.num_experts, num_sms}) == 1;
}

}  // namespace

bool GroupedGemmSm90TakesSource(const mxmoe_grouped_gemm_args& args,
                                ExpertsActivation activation) {
  if (args.rows == 0 || args.n == 0) return false;
  mxmoe_status status = MXMOE_STATUS_OK;
  int num_sms = 0;
  const sm90::GemmConfig config = ChainConfig(args, &num_sms, &status);
  return status == MXMOE_STATUS_OK && TakesSource(args, config, num_sms, activation);
}

mxmoe_status GroupedGemmSm90Chained(const mxmoe_grouped_gemm_args& args, void* workspace,
                                    size_t workspace_bytes, void* stream_ptr,
                                    const GemmChain& chain, bool* reduced) {
  (void)workspace_bytes;  // checked against the size query by cc/src
  *reduced = false;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (args.rows == 0 || args.n == 0) return MXMOE_STATUS_OK;  // nothing to write
  const bool prepared = args.b.format == MXMOE_WEIGHT_FORMAT_PREPARED;
  const WorkspaceLayout layout = Layout(args);
  uint8_t* ws = reinterpret_cast<uint8_t*>(
      format::RoundUp(reinterpret_cast<uintptr_t>(workspace), kSliceAlign));
  uint8_t* a8 = ws + layout.a8_offset;
  float* factor = reinterpret_cast<float*>(ws + layout.factor_offset);
  const uint8_t* weights = args.b.packed;
  if (!prepared) {
    uint8_t* out = ws + layout.prepared_offset;
    MXMOE_RETURN_IF_ERROR(LaunchPrepare(args.b.packed, args.b.scales,
                                        args.b.format == MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4,
                                        args.num_experts, args.n, args.k, out, stream));
    weights = out;
  }

  mxmoe_status config_status = MXMOE_STATUS_OK;
  int num_sms = 0;
  const sm90::GemmConfig config = ChainConfig(args, &num_sms, &config_status);
  MXMOE_RETURN_IF_ERROR(config_status);
  const int num_chunks = static_cast<int>(sm90::NumChunks(args.k));
  const ExpertsQuantizeJob* source = chain.source;
  if (source != nullptr && (!TakesSource(args, config, num_sms, source->activation) ||
                            (source->activation == ExpertsActivation::kNone &&
                             source->row_source == nullptr))) {
    return Fail(MXMOE_STATUS_INTERNAL,
                "grouped_gemm (sm90): the chain passed a source the CUDA-core path does not take"
                " (rows=", args.rows, ")");
  }

  if (config.gemv) {
    sm90::GemvKernelParams gp;
    gp.prepared = weights;
    gp.a = args.a;
    gp.a_scales = args.a_scales;
    gp.expert_offsets = args.expert_offsets;
    gp.blockscale_offsets = args.blockscale_offsets;
    gp.c = args.c;
    gp.rows = args.rows;
    gp.num_experts = args.num_experts;
    gp.n = static_cast<int32_t>(args.n);
    gp.k = static_cast<int32_t>(args.k);
    gp.num_panels = static_cast<int32_t>(sm90::NumPanels(args.n));
    gp.num_chunks = num_chunks;
    gp.c_is_fp16 = args.c_dtype == MXMOE_DTYPE_FP16 ? 1 : 0;
    gp.offsets_before_wait = chain.offsets_before_wait && prepared ? 1 : 0;
    gp.reduce = ReduceParams{};
    gp.reduce_counters = nullptr;
    const ReduceParams* r = chain.reduce;
    if (r != nullptr && chain.reduce_counters != nullptr && r->hidden_size == args.n &&
        r->num_tokens * r->slots_per_token <= sm90::kGemvReduceMaxPairs) {
      gp.reduce = *r;
      gp.reduce_counters = chain.reduce_counters;
    }
    gp.source = sm90::GemvSource::kMxfp4;
    if (source != nullptr) {
      gp.source = GemvSourceOf(source->activation);
      gp.src = source->input;
      gp.row_source = source->row_source;
      gp.slots_per_token = source->slots_per_token;
      gp.source_rows = static_cast<int32_t>(source->source_rows);
      gp.activation = {source->bias, source->bias_dtype, source->activation_kind,
                       source->swiglu_alpha, source->swiglu_limit};
    }
    const int64_t slots = args.rows < args.num_experts ? args.rows : args.num_experts;
    // One CTA per (slot, panel): a persistent grid was measured slower (docs/perf-notes.md).
    MXMOE_RETURN_IF_ERROR(sm90::LaunchGemvKernel(gp, static_cast<int>(slots), stream));
    *reduced = gp.reduce.output != nullptr;
    return MXMOE_STATUS_OK;
  }

  const int64_t factor_stride = FactorStride(args.rows);
  {
    const int threads = 256;
    const int64_t work = args.rows * num_chunks * 4;
    const int64_t blocks64 = (work + threads - 1) / threads;
    // At most a full wave (8 CTAs of 256 per SM): every CTA stages the offsets once, so a grid of
    // one CTA per 256 items would re-read them ~10^5 times at prefill.
    const int64_t most = static_cast<int64_t>(num_sms > 0 ? num_sms : 132) * 8;
    const int blocks = static_cast<int>(blocks64 < most ? blocks64 : most);
    const size_t offsets_smem = ConvertSmemBytes(args.num_experts);
    MXMOE_CUDA_RETURN_IF_ERROR(LaunchPdl(
        ConvertActivationsKernel, dim3(blocks), dim3(threads), offsets_smem, stream, args.a,
        args.a_scales, args.expert_offsets, args.blockscale_offsets, args.num_experts, args.rows,
        static_cast<int>(args.k), num_chunks, factor_stride, Aligned(args.a_scales, 4) ? 1 : 0,
        a8, factor));
  }

  sm90::GemmKernelLaunch launch;
  MXMOE_RETURN_IF_ERROR(Encode2d(&launch.act_map, CU_TENSOR_MAP_DATA_TYPE_UINT8, a8,
                                 static_cast<uint64_t>(num_chunks) * kChunkK,
                                 static_cast<uint64_t>(args.rows),
                                 static_cast<uint64_t>(num_chunks) * kChunkK, kChunkK,
                                 static_cast<uint32_t>(config.block_n),
                                 CU_TENSOR_MAP_SWIZZLE_128B, "activations"));
  launch.params.prepared = weights;
  launch.params.expert_offsets = args.expert_offsets;
  launch.params.factors = factor;
  launch.params.factor_stride = factor_stride;
  launch.params.c = args.c;
  launch.params.rows = args.rows;
  launch.params.num_experts = args.num_experts;
  launch.params.n = static_cast<int32_t>(args.n);
  launch.params.num_panels = static_cast<int32_t>(sm90::NumPanels(args.n));
  launch.params.num_chunks = num_chunks;
  launch.params.c_is_fp16 = args.c_dtype == MXMOE_DTYPE_FP16 ? 1 : 0;
  launch.params.pingpong = config.pingpong ? 1 : 0;
  launch.grid = config.grid;
  return sm90::LaunchGemmKernel(config.block_n, launch, stream);
}

namespace sm90 {

mxmoe_status LaunchGemmKernel(int block_n, const GemmKernelLaunch& launch, cudaStream_t stream) {
  return DispatchValue<16, 32, 64, 128>(block_n, "grouped_gemm (sm90) block_n", [&](auto n) {
    return LaunchGemmKernelN<decltype(n)::value>(launch, stream);
  });
}

}  // namespace sm90
}  // namespace cuda
}  // namespace mxmoe
