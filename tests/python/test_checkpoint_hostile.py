"""The checkpoint loader against hostile files: stray expert ids, leading zeros, corrupt,
truncated and header-mangled safetensors files, bad index files, and a structured fuzzer over
all of them.

Every bad case must raise InvalidArgumentError whose message names the file (or the index), in
bounded time and memory (nothing allocated beyond what the file holds), and return no layer.
The fuzzer's case count is small here (seconds); MXMOE_FUZZ_SECONDS=600 runs it for ten minutes
(docs/hostile-input.md).
"""

import json
import os
import random
import resource
import struct
import time

import pytest
import torch
from expectations import random_activations
from safetensors.torch import save_file

import mxmoe
from mxmoe import checkpoint, ops

PREFIX = "model.layers.0.mlp"
E, H, I = 3, 64, 32  # noqa: E741 (the model's names)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def layer_tensors(e=E, h=H, i=I, seed=0, ids=None, prefix=PREFIX):
    w13 = ops.quantize_weights(random_activations((e, 2 * i, h), seed=seed, scale=0.1))
    w2 = ops.quantize_weights(random_activations((e, h, i), seed=seed + 1, scale=0.1))
    tensors = {}
    for local in range(e):
        g = local if ids is None else ids[local]
        parts = {"gate_proj": (w13[0][local, :i], w13[1][local, :i]),
                 "up_proj": (w13[0][local, i:], w13[1][local, i:]),
                 "down_proj": (w2[0][local], w2[1][local])}
        for proj, (packed, scales) in parts.items():
            tensors[f"{prefix}.experts.{g}.{proj}.weight_packed"] = packed.clone()
            tensors[f"{prefix}.experts.{g}.{proj}.weight_scale"] = scales.clone()
    return tensors, (*w13, *w2)


def expect_file_error(fn, path, *fragments):
    with pytest.raises(mxmoe.InvalidArgumentError) as info:
        fn()
    message = str(info.value)
    assert str(path) in message, f"the message does not name {path}: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"expected {fragment!r} in {message!r}"
    return message


# ---- expert ids --------------------------------------------------------------------------------


def test_stray_huge_expert_id_fails_fast_without_allocating(tmp_path):
    tensors, _ = layer_tensors()
    tensors[f"{PREFIX}.experts.100000000.gate_proj.weight_packed"] = torch.zeros(2, 2,
                                                                              dtype=torch.uint8)
    path = tmp_path / "stray.safetensors"
    save_file(tensors, str(path))
    before, start = max_rss_mib(), time.monotonic()
    # Once 39 s and many GB: the loader enumerated 10^8 experts before failing.
    message = expect_file_error(lambda: mxmoe.MoELayer.from_checkpoint(path, PREFIX), path,
                                "expert 3 is missing")
    assert "599999" in message  # 10^8 + 1 experts x 6 tensors, minus those present, minus one
    with pytest.raises(mxmoe.InvalidArgumentError, match="expert 3 is missing"):
        mxmoe.MoELayer.from_checkpoint(tensors, PREFIX)
    with pytest.raises(mxmoe.InvalidArgumentError, match="holds expert 100000000"):
        mxmoe.MoELayer.from_checkpoint(tensors, PREFIX, num_experts=3)
    with pytest.raises(mxmoe.InvalidArgumentError, match="expert 3 is missing"):
        mxmoe.MoELayer.from_checkpoint(tensors, PREFIX, num_experts=10**9)
    assert time.monotonic() - start < 10
    assert max_rss_mib() - before < 64


def test_expert_ids_with_leading_zeros_are_the_same_experts(tmp_path):
    tensors, want = layer_tensors()
    zeros = {name.replace(".experts.", ".experts.00"): t for name, t in tensors.items()}
    path = tmp_path / "zeros.safetensors"
    save_file(zeros, str(path))
    # Once a KeyError: the id was parsed as 0 but looked up as "experts.0".
    layer = mxmoe.MoELayer.from_checkpoint(path, PREFIX)
    for name, w in zip(("w13_packed", "w13_scales", "w2_packed", "w2_scales"), want,
                       strict=True):
        assert torch.equal(getattr(layer, name), w), name
    both = dict(tensors)
    both[f"{PREFIX}.experts.01.up_proj.weight_packed"] = tensors[
        f"{PREFIX}.experts.1.up_proj.weight_packed"]
    with pytest.raises(mxmoe.InvalidArgumentError, match="expert 1 is stored twice"):
        mxmoe.MoELayer.from_checkpoint(both, PREFIX)
    long = dict(tensors)
    long[f"{PREFIX}.experts.{'9' * 5000}.up_proj.weight_packed"] = torch.zeros(1,
                                                                             dtype=torch.uint8)
    with pytest.raises(mxmoe.InvalidArgumentError, match="at most 9 digits"):
        mxmoe.MoELayer.from_checkpoint(long, PREFIX)


