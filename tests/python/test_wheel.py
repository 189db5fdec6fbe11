"""The wheel (//py:wheel) installs into a fresh venv and works there: pip installs it offline,
``import mxmoe`` resolves to the venv's site-packages from a directory with no Bazel outputs on
sys.path, and a small MoE forward runs and matches mxmoe's reference. Also checks the wheel's
metadata (name, version = mxmoe.h's, tag, torch/numpy requirements) and RECORD hashes.

The fresh venv sees torch and numpy of the interpreter running the test through a .pth file
(this machine has no network for pip to fetch them); nothing else of the project is visible.
Cost: about 10-20 s (venv creation, pip install, one import of torch).
"""

import base64
import glob
import hashlib
import os
import re
import subprocess
import sys
import sysconfig
import zipfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def find_wheel() -> str:
    root = os.environ.get("TEST_SRCDIR", "")
    found = glob.glob(os.path.join(root, "**", "py", "mxmoe-*.whl"), recursive=True)
    if not found:
        found = glob.glob(os.path.join(HERE, "..", "..", "py", "mxmoe-*.whl"))
    assert found, "the wheel (//py:wheel) is not among this test's data"
    return os.path.realpath(found[0])


def test_wheel_metadata_and_record():
    path = find_wheel()
    name = os.path.basename(path)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert re.fullmatch(rf"mxmoe-\d+\.\d+\.\d+-{tag}-{tag}-linux_x86_64\.whl", name), name
    version = name.split("-")[1]
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert {"mxmoe/__init__.py", "mxmoe/ops.py", "mxmoe/library.py", "mxmoe/vllm.py",
                "mxmoe/_mxmoe.so"} <= set(names)
        meta = zf.read(f"mxmoe-{version}.dist-info/METADATA").decode()
        assert f"Version: {version}" in meta and "Requires-Dist: torch>=" in meta
        assert "Requires-Dist: numpy>=" in meta
        wheel = zf.read(f"mxmoe-{version}.dist-info/WHEEL").decode()
        assert f"Tag: {tag}-{tag}-linux_x86_64" in wheel and "Root-Is-Purelib: false" in wheel
        record = zf.read(f"mxmoe-{version}.dist-info/RECORD").decode().splitlines()
        listed = {}
        for line in record:
            file, digest, size = line.rsplit(",", 2)
            listed[file] = (digest, size)
        assert set(listed) == set(names)
        for file, (digest, size) in listed.items():
            if file.endswith("RECORD"):
                continue
            data = zf.read(file)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == "sha256=" + want.decode() and int(size) == len(data), file


SMOKE = r"""
import os, sys, torch
import mxmoe
from mxmoe import reference
assert os.path.realpath(mxmoe.__file__).startswith(os.path.realpath(sys.prefix)), mxmoe.__file__
assert not any("runfiles" in p or "bazel-out" in p for p in sys.path), sys.path
g = torch.Generator().manual_seed(0)
w13 = torch.randn(4, 64, 64, generator=g).bfloat16()
w2 = torch.randn(4, 64, 32, generator=g).bfloat16()
layer = mxmoe.MoELayer.from_float(w13, w2)
x = torch.randn(3, 64, generator=g).bfloat16()
logits = torch.randn(3, 4, generator=g)
out = layer(x, logits, top_k=2)
want = reference.moe_forward(x, layer.w13_packed, layer.w13_scales, layer.w2_packed,
                             layer.w2_scales, router_logits=logits, top_k=2)
err = float((out.double() - want.double()).norm() / want.double().norm())
assert err <= 5e-3, err  # the gate tests/python/test_moe.py applies
print("wheel ok", mxmoe.version(), mxmoe.__file__)
"""


def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    wheel = find_wheel()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.check_output([str(python), "-c", "import sysconfig; "
                                    "print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    # torch and numpy from the running interpreter's site-packages, and nothing else of it.
    parent = sysconfig.get_paths()["purelib"]
    with open(os.path.join(site, "_parent_torch.pth"), "w") as f:
        f.write(parent + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RUNFILES"))}
    env["PYTHONNOUSERSITE"] = "1"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--no-index", "--no-deps", "--no-cache-dir", "--quiet", wheel],
                   check=True, env=env, cwd=tmp_path)
    run = subprocess.run([str(python), "-c", SMOKE], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "wheel ok" in run.stdout
    # The parent site-packages must not hold another mxmoe that the import could have found.
    assert not os.path.exists(os.path.join(parent, "mxmoe")), parent


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
