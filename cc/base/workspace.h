// Workspace carving: a bump allocator that cuts a caller-provided buffer into named, 256-byte
// aligned slices. The same code both measures (the *_workspace_size queries) and carves (the
// operation itself), so the two cannot disagree. Header-only and free of CUDA types, so host
// code for any backend can use it; it never allocates and never touches the bytes it hands out.
//
// Alignment is of absolute addresses, not of offsets: a caller's buffer need not be aligned. The
// measured size therefore includes kWorkspaceAlignment - 1 bytes of slack for aligning the base.
//
//   WorkspaceCarver measure;                          // measuring: no buffer
//   measure.Carve<float>("logits", t * e, nullptr);   // only counts
//   size_t bytes = measure.RequiredBytes();
//
//   WorkspaceCarver carver(workspace, workspace_bytes);
//   float* logits;
//   MXMOE_RETURN_IF_ERROR(carver.Carve("logits", t * e, &logits));
#ifndef MXMOE_BASE_WORKSPACE_H_
#define MXMOE_BASE_WORKSPACE_H_

#include <stddef.h>
#include <stdint.h>

#include <limits>

#include "cc/base/status.h"
#include "mxmoe/mxmoe.h"

namespace mxmoe {

constexpr size_t kWorkspaceAlignment = 256;

class WorkspaceCarver {
 public:
  // Measuring mode: Carve() only adds up sizes; pointers come back as nullptr.
  WorkspaceCarver() : measuring_(true) {}
  // Carving mode over [base, base + capacity).
  WorkspaceCarver(void* base, size_t capacity)
      : measuring_(false),
        next_(reinterpret_cast<uintptr_t>(base)),
        end_(reinterpret_cast<uintptr_t>(base) + capacity),
        base_(reinterpret_cast<uintptr_t>(base)) {}

  // Takes `count` elements of T as the slice `name`. Fails with WORKSPACE_TOO_SMALL (naming the
  // slice, its size and what is left) when the buffer is exhausted, or INVALID_ARGUMENT when
  // the size overflows. `out` may be nullptr when measuring.
  template <typename T>
  mxmoe_status Carve(const char* name, size_t count, T** out) {
    if (count > std::numeric_limits<size_t>::max() / sizeof(T) / 2) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "workspace slice '", name, "' of ", count,
                  " elements of ", sizeof(T), " bytes overflows size_t");
    }
    const size_t bytes = count * sizeof(T);
    if (measuring_ || bytes == 0) {  // an empty slice takes no space and has no address
      measured_ += RoundUp(bytes);
      if (out != nullptr) *out = nullptr;
      return MXMOE_STATUS_OK;
    }
    const uintptr_t start = (next_ + kWorkspaceAlignment - 1) & ~(kWorkspaceAlignment - 1);
    if (start < next_ || start > end_ || end_ - start < bytes) {
      const size_t left = start <= end_ ? end_ - start : 0;
      return Fail(MXMOE_STATUS_WORKSPACE_TOO_SMALL, "workspace too small for slice '", name,
                  "': it needs ", bytes, " bytes at offset ", start - base_, ", only ", left,
                  " of ", end_ - base_, " bytes are left");
    }
    next_ = start + bytes;
    *out = reinterpret_cast<T*>(start);
    return MXMOE_STATUS_OK;
  }

  // Bytes a buffer of any alignment must have to hold every slice measured so far.
  size_t RequiredBytes() const {
    return measured_ == 0 ? 0 : measured_ + kWorkspaceAlignment - 1;
  }

 private:
  static size_t RoundUp(size_t bytes) {
    return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
  }

  bool measuring_;
  size_t measured_ = 0;
  uintptr_t next_ = 0;
  uintptr_t end_ = 0;
  uintptr_t base_ = 0;
};

}  // namespace mxmoe

#endif  // MXMOE_BASE_WORKSPACE_H_
