"""Project test macros: one cc_test per C++ test file, one py_test per pytest file."""

def cc_test_per_file(srcs, deps, **kwargs):
    """A cc_test named after each `*_test.cc` in srcs (statically linked, so it travels)."""
    for src in srcs:
        native.cc_test(
            name = src[:-len(".cc")],
            srcs = [src],
            deps = deps,
            linkstatic = True,
            **kwargs
        )

def pytest_per_file(srcs, deps, data = [], **kwargs):
    """A py_test named after each `test_*.py` in srcs, run by pytest (exit code 5 fails)."""
    for src in srcs:
        native.py_test(
            name = src[:-len(".py")],
            srcs = [src, "//tools/bazel:pytest_main.py"],
            main = "//tools/bazel:pytest_main.py",
            args = ["$(rootpath %s)" % src],
            deps = deps,
            data = data,
            python_version = "PY3",
            **kwargs
        )
