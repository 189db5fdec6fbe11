"""vLLM's Marlin MXFP4 MoE (W4A16) as a benchmark peer, loaded from vLLM's own binaries.

On Hopper, vLLM serves MXFP4 MoE checkpoints (GPT-OSS, the compressed-tensors W4A4 ones) with
its Marlin kernels: weights stay MXFP4 (E2M1 codes, E8M0 scales per 32), activations stay
bf16, and ``moe_wna16_marlin_gemm`` dequantizes inside the GEMM. This adapter runs that layer
the way vLLM 0.26's ``fused_marlin_moe`` does, op for op, from vLLM's compiled extensions:

  routing     ``_moe_C.topk_softmax`` (softmax top-k; renormalised it is also GPT-OSS's
              top-k-then-softmax) or ``_moe_C.grouped_topk`` (sigmoid, DeepSeek-V3), fused
              kernels as vLLM runs them;
  align       ``_moe_C.moe_align_block_size`` with vLLM's block-size rule (8..64 rows);
  GEMM1       ``_moe_C.moe_wna16_marlin_gemm`` (+ w13 bias in its epilogue);
  activation  ``_C.silu_and_mul`` or ``_C.swigluoai_and_mul`` (GPT-OSS; w13 rows interleaved
              gate0, up0, gate1, ... as in GPT-OSS checkpoints, which that op expects);
  GEMM2       ``moe_wna16_marlin_gemm`` (+ w2 bias, times the routing weight);
  combine     a bf16 sum over the slots (``torch.sum``, as ``fused_marlin_moe``).
Padding, as vLLM's ``mxfp4_round_up_hidden_size_and_intermediate_size`` does for Marlin on CUDA:
H is rounded up to a multiple of 256 and I to a multiple of 128 (zero codes, zero scale bytes,
zero biases; Marlin has no tile configuration for N = 2880), the hidden states are zero-padded
in every call and the output sliced back. GPT-OSS (H = I = 2880) runs at H 3072, I 2944; the
Qwen3 and DeepSeek-V3 shapes need no padding.
Shared experts (DeepSeek-V3) ride along as extra slots of weight 1 (the shared-expert fusion
SGLang and vLLM's ROCm path use), so the peer does the same work as mxmoe's layer.

Weight preparation: ``_C.gptq_marlin_repack`` (vLLM's op) per expert and matrix, then the
scale permutation and E8M0 reordering of vLLM's ``prepare_moe_mxfp4_layer_for_marlin``
(``marlin_permute_scales``, ``mxfp4_marlin_process_scales``; a few lines of index arithmetic,
restated here because vLLM's Python package does not import without its ~60 dependencies).
Any layout mistake shows as a large error in the benchmark's accuracy columns, which compare
this layer with the float64 references on the same weights.

Loading (``load``): a vLLM wheel (``vllm-*.whl``; the three members below are extracted to a
cache directory) or a directory holding ``vllm/_moe_C_stable_libtorch.abi3.so``,
``vllm/_C_stable_libtorch.abi3.so`` and ``vllm/scalar_type.py`` (and, optionally,
``vllm/_version.py``). The extensions need the torch vLLM was built for (vLLM 0.26.0: torch
2.11, CUDA 13) and a GPU of compute capability 8.0 or newer.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import torch

__all__ = ["VllmMarlinMoe", "VllmOps", "load"]

MEMBERS = ("vllm/_moe_C_stable_libtorch.abi3.so", "vllm/_C_stable_libtorch.abi3.so",
           "vllm/scalar_type.py")
OPTIONAL = ("vllm/_version.py",)
GROUP = 32  # MXFP4 block size
HIDDEN_ALIGN, INTER_ALIGN = 256, 128  # vLLM's Marlin rounding of H and I (CUDA)


@dataclass(frozen=True)
class VllmOps:
    """What ``load`` found: the root directory, vLLM's version and float4_e2m1f's type id."""

    root: str
    version: str
    fp4_type_id: int


def _extract(wheel: str) -> str:
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", tempfile.gettempdir()),
                         "mxmoe-peers", os.path.basename(wheel)[:-4])
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = [m for m in MEMBERS if m not in names]
        if missing:
            raise FileNotFoundError(f"vLLM wheel {wheel} lacks {missing}")
        for member in MEMBERS + tuple(m for m in OPTIONAL if m in names):
            target = os.path.join(cache, member)
            if not os.path.exists(target):
                z.extract(member, cache)
    return cache


def load(path: str) -> VllmOps:
    """Loads vLLM's MoE and core extensions from a wheel or a directory (see the module doc)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--vllm {path}: no such file or directory")
    root = _extract(path) if path.endswith(".whl") else path
    missing = [m for m in MEMBERS if not os.path.isfile(os.path.join(root, m))]
    if missing:
        raise FileNotFoundError(f"--vllm {path}: missing {missing} "
                                "(see bench/peers/vllm_marlin.py)")
    if not hasattr(torch.ops, "_moe_C") or not hasattr(torch.ops._moe_C, "moe_wna16_marlin_gemm"):
        torch.ops.load_library(os.path.join(root, MEMBERS[0]))
    if not hasattr(torch.ops._C, "gptq_marlin_repack"):
        torch.ops.load_library(os.path.join(root, MEMBERS[1]))
    spec = importlib.util.spec_from_file_location("_vllm_scalar_type",
                                                  os.path.join(root, MEMBERS[2]))
    scalar_type = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = scalar_type  # its dataclasses look their module up
    spec.loader.exec_module(scalar_type)
    version = "unknown"
    version_file = os.path.join(root, OPTIONAL[0])
    if os.path.isfile(version_file):
        with open(version_file) as f:
            found = re.search(r"__version__\s*=\s*(?:version\s*=\s*)?['\"]([^'\"]+)['\"]",
                              f.read())
        version = found.group(1) if found else version
    return VllmOps(root, version, scalar_type.scalar_types.float4_e2m1f.id)


