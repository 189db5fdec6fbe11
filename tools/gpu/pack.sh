#!/usr/bin/env bash
# Build-host half of the GPU workflow (docs/gpu-workflow.md): builds what a
# GPU host without Bazel needs and packs it into one small folder, .gpu_pack/pack (git-ignored).
#
#   tools/gpu/pack.sh [--no-bazel] [--tests GLOB] [PACK_DIR]
#
#   1. lib/libmxmoe.so: `bazel build --config=gpu_pack //cc:libmxmoe.so` (sm_90a + sm_100a code,
#      cudart static). --no-bazel (or no bazel on PATH) takes the fallback: nvcc + g++ directly,
#      over every cc/cuda/*.cu, or over MXMOE_PACK_CUDA_SOURCES (a space-separated list) when set,
#      e.g. to pack a library with one kernel family's stub while its real code does not build.
#   2. bin/: every tests/gpu/build_*.sh matching GLOB (default build_*.sh) builds its statically
#      linked C++ GPU test into bin/ (each script takes the output folder as its argument).
#   3. the Python package sources (mxmoe/*.py, mxmoe/_mxmoe_ext.cc: the nanobind module is
#      compiled on the GPU host against the host's own Python and nanobind), the public headers,
#      tests/gpu, bench/*.py, run.sh, and COMMIT (the commit, "-dirty" if the tree has changes).
# On the GPU host: `bash PACK_DIR/run.sh OUTDIR` (tools/gpu/run.sh).
# Exit code != 0 if the library or any C++ test failed to build (the rest is packed anyway).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${repo}"

use_bazel=1
tests_glob="build_*.sh"
pack=".gpu_pack/pack"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-bazel) use_bazel=0 ;;
    --tests) tests_glob="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) pack="$1" ;;
  esac
  shift
done
command -v bazel >/dev/null 2>&1 || use_bazel=0
failures=()

# TODO(quant): drop this fallback once `bazel build //cc:libmxmoe.so` is the only supported path.
# It compiles the same sources as //cc:core with the same per-file architecture rule as
# tools/bazel/cuda.bzl (*_sm90*.cu -> sm_90a, *_sm100*.cu -> sm_100a, others both).
build_library_without_bazel() {
  local obj=/tmp/mxmoe-pack-build
  local cutlass
  # CUTLASS headers come with the venv's nvidia-cutlass wheel.
  cutlass="$(ls -d "${repo}"/.venv/lib/python3*/site-packages/cutlass_library/source/include \
    2>/dev/null | head -1)"
  mkdir -p "${obj}"
  local objects=()
  for src in cc/base/*.cc cc/src/*.cc cc/cpu/*.cc; do
    local o="${obj}/$(echo "${src}" | tr / _).o"
    if [[ ! -f "${o}" || "${src}" -nt "${o}" ]]; then
      nice g++ -std=c++17 -O2 -fPIC -pthread -I. -Icc/include -I/usr/local/cuda/include \
        -c "${src}" -o "${o}" || return 1
    fi
    objects+=("${o}")
  done
  for src in ${MXMOE_PACK_CUDA_SOURCES:-cc/cuda/*.cu}; do
    local arch=(-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_100a,code=sm_100a)
    case "$(basename "${src}")" in
      *_sm90*) arch=(-gencode=arch=compute_90a,code=sm_90a) ;;
      *_sm100*) arch=(-gencode=arch=compute_100a,code=sm_100a) ;;
    esac
    local o="${obj}/$(basename "${src}").o"
    nice nvcc -std=c++17 -O3 -I. -Icc/include ${cutlass:+-I"${cutlass}"} "${arch[@]}" \
      -Xcompiler -fPIC -c "${src}" -o "${o}" || return 1
    objects+=("${o}")
  done
  rm -f "${obj}/libmxmoe.so"
  g++ -shared -o "${obj}/libmxmoe.so" "${objects[@]}" -L/usr/local/cuda/lib64 \
    -Wl,-Bstatic -lcudart_static -Wl,-Bdynamic -lpthread -ldl -lrt || return 1
  lib="${obj}/libmxmoe.so"
}

echo "== libmxmoe.so"
lib=""
if [[ ${use_bazel} -eq 1 ]]; then
  if nice bazel build --config=gpu_pack //cc:libmxmoe.so; then
    lib="${repo}/bazel-bin/cc/libmxmoe.so"
  else
    failures+=("bazel build //cc:libmxmoe.so")
  fi
else
  echo "(no bazel: building with nvcc + g++ directly)"
  build_library_without_bazel || failures+=("libmxmoe.so (fallback build)")
fi

rm -rf "${pack}"
mkdir -p "${pack}"/{lib,bin,mxmoe,include,tests/gpu,bench}
if [[ -n "${lib}" && -f "${lib}" ]]; then
  cp "${lib}" "${pack}/lib/libmxmoe.so"
  chmod u+w "${pack}/lib/libmxmoe.so"  # bazel-bin outputs are read-only
fi

echo "== C++ GPU tests (tests/gpu/${tests_glob})"
for script in tests/gpu/${tests_glob}; do
  [[ -f "${script}" ]] || continue
  echo "-- ${script}"
  bash "${script}" "${pack}/bin" || failures+=("${script}")
done

cp py/mxmoe/*.py py/mxmoe/_mxmoe_ext.cc "${pack}/mxmoe/"
cp -r cc/include/mxmoe "${pack}/include/"
cp tests/gpu/*.py "${pack}/tests/gpu/"
cp bench/*.py "${pack}/bench/"
cp tools/gpu/run.sh "${pack}/run.sh"
cp tools/gpu/perf_experiment.sh "${pack}/perf_experiment.sh"
commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
[[ -n "$(git status --porcelain 2>/dev/null | head -1)" ]] && commit="${commit}-dirty"
echo "${commit}" > "${pack}/COMMIT"
if [[ ${#failures[@]} -gt 0 ]]; then printf '%s\n' "${failures[@]}" > "${pack}/PACK_FAILURES"; fi

echo "== packed ${pack} ($(du -sh "${pack}" | cut -f1)), commit ${commit}"
ls -la "${pack}/lib" "${pack}/bin"
if [[ ${#failures[@]} -gt 0 ]]; then
  printf 'FAILED to build: %s\n' "${failures[@]}" >&2
  exit 1
fi
