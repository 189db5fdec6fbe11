// DLPack interop for the mxmoe C API: checks a DLTensor against what an argument must be (dtype,
// rank, shape with wildcards, row-major contiguity, device) and turns it into the raw pointer and
// mxmoe_device the args structs take. Header-only C++17; used by the nanobind module and usable
// directly by a C++ serving stack that holds DLTensors.
//
// Every check returns an mxmoe_status and, on failure, writes a message that names the argument
// and the offending value into `*error`, in the style of mxmoe_last_error():
//   "x must be 2-D [rows, k], got shape [3, 4, 5]"
//   "scales must be contiguous (row-major), got shape [4, 8] strides [1, 4]"
//   "w13 is on cuda:0 but hidden_states is on cpu"
// Nothing here touches tensor memory; it only reads the DLTensor descriptor.
//
// DLPack ABI: if <dlpack/dlpack.h> is included before this header, its definitions are used.
// Otherwise this header declares the subset mxmoe needs (DLDeviceType, DLDevice, DLDataTypeCode,
// DLDataType, DLTensor) exactly as the DLPack specification lays them out (ABI-compatible with
// DLPack >= 0.6). A translation unit that needs the full DLPack API must include
// <dlpack/dlpack.h> first.
//
// Devices: kDLCPU and kDLCUDAHost (pinned host memory) map to MXMOE_DEVICE_CPU; kDLCUDA and
// kDLCUDAManaged map to MXMOE_DEVICE_CUDA with the tensor's ordinal. Other devices are
// UNSUPPORTED.
#ifndef MXMOE_DLPACK_H_
#define MXMOE_DLPACK_H_

#include <stddef.h>
#include <stdint.h>

#include <initializer_list>
#include <string>

#include "mxmoe/mxmoe.h"

#ifndef DLPACK_DLPACK_H_
#ifndef MXMOE_DLPACK_ABI_SUBSET_
#define MXMOE_DLPACK_ABI_SUBSET_
extern "C" {
typedef enum {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLOpenCL = 4,
  kDLVulkan = 7,
  kDLMetal = 8,
  kDLVPI = 9,
  kDLROCM = 10,
  kDLROCMHost = 11,
  kDLExtDev = 12,
  kDLCUDAManaged = 13,
  kDLOneAPI = 14,
  kDLWebGPU = 15,
  kDLHexagon = 16,
  kDLMAIA = 17,
} DLDeviceType;

typedef struct {
  DLDeviceType device_type;
  int32_t device_id;
} DLDevice;

typedef enum {
  kDLInt = 0U,
  kDLUInt = 1U,
  kDLFloat = 2U,
  kDLOpaqueHandle = 3U,
  kDLBfloat = 4U,
  kDLComplex = 5U,
  kDLBool = 6U,
} DLDataTypeCode;

typedef struct {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
} DLDataType;

typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL means compact row-major
  uint64_t byte_offset;
} DLTensor;
}  // extern "C"
#endif  // MXMOE_DLPACK_ABI_SUBSET_
#endif  // DLPACK_DLPACK_H_

