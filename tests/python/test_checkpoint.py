"""MoELayer.from_checkpoint / save_checkpoint: compressed-tensors style MXFP4 W4A4 safetensors.

Each test writes its own small checkpoint: random bf16 experts quantized with
ops.quantize_weights, split into per-expert gate/up/down ``weight_packed`` / ``weight_scale``
tensors. Loading must give the expected w13/w2 buffers bit for bit and the same forward as a
layer built from the packed tensors directly; every malformed checkpoint must fail with a
ValueError whose message names the tensor, its shape or dtype, and what was expected.
"""

import re

import pytest
import torch
from expectations import random_activations
from safetensors import safe_open
from safetensors.torch import save_file

import mxmoe
from mxmoe import checkpoint, ops

PREFIX = "model.layers.3.mlp"
E8M0 = getattr(torch, "float8_e8m0fnu", None)


def expected_weights(e, h, i, seed):
    """LINEAR w13 [E, 2I, H/2] + [E, 2I, H/32] and w2 [E, H, I/2] + [E, H, I/32] from bf16."""
    w13 = random_activations((e, 2 * i, h), seed=seed, scale=h**-0.5)
    w2 = random_activations((e, h, i), seed=seed + 1, scale=i**-0.5)
    return (*ops.quantize_weights(w13), *ops.quantize_weights(w2))


def split(w13_packed, w13_scales, w2_packed, w2_scales, prefix=PREFIX, global_ids=None,
          scale_dtype=torch.uint8):
    """The per-expert checkpoint tensors of LINEAR weights (expert l saved as global_ids[l])."""
    i = w13_packed.shape[1] // 2
    head = f"{prefix}.experts." if prefix else "experts."
    tensors = {}
    for local in range(w13_packed.shape[0]):
        g = local if global_ids is None else global_ids[local]
        parts = {"gate_proj": (w13_packed[local, :i], w13_scales[local, :i]),
                 "up_proj": (w13_packed[local, i:], w13_scales[local, i:]),
                 "down_proj": (w2_packed[local], w2_scales[local])}
        for proj, (packed, scales) in parts.items():
            tensors[f"{head}{g}.{proj}.weight_packed"] = packed.clone()
            tensors[f"{head}{g}.{proj}.weight_scale"] = scales.clone().view(
                scale_dtype)
    return tensors


def unrelated_tensors(h, e):
    """What else sits in a real checkpoint: the router, attention, another layer's experts."""
    return {
        f"{PREFIX}.gate.weight": torch.randn(e, h).to(torch.bfloat16),
        "model.layers.3.self_attn.q_proj.weight": torch.randn(h, h).to(torch.bfloat16),
        "model.layers.4.mlp.experts.0.gate_proj.weight_packed": torch.zeros(8, 8,
                                                                            dtype=torch.uint8),
        "model.layers.13.mlp.experts.0.gate_proj.weight_packed": torch.zeros(3, dtype=torch.int8),
    }


def assert_weights_equal(layer, want, note=""):
    names = ("w13_packed", "w13_scales", "w2_packed", "w2_scales")
    for name, w in zip(names, want, strict=True):
        got = getattr(layer, name)
        assert got.dtype == torch.uint8 and got.is_contiguous(), f"{name} {note}"
        assert got.shape == w.shape, f"{name}: {list(got.shape)} vs {list(w.shape)} {note}"
        assert torch.equal(got, w), f"{name} differs {note} (shape {list(w.shape)})"


def assert_same_forward(layer, direct, h, e_global, seed, tokens=7, top_k=2):
    x = random_activations((tokens, h), seed=seed)
    logits = random_activations((tokens, e_global), seed=seed + 1, dtype=torch.float32)
    top_k = min(top_k, e_global)
    got, want = layer(x, logits, top_k=top_k), direct(x, logits, top_k=top_k)
    assert torch.equal(got, want), f"forward differs: {tokens=} {h=} {e_global=}"


