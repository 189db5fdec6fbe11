#!/usr/bin/env bash
# GPU-host half of the GPU workflow (docs/gpu-workflow.md). Run it from the
# folder tools/gpu/pack.sh made (it is copied there as run.sh); it needs python3 with torch,
# pytest and nanobind, g++, and compute-sanitizer (CUDA toolkit) - no Bazel, no network.
#
#   bash run.sh OUTDIR [--only STAGES] [--pytest PATHS] [--sanitize PATHS] [--cctest NAMES]
#                      [--bench SCRIPTS] [--bench-args ARGS]
#
# Stages, in order (--only takes a comma list of them; default all):
#   build      compile the nanobind module mxmoe/_mxmoe*.so against lib/libmxmoe.so.N with g++,
#              this host's nanobind (python3 -m nanobind --include_dir) and Python headers
#   pytest     python3 -m pytest PATHS (default tests/gpu) -> pytest.log, pytest.xml (junit)
#   cctest     every C++ GPU test in bin/ (or NAMES) -> cctest.log
#   memcheck   compute-sanitizer --tool memcheck over pytest PATHS (default: the pytest paths)
#   racecheck  and --tool racecheck, and
#   synccheck  --tool synccheck, all with MXMOE_GPU_TEST_QUICK=1 (small shapes) and the
#              torch caching allocator off (so every tensor is its own allocation), then over
#              each C++ test in quick mode -> memcheck.log, racecheck.log, synccheck.log
#   bench      python3 SCRIPT --out OUTDIR [ARGS] for each SCRIPT (default bench/bench_*.py);
#              each writes OUTDIR/<gpu>-<suite>.json -> bench_<name>.log
# Every stage's log goes to OUTDIR; a summary table (also OUTDIR/summary.txt) is printed LAST.
# Exit code: 0 only if every stage that ran passed. A stage is killed after MXMOE_TIMEOUT_<STAGE>
# seconds (e.g. MXMOE_TIMEOUT_PYTEST, MXMOE_TIMEOUT_BENCH_QUANTIZE), else MXMOE_STAGE_TIMEOUT
# (default 1800).
set -uo pipefail

pack="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ $# -lt 1 || "$1" == -* ]]; then
  sed -n '2,24p' "$0"
  exit 2
fi
mkdir -p "$1"
out="$(cd "$1" && pwd)"
shift
stages="build,pytest,cctest,memcheck,racecheck,synccheck,bench"
pytest_paths="tests/gpu"
sanitize_paths=""
cctests=""
benches=""
bench_args=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --only) stages="$2"; shift ;;
    --pytest) pytest_paths="$2"; shift ;;
    --sanitize) sanitize_paths="$2"; shift ;;
    --cctest) cctests="$2"; shift ;;
    --bench) benches="$2"; shift ;;
    --bench-args) bench_args="$2"; shift ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
sanitize_paths="${sanitize_paths:-${pytest_paths}}"
if [[ -z "${cctests}" ]]; then
  cctests="$(cd "${pack}/bin" 2>/dev/null && ls 2>/dev/null | tr '\n' ' ')"
fi
benches="${benches:-$(cd "${pack}" && ls bench/bench_*.py 2>/dev/null | tr '\n' ' ')}"

cd "${pack}"
python="${PYTHON:-python3}"
timeout_s="${MXMOE_STAGE_TIMEOUT:-1800}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="${pack}${PYTHONPATH:+:${PYTHONPATH}}"
export LD_LIBRARY_PATH="${pack}/lib${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"
export MXMOE_COMMIT="$(cat "${pack}/COMMIT" 2>/dev/null || echo unknown)"

names=()
results=()
seconds=()
notes=()

wants() { [[ ",${stages}," == *",$1,"* ]]; }

record() {  # name rc seconds note
  names+=("$1")
  if [[ "$2" -eq 0 ]]; then results+=("PASS"); elif [[ "$2" -eq 124 ]]; then results+=("TIMEOUT");
  else results+=("FAIL(rc=$2)"); fi
  seconds+=("$3")
  notes+=("$4")
}

# stage NAME LOG NOTE_CMD -- COMMAND...: runs COMMAND with output to LOG, records the result.
stage() {
  local name="$1" log="$2"
  shift 2
  echo "== ${name} (log: ${log})"
  local t0=${SECONDS}
  local limit_var="MXMOE_TIMEOUT_${name^^}"
  local limit="${!limit_var:-${timeout_s}}"
  timeout --kill-after=10 "${limit}" "$@" >>"${log}" 2>&1
  local rc=$?
  tail -n 4 "${log}" | sed 's/^/   | /'
  record "${name}" "${rc}" $((SECONDS - t0)) "$(last_summary_line "${log}")"
  return "${rc}"
}

# The last line that looks like a test-runner or benchmark verdict, for the table.
last_summary_line() {
  local pattern="^mxmoe |passed|failed|skipped|error|ERROR SUMMARY|RACECHECK SUMMARY|goal|wrote"
  grep -E "${pattern}|built|Error" "$1" 2>/dev/null | tail -n 1 | cut -c1-90
}

