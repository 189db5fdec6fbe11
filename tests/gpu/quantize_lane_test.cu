// Exhaustive device checks of the building blocks of the CUDA quantizers
// (cc/cuda/quantize_device.cuh) against the contract functions of mxmoe/format.h, run on the GPU:
//   1. EncodeE2M1x2 == format::FloatToE2M1(x * 2^(127-s)) for every bf16 and fp16 x and every
//      scale s (the products the rule can produce: |v| < 8 or +-Inf), in both halves;
//   2. the hardware conversions the kernels use instead of format.h's: fp16 -> fp32 for every
//      fp16, and fp32 -> bf16 / fp16 (round to nearest even) for every fp32 bit pattern
//      (NaN excluded: a NaN block is zeroed whatever its bits);
//   3. FastDivmod against '/' for the divisors the kernels meet and edge numerators;
//   1b. ScaleEncodeE2M1x2Bf16 (the packed bf16 encoding, quant::Encode::kBf16Packed) ==
//      format::FloatToE2M1(x * 2^(127-s)) for every bf16 x and every scale s <= 253;
//   3b. format::SiluF32 == g / (1 + ExpF32(-g)) bit for bit on every fp32 input (NaN: both NaN);
//   3c. quant::SiluFastF32 == format::SiluF32 bit for bit on every fp32 input of its domain
//      (2^-64 <= |g| <= 64), and its domain flag is set exactly there; the SiLU table path
//      (quant::SiluTableF32 over quant::BuildSiluTable) == format::SiluF32 for every bf16;
//   4. QuantizeLane (4 lanes per 32-element block, warp shuffles) against a per-block reference
//      built from format.h only (the CPU backend's QuantizeBlock), on random and hard blocks, for
//      both encodings of bf16 blocks.
// A standalone program for the GPU host (tools/gpu/run.sh runs it; the Bazel target
// //tests/gpu:quantize_lane_test). MXMOE_GPU_TEST_QUICK=1 samples instead of enumerating
// (compute-sanitizer runs). Prints "N passed, M failed"; exit code != 0 on any failure.
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <random>
#include <vector>

#include "cc/cuda/quantize_device.cuh"
#include "mxmoe/format.h"

