"""Pure-torch reference of the mxmoe data contract (docs/format.md), independent of the C++.

Everything here is written from the contract text, not from the C++ sources, so that the CPU
backend can be checked against it bit for bit: quantization codes and scales, the swizzled scale
layout, dequantization, the fused SiLU-and-mul, and float64 references for the grouped GEMM and
the whole MoE forward.

The one deliberate port is the fp32 SiLU: the contract puts a bit-exact ``exp`` in
``mxmoe/format.h`` (so host and device agree), and the reference must give the same bits. It is
rebuilt here from float32 torch operations, with every ``fmaf`` emulated by a correctly rounded
fused multiply-add (float64 product and sum, rounded to odd, then once to float32).

Limits: meant for tests and the demo, not for speed. The GEMM and MoE references run in float64
on dequantized operands and dequantize one expert at a time, so they fit real model shapes as
long as only the experts in use are materialised. ``moe_forward`` and
``moe_forward_unquantized`` run on the device of their inputs (bench/bench_moe.py checks every
implementation against them on the GPU).
"""

from __future__ import annotations

import torch

__all__ = [
    "BLOCK_SIZE",
    "E2M1_GRID",
    "activation",
    "dequantize",
    "exp_f32",
    "expert_offsets_from_counts",
    "experts_quantize",
    "fma_f32",
    "grouped_gemm",
    "moe_forward",
    "moe_forward_unquantized",
    "pack_codes",
    "quantize",
    "quantize_codes",
    "quantize_weights",
    "route",
    "sigmoid_f32",
    "silu_f32",
    "silu_mul",
    "silu_mul_experts_quantize",
    "swiglu_oai_f32",
    "swizzle_scales",
    "swizzled_offsets",
    "unpack_codes",
    "unswizzle_scales",
    "weighted_sum",
]

BLOCK_SIZE = 32
SCALE_NAN = 0xFF

# Magnitudes of E2M1 codes 0..7 (codes 8..15 are the negatives).
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _e2m1_magnitude_codes(a: torch.Tensor) -> torch.Tensor:
    """Rounds |v| (float32, >= 0, no NaN) to the nearest E2M1 magnitude code, ties to even.

    Built from the grid and the tie rule: between grid points i and i+1 the midpoint belongs to
    whichever of the two codes is even. Values past 6 (and +Inf) saturate to code 7.
    """
    a64 = a.to(torch.float64)  # exact; midpoints are exact in float64 too
    code = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for i in range(len(E2M1_GRID) - 1):
        mid = (E2M1_GRID[i] + E2M1_GRID[i + 1]) / 2
        # Even lower code: a tie stays at i, so only values strictly above move up.
        step = a64 > mid if i % 2 == 0 else a64 >= mid
        code += step.to(torch.uint8)
    return code


