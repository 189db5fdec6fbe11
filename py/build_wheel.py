"""Writes the mxmoe wheel: the Python package plus its self-contained extension module.

    build_wheel.py --out mxmoe-V-cp311-cp311-linux_x86_64.whl --header mxmoe.h --extension
        _mxmoe.so --requirements tools/requirements.txt py/mxmoe/*.py

The wheel's name is fixed by the Bazel target (py/BUILD.bazel); this script checks that its
version equals mxmoe.h's MXMOE_VERSION_* and mxmoe.__version__, and that its Python tag is the
interpreter's (the extension is built against this interpreter's headers), and fails with a
message naming what to update otherwise. Metadata: Requires-Dist torch and numpy at the
project's pinned versions or newer within the same minor line of torch (the extension takes
torch tensors only through DLPack, so torch's C++ ABI does not matter). RECORD carries the
sha256 of every file (PEP 376/427). Timestamps are fixed so that the wheel is reproducible.

Limits: one platform tag (linux_x86_64, the build machine's; no manylinux audit: the extension
links libstdc++ and glibc of the build machine dynamically, everything else statically).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import sys
import zipfile

_EPOCH = (2020, 1, 1, 0, 0, 0)


def _header_version(path: str) -> str:
    text = open(path).read()
    parts = []
    for part in ("MAJOR", "MINOR", "PATCH"):
        match = re.search(rf"#define MXMOE_VERSION_{part} (\d+)", text)
        if not match:
            sys.exit(f"build_wheel: MXMOE_VERSION_{part} not found in {path}")
        parts.append(match.group(1))
    return ".".join(parts)


def _package_version(sources: list[str]) -> str:
    init = [s for s in sources if os.path.basename(s) == "__init__.py"]
    match = re.search(r'^__version__ = "([^"]+)"', open(init[0]).read(), re.M) if init else None
    if not match:
        sys.exit("build_wheel: __version__ not found in mxmoe/__init__.py")
    return match.group(1)


def _pins(path: str) -> dict[str, str]:
    pins = {}
    for line in open(path):
        match = re.match(r"^(torch|numpy)==([0-9.]+)", line.strip())
        if match:
            pins[match.group(1)] = match.group(2)
    if set(pins) != {"torch", "numpy"}:
        sys.exit(f"build_wheel: torch and numpy pins not found in {path}")
    return pins


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _add(zf: zipfile.ZipFile, name: str, data: bytes, executable: bool = False) -> None:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (0o755 if executable else 0o644) << 16
    zf.writestr(info, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--header", required=True)
    parser.add_argument("--extension", required=True)
    parser.add_argument("--requirements", required=True)
    parser.add_argument("--readme", required=True)
    parser.add_argument("sources", nargs="+")
    args = parser.parse_args()

    name = os.path.basename(args.out)
    match = re.fullmatch(r"mxmoe-([0-9.]+)-(cp\d+)-(cp\d+)-(\w+)\.whl", name)
    if not match:
        sys.exit(f"build_wheel: unexpected wheel name {name}")
    version, python_tag, abi_tag, platform_tag = match.groups()
    for what, found in (("mxmoe.h", _header_version(args.header)),
                        ("mxmoe/__init__.py __version__", _package_version(args.sources))):
        if found != version:
            sys.exit(f"build_wheel: {what} says version {found} but the wheel target is "
                     f"{name}; update WHEEL_VERSION in py/BUILD.bazel (and the other)")
    interpreter = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if python_tag != interpreter:
        sys.exit(f"build_wheel: the extension is built for {interpreter} but the target names "
                 f"{python_tag}; update WHEEL_PYTHON in py/BUILD.bazel")
    pins = _pins(args.requirements)
    torch_minor = ".".join(pins["torch"].split(".")[:2])
    dist_info = f"mxmoe-{version}.dist-info"
    readme = open(args.readme, encoding="utf-8").read()
    metadata = "\n".join([
        "Metadata-Version: 2.1",
        "Name: mxmoe",
        f"Version: {version}",
        "Summary: MXFP4 (W4A4) Mixture-of-Experts kernels for CPU, Hopper and Blackwell",
        f"Requires-Python: =={sys.version_info.major}.{sys.version_info.minor}.*",
        f"Requires-Dist: torch>={torch_minor}",
        f"Requires-Dist: numpy>={pins['numpy'].split('.')[0]}",
        "Description-Content-Type: text/markdown",
        "",
        readme,
    ])
    wheel = "\n".join([
        "Wheel-Version: 1.0",
        "Generator: mxmoe py/build_wheel.py",
        "Root-Is-Purelib: false",
        f"Tag: {python_tag}-{abi_tag}-{platform_tag}",
        "",
    ])
    files: list[tuple[str, bytes, bool]] = []
    for source in sorted(args.sources):
        # py/mxmoe/x.py -> mxmoe/x.py, py/mxmoe/integrations/y.py -> mxmoe/integrations/y.py
        path = source.replace(os.sep, "/")
        if "py/mxmoe/" not in path:
            sys.exit(f"build_wheel: {source} is not under py/mxmoe/")
        files.append(("mxmoe/" + path.rsplit("py/mxmoe/", 1)[1], open(source, "rb").read(),
                      False))
    files.append(("mxmoe/_mxmoe.so", open(args.extension, "rb").read(), True))
    files.append((f"{dist_info}/METADATA", metadata.encode(), False))
    files.append((f"{dist_info}/WHEEL", wheel.encode(), False))
    files.append((f"{dist_info}/top_level.txt", b"mxmoe\n", False))
    record = [_record_line(n, d) for n, d, _ in files] + [f"{dist_info}/RECORD,,"]
    with zipfile.ZipFile(args.out, "w") as zf:
        for n, d, x in files:
            _add(zf, n, d, executable=x)
        _add(zf, f"{dist_info}/RECORD", ("\n".join(record) + "\n").encode())


if __name__ == "__main__":
    main()
