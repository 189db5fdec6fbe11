"""The vLLM Marlin peer's CPU-side code (bench/peers/vllm_marlin.py): its loader's errors and
the layout steps that need no vLLM. The layer itself needs vLLM's CUDA extensions and runs in
bench/peers/check_vllm_marlin.py on a GPU (results: bench/results/h200-vllm-marlin-check.json)."""

import importlib.util
import os
import sys
import zipfile

import pytest
import torch

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "peers")


def _load_module():
    spec = importlib.util.spec_from_file_location("vllm_marlin",
                                                  os.path.join(PEERS, "vllm_marlin.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


vm = _load_module()


def test_load_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope: no such file"):
        vm.load(str(missing))


def test_load_directory_without_the_extensions_names_them(tmp_path):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "scalar_type.py").write_text("")
    with pytest.raises(FileNotFoundError, match=r"_moe_C_stable_libtorch\.abi3\.so"):
        vm.load(str(tmp_path))


def test_load_wheel_without_the_extensions_names_them(tmp_path):
    wheel = tmp_path / "vllm-0.0.0-cp38-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("vllm/scalar_type.py", "")
    with pytest.raises(FileNotFoundError, match="lacks"):
        vm.load(str(wheel))


def test_permutations_are_permutations():
    assert sorted(vm._scale_perm()) == list(range(64))
    assert sorted(vm._bias_perm()) == list(range(32))


def test_marlin_scales_move_every_byte_once():
    n, groups = 256, 16  # N, K/32
    scales = torch.randint(100, 140, (n, groups), dtype=torch.uint8)
    out = vm._marlin_scales(scales)
    assert out.shape == (groups, n) and out.dtype == torch.float8_e8m0fnu
    assert torch.equal(out.view(torch.uint8).flatten().sort().values,
                       scales.flatten().sort().values)
    # The pair swap is a real difference (a layout mistake would not go unseen).
    unswapped = vm._marlin_scales(scales, False)
    assert not torch.equal(out.view(torch.uint8), unswapped.view(torch.uint8))


def test_pad_w13_pads_gate_and_up_separately():
    e, inter, cols = 2, 3, 4
    t = torch.arange(e * 2 * inter * cols).reshape(e, 2 * inter, cols) + 1
    out = vm._pad_w13(t, inter, 5, 6)
    assert out.shape == (e, 10, 6)
    assert torch.equal(out[:, :inter, :cols], t[:, :inter])
    assert torch.equal(out[:, 5:5 + inter, :cols], t[:, inter:])
    assert int(out[:, inter:5].abs().sum()) == 0 and int(out[:, 5 + inter:].abs().sum()) == 0
    assert int(out[..., cols:].abs().sum()) == 0


def test_round_up_matches_vllm_marlin_rule():
    # vLLM pads H to 256 and I to 128 for Marlin: GPT-OSS 2880 -> 3072 / 2944.
    assert vm._round_up(2880, vm.HIDDEN_ALIGN) == 3072
    assert vm._round_up(2880, vm.INTER_ALIGN) == 2944
    assert vm._round_up(7168, vm.HIDDEN_ALIGN) == 7168
