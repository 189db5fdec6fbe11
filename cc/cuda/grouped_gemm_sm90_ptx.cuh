// PTX wrappers shared by the SM90 kernels (sm_90a device code): shared-memory addresses,
// mbarriers and the 1-D bulk copy (TMA) from global to shared memory. The WGMMA GEMM
// (grouped_gemm_sm90_kernel.cuh) and the CUDA-core GEMV (grouped_gemm_sm90_gemv.cu) use them.
#ifndef MXMOE_CUDA_SM90_PTX_CUH_
#define MXMOE_CUDA_SM90_PTX_CUH_

#include <stdint.h>

namespace mxmoe {
namespace cuda {
namespace sm90 {

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

// Makes mbarrier initialisation visible to the async proxy (bulk copies), before a CTA barrier.
__device__ __forceinline__ void FenceMbarInit() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

}  // namespace sm90
}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_SM90_PTX_CUH_
