// Programmatic dependent launch (PDL) for the kernel chain of a MoE layer (routing, metadata,
// the quantize steps, the GEMMs, the weighted reduce): each kernel is launched with programmatic
// stream serialization, so the hardware may start its CTAs while the kernel before it in the
// stream is still running (inside CUDA graphs too). That hides the launch and CTA-dispatch
// latency of one kernel behind the tail of the previous one, which is most of the time of a
// small-T layer (docs/perf-notes.md, "Programmatic dependent launch across the layer").
//
// The contract every kernel launched through LaunchPdl keeps, at the top of the kernel:
//   PdlWait();              // griddepcontrol.wait
//   PdlLaunchDependents();  // griddepcontrol.launch_dependents
// - PdlWait runs in every CTA before its first global-memory access of data an earlier kernel
//   writes or reads (reads and writes alike: a write before it could race with the previous
//   kernel's reads). It returns once every prerequisite grid has completed and its writes are
//   visible. Since every CTA waits before it exits, this grid's completion implies its
//   prerequisites' completion: the chain is transitive.
// - PdlLaunchDependents comes only after PdlWait. Once every CTA of this grid has issued it (or
//   exited), the next kernel's CTAs may be dispatched and sit in their own PdlWait. Issued after
//   the wait, it keeps one more guarantee: when a kernel starts, everything before its
//   immediate predecessor has completed, so a kernel may read before its wait what only
//   earlier kernels wrote (the sm90 WGMMA GEMM reads the expert offsets and the weights there;
//   only its activations come from the kernel right before it; the CUDA-core GEMM does the same
//   only when the MoE chain says the kernel before it is one of the chain's, GemmChain in
//   grouped_gemm.h).
// A kernel launched without the attribute (MXMOE_PDL=0, or after something that is not a
// kernel) is serialized as usual; both instructions are then no-ops.
#ifndef MXMOE_CUDA_PDL_CUH_
#define MXMOE_CUDA_PDL_CUH_

#include <cuda_runtime.h>
#include <stdlib.h>

namespace mxmoe {
namespace cuda {

__device__ __forceinline__ void PdlWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void PdlLaunchDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether kernels are launched with programmatic stream serialization: yes unless MXMOE_PDL=0
// (an A/B knob for benchmarks and tests; read per launch, like the other MXMOE_* knobs).
inline bool PdlEnabled() {
  const char* env = getenv("MXMOE_PDL");
  return env == nullptr || atoi(env) != 0;
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization
// (unless MXMOE_PDL=0). The kernel must keep the contract above.
template <typename... Params, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = PdlEnabled() ? 1 : 0;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Args&&>(args)...);
}

}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_PDL_CUH_
