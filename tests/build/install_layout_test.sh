#!/usr/bin/env bash
# The install layout (//:install) used the way a C/C++ project outside Bazel uses it: unpacked
# under a fresh prefix, the examples are built with plain CMake (find_package(mxmoe) ->
# mxmoe::mxmoe) and with g++ $(pkg-config --cflags --libs mxmoe), and run.
# Arguments: the install tarball, examples/CMakeLists.txt, moe_serving_example.cc,
# moe_cuda_example.cc.
set -euo pipefail
tarball="$1" cmakelists="$2" serving_src="$3" cuda_src="$4"

fail() { echo "FAIL: $*" >&2; exit 1; }
for tool in cmake pkg-config g++ readelf; do
  command -v "${tool}" >/dev/null || fail "${tool} is not installed (tools/setup.sh installs it)"
done

work="${TEST_TMPDIR:-$(mktemp -d)}"
prefix="${work}/prefix with space"
rm -rf "${work}/prefix with space" "${work}/project" "${work}/build"
mkdir -p "${prefix}"
tar -xf "${tarball}" -C "${prefix}"

# The layout itself.
for f in include/mxmoe/mxmoe.h include/mxmoe/format.h include/mxmoe/dlpack.h \
         lib/pkgconfig/mxmoe.pc lib/cmake/mxmoe/mxmoeConfig.cmake \
         lib/cmake/mxmoe/mxmoeConfigVersion.cmake; do
  [[ -f "${prefix}/${f}" ]] || fail "missing ${f}"
done
real="$(cd "${prefix}/lib" && ls libmxmoe.so.*.*.*)"
soname="$(readelf -d "${prefix}/lib/${real}" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')"
[[ "$(readlink "${prefix}/lib/${soname}")" == "${real}" ]] || fail "${soname} -> ${real} missing"
[[ "$(readlink "${prefix}/lib/libmxmoe.so")" == "${soname}" ]] || fail "libmxmoe.so -> ${soname}"

# A project directory outside the repository, as a consumer would have it.
mkdir -p "${work}/project"
cp "${cmakelists}" "${serving_src}" "${cuda_src}" "${work}/project/"

echo "-- pkg-config"
# The prefix has a space: pkg-config escapes it, so the flags go through word splitting intact
# only with eval.
export PKG_CONFIG_PATH="${prefix}/lib/pkgconfig"
flags="$(pkg-config --cflags --libs mxmoe)"
echo "pkg-config --cflags --libs mxmoe: ${flags}"
[[ "$(pkg-config --modversion mxmoe)" == "${real#libmxmoe.so.}" ]] || fail "pkg-config version"
eval "g++ -std=c++17 -O1 -o '${work}/serving_pc' '${work}/project/moe_serving_example.cc' ${flags}"
LD_LIBRARY_PATH="${prefix}/lib" "${work}/serving_pc" | tee "${work}/serving_pc.log"
tail -n 1 "${work}/serving_pc.log" | grep -qx OK || fail "pkg-config build did not print OK"
readelf -d "${work}/serving_pc" | grep -q "NEEDED.*\[${soname}\]" || fail "not linked to ${soname}"

echo "-- cmake"
cmake -S "${work}/project" -B "${work}/build" -DCMAKE_PREFIX_PATH="${prefix}" \
  -DCMAKE_BUILD_TYPE=Release > "${work}/cmake.log" 2>&1 || { cat "${work}/cmake.log"; fail "cmake"; }
cmake --build "${work}/build" -j 2 > "${work}/build.log" 2>&1 || { cat "${work}/build.log"; fail "build"; }
# CMake's build tree RPATH points at the prefix: no LD_LIBRARY_PATH needed.
"${work}/build/moe_serving_example" | tee "${work}/serving_cmake.log"
tail -n 1 "${work}/serving_cmake.log" | grep -qx OK || fail "CMake build did not print OK"
if [[ -x "${work}/build/moe_cuda_example" ]]; then
  "${work}/build/moe_cuda_example" | tee "${work}/cuda_cmake.log"
  grep -qE "^(OK|moe_cuda_example: skipped: )" "${work}/cuda_cmake.log" || fail "moe_cuda_example"
else
  echo "(CMake found no CUDA toolkit: moe_cuda_example not built)"
fi
echo "PASS: install layout builds and runs the examples with CMake and pkg-config"