namespace {

using mxmoe::cuda::quant::Bf16;
using mxmoe::cuda::quant::FastDivmod;
using mxmoe::cuda::quant::Fp16;
namespace fmt = mxmoe::format;
namespace quant = mxmoe::cuda::quant;

#define CHECK_CUDA(expr)                                                                    \
  do {                                                                                      \
    cudaError_t err_ = (expr);                                                              \
    if (err_ != cudaSuccess) {                                                              \
      fprintf(stderr, "%s failed: %s (%s:%d)\n", #expr, cudaGetErrorString(err_), __FILE__, \
              __LINE__);                                                                    \
      exit(2);                                                                              \
    }                                                                                       \
  } while (0)

struct Mismatch {
  unsigned long long count;
  unsigned long long first;  // index of the first one recorded (any of them)
  uint32_t got;
  uint32_t want;
};

__device__ void Record(Mismatch* m, unsigned long long index, uint32_t got, uint32_t want) {
  if (atomicAdd(&m->count, 1ull) == 0) {
    m->first = index;
    m->got = got;
    m->want = want;
  }
}

__device__ float ProductFor(bool fp16, uint32_t x, uint32_t s, bool* usable) {
  const float f = fp16 ? fmt::Fp16ToFloat(static_cast<uint16_t>(x))
                       : fmt::Bf16ToFloat(static_cast<uint16_t>(x));
  const float v = MXMOE_MUL(f, fmt::QuantMultiplier(static_cast<uint8_t>(s)));
  *usable = !fmt::IsNaN(f) && (fabsf(v) < 8.0f || isinf(v));
  return v;
}

// Index = s << 16 | x; the other half of the pair gets a scrambled x' at the same scale.
__global__ void EncodeKernel(bool fp16, uint64_t stride, Mismatch* m) {
  const uint64_t total = 255ull << 16;
  for (uint64_t i = (blockIdx.x * uint64_t{blockDim.x} + threadIdx.x) * stride; i < total;
       i += uint64_t{gridDim.x} * blockDim.x * stride) {
    const uint32_t s = static_cast<uint32_t>(i >> 16);
    const uint32_t x = static_cast<uint32_t>(i & 0xFFFF);
    const uint32_t x2 = (x * 40503u + 12345u) & 0xFFFF;
    bool ok0, ok1;
    const float v0 = ProductFor(fp16, x, s, &ok0);
    float v1 = ProductFor(fp16, x2, s, &ok1);
    if (!ok0) continue;
    if (!ok1) v1 = 0.0f;
    const uint32_t got = quant::EncodeE2M1x2(v0, v1);
    const uint32_t want = fmt::FloatToE2M1(v0) | (uint32_t{fmt::FloatToE2M1(v1)} << 16);
    if (got != want) Record(m, i, got, want);
  }
}

// The packed bf16 encoding: index = s << 16 | x as in EncodeKernel, scales 0..253.
__global__ void EncodeBf16Kernel(uint64_t stride, Mismatch* m) {
  const uint64_t total = 254ull << 16;
  for (uint64_t i = (blockIdx.x * uint64_t{blockDim.x} + threadIdx.x) * stride; i < total;
       i += uint64_t{gridDim.x} * blockDim.x * stride) {
    const uint32_t s = static_cast<uint32_t>(i >> 16);
    const uint32_t x = static_cast<uint32_t>(i & 0xFFFF);
    const uint32_t x2 = (x * 40503u + 12345u) & 0xFFFF;
    bool ok0, ok1;
    const float v0 = ProductFor(false, x, s, &ok0);
    const float v1 = ProductFor(false, x2, s, &ok1);
    if (!ok0) continue;
    const uint32_t mult = quant::FloatBits16(fmt::QuantMultiplier(static_cast<uint8_t>(s)));
    const uint32_t got = quant::ScaleEncodeE2M1x2Bf16(x | (ok1 ? x2 << 16 : 0u),
                                                      mult | (mult << 16));
    const uint32_t want =
        fmt::FloatToE2M1(v0) | (ok1 ? uint32_t{fmt::FloatToE2M1(v1)} << 16 : 0u);
    if (got != want) Record(m, i, got, want);
  }
}

__global__ void Fp16ToFloatKernel(Mismatch* m) {
  const uint32_t h = blockIdx.x * blockDim.x + threadIdx.x;
  if (h > 0xFFFF) return;
  const float want = fmt::Fp16ToFloat(static_cast<uint16_t>(h));
  if (fmt::IsNaN(want)) return;
  const float got = Fp16::ToFloat(h);
  if (__float_as_uint(got) != __float_as_uint(want)) {
    Record(m, h, __float_as_uint(got), __float_as_uint(want));
  }
}

// Every fp32 bit pattern (or every stride-th): hardware round-to-nearest-even against format.h.
__global__ void FromFloatKernel(uint64_t stride, Mismatch* bf16, Mismatch* fp16) {
  const uint64_t total = 1ull << 32;
  for (uint64_t i = (blockIdx.x * uint64_t{blockDim.x} + threadIdx.x) * stride; i < total;
       i += uint64_t{gridDim.x} * blockDim.x * stride) {
    const float f = __uint_as_float(static_cast<uint32_t>(i));
    if (fmt::IsNaN(f)) continue;
    const uint32_t b = Bf16::FromFloat2(f, -f);
    const uint32_t want_b = fmt::FloatToBf16(f) | (uint32_t{fmt::FloatToBf16(-f)} << 16);
    if (b != want_b) Record(bf16, i, b, want_b);
    const uint32_t h = Fp16::FromFloat2(f, -f);
    const uint32_t want_h = fmt::FloatToFp16(f) | (uint32_t{fmt::FloatToFp16(-f)} << 16);
    if (h != want_h) Record(fp16, i, h, want_h);
  }
}

// The contract's definition, written plainly: g / (1 + ExpF32(-g)), -0 where exp overflows.
// format::SiluF32 is a branch-free rewrite of this; every fp32 input must give the same bits.
__device__ float SiluByDefinition(float g) {
  const float e = fmt::ExpF32(-g);
  if (__float_as_uint(e) == 0x7F800000u) return __uint_as_float(__float_as_uint(g) & 0x80000000u);
  return __fdiv_rn(g, __fadd_rn(1.0f, e));
}

__global__ void SiluKernel(uint64_t stride, Mismatch* m) {
  const uint64_t total = 1ull << 32;
  for (uint64_t i = (blockIdx.x * uint64_t{blockDim.x} + threadIdx.x) * stride; i < total;
       i += uint64_t{gridDim.x} * blockDim.x * stride) {
    const float g = __uint_as_float(static_cast<uint32_t>(i));
    const float got = fmt::SiluF32(g);
    const float want = SiluByDefinition(g);
    const bool same = __float_as_uint(got) == __float_as_uint(want) ||
                      (fmt::IsNaN(got) && fmt::IsNaN(want));
    if (!same) Record(m, i, __float_as_uint(got), __float_as_uint(want));
  }
}

// Every fp32 bit pattern: SiluFastF32 against format::SiluF32 where its domain flag is set, and
// the flag against the domain's definition.
__global__ void SiluFastKernel(uint64_t stride, Mismatch* m, Mismatch* flag) {
  const uint64_t total = 1ull << 32;
  for (uint64_t i = (blockIdx.x * uint64_t{blockDim.x} + threadIdx.x) * stride; i < total;
       i += uint64_t{gridDim.x} * blockDim.x * stride) {
    const float g = __uint_as_float(static_cast<uint32_t>(i));
    bool in_domain = true;
    const float got = quant::SiluFastF32(g, &in_domain);
    const bool want_in = fabsf(g) >= 0x1p-64f && fabsf(g) <= 64.0f;  // false for NaN
    if (in_domain != want_in) Record(flag, i, in_domain, want_in);
    if (!want_in) continue;
    const float want = fmt::SiluF32(g);
    if (__float_as_uint(got) != __float_as_uint(want)) {
      Record(m, i, __float_as_uint(got), __float_as_uint(want));
    }
  }
}

// Every bf16 gate value: the SiLU table path (table built in shared memory as the kernels do)
// against format::SiluF32 (NaN: both NaN).
__global__ void SiluTableKernel(Mismatch* m) {
  __shared__ float table[quant::kSiluTableEntries];
  quant::BuildSiluTable(table, threadIdx.x, blockDim.x);
  __syncthreads();
  for (uint32_t h = blockIdx.x * blockDim.x + threadIdx.x; h <= 0xFFFFu;
       h += gridDim.x * blockDim.x) {
    const float got = quant::SiluTableF32(table, h);
    const float want = fmt::SiluF32(__uint_as_float(h << 16));
    const bool same = __float_as_uint(got) == __float_as_uint(want) ||
                      (fmt::IsNaN(got) && fmt::IsNaN(want));
    if (!same) Record(m, h, __float_as_uint(got), __float_as_uint(want));
  }
}

// FastDivmod::Make runs on the host (as in the kernels' launchers); Div on the device.
__global__ void DivmodKernel(const FastDivmod* divisors, int num_divisors,
                             const uint32_t* numerators, int num_numerators, Mismatch* m) {
  const int d_index = blockIdx.y;
  if (d_index >= num_divisors) return;
  const FastDivmod div = divisors[d_index];
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < num_numerators;
       i += gridDim.x * blockDim.x) {
    const uint32_t n = numerators[i];
    const uint32_t got = div.Div(n);
    const uint32_t want = n / div.divisor;
    if (got != want) Record(m, (uint64_t{div.divisor} << 32) | n, got, want);
  }
}

