// mxmoe._mxmoe: the nanobind module between Python and the mxmoe C API. It only converts:
// nb::ndarray arguments -> DLTensor -> (mxmoe/dlpack.h checks) -> args struct -> C API call, and
// a non-OK status -> a Python exception (an mxmoe._mxmoe.Error subclass) carrying the status name
// and mxmoe_last_error(). Outputs, workspaces and streams come from the caller (mxmoe/ops.py);
// nothing is allocated here and there is no numerics.
//
// Every operation takes its outputs as arguments and a CUDA stream as an integer handle (0 for
// CPU tensors). The GIL is released while the C API runs. Shape checks here are the ones the C
// API cannot do (it sees raw pointers): every buffer must have exactly the extent the operation
// reads or writes, so a mis-sized tensor is rejected before any byte is touched.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <limits>
#include <string>

#include "mxmoe/dlpack.h"
#include "mxmoe/mxmoe.h"

namespace nb = nanobind;

namespace mxmoe {
namespace {

using dlpack::kActivation;
using dlpack::kAnyDim;
using dlpack::kBFloat16;
using dlpack::kFloat16;
using dlpack::kFloat32;
using dlpack::kInt32;
using dlpack::kUInt8;
using dlpack::TensorSpec;

using InArray = nb::ndarray<nb::ro>;  // read-only inputs (numpy read-only arrays welcome)
using OutArray = nb::ndarray<>;

// ---- Exceptions ------------------------------------------------------------------------------

PyObject* error_base = nullptr;
PyObject* error_classes[7] = {};

[[noreturn]] void Raise(mxmoe_status status, const std::string& message) {
  const int index = static_cast<int>(status);
  PyObject* cls = (index > 0 && index < 7) ? error_classes[index] : error_base;
  const std::string text = std::string(mxmoe_status_string(status)) + ": " + message;
  nb::object exc = nb::steal(PyObject_CallFunction(cls, "s", text.c_str()));
  if (!exc.is_valid()) throw nb::python_error();
  nb::setattr(exc, "status", nb::str(mxmoe_status_string(status)));
  nb::setattr(exc, "message", nb::str(message.c_str()));
  PyErr_SetObject(cls, exc.ptr());
  throw nb::python_error();
}

// A status from the DLPack helper (message in `error`).
void Check(mxmoe_status status, const std::string& error) {
  if (status != MXMOE_STATUS_OK) Raise(status, error);
}

// A status from the C API (message in mxmoe_last_error()).
void CheckApi(mxmoe_status status) {
  if (status != MXMOE_STATUS_OK) Raise(status, mxmoe_last_error());
}

// Runs a C API call with the GIL released (CPU backends compute for a while; other Python
// threads keep running), then raises with the GIL held again.
template <typename Call>
void RunWithoutGil(Call&& call) {
  mxmoe_status status;
  {
    nb::gil_scoped_release release;
    status = call();
  }
  CheckApi(status);  // mxmoe_last_error() is thread-local: still this thread's message
}

void RegisterExceptions(nb::module_& m) {
  error_base = PyErr_NewExceptionWithDoc(
      "mxmoe._mxmoe.Error",
      "An mxmoe operation failed. `status` is the C API status name, `message` the reason.",
      PyExc_RuntimeError, nullptr);
  m.attr("Error") = nb::borrow(error_base);
  struct Entry {
    mxmoe_status status;
    const char* name;
    PyObject* also;  // a builtin base so `except ValueError` keeps working
  };
  const Entry entries[] = {
      {MXMOE_STATUS_INVALID_ARGUMENT, "InvalidArgumentError", PyExc_ValueError},
      {MXMOE_STATUS_UNSUPPORTED, "UnsupportedError", nullptr},
      {MXMOE_STATUS_MISALIGNED, "MisalignedError", PyExc_ValueError},
      {MXMOE_STATUS_WORKSPACE_TOO_SMALL, "WorkspaceTooSmallError", PyExc_ValueError},
      {MXMOE_STATUS_CUDA_ERROR, "CudaError", nullptr},
      {MXMOE_STATUS_INTERNAL, "InternalError", nullptr},
  };
  for (const Entry& entry : entries) {
    nb::object bases = entry.also ? nb::steal(PyTuple_Pack(2, error_base, entry.also))
                                  : nb::steal(PyTuple_Pack(1, error_base));
    const std::string qualified = std::string("mxmoe._mxmoe.") + entry.name;
    PyObject* cls = PyErr_NewException(qualified.c_str(), bases.ptr(), nullptr);
    if (cls == nullptr) throw nb::python_error();
    error_classes[entry.status] = cls;
    m.attr(entry.name) = nb::borrow(cls);
  }
}

// ---- ndarray -> DLTensor ---------------------------------------------------------------------

// A DLTensor view of an nb::ndarray (borrows its shape and stride arrays).
template <typename Array>
DLTensor ToDLTensor(const Array& a) {
  DLTensor t;
  t.data = const_cast<void*>(static_cast<const void*>(a.data_handle()));
  t.device.device_type = static_cast<DLDeviceType>(a.device_type());
  t.device.device_id = a.device_id();
  t.ndim = static_cast<int32_t>(a.ndim());
  t.dtype.code = a.dtype().code;
  t.dtype.bits = a.dtype().bits;
  t.dtype.lanes = a.dtype().lanes;
  t.shape = const_cast<int64_t*>(a.shape_ptr());
  t.strides = const_cast<int64_t*>(a.stride_ptr());
  t.byte_offset = a.byte_offset();
  return t;
}

// Saturates instead of overflowing (x comes from Python): an extent no tensor can have, so the
// shape check that uses it fails with a message.
int64_t RoundUp(int64_t x, int64_t m) {
  if (x > std::numeric_limits<int64_t>::max() - (m - 1)) return std::numeric_limits<int64_t>::max();
  return (x + m - 1) / m * m;
}

// 2 * v for a dimension from Python (k from k/2 bytes, 2I rows of w13), raising instead of the
// signed overflow that a huge value (e.g. from a zero-size tensor's other extent) would be.
int64_t Twice(int64_t v, const char* what) {
  if (v > std::numeric_limits<int64_t>::max() / 2 || v < std::numeric_limits<int64_t>::min() / 2) {
    Raise(MXMOE_STATUS_INVALID_ARGUMENT, std::string("2 * ") + what + " overflows int64 (" +
                                             what + " = " + std::to_string(v) + ")");
  }
  return 2 * v;
}

// An extent that the C API takes as int32 (expert counts): raises instead of truncating.
int32_t Int32Extent(int64_t v, const char* what) {
  if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
    Raise(MXMOE_STATUS_INVALID_ARGUMENT,
          std::string(what) + " must fit int32 (at most 65536 experts), got " + std::to_string(v));
  }
  return static_cast<int32_t>(v);
}

// The argument that fixes the device of an operation: checked, and its device returned.
template <typename T, typename Array>
T* First(const Array& a, const TensorSpec& spec, mxmoe_device* device) {
  const DLTensor t = ToDLTensor(a);
  std::string error;
  Check(dlpack::CheckTensor(t, spec, &error), error);
  Check(dlpack::ToMxmoeDevice(t, spec.name, device, &error), error);
  return static_cast<T*>(dlpack::DataPointer(t));
}

// Every later argument: checked, and on the same device as `reference`.
template <typename T, typename Array>
T* Arg(const Array& a, const TensorSpec& spec, const mxmoe_device& device,
       const char* reference) {
  const DLTensor t = ToDLTensor(a);
  std::string error;
  T* pointer = nullptr;
  Check(dlpack::Convert(t, spec, device, reference, &pointer, &error), error);
  return pointer;
}

// An optional argument: nullptr when None.
template <typename T, typename Array>
T* OptionalArg(const Array& a, const TensorSpec& spec, const mxmoe_device& device,
               const char* reference) {
  if (!a.is_valid()) return nullptr;
  return Arg<T>(a, spec, device, reference);
}

template <typename Array>
int32_t ActivationDType(const Array& a, const char* name) {
  const DLTensor t = ToDLTensor(a);
  int32_t dtype = 0;
  std::string error;
  Check(dlpack::ActivationDType(t, name, &dtype, &error), error);
  return dtype;
}

template <typename Array>
uint32_t DTypeBit(const Array& a) { return dlpack::DTypeBit(ToDLTensor(a).dtype); }

void* Stream(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

// Expected scale tensor shape of a [rows, k] matrix in `layout` (k % 32 == 0).
dlpack::Shape ScaleShape(int64_t rows, int64_t k, int32_t layout) {
  if (layout == MXMOE_SCALE_LAYOUT_SWIZZLED_128X4) {
    return {RoundUp(rows, 128), RoundUp(k / 32, 4)};
  }
  return {rows, k / 32};
}

const char* ScaleLayoutDoc(int32_t layout) {
  return layout == MXMOE_SCALE_LAYOUT_SWIZZLED_128X4 ? "[round_up(rows,128), round_up(k/32,4)]"
                                                     : "[rows, k/32]";
}

// Expert weights: packed [E, n, k/2] + scales (LINEAR [E, n, k/32] or SWIZZLED_128X4
// [E, round_up(n,128), round_up(k/32,4)]), or PREPARED: packed = one uint8 buffer, no scales.
mxmoe_expert_weights Weights(const char* name, const char* scales_name, const InArray& packed,
                             const InArray& scales, int32_t format, int32_t backend,
                             int32_t num_experts, int64_t n, int64_t k,
                             const mxmoe_device& device, const char* reference) {
  mxmoe_expert_weights w{};
  w.num_experts = num_experts;
  w.n = n;
  w.k = k;
  w.format = format;
  w.backend = backend;
  if (format == MXMOE_WEIGHT_FORMAT_PREPARED) {
    w.packed = Arg<const uint8_t>(packed, {name, "[bytes] (prepared)", {kAnyDim}, kUInt8},
                                  device, reference);
    w.prepared_bytes = static_cast<size_t>(packed.shape(0));  // the C API checks it is enough
    if (scales.is_valid()) {
      Raise(MXMOE_STATUS_INVALID_ARGUMENT,
            std::string(scales_name) + " must be None for prepared weights");
    }
    return w;
  }
  if (k % 32 != 0 || num_experts < 0 || n < 0) return w;  // the C API names the bad dimension
  w.packed = Arg<const uint8_t>(packed, {name, "[E, n, k/2]", {num_experts, n, k / 2}, kUInt8},
                                device, reference);
  if (!scales.is_valid()) {
    Raise(MXMOE_STATUS_INVALID_ARGUMENT, std::string(scales_name) + " must not be None");
  }
  if (format == MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4) {
    w.scales = Arg<const uint8_t>(
        scales,
        {scales_name, "[E, round_up(n,128), round_up(k/32,4)]",
         {num_experts, RoundUp(n, 128), RoundUp(k / 32, 4)}, kUInt8},
        device, reference);
  } else {
    w.scales = Arg<const uint8_t>(scales, {scales_name, "[E, n, k/32]", {num_experts, n, k / 32},
                                           kUInt8},
                                  device, reference);
  }
  return w;
}

// ---- Entry points ----------------------------------------------------------------------------

void Quantize(const InArray& input, const OutArray& packed, const OutArray& scales,
              int32_t scale_layout, uintptr_t stream) {
  mxmoe_quantize_args args{};
  args.input = First<const void>(input, {"input", "[rows, k]", {kAnyDim, kAnyDim}, kActivation},
                                 &args.device);
  args.rows = static_cast<int64_t>(input.shape(0));
  args.k = static_cast<int64_t>(input.shape(1));
  args.input_dtype = ActivationDType(input, "input");
  args.scale_layout = scale_layout;
  if (args.k % 32 == 0) {
    args.packed = Arg<uint8_t>(packed, {"packed", "[rows, k/2]", {args.rows, args.k / 2}, kUInt8},
                               args.device, "input");
    args.scales = Arg<uint8_t>(
        scales, {"scales", ScaleLayoutDoc(scale_layout), ScaleShape(args.rows, args.k,
                                                                    scale_layout), kUInt8},
        args.device, "input");
  }
  RunWithoutGil([&] { return mxmoe_quantize(&args, Stream(stream)); });
}

void Dequantize(const InArray& packed, const InArray& scales, int32_t scale_layout,
                const OutArray& output, uintptr_t stream) {
  mxmoe_dequantize_args args{};
  args.packed = First<const uint8_t>(packed, {"packed", "[rows, k/2]", {kAnyDim, kAnyDim},
                                              kUInt8},
                                     &args.device);
  args.rows = static_cast<int64_t>(packed.shape(0));
  args.k = Twice(static_cast<int64_t>(packed.shape(1)), "packed.shape[1]");
  args.scale_layout = scale_layout;
  args.output = Arg<void>(output, {"output", "[rows, k]", {args.rows, args.k},
                                   kActivation | kFloat32},
                          args.device, "packed");
  args.output_dtype = ActivationDType(output, "output");
  if (args.k % 32 == 0) {
    args.scales = Arg<const uint8_t>(
        scales, {"scales", ScaleLayoutDoc(scale_layout), ScaleShape(args.rows, args.k,
                                                                    scale_layout), kUInt8},
        args.device, "packed");
  }
  RunWithoutGil([&] { return mxmoe_dequantize(&args, Stream(stream)); });
}

// Shared by experts_quantize and silu_mul_experts_quantize: `width` is the output width (k or n).
struct ExpertsArgs {
  mxmoe_device device;
  int64_t rows = 0;
  int64_t width = 0;
  int32_t num_experts = 0;
  const void* input = nullptr;
  int32_t input_dtype = 0;
  const int32_t* expert_offsets = nullptr;
  const int32_t* blockscale_offsets = nullptr;
  uint8_t* packed = nullptr;
  uint8_t* scales = nullptr;
  int64_t scale_rows = 0;
};

ExpertsArgs ConvertExperts(const InArray& input, const InArray& expert_offsets,
                           const InArray& blockscale_offsets, const OutArray& packed,
                           const OutArray& scales, bool silu_mul) {
  ExpertsArgs a;
  a.input = First<const void>(
      input, {"input", silu_mul ? "[rows, 2*n]" : "[rows, k]", {kAnyDim, kAnyDim}, kActivation},
      &a.device);
  a.rows = static_cast<int64_t>(input.shape(0));
  const int64_t cols = static_cast<int64_t>(input.shape(1));
  if (silu_mul && cols % 2 != 0) {
    Raise(MXMOE_STATUS_INVALID_ARGUMENT,
          "input must have an even number of columns [rows, 2*n] (gate | up), got shape [" +
              std::to_string(a.rows) + ", " + std::to_string(cols) + "]");
  }
  a.width = silu_mul ? cols / 2 : cols;
  a.input_dtype = ActivationDType(input, "input");
  a.expert_offsets = Arg<const int32_t>(expert_offsets,
                                        {"expert_offsets", "[E+1]", {kAnyDim}, kInt32},
                                        a.device, "input");
  a.num_experts =
      Int32Extent(static_cast<int64_t>(expert_offsets.shape(0)) - 1, "len(expert_offsets) - 1");
  a.blockscale_offsets = Arg<const int32_t>(
      blockscale_offsets,
      {"blockscale_offsets", "[E+1] (E+1 = len(expert_offsets))", {int64_t{a.num_experts} + 1},
       kInt32},
      a.device, "input");
  if (a.width % 32 == 0) {
    a.packed = Arg<uint8_t>(packed, {"packed", silu_mul ? "[rows, n/2]" : "[rows, k/2]",
                                     {a.rows, a.width / 2}, kUInt8},
                            a.device, "input");
    a.scales = Arg<uint8_t>(
        scales, {"scales", silu_mul ? "[scale_rows, round_up(n/32,4)]"
                                    : "[scale_rows, round_up(k/32,4)]",
                 {kAnyDim, RoundUp(a.width / 32, 4)}, kUInt8},
        a.device, "input");
    a.scale_rows = static_cast<int64_t>(scales.shape(0));
  }
  return a;
}

void ExpertsQuantize(const InArray& input, const InArray& expert_offsets,
                     const InArray& blockscale_offsets, const OutArray& packed,
                     const OutArray& scales, uintptr_t stream) {
  const ExpertsArgs a =
      ConvertExperts(input, expert_offsets, blockscale_offsets, packed, scales, false);
  mxmoe_experts_quantize_args args{};
  args.rows = a.rows;
  args.k = a.width;
  args.num_experts = a.num_experts;
  args.input = a.input;
  args.input_dtype = a.input_dtype;
  args.expert_offsets = a.expert_offsets;
  args.blockscale_offsets = a.blockscale_offsets;
  args.packed = a.packed;
  args.scales = a.scales;
  args.scale_rows = a.scale_rows;
  args.device = a.device;
  RunWithoutGil([&] { return mxmoe_experts_quantize(&args, Stream(stream)); });
}

void SiluMulExpertsQuantize(const InArray& input, const InArray& expert_offsets,
                            const InArray& blockscale_offsets, const OutArray& packed,
                            const OutArray& scales, uintptr_t stream) {
  const ExpertsArgs a =
      ConvertExperts(input, expert_offsets, blockscale_offsets, packed, scales, true);
  mxmoe_silu_mul_experts_quantize_args args{};
  args.rows = a.rows;
  args.n = a.width;
  args.num_experts = a.num_experts;
  args.input = a.input;
  args.input_dtype = a.input_dtype;
  args.expert_offsets = a.expert_offsets;
  args.blockscale_offsets = a.blockscale_offsets;
  args.packed = a.packed;
  args.scales = a.scales;
  args.scale_rows = a.scale_rows;
  args.device = a.device;
  RunWithoutGil([&] { return mxmoe_silu_mul_experts_quantize(&args, Stream(stream)); });
}

void SwizzleScales(const InArray& input, const OutArray& output, uintptr_t stream) {
  mxmoe_swizzle_scales_args args{};
  args.input = First<const uint8_t>(
      input, {"input", "[batch, rows, cols]", {kAnyDim, kAnyDim, kAnyDim}, kUInt8}, &args.device);
  args.batch = static_cast<int64_t>(input.shape(0));
  args.rows = static_cast<int64_t>(input.shape(1));
  args.cols = static_cast<int64_t>(input.shape(2));
  args.output = Arg<uint8_t>(output,
                             {"output", "[batch, round_up(rows,128), round_up(cols,4)]",
                              {args.batch, RoundUp(args.rows, 128), RoundUp(args.cols, 4)},
                              kUInt8},
                             args.device, "input");
  RunWithoutGil([&] { return mxmoe_swizzle_scales(&args, Stream(stream)); });
}

void UnswizzleScales(const InArray& input, const OutArray& output, uintptr_t stream) {
  mxmoe_swizzle_scales_args args{};
  args.output = First<uint8_t>(
      output, {"output", "[batch, rows, cols]", {kAnyDim, kAnyDim, kAnyDim}, kUInt8},
      &args.device);
  args.batch = static_cast<int64_t>(output.shape(0));
  args.rows = static_cast<int64_t>(output.shape(1));
  args.cols = static_cast<int64_t>(output.shape(2));
  args.input = Arg<const uint8_t>(input,
                                  {"input", "[batch, round_up(rows,128), round_up(cols,4)]",
                                   {args.batch, RoundUp(args.rows, 128), RoundUp(args.cols, 4)},
                                   kUInt8},
                                  args.device, "output");
  RunWithoutGil([&] { return mxmoe_unswizzle_scales(&args, Stream(stream)); });
}

void QuantizeWeights(const InArray& weights, const OutArray& packed, const OutArray& scales,
                     int32_t scale_layout, uintptr_t stream) {
  mxmoe_quantize_weights_args args{};
  args.weights = First<const void>(
      weights, {"weights", "[E, n, k]", {kAnyDim, kAnyDim, kAnyDim}, kActivation}, &args.device);
  args.num_experts = Int32Extent(static_cast<int64_t>(weights.shape(0)), "weights.shape[0]");
  args.n = static_cast<int64_t>(weights.shape(1));
  args.k = static_cast<int64_t>(weights.shape(2));
  args.weights_dtype = ActivationDType(weights, "weights");
  args.scale_layout = scale_layout;
  if (args.k % 32 == 0) {
    args.packed = Arg<uint8_t>(packed, {"packed", "[E, n, k/2]",
                                        {args.num_experts, args.n, args.k / 2}, kUInt8},
                               args.device, "weights");
    if (scale_layout == MXMOE_SCALE_LAYOUT_SWIZZLED_128X4) {
      args.scales = Arg<uint8_t>(scales,
                                 {"scales", "[E, round_up(n,128), round_up(k/32,4)]",
                                  {args.num_experts, RoundUp(args.n, 128),
                                   RoundUp(args.k / 32, 4)},
                                  kUInt8},
                                 args.device, "weights");
    } else {
      args.scales = Arg<uint8_t>(scales, {"scales", "[E, n, k/32]",
                                          {args.num_experts, args.n, args.k / 32}, kUInt8},
                                 args.device, "weights");
    }
  }
  RunWithoutGil([&] { return mxmoe_quantize_weights(&args, Stream(stream)); });
}

mxmoe_prepare_weights_args PrepareArgs(const InArray& packed, const InArray& scales,
                                       int32_t num_experts, int64_t n, int64_t k,
                                       int32_t backend) {
  mxmoe_prepare_weights_args args{};
  First<const uint8_t>(packed, {"packed", "[E, n, k/2]", {kAnyDim, kAnyDim, kAnyDim}, kUInt8},
                       &args.device);
  args.weights = Weights("packed", "scales", packed, scales, MXMOE_WEIGHT_FORMAT_LINEAR, 0,
                         num_experts, n, k, args.device, "packed");
  args.backend = backend;
  return args;
}

size_t PrepareWeightsSize(const InArray& packed, const InArray& scales, int32_t num_experts,
                          int64_t n, int64_t k, int32_t backend) {
  const mxmoe_prepare_weights_args args = PrepareArgs(packed, scales, num_experts, n, k, backend);
  size_t bytes = 0;
  CheckApi(mxmoe_prepare_weights_size(&args, &bytes));
  return bytes;
}

void PrepareWeights(const InArray& packed, const InArray& scales, int32_t num_experts, int64_t n,
                    int64_t k, int32_t backend, const OutArray& prepared, uintptr_t stream) {
  mxmoe_prepare_weights_args args = PrepareArgs(packed, scales, num_experts, n, k, backend);
  args.prepared = Arg<uint8_t>(prepared, {"prepared", "[bytes]", {kAnyDim}, kUInt8}, args.device,
                               "packed");
  args.prepared_bytes = static_cast<size_t>(prepared.shape(0));
  RunWithoutGil([&] { return mxmoe_prepare_weights(&args, Stream(stream)); });
}

mxmoe_grouped_gemm_args GroupedGemmArgs(const InArray& a, const InArray& a_scales,
                                        const InArray& b_packed, const InArray& b_scales,
                                        int32_t b_format, int32_t b_backend, int32_t num_experts,
                                        int64_t n, int64_t k, const InArray& expert_offsets,
                                        const InArray& blockscale_offsets,
                                        const InArray& problem_sizes, const OutArray& c) {
  mxmoe_grouped_gemm_args args{};
  args.a = First<const uint8_t>(a, {"a", "[rows, k/2]", {kAnyDim, kAnyDim}, kUInt8},
                                &args.device);
  args.rows = static_cast<int64_t>(a.shape(0));
  args.n = n;
  args.k = k;
  args.num_experts = num_experts;
  if (Twice(static_cast<int64_t>(a.shape(1)), "a.shape[1]") != k) {
    Raise(MXMOE_STATUS_INVALID_ARGUMENT,
          "a must have shape [rows, k/2] = [" + std::to_string(args.rows) + ", " +
              std::to_string(k / 2) + "] (k = " + std::to_string(k) + " from the weights), got [" +
              std::to_string(args.rows) + ", " + std::to_string(a.shape(1)) + "]");
  }
  if (k % 32 == 0) {
    args.a_scales = Arg<const uint8_t>(a_scales,
                                       {"a_scales", "[a_scale_rows, round_up(k/32,4)]",
                                        {kAnyDim, RoundUp(k / 32, 4)}, kUInt8},
                                       args.device, "a");
    args.a_scale_rows = static_cast<int64_t>(a_scales.shape(0));
  }
  args.b = Weights("b_packed", "b_scales", b_packed, b_scales, b_format, b_backend, num_experts,
                   n, k, args.device, "a");
  args.expert_offsets = Arg<const int32_t>(
      expert_offsets, {"expert_offsets", "[E+1]", {int64_t{num_experts} + 1}, kInt32}, args.device,
      "a");
  args.blockscale_offsets =
      Arg<const int32_t>(blockscale_offsets,
                         {"blockscale_offsets", "[E+1]", {int64_t{num_experts} + 1}, kInt32},
                         args.device,
                         "a");
  args.problem_sizes = OptionalArg<const int32_t>(
      problem_sizes, {"problem_sizes", "[E, 3]", {num_experts, 3}, kInt32}, args.device, "a");
  args.c = Arg<void>(c, {"c", "[rows, n]", {args.rows, n}, kActivation}, args.device, "a");
  args.c_dtype = ActivationDType(c, "c");
  return args;
}

size_t GroupedGemmWorkspaceSize(const InArray& a, const InArray& a_scales,
                                const InArray& b_packed, const InArray& b_scales,
                                int32_t b_format, int32_t b_backend, int32_t num_experts,
                                int64_t n, int64_t k, const InArray& expert_offsets,
                                const InArray& blockscale_offsets, const InArray& problem_sizes,
                                const OutArray& c) {
  const mxmoe_grouped_gemm_args args =
      GroupedGemmArgs(a, a_scales, b_packed, b_scales, b_format, b_backend, num_experts, n, k,
                      expert_offsets, blockscale_offsets, problem_sizes, c);
  size_t bytes = 0;
  CheckApi(mxmoe_grouped_gemm_workspace_size(&args, &bytes));
  return bytes;
}

void GroupedGemm(const InArray& a, const InArray& a_scales, const InArray& b_packed,
                 const InArray& b_scales, int32_t b_format, int32_t b_backend,
                 int32_t num_experts, int64_t n, int64_t k, const InArray& expert_offsets,
                 const InArray& blockscale_offsets, const InArray& problem_sizes,
                 const OutArray& c, const OutArray& workspace, uintptr_t stream) {
  const mxmoe_grouped_gemm_args args =
      GroupedGemmArgs(a, a_scales, b_packed, b_scales, b_format, b_backend, num_experts, n, k,
                      expert_offsets, blockscale_offsets, problem_sizes, c);
  void* workspace_ptr = nullptr;
  size_t workspace_bytes = 0;
  if (workspace.is_valid()) {
    workspace_ptr = Arg<void>(workspace, {"workspace", "[bytes]", {kAnyDim}, kUInt8},
                              args.device, "a");
    workspace_bytes = static_cast<size_t>(workspace.shape(0));
  }
  RunWithoutGil([&] {
    return mxmoe_grouped_gemm(&args, workspace_ptr, workspace_bytes, Stream(stream));
  });
}


// The model options of mxmoe_moe_forward_args (activation, biases, routing mode, shared
// experts), one Python object so that the argument list is written once.
struct MoeOptions {
  int32_t activation = 0;
  float swiglu_alpha = 0.0f;
  float swiglu_limit = 0.0f;
  InArray w13_bias;
  InArray w2_bias;
  int32_t routing = 0;
  int32_t num_expert_groups = 0;
  int32_t topk_groups = 0;
  float routed_scaling_factor = 0.0f;
  InArray e_score_correction_bias;
  int32_t num_shared_experts = 0;
};

mxmoe_moe_forward_args MoeArgs(const InArray& hidden, const InArray& w13_packed,
                               const InArray& w13_scales, const InArray& w2_packed,
                               const InArray& w2_scales, int32_t weight_format,
                               int32_t weight_backend, int32_t num_local_experts,
                               int64_t intermediate_size, int32_t num_global_experts,
                               int32_t top_k, bool renormalize, const InArray& router_logits,
                               const InArray& topk_ids, const InArray& topk_weights,
                               const InArray& expert_map, const OutArray& output,
                               const MoeOptions& options) {
  mxmoe_moe_forward_args args{};
  args.hidden_states = First<const void>(
      hidden, {"hidden_states", "[T, H]", {kAnyDim, kAnyDim}, kActivation}, &args.device);
  args.num_tokens = static_cast<int64_t>(hidden.shape(0));
  args.hidden_size = static_cast<int64_t>(hidden.shape(1));
  args.intermediate_size = intermediate_size;
  args.num_global_experts = num_global_experts;
  args.num_local_experts = num_local_experts;
  args.top_k = top_k;
  args.renormalize = renormalize ? 1 : 0;
  args.activation_dtype = ActivationDType(hidden, "hidden_states");
  const int64_t t = args.num_tokens;
  const int64_t h = args.hidden_size;
  args.w13 = Weights("w13_packed", "w13_scales", w13_packed, w13_scales, weight_format,
                     weight_backend, num_local_experts, Twice(intermediate_size, "intermediate_size"),
                     h, args.device,
                     "hidden_states");
  args.w2 = Weights("w2_packed", "w2_scales", w2_packed, w2_scales, weight_format,
                    weight_backend, num_local_experts, h, intermediate_size, args.device,
                    "hidden_states");
  if (router_logits.is_valid()) {
    args.router_logits = Arg<const void>(
        router_logits,
        {"router_logits", "[T, E_global]", {t, num_global_experts}, kActivation | kFloat32},
        args.device, "hidden_states");
    args.router_logits_dtype = ActivationDType(router_logits, "router_logits");
  }
  args.topk_ids = OptionalArg<const int32_t>(
      topk_ids, {"topk_ids", "[T, top_k]", {t, top_k}, kInt32}, args.device, "hidden_states");
  args.topk_weights = OptionalArg<const float>(
      topk_weights, {"topk_weights", "[T, top_k]", {t, top_k}, kFloat32}, args.device,
      "hidden_states");
  args.expert_map = OptionalArg<const int32_t>(
      expert_map, {"expert_map", "[E_global]", {num_global_experts}, kInt32}, args.device,
      "hidden_states");
  args.output = Arg<void>(output, {"output", "[T, H] (dtype of hidden_states)", {t, h},
                                   DTypeBit(hidden)},
                          args.device, "hidden_states");
  args.activation = options.activation;
  args.swiglu_alpha = options.swiglu_alpha;
  args.swiglu_limit = options.swiglu_limit;
  args.routing = options.routing;
  args.num_expert_groups = options.num_expert_groups;
  args.topk_groups = options.topk_groups;
  args.routed_scaling_factor = options.routed_scaling_factor;
  args.num_shared_experts = options.num_shared_experts;
  const int64_t e = num_local_experts;
  if (options.w13_bias.is_valid()) {
    args.w13_bias = Arg<const void>(
        options.w13_bias,
        {"w13_bias", "[E_local, 2I]", {e, 2 * intermediate_size}, kActivation | kFloat32},
        args.device, "hidden_states");
    args.w13_bias_dtype = ActivationDType(options.w13_bias, "w13_bias");
  }
  if (options.w2_bias.is_valid()) {
    args.w2_bias = Arg<const void>(
        options.w2_bias, {"w2_bias", "[E_local, H]", {e, h}, kActivation | kFloat32},
        args.device, "hidden_states");
    args.w2_bias_dtype = ActivationDType(options.w2_bias, "w2_bias");
  }
  if (options.e_score_correction_bias.is_valid()) {
    args.e_score_correction_bias = Arg<const void>(
        options.e_score_correction_bias,
        {"e_score_correction_bias", "[E_global]", {num_global_experts}, kActivation | kFloat32},
        args.device, "hidden_states");
    args.e_score_correction_bias_dtype =
        ActivationDType(options.e_score_correction_bias, "e_score_correction_bias");
  }
  return args;
}

size_t MoeForwardWorkspaceSize(const InArray& hidden, const InArray& w13_packed,
                               const InArray& w13_scales, const InArray& w2_packed,
                               const InArray& w2_scales, int32_t weight_format,
                               int32_t weight_backend, int32_t num_local_experts,
                               int64_t intermediate_size, int32_t num_global_experts,
                               int32_t top_k, bool renormalize, const InArray& router_logits,
                               const InArray& topk_ids, const InArray& topk_weights,
                               const InArray& expert_map, const OutArray& output,
                               const MoeOptions& options) {
  const mxmoe_moe_forward_args args =
      MoeArgs(hidden, w13_packed, w13_scales, w2_packed, w2_scales, weight_format,
              weight_backend, num_local_experts, intermediate_size, num_global_experts, top_k,
              renormalize, router_logits, topk_ids, topk_weights, expert_map, output, options);
  size_t bytes = 0;
  CheckApi(mxmoe_moe_forward_workspace_size(&args, &bytes));
  return bytes;
}

void MoeForward(const InArray& hidden, const InArray& w13_packed, const InArray& w13_scales,
                const InArray& w2_packed, const InArray& w2_scales, int32_t weight_format,
                int32_t weight_backend, int32_t num_local_experts, int64_t intermediate_size,
                int32_t num_global_experts, int32_t top_k, bool renormalize,
                const InArray& router_logits, const InArray& topk_ids,
                const InArray& topk_weights, const InArray& expert_map, const OutArray& output,
                const MoeOptions& options, const OutArray& workspace, uintptr_t stream) {
  const mxmoe_moe_forward_args args =
      MoeArgs(hidden, w13_packed, w13_scales, w2_packed, w2_scales, weight_format,
              weight_backend, num_local_experts, intermediate_size, num_global_experts, top_k,
              renormalize, router_logits, topk_ids, topk_weights, expert_map, output, options);
  void* workspace_ptr = nullptr;
  size_t workspace_bytes = 0;
  if (workspace.is_valid()) {
    workspace_ptr = Arg<void>(workspace, {"workspace", "[bytes]", {kAnyDim}, kUInt8},
                              args.device, "hidden_states");
    workspace_bytes = static_cast<size_t>(workspace.shape(0));
  }
  RunWithoutGil([&] {
    return mxmoe_moe_forward(&args, workspace_ptr, workspace_bytes, Stream(stream));
  });
}

std::string BackendForDevice(int32_t device_type, int32_t device_id) {
  mxmoe_backend backend = MXMOE_BACKEND_AUTO;
  CheckApi(mxmoe_backend_for_device(mxmoe_device{device_type, device_id}, &backend));
  return mxmoe_backend_name(backend);
}

}  // namespace
}  // namespace mxmoe

