"""Prints the README's H200 MoE tables (markdown) from a bench_moe.py result file.

    python3 bench/readme_tables.py [bench/results/h200-moe.json]

One table per block ("shape", then "model"), one row per (shape, T): mxmoe and Marlin times,
x floor = mxmoe / max(bytes floor, FP8-peak floor), and each peer's time / mxmoe's time, bold
where mxmoe is slower. A summary line per block gives the ranges the README quotes. Nothing is
computed that the file does not hold.
"""

import json
import sys


def ratio(peer, mine):
    r = peer / mine
    return f"**{r:.2f}**" if r < 1.0 else f"{r:.2f}"


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "bench/results/h200-moe.json"
    with open(path) as f:
        result = json.load(f)
    print(f"<!-- from {path}: {result['gpu']}, commit {result['commit'][:7]}, "
          f"{result['date'][:10]} -->")
    for block in ("shape", "model"):
        rows = [r for r in result["rows"] if r["block"] == block]
        if not rows:
            continue
        has_marlin = all("vllm_marlin_ms" in r for r in rows)
        print(f"\nblock: {block}\n")
        columns = ["shape", "T", "mxmoe ms"] + (["Marlin ms"] if has_marlin else [])
        columns += ["x floor"] + (["vs Marlin"] if has_marlin else [])
        columns += ["vs torch fp8", "vs torch bf16"]
        print("| " + " | ".join(columns) + " |")
        print("| --- |" + " ---: |" * (len(columns) - 1))
        for r in rows:
            mine = r["mxmoe_ms"]
            floor = max(r["floor_bytes_ms"], r["floor_fp8_ms"])
            cells = [r["shape"], str(r["tokens"]), f"{mine:.3f}"]
            if has_marlin:
                cells.append(f"{r['vllm_marlin_ms']:.3f}")
            cells.append(f"{mine / floor:.2f}")
            if has_marlin:
                cells.append(ratio(r["vllm_marlin_ms"], mine))
            cells += [ratio(r["torch_fp8_ms"], mine), ratio(r["torch_bf16_ms"], mine)]
            print("| " + " | ".join(cells) + " |")
        for peer in ("vllm_marlin", "torch_fp8", "torch_bf16"):
            key = f"{peer}_ms"
            if not all(key in r for r in rows):
                continue
            for name, sel in (("T <= 256", lambda t: t <= 256), ("T >= 1024", lambda t: t >= 1024)):
                vals = [r[key] / r["mxmoe_ms"] for r in rows if sel(r["tokens"])]
                print(f"- {block}: {peer} time / mxmoe time at {name}: "
                      f"{min(vals):.2f}-{max(vals):.2f}")
        exact = sum(1 for r in rows if r.get("mxmoe_rel_l2_vs_w4a4_ref") == 0.0)
        print(f"- {block}: mxmoe bit-exact to the W4A4 reference in {exact} of {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
