"""Entry point of every Bazel py_test: runs pytest on the files given as arguments.

pytest's exit code 5 ("no tests collected") is a failure here: a test target that runs nothing
must not pass.
"""

import sys

import pytest

if __name__ == "__main__":
    code = pytest.main(["-q", "-rs", "-p", "no:cacheprovider", *sys.argv[1:]])
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("pytest collected no tests: failing on purpose", file=sys.stderr)
        code = 1
    sys.exit(int(code))
