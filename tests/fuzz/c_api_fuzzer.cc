// A structured fuzzer of every mxmoe C API entry point (libFuzzer interface).
//
// The first input byte picks the entry point (or MXMOE_FUZZ_TARGET=<name> fixes it); the rest
// decodes into that entry point's args struct: dimensions and enums biased towards edge values,
// metadata (expert_offsets, blockscale_offsets, problem_sizes, topk ids, expert_map) valid most
// of the time and then corrupted in one entry, and host buffers of exactly the documented sizes
// (fuzz_support.h). Each call is checked for the C API's promises:
//   - the status is a documented one (INTERNAL, CUDA_ERROR or an unknown value is a finding);
//   - a failure has a message, and left every output byte as it was (poisoned buffers);
//   - inputs are never written; a success leaves no message;
//   - a call given NULL for a buffer of more than 0 bytes (or a workspace / prepared buffer
//     smaller than its size query) fails; a size query that fails implies the operation fails;
//   - documented untouched regions stay untouched on success (rows past expert_offsets[E],
//     scale rows past blockscale_offsets[E]), and swizzle -> unswizzle is the identity;
//   - no sanitizer report (built with ASan + UBSan in CI), and every call returns within
//     MXMOE_FUZZ_CALL_SECONDS (default 10; SIGALRM aborts).
// Built with clang -fsanitize=fuzzer this is a libFuzzer target (tools/fuzz.sh); built with the
// project's gcc, standalone_main.cc drives it (corpus replay + mutation for a time budget).
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "mxmoe/mxmoe.h"
#include "tests/fuzz/fuzz_support.h"

