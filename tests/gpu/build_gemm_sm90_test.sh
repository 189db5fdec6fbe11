#!/bin/bash
# Builds the standalone, statically linked SM90 grouped GEMM test + benchmark
# (tests/gpu/grouped_gemm_sm90_test.cu) into .gpu_pack/sm90/ for a GPU host without Bazel.
# Usage (from the repo root): tests/gpu/build_gemm_sm90_test.sh [outdir]
set -euo pipefail
OUT=${1:-.gpu_pack/sm90}
mkdir -p "$OUT" /tmp/sm90/obj
NVCC=(nice nvcc -std=c++17 -O3 -I. -Icc/include -gencode=arch=compute_90a,code=sm_90a
      -Xcompiler -fPIC)
OBJS=()
for src in cc/cuda/grouped_gemm_sm90.cu cc/cuda/grouped_gemm_sm90_n16.cu \
           cc/cuda/grouped_gemm_sm90_n32.cu cc/cuda/grouped_gemm_sm90_n64.cu \
           cc/cuda/grouped_gemm_sm90_n128.cu cc/cuda/grouped_gemm_sm90_heuristics.cu \
           cc/cuda/device.cu tests/gpu/grouped_gemm_sm90_test.cu; do
  obj=/tmp/sm90/obj/$(basename "$src").o
  if [ ! -f "$obj" ] || [ "$src" -nt "$obj" ] || [ -n "$(find cc/cuda cc/include -newer "$obj" -name '*.h*' -o -newer "$obj" -name '*.cuh' | head -1)" ]; then
    "${NVCC[@]}" -Xptxas -v -c "$src" -o "$obj" 2> "/tmp/sm90/obj/$(basename "$src").ptxas.txt" \
      || { cat "/tmp/sm90/obj/$(basename "$src").ptxas.txt"; exit 1; }
  fi
  OBJS+=("$obj")
done
for src in cc/base/status.cc cc/cpu/grouped_gemm.cc cc/cpu/panel_kernels.cc cc/cpu/parallel.cc; do
  obj=/tmp/sm90/obj/$(basename "$src").o
  nice g++ -std=c++17 -O2 -ffp-contract=off -pthread -I. -Icc/include -c "$src" -o "$obj"
  OBJS+=("$obj")
done
nice nvcc -gencode=arch=compute_90a,code=sm_90a -o "$OUT/grouped_gemm_sm90_test" "${OBJS[@]}" \
  -cudart static -lpthread
echo "built $OUT/grouped_gemm_sm90_test"