# ---- Loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("e", "h", "i"), [(5, 96, 64), (1, 32, 32), (3, 2880, 160)])
def test_load_file_bit_exact_and_same_forward(tmp_path, e, h, i):
    want = expected_weights(e, h, i, seed=e + h + i)
    path = tmp_path / "model.safetensors"
    save_file({**split(*want), **unrelated_tensors(h, e)}, str(path))
    layer = mxmoe.MoELayer.from_checkpoint(str(path), PREFIX)
    assert_weights_equal(layer, want, f"{e=} {h=} {i=}")
    assert (layer.num_experts, layer.hidden_size, layer.intermediate_size) == (e, h, i)
    assert_same_forward(layer, mxmoe.MoELayer(*want), h, e, seed=7)


def test_load_dict_with_trailing_dot_prefix_and_explicit_num_experts():
    want = expected_weights(4, 64, 96, seed=1)
    tensors = {**split(*want), **unrelated_tensors(64, 4)}
    layer = mxmoe.MoELayer.from_checkpoint(tensors, PREFIX + ".", num_experts=4,
                                           device=torch.device("cpu"))
    assert_weights_equal(layer, want)
    assert layer.w13_packed.device.type == "cpu" and layer.expert_map is None


def test_load_empty_prefix():
    want = expected_weights(2, 32, 64, seed=2)
    tensors = split(*want, prefix="")
    assert "experts.1.down_proj.weight_scale" in tensors
    assert_weights_equal(mxmoe.MoELayer.from_checkpoint(tensors, ""), want)


@pytest.mark.skipif(E8M0 is None, reason="torch has no float8_e8m0fnu")
def test_load_e8m0_scales_from_file(tmp_path):
    want = expected_weights(3, 64, 64, seed=3)
    path = tmp_path / "e8m0.safetensors"
    save_file(split(*want, scale_dtype=E8M0), str(path))
    with safe_open(str(path), "pt") as f:
        assert f.get_slice(f"{PREFIX}.experts.0.up_proj.weight_scale").get_dtype() == "F8_E8M0"
    assert_weights_equal(mxmoe.MoELayer.from_checkpoint(path, PREFIX), want)


def test_sharded_two_files_directory_and_index(tmp_path):
    e, h, i = 4, 96, 96
    want = expected_weights(e, h, i, seed=4)
    tensors = {**split(*want), **unrelated_tensors(h, e)}
    # Split awkwardly: a projection's codes and scales, and experts, land in different shards.
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[0::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(tmp_path / file))
    paths = [tmp_path / file for file in shards]
    assert_weights_equal(mxmoe.MoELayer.from_checkpoint(paths, PREFIX), want, "list of files")
    assert_weights_equal(mxmoe.MoELayer.from_checkpoint([str(p) for p in reversed(paths)],
                                                        PREFIX), want, "reversed list")
    assert_weights_equal(mxmoe.MoELayer.from_checkpoint(tmp_path, PREFIX), want, "directory")
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    index.write_text('{"metadata": {}, "weight_map": ' +
                     str(weight_map).replace("'", '"') + "}")
    assert_weights_equal(mxmoe.MoELayer.from_checkpoint(index, PREFIX), want, "index")


def test_reads_headers_first_then_only_the_layer(tmp_path, monkeypatch):
    e, h, i = 3, 64, 32
    want = expected_weights(e, h, i, seed=5)
    path = tmp_path / "model.safetensors"
    save_file({**split(*want), **unrelated_tensors(h, e)}, str(path))
    read = []
    real_read = checkpoint._SafetensorsFile.read

    def recording_read(self, name):
        read.append(name)
        return real_read(self, name)

    monkeypatch.setattr(checkpoint._SafetensorsFile, "read", recording_read)
    layer = mxmoe.MoELayer.from_checkpoint(path, PREFIX)
    assert_weights_equal(layer, want)
    # The layer's own tensors only: its experts and its router (the block's gate).
    assert sorted(read) == sorted([*split(*want), f"{PREFIX}.gate.weight"]), f"read {read}"
    assert layer.router_weight is not None
    # A bad header fails before any tensor data is read.
    read.clear()
    bad = split(*want)
    bad[f"{PREFIX}.experts.2.down_proj.weight_scale"] = torch.zeros(h, 2, dtype=torch.uint8)
    save_file(bad, str(path))
    with pytest.raises(ValueError, match=re.escape("experts.2.down_proj.weight_scale")):
        mxmoe.MoELayer.from_checkpoint(path, PREFIX)
    assert read == []


