#!/usr/bin/env bash
# Runs the CPU test suites under sanitizers (the .bazelrc configs asan and tsan):
#   1. C++ tests and the C API fuzzer's short run under ASan + UBSan, leaks checked;
#   2. the Python tests under ASan + UBSan: the extension module is instrumented, the ASan
#      runtime is preloaded into the (uninstrumented) interpreter, leak checking is off (CPython
#      and torch keep memory until exit by design);
#   3. the concurrency test under ThreadSanitizer.
# GPU tests skip as usual. Extra arguments go to every `bazel test` (e.g. --test_output=all).
# Usage: bash tools/sanitize.sh [asan|python|tsan]...   (default: all three)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

stages=("$@")
if [[ ${#stages[@]} -eq 0 ]]; then stages=(asan python tsan); fi
extra=()
for stage in "${stages[@]}"; do
  case "${stage}" in
    asan | python | tsan) ;;
    *) extra+=("${stage}") ;;
  esac
done

asan_runtime="$(gcc -print-file-name=libasan.so)"
if [[ ! -e "${asan_runtime}" ]]; then
  echo "sanitize.sh: gcc has no ASan runtime (${asan_runtime}); install libasan" >&2
  exit 1
fi
# libstdc++ is preloaded with the ASan runtime: loaded later (by torch or the extension), its
# __cxa_throw is not found by ASan's interceptor, and the first C++ exception thrown in the
# extension aborts with "CHECK failed: asan_interceptors.cpp ... real___cxa_throw".
stdcxx="$(realpath "$(gcc -print-file-name=libstdc++.so)")"

for stage in "${stages[@]}"; do
  start=${SECONDS}
  case "${stage}" in
    asan)
      bazel test --config=asan "${extra[@]}" -- //tests/cc/... //tests/fuzz/... \
        -//tests/cc:sm100_sass_check
      ;;
    python)
      # detect_leaks=0 for the interpreter; new_delete_type_mismatch=0 because torch's
      # uninstrumented operator delete pairs are not ours to judge.
      bazel test --config=asan "${extra[@]}" \
        --test_env=LD_PRELOAD="${asan_runtime}:${stdcxx}" \
        --test_env=ASAN_OPTIONS=detect_leaks=0:new_delete_type_mismatch=0:detect_odr_violation=0 \
        --test_env=MXMOE_SANITIZED=1 \
        -- //tests/python/...
      ;;
    tsan)
      bazel test --config=tsan "${extra[@]}" -- //tests/cc:concurrency_test
      ;;
    *) continue ;;
  esac
  echo "[mxmoe sanitize] ${stage}: $((SECONDS - start)) s" >&2
done
