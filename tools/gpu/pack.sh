#!/usr/bin/env bash
# Build-host half of the GPU workflow (docs/gpu-workflow.md): builds with Bazel what a GPU host
# without Bazel needs and packs it into one small folder, .gpu_pack/pack (git-ignored).
#
#   tools/gpu/pack.sh [PACK_DIR]
#
#   1. `bazel build --config=gpu_pack //cc:libmxmoe.so //tests/gpu:gpu_programs` (sm_90a +
#      sm_100a code, cudart static, the core's flags everywhere). There is no other build recipe:
#      without Bazel this script fails.
#   2. lib/libmxmoe.so.<major>: the shared library under its SONAME (a plain file: the pack
#      travels without symlinks; run.sh links the module with -l:libmxmoe.so.<major>).
#   3. bin/: the statically linked C++ GPU programs of //tests/gpu:gpu_programs (the C++ GPU
#      tests and the CUDA example), run by run.sh's cctest and sanitizer stages.
#   4. the Python package sources (mxmoe/*.py and its subpackages, mxmoe/_mxmoe_ext.cc: the nanobind module is
#      compiled on the GPU host against the host's own Python and nanobind), the public headers,
#      tests/gpu, bench/*.py and bench/peers/*.py, run.sh, and COMMIT (the commit, "-dirty" if
#      the tree has changes).
# On the GPU host: `bash PACK_DIR/run.sh OUTDIR` (tools/gpu/run.sh).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${repo}"

pack=".gpu_pack/pack"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "pack.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) pack="$1" ;;
  esac
  shift
done
command -v bazel >/dev/null 2>&1 \
  || { echo "pack.sh: bazel not found; run tools/setup.sh (the pack is built by Bazel only)" >&2;
       exit 1; }

echo "== bazel build --config=gpu_pack //cc:libmxmoe.so //tests/gpu:gpu_programs"
nice bazel build --config=gpu_pack //cc:libmxmoe.so //tests/gpu:gpu_programs
bin_dir="$(bazel info --config=gpu_pack bazel-bin 2>/dev/null)"
soname="$(readelf -d "${bin_dir}/cc/libmxmoe.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')"
[[ -n "${soname}" ]] || { echo "pack.sh: libmxmoe.so has no SONAME" >&2; exit 1; }
# //tests/gpu:gpu_programs lists cc_binary / cc_test targets; each one's program is
# bazel-bin/<package>/<name>.
programs="$(bazel query --noshow_progress \
  'kind("cc_binary|cc_test", deps(//tests/gpu:gpu_programs, 1))' 2>/dev/null \
  | sed -e 's#^//##' -e 's#:#/#')"
[[ -n "${programs}" ]] || { echo "pack.sh: //tests/gpu:gpu_programs lists no programs" >&2; exit 1; }

rm -rf "${pack}"
mkdir -p "${pack}"/{lib,bin,mxmoe,include,tests/gpu,bench/peers}
cp "${bin_dir}/cc/libmxmoe.so" "${pack}/lib/${soname}"
for program in ${programs}; do
  cp "${bin_dir}/${program}" "${pack}/bin/"
done
cp py/mxmoe/*.py py/mxmoe/_mxmoe_ext.cc "${pack}/mxmoe/"
for sub in py/mxmoe/*/; do  # subpackages (mxmoe.integrations)
  [[ -f "${sub}__init__.py" ]] || continue
  mkdir -p "${pack}/mxmoe/$(basename "${sub}")"
  cp "${sub}"*.py "${pack}/mxmoe/$(basename "${sub}")/"
done
cp -r cc/include/mxmoe "${pack}/include/"
cp tests/gpu/*.py "${pack}/tests/gpu/"
cp bench/*.py "${pack}/bench/"
cp bench/peers/*.py "${pack}/bench/peers/"
cp tools/gpu/run.sh "${pack}/run.sh"
cp tools/gpu/perf_experiment.sh "${pack}/perf_experiment.sh"
chmod -R u+w "${pack}"  # bazel-bin outputs are read-only
commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
[[ -n "$(git status --porcelain 2>/dev/null | head -1)" ]] && commit="${commit}-dirty"
echo "${commit}" > "${pack}/COMMIT"

echo "== packed ${pack} ($(du -sh "${pack}" | cut -f1)), commit ${commit}"
ls -la "${pack}/lib" "${pack}/bin"
