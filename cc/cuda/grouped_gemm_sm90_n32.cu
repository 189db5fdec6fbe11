// Explicit instantiation of the SM90 grouped GEMM kernel for a token tile of 32 (own file so that
// a build recompiles only what changed).
#include "cc/cuda/grouped_gemm_sm90_kernel.cuh"

namespace mxmoe {
namespace cuda {
namespace sm90 {

template mxmoe_status LaunchGemmKernelN<32>(const GemmKernelLaunch& launch, cudaStream_t stream);

}  // namespace sm90
}  // namespace cuda
}  // namespace mxmoe
