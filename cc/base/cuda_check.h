// CUDA-side status helper: turns a failed CUDA runtime call into MXMOE_STATUS_CUDA_ERROR with the
// call, the error name and the location in the last-error message.
#ifndef MXMOE_BASE_CUDA_CHECK_H_
#define MXMOE_BASE_CUDA_CHECK_H_

#include <cuda_runtime.h>

#include "cc/base/status.h"

#define MXMOE_CUDA_RETURN_IF_ERROR(expr)                                                     \
  do {                                                                                       \
    const cudaError_t mxmoe_cuda_err_ = (expr);                                              \
    if (mxmoe_cuda_err_ != cudaSuccess) {                                                    \
      return ::mxmoe::Fail(MXMOE_STATUS_CUDA_ERROR, #expr " failed: ",                      \
                           cudaGetErrorName(mxmoe_cuda_err_), " (", __FILE__, ":", __LINE__, \
                           ")");                                                             \
    }                                                                                        \
  } while (0)

// After a kernel launch: catches launch-configuration errors without synchronising.
#define MXMOE_CUDA_RETURN_IF_LAUNCH_ERROR() MXMOE_CUDA_RETURN_IF_ERROR(cudaGetLastError())

#endif  // MXMOE_BASE_CUDA_CHECK_H_
