#!/bin/bash
# On the GPU host, from the pack folder of tools/gpu/pack.sh (its bin/grouped_gemm_sm90_test is
# //tests/gpu:grouped_gemm_sm90_test; BIN=path overrides): correctness for every token tile,
# compute-sanitizer, tile-width experiments, an ncu look at a decode call, and
# bench/bench_gemm.py (torch peers, same routing).
# Usage: bash run_gemm_sm90_device.sh OUTDIR [--no-bench]
set -uo pipefail
OUT=${1:?outdir}
BIN=${BIN:-bin/grouped_gemm_sm90_test}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/summary.txt"
for bn in 16 32 64 128; do
  timeout 60 $BIN --no-bench --block-n $bn > "$OUT/correct_one.txt" 2>&1
  echo "correctness bn=$bn rc=$? pass=$(grep -c ^PASS "$OUT/correct_one.txt")" | tee -a "$OUT/summary.txt"
  cat "$OUT/correct_one.txt" >> "$OUT/correct.txt"
  grep -v "^PASS" "$OUT/correct_one.txt" | head -5
done
rm -f "$OUT/correct_one.txt"
timeout 150 compute-sanitizer --tool memcheck $BIN --no-bench --quick > "$OUT/sanitizer.txt" 2>&1
echo "memcheck rc=$? $(grep 'ERROR SUMMARY' "$OUT/sanitizer.txt")" | tee -a "$OUT/summary.txt"
timeout 120 compute-sanitizer --tool synccheck $BIN --no-bench --quick --block-n 16 >> "$OUT/sanitizer.txt" 2>&1
echo "synccheck rc=$? $(grep 'ERROR SUMMARY' "$OUT/sanitizer.txt" | tail -1)" | tee -a "$OUT/summary.txt"
# Tile-width experiments (MXMOE_SM90_BLOCK_N overrides the heuristic).
for f in gpt-oss-120b:w13:64 deepseek-v3:w13:256 qwen3-30b-a3b:w2:256; do
  for bn in 16 32; do
    MXMOE_SM90_BLOCK_N=$bn timeout 60 $BIN --bench-only --bench-filter $f 2>&1 | tail -1 | sed "s/^/bn=$bn /" >> "$OUT/experiments.txt"
  done
done
for f in gpt-oss-120b:w13:16384 deepseek-v3:w13:4096 qwen3-30b-a3b:w13:16384; do
  for bn in 64 128; do
    MXMOE_SM90_BLOCK_N=$bn timeout 60 $BIN --bench-only --bench-filter $f 2>&1 | tail -1 | sed "s/^/bn=$bn /" >> "$OUT/experiments.txt"
  done
done
cat "$OUT/experiments.txt"
# Where a decode call's time goes: both kernels of one call.
timeout 90 ncu -k regex:"GroupedGemm|ConvertActivations" -s 6 -c 4 --section SpeedOfLight \
  $BIN --bench-only --bench-filter gpt-oss-120b:w13:1 > "$OUT/ncu_decode.txt" 2>&1
grep -E "Convert|GroupedGemm|Duration|DRAM Through" "$OUT/ncu_decode.txt" | head -16
if [ "${2:-}" != "--no-bench" ]; then
  PYTHONUNBUFFERED=1 timeout 300 python3 bench/bench_gemm.py --out "$OUT" --mxmoe-bin $BIN \
    > "$OUT/bench_gemm.log" 2>&1
  echo "bench rc=$?" | tee -a "$OUT/summary.txt"
  grep -v '^{' "$OUT/bench_gemm.log" | tail -46
fi
cat "$OUT/summary.txt"
