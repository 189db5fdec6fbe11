"""GPU quantization kernels against the CPU backend, bit for bit.

Every CUDA kernel behind quantize, dequantize, experts_quantize, silu_mul_experts_quantize,
swizzle/unswizzle_scales and quantize_weights runs on outputs poisoned with 0xAB and is compared
byte for byte with the CPU backend on the same inputs: codes, scales and swizzle padding. Inputs
are fresh random or adversarial (per 32-element block: values on and one ulp around every E2M1
rounding threshold, amax around the 1.75 mantissa boundary of the scale rule, huge and tiny
magnitudes, subnormals, NaN, +-Inf, zeros of both signs). Shapes: K in {32, 768, 2880, 7168},
experts with 0, 1 and 1000+ rows, E in {1, 7, 256, 512}, bf16 and fp16. Also: bytes the contract
says are not written stay poisoned, invalid device-side metadata never writes out of bounds,
launches split at the lane limit, and captured CUDA graphs replay correctly on new inputs.

The raw bindings (mxmoe._mxmoe) are called directly so that the outputs can be poisoned; a few
tests go through mxmoe.ops to check that it dispatches CUDA tensors to the kernels.

Runs on the GPU host through tools/gpu/run.sh; without a CUDA device every test skips.
MXMOE_GPU_TEST_QUICK=1 (the compute-sanitizer passes) keeps to small shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run through tools/gpu/run.sh)")

if torch.cuda.is_available():
    from mxmoe import _mxmoe, ops
else:  # collection must still work on a machine without the built module's GPU
    _mxmoe = ops = None

QUICK = os.environ.get("MXMOE_GPU_TEST_QUICK", "") not in ("", "0")
POISON = 0xAB
LINEAR, SWIZZLED = 0, 1
DTYPES = [torch.bfloat16, torch.float16]
KS = [32, 768] if QUICK else [32, 768, 2880, 7168]


def _seed(*parts) -> int:
    """A fresh seed per test case and run (inputs differ between runs; the seed is in messages)."""
    base = int.from_bytes(os.urandom(4), "little")
    return (base ^ hash(parts)) & 0x7FFFFFFF


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def poisoned(shape, device) -> torch.Tensor:
    return torch.full(shape, POISON, dtype=torch.uint8, device=device)


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def assert_bytes_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = got.cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if torch.equal(got, want):
        return
    diff = (got != want).nonzero()
    first = diff[:6].tolist()
    vals = [(int(got[tuple(i)]), int(want[tuple(i)])) for i in first]
    raise AssertionError(f"{what}: {diff.shape[0]} of {got.numel()} bytes differ; first at "
                         f"{first} (gpu, cpu) = {vals}")


def assert_values_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Exact equality of floating values; NaN must meet NaN (payload bits may differ)."""
    got = got.cpu()
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    # Signed zeros must match too.
    same &= torch.signbit(got) == torch.signbit(want)
    if bool(same.all()):
        return
    bad = (~same).nonzero()
    first = bad[:6].tolist()
    vals = [(float(got[tuple(i)]), float(want[tuple(i)])) for i in first]
    raise AssertionError(f"{what}: {bad.shape[0]} of {got.numel()} values differ; first at "
                         f"{first} (gpu, cpu) = {vals}")


# ---- inputs ------------------------------------------------------------------------------------

_THRESHOLDS = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
_KINDS = 9


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF


def _from_bits(bits: torch.Tensor, dtype) -> torch.Tensor:
    b = bits.to(torch.int32) & 0xFFFF
    return torch.where(b >= 0x8000, b - 0x10000, b).to(torch.int16).view(dtype)