build_module() {
  set -e
  local nb_inc py_inc suffix soname
  # The pack holds the library under its SONAME only (libmxmoe.so.<major>, no symlinks).
  soname="$(cd lib && ls libmxmoe.so.* | head -n 1)"
  [[ -n "${soname}" ]] || { echo "no lib/libmxmoe.so.* in the pack"; return 1; }
  nb_inc="$("${python}" -m nanobind --include_dir)"
  py_inc="$("${python}" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  suffix="$("${python}" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
  local flags=(-std=c++17 -O2 -fPIC -fvisibility=hidden -fno-strict-aliasing -DNDEBUG
               -I"${py_inc}" -I"${nb_inc}" -I"${nb_inc}/../ext/robin_map/include" -Iinclude)
  local obj=/tmp/mxmoe-module-build
  mkdir -p "${obj}"
  g++ "${flags[@]}" -c "${nb_inc}/../src/nb_combined.cpp" -o "${obj}/nb_combined.o" &
  local nb_pid=$!
  g++ "${flags[@]}" -c mxmoe/_mxmoe_ext.cc -o "${obj}/_mxmoe_ext.o"
  wait "${nb_pid}"
  g++ -shared -o "mxmoe/_mxmoe${suffix}" "${obj}/_mxmoe_ext.o" "${obj}/nb_combined.o" \
    -Llib "-l:${soname}" -Wl,-rpath,'$ORIGIN/../lib'
  cd /tmp  # import from the pack through PYTHONPATH, not the working directory
  "${python}" -c 'import mxmoe, torch; print("mxmoe", mxmoe.version(), "from", mxmoe.__file__,
"| CUDA devices seen by mxmoe:", mxmoe.cuda_device_count(), "| torch", torch.__version__)'
}

run_cctests() {
  local quick="$1" tool="${2:-}"
  local rc=0
  for t in ${cctests}; do
    [[ -x "bin/${t}" ]] || { echo "missing bin/${t}"; rc=1; continue; }
    echo "-- bin/${t}"
    if [[ -n "${tool}" ]]; then
      MXMOE_GPU_TEST_QUICK="${quick}" compute-sanitizer --tool "${tool}" --error-exitcode 99 \
        --print-limit 20 "bin/${t}" || rc=1
    else
      MXMOE_GPU_TEST_QUICK="${quick}" "bin/${t}" || rc=1
    fi
  done
  return "${rc}"
}

sanitize() {
  local tool="$1" rc=0
  echo "-- pytest ${sanitize_paths} under compute-sanitizer --tool ${tool} (quick shapes)"
  MXMOE_GPU_TEST_QUICK=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool "${tool}" --error-exitcode 99 --report-api-errors no \
    --print-limit 20 "${python}" -m pytest -q -x -p no:cacheprovider ${sanitize_paths} || rc=1
  run_cctests 1 "${tool}" || rc=1
  return "${rc}"
}

echo "mxmoe GPU run: pack ${pack} (commit ${MXMOE_COMMIT}), results in ${out}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
  | sed 's/^/GPU: /'

module_ok=1
if wants build; then
  stage build "${out}/build.log" \
    bash -c "$(declare -f build_module); python='${python}'; build_module" || module_ok=0
fi
if wants pytest; then
  if [[ ${module_ok} -eq 1 ]]; then
    stage pytest "${out}/pytest.log" "${python}" -m pytest -q -rs -p no:cacheprovider \
      --durations=15 --junitxml="${out}/pytest.xml" ${pytest_paths}
  else
    record pytest 1 0 "skipped: the module did not build"
  fi
fi
if wants cctest && [[ -n "${cctests}" ]]; then
  stage cctest "${out}/cctest.log" \
    bash -c "$(declare -f run_cctests); cctests='${cctests}'; run_cctests 0"
fi
for tool in memcheck racecheck synccheck; do
  if wants "${tool}"; then
    if [[ ${module_ok} -eq 1 ]]; then
      stage "${tool}" "${out}/${tool}.log" bash -c "$(declare -f run_cctests sanitize); \
python='${python}'; cctests='${cctests}'; sanitize_paths='${sanitize_paths}'; sanitize ${tool}"
    else
      record "${tool}" 1 0 "skipped: the module did not build"
    fi
  fi
done
if wants bench; then
  for script in ${benches}; do
    name="$(basename "${script}" .py)"
    if [[ ${module_ok} -eq 1 ]]; then
      # shellcheck disable=SC2086
      stage "${name}" "${out}/${name}.log" "${python}" "${script}" --out "${out}" ${bench_args}
    else
      record "${name}" 1 0 "skipped: the module did not build"
    fi
  done
fi

{
  echo
  echo "mxmoe GPU run summary (commit ${MXMOE_COMMIT}; logs in ${out})"
  printf '%-26s %-12s %6s  %s\n' stage result seconds note
  printf '%-26s %-12s %6s  %s\n' -------------------------- ------------ ------ ----
  failed=0
  for i in "${!names[@]}"; do
    printf '%-26s %-12s %6s  %s\n' "${names[$i]}" "${results[$i]}" "${seconds[$i]}" "${notes[$i]}"
    [[ "${results[$i]}" == PASS ]] || failed=1
  done
  if [[ ${failed} -eq 0 ]]; then echo "ALL STAGES PASSED"; else echo "SOME STAGES FAILED"; fi
} | tee "${out}/summary.txt"
grep -q "ALL STAGES PASSED" "${out}/summary.txt"
