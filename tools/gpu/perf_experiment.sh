#!/usr/bin/env bash
# One GPU call that A/B-tests the kernel variants behind environment knobs (docs/perf-notes.md,
# "H200 pass" section, says what each variant changes and what it is predicted to do). Run it from
# the pack folder tools/gpu/pack.sh made (it is copied there), after run.sh's build stage:
#
#   bash run.sh OUT --only build && bash perf_experiment.sh OUT
#
# For each variant (an environment setting; "base" = none, today's kernels):
#   1. correctness: bin/quantize_lane_test once (exhaustive building-block checks of every
#      variant), then the GPU quantize suite (tests/gpu/test_quantize_gpu.py, CUDA == CPU backend
#      bit for bit; quick shapes unless MXMOE_EXPERIMENT_QUICK=0) with the variant's knobs set (the
#      table variants at every size), and the sm90 GEMM test for GEMM variants;
#   2. timing: bench/bench_quantize.py (and bench/bench_gemm.py on a subset, for GEMM variants)
#      with the knobs set, writing OUT/<variant>/<gpu>-<suite>.json.
# Prints a comparison table last (also OUT/experiment.txt): per case, the base time and each
# variant's speed-up over it, plus the correctness verdicts. Budget: about 4-5 minutes on an H200.
# Exit code 0 only if every correctness check passed.
set -uo pipefail

pack="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ $# -lt 1 ]]; then
  sed -n '2,16p' "$0"
  exit 2
fi
mkdir -p "$1"
out="$(cd "$1" && pwd)"
cd "${pack}"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="${pack}${PYTHONPATH:+:${PYTHONPATH}}"
export LD_LIBRARY_PATH="${pack}/lib${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"
export MXMOE_COMMIT="$(cat "${pack}/COMMIT" 2>/dev/null || echo unknown)"

# name|suites|knobs (suites: q = quantize, g = gemm).
fast="MXMOE_QUANTIZE_SILU=fast"
table="MXMOE_QUANTIZE_SILU=table"
enc="MXMOE_QUANTIZE_ENCODE=bf16"
variants=(
  "base|q|"
  "fast|q|${fast}"
  "enc|q|${enc}"
  "fast+enc|q|${fast} ${enc}"
  "table|q|${table}"
  "table+enc|q|${table} ${enc}"
  "table2+enc|q|${table} ${enc} MXMOE_QUANTIZE_TABLE_CTAS_PER_SM=2"
)
verdicts=()
failed=0

check() {  # name log command...: runs a correctness check, records PASS/FAIL
  local name="$1" log="$2"
  shift 2
  echo "== check ${name} (log ${log})"
  timeout --kill-after=10 "${MXMOE_EXPERIMENT_CHECK_TIMEOUT:-240}" "$@" >"${log}" 2>&1
  local rc=$?
  tail -n 2 "${log}" | sed 's/^/   | /'
  if [[ ${rc} -eq 0 ]]; then
    verdicts+=("PASS ${name}")
  else
    verdicts+=("FAIL(rc=${rc}) ${name}")
    failed=1
  fi
}

echo "perf experiment: pack ${pack} (commit ${MXMOE_COMMIT}), results in ${out}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader \
  2>/dev/null | sed 's/^/GPU: /'
if [[ -x bin/quantize_lane_test ]]; then
  check quantize_lane_test "${out}/quantize_lane_test.log" bin/quantize_lane_test
else
  verdicts+=("FAIL quantize_lane_test: bin/quantize_lane_test missing"); failed=1
fi