template <typename T, quant::Encode kEncode>
__global__ void LaneKernel(const uint16_t* blocks, int num_blocks, uint32_t* codes,
                           uint8_t* scales) {
  // 4 lanes per block: lane 4b + j holds elements 8j .. 8j+7 of block b.
  const int lane_global = blockIdx.x * blockDim.x + threadIdx.x;
  const int block = min(lane_global / 4, num_blocks - 1);
  const int j = lane_global % 4;
  const uint4 raw = *reinterpret_cast<const uint4*>(blocks + block * 32 + j * 8);
  const quant::QuantizedLane q = quant::QuantizeLane<T, kEncode>(quant::AsLane8(raw));
  if (lane_global / 4 < num_blocks) {
    codes[block * 4 + j] = q.codes;
    if (j == 0) scales[block] = q.scale;
  }
}

// The CPU backend's per-block rule (cc/cpu/mxfp4_block.h), from format.h only.
uint8_t ReferenceBlock(const float* x, uint32_t* packed_words) {
  float amax = 0.0f;
  bool has_nan = false;
  for (int i = 0; i < 32; ++i) {
    if (fmt::IsNaN(x[i])) has_nan = true;
    const float a = fabsf(x[i]);
    amax = a > amax ? a : amax;
  }
  if (has_nan) {
    memset(packed_words, 0, 16);
    return fmt::kScaleNaN;
  }
  const uint8_t s = fmt::ScaleFromAmax(amax);
  const float mult = fmt::QuantMultiplier(s);
  uint8_t bytes[16];
  for (int i = 0; i < 16; ++i) {
    bytes[i] = static_cast<uint8_t>(fmt::FloatToE2M1(x[2 * i] * mult) |
                                    (fmt::FloatToE2M1(x[2 * i + 1] * mult) << 4));
  }
  memcpy(packed_words, bytes, 16);
  return s;
}

