#!/usr/bin/env bash
# Checks that built binaries carry sm_100a machine code for the sm100 MXFP4 grouped GEMM.
#
#   tests/cc/sm100_sass_check.sh FILE [FILE...]    (a shared library, object or executable)
#
# Passes when, across the given files:
#   1. `cuobjdump --list-elf` lists an sm_100a ELF;
#   2. that sm_100a code holds the CUTLASS block-scaled ptr-array grouped GEMM kernel with MXF4
#      operands for both outputs (bf16 and fp16), each at least 16 KiB of machine code, and the
#      per-expert setup kernel of both;
#   3. when nvdisasm is available: the GEMM kernels' SASS holds tensor-core MMA (UTC*MMA) and TMA
#      load (UTMALDG) instructions. Code built for plain sm_100 (no "a") has neither: the
#      tcgen05/TMA paths compile to traps there, yet the kernel is as large, so only the
#      instructions prove it. Without nvdisasm this check is reported as skipped.
# This proves the code is built for Blackwell, not that it runs: nothing here runs on a GPU, and
# no Blackwell GPU was available to run it.
#
# Tools are looked up in $CUOBJDUMP / $NVDISASM, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, then
# in the pip packages nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm (nvidia/cu*/bin) of python3;
# the CUDA 13 toolkit on the build host ships neither, so CI must pip-install them.
# Exit status 0 on success, 1 on a failed check, 2 on a usage or tool error.
set -euo pipefail

readonly kMinKernelBytes=16384

if [[ $# -lt 1 ]]; then
  echo "usage: $0 FILE [FILE...]" >&2
  exit 2
fi

find_tool() {  # find_tool <name> <override path or "">: prints an absolute path
  local name="$1" candidate
  for candidate in "$2" "$(command -v "${name}" 2>/dev/null || true)" \
      "${CUDA_HOME:+${CUDA_HOME}/bin/${name}}" "/usr/local/cuda/bin/${name}"; do
    if [[ -n "${candidate}" && -x "${candidate}" ]]; then
      # Absolute, so it stays valid as a PATH entry for cuobjdump (Bazel passes runfiles paths).
      echo "$(cd "$(dirname "${candidate}")" && pwd)/$(basename "${candidate}")"
      return 0
    fi
  done
  local python
  for python in "${PYTHON:-}" python3; do
    [[ -n "${python}" ]] && command -v "${python}" >/dev/null 2>&1 || continue
    candidate="$("${python}" - "${name}" <<'EOF' 2>/dev/null || true
import glob, os, sys
for entry in sys.path:
    for path in sorted(glob.glob(os.path.join(entry or ".", "nvidia", "cu*", "bin", sys.argv[1]))):
        if os.access(path, os.X_OK):
            print(path)
            raise SystemExit
EOF
)"
    if [[ -n "${candidate}" ]]; then
      echo "${candidate}"
      return 0
    fi
  done
  return 1
}

if ! cuobjdump="$(find_tool cuobjdump "${CUOBJDUMP:-}")"; then
  echo "sm100_sass_check: cuobjdump not found (set CUOBJDUMP, or pip install" \
       "nvidia-cuda-cuobjdump)" >&2
  exit 2
fi
nvdisasm="$(find_tool nvdisasm "${NVDISASM:-}" || true)"

passed=0
failed=0
check() {  # check <ok 0/1> <message>
  if [[ "$1" == 1 ]]; then
    passed=$((passed + 1))
    echo "ok: $2"
  else
    failed=$((failed + 1))
    echo "FAILED: $2"
  fi
}

listing=""
sections=""
for file in "$@"; do
  if [[ ! -f "${file}" ]]; then
    echo "sm100_sass_check: no such file: ${file}" >&2
    exit 2
  fi
  # A file without device code makes cuobjdump fail; that is a failed check, not a tool error.
  listing+="$("${cuobjdump}" --list-elf "${file}" 2>&1 || true)"$'\n'
  # One line per .text section of sm_100a ELFs: "<size, hex> <section name>" (POSIX awk: no
  # strtonum, so bash converts the hex below).
  sections+="$("${cuobjdump}" -elf "${file}" 2>/dev/null | awk '
    /^arch = / { arch = $3 }
    $6 == "PROGBITS" && $NF ~ /^\.text\./ && arch == "sm_100a" { print $3, $NF }' ||
    true)"$'\n'
done

has_sm100a=0
grep -q 'sm_100a' <<<"${listing}" && has_sm100a=1
check "${has_sm100a}" "cuobjdump --list-elf shows sm_100a code in: $*"

kernel_size() {  # kernel_size <grep -E pattern>: largest .text size (bytes) among matches
  local hex name best=""
  while read -r hex name; do
    [[ -n "${name}" && "${name}" =~ $1 ]] || continue
    if [[ -z "${best}" || $((16#${hex})) -gt ${best} ]]; then best=$((16#${hex})); fi
  done <<<"${sections}"
  echo "${best}"
}

gemm='GemmUniversal.*MainloopSm100ArrayTmaUmmaWarpSpecializedBlockScaled.*SM100_MMA_MXF4'
for output in bfloat16_t half_t; do
  size="$(kernel_size "${gemm}.*[0-9]${output}E")"
  ok=0
  [[ -n "${size}" && "${size}" -ge ${kMinKernelBytes} ]] && ok=1
  message="sm_100a MXF4 grouped GEMM kernel, ${output} output: ${size:-absent} bytes"
  check "${ok}" "${message} (need >= ${kMinKernelBytes})"
  size="$(kernel_size "WriteExpertArraysKernel.*GroupedGemmSm100Config.*${output}")"
  ok=0
  [[ -n "${size}" && "${size}" -gt 0 ]] && ok=1
  check "${ok}" "sm_100a per-expert setup kernel (${output}): ${size:-absent} bytes"
done

# SASS instructions of the GEMM kernels (cuobjdump -sass runs nvdisasm).
if [[ -n "${nvdisasm}" ]]; then
  sass=""
  for file in "$@"; do
    sass+="$(PATH="$(dirname "${nvdisasm}"):${PATH}" NVDISASM_PATH="$(dirname "${nvdisasm}")" \
      "${cuobjdump}" -sass -arch sm_100a "${file}" 2>/dev/null | awk -v pattern="${gemm}" '
        /Function : / { in_gemm = ($0 ~ pattern) }
        in_gemm' || true)"$'\n'
  done
  mma="$(grep -cE 'UTC[A-Z]*MMA' <<<"${sass}" || true)"
  tma="$(grep -cE 'UTMALDG' <<<"${sass}" || true)"
  ok=0
  [[ "${mma}" -ge 2 && "${tma}" -ge 2 ]] && ok=1
  check "${ok}" "GEMM SASS has tensor-core MMA (${mma} UTC*MMA lines), TMA loads (${tma} UTMALDG)"
else
  echo "skipped: SASS instruction check (nvdisasm not found; pip install nvidia-cuda-nvdisasm)"
fi

echo "${passed} passed, ${failed} failed"
[[ "${failed}" == 0 ]]
