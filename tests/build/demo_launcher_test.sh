#!/usr/bin/env bash
# The demo's launcher runs on a machine whose PATH has python3 but no `python` (stock Debian 12):
# its shebang is python3, --help succeeds, a bad flag reports its error on the first line, and a
# tiny forward runs on the CPU. Argument: the demo binary (the py_binary launcher).
set -euo pipefail
demo="$1"

fail() { echo "FAIL: $*" >&2; exit 1; }

shebang="$(head -n 1 "${demo}")"
[[ "${shebang}" == "#!/usr/bin/env python3" ]] || fail "launcher shebang is '${shebang}'"

# The real interpreter, not a wrapper script (pyenv's shims need bash on PATH).
python3_path="$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')" \
  || fail "no python3 on this machine's PATH"
only_python3="${TEST_TMPDIR:-$(mktemp -d)}/only-python3"
mkdir -p "${only_python3}"
ln -sf "${python3_path}" "${only_python3}/python3"
if PATH="${only_python3}" command -v python >/dev/null 2>&1; then
  fail "the test PATH still has a python"
fi

run_demo() { PATH="${only_python3}" "${demo}" "$@"; }

out="$(run_demo --help 2>&1)" || fail "--help exited $?: ${out}"
[[ "$(head -n 1 <<<"${out}")" == "mxmoe demo:"* ]] || fail "--help starts with: $(head -n 1 <<<"${out}")"
grep -q -- "--shape" <<<"${out}" || fail "--help does not list --shape"

rc=0
out="$(run_demo --no-such-flag 2>&1)" || rc=$?
[[ ${rc} -ne 0 ]] || fail "a bad flag exited 0"
first="$(head -n 1 <<<"${out}")"
[[ "${first}" == *"no-such-flag"* ]] || fail "a bad flag's first line is '${first}'"
[[ $(wc -l <<<"${out}") -le 3 ]] || fail "a bad flag printed $(wc -l <<<"${out}") lines"

out="$(run_demo --backend=cpu --tokens=2 --repeats=1 2>&1)" || fail "the CPU forward failed: ${out}"
grep -q "vs exact reference" <<<"${out}" || fail "no result line in: ${out}"
echo "PASS: demo launcher runs with python3 only (${python3_path})"
