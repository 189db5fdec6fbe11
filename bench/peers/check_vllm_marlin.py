"""Self-check of the vLLM Marlin peer on small shapes, needing only torch, a GPU and vLLM.

  python bench/peers/check_vllm_marlin.py --vllm PATH [--out DIR]

For each block (SiLU; SwiGLU-OAI with biases and top-k-then-softmax, at H and I that vLLM pads;
sigmoid grouped top-k with a shared expert), random bf16 weights are quantized to MXFP4 by
mxmoe's pure-torch reference (py/mxmoe/reference.py; it and measure.py's rel_l2 are loaded by
path, so the mxmoe extension is not needed), and the peer's layer is compared with two float64-GEMM references on the same MXFP4 weights and the same
routing: W4A16 (bf16 activations, what Marlin computes) and W4A4 (mxmoe's contract, activations
quantized to MXFP4 too). Its routing kernels are compared with the contract's routing.
A layout mistake (scale order, nibble order, row interleave, bias order) gives errors near 1;
a correct W4A16 layer is within bf16 rounding of the W4A16 reference (rel L2 ~ 3e-3).
Exits 1 when any block's error against the W4A16 reference exceeds 2e-2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import vllm_marlin  # noqa: E402

TOLERANCE = 2e-2


def load_mxmoe_module(name: str):
    """mxmoe/<name>.py loaded by path (torch only, no mxmoe extension needed)."""
    path = os.path.join(HERE, "..", "..", "py", "mxmoe", f"{name}.py")
    if not os.path.isfile(path):  # in a GPU pack: mxmoe/ beside bench/
        path = os.path.join(HERE, "..", "..", "mxmoe", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_mxmoe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_reference():
    return load_mxmoe_module("reference")


rel_l2 = load_mxmoe_module("measure").rel_l2  # the project's one rel_l2




BLOCKS = {
    "silu": {"top_k": 2},
    # H and I off vLLM's Marlin alignment (256 / 128), as GPT-OSS's 2880: the padded path.
    "gpt-oss": {"top_k": 4, "activation": "swiglu_oai", "routing": "topk_softmax",
                "bias": True, "h": 480, "inter": 160},
    "deepseek-v3": {"top_k": 4, "routing": "sigmoid_grouped_topk", "num_expert_groups": 4,
                    "topk_groups": 2, "routed_scaling_factor": 2.5, "correction": True,
                    "shared": 1},
}


def check_block(ref, ops, name, spec, e=16, tokens=37, **peer_flags):
    h, inter = spec.get("h", 512), spec.get("inter", 256)
    gen = torch.Generator(device="cuda").manual_seed(7)
    shared = spec.get("shared", 0)
    local = e + shared

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * std).bfloat16()

    w13 = randn(local, 2 * inter, h, std=h ** -0.5)
    w2 = randn(local, h, inter, std=inter ** -0.5)
    w13p, w13s = ref.quantize_weights(w13)
    w2p, w2s = ref.quantize_weights(w2)
    x = randn(tokens, h)
    logits = torch.randn(tokens, e, device="cuda", generator=gen)
    options = {"activation": spec.get("activation", "silu"),
               "routing": spec.get("routing", "softmax_topk"),
               "num_expert_groups": spec.get("num_expert_groups", 0),
               "topk_groups": spec.get("topk_groups", 0),
               "routed_scaling_factor": spec.get("routed_scaling_factor", 1.0),
               "num_shared_experts": shared}
    if spec.get("bias"):
        options["w13_bias"] = randn(local, 2 * inter, std=0.02)
        options["w2_bias"] = randn(local, h, std=0.01)
    if spec.get("correction"):
        options["e_score_correction_bias"] = torch.randn(e, device="cuda", generator=gen) * 0.01
    peer = vllm_marlin.VllmMarlinMoe(ops, w13p, w13s, w2p, w2s, spec["top_k"], **options,
                                     **peer_flags)
    route_keys = ("routing", "num_expert_groups", "topk_groups", "routed_scaling_factor",
                  "e_score_correction_bias")
    ids, weights = ref.route(logits, spec["top_k"], True,
                             **{k: v for k, v in options.items() if k in route_keys})
    model = {k: v for k, v in options.items() if k not in route_keys}
    out = peer(x, topk_ids=ids, topk_weights=weights)
    w4a16 = ref.moe_forward_unquantized(
        x, lambda i: ref.dequantize(w13p[i], w13s[i], torch.float32),
        lambda i: ref.dequantize(w2p[i], w2s[i], torch.float32), ids, weights,
        num_experts=local, **model)
    w4a4 = ref.moe_forward(x, w13p, w13s, w2p, w2s, topk_ids=ids, topk_weights=weights, **model)
    peer_ids, peer_weights = peer.route(logits)
    same = (peer_ids.long().sort(dim=1).values == ids.long().sort(dim=1).values).all(dim=1)
    order = torch.argsort(peer_ids.long(), dim=1)
    ref_order = torch.argsort(ids.long(), dim=1)
    weight_err = float((torch.gather(peer_weights, 1, order)
                        - torch.gather(weights, 1, ref_order)).abs().max())
    return {"block": name, "H": h, "I": inter, "padding": peer.padding(),
            "rel_l2_vs_w4a16_ref": rel_l2(out, w4a16),
            "rel_l2_vs_w4a4_ref": rel_l2(out, w4a4),
            "w4a4_ref_vs_w4a16_ref": rel_l2(w4a4, w4a16),
            "routing_id_match": float(same.float().mean()),
            "routing_weight_max_abs_diff": weight_err,
            "finite": bool(torch.isfinite(out).all())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm", required=True, help="vLLM wheel or directory (see vllm_marlin)")
    parser.add_argument("--out", help="write DIR/vllm-marlin-check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_vllm_marlin: no CUDA device", file=sys.stderr)
        return 2
    ops = vllm_marlin.load(args.vllm)
    ref = load_reference()
    print(f"vLLM {ops.version} from {ops.root}; torch {torch.__version__}; "
          f"{torch.cuda.get_device_name()}")
    rows = []
    for name, spec in BLOCKS.items():
        try:
            row = check_block(ref, ops, name, spec)
        except Exception as exc:  # reported, and counted as a failure
            row = {"block": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "vllm-marlin-check.json"), "w") as f:
            json.dump({"vllm": ops.version, "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    bad = [r["block"] for r in rows
           if "error" in r or not r["finite"] or r["rel_l2_vs_w4a16_ref"] > TOLERANCE]
    if bad:  # diagnosis: the same blocks with the scale pairs left unswapped
        for name in bad:
            try:
                row = check_block(ref, ops, name, BLOCKS[name], _scale_pair_swap=False)
                print("diagnosis, scale pairs unswapped: " + json.dumps(row))
            except Exception as exc:
                print(f"diagnosis, scale pairs unswapped: {name}: {type(exc).__name__}: {exc}")
    print("FAILED: " + ", ".join(bad) if bad else "OK: every block within "
          f"{TOLERANCE} of the W4A16 reference")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