def random_input(shape, dtype, gen) -> torch.Tensor:
    """Normal values with a random magnitude per 32-element block (2^-20 .. 2^20)."""
    dev = gen.device
    *lead, k = shape
    blocks = torch.randn(*lead, k // 32, 32, generator=gen, device=dev)
    e = torch.randint(-20, 21, (*lead, k // 32, 1), generator=gen, device=dev).float()
    if dtype == torch.float16:
        e = e.clamp(-10, 10)
    return (blocks * torch.exp2(e)).reshape(shape).to(dtype)


def adversarial_input(shape, dtype, gen) -> torch.Tensor:
    """Every block one of _KINDS hard cases (see the module docstring)."""
    dev = gen.device
    *lead, k = shape
    nblocks = (k // 32) * int(torch.tensor(lead).prod()) if lead else k // 32
    fp16 = dtype == torch.float16
    emax = 10 if fp16 else 60

    def randint(lo, hi, size):
        return torch.randint(lo, hi, size, generator=gen, device=dev)

    def rand(*size):
        return torch.rand(*size, generator=gen, device=dev)

    def const(values, **kw):
        return torch.tensor(values, device=dev, **kw)

    kinds = randint(0, _KINDS, (nblocks, 1))
    e = randint(-emax, emax + 1, (nblocks, 1)).float()
    sign = torch.where(rand(nblocks, 32) < 0.5, -1.0, 1.0)
    base = torch.randn(nblocks, 32, generator=gen, device=dev) * torch.exp2(e)

    # 1: thresholds of the E2M1 grid times 2^e, each nudged by -1, 0 or +1 ulp of the dtype; the
    # block's amax is 6 * 2^e so the scaled values land on the thresholds.
    t = const(_THRESHOLDS)[randint(0, len(_THRESHOLDS), (nblocks, 32))]
    thr = (t * torch.exp2(e)).to(dtype)
    thr_bits = (_bits(thr) + randint(-1, 2, (nblocks, 32))).clamp(0, 0x7BFF if fp16 else 0x7F7F)
    thr = _from_bits(thr_bits, dtype).float()
    thr[:, 0] = 6.0 * torch.exp2(e[:, 0])
    thr = thr * sign

    # 2: amax on the scale rule's 1.75-mantissa boundary (1.75 - ulp, 1.75, 1.75 + ulp, 2 - ulp,
    # 1, 1 + ulp) times 2^e; the others random below it.
    m = const([1.75, 1.75, 1.75, 2.0, 1.0, 1.0])
    mn = const([-1, 0, 1, -1, 0, 1])
    pick = randint(0, 6, (nblocks,))
    amax = (m[pick][:, None] * torch.exp2(e)).to(dtype)
    amax = _from_bits(_bits(amax) + mn[pick][:, None], dtype).float()
    boundary = rand(nblocks, 32) * amax * sign
    boundary[torch.arange(nblocks, device=dev), randint(0, 32, (nblocks,))] = amax[:, 0]

    # 3: huge magnitudes near the dtype's largest finite value.
    lo, hi = (0x7800, 0x7BFF) if fp16 else (0x7F00, 0x7F7F)
    huge = _from_bits(randint(lo, hi + 1, (nblocks, 32)), dtype).float() * sign

    # 4: subnormals of the dtype (and the smallest normals).
    sub_hi = 0x03FF if fp16 else 0x007F
    tiny_bits = randint(1, sub_hi + 1, (nblocks, 32))
    tiny_bits[:, :4] += sub_hi
    tiny = _from_bits(tiny_bits, dtype).float() * sign

    # 5: zeros of both signs.
    zeros = torch.zeros(nblocks, 32, device=dev) * sign

    x = base.clone()
    for kind, values in ((1, thr), (2, boundary), (3, huge), (4, tiny), (5, zeros)):
        x = torch.where(kinds == kind, values, x)
    bits = _bits(x.to(dtype))
    rows = torch.arange(nblocks, device=dev)
    # 6: a NaN (some with payloads, some negative) among random values.
    nan_bits = const([0x7E00, 0x7C01, 0xFE00, 0x7FFF] if fp16 else [0x7FC0, 0x7F81, 0xFFC0, 0x7FFF],
                     dtype=torch.int32)
    nan_pos = randint(0, 32, (nblocks,))
    nan_choice = nan_bits[randint(0, 4, (nblocks,))]
    bits[rows, nan_pos] = torch.where(kinds[:, 0] == 6, nan_choice, bits[rows, nan_pos])
    # 7: +-Inf among random values; 8: +-Inf among tiny values (they quantize against 2^126).
    inf_pos = randint(0, 32, (nblocks,))
    inf = torch.where(sign[:, 0] > 0, 0x7C00 if fp16 else 0x7F80,
                      0xFC00 if fp16 else 0xFF80).to(torch.int32)
    is_inf = (kinds[:, 0] == 7) | (kinds[:, 0] == 8)
    bits[rows, inf_pos] = torch.where(is_inf, inf, bits[rows, inf_pos])
    tiny_rows = kinds[:, 0] == 8
    keep = torch.arange(32, device=dev)[None, :] == inf_pos[:, None]
    bits = torch.where(tiny_rows[:, None] & ~keep, _bits(tiny.to(dtype)), bits)
    return _from_bits(bits, dtype).reshape(shape)


def make_input(shape, dtype, kind: str, seed: int, device: str = "cuda") -> torch.Tensor:
    """A fresh input, generated on ``device`` (the GPU: fast), from ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if kind == "random":
        return random_input(shape, dtype, gen)
    return adversarial_input(shape, dtype, gen)


# ---- quantize / dequantize ---------------------------------------------------------------------


def run_quantize(x: torch.Tensor, layout: int):
    rows, k = x.shape
    srows, scols = (rows, k // 32) if layout == LINEAR else (round_up(rows, 128),
                                                             round_up(k // 32, 4))
    packed = poisoned((rows, k // 2), x.device)
    scales = poisoned((srows, scols), x.device)
    _mxmoe.quantize(x, packed, scales, layout, _stream() if x.is_cuda else 0)
    return packed, scales


@pytest.mark.parametrize("kind", ["random", "adversarial"])
@pytest.mark.parametrize("layout", [LINEAR, SWIZZLED])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("rows", [1, 3, 200] if QUICK else [1, 3, 200, 1037])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_bit_exact(dtype, rows, k, layout, kind):
    seed = _seed("quantize", dtype, rows, k, layout, kind)
    x = make_input((rows, k), dtype, kind, seed)
    want_packed, want_scales = run_quantize(x.cpu(), layout)
    got_packed, got_scales = run_quantize(x, layout)
    what = f"quantize {dtype} rows={rows} k={k} layout={layout} {kind} seed={seed}"
    assert_bytes_equal(got_packed, want_packed, what + " packed")
    assert_bytes_equal(got_scales, want_scales, what + " scales")


@pytest.mark.skipif(QUICK, reason="large")
@pytest.mark.parametrize("layout", [LINEAR, SWIZZLED])
def test_quantize_million_rows(layout):
    rows, k = (1 << 20) + 3, 64
    seed = _seed("million", layout)
    x = make_input((rows, k), torch.bfloat16, "random", seed)
    want = run_quantize(x.cpu(), layout)
    got = run_quantize(x, layout)
    for g, w, name in zip(got, want, ("packed", "scales"), strict=False):
        assert_bytes_equal(g, w, f"quantize rows={rows} k={k} layout={layout} {name}")


def test_quantize_split_launches(monkeypatch):
    """More lanes than one launch takes (limit lowered through the test knob)."""
    monkeypatch.setenv("MXMOE_QUANTIZE_LANES_PER_LAUNCH", "1000")
    for layout in (LINEAR, SWIZZLED):
        rows, k = 301, 2880  # 360 lanes a row: 2 rows per launch, 151 launches
        x = make_input((rows, k), torch.float16, "adversarial", _seed("split", layout))
        want = run_quantize(x.cpu(), layout)
        got = run_quantize(x, layout)
        for g, w, name in zip(got, want, ("packed", "scales"), strict=False):
            assert_bytes_equal(g, w, f"split launches rows={rows} k={k} layout={layout} {name}")
        counts = [0, 250, 1, 50]
        eo, bo = ops.expert_offsets_from_counts(counts)
        xe = make_input((301, k), torch.bfloat16, "random", _seed("split-e"))
        want = run_experts(xe.cpu(), eo, bo, int(bo[-1]), silu=False)
        got = run_experts(xe, eo.cuda(), bo.cuda(), int(bo[-1]), silu=False)
        for g, w, name in zip(got, want, ("packed", "scales"), strict=False):
            assert_bytes_equal(g, w, f"split launches experts k={k} {name}")


@pytest.mark.parametrize("layout", [LINEAR, SWIZZLED])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,k", [(1, 32), (130, 768), (77, 2880)] +
                         ([] if QUICK else [(300, 7168)]))
def test_dequantize_matches_cpu(rows, k, out_dtype, layout):
    seed = _seed("dequantize", rows, k, out_dtype, layout)
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (rows, k // 2), generator=gen, dtype=torch.uint8)
    srows, scols = (rows, k // 32) if layout == LINEAR else (round_up(rows, 128),
                                                             round_up(k // 32, 4))
    # Every scale byte, the extremes (0, 254: subnormal and overflowing products; 0xFF: NaN) often.
    scales = torch.randint(0, 256, (srows, scols), generator=gen, dtype=torch.uint8)
    special = torch.tensor([0, 1, 126, 127, 128, 253, 254, 255], dtype=torch.uint8)
    mask = torch.rand(srows, scols, generator=gen) < 0.3
    scales = torch.where(mask, special[torch.randint(0, 8, (srows, scols), generator=gen)], scales)
    want = torch.empty(rows, k, dtype=out_dtype)
    _mxmoe.dequantize(packed, scales, layout, want, 0)
    got = torch.full((rows, k), float("nan"), dtype=out_dtype, device="cuda")
    _mxmoe.dequantize(packed.cuda(), scales.cuda(), layout, got, _stream())
    assert_values_equal(got, want, f"dequantize rows={rows} k={k} {out_dtype} layout={layout} "
                                   f"seed={seed}")


def test_ops_dispatch_cuda_tensors_to_the_kernels():
    x = make_input((37, 2880), torch.bfloat16, "adversarial", _seed("ops"))
    for layout in ("linear", "swizzled"):
        wp, ws = ops.quantize(x.cpu(), scale_layout=layout)
        gp, gs = ops.quantize(x, scale_layout=layout)
        assert gp.is_cuda and gs.is_cuda
        assert_bytes_equal(gp, wp, f"ops.quantize {layout} packed")
        assert_bytes_equal(gs, ws, f"ops.quantize {layout} scales")
        assert_values_equal(ops.dequantize(gp, gs, scale_layout=layout),
                            ops.dequantize(wp, ws, scale_layout=layout), f"ops.dequantize {layout}")
    counts = [3, 0, 30, 4]
    eo, bo = ops.expert_offsets_from_counts(counts)
    xe = make_input((37, 2 * 768), torch.float16, "random", _seed("ops-e"))
    for fn in (ops.experts_quantize, ops.silu_mul_experts_quantize):
        wp, ws = fn(xe.cpu(), eo, bo)
        gp, gs = fn(xe, eo.cuda(), bo.cuda(), scale_rows=ws.shape[0])
        assert_bytes_equal(gp, wp, f"ops.{fn.__name__} packed")
        assert_bytes_equal(gs, ws, f"ops.{fn.__name__} scales")
    s = torch.randint(0, 256, (2, 130, 90), dtype=torch.uint8)
    assert_bytes_equal(ops.swizzle_scales(s.cuda()), ops.swizzle_scales(s), "ops.swizzle_scales")
    sw = ops.swizzle_scales(s)
    assert_bytes_equal(ops.unswizzle_scales(sw.cuda(), 130, 90), s, "ops.unswizzle_scales")
    w = make_input((3, 130, 64), torch.bfloat16, "random", _seed("ops-w"))
    for layout in ("linear", "swizzled"):
        got, want = ops.quantize_weights(w, layout), ops.quantize_weights(w.cpu(), layout)
        for g, wnt in zip(got, want, strict=True):
            assert_bytes_equal(g, wnt, f"ops.quantize_weights {layout}")


# ---- per-expert quantization -------------------------------------------------------------------


def run_experts(x, expert_offsets, blockscale_offsets, scale_rows, silu, extra_rows=0):
    rows, cols = x.shape
    width = cols // 2 if silu else cols
    packed = poisoned((rows, width // 2), x.device)
    scales = poisoned((scale_rows, round_up(width // 32, 4)), x.device)
    fn = _mxmoe.silu_mul_experts_quantize if silu else _mxmoe.experts_quantize
    fn(x, expert_offsets, blockscale_offsets, packed, scales, _stream() if x.is_cuda else 0)
    return packed, scales


def expert_counts(pattern: str, num_experts: int, gen) -> list[int]:
    if pattern == "mixed":  # 0, 1 and 1000+ rows, and sizes around 128
        base = [0, 1, 1100, 0, 127, 128, 129, 3]
        return [base[i % len(base)] if i < 8 else int(torch.randint(0, 3, (1,), generator=gen))
                for i in range(num_experts)]
    if pattern == "routed":  # top-8 routing of 64 tokens (many experts empty or with one row)
        tokens, top_k = 64, min(8, num_experts)
        logits = torch.randn(tokens, num_experts, generator=gen)
        ids = logits.topk(top_k, dim=-1).indices.flatten()
        return torch.bincount(ids, minlength=num_experts).tolist()
    if pattern == "one-big":
        return [1030 if i == num_experts // 2 else 0 for i in range(num_experts)]
    raise ValueError(pattern)


EXPERT_CASES = [
    # (E, pattern)
    (1, "one-big"),
    (7, "mixed"),
    (256, "routed"),
    (512, "routed"),
    (512, "mixed"),
]
if QUICK:
    EXPERT_CASES = [(1, "one-big"), (7, "mixed"), (512, "routed")]


@pytest.mark.parametrize("kind", ["random", "adversarial"])
@pytest.mark.parametrize("silu", [False, True], ids=["experts_quantize", "silu_mul"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("num_experts,pattern", EXPERT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_quantize_bit_exact(dtype, num_experts, pattern, k, silu, kind):
    seed = _seed("experts", dtype, num_experts, pattern, k, silu, kind)
    gen = torch.Generator().manual_seed(seed)
    counts = expert_counts(pattern, num_experts, gen)
    if QUICK:
        counts = [min(c, 130) for c in counts]
    eo, bo = ops.expert_offsets_from_counts(counts)
    trailing = 5  # rows past expert_offsets[E]: never written
    rows = int(eo[-1]) + trailing
    scale_rows = int(bo[-1]) + 128  # scale rows past blockscale_offsets[E]: never written
    x = make_input((rows, 2 * k if silu else k), dtype, kind, seed)
    want_p, want_s = run_experts(x.cpu(), eo, bo, scale_rows, silu)
    got_p, got_s = run_experts(x, eo.cuda(), bo.cuda(), scale_rows, silu)
    what = (f"{'silu_mul_' if silu else ''}experts_quantize {dtype} E={num_experts} {pattern} "
            f"k={k} {kind} rows={rows} seed={seed}")
    assert_bytes_equal(got_p, want_p, what + " packed")
    assert_bytes_equal(got_s, want_s, what + " scales")
    assert bool((got_p[int(eo[-1]):] == POISON).all()), what + ": rows past offsets[E] written"
    assert bool((got_s[int(bo[-1]):] == POISON).all()), what + ": scale rows past bso[E] written"


@pytest.mark.parametrize("knob,value", [
    ("MXMOE_QUANTIZE_UNITS", "1"),
    ("MXMOE_QUANTIZE_UNITS", "2"),
    ("MXMOE_QUANTIZE_UNITS", "4"),
    ("MXMOE_QUANTIZE_UNITS", "8"),
    ("MXMOE_QUANTIZE_SILU", "fast"),
    ("MXMOE_QUANTIZE_SILU", "table"),
    ("MXMOE_QUANTIZE_ENCODE", "bf16"),
])
def test_kernel_variants_bit_exact(monkeypatch, knob, value):
    """Every kernel variant the size heuristic or a knob can pick (lanes per thread, the fast
    SiLU, the SiLU table at any size, the packed bf16 encoding)."""
    monkeypatch.setenv(knob, value)
    monkeypatch.setenv("MXMOE_QUANTIZE_TABLE_MIN_TILES", "0")
    seed = _seed("variants", knob, value)
    gen = torch.Generator().manual_seed(seed)
    counts = expert_counts("mixed", 12, gen)
    if QUICK:
        counts = [min(c, 130) for c in counts]
    eo, bo = ops.expert_offsets_from_counts(counts)
    rows = int(eo[-1]) + 3
    for k in (768, 2880):
        for silu in (False, True):
            x = make_input((rows, 2 * k if silu else k), torch.bfloat16, "adversarial", seed + k)
            want = run_experts(x.cpu(), eo, bo, int(bo[-1]), silu)
            got = run_experts(x, eo.cuda(), bo.cuda(), int(bo[-1]), silu)
            for g, w, name in zip(got, want, ("packed", "scales"), strict=False):
                assert_bytes_equal(g, w, f"{knob}={value} silu={silu} k={k} {name} seed={seed}")
        for layout in (LINEAR, SWIZZLED):
            x = make_input((rows, k), torch.float16, "adversarial", seed + k + layout)
            for g, w, name in zip(run_quantize(x, layout), run_quantize(x.cpu(), layout),
                                  ("packed", "scales"), strict=False):
                assert_bytes_equal(g, w, f"{knob}={value} quantize layout={layout} k={k} {name}")


def test_experts_quantize_no_rows():
    for silu in (False, True):
        eo, bo = ops.expert_offsets_from_counts([0, 0, 0])
        x = torch.randn(4, 64, device="cuda").to(torch.bfloat16)
        p, s = run_experts(x, eo.cuda(), bo.cuda(), 128, silu)
        torch.cuda.synchronize()
        assert bool((p == POISON).all()) and bool((s == POISON).all())
        x0 = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16)
        run_experts(x0, eo.cuda(), bo.cuda(), 0, silu)
    torch.cuda.synchronize()


@pytest.mark.parametrize("case", ["decreasing", "past-rows", "negative", "bso-negative",
                                  "bso-past-scale-rows", "bso-unaligned", "huge"])
def test_invalid_device_metadata_stays_in_bounds(case):
    """Device-side offsets are not validated on the GPU: garbage must never write out of bounds.

    The outputs are views into larger poisoned buffers; the bytes around them must stay poisoned.
    """
    rows, k = 300, 256  # 4 experts
    eo = torch.tensor([0, 100, 200, 250, 300], dtype=torch.int32)
    bo = torch.tensor([0, 128, 256, 384, 512], dtype=torch.int32)
    if case == "decreasing":
        eo = torch.tensor([0, 200, 100, 250, 300], dtype=torch.int32)
    elif case == "past-rows":
        eo = torch.tensor([0, 100, 200, 5000, 1 << 30], dtype=torch.int32)
    elif case == "negative":
        eo = torch.tensor([-50, -10, 200, 250, 300], dtype=torch.int32)
    elif case == "bso-negative":
        bo = torch.tensor([-256, -128, 256, 384, 512], dtype=torch.int32)
    elif case == "bso-past-scale-rows":
        bo = torch.tensor([0, 128, 256, 100000, 1 << 30], dtype=torch.int32)
    elif case == "bso-unaligned":
        bo = torch.tensor([3, 131, 259, 387, 515], dtype=torch.int32)
    elif case == "huge":
        eo = torch.tensor([0, 2**31 - 1, -(2**31), 2**31 - 1, 300], dtype=torch.int64).to(
            torch.int32)
        bo = torch.tensor([2**31 - 1, 0, -(2**31), 5, 2**31 - 1], dtype=torch.int64).to(
            torch.int32)
    scale_rows, scols = 512, round_up(k // 32, 4)
    guard = 4096
    x = torch.randn(rows, 2 * k, device="cuda").to(torch.bfloat16)
    for silu in (False, True):
        width = k
        packed_all = poisoned((rows * width // 2 + 2 * guard,), "cuda")
        scales_all = poisoned((scale_rows * scols + 2 * guard,), "cuda")
        packed = packed_all[guard:guard + rows * width // 2].view(rows, width // 2)
        scales = scales_all[guard:guard + scale_rows * scols].view(scale_rows, scols)
        fn = _mxmoe.silu_mul_experts_quantize if silu else _mxmoe.experts_quantize
        fn(x if silu else x[:, :k].contiguous(), eo.cuda(), bo.cuda(), packed, scales, _stream())
        torch.cuda.synchronize()
        for buf, name in ((packed_all, "packed"), (scales_all, "scales")):
            assert bool((buf[:guard] == POISON).all()), f"{case} silu={silu}: wrote before {name}"
            assert bool((buf[-guard:] == POISON).all()), f"{case} silu={silu}: wrote after {name}"


# ---- scale layouts and weights -----------------------------------------------------------------


@pytest.mark.parametrize("batch,rows,cols", [(1, 1, 1), (1, 127, 3), (3, 128, 4), (2, 129, 90),
                                             (1, 300, 224), (5, 2880, 23)])
def test_swizzle_roundtrip_matches_cpu(batch, rows, cols):
    gen = torch.Generator().manual_seed(_seed("swizzle", batch, rows, cols))
    s = torch.randint(0, 256, (batch, rows, cols), generator=gen, dtype=torch.uint8)
    want = poisoned((batch, round_up(rows, 128), round_up(cols, 4)), "cpu")
    _mxmoe.swizzle_scales(s, want, 0)
    got = poisoned((batch, round_up(rows, 128), round_up(cols, 4)), "cuda")
    _mxmoe.swizzle_scales(s.cuda(), got, _stream())
    assert_bytes_equal(got, want, f"swizzle batch={batch} rows={rows} cols={cols}")
    back = poisoned((batch, rows, cols), "cuda")
    _mxmoe.unswizzle_scales(got, back, _stream())
    assert_bytes_equal(back, s, f"unswizzle batch={batch} rows={rows} cols={cols}")


@pytest.mark.parametrize("layout", [LINEAR, SWIZZLED])
@pytest.mark.parametrize("e,n,k", [(1, 1, 32), (3, 130, 64), (2, 256, 2880)] +
                         ([] if QUICK else [(4, 2880, 768)]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_weights_bit_exact(dtype, e, n, k, layout):
    seed = _seed("weights", dtype, e, n, k, layout)
    w = make_input((e, n, k), dtype, "adversarial", seed)

    def run(t):
        packed = poisoned((e, n, k // 2), t.device)
        shape = (e, n, k // 32) if layout == LINEAR else (e, round_up(n, 128), round_up(k // 32, 4))
        scales = poisoned(shape, t.device)
        _mxmoe.quantize_weights(t, packed, scales, layout, _stream() if t.is_cuda else 0)
        return packed, scales

    for g, wnt, name in zip(run(w), run(w.cpu()), ("packed", "scales"), strict=False):
        assert_bytes_equal(g, wnt, f"quantize_weights {dtype} E={e} n={n} k={k} layout={layout} "
                                   f"seed={seed} {name}")


# ---- CUDA graphs -------------------------------------------------------------------------------


def test_cuda_graph_replay_with_new_inputs():
    """Quantize kernels captured once replay correctly on new inputs and new routing."""
    num_experts, rows, k, n = 16, 200, 2880, 768
    x = torch.empty(rows, k, dtype=torch.bfloat16, device="cuda")
    xs = torch.empty(rows, 2 * n, dtype=torch.bfloat16, device="cuda")
    eo = torch.empty(num_experts + 1, dtype=torch.int32, device="cuda")
    bo = torch.empty(num_experts + 1, dtype=torch.int32, device="cuda")
    scale_rows = round_up(rows + 127 * num_experts, 128)
    outs = {
        "packed": poisoned((rows, k // 2), "cuda"),
        "scales": poisoned((scale_rows, round_up(k // 32, 4)), "cuda"),
        "silu_packed": poisoned((rows, n // 2), "cuda"),
        "silu_scales": poisoned((scale_rows, round_up(n // 32, 4)), "cuda"),
        "q_packed": poisoned((rows, k // 2), "cuda"),
        "q_scales": poisoned((round_up(rows, 128), round_up(k // 32, 4)), "cuda"),
    }

    def launch():
        s = _stream()
        _mxmoe.experts_quantize(x, eo, bo, outs["packed"], outs["scales"], s)
        _mxmoe.silu_mul_experts_quantize(xs, eo, bo, outs["silu_packed"], outs["silu_scales"], s)
        _mxmoe.quantize(x, outs["q_packed"], outs["q_scales"], SWIZZLED, s)

    gen = torch.Generator().manual_seed(_seed("graph"))

    def fresh_inputs():
        counts = torch.multinomial(torch.ones(num_experts), rows, replacement=True,
                                   generator=gen)
        counts = torch.bincount(counts, minlength=num_experts)
        counts[0] = 0  # an empty expert
        counts[1] += rows - int(counts.sum())
        e_off, b_off = ops.expert_offsets_from_counts(counts)
        x.copy_(make_input((rows, k), torch.bfloat16, "adversarial", int(torch.randint(
            0, 2**31 - 1, (1,), generator=gen))))
        xs.copy_(make_input((rows, 2 * n), torch.bfloat16, "random", int(torch.randint(
            0, 2**31 - 1, (1,), generator=gen))))
        eo.copy_(e_off)
        bo.copy_(b_off)
        return e_off, b_off

    fresh_inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launch()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for trial in range(3):
        e_off, b_off = fresh_inputs()
        for t in outs.values():
            t.fill_(POISON)
        graph.replay()
        torch.cuda.synchronize()
        wp, ws = run_experts(x.cpu(), e_off, b_off, scale_rows, silu=False)
        sp, ss = run_experts(xs.cpu(), e_off, b_off, scale_rows, silu=True)
        qp, qs = run_quantize(x.cpu(), SWIZZLED)
        for name, want in (("packed", wp), ("scales", ws), ("silu_packed", sp),
                           ("silu_scales", ss), ("q_packed", qp), ("q_scales", qs)):
            assert_bytes_equal(outs[name], want, f"graph replay {trial}: {name}")
