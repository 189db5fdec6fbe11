"""Checks that the core's includes point one way only (the folder graph has no upward arrow).

Layers, lowest first; a file may include its own folder and any lower layer, nothing else:
    cc/include/mxmoe   public headers ("mxmoe/...")
    cc/base            status, workspace carver, CUDA call checks
    cc/cpu, cc/cuda    the backends (side by side: neither includes the other)
    cc/src             the C API: validation, backend selection, dispatch
Run by `bazel test //tests/cc:include_layers_test` with //cc:sources as data, or directly from the
repository root (`python3 tests/cc/include_layers_test.py`).
"""

import os
import re
import sys

# Folder (relative to the repository root) -> rank; equal ranks may not include each other.
LAYERS = {
    "cc/include/mxmoe": 0,
    "cc/base": 1,
    "cc/cpu": 2,
    "cc/cuda": 2,
    "cc/src": 3,
}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
SOURCE_SUFFIXES = (".h", ".cc", ".cu", ".cuh")


def folder_of_include(path):
    """The layer folder an include path names, or None for includes outside the core."""
    if path.startswith("mxmoe/"):
        return "cc/include/mxmoe"
    for folder in LAYERS:
        if path.startswith(folder + "/"):
            return folder
    return None


def violations(files):
    """files: {folder: {filename: text}} -> list of 'file: message' for every bad include."""
    found = []
    for folder, entries in files.items():
        for name, text in entries.items():
            for target in INCLUDE.findall(text):
                target_folder = folder_of_include(target)
                if target_folder is None:
                    if target.startswith("cc/"):
                        found.append(f"{folder}/{name}: includes {target}, outside every layer")
                    continue
                if target_folder == folder:
                    continue
                if LAYERS[target_folder] >= LAYERS[folder]:
                    found.append(f"{folder}/{name}: includes {target} ({target_folder} is not "
                                 f"below {folder})")
    return found


def read_tree(root):
    files = {}
    for folder in LAYERS:
        directory = os.path.join(root, folder)
        entries = {}
        for name in sorted(os.listdir(directory)):
            if name.endswith(SOURCE_SUFFIXES):
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    entries[name] = f.read()
        if not entries:
            raise SystemExit(f"no sources found in {directory}: is //cc:sources in data?")
        files[folder] = entries
    return files


def check_the_checker():
    """The rule must reject each kind of upward or sideways arrow (else the test proves nothing)."""
    bad = {
        "cc/base": {"a.h": '#include "cc/src/validate.h"\n'},
        "cc/cpu": {"b.cc": '#include "cc/cuda/device.h"\n'},
        "cc/cuda": {"c.cu": '#include "cc/src/backend.h"\n'},
        "cc/include/mxmoe": {"d.h": '#include "cc/base/status.h"\n'},
    }
    good = {
        "cc/src": {"e.cc": '#include "cc/cpu/cpu_backend.h"\n#include "cc/cuda/device.h"\n'},
        "cc/cuda": {"f.cu": '#include "cc/base/status.h"\n#include "mxmoe/format.h"\n'},
    }
    assert len(violations(bad)) == 4, violations(bad)
    assert violations(good) == [], violations(good)


def main():
    check_the_checker()
    root = os.environ.get("TEST_SRCDIR")
    if root:  # under bazel test: the runfiles tree of the main repository
        root = os.path.join(root, os.environ.get("TEST_WORKSPACE", "__main__"))
    else:
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    files = read_tree(root)
    found = violations(files)
    for line in found:
        print(line)
    count = sum(len(entries) for entries in files.values())
    if found:
        print(f"FAILED: {len(found)} upward include(s) in {count} files")
        return 1
    print(f"OK: {count} files, includes point downward only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