namespace mxmoe {
namespace dlpack {

// A shape entry that matches any extent.
constexpr int64_t kAnyDim = -1;

// Element types mxmoe arguments use, as a bit set so an argument can accept several.
enum DTypeMask : uint32_t {
  kUInt8 = 1u << 0,
  kInt32 = 1u << 1,
  kFloat32 = 1u << 2,
  kBFloat16 = 1u << 3,
  kFloat16 = 1u << 4,
  kActivation = kBFloat16 | kFloat16,  // what the quantizers and GEMM outputs take
};

// An expected shape of up to kMaxDims dimensions; kAnyDim entries match any extent.
struct Shape {
  static constexpr int kMaxDims = 4;
  int64_t dims[kMaxDims] = {};
  int ndim = 0;
  Shape(std::initializer_list<int64_t> list) {  // NOLINT: implicit from a braced list on purpose
    for (const int64_t d : list) {
      if (ndim < kMaxDims) dims[ndim++] = d;
    }
  }
};

// What one argument must be. `layout` documents the dimensions in messages ("[rows, k]").
struct TensorSpec {
  const char* name;
  const char* layout;
  Shape shape;
  uint32_t dtypes;  // DTypeMask bits
};

inline const char* DTypeName(DLDataType t) {
  if (t.lanes != 1) return "vector";
  switch (t.code) {
    case kDLUInt:
      return t.bits == 8 ? "uint8" : t.bits == 16 ? "uint16" : t.bits == 32 ? "uint32"
                                                             : t.bits == 64 ? "uint64" : "uint";
    case kDLInt:
      return t.bits == 8 ? "int8" : t.bits == 16 ? "int16" : t.bits == 32 ? "int32"
                                                           : t.bits == 64 ? "int64" : "int";
    case kDLFloat:
      return t.bits == 16 ? "float16" : t.bits == 32 ? "float32" : t.bits == 64 ? "float64"
                                                                                : "float";
    case kDLBfloat:
      return t.bits == 16 ? "bfloat16" : "bfloat";
    case kDLBool:
      return "bool";
    case kDLComplex:
      return "complex";
    default:
      return "unknown dtype";
  }
}

// The DTypeMask bit of `t`, or 0 if mxmoe never takes it.
inline uint32_t DTypeBit(DLDataType t) {
  if (t.lanes != 1) return 0;
  if (t.code == kDLUInt && t.bits == 8) return kUInt8;
  if (t.code == kDLInt && t.bits == 32) return kInt32;
  if (t.code == kDLFloat && t.bits == 32) return kFloat32;
  if (t.code == kDLBfloat && t.bits == 16) return kBFloat16;
  if (t.code == kDLFloat && t.bits == 16) return kFloat16;
  return 0;
}

inline std::string DTypeMaskNames(uint32_t mask) {
  static constexpr struct {
    uint32_t bit;
    const char* name;
  } kNames[] = {{kUInt8, "uint8"},
                {kInt32, "int32"},
                {kFloat32, "float32"},
                {kBFloat16, "bfloat16"},
                {kFloat16, "float16"}};
  std::string out;
  for (const auto& entry : kNames) {
    if (!(mask & entry.bit)) continue;
    if (!out.empty()) out += " or ";
    out += entry.name;
  }
  return out;
}

// The mxmoe_dtype of an activation-like tensor (bfloat16, float16, float32).
inline mxmoe_status ActivationDType(const DLTensor& t, const char* name, int32_t* dtype,
                                    std::string* error) {
  switch (DTypeBit(t.dtype)) {
    case kBFloat16:
      *dtype = MXMOE_DTYPE_BF16;
      return MXMOE_STATUS_OK;
    case kFloat16:
      *dtype = MXMOE_DTYPE_FP16;
      return MXMOE_STATUS_OK;
    case kFloat32:
      *dtype = MXMOE_DTYPE_FP32;
      return MXMOE_STATUS_OK;
    default:
      *error = std::string(name) + " must have dtype bfloat16, float16 or float32, got " +
               DTypeName(t.dtype);
      return MXMOE_STATUS_INVALID_ARGUMENT;
  }
}

inline std::string ShapeString(const int64_t* dims, int ndim) {
  std::string out = "[";
  for (int i = 0; i < ndim; ++i) {
    if (i) out += ", ";
    out += dims[i] == kAnyDim ? std::string("*") : std::to_string(dims[i]);
  }
  return out + "]";
}

inline std::string ShapeString(const DLTensor& t) { return ShapeString(t.shape, t.ndim); }

inline std::string ShapeString(const Shape& shape) {
  return ShapeString(shape.dims, shape.ndim);
}

// Any extent 0 (an empty tensor: no element to misplace, whatever its strides say).
inline bool IsEmpty(const DLTensor& t) {
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] == 0) return true;
  }
  return false;
}

// Row-major compact: strides NULL, or each stride equal to the product of the later extents
// (dimensions of extent 1 may have any stride, as DLPack producers are free to choose it). An
// empty tensor is contiguous (as torch says), which also keeps the product below from
// overflowing: the extents of a non-empty tensor multiply to its element count.
inline bool IsContiguous(const DLTensor& t) {
  if (t.strides == nullptr || IsEmpty(t)) return true;
  int64_t expected = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    if (t.shape[i] != 1 && t.strides[i] != expected) return false;
    if (__builtin_mul_overflow(expected, t.shape[i], &expected)) return false;
  }
  return true;
}

// The element count, or -1 when the extents multiply past int64 (possible only for a descriptor
// no allocation backs, or an empty one; see CheckTensor).
inline int64_t NumElements(const DLTensor& t) {
  if (IsEmpty(t)) return 0;
  int64_t n = 1;
  for (int i = 0; i < t.ndim; ++i) {
    if (__builtin_mul_overflow(n, t.shape[i], &n)) return -1;
  }
  return n;
}

// The first byte of the tensor (data + byte_offset).
inline void* DataPointer(const DLTensor& t) {
  return static_cast<char*>(t.data) + t.byte_offset;
}

inline std::string DeviceString(const DLDevice& device) {
  switch (device.device_type) {
    case kDLCPU:
      return "cpu";
    case kDLCUDA:
      return "cuda:" + std::to_string(device.device_id);
    case kDLCUDAHost:
      return "cuda_host";
    case kDLCUDAManaged:
      return "cuda_managed:" + std::to_string(device.device_id);
    default:
      return "dlpack device type " + std::to_string(static_cast<int>(device.device_type)) + ":" +
             std::to_string(device.device_id);
  }
}