# ---- weight preparation (vLLM's layout) ---------------------------------------------------------


def _scale_perm() -> list[int]:
    """Marlin's 64-wide scale permutation for grouped (group < K) 16-bit-activation GEMMs."""
    return [i + 8 * j for i in range(8) for j in range(8)]


def _bias_perm() -> list[int]:
    """Marlin's 32-wide permutation of per-column vectors (its 'single' scale order)."""
    return [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]


def _marlin_scales(scales: torch.Tensor, pair_swap: bool = True) -> torch.Tensor:
    """One expert's E8M0 scales [N, K/32] uint8 -> Marlin's [K/32, N] float8_e8m0fnu.
    ``pair_swap`` False is a deliberately wrong layout, for check_vllm_marlin's diagnosis."""
    n = scales.shape[0]
    s = scales.view(torch.float8_e8m0fnu).to(torch.bfloat16).T  # [K/32, N]
    s = s.reshape(-1, 64)[:, _scale_perm()].reshape(-1, n)
    # The bf16-activation dequantizer reads scales in pairs swapped within groups of four.
    if pair_swap:
        s = s.reshape(-1, 4)[:, [0, 2, 1, 3]].reshape(-1, n)
    return s.to(torch.float8_e8m0fnu).contiguous()


def _marlin_weights(packed: torch.Tensor) -> torch.Tensor:
    """MXFP4 codes [E, N, K/2] uint8 (element 2i in the low nibble) -> Marlin tiles, by
    vLLM's ``gptq_marlin_repack`` (4 bits, no act-order permutation)."""
    e, n, half_k = packed.shape
    k = half_k * 2
    perm = torch.empty(0, dtype=torch.int32, device=packed.device)
    out = None
    for i in range(e):
        q = packed[i].contiguous().view(torch.int32).T.contiguous()  # [K/8, N]
        tile = torch.ops._C.gptq_marlin_repack(q, perm, k, n, 4, False)
        if out is None:
            out = torch.empty((e, *tile.shape), dtype=tile.dtype, device=tile.device)
        out[i] = tile
    return out


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pads the last two dims of t [E, r, c] to [E, rows, cols]."""
    return torch.nn.functional.pad(t, (0, cols - t.shape[-1], 0, rows - t.shape[-2]))


def _pad_w13(t: torch.Tensor, inter: int, padded_inter: int, cols: int) -> torch.Tensor:
    """[E, 2I, c] (gate rows, then up) -> [E, 2I', cols]: gate and up padded separately."""
    return torch.cat([_pad(t[:, :inter], padded_inter, cols),
                      _pad(t[:, inter:], padded_inter, cols)], dim=1)


def _marlin_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    if bias is None:
        return None
    b = bias.to(torch.bfloat16)
    return b.reshape(-1, 32)[:, _bias_perm()].reshape(b.shape).contiguous()


class VllmMarlinMoe:
    """vLLM's Marlin W4A16 MXFP4 MoE layer on mxmoe's weights.

    ``w13_packed`` [E, 2I, H/2] / ``w13_scales`` [E, 2I, H/32] (gate rows, then up) and
    ``w2_packed`` [E, H, I/2] / ``w2_scales`` [E, H, I/32]: mxmoe's LINEAR MXFP4 weights (E
    includes the ``num_shared_experts`` shared experts, stored last). The model options are
    ``mxmoe.ops.moe_forward``'s keyword arguments (routing, activation, biases, shared experts).
    Call with hidden [T, H] bf16 and router logits [T, E - S] (routed by vLLM's kernels), or
    with ``topk_ids``/``topk_weights`` (e.g. ``mxmoe.ops.route``'s, for accuracy checks).
    """

    def __init__(self, ops: VllmOps, w13_packed, w13_scales, w2_packed, w2_scales, top_k: int, *,
                 renormalize: bool = True, activation: str = "silu", swiglu_alpha: float = 1.702,
                 swiglu_limit: float = 7.0, w13_bias=None, w2_bias=None,
                 routing: str = "softmax_topk", num_expert_groups: int = 0, topk_groups: int = 0,
                 routed_scaling_factor: float = 1.0, e_score_correction_bias=None,
                 num_shared_experts: int = 0, _scale_pair_swap: bool = True):
        if activation not in ("silu", "swiglu_oai"):
            raise ValueError(f"activation must be 'silu' or 'swiglu_oai', got {activation!r}")
        if routing not in ("softmax_topk", "topk_softmax", "sigmoid_grouped_topk"):
            raise ValueError(f"routing {routing!r} has no vLLM routing kernel here")
        if routing == "topk_softmax" and not renormalize:
            raise ValueError("topk_softmax is vLLM's renormalised softmax top-k; "
                             "renormalize must be True")
        self.ops = ops
        self.top_k = top_k
        self.renormalize = renormalize
        self.activation = activation
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        self.routing = routing
        self.num_expert_groups, self.topk_groups = num_expert_groups, topk_groups
        self.routed_scaling_factor = routed_scaling_factor
        self.num_shared = num_shared_experts
        self.num_experts = w13_packed.shape[0]
        self.hidden_in = w2_packed.shape[1]
        inter = w2_packed.shape[2] * 2
        self.w2_in_inter = inter
        self.hidden = _round_up(self.hidden_in, HIDDEN_ALIGN)
        self.inter = _round_up(inter, INTER_ALIGN)
        device = w13_packed.device
        if (self.hidden, self.inter) != (self.hidden_in, inter):
            h, i = self.hidden, self.inter
            w13_packed = _pad_w13(w13_packed, inter, i, h // 2)
            w13_scales = _pad_w13(w13_scales, inter, i, h // GROUP)
            w2_packed = _pad(w2_packed, h, i // 2)
            w2_scales = _pad(w2_scales, h, i // GROUP)
            if w13_bias is not None:
                w13_bias = _pad_w13(w13_bias.unsqueeze(-1), inter, i, 1).squeeze(-1)
            if w2_bias is not None:
                w2_bias = torch.nn.functional.pad(w2_bias, (0, h - self.hidden_in))
        routed = self.num_experts - num_shared_experts
        bias = e_score_correction_bias
        self.correction = (torch.zeros(routed, dtype=torch.float32, device=device)
                           if bias is None else bias.to(torch.float32))
        if activation == "swiglu_oai":
            # GPT-OSS checkpoint order (gate0, up0, gate1, ...), which swigluoai_and_mul reads.
            i = self.inter
            order = torch.stack([torch.arange(i), torch.arange(i) + i], dim=1).flatten()
            order = order.to(device)
            w13_packed, w13_scales = w13_packed[:, order], w13_scales[:, order]
            w13_bias = None if w13_bias is None else w13_bias[:, order]
        self.w13 = _marlin_weights(w13_packed)
        self.w2 = _marlin_weights(w2_packed)
        self.s13 = torch.stack([_marlin_scales(w13_scales[e], _scale_pair_swap)
                                for e in range(self.num_experts)])
        self.s2 = torch.stack([_marlin_scales(w2_scales[e], _scale_pair_swap)
                               for e in range(self.num_experts)])
        self.b13 = None if w13_bias is None else torch.stack(
            [_marlin_bias(w13_bias[e]) for e in range(self.num_experts)])
        self.b2 = None if w2_bias is None else torch.stack(
            [_marlin_bias(w2_bias[e]) for e in range(self.num_experts)])
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.workspace = torch.zeros(sms * 4, dtype=torch.int32, device=device)

    def padding(self) -> str:
        """'' or what vLLM's rounding did to this layer (e.g. 'H 2880->3072, I 2880->2944')."""
        i_in = self.w2_in_inter
        if (self.hidden, self.inter) == (self.hidden_in, i_in):
            return ""
        return f"H {self.hidden_in}->{self.hidden}, I {i_in}->{self.inter}"

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w13, self.w2, self.s13, self.s2))

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's fused routing kernels -> (ids int32 [T, top_k], weights float32 [T, top_k])."""
        t = logits.shape[0]
        if self.routing == "sigmoid_grouped_topk":
            groups = self.num_expert_groups or 1
            weights, ids = torch.ops._moe_C.grouped_topk(
                logits, groups, self.topk_groups or groups, self.top_k, self.renormalize,
                self.routed_scaling_factor or 1.0, self.correction.to(logits.dtype), 1)
            return ids.to(torch.int32), weights.to(torch.float32)
        weights = torch.empty(t, self.top_k, dtype=torch.float32, device=logits.device)
        ids = torch.empty(t, self.top_k, dtype=torch.int32, device=logits.device)
        token_expert = torch.empty(t, self.top_k, dtype=torch.int32, device=logits.device)
        torch.ops._moe_C.topk_softmax(weights, ids, token_expert, logits,
                                      self.renormalize or self.routing == "topk_softmax", None)
        if self.routed_scaling_factor not in (0.0, 1.0):
            weights = weights * self.routed_scaling_factor
        return ids, weights

    def _block_size(self, slots: int) -> int:
        # fused_marlin_moe's rule: the smallest block that the average expert nearly fills.
        for size in (8, 16, 32, 48, 64):
            if slots / self.num_experts / size < 0.9:
                return size
        return 64

    def __call__(self, hidden: torch.Tensor, logits: torch.Tensor | None = None,
                 topk_ids: torch.Tensor | None = None,
                 topk_weights: torch.Tensor | None = None) -> torch.Tensor:
        if topk_ids is None:
            topk_ids, topk_weights = self.route(logits)
        ids = topk_ids.to(torch.int32)
        weights = topk_weights.to(torch.float32)
        t = hidden.shape[0]
        if self.hidden != self.hidden_in:
            hidden = torch.nn.functional.pad(hidden, (0, self.hidden - self.hidden_in))
        if self.num_shared:
            shared = torch.arange(self.num_experts - self.num_shared, self.num_experts,
                                  dtype=torch.int32, device=ids.device)
            ids = torch.cat([ids, shared.expand(t, self.num_shared)], dim=1)
            weights = torch.cat([weights, weights.new_ones(t, self.num_shared)], dim=1)
        ids, weights = ids.contiguous(), weights.contiguous()
        slots = ids.shape[1]
        e, h, i = self.num_experts, self.hidden, self.inter
        block = self._block_size(t * slots)
        padded = ids.numel() + e * (block - 1)
        if ids.numel() < e:
            padded = min(ids.numel() * block, padded)
        sorted_ids = torch.empty(padded, dtype=torch.int32, device=ids.device)
        expert_ids = torch.empty((padded + block - 1) // block, dtype=torch.int32,
                                 device=ids.device)
        post_pad = torch.empty(1, dtype=torch.int32, device=ids.device)
        torch.ops._moe_C.moe_align_block_size(ids, e, block, sorted_ids, expert_ids, post_pad,
                                              None)
        gemm = torch.ops._moe_C.moe_wna16_marlin_gemm
        type_id = self.ops.fp4_type_id
        up = gemm(hidden, None, self.w13, self.b13, self.s13, None, None, None, None, None,
                  self.workspace, sorted_ids, expert_ids, post_pad, weights, block, slots, False,
                  type_id, t, 2 * i, h, True, False, True, False, -1, -1, -1)
        act = torch.empty(t * slots, i, dtype=hidden.dtype, device=hidden.device)
        if self.activation == "silu":
            torch.ops._C.silu_and_mul(act, up.view(t * slots, 2 * i))
        else:
            torch.ops._C.swigluoai_and_mul(act, up.view(t * slots, 2 * i), self.swiglu_alpha,
                                           self.swiglu_limit)
        down = gemm(act, None, self.w2, self.b2, self.s2, None, None, None, None, None,
                    self.workspace, sorted_ids, expert_ids, post_pad, weights, block, 1, True,
                    type_id, t * slots, h, i, True, False, True, False, -1, -1, -1)
        out = torch.sum(down.view(t, slots, h), dim=1)
        return out if h == self.hidden_in else out[:, :self.hidden_in]