NB_MODULE(_mxmoe, m) {
  using namespace nb::literals;
  m.doc() = "mxmoe C API bindings (thin: DLPack arrays in, status -> exception out).";
  mxmoe::RegisterExceptions(m);

  m.attr("SCALE_LAYOUT_LINEAR") = static_cast<int>(MXMOE_SCALE_LAYOUT_LINEAR);
  m.attr("SCALE_LAYOUT_SWIZZLED_128X4") = static_cast<int>(MXMOE_SCALE_LAYOUT_SWIZZLED_128X4);
  m.attr("WEIGHT_FORMAT_LINEAR") = static_cast<int>(MXMOE_WEIGHT_FORMAT_LINEAR);
  m.attr("WEIGHT_FORMAT_SWIZZLED_128X4") = static_cast<int>(MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4);
  m.attr("WEIGHT_FORMAT_PREPARED") = static_cast<int>(MXMOE_WEIGHT_FORMAT_PREPARED);
  m.attr("BACKEND_AUTO") = static_cast<int>(MXMOE_BACKEND_AUTO);
  m.attr("BACKEND_CPU") = static_cast<int>(MXMOE_BACKEND_CPU);
  m.attr("BACKEND_SM90") = static_cast<int>(MXMOE_BACKEND_SM90);
  m.attr("BACKEND_SM100") = static_cast<int>(MXMOE_BACKEND_SM100);
  m.attr("DEVICE_CPU") = static_cast<int>(MXMOE_DEVICE_CPU);
  m.attr("DEVICE_CUDA") = static_cast<int>(MXMOE_DEVICE_CUDA);

  m.attr("ACTIVATION_SILU_AND_MUL") = static_cast<int>(MXMOE_ACTIVATION_SILU_AND_MUL);
  m.attr("ACTIVATION_SWIGLU_OAI") = static_cast<int>(MXMOE_ACTIVATION_SWIGLU_OAI);
  m.attr("ROUTING_SOFTMAX_TOPK") = static_cast<int>(MXMOE_ROUTING_SOFTMAX_TOPK);
  m.attr("ROUTING_TOPK_SOFTMAX") = static_cast<int>(MXMOE_ROUTING_TOPK_SOFTMAX);
  m.attr("ROUTING_SIGMOID_GROUPED_TOPK") = static_cast<int>(MXMOE_ROUTING_SIGMOID_GROUPED_TOPK);
  nb::class_<mxmoe::MoeOptions>(m, "MoeOptions",
                                "Model options of moe_forward (see mxmoe_moe_forward_args).")
      .def(nb::init<>())
      .def_rw("activation", &mxmoe::MoeOptions::activation)
      .def_rw("swiglu_alpha", &mxmoe::MoeOptions::swiglu_alpha)
      .def_rw("swiglu_limit", &mxmoe::MoeOptions::swiglu_limit)
      .def_rw("w13_bias", &mxmoe::MoeOptions::w13_bias, nb::arg().none())
      .def_rw("w2_bias", &mxmoe::MoeOptions::w2_bias, nb::arg().none())
      .def_rw("routing", &mxmoe::MoeOptions::routing)
      .def_rw("num_expert_groups", &mxmoe::MoeOptions::num_expert_groups)
      .def_rw("topk_groups", &mxmoe::MoeOptions::topk_groups)
      .def_rw("routed_scaling_factor", &mxmoe::MoeOptions::routed_scaling_factor)
      .def_rw("e_score_correction_bias", &mxmoe::MoeOptions::e_score_correction_bias,
              nb::arg().none())
      .def_rw("num_shared_experts", &mxmoe::MoeOptions::num_shared_experts);

  m.def("version", [] { return std::string(mxmoe_version()); });
  m.def("cuda_device_count", [] { return mxmoe_cuda_device_count(); });
  m.def("backend_for_device", &mxmoe::BackendForDevice, "device_type"_a, "device_id"_a = 0);

  m.def("quantize", &mxmoe::Quantize, "input"_a, "packed"_a, "scales"_a, "scale_layout"_a,
        "stream"_a = 0);
  m.def("dequantize", &mxmoe::Dequantize, "packed"_a, "scales"_a, "scale_layout"_a, "output"_a,
        "stream"_a = 0);
  m.def("experts_quantize", &mxmoe::ExpertsQuantize, "input"_a, "expert_offsets"_a,
        "blockscale_offsets"_a, "packed"_a, "scales"_a, "stream"_a = 0);
  m.def("silu_mul_experts_quantize", &mxmoe::SiluMulExpertsQuantize, "input"_a,
        "expert_offsets"_a, "blockscale_offsets"_a, "packed"_a, "scales"_a, "stream"_a = 0);
  m.def("swizzle_scales", &mxmoe::SwizzleScales, "input"_a, "output"_a, "stream"_a = 0);
  m.def("unswizzle_scales", &mxmoe::UnswizzleScales, "input"_a, "output"_a, "stream"_a = 0);
  m.def("quantize_weights", &mxmoe::QuantizeWeights, "weights"_a, "packed"_a, "scales"_a,
        "scale_layout"_a, "stream"_a = 0);
  m.def("prepare_weights_size", &mxmoe::PrepareWeightsSize, "packed"_a, "scales"_a,
        "num_experts"_a, "n"_a, "k"_a, "backend"_a);
  m.def("prepare_weights", &mxmoe::PrepareWeights, "packed"_a, "scales"_a, "num_experts"_a,
        "n"_a, "k"_a, "backend"_a, "prepared"_a, "stream"_a = 0);
  m.def("grouped_gemm_workspace_size", &mxmoe::GroupedGemmWorkspaceSize, "a"_a, "a_scales"_a,
        "b_packed"_a, "b_scales"_a.none(), "b_format"_a, "b_backend"_a, "num_experts"_a, "n"_a,
        "k"_a, "expert_offsets"_a, "blockscale_offsets"_a, "problem_sizes"_a.none(), "c"_a);
  m.def("grouped_gemm", &mxmoe::GroupedGemm, "a"_a, "a_scales"_a, "b_packed"_a,
        "b_scales"_a.none(), "b_format"_a, "b_backend"_a, "num_experts"_a, "n"_a, "k"_a,
        "expert_offsets"_a, "blockscale_offsets"_a, "problem_sizes"_a.none(), "c"_a,
        "workspace"_a.none(), "stream"_a = 0);
  m.def("moe_forward_workspace_size", &mxmoe::MoeForwardWorkspaceSize, "hidden_states"_a,
        "w13_packed"_a, "w13_scales"_a.none(), "w2_packed"_a, "w2_scales"_a.none(),
        "weight_format"_a, "weight_backend"_a, "num_local_experts"_a, "intermediate_size"_a,
        "num_global_experts"_a, "top_k"_a, "renormalize"_a, "router_logits"_a.none(),
        "topk_ids"_a.none(), "topk_weights"_a.none(), "expert_map"_a.none(), "output"_a,
        "options"_a);
  m.def("moe_forward", &mxmoe::MoeForward, "hidden_states"_a, "w13_packed"_a,
        "w13_scales"_a.none(), "w2_packed"_a, "w2_scales"_a.none(), "weight_format"_a,
        "weight_backend"_a, "num_local_experts"_a, "intermediate_size"_a, "num_global_experts"_a,
        "top_k"_a, "renormalize"_a, "router_logits"_a.none(), "topk_ids"_a.none(),
        "topk_weights"_a.none(), "expert_map"_a.none(), "output"_a, "options"_a,
        "workspace"_a.none(), "stream"_a = 0);
}
