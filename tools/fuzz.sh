#!/usr/bin/env bash
# Long fuzz campaigns, for developers and the GPU host's build machine (the CI runs only the
# 10-second standalone run of //tests/fuzz:c_api_fuzz_test):
#   1. the C API fuzzer (tests/fuzz/c_api_fuzzer.cc) built with clang's libFuzzer, ASan and UBSan
#      against the library's C++ sources (the CUDA kernels come from Bazel's nvcc build, linked
#      uninstrumented), one coverage-guided campaign per entry point;
#   2. the checkpoint fuzzer (tests/python/test_checkpoint_hostile.py) for the same time.
# New corpus entries go to $OUT/corpus-<target>/ (merge the interesting ones into
# tests/fuzz/corpus/ by hand; keep it small), findings to $OUT/crash-* with the log.
#
#   bash tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      (default 600 s, every target)
#   OUT=/tmp/fuzz nice -n 19 bash tools/fuzz.sh 600 grouped_gemm moe_forward
#
# Needs clang with libFuzzer (Debian: clang-14 libclang-rt-14-dev; installed with apt-get when
# missing and running as root) and nvcc: the script builds the three kernel archives of
# //cc/cuda with Bazel.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds="${1:-600}"
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  targets=(quantize dequantize experts_quantize silu_mul_experts_quantize swizzle_scales
           unswizzle_scales quantize_weights prepare_weights grouped_gemm moe_forward misc)
fi
out="${OUT:-/tmp/mxmoe-fuzz}"
mkdir -p "${out}"

clangxx="$(command -v clang++-14 || command -v clang++ || true)"
if [[ -z "${clangxx}" ]] || ! echo 'int main(){}' | "${clangxx}" -x c++ -fsanitize=fuzzer \
    -o /dev/null - 2>/dev/null; then
  if [[ "$(id -u)" == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-14 \
      libclang-rt-14-dev >/dev/null
    clangxx=clang++-14
  else
    echo "fuzz.sh: needs clang++ with libFuzzer (apt-get install clang-14 libclang-rt-14-dev)" >&2
    exit 1
  fi
fi

# //cc/cuda:kernels is a cc_library over the three per-architecture archives
# (tools/bazel/cuda.bzl) and has no default outputs of its own: build the archives by name.
bazel build //cc/cuda:kernels_all_archs //cc/cuda:kernels_sm90 //cc/cuda:kernels_sm100 >&2
bin_dir="$(bazel info bazel-bin 2>/dev/null)"
kernels=("${bin_dir}"/cc/cuda/libkernels_{all_archs,sm90,sm100}_cuda.a)
for archive in "${kernels[@]}"; do
  [[ -f "${archive}" ]] || { echo "fuzz.sh: ${archive} was not built" >&2; exit 1; }
done
cuda="${CUDA_PATH:-/usr/local/cuda}"
binary="${out}/c_api_libfuzzer"
flags=(-std=c++17 -O1 -g -fno-omit-frame-pointer -ffp-contract=off -I. -Icc/include
       -I"${cuda}/include" -fsanitize=address,undefined -fno-sanitize-recover=all)
echo "[fuzz] building ${binary} with ${clangxx}" >&2
"${clangxx}" "${flags[@]}" -fsanitize=fuzzer -DMXMOE_LIBFUZZER tests/fuzz/c_api_fuzzer.cc \
  cc/base/*.cc cc/src/*.cc cc/cpu/*.cc -Wl,--whole-archive "${kernels[@]}" -Wl,--no-whole-archive \
  "${cuda}/lib64/libcudart_static.a" -ldl -lrt -lpthread -o "${binary}"

status=0
for target in "${targets[@]}"; do
  corpus="${out}/corpus-${target}"
  mkdir -p "${corpus}"
  echo "[fuzz] ${target}: ${seconds} s" >&2
  # 30 s per call: a loaded machine (nice -n 19 beside builds) once made 1 MiB calls take >10 s.
  if ! MXMOE_FUZZ_TARGET="${target}" MXMOE_FUZZ_CALL_SECONDS=30 "${binary}" \
      -max_total_time="${seconds}" -timeout=30 \
      -rss_limit_mb=4096 -max_len=512 -print_final_stats=1 -artifact_prefix="${out}/crash-${target}-" \
      "${corpus}" tests/fuzz/corpus > "${out}/${target}.log" 2>&1; then
    echo "[fuzz] ${target}: FINDING, see ${out}/${target}.log" >&2
    status=1
  fi
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)|cov: " "${out}/${target}.log" | tail -3 >&2
done

echo "[fuzz] checkpoint fuzzer: ${seconds} s" >&2
if ! MXMOE_FUZZ_SECONDS="${seconds}" bazel test //tests/python:test_checkpoint_hostile \
    --test_env=MXMOE_FUZZ_SECONDS="${seconds}" --test_timeout=$((seconds + 300)) \
    --test_output=errors --cache_test_results=no > "${out}/checkpoint.log" 2>&1; then
  echo "[fuzz] checkpoint: FINDING, see ${out}/checkpoint.log" >&2
  status=1
fi
exit "${status}"
