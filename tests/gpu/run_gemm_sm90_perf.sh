#!/bin/bash
# On the GPU host (from the pack folder of tools/gpu/pack.sh): A/B of the SM90 grouped GEMM test
# binary against a baseline build on the same card, with the new binary's correctness (every
# token tile), compute-sanitizer and an ncu look (warp stalls, per-SASS-line source counters) at
# a decode and a prefill call. Binaries (//tests/gpu:grouped_gemm_sm90_test): NEW (default
# bin/grouped_gemm_sm90_test) and BASE (default bin/grouped_gemm_sm90_test_base, a baseline
# build). Each step is skipped when it could run past BUDGET seconds (default 450).
# Usage: bash run_gemm_sm90_perf.sh OUTDIR [steps]
# steps: a comma list of correct,bench,exp,ncu,san,peers (default all but peers). peers:
# bench/bench_gemm.py (torch bf16/FP8 peers, docs/design.md protocol) with the new binary,
# then again with the baseline binary (--no-torch) on the same routing, into OUTDIR/base.
set -uo pipefail
OUT=${1:?outdir}
STEPS=${2:-correct,bench,exp,ncu,san}
BUDGET=${BUDGET:-450}
NEW=${NEW:-bin/grouped_gemm_sm90_test}
BASE=${BASE:-bin/grouped_gemm_sm90_test_base}
mkdir -p "$OUT" "$OUT/base"
S="$OUT/summary.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$S"
fits() { [ $((SECONDS + $1)) -le "$BUDGET" ] || { echo "skip $2 (t=${SECONDS}s)" | tee -a "$S"; return 1; }; }
has() { [[ ",$STEPS," == *",$1,"* ]]; }
if has correct && fits 150 correct; then
  timeout 150 $NEW --no-bench > "$OUT/correct.txt" 2>&1
  echo "correctness rc=$? pass=$(grep -c ^PASS "$OUT/correct.txt") fail=$(grep -c ^FAIL "$OUT/correct.txt") t=${SECONDS}s" | tee -a "$S"
  grep -E "^FAIL|error|CUDA" "$OUT/correct.txt" | head -8
fi
if has bench; then
  for v in base mid new; do
    bin=$NEW; [ $v = base ] && bin=$BASE; [ $v = mid ] && bin=${BASE%_base}_mid
    [ -x "$bin" ] || continue
    fits 100 "bench $v" && { timeout 100 $bin --bench-only > "$OUT/bench_$v.txt" 2>&1; echo "bench $v rc=$? t=${SECONDS}s" | tee -a "$S"; }
  done
fi
if has exp && fits 60 exp; then
  # Ping-pong off (same binary) on prefill, and the baseline again for the spread.
  for f in deepseek-v3:w13:16384 gpt-oss-120b:w13:16384 qwen3-30b-a3b:w13:4096; do
    for pp in 1 0; do
      MXMOE_SM90_PINGPONG=$pp timeout 20 $NEW --bench-only --bench-filter $f 2>&1 | tail -1 | sed "s/^/new pp=$pp /" >> "$OUT/bench_exp.txt"
    done
    timeout 20 $BASE --bench-only --bench-filter $f 2>&1 | tail -1 | sed "s/^/base /" >> "$OUT/bench_exp.txt"
  done
  # Token-tile widths around the heuristic's thresholds (MXMOE_SM90_BLOCK_N overrides it).
  for f in gpt-oss-120b:w13:256 qwen3-30b-a3b:w13:256 deepseek-v3:w2:256; do
    for bn in 16 32; do
      MXMOE_SM90_BLOCK_N=$bn timeout 20 $NEW --bench-only --bench-filter $f 2>&1 | tail -1 | sed "s/^/new bn=$bn /" >> "$OUT/bench_exp.txt"
    done
  done
  for f in gpt-oss-120b:w13:1024 qwen3-30b-a3b:w2:1024 deepseek-v3:w13:1024; do
    for bn in 64 128; do
      MXMOE_SM90_BLOCK_N=$bn timeout 20 $NEW --bench-only --bench-filter $f 2>&1 | tail -1 | sed "s/^/new bn=$bn /" >> "$OUT/bench_exp.txt"
    done
  done
  echo "exp t=${SECONDS}s" >> "$S"
