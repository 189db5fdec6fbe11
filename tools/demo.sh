#!/usr/bin/env bash
# Runs the demo on a fresh machine: installs what is missing (tools/setup.sh), builds, and runs
# an MXFP4 MoE layer forward on the best available backend. Flags go to the demo, e.g.
#   bash tools/demo.sh --shape=qwen3-30b-a3b --tokens=16 --backend=cpu
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"
bash tools/setup.sh
exec bazel run //py/mxmoe:demo -- "$@"
