#!/bin/bash
# Builds the standalone, statically linked quantizer building-block test
# (tests/gpu/quantize_lane_test.cu) for a GPU host without Bazel. tools/gpu/pack.sh calls every
# tests/gpu/build_*.sh with the pack's bin/ folder.
# Usage (from the repo root): tests/gpu/build_quantize_lane_test.sh [outdir]
set -euo pipefail
OUT=${1:-.gpu_pack/quant}
mkdir -p "$OUT"
nice nvcc -std=c++17 -O3 -I. -Icc/include -gencode=arch=compute_90a,code=sm_90a \
  -gencode=arch=compute_100a,code=sm_100a -cudart static \
  -o "$OUT/quantize_lane_test" tests/gpu/quantize_lane_test.cu
echo "built $OUT/quantize_lane_test"
