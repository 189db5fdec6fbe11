"""cuda_library: compiles .cu files with nvcc and returns CcInfo, so cc_library / cc_binary /
cc_test depend on it like on any C++ library.

One nvcc action per .cu file (Bazel caches each; CUTLASS files take minutes on 2 cores), for the
GPU architectures in `archs` (e.g. ["sm_90a"], or ["sm_90a", "sm_100a"] for code that runs
unchanged on Hopper and Blackwell). nvcc uses the C++ toolchain's gcc as host compiler, with the
host flags of //cc:core: -ffp-contract=off (host code must not fuse a*b+c, format.h's
bit-exactness rule) and -fvisibility=hidden (libmxmoe.so exports only the C API). Never
fast-math: format.h needs IEEE division and no flush-to-zero. The objects go into one static
archive linked whole (alwayslink), or -c opt test binaries and shared libraries would link none
of them.
"""

load("@bazel_tools//tools/cpp:toolchain_utils.bzl", "find_cpp_toolchain")
load("@local_cuda//:nvcc_path.bzl", "NVCC_PATH")

def _gencode(arch):
    # "sm_90a" -> real code for sm_90a from the compute_90a virtual architecture.
    number = arch[len("sm_"):]
    if not arch.startswith("sm_") or not number.rstrip("a").isdigit():
        fail("cuda_library: archs entries look like \"sm_90a\", got %r" % arch)
    return "-gencode=arch=compute_%s,code=sm_%s" % (number, number)

def _cuda_library_impl(ctx):
    cc_toolchain = find_cpp_toolchain(ctx)
    feature_configuration = cc_common.configure_features(
        ctx = ctx,
        cc_toolchain = cc_toolchain,
        requested_features = ctx.features,
        unsupported_features = ctx.disabled_features,
    )
    dep_cc_infos = [dep[CcInfo] for dep in ctx.attr.deps]
    dep_compilation = cc_common.merge_cc_infos(cc_infos = dep_cc_infos).compilation_context

    include_flags = ["-I.", "-I" + ctx.bin_dir.path]
    for path in dep_compilation.includes.to_list():
        include_flags.append("-I" + path)
    for path in dep_compilation.quote_includes.to_list():
        include_flags.append("-I" + path)
    for path in dep_compilation.system_includes.to_list():
        include_flags.append("-isystem=" + path)
    cutlass_files = ctx.files._cutlass
    if cutlass_files:
        # .../include/cutlass/<...>: the include dir is the parent of the "cutlass" directory.
        sample = cutlass_files[0].path
        include_flags.append("-isystem=" + sample[:sample.find("/include/") + len("/include")])

    inputs = depset(
        ctx.files.hdrs + cutlass_files,
        transitive = [dep_compilation.headers],
    )
    if not ctx.attr.archs:
        fail("cuda_library %s: archs must name at least one architecture" % ctx.label)
    gencode = [_gencode(arch) for arch in ctx.attr.archs]
    objects = []
    for src in ctx.files.srcs:
        obj = ctx.actions.declare_file("_objs/%s/%s.o" % (ctx.label.name, src.basename[:-len(".cu")]))
        args = [
            "-ccbin",
            cc_toolchain.compiler_executable,
            "-std=c++17",
            "-O3",
            "-lineinfo",
            "--expt-relaxed-constexpr",
            "-Xcompiler",
            "-fPIC",
            "-Xcompiler",
            "-fno-fast-math",
            "-Xcompiler",
            "-ffp-contract=off",
            "-Xcompiler",
            "-fvisibility=hidden",
        ] + gencode + include_flags + ctx.attr.copts + [
            "-c",
            src.path,
            "-o",
            obj.path,
        ]
        ctx.actions.run(
            executable = NVCC_PATH,
            arguments = args,
            inputs = depset([src], transitive = [inputs]),
            outputs = [obj],
            mnemonic = "NvccCompile",
            progress_message = "nvcc %s" % src.short_path,
            use_default_shell_env = True,
        )
        objects.append(obj)

    compilation_context = cc_common.create_compilation_context(
        headers = depset(ctx.files.hdrs),
    )
    # A static archive linked whole (alwayslink): every kernel object reaches test binaries and
    # shared libraries even when nothing references it by symbol.
    archive = ctx.actions.declare_file("lib%s_cuda.a" % ctx.label.name)
    ctx.actions.run(
        executable = cc_toolchain.ar_executable,
        arguments = ["rcs", archive.path] + [obj.path for obj in objects],
        inputs = objects,
        outputs = [archive],
        mnemonic = "CudaArchive",
        use_default_shell_env = True,
    )
    library = cc_common.create_library_to_link(
        actions = ctx.actions,
        feature_configuration = feature_configuration,
        cc_toolchain = cc_toolchain,
        static_library = archive,
        pic_static_library = archive,
        alwayslink = True,
    )
    linker_input = cc_common.create_linker_input(
        owner = ctx.label,
        libraries = depset([library]),
    )
    own = CcInfo(
        compilation_context = compilation_context,
        linking_context = cc_common.create_linking_context(linker_inputs = depset([linker_input])),
    )
    return [
        DefaultInfo(files = depset([archive])),
        cc_common.merge_cc_infos(direct_cc_infos = [own], cc_infos = dep_cc_infos),
    ]

cuda_library = rule(
    implementation = _cuda_library_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".cu"]),
        "archs": attr.string_list(
            mandatory = True,
            doc = "GPU architectures to build machine code for, e.g. [\"sm_90a\", \"sm_100a\"].",
        ),
        "hdrs": attr.label_list(allow_files = [".h", ".cuh", ".hpp"]),
        "deps": attr.label_list(providers = [CcInfo]),
        "copts": attr.string_list(),
        "_cutlass": attr.label(default = "@cutlass//:headers"),
        "_cc_toolchain": attr.label(default = "@bazel_tools//tools/cpp:current_cc_toolchain"),
    },
    fragments = ["cpp"],
    toolchains = ["@bazel_tools//tools/cpp:toolchain_type"],
)