fi
if has ncu && fits 90 ncu; then
  SEC="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters --section MemoryWorkloadAnalysis"
  timeout 45 ncu -k regex:"GroupedGemm|ConvertActivations" -s 6 -c 2 $SEC -o /tmp/ncu_decode -f \
    $NEW --bench-only --bench-filter gpt-oss-120b:w13:1 > /dev/null 2>&1
  timeout 40 ncu -k regex:"GroupedGemm" -s 3 -c 1 $SEC -o /tmp/ncu_prefill -f \
    $NEW --bench-only --bench-filter deepseek-v3:w13:4096 > /dev/null 2>&1
  for r in decode prefill; do
    ncu -i /tmp/ncu_$r.ncu-rep >> "$OUT/ncu.txt" 2>&1
    [ -n "${NCU_SRC:-}" ] && ncu -i /tmp/ncu_$r.ncu-rep --page source --csv --print-source sass 2>/dev/null | gzip > "$OUT/ncu_src_$r.csv.gz"
  done
  echo "ncu t=${SECONDS}s" >> "$S"
fi
if has san && fits 100 san; then
  timeout 70 compute-sanitizer --tool memcheck $NEW --no-bench --quick > "$OUT/sanitizer.txt" 2>&1
  echo "memcheck rc=$? $(grep 'ERROR SUMMARY' "$OUT/sanitizer.txt" | tail -1)" | tee -a "$S"
  fits 40 synccheck && { timeout 40 compute-sanitizer --tool synccheck $NEW --no-bench --quick --block-n 128 >> "$OUT/sanitizer.txt" 2>&1
  echo "synccheck bn=128 rc=$? $(grep 'ERROR SUMMARY' "$OUT/sanitizer.txt" | tail -1)" | tee -a "$S"; }
fi
if has peers && fits 330 peers; then
  PYTHONUNBUFFERED=1 timeout 300 python3 bench/bench_gemm.py --out "$OUT" --mxmoe-bin $NEW \
    > "$OUT/bench_gemm.log" 2>&1
  echo "bench_gemm new rc=$? t=${SECONDS}s" | tee -a "$S"
  fits 60 "peers base" && { PYTHONUNBUFFERED=1 timeout 60 python3 bench/bench_gemm.py --out "$OUT/base" \
    --mxmoe-bin $BASE --no-torch > "$OUT/base/bench_gemm.log" 2>&1
    echo "bench_gemm base rc=$? t=${SECONDS}s" | tee -a "$S"; }
  grep -v '^{' "$OUT/bench_gemm.log" | tail -46
fi
# Side by side: base vs new (ms) per case (and an optional intermediate build, _mid).
if [ -f "$OUT/bench_mid.txt" ]; then
  join <(awk '$3 ~ /^[0-9]+$/ && NF==11 {print $1":"$2":"$3, $6}' "$OUT/bench_mid.txt" | sort) \
       <(awk '$3 ~ /^[0-9]+$/ && NF==11 {print $1":"$2":"$3, $6}' "$OUT/bench_new.txt" | sort) |
    awk '{printf "%-26s mid %8.4f new %8.4f x%.3f\n", $1, $2, $3, $2/$3}' >> "$S"
fi
if [ -f "$OUT/bench_new.txt" ]; then
  join <(awk '$3 ~ /^[0-9]+$/ && NF==11 {print $1":"$2":"$3, $6}' "$OUT/bench_base.txt" | sort) \
       <(awk '$3 ~ /^[0-9]+$/ && NF==11 {print $1":"$2":"$3, $6, $7, $5}' "$OUT/bench_new.txt" | sort) |
    awk '{printf "%-26s bn=%-4s base %8.4f new %8.4f  x%.2f  new/bytes %.2f\n", $1, $5, $2, $3, $2/$3, $3/$4}' | sort -t: -k1,1 -k2,2 -k3n
fi
cat "$OUT/bench_exp.txt" 2>/dev/null
cat "$S"
