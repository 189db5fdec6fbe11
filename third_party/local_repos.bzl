"""Repository rules that expose what is installed on this machine as Bazel repositories.

cuda_configure:   the CUDA toolkit (default /usr/local/cuda, or $CUDA_PATH) as @local_cuda.
python_configure: the project venv's interpreter (<workspace>/.venv) as the Python toolchain
                  and its headers as @local_python//:python_headers.
venv_package:     a directory of an installed pip package (path derived from the venv, never a
                  hard-coded pythonX.Y) with a BUILD file from third_party/.
Each fails with a message that says which setup step is missing.
"""

def _workspace_root(repository_ctx):
    return repository_ctx.path(Label("//:WORKSPACE")).dirname

def _venv_python(repository_ctx):
    python = repository_ctx.path("%s/.venv/bin/python3" % _workspace_root(repository_ctx))
    if not python.exists:
        fail("mxmoe: %s not found; run `bash tools/setup.sh` (creates the project venv)" % python)
    return python

def _python_eval(repository_ctx, code):
    python = _venv_python(repository_ctx)
    result = repository_ctx.execute([python, "-c", code])
    if result.return_code != 0:
        fail("mxmoe: %s -c %r failed: %s" % (python, code, result.stderr))
    return result.stdout.strip()

def _cuda_configure_impl(repository_ctx):
    cuda_path = repository_ctx.os.environ.get("CUDA_PATH", "/usr/local/cuda")
    nvcc = repository_ctx.path(cuda_path + "/bin/nvcc")
    if not nvcc.exists:
        fail("mxmoe: nvcc not found at %s; install the CUDA toolkit or set CUDA_PATH" % nvcc)
    repository_ctx.symlink(cuda_path + "/include", "include")
    repository_ctx.symlink(cuda_path + "/lib64", "lib64")
    repository_ctx.file("nvcc_path.bzl", "NVCC_PATH = %r\n" % str(nvcc))
    repository_ctx.file("BUILD.bazel", """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "cuda_headers",
    hdrs = glob(["include/**/*.h", "include/**/*.hpp", "include/**/*.inl"]),
    includes = ["include"],
)

# cudart linked statically: the library and tests then run on GPU hosts of another distribution.
cc_library(
    name = "cudart_static",
    srcs = ["lib64/libcudart_static.a"],
    linkopts = ["-ldl", "-lrt", "-lpthread"],
    deps = [":cuda_headers"],
)

exports_files(["nvcc_path.bzl"])
""")

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    environ = ["CUDA_PATH"],
    local = True,
)

def _python_configure_impl(repository_ctx):
    python = _venv_python(repository_ctx)
    include_dir = _python_eval(repository_ctx, "import sysconfig; print(sysconfig.get_paths()['include'])")
    repository_ctx.symlink(include_dir, "include")
    repository_ctx.file("BUILD.bazel", """
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

package(default_visibility = ["//visibility:public"])

cc_library(
    name = "python_headers",
    hdrs = glob(["include/**/*.h"]),
    includes = ["include"],
)

# The launcher Bazel writes for a py_binary is a Python script run through its shebang before
# it execs interpreter_path; Bazel 4's default "#!/usr/bin/env python" fails on machines that have
# only python3 (stock Debian 12).
py_runtime(
    name = "py3_runtime",
    interpreter_path = "%s",
    python_version = "PY3",
    stub_shebang = "#!/usr/bin/env python3",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "py_toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
""" % python)

python_configure = repository_rule(
    implementation = _python_configure_impl,
    local = True,
)

def _venv_package_impl(repository_ctx):
    site_packages = _python_eval(repository_ctx, "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    package = repository_ctx.path(site_packages + "/" + repository_ctx.attr.package_dir)
    if not package.exists:
        fail("mxmoe: %s not found; run `bash tools/setup.sh` (installs the pinned wheels)" % package)
    for child in package.readdir():
        repository_ctx.symlink(child, child.basename)
    repository_ctx.symlink(repository_ctx.attr.build_file, "BUILD.bazel")

venv_package = repository_rule(
    implementation = _venv_package_impl,
    attrs = {
        "package_dir": attr.string(mandatory = True),
        "build_file": attr.label(mandatory = True, allow_single_file = True),
    },
    local = True,
)
