#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what is missing (tools/setup.sh), then
# `bazel test //...` (C++ tests, the C++ example, pytest suites; GPU tests skip without a GPU).
# Extra arguments go to `bazel test` (e.g. a narrower target pattern).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"
bash tools/setup.sh
if [[ $# -eq 0 ]]; then set -- //...; fi
exec bazel test "$@"