def test_expert_map_loads_only_the_kept_experts(tmp_path):
    e_global, h, i = 6, 64, 64
    want = expected_weights(e_global, h, i, seed=6)
    expert_map = torch.tensor([-1, 2, -1, 0, -1, 1], dtype=torch.int32)
    kept = [3, 5, 1]  # local 0, 1, 2
    local_want = tuple(w[kept] for w in want)
    layer = mxmoe.MoELayer.from_checkpoint(split(*want), PREFIX, expert_map=expert_map)
    assert_weights_equal(layer, local_want)
    assert layer.expert_map.dtype == torch.int32 and torch.equal(layer.expert_map, expert_map)
    direct = mxmoe.MoELayer(*local_want, expert_map=expert_map)
    assert_same_forward(layer, direct, h, e_global, seed=8, tokens=16)
    # A per-rank checkpoint holding only this rank's experts loads too; a list map works.
    only_kept = {n: t for n, t in split(*want).items()
                 if int(n.split(".experts.")[1].split(".")[0]) in kept}
    layer = mxmoe.MoELayer.from_checkpoint(only_kept, PREFIX, num_experts=6,
                                           expert_map=expert_map.tolist())
    assert_weights_equal(layer, local_want, "per-rank checkpoint")
    # save_checkpoint writes global ids, so the same map reads the same layer back.
    path = tmp_path / "rank.safetensors"
    layer.save_checkpoint(path, PREFIX)
    with safe_open(str(path), "pt") as f:
        saved = {int(n.split(".experts.")[1].split(".")[0]) for n in f.keys()}  # noqa: SIM118
    assert saved == set(kept)
    again = mxmoe.MoELayer.from_checkpoint(path, PREFIX, expert_map=expert_map)
    assert_weights_equal(again, local_want, "saved with expert_map")