def _block_scales(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E8M0 scale byte of each 32-element block. xf: [..., nb, 32] float32.

    Returns (scales uint8 [..., nb], nan_blocks bool [..., nb]).
    """
    nan_blocks = torch.isnan(xf).any(dim=-1)
    amax = torch.where(torch.isnan(xf), torch.zeros_like(xf), xf.abs()).amax(dim=-1)
    bits = amax.view(torch.int32).to(torch.int64)  # amax >= 0, so the pattern is non-negative
    rounded = (bits + (1 << 21)) & 0xFF800000
    e = rounded >> 23
    s = torch.where(e > 2, e - 2, torch.zeros_like(e)).clamp(max=254)
    s = torch.where(nan_blocks, torch.full_like(s, SCALE_NAN), s)
    return s.to(torch.uint8), nan_blocks


def _pow2_f32(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent as float32 for integer exponents in [-149, 127] (subnormals included)."""
    return torch.ldexp(torch.ones(exponent.shape, dtype=torch.float64, device=exponent.device),
                       exponent.to(torch.float64)).to(torch.float32)


def quantize_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes along the last dimension, one E2M1 code per byte.

    Parameters
    ----------
    x : torch.Tensor
        [..., K] bfloat16, float16 or float32, K % 32 == 0.

    Returns
    -------
    codes : torch.Tensor
        [..., K] uint8, one code (0..15) per element.
    scales : torch.Tensor
        [..., K/32] uint8 E8M0 scales (LINEAR layout). A block holding a NaN gets 0xFF and all
        codes 0; a block with scale byte 0 (amax below about 2^-125) gets signed zeros (codes 0
        and 8).
    """
    k = x.shape[-1]
    if k % BLOCK_SIZE:
        raise ValueError(f"x must have K % 32 == 0, got K={k}")
    lead = x.shape[:-1]
    xf = x.to(torch.float32).reshape(*lead, k // BLOCK_SIZE, BLOCK_SIZE)
    scales, nan_blocks = _block_scales(xf)
    # x * 2^(127 - s) in float32: a power-of-two product, rounded only if it lands subnormal.
    # Scale byte 0 multiplies by 0 instead (vLLM's rule): signed zeros, codes 0 and 8.
    s64 = scales.to(torch.int64)
    multiplier = torch.where(s64 == 0, torch.zeros((), dtype=torch.float32, device=x.device),
                             _pow2_f32(127 - s64)).unsqueeze(-1)
    v = xf * multiplier
    magnitude = _e2m1_magnitude_codes(torch.where(torch.isnan(v), torch.zeros_like(v), v.abs()))
    codes = magnitude | (torch.signbit(v).to(torch.uint8) << 3)
    codes = torch.where(nan_blocks.unsqueeze(-1), torch.zeros_like(codes), codes)
    return codes.reshape(*lead, k), scales


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes; element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] codes."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize(x: torch.Tensor, scale_layout: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes rows of x to MXFP4.

    Parameters
    ----------
    x : torch.Tensor
        [rows, K] (any leading dimensions for "linear") bfloat16/float16/float32.
    scale_layout : str
        "linear" -> scales [rows, K/32]; "swizzled" -> [round_up(rows,128), round_up(K/32,4)].

    Returns
    -------
    (packed [rows, K/2] uint8, scales uint8)
    """
    codes, scales = quantize_codes(x)
    packed = pack_codes(codes)
    if scale_layout == "swizzled":
        scales = swizzle_scales(scales)
    elif scale_layout != "linear":
        raise ValueError(f"scale_layout must be 'linear' or 'swizzled', got {scale_layout!r}")
    return packed, scales


def dequantize(packed: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """MXFP4 -> values. packed [..., K/2], scales LINEAR [..., K/32].

    float64 gives the exact values; float32/bfloat16/float16 follow the C API: the product is
    rounded to float32, then to ``dtype``. Scale 0xFF gives NaN.
    """
    codes = unpack_codes(packed)
    grid = torch.tensor(E2M1_GRID, dtype=torch.float64, device=packed.device)
    magnitude = grid[(codes & 7).long()]
    values = torch.where((codes & 8) != 0, -magnitude, magnitude)
    k = codes.shape[-1]
    s = scales.to(torch.int64)
    scale = torch.ldexp(torch.ones(s.shape, dtype=torch.float64, device=s.device),
                        (s - 127).to(torch.float64))
    scale = torch.where(s == SCALE_NAN, torch.full_like(scale, float("nan")), scale)
    out = values.reshape(*codes.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE) * scale.unsqueeze(-1)
    out = out.reshape(*codes.shape[:-1], k)
    if dtype == torch.float64:
        return out
    return out.to(torch.float32).to(dtype)


# ---- Swizzled 128x4 scale layout -----------------------------------------------------------


def swizzled_offsets(rows: int, cols: int, device=None) -> torch.Tensor:
    """Byte offset of every (row m, scale column k): int64 [rows, cols], per the contract:
    (m/128 * numKTiles + k/4) * 512 + (m%32)*16 + ((m/32)%4)*4 + k%4, numKTiles = ceil(cols/4)."""
    m = torch.arange(rows, dtype=torch.int64, device=device).unsqueeze(1)
    k = torch.arange(cols, dtype=torch.int64, device=device).unsqueeze(0)
    num_k_tiles = (cols + 3) // 4
    return ((m // 128 * num_k_tiles + k // 4) * 512 + (m % 32) * 16 + ((m // 32) % 4) * 4
            + k % 4)


def swizzle_scales(s: torch.Tensor) -> torch.Tensor:
    """LINEAR [rows, cols] (or [batch, rows, cols]) -> swizzled
    [round_up(rows,128), round_up(cols,4)] (or batched); padding bytes 0."""
    if s.dim() == 3:
        return torch.stack([swizzle_scales(one) for one in s]) if s.shape[0] else s.new_zeros(
            0, _round_up(s.shape[1], 128), _round_up(s.shape[2], 4))
    rows, cols = s.shape
    out = torch.zeros(_round_up(rows, 128) * _round_up(cols, 4), dtype=torch.uint8,
                      device=s.device)
    out[swizzled_offsets(rows, cols, s.device).reshape(-1)] = s.reshape(-1)
    return out.reshape(_round_up(rows, 128), _round_up(cols, 4))


def unswizzle_scales(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Swizzled [round_up(rows,128), round_up(cols,4)] (or batched) -> LINEAR [rows, cols]."""
    if s.dim() == 3:
        return torch.stack([unswizzle_scales(one, rows, cols) for one in s]) if s.shape[0] else (
            s.new_zeros(0, rows, cols))
    flat = s.reshape(-1)
    return flat[swizzled_offsets(rows, cols, s.device).reshape(-1)].reshape(rows, cols)


# ---- fp32 SiLU, bit-exact with format.h ------------------------------------------------------


def _f32(value: float, device=None) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 fmaf(a, b, c), elementwise.

    a*b of two float32 values is exact in float64; the float64 sum is not always exact, so it is
    rounded to odd (the exact error comes from TwoSum; an inexact sum with an even last bit moves
    one float64 ulp towards the true value). Rounding a round-to-odd float64 once to float32 is
    the correctly rounded result, because float64 carries more than 24 + 2 bits.
    """
    p = a.to(torch.float64) * b.to(torch.float64)
    c64 = c.to(torch.float64)
    s = p + c64
    # TwoSum: err = (p + c) - s exactly.
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    even = (s.view(torch.int64) & 1) == 0
    needs_odd = (err != 0) & even & torch.isfinite(s)
    toward = torch.where(err > 0, torch.full_like(s, float("inf")),
                         torch.full_like(s, float("-inf")))
    s = torch.where(needs_odd, torch.nextafter(s, toward), s)
    return s.to(torch.float32)


def exp_f32(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for float32 x, the same bits as format.h's ExpF32 (Cody-Waite reduction, degree-6
    polynomial with fmaf, scaling by 2^n in two steps)."""
    x = x.to(torch.float32)
    dev = x.device
    n = torch.round(x * _f32(1.44269504088896341, dev))  # round half to even, like rintf
    r = fma_f32(n, _f32(-0.693145751953125, dev), x)
    r = fma_f32(n, _f32(-1.428606765330187045e-06, dev), r)
    p = torch.full_like(x, 1.3888889e-3)
    for coefficient in (8.3333333e-3, 4.1666667e-2, 1.6666667e-1, 0.5, 1.0, 1.0):
        p = fma_f32(p, r, _f32(coefficient, dev).expand_as(x))
    finite_n = torch.where(torch.isfinite(n), n, torch.zeros_like(n)).clamp(-200, 200)
    ni = finite_n.to(torch.int64)
    n1 = torch.div(ni, 2, rounding_mode="trunc")
    n2 = ni - n1
    result = (p * _pow2_f32(n1.clamp(-126, 127))) * _pow2_f32(n2.clamp(-126, 127))
    result = torch.where(x < _f32(-103.98, dev), torch.zeros_like(x), result)
    result = torch.where(x > _f32(88.72, dev), torch.full_like(x, float("inf")), result)
    return torch.where(torch.isnan(x), x, result)


def silu_f32(g: torch.Tensor) -> torch.Tensor:
    """silu(g) = g / (1 + exp(-g)) in float32 with exp_f32; silu(-Inf) = -0, silu(NaN) = NaN."""
    g = g.to(torch.float32)
    e = exp_f32(-g)
    result = g / (_f32(1.0, g.device) + e)
    signed_zero = torch.where(torch.signbit(g), torch.full_like(g, -0.0), torch.zeros_like(g))
    return torch.where(torch.isposinf(e), signed_zero, result)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """[rows, 2N] gate|up -> silu(gate) * up in float32, rounded to x's dtype: [rows, N]."""
    n = x.shape[-1] // 2
    gate = x[..., :n].to(torch.float32)
    up = x[..., n:].to(torch.float32)
    return (silu_f32(gate) * up).to(x.dtype)


def sigmoid_f32(x: torch.Tensor) -> torch.Tensor:
    """sigmoid(x) = 1 / (1 + exp_f32(-x)) in float32 (IEEE division): 0 at -Inf, 1 at +Inf."""
    x = x.to(torch.float32)
    return _f32(1.0, x.device) / (_f32(1.0, x.device) + exp_f32(-x))


def swiglu_oai_f32(gate: torch.Tensor, up: torch.Tensor, alpha: float,
                   limit: float) -> torch.Tensor:
    """GPT-OSS's clamped SwiGLU in float32, one rounding per operation, in this order:
    g = min(gate, limit); u = clamp(up, -limit, limit) (NaN stays NaN);
    y = (g * sigmoid(alpha * g)) * (u + 1)."""
    gate = gate.to(torch.float32)
    up = up.to(torch.float32)
    lim = _f32(limit, gate.device)
    g = torch.where(gate > lim, lim, gate)
    u = torch.where(up > lim, lim, torch.where(up < -lim, -lim, up))
    glu = g * sigmoid_f32(_f32(alpha, gate.device) * g)
    return glu * (u + _f32(1.0, gate.device))


def activation(x: torch.Tensor, kind: str = "silu", alpha: float = 1.702, limit: float = 7.0,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE activation of GEMM1 rows x [rows, 2I] (gate | up), in x's dtype: [rows, I].

    With ``bias`` [rows, 2I] (each row's expert bias), gate and up are first rounded to x's
    dtype after adding it in float32: g = rnd(x + bias). ``kind`` is "silu" (silu(g) * u) or
    "swiglu_oai" (swiglu_oai_f32); the float32 result is rounded once to x's dtype.
    """
    if bias is not None:
        x = (x.to(torch.float32) + bias.to(torch.float32)).to(x.dtype)
    n = x.shape[-1] // 2
    gate = x[..., :n].to(torch.float32)
    up = x[..., n:].to(torch.float32)
    if kind == "silu":
        y = silu_f32(gate) * up
    elif kind == "swiglu_oai":
        y = swiglu_oai_f32(gate, up, alpha, limit)
    else:
        raise ValueError(f"activation must be 'silu' or 'swiglu_oai', got {kind!r}")
    return y.to(x.dtype)


# ---- Grouped (per-expert) layout ---------------------------------------------------------------


def expert_offsets_from_counts(counts) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert row counts [E] -> (expert_offsets [E+1], blockscale_offsets [E+1]) int32."""
    counts = torch.as_tensor(counts, dtype=torch.int64)
    zero = torch.zeros(1, dtype=torch.int64)
    expert_offsets = torch.cat([zero, torch.cumsum(counts, 0)])
    blockscale_offsets = torch.cat([zero, torch.cumsum((counts + 127) // 128 * 128, 0)])
    return expert_offsets.to(torch.int32), blockscale_offsets.to(torch.int32)


def experts_quantize(x: torch.Tensor, expert_offsets: torch.Tensor,
                     blockscale_offsets: torch.Tensor,
                     scale_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert quantization (vLLM mxfp4_experts_quant semantics).

    x [rows, K]; expert e owns rows [expert_offsets[e], expert_offsets[e+1]) and scale rows from
    blockscale_offsets[e], its scales swizzled as an independent [m_e, K/32] matrix.

    Returns packed [rows, K/2] (rows past expert_offsets[E] are zero) and scales
    [scale_rows, round_up(K/32, 4)] (rows not owned by an expert are zero). scale_rows defaults
    to mxmoe.ops' data-independent bound round_down(rows + 127*min(rows, E), 128).
    """
    eo = [int(v) for v in expert_offsets.tolist()]
    bo = [int(v) for v in blockscale_offsets.tolist()]
    rows, k = x.shape
    scale_cols = k // BLOCK_SIZE
    if scale_rows is None:
        scale_rows = (rows + 127 * min(rows, len(eo) - 1)) // 128 * 128
    packed = torch.zeros(rows, k // 2, dtype=torch.uint8)
    scales = torch.zeros(scale_rows, _round_up(scale_cols, 4), dtype=torch.uint8)
    for e in range(len(eo) - 1):
        begin, end = eo[e], eo[e + 1]
        if begin == end:
            continue
        p, s = quantize(x[begin:end], "swizzled")
        packed[begin:end] = p
        scales[bo[e]:bo[e] + s.shape[0]] = s
    return packed, scales


def silu_mul_experts_quantize(x: torch.Tensor, expert_offsets: torch.Tensor,
                              blockscale_offsets: torch.Tensor,
                              scale_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_mul(x [rows, 2N]) then experts_quantize: packed [rows, N/2], swizzled scales."""
    return experts_quantize(silu_mul(x), expert_offsets, blockscale_offsets, scale_rows)


def quantize_weights(w: torch.Tensor,
                     scale_layout: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> packed [E, N, K/2], scales [E, N, K/32] (or swizzled per expert)."""
    codes, scales = quantize_codes(w)
    if scale_layout == "swizzled":
        scales = swizzle_scales(scales)
    return pack_codes(codes), scales


# ---- GEMM and MoE references (float64 on dequantized operands) ---------------------------------


def _expert_weight(packed: torch.Tensor, scales: torch.Tensor, e: int,
                   b_format: str) -> torch.Tensor:
    n, half_k = packed.shape[1], packed.shape[2]
    s = scales[e]
    if b_format == "swizzled":
        s = unswizzle_scales(s, n, half_k * 2 // BLOCK_SIZE)
    return dequantize(packed[e], s)  # float64 [N, K]


def grouped_gemm(a: torch.Tensor, a_scales: torch.Tensor, b_packed: torch.Tensor,
                 b_scales: torch.Tensor, expert_offsets: torch.Tensor,
                 blockscale_offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                 b_format: str = "linear") -> torch.Tensor:
    """float64 reference of the grouped GEMM, rounded to ``out_dtype`` (float64 for exact).

    a [rows, K/2] with swizzled per-expert a_scales; b_packed [E, N, K/2], b_scales [E, N, K/32]
    ("linear") or [E, round_up(N,128), round_up(K/32,4)] ("swizzled"). Returns [rows, N]; rows
    past expert_offsets[E] are zero.
    """
    eo = [int(v) for v in expert_offsets.tolist()]
    bo = [int(v) for v in blockscale_offsets.tolist()]
    rows, half_k = a.shape
    k = half_k * 2
    n = b_packed.shape[1]
    out = torch.zeros(rows, n, dtype=torch.float64)
    for e in range(len(eo) - 1):
        begin, end = eo[e], eo[e + 1]
        if begin == end:
            continue
        m = end - begin
        sw = a_scales[bo[e]:bo[e] + _round_up(m, 128)]
        s = unswizzle_scales(sw, m, k // BLOCK_SIZE)
        a_values = dequantize(a[begin:end], s)
        out[begin:end] = a_values @ _expert_weight(b_packed, b_scales, e, b_format).T
    return out if out_dtype == torch.float64 else out.to(out_dtype)


def _rank(values: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of values [T, N] in routing rank order along the last dim: numbers descending,
    then NaN, ties (and NaN among themselves) to the lower index; ``excluded`` entries last."""
    nan = torch.isnan(values)
    key = torch.where(nan, torch.full_like(values, float("inf")), -values)
    order = torch.sort(key, dim=-1, stable=True).indices
    flag = torch.gather(nan, -1, order).to(torch.int8)
    if excluded is not None:
        flag = flag + 2 * torch.gather(excluded, -1, order).to(torch.int8)
    return torch.gather(order, -1, torch.sort(flag, dim=-1, stable=True).indices)


def _lane_order_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum of v [T, E] along E in the contract's 32-lane order: partial j adds v[j], v[j+32],
    ... from +0; then partial[j] += partial[j ^ o] for o = 16, 8, 4, 2, 1; the sum is
    partial[0]."""
    t, e = v.shape
    lanes = 32
    width = _round_up(max(e, 1), lanes)
    padded = torch.zeros(t, width, dtype=torch.float32, device=v.device)
    padded[:, :e] = v
    blocks = padded.view(t, width // lanes, lanes)  # not -1: ambiguous when T = 0
    partial = torch.zeros(t, lanes, dtype=torch.float32, device=v.device)
    for r in range(blocks.shape[1]):
        partial = partial + blocks[:, r]
    index = torch.arange(lanes, device=v.device)
    o = lanes // 2
    while o > 0:
        partial = partial + partial[:, index ^ o]
        o //= 2
    return partial[:, 0]


def _slot_order_sum(w: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    for s in range(w.shape[1]):
        total = total + w[:, s]
    return total


def _nan_ignoring_max(v: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(v), torch.full_like(v, float("-inf")), v).amax(dim=-1)


ROUTINGS = ("softmax_topk", "topk_softmax", "sigmoid_grouped_topk")


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True,
          routing: str = "softmax_topk", num_expert_groups: int = 0, topk_groups: int = 0,
          routed_scaling_factor: float = 1.0,
          e_score_correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor,
                                                                       torch.Tensor]:
    """The contract's routing, bit for bit (docs/format.md "Routing"), on any device.

    router_logits [T, E] (any float dtype; converted to float32 exactly). Ranking: descending,
    NaN last, ties to the lower id. ``routing``:
      - "softmax_topk": p = exp_f32(l - max) / (32-lane-order sum); top-k by p; renormalize:
        p / (slot-order sum of the chosen p).
      - "topk_softmax": top-k by l; softmax over the chosen (exp_f32, slot-order sum).
      - "sigmoid_grouped_topk": s = sigmoid_f32(l); c = s + e_score_correction_bias; group
        score = c_first + c_second (the group's two best; one for single-expert groups); keep
        ``topk_groups`` of ``num_expert_groups`` groups (0 = 1 group / all groups); top-k of
        the kept experts by c; weights = s of the chosen, renormalized if asked.
    Then every weight is multiplied by ``routed_scaling_factor`` (0 = 1) in float32.
    Returns (topk_ids int32 [T, top_k], topk_weights float32 [T, top_k]).
    """
    v = router_logits.to(torch.float32)
    t, e = v.shape
    dev = v.device
    if routing == "softmax_topk":
        p = exp_f32(v - _nan_ignoring_max(v).unsqueeze(1))
        p = p / _lane_order_sum(p).unsqueeze(1)
        ids = _rank(p)[:, :top_k]
        weights = torch.gather(p, 1, ids)
        if renormalize:
            weights = weights / _slot_order_sum(weights).unsqueeze(1)
    elif routing == "topk_softmax":
        ids = _rank(v)[:, :top_k]
        chosen = torch.gather(v, 1, ids)
        ex = exp_f32(chosen - _nan_ignoring_max(chosen).unsqueeze(1))
        weights = ex / _slot_order_sum(ex).unsqueeze(1)
    elif routing == "sigmoid_grouped_topk":
        s = sigmoid_f32(v)
        c = s if e_score_correction_bias is None else (
            s + e_score_correction_bias.to(device=dev, dtype=torch.float32).unsqueeze(0))
        groups = num_expert_groups or 1
        kept = topk_groups or groups
        excluded = None
        if kept < groups:
            size = e // groups
            grouped = c.reshape(t * groups, size)
            best = torch.gather(grouped, 1, _rank(grouped)[:, :min(2, size)])
            score = best[:, 0] + best[:, 1] if size >= 2 else best[:, 0]
            kept_groups = _rank(score.reshape(t, groups))[:, :kept]
            keep = torch.zeros(t, groups, dtype=torch.bool, device=dev)
            keep.scatter_(1, kept_groups, True)
            excluded = ~keep.repeat_interleave(size, dim=1)
        ids = _rank(c, excluded)[:, :top_k]
        weights = torch.gather(s, 1, ids)
        if renormalize:
            weights = weights / _slot_order_sum(weights).unsqueeze(1)
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    factor = routed_scaling_factor or 1.0
    weights = weights * _f32(factor, dev)
    return ids.to(torch.int32), weights


def _local_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    ids = topk_ids.to(torch.int64)
    if expert_map is None:
        return ids
    return expert_map.to(torch.int64)[ids]


def _with_shared(local: torch.Tensor, weights: torch.Tensor, num_experts: int,
                 num_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Appends the shared-expert slots (local ids E - S .. E - 1, weight 1) to every token."""
    if num_shared == 0:
        return local, weights
    t = local.shape[0]
    shared = torch.arange(num_experts - num_shared, num_experts, dtype=torch.int64,
                          device=local.device)
    local = torch.cat([local, shared.unsqueeze(0).expand(t, num_shared)], dim=1)
    weights = torch.cat([weights, torch.ones(t, num_shared, dtype=torch.float32,
                                             device=weights.device)], dim=1)
    return local, weights


def weighted_sum(contributions: torch.Tensor, weights: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """The contract's reduce: contributions [T, P, H] (expert outputs in the activation dtype,
    w2 bias already added), weights [T, P] float32 -> [T, H] float32:
    acc = +0, then acc = acc + w_s * y_s for s = 0 .. P-1 in order (each product and sum
    rounded to float32), skipping slots where ``valid`` [T, P] is False. Round the result once
    to the activation dtype."""
    t, p, h = contributions.shape
    acc = torch.zeros(t, h, dtype=torch.float32, device=contributions.device)
    w = weights.to(torch.float32)
    for s in range(p):
        term = acc + w[:, s].unsqueeze(1) * contributions[:, s].to(torch.float32)
        acc = term if valid is None else torch.where(valid[:, s].unsqueeze(1), term, acc)
    return acc


def moe_forward(hidden: torch.Tensor, w13_packed: torch.Tensor, w13_scales: torch.Tensor,
                w2_packed: torch.Tensor, w2_scales: torch.Tensor,
                router_logits: torch.Tensor | None = None, top_k: int | None = None,
                renormalize: bool = True, topk_ids: torch.Tensor | None = None,
                topk_weights: torch.Tensor | None = None,
                expert_map: torch.Tensor | None = None, progress=None,
                activation: str = "silu", swiglu_alpha: float = 1.702,
                swiglu_limit: float = 7.0, w13_bias: torch.Tensor | None = None,
                w2_bias: torch.Tensor | None = None, routing: str = "softmax_topk",
                num_expert_groups: int = 0, topk_groups: int = 0,
                routed_scaling_factor: float = 1.0,
                e_score_correction_bias: torch.Tensor | None = None,
                num_shared_experts: int = 0) -> torch.Tensor:
    """Reference MoE forward with the library's quantization and float64 GEMMs.

    hidden [T, H] bf16/fp16; w13 [E, 2I, H/2] + LINEAR scales [E, 2I, H/32]; w2 [E, H, I/2] +
    [E, H, I/32] (E includes the ``num_shared_experts`` shared experts, stored last). Per
    (token, slot): quantize x, GEMM1 (float64) rounded to the activation dtype, + w13_bias
    (rounded), activation + quantize, GEMM2 (float64) rounded, + w2_bias (rounded), then
    weighted_sum over the routed slots and the shared experts (weight 1), rounded once. The
    routing arguments are route()'s. Returns [T, H] in hidden's dtype. ``progress(done,
    total)`` is called after each expert when given. Equal to the CPU backend bit for bit
    whenever the float64 GEMM sums are exact (they are for ordinary data: every product of two
    MXFP4 values has at most 4 significant bits).
    """
    if topk_ids is None:
        topk_ids, topk_weights = route(router_logits, top_k, renormalize, routing,
                                       num_expert_groups, topk_groups, routed_scaling_factor,
                                       e_score_correction_bias)
    num_experts = w13_packed.shape[0]
    local, weights = _with_shared(_local_ids(topk_ids, expert_map),
                                  topk_weights.to(torch.float32), num_experts,
                                  num_shared_experts)
    t, h = hidden.shape
    dtype = hidden.dtype
    used = sorted(int(e) for e in torch.unique(local).tolist() if 0 <= e < num_experts)
    contributions = torch.zeros(t, local.shape[1], h, dtype=dtype, device=hidden.device)
    for done, e in enumerate(used):
        token, slot = torch.nonzero(local == e, as_tuple=True)
        xq, xs = quantize_codes(hidden[token])
        x = dequantize(pack_codes(xq), xs)
        g = (x @ _expert_weight(w13_packed, w13_scales, e, "linear").T).to(dtype)
        bias13 = None if w13_bias is None else w13_bias[e].unsqueeze(0).expand_as(g)
        yq, ys = quantize_codes(_activation(g, activation, swiglu_alpha, swiglu_limit, bias13))
        y = dequantize(pack_codes(yq), ys)
        out = (y @ _expert_weight(w2_packed, w2_scales, e, "linear").T).to(dtype)
        if w2_bias is not None:
            out = (out.to(torch.float32) + w2_bias[e].to(torch.float32)).to(dtype)
        contributions[token, slot] = out
        if progress is not None:
            progress(done + 1, len(used))
    valid = (local >= 0) & (local < num_experts)
    return weighted_sum(contributions, weights, valid).to(dtype)


_activation = activation


def moe_forward_unquantized(hidden: torch.Tensor, w13, w2, topk_ids: torch.Tensor,
                            topk_weights: torch.Tensor,
                            expert_map: torch.Tensor | None = None, activation: str = "silu",
                            swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                            w13_bias: torch.Tensor | None = None,
                            w2_bias: torch.Tensor | None = None,
                            num_shared_experts: int = 0,
                            num_experts: int | None = None) -> torch.Tensor:
    """The same layer without quantization: bf16/fp16 weights, float32 GEMMs rounded to the
    activation dtype, the same bias and activation rounding and the same reduce. ``w13``/``w2``
    are tensors [E, 2I, H] / [E, H, I] or callables e -> the expert's weight (so a caller can
    regenerate weights instead of holding them all); with callables, give ``num_experts`` (E,
    shared experts included) when there are shared experts."""
    if isinstance(w13, torch.Tensor):
        num_experts = w13.shape[0]
    if num_shared_experts and num_experts is None:
        raise ValueError("shared experts need w13 as a tensor (for the expert count)")
    local, weights = _with_shared(_local_ids(topk_ids, expert_map),
                                  topk_weights.to(torch.float32), num_experts or 0,
                                  num_shared_experts)
    t, h = hidden.shape
    dtype = hidden.dtype
    get13 = (lambda e: w13[e]) if isinstance(w13, torch.Tensor) else w13
    get2 = (lambda e: w2[e]) if isinstance(w2, torch.Tensor) else w2
    contributions = torch.zeros(t, local.shape[1], h, dtype=dtype, device=hidden.device)
    valid = local >= 0
    if num_experts is not None:
        valid &= local < num_experts
    for e in sorted(int(v) for v in torch.unique(local[valid]).tolist()):
        token, slot = torch.nonzero(local == e, as_tuple=True)
        x = hidden[token].to(torch.float32)
        g = (x @ get13(e).to(torch.float32).T).to(dtype)
        bias13 = None if w13_bias is None else w13_bias[e].unsqueeze(0).expand_as(g)
        y = _activation(g, activation, swiglu_alpha, swiglu_limit, bias13).to(torch.float32)
        out = (y @ get2(e).to(torch.float32).T).to(dtype)
        if w2_bias is not None:
            out = (out.to(torch.float32) + w2_bias[e].to(torch.float32)).to(dtype)
        contributions[token, slot] = out
    return weighted_sum(contributions, weights, valid).to(dtype)