int g_passed = 0;
int g_failed = 0;

void Report(const char* name, const Mismatch& m) {
  if (m.count == 0) {
    printf("PASS %s\n", name);
    ++g_passed;
  } else {
    printf("FAIL %s: %llu mismatches; e.g. index 0x%llx got 0x%08x want 0x%08x\n", name, m.count,
           m.first, m.got, m.want);
    ++g_failed;
  }
}

Mismatch* NewMismatch() {
  Mismatch* m;
  CHECK_CUDA(cudaMalloc(&m, sizeof(Mismatch)));
  CHECK_CUDA(cudaMemset(m, 0, sizeof(Mismatch)));
  return m;
}

// Copies a device-side tally back, reports it and frees it.
void ReportDevice(const char* name, Mismatch* device_tally) {
  Mismatch m;
  CHECK_CUDA(cudaMemcpy(&m, device_tally, sizeof(Mismatch), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaFree(device_tally));
  Report(name, m);
}

void CheckLanes(bool fp16, bool packed, int num_blocks, std::mt19937* rng) {
  std::vector<uint16_t> blocks(static_cast<size_t>(num_blocks) * 32);
  std::uniform_int_distribution<int> bits(0, 0xFFFF);
  std::uniform_int_distribution<int> kind(0, 5);
  std::uniform_int_distribution<int> pos(0, 31);
  for (int b = 0; b < num_blocks; ++b) {
    const int k = kind(*rng);
    // Same exponent band for the whole block (0..3), or any bits (4, 5).
    const int top = bits(*rng) & 0x7F80;
    for (int i = 0; i < 32; ++i) {
      uint16_t v = static_cast<uint16_t>(bits(*rng));
      if (k <= 3) v = static_cast<uint16_t>((v & 0x807F) | top);
      if (k == 2) v &= 0x8000;  // zeros
      blocks[b * 32 + i] = v;
    }
    if (k == 1) blocks[b * 32 + pos(*rng)] = fp16 ? 0x7C00 : 0x7F80;  // +Inf
    if (k == 3) blocks[b * 32 + pos(*rng)] = fp16 ? 0xFE01 : 0xFF81;  // NaN
  }
  uint16_t* d_blocks;
  uint32_t* d_codes;
  uint8_t* d_scales;
  CHECK_CUDA(cudaMalloc(&d_blocks, blocks.size() * 2));
  CHECK_CUDA(cudaMalloc(&d_codes, static_cast<size_t>(num_blocks) * 16));
  CHECK_CUDA(cudaMalloc(&d_scales, num_blocks));
  CHECK_CUDA(cudaMemcpy(d_blocks, blocks.data(), blocks.size() * 2, cudaMemcpyHostToDevice));
  const int lanes = num_blocks * 4;
  const int threads = 256;
  const int grid = (lanes + threads - 1) / threads;
  if (fp16) {
    LaneKernel<Fp16, quant::Encode::kFloat><<<grid, threads>>>(d_blocks, num_blocks, d_codes,
                                                               d_scales);
  } else if (packed) {
    LaneKernel<Bf16, quant::Encode::kBf16Packed><<<grid, threads>>>(d_blocks, num_blocks,
                                                                    d_codes, d_scales);
  } else {
    LaneKernel<Bf16, quant::Encode::kFloat><<<grid, threads>>>(d_blocks, num_blocks, d_codes,
                                                               d_scales);
  }
  CHECK_CUDA(cudaGetLastError());
  std::vector<uint32_t> codes(static_cast<size_t>(num_blocks) * 4);
  std::vector<uint8_t> scales(num_blocks);
  CHECK_CUDA(cudaMemcpy(codes.data(), d_codes, codes.size() * 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(scales.data(), d_scales, scales.size(), cudaMemcpyDeviceToHost));
  Mismatch m{};
  for (int b = 0; b < num_blocks; ++b) {
    float x[32];
    for (int i = 0; i < 32; ++i) {
      x[i] = fp16 ? fmt::Fp16ToFloat(blocks[b * 32 + i]) : fmt::Bf16ToFloat(blocks[b * 32 + i]);
    }
    uint32_t want[4];
    const uint8_t want_scale = ReferenceBlock(x, want);
    for (int j = 0; j < 4; ++j) {
      if (codes[b * 4 + j] != want[j] && m.count++ == 0) {
        m.first = b;
        m.got = codes[b * 4 + j];
        m.want = want[j];
      }
    }
    if (scales[b] != want_scale && m.count++ == 0) {
      m.first = b;
      m.got = scales[b];
      m.want = want_scale;
    }
  }
  Report(fp16     ? "QuantizeLane fp16 blocks"
         : packed ? "QuantizeLane bf16 blocks, packed bf16 encoding"
                  : "QuantizeLane bf16 blocks",
         m);
  CHECK_CUDA(cudaFree(d_blocks));
  CHECK_CUDA(cudaFree(d_codes));
  CHECK_CUDA(cudaFree(d_scales));
}

}  // namespace

int main() {
  const char* quick_env = getenv("MXMOE_GPU_TEST_QUICK");
  const bool quick = quick_env != nullptr && quick_env[0] != '\0' && strcmp(quick_env, "0") != 0;
  int device_count = 0;
  if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
    printf("quantize_lane_test: no CUDA device, nothing checked\n");
    return 1;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  printf("quantize_lane_test on %s (sm_%d%d)%s\n", prop.name, prop.major, prop.minor,
         quick ? " [quick: sampled]" : "");
  const int grid = prop.multiProcessorCount * 8;

  for (int fp16 = 0; fp16 < 2; ++fp16) {
    Mismatch* m = NewMismatch();
    EncodeKernel<<<grid, 256>>>(fp16 != 0, quick ? 257 : 1, m);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaDeviceSynchronize());
    ReportDevice(fp16 ? "EncodeE2M1x2 == FloatToE2M1, every fp16 x every scale"
                      : "EncodeE2M1x2 == FloatToE2M1, every bf16 x every scale",
                 m);
  }
  {
    Mismatch* m = NewMismatch();
    EncodeBf16Kernel<<<grid, 256>>>(quick ? 257 : 1, m);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaDeviceSynchronize());
    ReportDevice("ScaleEncodeE2M1x2Bf16 == FloatToE2M1, every bf16 x every scale <= 253", m);
  }
  {
    Mismatch* m = NewMismatch();
    Fp16ToFloatKernel<<<256, 256>>>(m);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaDeviceSynchronize());
    ReportDevice("Fp16::ToFloat == format::Fp16ToFloat, every fp16", m);
  }
  {
    Mismatch* b = NewMismatch();
    Mismatch* h = NewMismatch();
    FromFloatKernel<<<grid, 256>>>(quick ? 65537 : 1, b, h);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaDeviceSynchronize());
    ReportDevice("Bf16::FromFloat2 == format::FloatToBf16, every fp32", b);
    ReportDevice("Fp16::FromFloat2 == format::FloatToFp16, every fp32", h);
  }
  {
    Mismatch* m = NewMismatch();
    SiluKernel<<<grid, 256>>>(quick ? 65537 : 1, m);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaDeviceSynchronize());
    ReportDevice("format::SiluF32 == its definition, every fp32", m);
  }
  {
    Mismatch* m = NewMismatch();
    Mismatch* flag = NewMismatch();
    SiluFastKernel<<<grid, 256>>>(quick ? 65537 : 1, m, flag);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaDeviceSynchronize());
    ReportDevice("quant::SiluFastF32 == format::SiluF32, every fp32 of its domain", m);
    ReportDevice("quant::SiluFastF32 domain flag, every fp32", flag);
  }
  {
    Mismatch* m = NewMismatch();
    SiluTableKernel<<<64, 256>>>(m);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaDeviceSynchronize());
    ReportDevice("quant::SiluTableF32 == format::SiluF32, every bf16", m);
  }
  {
    std::vector<uint32_t> divisors;
    for (uint32_t d = 1; d <= (quick ? 64u : 1024u); ++d) divisors.push_back(d);
    for (uint32_t d : {1440u, 2048u, 2880u, 7168u, 12345u, 65536u, 65537u, (1u << 20) + 7,
                       (1u << 29) + 1, (1u << 30) - 1, 1u << 30}) {
      divisors.push_back(d);
    }
    std::vector<uint32_t> numerators;
    for (uint32_t n = 0; n < (quick ? 1024u : 1u << 20); ++n) numerators.push_back(n);
    std::mt19937 rng(1234);
    std::uniform_int_distribution<uint32_t> any(0, (1u << 31) - 1);
    for (int i = 0; i < (quick ? 1024 : 1 << 20); ++i) numerators.push_back(any(rng));
    for (uint32_t d : divisors) {
      for (uint64_t q : {1ull, 2ull, 3ull, 1000ull, (1ull << 31) / d - 1, (1ull << 31) / d}) {
        for (int64_t delta = -1; delta <= 1; ++delta) {
          const int64_t n = static_cast<int64_t>(q * d) + delta;
          if (n >= 0 && n < (int64_t{1} << 31)) numerators.push_back(static_cast<uint32_t>(n));
        }
      }
    }
    std::vector<FastDivmod> dividers;
    for (uint32_t d : divisors) dividers.push_back(FastDivmod::Make(d));
    FastDivmod* d_div;
    uint32_t* d_num;
    CHECK_CUDA(cudaMalloc(&d_div, dividers.size() * sizeof(FastDivmod)));
    CHECK_CUDA(cudaMalloc(&d_num, numerators.size() * 4));
    CHECK_CUDA(cudaMemcpy(d_div, dividers.data(), dividers.size() * sizeof(FastDivmod),
                          cudaMemcpyHostToDevice));
    CHECK_CUDA(
        cudaMemcpy(d_num, numerators.data(), numerators.size() * 4, cudaMemcpyHostToDevice));
    Mismatch* m = NewMismatch();
    DivmodKernel<<<dim3(64, static_cast<unsigned>(divisors.size())), 256>>>(
        d_div, static_cast<int>(divisors.size()), d_num, static_cast<int>(numerators.size()), m);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaDeviceSynchronize());
    ReportDevice("FastDivmod == '/', kernel divisors x edge numerators", m);
    CHECK_CUDA(cudaFree(d_div));
    CHECK_CUDA(cudaFree(d_num));
  }
  std::mt19937 rng(42);
  CheckLanes(false, false, quick ? 1024 : 1 << 18, &rng);
  CheckLanes(false, true, quick ? 1024 : 1 << 18, &rng);
  CheckLanes(true, false, quick ? 1024 : 1 << 18, &rng);

  printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
