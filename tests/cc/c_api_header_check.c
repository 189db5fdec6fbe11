/* mxmoe.h must compile as C (C99, -Wall -Wextra -Werror -pedantic) and link from C: a C program
 * touching every public type and calling a few entry points. Exit code 0 on success.
 * Not a *_test.cc, so it needs its own cc_test target (see the BUILD file). */
#include <stdio.h>
#include <string.h>

#include "mxmoe/mxmoe.h"

int main(void) {
  mxmoe_device cpu;
  mxmoe_backend backend = MXMOE_BACKEND_AUTO;
  mxmoe_quantize_args quantize;
  mxmoe_dequantize_args dequantize;
  mxmoe_experts_quantize_args experts;
  mxmoe_silu_mul_experts_quantize_args silu;
  mxmoe_swizzle_scales_args swizzle;
  mxmoe_quantize_weights_args weights;
  mxmoe_expert_weights expert_weights;
  mxmoe_prepare_weights_args prepare;
  mxmoe_grouped_gemm_args gemm;
  mxmoe_moe_forward_args moe;
  mxmoe_status status;
  size_t bytes = 0;
  unsigned short input[32];
  unsigned char packed[16];
  unsigned char scales[1];

  memset(&dequantize, 0, sizeof(dequantize));
  memset(&experts, 0, sizeof(experts));
  memset(&silu, 0, sizeof(silu));
  memset(&swizzle, 0, sizeof(swizzle));
  memset(&weights, 0, sizeof(weights));
  memset(&expert_weights, 0, sizeof(expert_weights));
  memset(&prepare, 0, sizeof(prepare));
  memset(&gemm, 0, sizeof(gemm));
  memset(&moe, 0, sizeof(moe));
  memset(input, 0, sizeof(input));

  cpu.type = MXMOE_DEVICE_CPU;
  cpu.id = 0;
  status = mxmoe_backend_for_device(cpu, &backend);
  if (status != MXMOE_STATUS_OK || backend != MXMOE_BACKEND_CPU) {
    fprintf(stderr, "backend_for_device: %s\n", mxmoe_last_error());
    return 1;
  }
  quantize.rows = 1;
  quantize.k = 32;
  quantize.input = input;
  quantize.input_dtype = MXMOE_DTYPE_BF16;
  quantize.packed = packed;
  quantize.scales = scales;
  quantize.scale_layout = MXMOE_SCALE_LAYOUT_LINEAR;
  quantize.device = cpu;
  if (mxmoe_quantize(&quantize, NULL) != MXMOE_STATUS_OK) {
    fprintf(stderr, "quantize: %s\n", mxmoe_last_error());
    return 1;
  }
  quantize.k = 31;
  if (mxmoe_quantize(&quantize, NULL) != MXMOE_STATUS_INVALID_ARGUMENT ||
      strstr(mxmoe_last_error(), "got 31") == NULL) {
    fprintf(stderr, "quantize with k = 31 should fail: %s\n", mxmoe_last_error());
    return 1;
  }
  if (mxmoe_moe_forward_workspace_size(NULL, &bytes) != MXMOE_STATUS_INVALID_ARGUMENT) return 1;
  (void)expert_weights;
  printf("mxmoe %s from C: %s, %d CUDA device(s)\n", mxmoe_version(),
         mxmoe_backend_name(backend), (int)mxmoe_cuda_device_count());
  printf("%s\n", mxmoe_status_string(MXMOE_STATUS_MISALIGNED));
  return 0;
}