# ---- Saving ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", [torch.uint8, E8M0])
def test_save_round_trip_from_float(tmp_path, scale_dtype):
    if scale_dtype is None:
        pytest.skip("torch has no float8_e8m0fnu")
    e, h, i = 3, 96, 64
    w13 = random_activations((e, 2 * i, h), seed=9, scale=h**-0.5)
    w2 = random_activations((e, h, i), seed=10, scale=i**-0.5)
    layer = mxmoe.MoELayer.from_float(w13, w2)
    path = tmp_path / "quantized.safetensors"
    layer.save_checkpoint(path, PREFIX, scale_dtype=scale_dtype)
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        assert f.metadata()["mxmoe.quantization"] == "mxfp4-w4a4"
        packed = f.get_slice(f"{PREFIX}.experts.2.down_proj.weight_packed")
        scale = f.get_slice(f"{PREFIX}.experts.2.down_proj.weight_scale")
        assert (packed.get_shape(), packed.get_dtype()) == ([h, i // 2], "U8")
        assert (scale.get_shape(), scale.get_dtype()) == (
            [h, i // 32], "U8" if scale_dtype == torch.uint8 else "F8_E8M0")
    assert names == {f"{PREFIX}.experts.{g}.{proj}.{kind}" for g in range(e)
                     for proj in checkpoint.PROJECTIONS
                     for kind in ("weight_packed", "weight_scale")}
    loaded = mxmoe.MoELayer.from_checkpoint(path, PREFIX)
    want = (layer.w13_packed, layer.w13_scales, layer.w2_packed, layer.w2_scales)
    assert_weights_equal(loaded, want)
    assert_same_forward(loaded, layer, h, e, seed=11, tokens=1, top_k=1)


# ---- Rejections --------------------------------------------------------------------------------

# The contract's symbols: gate/up [96, 32] + [96, 2], down [64, 48] + [64, 3].
E, H, I = 3, 64, 96  # noqa: E741


def name(e, proj, kind):
    return f"{PREFIX}.experts.{e}.{proj}.{kind}"


def good():
    return split(*expected_weights(E, H, I, seed=12))


def u8(*shape):
    return torch.zeros(*shape, dtype=torch.uint8)


def with_changes(**changes):
    tensors = good()
    for key, value in changes.items():
        e, proj, kind = key.split("__")
        tensors[name(int(e[1:]), proj, kind)] = value
    return tensors


def rejects(tensors, *fragments, **kwargs):
    """from_checkpoint must raise a ValueError whose message holds every fragment, in order."""
    pattern = ".*".join(re.escape(f) for f in fragments)
    with pytest.raises(ValueError, match=pattern) as info:
        mxmoe.MoELayer.from_checkpoint(tensors, PREFIX, **kwargs)
    assert isinstance(info.value, mxmoe.InvalidArgumentError)
    return str(info.value)


def test_rejects_bf16_weight_packed():
    rejects(with_changes(e1__gate_proj__weight_packed=torch.zeros(I, H // 2,
                                                                  dtype=torch.bfloat16)),
            name(1, "gate_proj", "weight_packed"), "shape [96, 32] dtype bfloat16",
            "expected dtype uint8 [I, H/2]")


def test_rejects_float32_weight_scale():
    rejects(with_changes(e2__down_proj__weight_scale=torch.zeros(H, I // 32)),
            name(2, "down_proj", "weight_scale"), "shape [64, 3] dtype float32",
            "expected dtype uint8", "[H, I/32]")


def test_rejects_wrong_rank():
    rejects(with_changes(e0__up_proj__weight_packed=u8(1, I, H // 2)),
            name(0, "up_proj", "weight_packed"), "shape [1, 96, 32]", "expected a 2-D uint8")
    rejects(with_changes(e0__up_proj__weight_scale=u8(I * H // 32)),
            name(0, "up_proj", "weight_scale"), "shape [192]", "expected a 2-D")


def test_rejects_inconsistent_h_across_experts():
    rejects(with_changes(e2__gate_proj__weight_packed=u8(I, H // 2 + 16),
                         e2__gate_proj__weight_scale=u8(I, H // 32 + 1)),
            name(2, "gate_proj", "weight_packed"), "shape [96, 48] dtype uint8;",
            "expected [I, H/2] = [96, 32]",
            f"H=64, I=96 from {name(0, 'gate_proj', 'weight_packed')}")


def test_rejects_inconsistent_i_between_projections():
    rejects(with_changes(e0__down_proj__weight_packed=u8(H, I // 2 - 16)),
            name(0, "down_proj", "weight_packed"), "shape [64, 32] dtype uint8",
            "expected [H, I/2] = [64, 48]", "inconsistent H or I")
    rejects(with_changes(e1__up_proj__weight_packed=u8(I + 32, H // 2)),
            name(1, "up_proj", "weight_packed"), "shape [128, 32]",
            "expected [I, H/2] = [96, 32]")


def test_rejects_scales_not_matching_packed():
    rejects(with_changes(e1__down_proj__weight_scale=u8(H, I // 32 + 1)),
            name(1, "down_proj", "weight_scale"), "shape [64, 4] dtype uint8;",
            "expected [H, I/32] = [64, 3] to match its weight_packed [64, 48]",
            "K/32 = 3 scales per row for K/2 = 48 code bytes")
    rejects(with_changes(e0__gate_proj__weight_scale=u8(I, H // 2)),
            name(0, "gate_proj", "weight_scale"), "shape [96, 32]", "[I, H/32] = [96, 2]")


@pytest.mark.parametrize(("h", "i", "symbol", "value"), [(48, 64, "H", 48), (64, 80, "I", 80)])
def test_rejects_h_or_i_not_a_multiple_of_32(h, i, symbol, value):
    # Hand-made bytes: quantize_weights itself refuses K % 32 != 0.
    tensors = {}
    for e in range(2):
        for proj, (n, k) in {"gate_proj": (i, h), "up_proj": (i, h),
                             "down_proj": (h, i)}.items():
            tensors[name(e, proj, "weight_packed")] = u8(n, k // 2)
            tensors[name(e, proj, "weight_scale")] = u8(n, max(1, k // 32))
    rejects(tensors, name(0, "gate_proj", "weight_packed"), f"{symbol} = ", f"= {value}",
            "not a multiple of 32")


def test_rejects_missing_expert_or_projection():
    tensors = {n: t for n, t in good().items() if ".experts.1." not in n}
    rejects(tensors, "expert 1 is missing", name(1, "gate_proj", "weight_packed"),
            "not found", "5 more tensors missing")
    tensors = good()
    del tensors[name(2, "up_proj", "weight_scale")]
    rejects(tensors, "expert 2 has no up_proj weight_scale",
            name(2, "up_proj", "weight_scale"), "not found")
    # An unquantized expert gets a hint.
    tensors = good()
    del tensors[name(0, "down_proj", "weight_packed")]
    tensors[f"{PREFIX}.experts.0.down_proj.weight"] = torch.zeros(H, I, dtype=torch.bfloat16)
    rejects(tensors, name(0, "down_proj", "weight_packed"),
            "down_proj.weight [64, 96] bfloat16, an unquantized weight", "from_float")
    # Asking for more experts than stored names the first absent one.
    rejects(good(), "expert 3 is missing", name(3, "gate_proj", "weight_packed"), num_experts=4)


def test_rejects_expert_count_and_map_mismatches():
    rejects(good(), "holds expert 2", "num_experts=2", num_experts=2)
    rejects(good(), "holds expert 2", "expert_map has 2 entries", expert_map=[0, -1])
    rejects(good(), "num_experts=4 disagrees with expert_map of 3 entries", num_experts=4,
            expert_map=[0, 1, 2])
    rejects(good(), "local ids 0..L-1", "[0, 0]", expert_map=[0, -1, 0])
    rejects(good(), "local ids 0..L-1", "[1]", expert_map=[-1, 1, -1])
    rejects(good(), "keeps no experts", expert_map=[-1, -1, -1])
    rejects(good(), "expert_map must be a 1-D integer", "dtype float32",
            expert_map=torch.zeros(3))


def test_rejects_wrong_prefix_and_bad_sources(tmp_path):
    with pytest.raises(ValueError, match=re.escape(
            "no tensors named model.layers.9.mlp.experts.<e>.<proj>.weight_packed in the tensor "
            f"dict (18 tensors); names with '.experts.' look like ['{PREFIX}.experts.0.")):
        mxmoe.MoELayer.from_checkpoint(good(), "model.layers.9.mlp")
    tensors = good()
    tensors[name(0, "gate_proj", "weight_scale")] = [[0]]
    rejects(tensors, name(0, "gate_proj", "weight_scale"), "must be a torch.Tensor, got list")
    with pytest.raises(ValueError, match="does not exist"):
        mxmoe.MoELayer.from_checkpoint(tmp_path / "absent.safetensors", PREFIX)
    with pytest.raises(ValueError, match="holds no"):
        mxmoe.MoELayer.from_checkpoint(tmp_path, PREFIX)
    with pytest.raises(ValueError, match="got int"):
        mxmoe.MoELayer.from_checkpoint(3, PREFIX)


def test_rejects_in_files_name_the_file_and_the_header_dtype(tmp_path):
    tensors = good()
    tensors[name(1, "up_proj", "weight_packed")] = torch.zeros(I, H // 2, dtype=torch.bfloat16)
    first = {n: t for n, t in tensors.items() if ".experts.1." not in n}
    second = {n: t for n, t in tensors.items() if ".experts.1." in n}
    save_file(first, str(tmp_path / "a.safetensors"))
    save_file(second, str(tmp_path / "b.safetensors"))
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    with pytest.raises(ValueError, match=re.escape(
            f"{name(1, 'up_proj', 'weight_packed')} (in {paths[1]}) has shape [96, 32] dtype "
            f"bfloat16; expected dtype uint8")):
        mxmoe.MoELayer.from_checkpoint(paths, PREFIX)
    # The same tensor in two shards is ambiguous.
    save_file({name(1, "up_proj", "weight_packed"): u8(I, H // 2)},
              str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match=re.escape(
            f"{name(1, 'up_proj', 'weight_packed')} is stored twice")):
        mxmoe.MoELayer.from_checkpoint([*paths, tmp_path / "c.safetensors"], PREFIX)
