// Bad input for every C API entry point: each case starts from valid arguments, breaks one thing
// (NULL pointer, wrong dtype/layout/format, negative dim, K % 32 != 0, non-monotone or
// out-of-range offsets, wrong problem_sizes, expert ids / expert_map out of range, weight
// structs that do not match, PREPARED weights of another backend, a
// workspace or prepared buffer too small, an invalid device, MXMOE_BACKEND overrides) and checks
//   - the exact status,
//   - that mxmoe_last_error() names the argument and the offending value,
//   - that no output byte was written (outputs are poisoned first).
// Each fixture finally runs its valid arguments to show the failures came from the one change.
// Also: status strings, version, backend names, backend selection, thread-local last error.
// MXMOE_TEST_VERBOSE=1 prints every case's status and message.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "mxmoe/format.h"
#include "mxmoe/mxmoe.h"
#include "tests/cc/expect.h"

namespace mxmoe {
// The library reads MXMOE_BACKEND once per process (cc/src/backend.h); the override cases below
// try several values in one process, so they re-read it after each change.
void ReloadBackendEnvForTesting();
}  // namespace mxmoe

namespace {

using mxmoe_test::failures;
int cases = 0;

constexpr mxmoe_device kCpu = {MXMOE_DEVICE_CPU, 0};
constexpr mxmoe_device kCuda0 = {MXMOE_DEVICE_CUDA, 0};
constexpr uint8_t kPoison = 0xA5;
constexpr mxmoe_status OK = MXMOE_STATUS_OK;
constexpr mxmoe_status INVALID = MXMOE_STATUS_INVALID_ARGUMENT;
constexpr mxmoe_status UNSUPPORTED = MXMOE_STATUS_UNSUPPORTED;
constexpr mxmoe_status TOO_SMALL = MXMOE_STATUS_WORKSPACE_TOO_SMALL;

// Sets (or, for nullptr, unsets) MXMOE_BACKEND and makes the library read it again.
void SetBackendEnv(const char* value) {
  if (value == nullptr) {
    unsetenv("MXMOE_BACKEND");
  } else {
    setenv("MXMOE_BACKEND", value, 1);
  }
  mxmoe::ReloadBackendEnvForTesting();
}

// An output buffer that must stay poisoned.
struct Output {
  const char* name;
  std::vector<uint8_t>* bytes;
};

std::vector<uint8_t> Poisoned(size_t n) { return std::vector<uint8_t>(n, kPoison); }

bool HasGpu() { return mxmoe_cuda_device_count() > 0; }

// The status and message a CUDA device gets for host pointers: no GPU here -> UNSUPPORTED; with
// a GPU the host pointers are on the wrong device -> INVALID_ARGUMENT.
mxmoe_status CudaStatus() { return HasGpu() ? INVALID : UNSUPPORTED; }
const char* CudaNeedle() {
  return HasGpu() ? "is not memory on cuda:0" : "no CUDA device is visible";
}

template <typename Args, typename Call, typename Mutate>
void ExpectBad(const char* op, const std::string& what, const Args& base, const Call& call,
               const Mutate& mutate, mxmoe_status want, const std::vector<std::string>& needles,
               const std::vector<Output>& outputs) {
  ++cases;
  Args args = base;
  mutate(args);
  const mxmoe_status got = call(&args);
  const std::string message = mxmoe_last_error();
  if (getenv("MXMOE_TEST_VERBOSE") != nullptr) {
    printf("%-32s %-40s %-20s %s\n", op, what.c_str(), mxmoe_status_string(got), message.c_str());
  }
  EXPECT(got == want, "%s, %s: status %s, expected %s (message: \"%s\")", op, what.c_str(),
         mxmoe_status_string(got), mxmoe_status_string(want), message.c_str());
  for (const std::string& needle : needles) {
    EXPECT(message.find(needle) != std::string::npos, "%s, %s: message \"%s\" lacks \"%s\"", op,
           what.c_str(), message.c_str(), needle.c_str());
  }
  for (const Output& out : outputs) {
    bool untouched = true;
    for (uint8_t b : *out.bytes) untouched &= (b == kPoison);
    EXPECT(untouched, "%s, %s: output %s was written", op, what.c_str(), out.name);
  }
}

template <typename Args, typename Call>
void ExpectValid(const char* op, const Args& args, const Call& call) {
  const mxmoe_status got = call(&args);
  EXPECT(got == OK, "%s with the fixture's valid arguments: %s (%s)", op,
         mxmoe_status_string(got), mxmoe_last_error());
  EXPECT(got != OK || mxmoe_last_error()[0] == '\0', "%s succeeded but left a last error: %s", op,
         mxmoe_last_error());
}

// Device cases every entry point shares.
template <typename Args, typename Call>
void ExpectBadDevices(const char* op, const Args& base, const Call& call,
                      const std::vector<Output>& outputs) {
  ExpectBad(op, "device.type 7", base, call, [](Args& a) { a.device = {7, 0}; }, INVALID,
            {"device.type", "got 7"}, outputs);
  ExpectBad(op, "CPU device id 1", base, call, [](Args& a) { a.device = {MXMOE_DEVICE_CPU, 1}; },
            INVALID, {"device.id", "got 1"}, outputs);
  ExpectBad(op, "CUDA device id -1", base, call,
            [](Args& a) { a.device = {MXMOE_DEVICE_CUDA, -1}; }, INVALID, {"device.id", "got -1"},
            outputs);
  ExpectBad(op, "CUDA device for host pointers", base, call, [](Args& a) { a.device = kCuda0; },
            CudaStatus(), {CudaNeedle()}, outputs);
  SetBackendEnv("sm90");
  ExpectBad(op, "MXMOE_BACKEND=sm90 for CPU pointers", base, call, [](Args&) {}, UNSUPPORTED,
            {"MXMOE_BACKEND=sm90", "CPU pointers"}, outputs);
  SetBackendEnv("tpu");
  ExpectBad(op, "MXMOE_BACKEND=tpu", base, call, [](Args&) {}, INVALID,
            {"MXMOE_BACKEND", "'tpu'"}, outputs);
  SetBackendEnv(nullptr);
}

std::vector<uint16_t> Bf16Ones(size_t n) {
  return std::vector<uint16_t>(n, mxmoe::format::FloatToBf16(1.0f));
}

// ---- quantize / dequantize --------------------------------------------------------------------

void TestQuantize() {
  const int64_t rows = 4, k = 64;
  std::vector<uint16_t> input = Bf16Ones(rows * k);
  std::vector<uint8_t> packed = Poisoned(rows * k / 2);
  std::vector<uint8_t> scales = Poisoned(512);
  const std::vector<Output> outs = {{"packed", &packed}, {"scales", &scales}};
  const mxmoe_quantize_args base = {rows, k, input.data(), MXMOE_DTYPE_BF16, packed.data(),
                                    scales.data(), MXMOE_SCALE_LAYOUT_LINEAR, kCpu};
  auto call = [](const mxmoe_quantize_args* a) { return mxmoe_quantize(a, nullptr); };
  using A = mxmoe_quantize_args;
  const char* op = "mxmoe_quantize";
  EXPECT(mxmoe_quantize(nullptr, nullptr) == INVALID, "quantize(NULL)");
  EXPECT(strstr(mxmoe_last_error(), "args must not be NULL"), "message: %s", mxmoe_last_error());
  ExpectBad(op, "input NULL", base, call, [](A& a) { a.input = nullptr; }, INVALID,
            {"input must not be NULL", "[4, 64]"}, outs);
  ExpectBad(op, "packed NULL", base, call, [](A& a) { a.packed = nullptr; }, INVALID,
            {"packed must not be NULL"}, outs);
  ExpectBad(op, "scales NULL", base, call, [](A& a) { a.scales = nullptr; }, INVALID,
            {"scales must not be NULL"}, outs);
  ExpectBad(op, "k = 2881", base, call, [](A& a) { a.k = 2881; }, INVALID,
            {"k must be a multiple of 32, got 2881"}, outs);
  ExpectBad(op, "k = 48", base, call, [](A& a) { a.k = 48; }, INVALID,
            {"k must be a multiple of 32, got 48"}, outs);
  ExpectBad(op, "k = -32", base, call, [](A& a) { a.k = -32; }, INVALID,
            {"k must be >= 0, got -32"}, outs);
  ExpectBad(op, "rows = -1", base, call, [](A& a) { a.rows = -1; }, INVALID,
            {"rows must be >= 0, got -1"}, outs);
  ExpectBad(op, "input_dtype FP32", base, call, [](A& a) { a.input_dtype = MXMOE_DTYPE_FP32; },
            INVALID, {"input_dtype", "got 2"}, outs);
  ExpectBad(op, "input_dtype 9", base, call, [](A& a) { a.input_dtype = 9; }, INVALID,
            {"input_dtype", "got 9"}, outs);
  ExpectBad(op, "scale_layout 2", base, call, [](A& a) { a.scale_layout = 2; }, INVALID,
            {"scale_layout", "got 2"}, outs);
  ExpectBad(op, "size overflow", base, call,
            [](A& a) { a.rows = std::numeric_limits<int64_t>::max() / 16; }, INVALID,
            {"overflows"}, outs);
  ExpectBadDevices(op, base, call, outs);
  // NULL is fine for an empty buffer.
  A empty = base;
  empty.rows = 0;
  empty.input = nullptr;
  empty.packed = nullptr;
  empty.scales = nullptr;
  ExpectValid(op, empty, call);
  ExpectValid(op, base, call);
}

void TestDequantize() {
  const int64_t rows = 3, k = 96;
  std::vector<uint8_t> packed(rows * k / 2, 0x21);
  std::vector<uint8_t> scales(512, 127);
  std::vector<uint8_t> output = Poisoned(rows * k * 4);
  const std::vector<Output> outs = {{"output", &output}};
  const mxmoe_dequantize_args base = {rows, k, packed.data(), scales.data(),
                                      MXMOE_SCALE_LAYOUT_SWIZZLED_128X4, output.data(),
                                      MXMOE_DTYPE_FP32, kCpu};
  auto call = [](const mxmoe_dequantize_args* a) { return mxmoe_dequantize(a, nullptr); };
  using A = mxmoe_dequantize_args;
  const char* op = "mxmoe_dequantize";
  ExpectBad(op, "packed NULL", base, call, [](A& a) { a.packed = nullptr; }, INVALID,
            {"packed must not be NULL", "[3, 48]"}, outs);
  ExpectBad(op, "scales NULL", base, call, [](A& a) { a.scales = nullptr; }, INVALID,
            {"scales must not be NULL", "[1, 128, 4]"}, outs);
  ExpectBad(op, "output NULL", base, call, [](A& a) { a.output = nullptr; }, INVALID,
            {"output must not be NULL"}, outs);
  ExpectBad(op, "k = 100", base, call, [](A& a) { a.k = 100; }, INVALID,
            {"k must be a multiple of 32, got 100"}, outs);
  ExpectBad(op, "output_dtype 3", base, call, [](A& a) { a.output_dtype = 3; }, INVALID,
            {"output_dtype", "got 3"}, outs);
  ExpectBad(op, "scale_layout -1", base, call, [](A& a) { a.scale_layout = -1; }, INVALID,
            {"scale_layout", "got -1"}, outs);
  ExpectBadDevices(op, base, call, outs);
  ExpectValid(op, base, call);
}

// ---- grouped quantizers ---------------------------------------------------------------------

// Experts with 2, 0, 3 rows; one spare row and one spare scale row.
struct GroupedFixture {
  int64_t rows = 6;
  int64_t scale_rows = 257;
  std::vector<int32_t> expert_offsets = {0, 2, 2, 5};
  std::vector<int32_t> blockscale_offsets = {0, 128, 128, 256};
};

template <typename A, typename Call>
void ExpectBadOffsets(const char* op, const A& base, const Call& call,
                      const std::vector<Output>& outs, const char* rows_name) {
  static std::vector<int32_t> offsets, scale_offsets;
  auto with_offsets = [&](std::vector<int32_t> o, std::vector<int32_t> s) {
    offsets = std::move(o);
    scale_offsets = std::move(s);
    return [](A& a) {
      a.expert_offsets = offsets.data();
      a.blockscale_offsets = scale_offsets.data();
    };
  };
  ExpectBad(op, "expert_offsets[0] = 1", base, call,
            with_offsets({1, 2, 2, 5}, {0, 128, 128, 256}), INVALID,
            {"expert_offsets[0] must be 0, got 1"}, outs);
  ExpectBad(op, "non-monotone expert_offsets", base, call,
            with_offsets({0, 3, 2, 5}, {0, 128, 128, 256}), INVALID,
            {"expert_offsets must be non-decreasing: expert_offsets[2]=2 < expert_offsets[1]=3"},
            outs);
  ExpectBad(op, "expert_offsets[E] past rows", base, call,
            with_offsets({0, 2, 2, 7}, {0, 128, 128, 256}), INVALID,
            {"expert_offsets[3]=7 exceeds ", rows_name, "=6"}, outs);
  ExpectBad(op, "negative expert_offsets", base, call,
            with_offsets({0, -2, 2, 5}, {0, 128, 128, 256}), INVALID,
            {"expert_offsets[1]=-2 < expert_offsets[0]=0"}, outs);
  ExpectBad(op, "blockscale_offsets[0] = 128", base, call,
            with_offsets({0, 2, 2, 5}, {128, 256, 256, 384}), INVALID,
            {"blockscale_offsets[0] must be 0, got 128"}, outs);
  ExpectBad(op, "blockscale step wrong", base, call,
            with_offsets({0, 2, 2, 5}, {0, 128, 256, 384}), INVALID,
            {"blockscale_offsets[2]=256", "round_up(m_1, 128) = 128 + 0", "m_1=0"}, outs);
  ExpectBad(op, "blockscale not padded", base, call,
            with_offsets({0, 2, 2, 5}, {0, 2, 2, 5}), INVALID,
            {"blockscale_offsets[1]=2", "m_0=2"}, outs);
}

void TestExpertsQuantize() {
  GroupedFixture f;
  const int64_t k = 64;
  std::vector<uint16_t> input = Bf16Ones(f.rows * k);
  std::vector<uint8_t> packed = Poisoned(f.rows * k / 2);
  std::vector<uint8_t> scales = Poisoned(f.scale_rows * 4);
  const std::vector<Output> outs = {{"packed", &packed}, {"scales", &scales}};
  mxmoe_experts_quantize_args base = {};
  base.rows = f.rows;
  base.k = k;
  base.num_experts = 3;
  base.input = input.data();
  base.input_dtype = MXMOE_DTYPE_BF16;
  base.expert_offsets = f.expert_offsets.data();
  base.blockscale_offsets = f.blockscale_offsets.data();
  base.packed = packed.data();
  base.scales = scales.data();
  base.scale_rows = f.scale_rows;
  base.device = kCpu;
  auto call = [](const mxmoe_experts_quantize_args* a) {
    return mxmoe_experts_quantize(a, nullptr);
  };
  using A = mxmoe_experts_quantize_args;
  const char* op = "mxmoe_experts_quantize";
  EXPECT(mxmoe_experts_quantize(nullptr, nullptr) == INVALID, "experts_quantize(NULL)");
  ExpectBad(op, "input NULL", base, call, [](A& a) { a.input = nullptr; }, INVALID,
            {"input must not be NULL", "[6, 64]"}, outs);
  ExpectBad(op, "expert_offsets NULL", base, call, [](A& a) { a.expert_offsets = nullptr; },
            INVALID, {"expert_offsets must not be NULL", "[4]"}, outs);
  ExpectBad(op, "blockscale_offsets NULL", base, call,
            [](A& a) { a.blockscale_offsets = nullptr; }, INVALID,
            {"blockscale_offsets must not be NULL"}, outs);
  ExpectBad(op, "packed NULL", base, call, [](A& a) { a.packed = nullptr; }, INVALID,
            {"packed must not be NULL"}, outs);
  ExpectBad(op, "scales NULL", base, call, [](A& a) { a.scales = nullptr; }, INVALID,
            {"scales must not be NULL", "[257, 4]"}, outs);
  ExpectBad(op, "k = 2881", base, call, [](A& a) { a.k = 2881; }, INVALID,
            {"k must be a multiple of 32, got 2881"}, outs);
  ExpectBad(op, "num_experts 0", base, call, [](A& a) { a.num_experts = 0; }, INVALID,
            {"num_experts must be in [1, 65536], got 0"}, outs);
  ExpectBad(op, "num_experts 65537", base, call, [](A& a) { a.num_experts = 65537; }, INVALID,
            {"num_experts must be in [1, 65536], got 65537"}, outs);
  ExpectBad(op, "input_dtype FP32", base, call, [](A& a) { a.input_dtype = MXMOE_DTYPE_FP32; },
            INVALID, {"input_dtype", "got 2"}, outs);
  ExpectBad(op, "scale_rows -1", base, call, [](A& a) { a.scale_rows = -1; }, INVALID,
            {"scale_rows must be >= 0, got -1"}, outs);
  ExpectBad(op, "rows -3", base, call, [](A& a) { a.rows = -3; }, INVALID,
            {"rows must be >= 0, got -3"}, outs);
  ExpectBadOffsets(op, base, call, outs, "rows");
  ExpectBad(op, "scale_rows 255", base, call, [](A& a) { a.scale_rows = 255; }, INVALID,
            {"blockscale_offsets[3]=256 exceeds scale_rows=255"}, outs);
  ExpectBadDevices(op, base, call, outs);
  ExpectValid(op, base, call);
}

void TestSiluMulExpertsQuantize() {
  GroupedFixture f;
  const int64_t n = 64;
  std::vector<uint16_t> input = Bf16Ones(f.rows * 2 * n);
  std::vector<uint8_t> packed = Poisoned(f.rows * n / 2);
  std::vector<uint8_t> scales = Poisoned(f.scale_rows * 4);
  const std::vector<Output> outs = {{"packed", &packed}, {"scales", &scales}};
  mxmoe_silu_mul_experts_quantize_args base = {};
  base.rows = f.rows;
  base.n = n;
  base.num_experts = 3;
  base.input = input.data();
  base.input_dtype = MXMOE_DTYPE_BF16;
  base.expert_offsets = f.expert_offsets.data();
  base.blockscale_offsets = f.blockscale_offsets.data();
  base.packed = packed.data();
  base.scales = scales.data();
  base.scale_rows = f.scale_rows;
  base.device = kCpu;
  auto call = [](const mxmoe_silu_mul_experts_quantize_args* a) {
    return mxmoe_silu_mul_experts_quantize(a, nullptr);
  };
  using A = mxmoe_silu_mul_experts_quantize_args;
  const char* op = "mxmoe_silu_mul_experts_quantize";
  EXPECT(mxmoe_silu_mul_experts_quantize(nullptr, nullptr) == INVALID, "silu(NULL)");
  ExpectBad(op, "input NULL", base, call, [](A& a) { a.input = nullptr; }, INVALID,
            {"input must not be NULL", "[6, 128]"}, outs);
  ExpectBad(op, "packed NULL", base, call, [](A& a) { a.packed = nullptr; }, INVALID,
            {"packed must not be NULL"}, outs);
  ExpectBad(op, "scales NULL", base, call, [](A& a) { a.scales = nullptr; }, INVALID,
            {"scales must not be NULL"}, outs);
  ExpectBad(op, "expert_offsets NULL", base, call, [](A& a) { a.expert_offsets = nullptr; },
            INVALID, {"expert_offsets must not be NULL"}, outs);
  ExpectBad(op, "n = 2881", base, call, [](A& a) { a.n = 2881; }, INVALID,
            {"n must be a multiple of 32, got 2881"}, outs);
  ExpectBad(op, "n = -64", base, call, [](A& a) { a.n = -64; }, INVALID,
            {"n must be >= 0, got -64"}, outs);
  ExpectBad(op, "input_dtype 5", base, call, [](A& a) { a.input_dtype = 5; }, INVALID,
            {"input_dtype", "got 5"}, outs);
  ExpectBad(op, "num_experts -1", base, call, [](A& a) { a.num_experts = -1; }, INVALID,
            {"num_experts must be in [1, 65536], got -1"}, outs);
  ExpectBadOffsets(op, base, call, outs, "rows");
  ExpectBad(op, "scale_rows 255", base, call, [](A& a) { a.scale_rows = 255; }, INVALID,
            {"blockscale_offsets[3]=256 exceeds scale_rows=255"}, outs);
  ExpectBadDevices(op, base, call, outs);
  ExpectValid(op, base, call);
}

// ---- swizzle ----------------------------------------------------------------------------------

void TestSwizzle() {
  for (bool unswizzle : {false, true}) {
    const int64_t batch = 2, rows = 5, cols = 3;
    std::vector<uint8_t> input(batch * 128 * 4, 1);
    std::vector<uint8_t> output = Poisoned(batch * 128 * 4);
    const std::vector<Output> outs = {{"output", &output}};
    const mxmoe_swizzle_scales_args base = {batch, rows, cols, input.data(), output.data(), kCpu};
    auto call = [unswizzle](const mxmoe_swizzle_scales_args* a) {
      return unswizzle ? mxmoe_unswizzle_scales(a, nullptr) : mxmoe_swizzle_scales(a, nullptr);
    };
    using A = mxmoe_swizzle_scales_args;
    const char* op = unswizzle ? "mxmoe_unswizzle_scales" : "mxmoe_swizzle_scales";
    EXPECT(call(nullptr) == INVALID, "%s(NULL)", op);
    ExpectBad(op, "input NULL", base, call, [](A& a) { a.input = nullptr; }, INVALID,
              {"input must not be NULL", unswizzle ? "[2, 128, 4]" : "[2, 5, 3]"}, outs);
    ExpectBad(op, "output NULL", base, call, [](A& a) { a.output = nullptr; }, INVALID,
              {"output must not be NULL", unswizzle ? "[2, 5, 3]" : "[2, 128, 4]"}, outs);
    ExpectBad(op, "batch -1", base, call, [](A& a) { a.batch = -1; }, INVALID,
              {"batch must be >= 0, got -1"}, outs);
    ExpectBad(op, "rows -2", base, call, [](A& a) { a.rows = -2; }, INVALID,
              {"rows must be >= 0, got -2"}, outs);
    ExpectBad(op, "cols -3", base, call, [](A& a) { a.cols = -3; }, INVALID,
              {"cols must be >= 0, got -3"}, outs);
    ExpectBad(op, "rows near INT64_MAX", base, call,
              [](A& a) { a.rows = std::numeric_limits<int64_t>::max() - 3; }, INVALID,
              {"overflows"}, outs);
    ExpectBadDevices(op, base, call, outs);
    ExpectValid(op, base, call);
  }
}

// ---- weights ----------------------------------------------------------------------------------

void TestQuantizeWeights() {
  const int32_t experts = 2;
  const int64_t n = 8, k = 64;
  std::vector<uint16_t> weights = Bf16Ones(experts * n * k);
  std::vector<uint8_t> packed = Poisoned(experts * n * k / 2);
  std::vector<uint8_t> scales = Poisoned(experts * 128 * 4);
  const std::vector<Output> outs = {{"packed", &packed}, {"scales", &scales}};
  const mxmoe_quantize_weights_args base = {experts, n, k, weights.data(), MXMOE_DTYPE_BF16,
                                            packed.data(), scales.data(),
                                            MXMOE_SCALE_LAYOUT_LINEAR, kCpu};
  auto call = [](const mxmoe_quantize_weights_args* a) {
    return mxmoe_quantize_weights(a, nullptr);
  };
  using A = mxmoe_quantize_weights_args;
  const char* op = "mxmoe_quantize_weights";
  EXPECT(mxmoe_quantize_weights(nullptr, nullptr) == INVALID, "quantize_weights(NULL)");
  ExpectBad(op, "weights NULL", base, call, [](A& a) { a.weights = nullptr; }, INVALID,
            {"weights must not be NULL", "[2, 8, 64]"}, outs);
  ExpectBad(op, "packed NULL", base, call, [](A& a) { a.packed = nullptr; }, INVALID,
            {"packed must not be NULL"}, outs);
  ExpectBad(op, "scales NULL (swizzled)", base, call,
            [](A& a) {
              a.scales = nullptr;
              a.scale_layout = MXMOE_SCALE_LAYOUT_SWIZZLED_128X4;
            },
            INVALID, {"scales must not be NULL", "[2, 128, 4]"}, outs);
  ExpectBad(op, "num_experts 0", base, call, [](A& a) { a.num_experts = 0; }, INVALID,
            {"num_experts must be in [1, 65536], got 0"}, outs);
  ExpectBad(op, "n -1", base, call, [](A& a) { a.n = -1; }, INVALID, {"n must be >= 0, got -1"},
            outs);
  ExpectBad(op, "k 2881", base, call, [](A& a) { a.k = 2881; }, INVALID,
            {"k must be a multiple of 32, got 2881"}, outs);
  ExpectBad(op, "weights_dtype FP32", base, call,
            [](A& a) { a.weights_dtype = MXMOE_DTYPE_FP32; }, INVALID, {"weights_dtype", "got 2"},
            outs);
  ExpectBad(op, "scale_layout 3", base, call, [](A& a) { a.scale_layout = 3; }, INVALID,
            {"scale_layout", "got 3"}, outs);
  ExpectBadDevices(op, base, call, outs);
  ExpectValid(op, base, call);
}

void TestPrepareWeights() {
  const int32_t experts = 2;
  const int64_t n = 8, k = 64;
  std::vector<uint8_t> packed(experts * n * k / 2, 0x11);
  std::vector<uint8_t> scales(experts * n * k / 32, 127);
  // The CPU's prepared size: E * ceil(n / 8) panels of (k / 32) * (256 + 8) bytes.
  const size_t needed = experts * ((n + 7) / 8) * (k / 32) * 264;
  std::vector<uint8_t> prepared = Poisoned(needed);
  const std::vector<Output> outs = {{"prepared", &prepared}};
  mxmoe_prepare_weights_args base = {};
  base.weights = {experts, n, k, MXMOE_WEIGHT_FORMAT_LINEAR, 0, packed.data(), scales.data()};
  base.backend = MXMOE_BACKEND_AUTO;
  base.prepared = prepared.data();
  base.prepared_bytes = needed;
  base.device = kCpu;
  auto call = [](const mxmoe_prepare_weights_args* a) { return mxmoe_prepare_weights(a, nullptr); };
  using A = mxmoe_prepare_weights_args;
  const char* op = "mxmoe_prepare_weights";
  EXPECT(mxmoe_prepare_weights(nullptr, nullptr) == INVALID, "prepare_weights(NULL)");
  ExpectBad(op, "weights.format SWIZZLED", base, call,
            [](A& a) { a.weights.format = MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4; }, INVALID,
            {"weights.format must be LINEAR (0)", "got 1"}, outs);
  ExpectBad(op, "weights.k 33", base, call, [](A& a) { a.weights.k = 33; }, INVALID,
            {"weights.k must be a multiple of 32, got 33"}, outs);
  ExpectBad(op, "weights.num_experts 0", base, call, [](A& a) { a.weights.num_experts = 0; },
            INVALID, {"weights.num_experts must be in [1, 65536], got 0"}, outs);
  ExpectBad(op, "weights.packed NULL", base, call, [](A& a) { a.weights.packed = nullptr; },
            INVALID, {"weights.packed must not be NULL", "[2, 8, 32]"}, outs);
  ExpectBad(op, "weights.scales NULL", base, call, [](A& a) { a.weights.scales = nullptr; },
            INVALID, {"weights.scales must not be NULL", "[2, 8, 2]"}, outs);
  ExpectBad(op, "backend 7", base, call, [](A& a) { a.backend = 7; }, INVALID,
            {"backend must be", "got 7"}, outs);
  ExpectBad(op, "backend sm90 on CPU", base, call, [](A& a) { a.backend = MXMOE_BACKEND_SM90; },
            UNSUPPORTED, {"backend=sm90", "cpu:0", "'cpu'"}, outs);
  ExpectBad(op, "prepared NULL", base, call, [](A& a) { a.prepared = nullptr; }, INVALID,
            {"prepared must not be NULL", std::to_string(needed)}, outs);
  ExpectBad(op, "prepared_bytes too small", base, call,
            [&](A& a) { a.prepared_bytes = needed - 1; }, INVALID,
            {"prepared_bytes must be at least " + std::to_string(needed),
             "got " + std::to_string(needed - 1)},
            outs);
  ExpectBadDevices(op, base, call, outs);

  // The size query: shapes only (pointers may be NULL), bytes must not be NULL.
  A shapes = base;
  shapes.weights.packed = nullptr;
  shapes.weights.scales = nullptr;
  shapes.prepared = nullptr;
  size_t bytes = 12345;
  EXPECT(mxmoe_prepare_weights_size(&shapes, &bytes) == OK && bytes == needed,
         "prepare_weights_size with NULL pointers: %s, bytes %zu", mxmoe_last_error(), bytes);
  EXPECT(mxmoe_prepare_weights_size(&shapes, nullptr) == INVALID, "size query, bytes NULL");
  EXPECT(strstr(mxmoe_last_error(), "bytes"), "message: %s", mxmoe_last_error());
  EXPECT(mxmoe_prepare_weights_size(nullptr, &bytes) == INVALID, "size query, args NULL");
  shapes.weights.k = 31;
  bytes = 777;
  EXPECT(mxmoe_prepare_weights_size(&shapes, &bytes) == INVALID && bytes == 777,
         "size query with k = 31 must fail and leave bytes alone (%zu)", bytes);
  ExpectValid(op, base, call);
}

// ---- grouped GEMM -----------------------------------------------------------------------------

void TestGroupedGemm() {
  GroupedFixture f;
  const int64_t n = 40, k = 64;
  const int32_t experts = 3;
  std::vector<uint8_t> a(f.rows * k / 2, 0x22);
  std::vector<uint8_t> a_scales(f.scale_rows * 4, 127);
  std::vector<uint8_t> b(experts * n * k / 2, 0x33);
  std::vector<uint8_t> b_scales(experts * n * k / 32, 127);
  std::vector<int32_t> problem_sizes = {2, 40, 64, 0, 40, 64, 3, 40, 64};
  std::vector<uint8_t> c = Poisoned(f.rows * n * 2);
  const std::vector<Output> outs = {{"c", &c}};
  mxmoe_grouped_gemm_args base = {};
  base.rows = f.rows;
  base.n = n;
  base.k = k;
  base.num_experts = experts;
  base.a = a.data();
  base.a_scales = a_scales.data();
  base.a_scale_rows = f.scale_rows;
  base.b = {experts, n, k, MXMOE_WEIGHT_FORMAT_LINEAR, 0, b.data(), b_scales.data()};
  base.expert_offsets = f.expert_offsets.data();
  base.blockscale_offsets = f.blockscale_offsets.data();
  base.problem_sizes = problem_sizes.data();
  base.c = c.data();
  base.c_dtype = MXMOE_DTYPE_BF16;
  base.device = kCpu;
  auto call = [](const mxmoe_grouped_gemm_args* args) {
    return mxmoe_grouped_gemm(args, nullptr, 0, nullptr);
  };
  using A = mxmoe_grouped_gemm_args;
  const char* op = "mxmoe_grouped_gemm";
  EXPECT(mxmoe_grouped_gemm(nullptr, nullptr, 0, nullptr) == INVALID, "grouped_gemm(NULL)");
  ExpectBad(op, "a NULL", base, call, [](A& x) { x.a = nullptr; }, INVALID,
            {"a must not be NULL", "[6, 32]"}, outs);
  ExpectBad(op, "a_scales NULL", base, call, [](A& x) { x.a_scales = nullptr; }, INVALID,
            {"a_scales must not be NULL", "[257, 4]"}, outs);
  ExpectBad(op, "expert_offsets NULL", base, call, [](A& x) { x.expert_offsets = nullptr; },
            INVALID, {"expert_offsets must not be NULL"}, outs);
  ExpectBad(op, "blockscale_offsets NULL", base, call,
            [](A& x) { x.blockscale_offsets = nullptr; }, INVALID,
            {"blockscale_offsets must not be NULL"}, outs);
  ExpectBad(op, "c NULL", base, call, [](A& x) { x.c = nullptr; }, INVALID,
            {"c must not be NULL", "[6, 40]"}, outs);
  ExpectBad(op, "b.packed NULL", base, call, [](A& x) { x.b.packed = nullptr; }, INVALID,
            {"b.packed must not be NULL", "[3, 40, 32]"}, outs);
  ExpectBad(op, "b.scales NULL", base, call, [](A& x) { x.b.scales = nullptr; }, INVALID,
            {"b.scales must not be NULL", "[3, 40, 2]"}, outs);
  ExpectBad(op, "k 2881", base, call, [](A& x) { x.k = 2881; }, INVALID,
            {"k must be a multiple of 32, got 2881"}, outs);
  ExpectBad(op, "n -40", base, call, [](A& x) { x.n = -40; }, INVALID, {"n must be >= 0, got -40"},
            outs);
  ExpectBad(op, "a_scale_rows -1", base, call, [](A& x) { x.a_scale_rows = -1; }, INVALID,
            {"a_scale_rows must be >= 0, got -1"}, outs);
  ExpectBad(op, "c_dtype FP32", base, call, [](A& x) { x.c_dtype = MXMOE_DTYPE_FP32; }, INVALID,
            {"c_dtype", "got 2"}, outs);
  ExpectBad(op, "num_experts 0", base, call, [](A& x) { x.num_experts = 0; }, INVALID,
            {"num_experts must be in [1, 65536], got 0"}, outs);
  ExpectBad(op, "b.num_experts 2", base, call, [](A& x) { x.b.num_experts = 2; }, INVALID,
            {"b.num_experts must equal num_experts = 3, got 2"}, outs);
  ExpectBad(op, "b.n 41", base, call, [](A& x) { x.b.n = 41; }, INVALID,
            {"b.n must equal n = 40, got 41"}, outs);
  ExpectBad(op, "b.k 96", base, call, [](A& x) { x.b.k = 96; }, INVALID,
            {"b.k must equal k = 64, got 96"}, outs);
  ExpectBad(op, "b.format 5", base, call, [](A& x) { x.b.format = 5; }, INVALID,
            {"b.format must be", "got 5"}, outs);
  ExpectBad(op, "PREPARED by sm90", base, call,
            [](A& x) {
              x.b.format = MXMOE_WEIGHT_FORMAT_PREPARED;
              x.b.scales = nullptr;
              x.b.backend = MXMOE_BACKEND_SM90;
            },
            INVALID, {"b was prepared for backend 'sm90'", "'cpu'"}, outs);
  ExpectBad(op, "PREPARED with scales", base, call,
            [](A& x) {
              x.b.format = MXMOE_WEIGHT_FORMAT_PREPARED;
              x.b.backend = MXMOE_BACKEND_CPU;
            },
            INVALID, {"b.scales must be NULL for PREPARED"}, outs);
  ExpectBad(op, "problem_sizes wrong k", base, call,
            [&](A& x) {
              static std::vector<int32_t> wrong = {2, 40, 64, 0, 40, 64, 3, 40, 32};
              x.problem_sizes = wrong.data();
            },
            INVALID, {"problem_sizes[2] must be (m_2, n, k) = (3, 40, 64), got (3, 40, 32)"}, outs);
  ExpectBad(op, "problem_sizes wrong m", base, call,
            [&](A& x) {
              static std::vector<int32_t> wrong = {2, 40, 64, 1, 40, 64, 3, 40, 64};
              x.problem_sizes = wrong.data();
            },
            INVALID, {"problem_sizes[1]", "(0, 40, 64), got (1, 40, 64)"}, outs);
  ExpectBad(op, "a_scale_rows 255", base, call, [](A& x) { x.a_scale_rows = 255; }, INVALID,
            {"blockscale_offsets[3]=256 exceeds a_scale_rows=255"}, outs);
  ExpectBadOffsets(op, base, call, outs, "rows");
  ExpectBadDevices(op, base, call, outs);

  size_t bytes = 99;
  EXPECT(mxmoe_grouped_gemm_workspace_size(&base, &bytes) == OK && bytes == 0,
         "CPU grouped GEMM workspace %zu (%s)", bytes, mxmoe_last_error());
  EXPECT(mxmoe_grouped_gemm_workspace_size(&base, nullptr) == INVALID, "size query, bytes NULL");
  A shapes = base;
  shapes.a = nullptr;
  shapes.c = nullptr;
  EXPECT(mxmoe_grouped_gemm_workspace_size(&shapes, &bytes) == OK,
         "size query must accept NULL data pointers: %s", mxmoe_last_error());
  shapes.k = 2881;
  EXPECT(mxmoe_grouped_gemm_workspace_size(&shapes, &bytes) == INVALID &&
             strstr(mxmoe_last_error(), "got 2881"),
         "size query with k = 2881: %s", mxmoe_last_error());
  A no_sizes = base;
  no_sizes.problem_sizes = nullptr;  // optional
  ExpectValid(op, no_sizes, call);
  ExpectValid(op, base, call);
}

// ---- MoE forward ------------------------------------------------------------------------------

void TestMoeForward() {
  const int64_t tokens = 4, hidden = 64, inter = 32;
  const int32_t experts = 4, top_k = 2;
  std::vector<uint16_t> hidden_states = Bf16Ones(tokens * hidden);
  std::vector<float> logits(tokens * experts, 0.5f);
  std::vector<uint8_t> w13(experts * 2 * inter * hidden / 2, 0x11);
  std::vector<uint8_t> w13_scales(experts * 2 * inter * hidden / 32, 120);
  std::vector<uint8_t> w2(experts * hidden * inter / 2, 0x11);
  std::vector<uint8_t> w2_scales(experts * hidden * inter / 32, 120);
  std::vector<int32_t> topk_ids = {0, 1, 1, 2, 2, 3, 3, 0};
  std::vector<float> topk_weights(tokens * top_k, 0.5f);
  std::vector<int32_t> expert_map = {0, -1, 1, 2};
  std::vector<uint8_t> output = Poisoned(tokens * hidden * 2);
  const std::vector<Output> outs = {{"output", &output}};
  mxmoe_moe_forward_args base = {};
  base.num_tokens = tokens;
  base.hidden_size = hidden;
  base.intermediate_size = inter;
  base.num_global_experts = experts;
  base.num_local_experts = experts;
  base.top_k = top_k;
  base.renormalize = 1;
  base.hidden_states = hidden_states.data();
  base.activation_dtype = MXMOE_DTYPE_BF16;
  base.router_logits = logits.data();
  base.router_logits_dtype = MXMOE_DTYPE_FP32;
  base.w13 = {experts, 2 * inter, hidden, MXMOE_WEIGHT_FORMAT_LINEAR, 0, w13.data(),
              w13_scales.data()};
  base.w2 = {experts, hidden, inter, MXMOE_WEIGHT_FORMAT_LINEAR, 0, w2.data(), w2_scales.data()};
  base.output = output.data();
  base.device = kCpu;
  size_t needed = 0;
  EXPECT(mxmoe_moe_forward_workspace_size(&base, &needed) == OK && needed > 0,
         "moe workspace size: %s", mxmoe_last_error());
  std::vector<uint8_t> workspace(needed);
  auto call = [&](const mxmoe_moe_forward_args* a) {
    return mxmoe_moe_forward(a, workspace.data(), workspace.size(), nullptr);
  };
  // With precomputed routing.
  mxmoe_moe_forward_args given = base;
  given.router_logits = nullptr;
  given.topk_ids = topk_ids.data();
  given.topk_weights = topk_weights.data();
  using A = mxmoe_moe_forward_args;
  const char* op = "mxmoe_moe_forward";
  EXPECT(mxmoe_moe_forward(nullptr, workspace.data(), needed, nullptr) == INVALID, "moe(NULL)");
  ExpectBad(op, "hidden_states NULL", base, call, [](A& a) { a.hidden_states = nullptr; },
            INVALID, {"hidden_states must not be NULL", "[4, 64]"}, outs);
  ExpectBad(op, "output NULL", base, call, [](A& a) { a.output = nullptr; }, INVALID,
            {"output must not be NULL"}, outs);
  ExpectBad(op, "w13.packed NULL", base, call, [](A& a) { a.w13.packed = nullptr; }, INVALID,
            {"w13.packed must not be NULL", "[4, 64, 32]"}, outs);
  ExpectBad(op, "w2.scales NULL", base, call, [](A& a) { a.w2.scales = nullptr; }, INVALID,
            {"w2.scales must not be NULL", "[4, 64, 1]"}, outs);
  ExpectBad(op, "no routing", base, call, [](A& a) { a.router_logits = nullptr; }, INVALID,
            {"router_logits is NULL, so topk_ids and topk_weights"}, outs);
  ExpectBad(op, "both routings", base, call,
            [&](A& a) {
              a.topk_ids = topk_ids.data();
              a.topk_weights = topk_weights.data();
            },
            INVALID, {"either router_logits or topk_ids + topk_weights, not both"}, outs);
  ExpectBad(op, "topk_weights NULL", given, call, [](A& a) { a.topk_weights = nullptr; }, INVALID,
            {"topk_weights must not be NULL", "[4, 2]"}, outs);
  ExpectBad(op, "topk_ids NULL", given, call, [](A& a) { a.topk_ids = nullptr; }, INVALID,
            {"topk_ids must not be NULL"}, outs);
  ExpectBad(op, "hidden_size 48", base, call, [](A& a) { a.hidden_size = 48; }, INVALID,
            {"hidden_size must be a multiple of 32, got 48"}, outs);
  ExpectBad(op, "intermediate_size 2881", base, call, [](A& a) { a.intermediate_size = 2881; },
            INVALID, {"intermediate_size must be a multiple of 32, got 2881"}, outs);
  ExpectBad(op, "num_tokens -1", base, call, [](A& a) { a.num_tokens = -1; }, INVALID,
            {"num_tokens must be >= 0, got -1"}, outs);
  ExpectBad(op, "top_k 0", base, call, [](A& a) { a.top_k = 0; }, INVALID,
            {"top_k must be in [1, num_global_experts=4], got 0"}, outs);
  ExpectBad(op, "top_k 5", base, call, [](A& a) { a.top_k = 5; }, INVALID,
            {"top_k must be in [1, num_global_experts=4], got 5"}, outs);
  ExpectBad(op, "renormalize 2", base, call, [](A& a) { a.renormalize = 2; }, INVALID,
            {"renormalize must be 0 or 1, got 2"}, outs);
  ExpectBad(op, "activation_dtype FP32", base, call,
            [](A& a) { a.activation_dtype = MXMOE_DTYPE_FP32; }, INVALID,
            {"activation_dtype", "got 2"}, outs);
  ExpectBad(op, "router_logits_dtype 7", base, call, [](A& a) { a.router_logits_dtype = 7; },
            INVALID, {"router_logits_dtype", "got 7"}, outs);
  ExpectBad(op, "num_global_experts 0", base, call, [](A& a) { a.num_global_experts = 0; },
            INVALID, {"num_global_experts must be in [1, 65536], got 0"}, outs);
  ExpectBad(op, "num_local_experts 70000", base, call,
            [](A& a) { a.num_local_experts = 70000; }, INVALID,
            {"num_local_experts must be in [1, 65536], got 70000"}, outs);
  ExpectBad(op, "w13.num_experts 3", base, call, [](A& a) { a.w13.num_experts = 3; }, INVALID,
            {"w13.num_experts must equal num_local_experts = 4, got 3"}, outs);
  ExpectBad(op, "w13.n 32", base, call, [](A& a) { a.w13.n = 32; }, INVALID,
            {"w13.n must equal 2 * intermediate_size = 64, got 32"}, outs);
  ExpectBad(op, "w13.k 32", base, call, [](A& a) { a.w13.k = 32; }, INVALID,
            {"w13.k must equal hidden_size = 64, got 32"}, outs);
  ExpectBad(op, "w2.n 32", base, call, [](A& a) { a.w2.n = 32; }, INVALID,
            {"w2.n must equal hidden_size = 64, got 32"}, outs);
  ExpectBad(op, "w2.k 64", base, call, [](A& a) { a.w2.k = 64; }, INVALID,
            {"w2.k must equal intermediate_size = 32, got 64"}, outs);
  ExpectBad(op, "w2 PREPARED by sm100", base, call,
            [](A& a) {
              a.w2.format = MXMOE_WEIGHT_FORMAT_PREPARED;
              a.w2.scales = nullptr;
              a.w2.backend = MXMOE_BACKEND_SM100;
            },
            INVALID, {"w2 was prepared for backend 'sm100'"}, outs);
  ExpectBad(op, "local != global without a map", base, call,
            [](A& a) {
              a.num_local_experts = 2;
              a.w13.num_experts = 2;
              a.w2.num_experts = 2;
            },
            INVALID, {"expert_map is NULL, so num_global_experts (4) must equal "
                      "num_local_experts - num_shared_experts (2 - 0 = 2)"}, outs);
  ExpectBad(op, "num_tokens * top_k overflows int32", base, call,
            [](A& a) { a.num_tokens = int64_t{1} << 31; }, INVALID,
            {"num_tokens * (top_k + num_shared_experts) must fit int32"}, outs);
  ExpectBad(op, "topk id 4", given, call,
            [&](A& a) {
              static std::vector<int32_t> ids;
              ids = topk_ids;
              ids[5] = 4;
              a.topk_ids = ids.data();
            },
            INVALID, {"topk_ids[5] (token 2, slot 1) must be in [0, num_global_experts=4), got 4"},
            outs);
  ExpectBad(op, "topk id -1", given, call,
            [&](A& a) {
              static std::vector<int32_t> ids;
              ids = topk_ids;
              ids[0] = -1;
              a.topk_ids = ids.data();
            },
            INVALID, {"topk_ids[0] (token 0, slot 0)", "got -1"}, outs);
  // Non-finite topk_weights are accepted (mxmoe.h's routing policy): hostile_input_test checks
  // that they reach only their own token's output.
  auto mapped = [&](std::vector<int32_t> map) {
    return [map](A& a) {
      static std::vector<int32_t> m;
      m = map;
      a.expert_map = m.data();
      a.num_local_experts = 3;
      a.w13.num_experts = 3;
      a.w2.num_experts = 3;
    };
  };
  ExpectBad(op, "expert_map entry 3", base, call, mapped({0, -1, 3, 2}), INVALID,
            {"expert_map[2] must be in [-1, num_local_experts - num_shared_experts = 3), got 3"},
            outs);
  ExpectBad(op, "expert_map entry -2", base, call, mapped({0, -2, 1, 2}), INVALID,
            {"expert_map[1] must be in [-1, num_local_experts - num_shared_experts = 3), got -2"},
            outs);
  ExpectBad(op, "workspace too small", base,
            [&](const A* a) {
              return mxmoe_moe_forward(a, workspace.data(), needed - 1, nullptr);
            },
            [](A&) {}, TOO_SMALL,
            {"workspace_bytes must be at least " + std::to_string(needed),
             "got " + std::to_string(needed - 1)},
            outs);
  ExpectBad(op, "workspace 0 bytes", base,
            [&](const A* a) { return mxmoe_moe_forward(a, nullptr, 0, nullptr); }, [](A&) {},
            TOO_SMALL, {"at least " + std::to_string(needed), "got 0"}, outs);
  ExpectBad(op, "workspace NULL", base,
            [&](const A* a) { return mxmoe_moe_forward(a, nullptr, needed, nullptr); }, [](A&) {},
            INVALID, {"workspace must not be NULL"}, outs);
  ExpectBadDevices(op, base, call, outs);

  // Size query: shapes only, bytes required, no write on failure.
  A shapes = base;
  shapes.hidden_states = nullptr;
  shapes.output = nullptr;
  shapes.router_logits = nullptr;
  size_t bytes = 0;
  EXPECT(mxmoe_moe_forward_workspace_size(&shapes, &bytes) == OK && bytes == needed,
         "size query without pointers: %zu vs %zu (%s)", bytes, needed, mxmoe_last_error());
  EXPECT(mxmoe_moe_forward_workspace_size(&base, nullptr) == INVALID, "size query, bytes NULL");
  EXPECT(mxmoe_moe_forward_workspace_size(nullptr, &bytes) == INVALID, "size query, args NULL");
  shapes.top_k = 9;
  bytes = 5;
  EXPECT(mxmoe_moe_forward_workspace_size(&shapes, &bytes) == INVALID && bytes == 5,
         "size query with top_k = 9 must fail, leave bytes alone (%zu)", bytes);

  A with_map = base;
  mapped({0, -1, 1, 2})(with_map);
  ExpectValid(op, with_map, call);
  ExpectValid(op, given, call);
  ExpectValid(op, base, call);
}

// ---- status, version, backends, last error ----------------------------------------------------

void TestStatusAndBackends() {
  EXPECT(strcmp(mxmoe_status_string(MXMOE_STATUS_OK), "OK") == 0, "OK string");
  EXPECT(strcmp(mxmoe_status_string(MXMOE_STATUS_INVALID_ARGUMENT), "INVALID_ARGUMENT") == 0,
         "INVALID_ARGUMENT string");
  EXPECT(strcmp(mxmoe_status_string(MXMOE_STATUS_WORKSPACE_TOO_SMALL), "WORKSPACE_TOO_SMALL") ==
             0,
         "WORKSPACE_TOO_SMALL string");
  EXPECT(strcmp(mxmoe_status_string(static_cast<mxmoe_status>(42)), "UNKNOWN_STATUS") == 0,
         "unknown status string");
  EXPECT(strcmp(mxmoe_version(), "0.1.0") == 0, "version %s", mxmoe_version());
  EXPECT(strcmp(mxmoe_backend_name(MXMOE_BACKEND_SM90), "sm90") == 0, "sm90 name");
  EXPECT(strcmp(mxmoe_backend_name(static_cast<mxmoe_backend>(9)), "unknown") == 0,
         "unknown backend name");

  mxmoe_backend backend = MXMOE_BACKEND_AUTO;
  EXPECT(mxmoe_backend_for_device(kCpu, &backend) == OK && backend == MXMOE_BACKEND_CPU,
         "cpu backend: %s", mxmoe_last_error());
  EXPECT(mxmoe_backend_for_device(kCpu, nullptr) == INVALID, "backend NULL");
  EXPECT(mxmoe_backend_for_device({3, 0}, &backend) == INVALID &&
             strstr(mxmoe_last_error(), "got 3"),
         "device type 3: %s", mxmoe_last_error());
  SetBackendEnv("cpu");
  EXPECT(mxmoe_backend_for_device(kCpu, &backend) == OK && backend == MXMOE_BACKEND_CPU,
         "MXMOE_BACKEND=cpu for CPU: %s", mxmoe_last_error());
  const mxmoe_status cuda_cpu = mxmoe_backend_for_device(kCuda0, &backend);
  EXPECT(cuda_cpu == UNSUPPORTED &&
             strstr(mxmoe_last_error(), "MXMOE_BACKEND=cpu cannot serve CUDA"),
         "MXMOE_BACKEND=cpu for CUDA: %s", mxmoe_last_error());
  SetBackendEnv("sm100");
  EXPECT(mxmoe_backend_for_device(kCpu, &backend) == UNSUPPORTED &&
             strstr(mxmoe_last_error(), "MXMOE_BACKEND=sm100"),
         "MXMOE_BACKEND=sm100 for CPU: %s", mxmoe_last_error());
  SetBackendEnv("Sm90");
  EXPECT(mxmoe_backend_for_device(kCpu, &backend) == INVALID &&
             strstr(mxmoe_last_error(), "'Sm90'"),
         "MXMOE_BACKEND=Sm90: %s", mxmoe_last_error());
  SetBackendEnv("auto");
  EXPECT(mxmoe_backend_for_device(kCpu, &backend) == OK, "MXMOE_BACKEND=auto");
  SetBackendEnv(nullptr);
  if (!HasGpu()) {
    EXPECT(mxmoe_backend_for_device(kCuda0, &backend) == UNSUPPORTED &&
               strstr(mxmoe_last_error(), "no CUDA device is visible"),
           "CUDA without a GPU: %s", mxmoe_last_error());
    EXPECT(mxmoe_cuda_device_count() == 0, "device count");
  } else {
    const mxmoe_status s = mxmoe_backend_for_device(kCuda0, &backend);
    printf("cuda:0 -> %s (%s)\n", s == OK ? mxmoe_backend_name(backend) : "none",
           mxmoe_last_error());
    EXPECT(mxmoe_backend_for_device({MXMOE_DEVICE_CUDA, 1000}, &backend) == INVALID &&
               strstr(mxmoe_last_error(), "got 1000"),
           "cuda:1000: %s", mxmoe_last_error());
  }
}

// An exception below the C API (here std::bad_alloc: the CPU GEMM's tile buffers for a
// K of 2^50, which no machine can allocate; the buffers passed are never read because the
// allocation comes first) becomes INTERNAL with a message, not a crash.
void TestExceptionBecomesInternal() {
#if defined(__SANITIZE_ADDRESS__)
  return;  // AddressSanitizer aborts on impossible allocations instead of throwing
#endif
  const int64_t k = int64_t{1} << 50;
  std::vector<int32_t> offsets = {0, 1}, scale_offsets = {0, 128};
  std::vector<uint8_t> dummy(64, 0);
  std::vector<uint8_t> c = Poisoned(2);
  mxmoe_grouped_gemm_args args = {};
  args.rows = 1;
  args.n = 1;
  args.k = k;
  args.num_experts = 1;
  args.a = dummy.data();
  args.a_scales = dummy.data();
  args.a_scale_rows = 128;
  args.b = {1, 1, k, MXMOE_WEIGHT_FORMAT_LINEAR, 0, dummy.data(), dummy.data()};
  args.expert_offsets = offsets.data();
  args.blockscale_offsets = scale_offsets.data();
  args.c = c.data();
  args.c_dtype = MXMOE_DTYPE_BF16;
  args.device = kCpu;
  const mxmoe_status status = mxmoe_grouped_gemm(&args, nullptr, 0, nullptr);
  EXPECT(status == MXMOE_STATUS_INTERNAL && strstr(mxmoe_last_error(), "out of host memory"),
         "k = 2^50: %s (%s)", mxmoe_status_string(status), mxmoe_last_error());
  EXPECT(c[0] == kPoison && c[1] == kPoison, "c written although the GEMM failed");
}

void TestLastErrorIsThreadLocalAndCleared() {
  EXPECT(mxmoe_quantize(nullptr, nullptr) == INVALID, "quantize(NULL)");
  std::string other_thread_message = "unset";
  std::thread t([&] { other_thread_message = mxmoe_last_error(); });
  t.join();
  EXPECT(other_thread_message.empty(), "another thread sees \"%s\"", other_thread_message.c_str());
  EXPECT(mxmoe_last_error()[0] != '\0', "this thread lost its message");
  mxmoe_backend backend;
  EXPECT(mxmoe_backend_for_device(kCpu, &backend) == OK, "backend_for_device");
  EXPECT(mxmoe_last_error()[0] == '\0', "success must clear the last error, got \"%s\"",
         mxmoe_last_error());
}

}  // namespace

int main() {
  SetBackendEnv(nullptr);
  TestQuantize();
  TestDequantize();
  TestExpertsQuantize();
  TestSiluMulExpertsQuantize();
  TestSwizzle();
  TestQuantizeWeights();
  TestPrepareWeights();
  TestGroupedGemm();
  TestMoeForward();
  TestStatusAndBackends();
  TestExceptionBecomesInternal();
  TestLastErrorIsThreadLocalAndCleared();
  if (failures != 0) {
    fprintf(stderr, "bad_input_test: %d failure(s) in %d cases\n", failures, cases);
    return 1;
  }
  printf("bad_input_test: all %d bad-input cases passed\n", cases);
  return 0;
}