namespace mxmoe_fuzz {
namespace {

// ---- checks shared by every target --------------------------------------------------------------

bool Documented(mxmoe_status s) {
  return s == MXMOE_STATUS_OK || s == MXMOE_STATUS_INVALID_ARGUMENT ||
         s == MXMOE_STATUS_UNSUPPORTED || s == MXMOE_STATUS_MISALIGNED ||
         s == MXMOE_STATUS_WORKSPACE_TOO_SMALL;
}

// `must_fail`: the call had NULL for a non-empty buffer or a too-small buffer, so OK is a bug.
void CheckCall(const char* target, const char* call, mxmoe_status s, bool must_fail,
               const std::vector<const Buffer*>& inputs,
               const std::vector<const Buffer*>& outputs) {
  const std::string where = std::string(call) + " -> " + mxmoe_status_string(s);
  if (!Documented(s)) Finding(target, where + ": not a documented status for host memory");
  for (const Buffer* b : inputs) {
    if (!b->Unchanged()) Finding(target, where + ": an input buffer was written");
  }
  if (s == MXMOE_STATUS_OK) {
    if (mxmoe_last_error()[0] != '\0') Finding(target, where + ": success left a last error");
    if (must_fail) Finding(target, where + ": accepted NULL or a too-small buffer");
    return;
  }
  if (mxmoe_last_error()[0] == '\0') Finding(target, where + ": failure without a message");
  for (const Buffer* b : outputs) {
    if (!b->Unchanged()) Finding(target, where + ": a failed call wrote an output (partial write)");
  }
}

bool AnyUnusable(std::initializer_list<const Buffer*> buffers) {
  for (const Buffer* b : buffers) {
    if (!b->usable()) return true;
  }
  return false;
}

int64_t ScaleBytes(int64_t batch, int64_t rows, int64_t k, int32_t layout) {
  if (k < 0) return -1;
  if (layout == MXMOE_SCALE_LAYOUT_SWIZZLED_128X4) {
    return CheckedBytes({batch, RoundUpOr(rows, 128), RoundUpOr(k / 32, 4)}, 1);
  }
  return CheckedBytes({batch, rows, k / 32}, 1);
}

int64_t ElementBytes(int32_t dtype) { return dtype == MXMOE_DTYPE_FP32 ? 4 : 2; }

// Two's-complement wrap to int32 (the fuzzer's own arithmetic must not overflow).
int32_t Wrap32(int64_t v) { return static_cast<int32_t>(static_cast<uint32_t>(v)); }

// expert_offsets / blockscale_offsets [E+1]: raw bytes, or valid for random counts that sum to
// at most `rows`, then perhaps one entry corrupted. Returns the padded scale rows of the valid
// layout (what scale_rows should be), or 0.
int64_t WriteOffsets(Decoder* in, int32_t experts, int64_t rows, Buffer* eo, Buffer* bo) {
  if (experts < 1 || !eo->usable() || !bo->usable() || eo->data() == nullptr ||
      bo->data() == nullptr || eo->size() < (size_t{1} + experts) * 4 ||
      bo->size() < (size_t{1} + experts) * 4) {
    return 0;
  }
  const uint8_t mode = in->Byte() % 8;
  if (mode == 0) return 0;  // the raw bytes FillFrom put there
  const int64_t budget = std::min<int64_t>(std::max<int64_t>(rows, 0), int64_t{1} << 30);
  int64_t total = 0;
  int64_t padded = 0;
  PutI32(eo, 0, 0);
  PutI32(bo, 0, 0);
  for (int32_t e = 0; e < experts; ++e) {
    int64_t m = 0;
    if (!in->Chance(25) && budget > total) {
      m = std::min<int64_t>(budget - total, in->Chance(10) ? 1 : in->Byte() % 160);
    }
    total += m;
    padded += (m + 127) / 128 * 128;
    PutI32(eo, e + 1, static_cast<int32_t>(total));
    PutI32(bo, e + 1, static_cast<int32_t>(std::min<int64_t>(padded, INT32_MAX)));
  }
  if (mode == 1) {  // one corrupted entry
    Buffer* target = in->Chance(50) ? eo : bo;
    const int64_t index = in->Byte() % (experts + 1);
    const int64_t old = GetI32(*target, index);
    const int32_t values[] = {Wrap32(old + 1), Wrap32(old - 1), -1, INT32_MAX, INT32_MIN,
                              Wrap32(old + 128), static_cast<int32_t>(in->U32())};
    PutI32(target, index, values[in->Byte() % 7]);
  }
  eo->Resnapshot();
  bo->Resnapshot();
  return padded;
}

// ---- quantize / dequantize ------------------------------------------------------------------------

void FuzzQuantize(Decoder* in) {
  const char* t = "quantize";
  mxmoe_quantize_args a{};
  a.rows = in->Dim(300);
  a.k = in->BlockDim(8);
  a.input_dtype = in->Enum(3);
  a.scale_layout = in->Enum(2);
  a.device = in->Device();
  Buffer input, packed, scales;
  input.Allocate(CheckedBytes({a.rows, a.k}, 2), in, false);
  packed.Allocate(a.k < 0 ? -1 : CheckedBytes({a.rows, a.k / 2}, 1), in, true);
  scales.Allocate(ScaleBytes(1, a.rows, a.k, a.scale_layout), in, true);
  a.input = input.data();
  a.packed = packed.data();
  a.scales = scales.data();
  const mxmoe_status s = mxmoe_quantize(in->Chance(2) ? nullptr : &a, nullptr);
  CheckCall(t, "mxmoe_quantize", s, AnyUnusable({&input, &packed, &scales}), {&input},
            {&packed, &scales});
}

void FuzzDequantize(Decoder* in) {
  const char* t = "dequantize";
  mxmoe_dequantize_args a{};
  a.rows = in->Dim(300);
  a.k = in->BlockDim(8);
  a.scale_layout = in->Enum(2);
  a.output_dtype = in->Enum(4);
  a.device = in->Device();
  Buffer packed, scales, output;
  packed.Allocate(a.k < 0 ? -1 : CheckedBytes({a.rows, a.k / 2}, 1), in, false);
  scales.Allocate(ScaleBytes(1, a.rows, a.k, a.scale_layout), in, false);
  output.Allocate(CheckedBytes({a.rows, a.k}, ElementBytes(a.output_dtype)), in, true);
  a.packed = packed.data();
  a.scales = scales.data();
  a.output = output.data();
  const mxmoe_status s = mxmoe_dequantize(&a, nullptr);
  CheckCall(t, "mxmoe_dequantize", s, AnyUnusable({&packed, &scales, &output}),
            {&packed, &scales}, {&output});
}

// ---- per-expert activation quantization ---------------------------------------------------------

void FuzzExpertsQuantize(Decoder* in, bool silu_mul) {
  const char* t = silu_mul ? "silu_mul_experts_quantize" : "experts_quantize";
  const int64_t rows = in->Dim(300);
  const int64_t k = in->BlockDim(8);
  const int32_t experts = in->Experts(8);
  const int32_t dtype = in->Enum(3);
  const mxmoe_device device = in->Device();
  const int64_t input_cols = silu_mul ? (k > kInt64Max / 2 || k < 0 ? -1 : 2 * k) : k;
  Buffer input, eo, bo, packed, scales;
  input.Allocate(input_cols < 0 ? -1 : CheckedBytes({rows, input_cols}, 2), in, false);
  const int64_t meta = experts < 0 ? -1 : CheckedBytes({int64_t{experts} + 1}, 4);
  eo.Allocate(meta, in, false);
  bo.Allocate(meta, in, false);
  const int64_t padded = WriteOffsets(in, experts, rows, &eo, &bo);
  int64_t scale_rows = padded;
  if (in->Chance(25)) scale_rows = in->Chance(50) ? padded + in->Byte() % 256 - 128 : in->Edge();
  packed.Allocate(k < 0 ? -1 : CheckedBytes({rows, k / 2}, 1), in, true);
  scales.Allocate(k < 0 ? -1 : CheckedBytes({scale_rows, RoundUpOr(k / 32, 4)}, 1), in, true);
  mxmoe_status s;
  if (silu_mul) {
    mxmoe_silu_mul_experts_quantize_args a{rows, k, experts, input.data(), dtype,
                                           reinterpret_cast<const int32_t*>(eo.data()),
                                           reinterpret_cast<const int32_t*>(bo.data()),
                                           packed.data(), scales.data(), scale_rows, device};
    s = mxmoe_silu_mul_experts_quantize(&a, nullptr);
  } else {
    mxmoe_experts_quantize_args a{rows, k, experts, input.data(), dtype,
                                  reinterpret_cast<const int32_t*>(eo.data()),
                                  reinterpret_cast<const int32_t*>(bo.data()),
                                  packed.data(), scales.data(), scale_rows, device};
    s = mxmoe_experts_quantize(&a, nullptr);
  }
  CheckCall(t, t, s, AnyUnusable({&input, &eo, &bo, &packed, &scales}), {&input, &eo, &bo},
            {&packed, &scales});
  if (s != MXMOE_STATUS_OK) return;
  // Documented: rows past expert_offsets[E] and scale rows past blockscale_offsets[E] untouched.
  const int64_t used_rows = GetI32(eo, experts);
  const int64_t used_scale_rows = GetI32(bo, experts);
  if (!packed.PoisonedRange(static_cast<size_t>(used_rows * (k / 2)), packed.size())) {
    Finding(t, "wrote packed rows past expert_offsets[E]");
  }
  if (!scales.PoisonedRange(static_cast<size_t>(used_scale_rows * RoundUpOr(k / 32, 4)),
                            scales.size())) {
    Finding(t, "wrote scale rows past blockscale_offsets[E]");
  }
}

// ---- scale layouts --------------------------------------------------------------------------------

void FuzzSwizzle(Decoder* in, bool unswizzle) {
  const char* t = unswizzle ? "unswizzle_scales" : "swizzle_scales";
  mxmoe_swizzle_scales_args a{};
  a.batch = in->Dim(3);
  a.rows = in->Dim(300, 12);
  a.cols = in->Dim(10, 12);
  a.device = in->Device();
  const int64_t linear = CheckedBytes({a.batch, a.rows, a.cols}, 1);
  const int64_t swizzled = CheckedBytes({a.batch, RoundUpOr(a.rows, 128), RoundUpOr(a.cols, 4)}, 1);
  Buffer input, output;
  input.Allocate(unswizzle ? swizzled : linear, in, false);
  output.Allocate(unswizzle ? linear : swizzled, in, true);
  a.input = input.data();
  a.output = output.data();
  const mxmoe_status s =
      unswizzle ? mxmoe_unswizzle_scales(&a, nullptr) : mxmoe_swizzle_scales(&a, nullptr);
  CheckCall(t, t, s, AnyUnusable({&input, &output}), {&input}, {&output});
  if (s != MXMOE_STATUS_OK || unswizzle || output.size() == 0) return;
  // swizzle then unswizzle is the identity on the linear matrix.
  Buffer back;
  back.Allocate(linear, in, true);
  mxmoe_swizzle_scales_args b = a;
  b.input = output.data();
  b.output = back.data();
  if (mxmoe_unswizzle_scales(&b, nullptr) != MXMOE_STATUS_OK) {
    Finding(t, "unswizzle of a swizzle output failed");
  }
  if (linear > 0 && memcmp(back.data(), input.data(), static_cast<size_t>(linear)) != 0) {
    Finding(t, "unswizzle(swizzle(x)) != x");
  }
}

// ---- expert weights -------------------------------------------------------------------------------

void FuzzQuantizeWeights(Decoder* in) {
  const char* t = "quantize_weights";
  mxmoe_quantize_weights_args a{};
  a.num_experts = in->Experts(4);
  a.n = in->Dim(200);
  a.k = in->BlockDim(6);
  a.weights_dtype = in->Enum(3);
  a.scale_layout = in->Enum(2);
  a.device = in->Device();
  Buffer weights, packed, scales;
  weights.Allocate(CheckedBytes({a.num_experts, a.n, a.k}, 2), in, false);
  packed.Allocate(a.k < 0 ? -1 : CheckedBytes({a.num_experts, a.n, a.k / 2}, 1), in, true);
  scales.Allocate(ScaleBytes(a.num_experts, a.n, a.k, a.scale_layout), in, true);
  a.weights = weights.data();
  a.packed = packed.data();
  a.scales = scales.data();
  const mxmoe_status s = mxmoe_quantize_weights(&a, nullptr);
  CheckCall(t, t, s, AnyUnusable({&weights, &packed, &scales}), {&weights}, {&packed, &scales});
}

// Expert weights of `format` with dims (e, n, k) (the struct's own dims sometimes differ, to
// test consistency checks). PREPARED buffers are prepared by the library from LINEAR bytes, then
// perhaps shortened; their prepared_bytes is always the true buffer length.
struct Weights {
  mxmoe_expert_weights w{};
  Buffer packed, scales;
  bool short_prepared = false;  // a PREPARED buffer shorter than its size query
};

void MakeWeights(Decoder* in, int32_t e, int64_t n, int64_t k, Weights* out) {
  mxmoe_expert_weights& w = out->w;
  w.num_experts = in->Chance(5) ? in->Experts(8) : e;
  w.n = in->Chance(5) ? in->Dim(200) : n;
  w.k = in->Chance(5) ? in->BlockDim(6) : k;
  w.format = in->Enum(3);
  w.backend = in->Chance(90) ? MXMOE_BACKEND_CPU : in->Enum(4);
  if (w.format == MXMOE_WEIGHT_FORMAT_PREPARED) {
    mxmoe_prepare_weights_args p{};
    p.weights = w;
    p.weights.format = MXMOE_WEIGHT_FORMAT_LINEAR;
    p.backend = MXMOE_BACKEND_CPU;
    p.device = {MXMOE_DEVICE_CPU, 0};
    size_t bytes = 0;
    if (mxmoe_prepare_weights_size(&p, &bytes) != MXMOE_STATUS_OK ||
        bytes > kMaxBufferBytes) {
      out->packed.Allocate(in->Dim(64), in, false);  // garbage of some length
    } else {
      Buffer linear_packed, linear_scales, full;
      linear_packed.Allocate(CheckedBytes({w.num_experts, w.n, w.k / 2}, 1), in, false);
      linear_scales.Allocate(CheckedBytes({w.num_experts, w.n, w.k / 32}, 1), in, false);
      full.Allocate(static_cast<int64_t>(bytes), in, true);
      p.weights.packed = linear_packed.data();
      p.weights.scales = linear_scales.data();
      p.prepared = full.data();
      p.prepared_bytes = full.size();
      if (mxmoe_prepare_weights(&p, nullptr) != MXMOE_STATUS_OK) {
        Finding("prepare_weights", "failed for arguments its size query accepted");
      }
      // The buffer handed on is exactly `length` bytes, so ASan sees any read past it.
      int64_t length = static_cast<int64_t>(bytes);
      if (in->Chance(20) && length > 0) {
        length -= 1 + in->Byte() % length;
        out->short_prepared = true;
      }
      out->packed.Allocate(length, in, true);
      if (length > 0) memcpy(out->packed.data(), full.data(), static_cast<size_t>(length));
      out->packed.Resnapshot();
    }
    w.packed = out->packed.data();
    w.prepared_bytes = out->packed.size();  // always the truth: the library compares it
    w.scales = nullptr;
    return;
  }
  out->packed.Allocate(w.k < 0 ? -1 : CheckedBytes({w.num_experts, w.n, w.k / 2}, 1), in, false);
  out->scales.Allocate(ScaleBytes(w.num_experts, w.n, w.k,
                                  w.format == MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4
                                      ? MXMOE_SCALE_LAYOUT_SWIZZLED_128X4
                                      : MXMOE_SCALE_LAYOUT_LINEAR),
                       in, false);
  w.packed = out->packed.data();
  w.scales = out->scales.data();
}

bool WeightsMustFail(const Weights& w, int32_t e, int64_t n, int64_t k) {
  if (w.w.num_experts != e || w.w.n != n || w.w.k != k) return false;  // dims: anything goes
  if (w.w.format == MXMOE_WEIGHT_FORMAT_PREPARED) return w.short_prepared;
  if (w.w.format != MXMOE_WEIGHT_FORMAT_LINEAR && w.w.format != MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4) {
    return false;
  }
  return AnyUnusable({&w.packed, &w.scales});
}

void FuzzPrepareWeights(Decoder* in) {
  const char* t = "prepare_weights";
  mxmoe_prepare_weights_args a{};
  a.weights.num_experts = in->Experts(4);
  a.weights.n = in->Dim(200);
  a.weights.k = in->BlockDim(6);
  a.weights.format = in->Chance(90) ? MXMOE_WEIGHT_FORMAT_LINEAR : in->Enum(3);
  a.backend = in->Enum(4);
  a.device = in->Device();
  Buffer packed, scales, prepared;
  packed.Allocate(a.weights.k < 0 ? -1 : CheckedBytes({a.weights.num_experts, a.weights.n,
                                                        a.weights.k / 2}, 1), in, false);
  scales.Allocate(ScaleBytes(a.weights.num_experts, a.weights.n, a.weights.k,
                             MXMOE_SCALE_LAYOUT_LINEAR), in, false);
  a.weights.packed = packed.data();
  a.weights.scales = scales.data();
  size_t bytes = 0xA5A5A5A5u;
  const mxmoe_status size_status = mxmoe_prepare_weights_size(&a, &bytes);
  CheckCall(t, "mxmoe_prepare_weights_size", size_status, false, {&packed, &scales}, {});
  if (size_status != MXMOE_STATUS_OK && bytes != 0xA5A5A5A5u) {
    Finding(t, "a failed size query wrote *bytes");
  }
  int64_t length = size_status == MXMOE_STATUS_OK ? static_cast<int64_t>(bytes) : in->Dim(256);
  bool too_small = false;
  if (size_status == MXMOE_STATUS_OK && length > 0 && in->Chance(20)) {
    length -= 1 + in->Byte() % length;
    too_small = true;
  }
  prepared.Allocate(length, in, true);
  a.prepared = prepared.data();
  a.prepared_bytes = prepared.size();
  const mxmoe_status s = mxmoe_prepare_weights(&a, nullptr);
  const bool must_fail = too_small || (size_status == MXMOE_STATUS_OK &&
                                       (AnyUnusable({&packed, &scales, &prepared})));
  CheckCall(t, "mxmoe_prepare_weights", s, must_fail, {&packed, &scales}, {&prepared});
  if (size_status != MXMOE_STATUS_OK && s == MXMOE_STATUS_OK) {
    Finding(t, "the operation succeeded where its size query failed");
  }
}

// ---- workspaces -------------------------------------------------------------------------------------

// A workspace for a size query's answer: exact, NULL, one byte short, larger, or aliasing an
// input (which the library must reject). Returns whether the call must fail because of it.
bool MakeWorkspace(Decoder* in, mxmoe_status size_status, size_t needed, Buffer* storage,
                   const Buffer& alias, void** workspace, size_t* bytes) {
  const uint8_t mode = in->Byte() % 10;
  const bool known = size_status == MXMOE_STATUS_OK && needed <= kMaxBufferBytes;
  size_t length = known ? needed : static_cast<size_t>(in->Dim(4096));
  if (known && mode == 1 && needed > 0) {  // NULL for a needed workspace
    *workspace = nullptr;
    *bytes = needed;
    return true;
  }
  if (known && mode == 2 && needed > 0) {  // one byte short
    length = needed - 1;
    storage->Allocate(static_cast<int64_t>(length), in, true);
    *workspace = storage->data();
    *bytes = storage->size();
    return true;
  }
  if (known && mode == 3 && needed > 0 && alias.data() != nullptr && alias.size() >= needed) {
    *workspace = alias.data();  // overlaps an input: documented as rejected
    *bytes = needed;
    return true;
  }
  if (mode == 4) length += 64;
  storage->Allocate(static_cast<int64_t>(length), in, true);
  *workspace = storage->data();
  *bytes = storage->size();
  return false;
}

// ---- grouped GEMM -------------------------------------------------------------------------------------

void FuzzGroupedGemm(Decoder* in) {
  const char* t = "grouped_gemm";
  mxmoe_grouped_gemm_args a{};
  a.rows = in->Dim(200);
  a.n = in->Dim(160);
  a.k = in->BlockDim(6);
  a.num_experts = in->Experts(6);
  a.c_dtype = in->Enum(3);
  a.device = in->Device();
  Buffer aa, a_scales, eo, bo, problem_sizes, c;
  aa.Allocate(a.k < 0 ? -1 : CheckedBytes({a.rows, a.k / 2}, 1), in, false);
  const int64_t meta = CheckedBytes({int64_t{a.num_experts} + 1}, 4);
  eo.Allocate(meta, in, false);
  bo.Allocate(meta, in, false);
  const int64_t padded = WriteOffsets(in, a.num_experts, a.rows, &eo, &bo);
  a.a_scale_rows = in->Chance(20) ? in->Dim(600) : padded;
  a_scales.Allocate(a.k < 0 ? -1 : CheckedBytes({a.a_scale_rows, RoundUpOr(a.k / 32, 4)}, 1), in,
                    false);
  const bool with_problem_sizes = in->Chance(30);
  if (with_problem_sizes) {
    problem_sizes.Allocate(CheckedBytes({a.num_experts, 3}, 4), in, false);
    if (problem_sizes.data() != nullptr && a.num_experts > 0 && in->Chance(80)) {
      for (int32_t e = 0; e < a.num_experts && (e + 1) * 12 <= int64_t(problem_sizes.size());
           ++e) {
        PutI32(&problem_sizes, 3 * e,
               Wrap32(int64_t{GetI32(eo, e + 1)} - int64_t{GetI32(eo, e)}));
        PutI32(&problem_sizes, 3 * e + 1, static_cast<int32_t>(a.n));
        PutI32(&problem_sizes, 3 * e + 2, static_cast<int32_t>(a.k));
      }
      if (in->Chance(30)) PutI32(&problem_sizes, in->Byte() % (3 * a.num_experts), -1);
      problem_sizes.Resnapshot();
    }
  }
  Weights b;
  MakeWeights(in, a.num_experts, a.n, a.k, &b);
  c.Allocate(CheckedBytes({a.rows, a.n}, 2), in, true);
  a.a = aa.data();
  a.a_scales = a_scales.data();
  a.b = b.w;
  a.expert_offsets = reinterpret_cast<const int32_t*>(eo.data());
  a.blockscale_offsets = reinterpret_cast<const int32_t*>(bo.data());
  a.problem_sizes = with_problem_sizes ? reinterpret_cast<const int32_t*>(problem_sizes.data())
                                       : nullptr;
  a.c = c.data();
  const std::vector<const Buffer*> inputs = {&aa, &a_scales, &eo, &bo, &problem_sizes,
                                             &b.packed, &b.scales};
  size_t needed = 0xA5A5A5A5u;
  const mxmoe_status size_status = mxmoe_grouped_gemm_workspace_size(&a, &needed);
  CheckCall(t, "mxmoe_grouped_gemm_workspace_size", size_status, false, inputs, {});
  Buffer workspace;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  const bool bad_workspace = MakeWorkspace(in, size_status, needed, &workspace, aa, &ws, &ws_bytes);
  const mxmoe_status s = mxmoe_grouped_gemm(&a, ws, ws_bytes, nullptr);
  bool must_fail = bad_workspace || WeightsMustFail(b, a.num_experts, a.n, a.k);
  if (size_status == MXMOE_STATUS_OK) {
    must_fail = must_fail || AnyUnusable({&aa, &a_scales, &eo, &bo, &c});
  }
  CheckCall(t, "mxmoe_grouped_gemm", s, must_fail, inputs, {&c});
  if (size_status != MXMOE_STATUS_OK && s == MXMOE_STATUS_OK) {
    Finding(t, "the operation succeeded where its workspace size query failed");
  }
  if (s == MXMOE_STATUS_OK) {
    const int64_t used = GetI32(eo, a.num_experts);
    if (!c.PoisonedRange(static_cast<size_t>(used * a.n * 2), c.size())) {
      Finding(t, "wrote c rows past expert_offsets[E]");
    }
  }
}

// ---- MoE forward ---------------------------------------------------------------------------------------

void FuzzMoeForward(Decoder* in) {
  const char* t = "moe_forward";
  mxmoe_moe_forward_args a{};
  a.num_tokens = in->Dim(12);
  a.hidden_size = in->BlockDim(3);
  a.intermediate_size = in->BlockDim(3);
  a.num_global_experts = in->Experts(6);
  a.num_local_experts = in->Chance(75) ? a.num_global_experts : in->Experts(6);
  a.top_k = in->Chance(90) && a.num_global_experts > 0 ? 1 + in->Byte() % a.num_global_experts
                                                       : static_cast<int32_t>(in->Edge());
  a.renormalize = in->Chance(95) ? in->Byte() % 2 : 2;
  a.activation_dtype = in->Enum(3);
  a.device = in->Device();
  const int64_t t_rows = a.num_tokens;
  const int64_t h = a.hidden_size;
  const int64_t i = a.intermediate_size;
  Buffer hidden, logits, topk_ids, topk_weights, expert_map, output;
  hidden.Allocate(CheckedBytes({t_rows, h}, 2), in, false);
  const bool by_logits = in->Chance(60);
  if (by_logits) {
    a.router_logits_dtype = in->Enum(3);
    logits.Allocate(CheckedBytes({t_rows, a.num_global_experts},
                                 ElementBytes(a.router_logits_dtype)),
                    in, false);
    a.router_logits = logits.data();
  } else {
    topk_ids.Allocate(CheckedBytes({t_rows, a.top_k}, 4), in, false);
    topk_weights.Allocate(CheckedBytes({t_rows, a.top_k}, 4), in, false);
    if (topk_ids.data() != nullptr && in->Chance(85)) {
      const int64_t count = static_cast<int64_t>(topk_ids.size()) / 4;
      for (int64_t j = 0; j < count; ++j) {
        PutI32(&topk_ids, j, in->Byte() % std::max<int32_t>(a.num_global_experts, 1));
      }
      if (in->Chance(20) && count > 0) PutI32(&topk_ids, in->Byte() % count, -1);
      topk_ids.Resnapshot();
    }
    if (topk_weights.data() != nullptr && in->Chance(85)) {
      const int64_t count = static_cast<int64_t>(topk_weights.size()) / 4;
      for (int64_t j = 0; j < count; ++j) {
        const float w = (in->Byte() % 64) / 64.0f;
        memcpy(topk_weights.data() + 4 * j, &w, 4);
      }
      topk_weights.Resnapshot();
    }
    a.topk_ids = reinterpret_cast<const int32_t*>(topk_ids.data());
    a.topk_weights = reinterpret_cast<const float*>(topk_weights.data());
  }
  const bool with_map = a.num_local_experts != a.num_global_experts || in->Chance(20);
  if (with_map) {
    expert_map.Allocate(CheckedBytes({a.num_global_experts}, 4), in, false);
    if (expert_map.data() != nullptr && a.num_global_experts > 0 && in->Chance(80)) {
      for (int32_t g = 0; g < a.num_global_experts; ++g) {
        const int32_t local = in->Chance(30) ? -1 : g % std::max<int32_t>(a.num_local_experts, 1);
        PutI32(&expert_map, g, local);
      }
      if (in->Chance(15)) PutI32(&expert_map, in->Byte() % a.num_global_experts, in->Chance(50)
                                                                                   ? -2
                                                                                   : INT32_MAX);
      expert_map.Resnapshot();
    }
    a.expert_map = reinterpret_cast<const int32_t*>(expert_map.data());
  }
  Weights w13, w2;
  const int64_t two_i = i > kInt64Max / 2 || i < 0 ? -1 : 2 * i;
  MakeWeights(in, a.num_local_experts, two_i, h, &w13);
  MakeWeights(in, a.num_local_experts, h, i, &w2);
  output.Allocate(CheckedBytes({t_rows, h}, 2), in, true);
  a.hidden_states = hidden.data();
  a.w13 = w13.w;
  a.w2 = w2.w;
  a.output = output.data();
  const std::vector<const Buffer*> inputs = {&hidden,     &logits,      &topk_ids,   &topk_weights,
                                             &expert_map, &w13.packed, &w13.scales, &w2.packed,
                                             &w2.scales};
  size_t needed = 0xA5A5A5A5u;
  const mxmoe_status size_status = mxmoe_moe_forward_workspace_size(&a, &needed);
  CheckCall(t, "mxmoe_moe_forward_workspace_size", size_status, false, inputs, {});
  Buffer workspace;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  const bool bad_workspace =
      MakeWorkspace(in, size_status, needed, &workspace, hidden, &ws, &ws_bytes);
  const mxmoe_status s = mxmoe_moe_forward(&a, ws, ws_bytes, nullptr);
  bool must_fail = bad_workspace || WeightsMustFail(w13, a.num_local_experts, two_i, h) ||
                   WeightsMustFail(w2, a.num_local_experts, h, i);
  if (size_status == MXMOE_STATUS_OK) {
    must_fail = must_fail || AnyUnusable({&hidden, &output});
  }
  CheckCall(t, "mxmoe_moe_forward", s, must_fail, inputs, {&output});
  if (size_status != MXMOE_STATUS_OK && s == MXMOE_STATUS_OK) {
    Finding(t, "the operation succeeded where its workspace size query failed");
  }
}

// ---- the rest of the API -------------------------------------------------------------------------------

void FuzzMisc(Decoder* in) {
  const char* t = "misc";
  mxmoe_device device{static_cast<int32_t>(in->U32()), static_cast<int32_t>(in->U32())};
  if (in->Chance(50)) device = in->Device();
  // A sentinel no CPU call answers (values outside the enum would be UB in C++ itself).
  mxmoe_backend backend = MXMOE_BACKEND_SM100;
  const mxmoe_status s = mxmoe_backend_for_device(device, in->Chance(5) ? nullptr : &backend);
  CheckCall(t, "mxmoe_backend_for_device", s, false, {}, {});
  if (s != MXMOE_STATUS_OK && backend != MXMOE_BACKEND_SM100) {
    Finding(t, "a failed mxmoe_backend_for_device wrote its output");
  }
  if (mxmoe_status_string(static_cast<mxmoe_status>(in->Byte() % 8)) == nullptr ||
      mxmoe_backend_name(static_cast<mxmoe_backend>(in->Byte() % 4)) == nullptr) {
    Finding(t, "a name function returned NULL");
  }
  // Every entry point with NULL args (and NULL bytes for the size queries).
  size_t bytes = 0;
  const mxmoe_status nulls[] = {
      mxmoe_quantize(nullptr, nullptr),
      mxmoe_dequantize(nullptr, nullptr),
      mxmoe_experts_quantize(nullptr, nullptr),
      mxmoe_silu_mul_experts_quantize(nullptr, nullptr),
      mxmoe_swizzle_scales(nullptr, nullptr),
      mxmoe_unswizzle_scales(nullptr, nullptr),
      mxmoe_quantize_weights(nullptr, nullptr),
      mxmoe_prepare_weights_size(nullptr, &bytes),
      mxmoe_prepare_weights(nullptr, nullptr),
      mxmoe_grouped_gemm_workspace_size(nullptr, &bytes),
      mxmoe_grouped_gemm(nullptr, nullptr, 0, nullptr),
      mxmoe_moe_forward_workspace_size(nullptr, &bytes),
      mxmoe_moe_forward(nullptr, nullptr, 0, nullptr),
  };
  for (const mxmoe_status n : nulls) {
    if (n != MXMOE_STATUS_INVALID_ARGUMENT) Finding(t, "NULL args not INVALID_ARGUMENT");
  }
  mxmoe_grouped_gemm_args g{};
  if (mxmoe_grouped_gemm_workspace_size(&g, nullptr) != MXMOE_STATUS_INVALID_ARGUMENT) {
    Finding(t, "NULL bytes not INVALID_ARGUMENT");
  }
}

struct Target {
  const char* name;
  void (*run)(Decoder*);
};

const Target kTargets[] = {
    {"quantize", FuzzQuantize},
    {"dequantize", FuzzDequantize},
    {"experts_quantize", [](Decoder* in) { FuzzExpertsQuantize(in, false); }},
    {"silu_mul_experts_quantize", [](Decoder* in) { FuzzExpertsQuantize(in, true); }},
    {"swizzle_scales", [](Decoder* in) { FuzzSwizzle(in, false); }},
    {"unswizzle_scales", [](Decoder* in) { FuzzSwizzle(in, true); }},
    {"quantize_weights", FuzzQuantizeWeights},
    {"prepare_weights", FuzzPrepareWeights},
    {"grouped_gemm", FuzzGroupedGemm},
    {"moe_forward", FuzzMoeForward},
    {"misc", FuzzMisc},
};
constexpr int kNumTargets = sizeof(kTargets) / sizeof(kTargets[0]);

int fixed_target = -2;  // -2: not read yet; -1: chosen by the first byte
unsigned call_seconds = 10;

void OnAlarm(int) {
  static const char kMessage[] = "\nmxmoe fuzz finding: a call did not return in time (hang)\n";
  (void)!write(2, kMessage, sizeof(kMessage) - 1);
  abort();
}

void Init() {
  fixed_target = -1;
  if (const char* name = getenv("MXMOE_FUZZ_TARGET")) {
    for (int i = 0; i < kNumTargets; ++i) {
      if (strcmp(name, kTargets[i].name) == 0) fixed_target = i;
    }
    if (fixed_target < 0 && name[0] != '\0') {
      fprintf(stderr, "MXMOE_FUZZ_TARGET=%s is not a target; targets:", name);
      for (const Target& target : kTargets) fprintf(stderr, " %s", target.name);
      fprintf(stderr, "\n");
      exit(2);
    }
  }
  if (const char* s = getenv("MXMOE_FUZZ_CALL_SECONDS")) call_seconds = atoi(s);
  signal(SIGALRM, OnAlarm);
}

}  // namespace

const char* TargetName(int index) { return index < kNumTargets ? kTargets[index].name : ""; }
int NumTargets() { return kNumTargets; }

}  // namespace mxmoe_fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace mxmoe_fuzz;
  if (fixed_target == -2) Init();
  Decoder in(data, size);
  const int selector = in.Byte() % kNumTargets;
  const int index = fixed_target >= 0 ? fixed_target : selector;
  if (call_seconds > 0) alarm(call_seconds);
  kTargets[index].run(&in);
  alarm(0);
  return 0;
}