# ---- corrupt files -------------------------------------------------------------------------------


def write_layer(path, **kwargs):
    tensors, want = layer_tensors(**kwargs)
    save_file(tensors, str(path))
    return want


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write_layer(path)
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    cases = {
        "empty": b"",
        "7 bytes": data[:7],
        "header cut": data[: 8 + header_len // 2],
        "data cut": data[:-10],
        "huge header length": struct.pack("<Q", 2**63) + data[8:],
        "header not JSON": data[:8] + b"\xff" * header_len + data[8 + header_len:],
        "header a list": struct.pack("<Q", 2) + b"[]",
    }
    for what, blob in cases.items():
        bad = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        bad.write_bytes(blob)
        expect_file_error(lambda bad=bad: mxmoe.MoELayer.from_checkpoint(bad, PREFIX), bad,
                          "not a valid safetensors file")


def mangle_header(path, fn):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    fn(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize(("what", "mangle", "fragment"), [
    ("huge shape", lambda h, k: h[k].update(shape=[2**40, 2**40]), "hold"),
    ("offsets past the end", lambda h, k: h[k].update(data_offsets=[0, 2**50]), "outside"),
    ("negative offset", lambda h, k: h[k].update(data_offsets=[-8, 0]), "outside"),
    ("float shape", lambda h, k: h[k].update(shape=[1.5]), "shape must be"),
    ("bool dim", lambda h, k: h[k].update(shape=[True, 1]), "shape must be"),
    ("no dtype", lambda h, k: h[k].pop("dtype"), "dtype must be"),
    ("entry not an object", lambda h, k: h.update({k: 7}), "must be a JSON object"),
])
def test_mangled_headers_fail_before_allocating(tmp_path, what, mangle, fragment):
    path = tmp_path / "model.safetensors"
    write_layer(path)
    key = f"{PREFIX}.experts.1.down_proj.weight_packed"
    mangle_header(path, lambda h: mangle(h, key))
    before = max_rss_mib()
    expect_file_error(lambda: mxmoe.MoELayer.from_checkpoint(path, PREFIX), path, fragment)
    assert max_rss_mib() - before < 64, what


def test_file_truncated_after_opening_is_an_error_not_sigbus(tmp_path):
    path = tmp_path / "model.safetensors"
    write_layer(path)
    import contextlib

    with contextlib.ExitStack() as stack:
        tensors = checkpoint._Tensors(str(path), stack)
        name = f"{PREFIX}.experts.2.down_proj.weight_packed"
        assert tensors.load(name).shape == (H, I // 2)
        # Once SIGBUS: safe_open memory-maps the file, and the pages past the new end vanish.
        os.truncate(path, 200)
        expect_file_error(lambda: tensors.load(name), path, "was truncated")


# ---- index files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("what", "text", "fragment"), [
    ("not JSON", "{weight_map:", "is not valid JSON"),
    ("a list", "[1, 2]", "has no \"weight_map\""),
    ("weight_map a list", '{"weight_map": ["a"]}', "has no \"weight_map\""),
    ("empty weight_map", '{"weight_map": {}}', "has no \"weight_map\""),
    ("file not a string", '{"weight_map": {"x": 3}}', "expected the name of a shard"),
    ("escaping path", '{"weight_map": {"x": "../model.safetensors"}}', "beside the index"),
    ("absolute path", '{"weight_map": {"x": "/etc/passwd"}}', "beside the index"),
    ("missing shard", '{"weight_map": {"x": "nope.safetensors"}}', "does not exist"),
    ("name in another shard", None, "but it is in"),
    ("name in no shard", None, "no shard holds it"),
])
def test_bad_index_files(tmp_path, what, text, fragment):
    write_layer(tmp_path / "a.safetensors")
    write_layer(tmp_path / "b.safetensors", prefix="other")
    index = tmp_path / "model.safetensors.index.json"
    if text is None:
        tensors, _ = layer_tensors()
        weight_map = dict.fromkeys(tensors, "a.safetensors")
        if what == "name in another shard":
            weight_map[f"{PREFIX}.experts.0.up_proj.weight_scale"] = "b.safetensors"
            weight_map["other.experts.0.up_proj.weight_scale"] = "b.safetensors"
        else:
            weight_map["not.there"] = "a.safetensors"
        text = json.dumps({"weight_map": weight_map})
    index.write_text(text)
    # Once FileNotFoundError / AttributeError / JSONDecodeError.
    expect_file_error(lambda: mxmoe.MoELayer.from_checkpoint(index, PREFIX), index, fragment)


# ---- the structured fuzzer -----------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One hostile variant of a valid safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    choice = rng.randrange(6)
    b = bytearray(data)
    if choice == 0:  # truncate anywhere
        return bytes(b[:rng.randrange(len(b))])
    if choice == 1:  # flip bits in the header
        for _ in range(rng.randint(1, 4)):
            b[8 + rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(b)
    if choice == 2:  # flip bits anywhere (data flips must load, with other values)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if choice == 3:  # a different header length
        value = rng.choice([0, 1, n - 1, n + 1, len(b), 2**32, 2**63, 2**64 - 1])
        return struct.pack("<Q", value % 2**64) + bytes(b[8:])
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    key = rng.choice(names)
    hostile = [-1, 0, 1, 2**31, 2**32, 2**53, 2**63, 10**30, 1.5, "7", None, True, [], {}]
    if choice == 4:  # a hostile value in one entry
        field = rng.choice(["shape", "data_offsets", "dtype"])
        if field == "dtype":
            header[key]["dtype"] = rng.choice(["U8", "F4", "BF16", "F64", "", "u8", 7])
        else:
            value = list(header[key][field])
            if value:
                value[rng.randrange(len(value))] = rng.choice(hostile)
            else:
                value = [rng.choice(hostile)]
            header[key][field] = value
    else:  # rename, duplicate an id with leading zeros, or a stray expert id
        new = key.replace(".experts.", rng.choice([".experts.0", ".experts.9999999",
                                                    ".experts.100000000", ".experts.x"]))
        header[new] = header.pop(key) if rng.random() < 0.5 else dict(header[key])
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def test_checkpoint_fuzzer(tmp_path):
    seconds = float(os.environ.get("MXMOE_FUZZ_SECONDS", "0"))
    cases = 250 if seconds == 0 else 10**9
    rng = random.Random(int(os.environ.get("MXMOE_FUZZ_SEED", "1234")))
    path = tmp_path / "model.safetensors"
    want = write_layer(path, e=2)
    valid = path.read_bytes()
    before, start = max_rss_mib(), time.monotonic()
    outcomes = {"loaded": 0, "rejected": 0}
    for case in range(cases):
        if seconds and time.monotonic() - start > seconds:
            break
        blob = mutate(rng, valid)
        bad = tmp_path / f"case{case % 8}.safetensors"
        bad.write_bytes(blob)
        t0 = time.monotonic()
        try:
            layer = mxmoe.MoELayer.from_checkpoint(bad, PREFIX)
        except mxmoe.InvalidArgumentError as e:
            assert str(bad) in str(e), f"case {case}: the error does not name the file: {e}"
            outcomes["rejected"] += 1
        else:
            # A loaded layer is a whole layer of the declared shapes (never a partial one).
            assert layer.w13_packed.shape == want[0].shape, f"case {case}"
            assert layer.w2_scales.shape == want[3].shape, f"case {case}"
            outcomes["loaded"] += 1
        assert time.monotonic() - t0 < 5, f"case {case} took {time.monotonic() - t0:.1f} s"
    grown = max_rss_mib() - before
    assert grown < 256, f"the fuzzer grew the process by {grown:.0f} MiB"
    assert outcomes["rejected"] > 0 and outcomes["loaded"] > 0, outcomes
    print(f"checkpoint fuzzer: {sum(outcomes.values())} cases in "
          f"{time.monotonic() - start:.1f} s: {outcomes}")