for v in "${variants[@]}"; do
  IFS='|' read -r name suites knobs <<<"${v}"
  mkdir -p "${out}/${name}"
  # shellcheck disable=SC2086
  if [[ "${name}" != base ]]; then
    # The table variants at every size (the default keeps them to large problems).
    check "pytest quantize [${name}]" "${out}/${name}/pytest.log" \
      env ${knobs} MXMOE_QUANTIZE_TABLE_MIN_TILES=0 \
      MXMOE_GPU_TEST_QUICK="${MXMOE_EXPERIMENT_QUICK:-1}" \
      "${python}" -m pytest -q -x -p no:cacheprovider tests/gpu/test_quantize_gpu.py
  fi
  if [[ "${suites}" == *g* && -x bin/grouped_gemm_sm90_test ]]; then
    check "sm90 gemm test [${name}]" "${out}/${name}/gemm_test.log" \
      env ${knobs} MXMOE_GPU_TEST_QUICK=1 bin/grouped_gemm_sm90_test
  fi
  if [[ "${suites}" == *q* ]]; then
    echo "== bench_quantize [${name}] ${knobs}"
    env ${knobs} timeout 300 "${python}" bench/bench_quantize.py --out "${out}/${name}" \
      >"${out}/${name}/bench_quantize.log" 2>&1 || echo "   bench_quantize [${name}] failed"
    tail -n 2 "${out}/${name}/bench_quantize.log" | sed 's/^/   | /'
  fi
  if [[ "${suites}" == *g* ]]; then
    echo "== bench_gemm [${name}] ${knobs}"
    env ${knobs} timeout 300 "${python}" bench/bench_gemm.py --out "${out}/${name}" \
      ${MXMOE_EXPERIMENT_GEMM_ARGS:---tokens 1 4 16 64} \
      >"${out}/${name}/bench_gemm.log" 2>&1 || echo "   bench_gemm [${name}] failed"
    tail -n 2 "${out}/${name}/bench_gemm.log" | sed 's/^/   | /'
  fi
done

names=()
for v in "${variants[@]}"; do names+=("${v%%|*}"); done
{
  echo
  echo "perf experiment (commit ${MXMOE_COMMIT}; results in ${out})"
  "${python}" - "${out}" "${names[@]}" <<'EOF'
import glob, json, os, sys
out, names = sys.argv[1], sys.argv[2:]
def load(name, suite):
    files = glob.glob(os.path.join(out, name, f"*-{suite}.json"))
    return json.load(open(files[0])) if files else None
for suite, key, label in (("quantize", "mxmoe_ms", "quantize: us, GB/s and x base"),
                          ("gemm", "mxmoe_ms", "gemm: us and x base")):
    base = load("base", suite)
    others = [(n, load(n, suite)) for n in names[1:]]
    others = [(n, d) for n, d in others if d]
    if not base or not others:
        continue
    print(f"\n{label} (copy {base.get('copy_GBps', 0):.0f} GB/s)" if suite == "quantize" else
          f"\n{label}")
    index = {}
    for n, d in others:
        for r in d["rows"]:
            index[(n, r["shape"], r.get("kernel", r.get("gemm", "")), r.get("tokens"))] = r
    head = ["shape", "kernel", "T", "base us"] + (["GB/s", "%copy"] if suite == "quantize" else [])
    head += [n for n, _ in others]
    rows = []
    for r in base["rows"]:
        kern = r.get("kernel", r.get("gemm", ""))
        if suite == "quantize" and r["tokens"] < 1024 and r["tokens"] not in (1, 64):
            continue
        cells = [r["shape"], kern.replace("_experts_quantize", ""), str(r["tokens"]),
                 f"{r[key] * 1e3:.2f}"]
        if suite == "quantize":
            cells += [f"{r['GBps']:.0f}", f"{100 * r['copy_ratio']:.0f}%"]
        for n, _ in others:
            o = index.get((n, r["shape"], kern, r.get("tokens")))
            cells.append(f"{r[key] / o[key]:.3f}" if o and o.get(key) else "-")
        rows.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for j, row in enumerate([head] + rows):
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
EOF
  echo
  printf '%s\n' "${verdicts[@]}"
  if [[ ${failed} -eq 0 ]]; then echo "ALL CHECKS PASSED"; else echo "SOME CHECKS FAILED"; fi
} | tee "${out}/experiment.txt"
exit "${failed}"