inline std::string DeviceString(const mxmoe_device& device) {
  return device.type == MXMOE_DEVICE_CUDA ? "cuda:" + std::to_string(device.id) : "cpu";
}

// DLPack device -> mxmoe_device.
inline mxmoe_status ToMxmoeDevice(const DLTensor& t, const char* name, mxmoe_device* device,
                                  std::string* error) {
  switch (t.device.device_type) {
    case kDLCPU:
    case kDLCUDAHost:
      *device = mxmoe_device{MXMOE_DEVICE_CPU, 0};
      return MXMOE_STATUS_OK;
    case kDLCUDA:
    case kDLCUDAManaged:
      *device = mxmoe_device{MXMOE_DEVICE_CUDA, t.device.device_id};
      return MXMOE_STATUS_OK;
    default:
      *error = std::string(name) + " is on " + DeviceString(t.device) +
               ", which mxmoe does not serve (cpu or cuda only)";
      return MXMOE_STATUS_UNSUPPORTED;
  }
}

// Checks rank, shape, dtype and contiguity of `t` against `spec`, in that order.
inline mxmoe_status CheckTensor(const DLTensor& t, const TensorSpec& spec, std::string* error) {
  const int ndim = spec.shape.ndim;
  if (t.ndim != ndim || (ndim > 0 && t.shape == nullptr)) {
    *error = std::string(spec.name) + " must be " + std::to_string(ndim) + "-D " + spec.layout +
             ", got " + (t.shape == nullptr && t.ndim > 0 ? std::string("no shape")
                                                           : "shape " + ShapeString(t));
    return MXMOE_STATUS_INVALID_ARGUMENT;
  }
  for (int i = 0; i < ndim; ++i) {
    if (t.shape[i] < 0) {
      *error = std::string(spec.name) + " has a negative extent, shape " + ShapeString(t);
      return MXMOE_STATUS_INVALID_ARGUMENT;
    }
  }
  for (int i = 0; i < ndim; ++i) {
    const int64_t want = spec.shape.dims[i];
    if (want != kAnyDim && t.shape[i] != want) {
      *error = std::string(spec.name) + " must have shape " + ShapeString(spec.shape) + " " +
               spec.layout + ", got " + ShapeString(t);
      return MXMOE_STATUS_INVALID_ARGUMENT;
    }
  }
  if (!(DTypeBit(t.dtype) & spec.dtypes)) {
    *error = std::string(spec.name) + " must have dtype " + DTypeMaskNames(spec.dtypes) +
             ", got " + DTypeName(t.dtype);
    return MXMOE_STATUS_INVALID_ARGUMENT;
  }
  if (!IsContiguous(t)) {
    *error = std::string(spec.name) + " must be contiguous (row-major), got shape " +
             ShapeString(t) + " strides " + ShapeString(t.strides, t.ndim);
    return MXMOE_STATUS_INVALID_ARGUMENT;
  }
  if (NumElements(t) < 0) {
    *error = std::string(spec.name) + " has shape " + ShapeString(t) +
             ", whose element count overflows int64";
    return MXMOE_STATUS_INVALID_ARGUMENT;
  }
  if (t.data == nullptr && NumElements(t) != 0) {
    *error = std::string(spec.name) + " has a null data pointer";
    return MXMOE_STATUS_INVALID_ARGUMENT;
  }
  return MXMOE_STATUS_OK;
}

// Checks that `t` lives on `device` (the device of the reference argument `reference_name`).
inline mxmoe_status CheckSameDevice(const DLTensor& t, const char* name,
                                    const mxmoe_device& device, const char* reference_name,
                                    std::string* error) {
  mxmoe_device mine;
  const mxmoe_status status = ToMxmoeDevice(t, name, &mine, error);
  if (status != MXMOE_STATUS_OK) return status;
  if (mine.type != device.type || mine.id != device.id) {
    *error = std::string(name) + " is on " + DeviceString(mine) + " but " + reference_name +
             " is on " + DeviceString(device);
    return MXMOE_STATUS_INVALID_ARGUMENT;
  }
  return MXMOE_STATUS_OK;
}

// CheckTensor + CheckSameDevice, then the pointer: the common case for every argument after
// the one that fixes the device.
template <typename T>
mxmoe_status Convert(const DLTensor& t, const TensorSpec& spec, const mxmoe_device& device,
                     const char* reference_name, T** pointer, std::string* error) {
  mxmoe_status status = CheckTensor(t, spec, error);
  if (status != MXMOE_STATUS_OK) return status;
  status = CheckSameDevice(t, spec.name, device, reference_name, error);
  if (status != MXMOE_STATUS_OK) return status;
  *pointer = static_cast<T*>(DataPointer(t));
  return MXMOE_STATUS_OK;
}

}  // namespace dlpack
}  // namespace mxmoe

#endif  // MXMOE_DLPACK_H_
