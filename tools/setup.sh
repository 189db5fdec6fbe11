#!/usr/bin/env bash
# Installs what the build needs, idempotently, then returns: Bazel 4.2.3 (Debian's
# bazel-bootstrap), cmake and pkg-config (apt), and the project venv .venv with the pinned
# packages of tools/requirements.txt.
# The CUDA toolkit (nvcc, default /usr/local/cuda or $CUDA_PATH) must already be there: it is
# checked, not installed. Safe to run any number of times; a second run does nothing.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

log() { echo "[mxmoe setup] $*" >&2; }

as_root() {
  if [[ "$(id -u)" == 0 ]]; then "$@"; else sudo "$@"; fi
}

# 1. Bazel (WORKSPACE mode, 4.2.3 from Debian).
if ! command -v bazel >/dev/null 2>&1; then
  log "installing bazel-bootstrap (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bazel-bootstrap >/dev/null
fi

# 1b. cmake and pkg-config: tests/build/install_layout_test.sh builds the examples against the
# install layout with both, as a project outside Bazel would.
missing_apt=()
command -v cmake >/dev/null 2>&1 || missing_apt+=(cmake)
command -v pkg-config >/dev/null 2>&1 || missing_apt+=(pkg-config)
if [[ ${#missing_apt[@]} -gt 0 ]]; then
  log "installing ${missing_apt[*]} (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_apt[@]}" >/dev/null
fi

# 2. CUDA toolkit: compiled (never run) on machines without a GPU.
nvcc_path="${CUDA_PATH:-/usr/local/cuda}/bin/nvcc"
if [[ ! -x "${nvcc_path}" ]]; then
  log "ERROR: ${nvcc_path} not found. mxmoe compiles its CUDA kernels on every build;"
  log "install the CUDA 13 toolkit there or set CUDA_PATH."
  exit 1
fi

# 3. The project venv, re-synced whenever tools/requirements.txt changes.
python_bin="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python3 ]]; then
  log "creating .venv with $(${python_bin} --version)"
  "${python_bin}" -m venv .venv
fi
stamp=.venv/.mxmoe-requirements.sha256
wanted="$(sha256sum tools/requirements.txt | cut -d' ' -f1)"
if [[ ! -f "${stamp}" || "$(cat "${stamp}")" != "${wanted}" ]]; then
  log "installing tools/requirements.txt into .venv (first time: a few minutes)"
  .venv/bin/python3 -m pip install -q --upgrade pip
  .venv/bin/python3 -m pip install -q -r tools/requirements.txt
  echo "${wanted}" > "${stamp}"
fi
