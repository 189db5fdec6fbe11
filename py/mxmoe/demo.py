"""mxmoe demo: one MXFP4 W4A4 MoE layer forward, its error and its time.

Builds an MoE layer with random bf16 weights (seeded; regenerated per expert, so real model
shapes never hold all bf16 weights at once), quantizes it to MXFP4, runs the forward pass on the
chosen backend and prints:
  - the relative L2 error against the exact reference (same quantization, float64 GEMMs): this
    checks the kernels, and should be ~1e-3 (bf16 output rounding);
  - the relative L2 error against the unquantized bf16 layer: the cost of MXFP4 itself
    (typically 0.1-0.3), a report, not a test;
  - the forward time (median of --repeats after one warm-up).

    bazel run //py/mxmoe:demo                                   # small shape, seconds on a CPU
    bazel run //py/mxmoe:demo -- --shape=qwen3-30b-a3b --tokens=16 --backend=cpu

Real shapes on the CPU take minutes (weight generation and quantization dominate); progress is
shown. The float64 reference runs on the CPU whatever the backend.

``--model=gpt-oss-20b|gpt-oss-120b|qwen3-30b-a3b|deepseek-v3`` runs that model's real MoE block
instead (its activation, biases, router, routing, shared expert and real dims): random MXFP4
weights are written in the model's own checkpoint format (GPT-OSS ``*_blocks``/``*_scales``/
``*_bias`` with interleaved gate/up rows; per-expert compressed-tensors with DeepSeek-V3's
correction bias and shared expert, sharded with an index) to a temporary directory with a
config.json, loaded with ``MoELayer.from_checkpoint`` and run with ``forward_hidden``. It prints
the error against the exact reference (same quantization, float64 GEMMs) and against the block
computed in bf16 without activation quantization on the same (dequantized) weights.

    bash tools/demo.sh --model=gpt-oss-20b --tokens=4 --backend=cpu
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

from absl import app, flags

# (experts, hidden, intermediate, top_k)
SHAPES = {
    "small": (16, 512, 256, 4),
    "gpt-oss-120b": (128, 2880, 2880, 4),
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "deepseek-v3": (256, 7168, 2048, 8),
}

# The real blocks: dims, routing and activation of each model's MoE layer (its config.json).
MODELS = {
    "gpt-oss-20b": {
        "experts": 32, "hidden": 2880, "intermediate": 2880, "top_k": 4, "format": "gpt-oss",
        "config": {"model_type": "gpt_oss", "num_experts_per_tok": 4, "swiglu_limit": 7.0}},
    "gpt-oss-120b": {
        "experts": 128, "hidden": 2880, "intermediate": 2880, "top_k": 4, "format": "gpt-oss",
        "config": {"model_type": "gpt_oss", "num_experts_per_tok": 4, "swiglu_limit": 7.0}},
    "qwen3-30b-a3b": {
        "experts": 128, "hidden": 2048, "intermediate": 768, "top_k": 8,
        "format": "compressed-tensors",
        "config": {"model_type": "qwen3_moe", "num_experts_per_tok": 8, "norm_topk_prob": True}},
    "deepseek-v3": {
        "experts": 256, "hidden": 7168, "intermediate": 2048, "top_k": 8,
        "format": "compressed-tensors", "shared": 1,
        "config": {"model_type": "deepseek_v3", "num_experts_per_tok": 8, "n_group": 8,
                   "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True}},
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("shape", "small", list(SHAPES), "MoE layer shape (synthetic SiLU block).")
flags.DEFINE_enum("model", None, list(MODELS), "Run this model's real MoE block, loaded from "
                  "a checkpoint in its own format (overrides --shape).")
flags.DEFINE_integer("tokens", 64, "Number of tokens T.", lower_bound=1)
flags.DEFINE_enum("backend", "auto", ["auto", "cpu", "sm90", "sm100"],
                  "auto: a GPU if the library sees one, else the CPU. sm90/sm100 need a GPU.")
flags.DEFINE_integer("seed", 0, "Seed of weights, activations and router logits.")
flags.DEFINE_integer("repeats", 3, "Timed forward passes (after one warm-up).", lower_bound=1)
flags.DEFINE_boolean("renormalize", True, "Renormalise the top-k router weights.")
flags.DEFINE_boolean("reference", True, "Compute the float64 and bf16 references.")
flags.DEFINE_boolean("peers", True, "On a GPU, also time torch bf16 and FP8 MoE layers (same "
                     "weights and routing) and print the comparison table.")


class Progress:
    """One-line progress on stderr when it is a terminal, periodic lines otherwise."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, max(total, 1)
        self.start = time.perf_counter()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        line = (f"{self.label}: {done}/{self.total} ({100 * done // self.total}%), "
                f"{now - self.start:.1f}s")
        if self.tty:
            end = "\n" if done >= self.total else ""
            print(f"\r{line}", end=end, file=sys.stderr, flush=True)
        elif done >= self.total or now - self.start > 5.0:
            print(line, file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=2)
def expert_weights(seed: int, e: int, hidden: int, intermediate: int):
    """Expert e's bf16 weights (w13 [2I, H], w2 [H, I]), regenerated identically on demand."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + e)
    w13 = (torch.randn(2 * intermediate, hidden, generator=g) * hidden**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(hidden, intermediate, generator=g) * intermediate**-0.5).to(torch.bfloat16)
    return w13, w2


def pick_device(backend: str):
    import torch

    from mxmoe import _mxmoe

    gpus = _mxmoe.cuda_device_count() if torch.cuda.is_available() else 0
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "auto":
        return torch.device("cuda") if gpus else torch.device("cpu")
    if not gpus:
        raise app.UsageError(f"--backend={backend} needs a CUDA device; this machine has none "
                             f"visible to torch and mxmoe (use --backend=cpu or auto)")
    return torch.device("cuda")


def time_cuda_ms(fn, repeats: int = 20) -> float:
    """Median CUDA-event time of fn() in milliseconds, after a warm-up."""
    import torch

    from mxmoe.measure import cuda_event_ms

    fn()
    torch.cuda.synchronize()
    return cuda_event_ms(fn, repeats)


def compare_with_peers(layer, x, logits, top_k: int, w13_bf16, w2_bf16) -> None:
    """Prints mxmoe beside the torch bf16 and FP8 MoE layers (same weights and routing)."""
    from mxmoe.peers import TorchBf16Moe, TorchFp8Moe

    rows = [("mxmoe (MXFP4 W4A4)",
             time_cuda_ms(lambda: layer(x, logits, top_k=top_k, renormalize=True)))]
    for name, peer_class in (("torch bf16 (_grouped_mm)", TorchBf16Moe),
                             ("torch FP8 rowwise (_scaled_grouped_mm)", TorchFp8Moe)):
        try:
            peer = peer_class(w13_bf16, w2_bf16, top_k)
            rows.append((name, time_cuda_ms(lambda peer=peer: peer(x, logits))))
        except Exception as e:
            rows.append((f"{name}: unavailable ({type(e).__name__}: {str(e)[:80]})", None))
    mx_ms = rows[0][1]
    print("\nlayer forward on the GPU (CUDA events, median of 20, renormalised routing):")
    print(f"  {'implementation':<42}{'ms':>10}{'vs mxmoe':>10}")
    for name, ms in rows:
        if ms is None:
            print(f"  {name}")
        else:
            print(f"  {name:<42}{ms:>10.3f}{ms / mx_ms:>9.2f}x")
    print("  (full protocol with floors and all T: bench/bench_moe.py, README 'Numbers')\n")


def random_mxfp4(g, e: int, n: int, k: int):
    """Random MXFP4 weights [e, n, k/2] codes + [e, n, k/32] scales with about unit row norm
    (uniform codes have RMS ~2.9; the scale byte 127 - log2(2.9 sqrt(k)) spreads by +-1)."""
    import math

    import torch

    packed = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.uint8)
    base = 127 - round(math.log2(2.93 * math.sqrt(k)))
    scales = (base + torch.randint(-1, 2, (e, n, k // 32), generator=g)).to(torch.uint8)
    return packed, scales


def write_model_checkpoint(model: str, folder: str, seed: int) -> str:
    """Random weights of `model`'s MoE block in its checkpoint format, sharded with an index;
    returns the layer prefix."""
    import json

    import torch
    from safetensors.torch import save_file

    spec = MODELS[model]
    e, h, i = spec["experts"], spec["hidden"], spec["intermediate"]
    g = torch.Generator().manual_seed(seed)
    prefix = "model.layers.1.mlp"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(spec["config"], f)
    shards = []  # (file name, tensors)

    def projections(head, p13, s13, p2, s2):
        out = {}
        for proj, pk, sc in (("gate_proj", p13[:i], s13[:i]), ("up_proj", p13[i:], s13[i:]),
                             ("down_proj", p2, s2)):
            out[f"{head}{proj}.weight_packed"] = pk.contiguous()
            out[f"{head}{proj}.weight_scale"] = sc.contiguous()
        return out

    progress = Progress(f"write {spec['format']} checkpoint", e)
    if spec["format"] == "gpt-oss":
        # One tensor per projection for all experts, gate/up rows interleaved (random rows, so
        # the interleaving is only a naming matter here; the loader de-interleaves).
        p13, s13 = random_mxfp4(g, e, 2 * i, h)
        p2, s2 = random_mxfp4(g, e, h, i)
        head = f"{prefix}.experts."
        shards.append(("model-00000.safetensors", {
            head + "gate_up_proj_blocks": p13.reshape(e, 2 * i, h // 32, 16),
            head + "gate_up_proj_scales": s13,
            head + "gate_up_proj_bias": (torch.randn(e, 2 * i, generator=g) * 0.5).to(
                torch.bfloat16),
            head + "down_proj_blocks": p2.reshape(e, h, i // 32, 16),
            head + "down_proj_scales": s2,
            head + "down_proj_bias": (torch.randn(e, h, generator=g) * 0.1).to(torch.bfloat16),
            f"{prefix}.router.weight": (torch.randn(e, h, generator=g) * h**-0.5).to(
                torch.bfloat16),
            f"{prefix}.router.bias": (torch.randn(e, generator=g) * 0.1).to(torch.bfloat16),
        }))
        save_file(shards[0][1], os.path.join(folder, shards[0][0]))
        progress.update(e)
    else:
        chunk = max(1, (1 << 27) // (3 * h * i // 2))  # experts per shard: ~128 MB of codes
        for begin in range(0, e, chunk):
            count = min(e, begin + chunk) - begin
            p13, s13 = random_mxfp4(g, count, 2 * i, h)
            p2, s2 = random_mxfp4(g, count, h, i)
            tensors = {}
            for local in range(count):
                tensors.update(projections(f"{prefix}.experts.{begin + local}.", p13[local],
                                           s13[local], p2[local], s2[local]))
            name = f"model-{len(shards):05d}.safetensors"
            save_file(tensors, os.path.join(folder, name))
            shards.append((name, dict.fromkeys(tensors)))
            progress.update(begin + count)
        router = torch.randn(e, h, generator=g) * h**-0.5
        tensors = {}
        if model == "deepseek-v3":
            tensors[f"{prefix}.gate.weight"] = router  # float32: DeepSeek-V3 routes in fp32
            tensors[f"{prefix}.gate.e_score_correction_bias"] = torch.randn(e, generator=g) * 0.01
            sp13, ss13 = random_mxfp4(g, 1, 2 * i, h)
            sp2, ss2 = random_mxfp4(g, 1, h, i)
            tensors.update(projections(f"{prefix}.shared_experts.", sp13[0], ss13[0], sp2[0],
                                       ss2[0]))
        else:
            tensors[f"{prefix}.gate.weight"] = router.to(torch.bfloat16)
        name = f"model-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(folder, name))
        shards.append((name, tensors))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {t: name for name, ts in shards for t in ts}}, f)
    return prefix


def run_model(model: str, device) -> None:
    """--model: the real block, through from_checkpoint, against its two references."""
    import tempfile

    import torch

    import mxmoe
    from mxmoe import reference

    spec = MODELS[model]
    tokens = FLAGS.tokens
    print(f"mxmoe {mxmoe.version()}: model {model} (E={spec['experts']}, H={spec['hidden']}, "
          f"I={spec['intermediate']}, top_k={spec['top_k']}, shared={spec.get('shared', 0)}), "
          f"T={tokens}, device {device}")
    with tempfile.TemporaryDirectory(prefix="mxmoe-demo-") as folder:
        prefix = write_model_checkpoint(model, folder, FLAGS.seed)
        start = time.perf_counter()
        layer = mxmoe.MoELayer.from_checkpoint(
            os.path.join(folder, "model.safetensors.index.json"), prefix, device=device)
        print(f"loaded {layer.extra_repr()} from the {spec['format']} checkpoint in "
              f"{time.perf_counter() - start:.1f}s")
    g = torch.Generator().manual_seed(FLAGS.seed + 1)
    hidden_states = torch.randn(tokens, spec["hidden"], generator=g).to(torch.bfloat16)
    x = hidden_states.to(device)
    print(f"backend: {layer.backend}")
    out = layer.forward_hidden(x)  # warm-up
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        out = layer.forward_hidden(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print(f"forward_hidden: {statistics.median(times) * 1e3:.3f} ms (median of {FLAGS.repeats}),"
          f" output {list(out.shape)} {str(out.dtype).replace('torch.', '')}")
    if not FLAGS.reference:
        return
    from mxmoe.measure import rel_l2

    cpu = torch.device("cpu")
    layer = layer.to(cpu)
    logits = layer.router_logits(hidden_states)
    ids, weights = layer.route(logits)
    o = layer.model_options()
    common = {name: o[name] for name in ("activation", "swiglu_alpha", "swiglu_limit",
                                         "w13_bias", "w2_bias", "num_shared_experts")}
    progress = Progress("float64 reference (experts in use)", 1)
    exact = reference.moe_forward(
        hidden_states, layer.w13_packed, layer.w13_scales, layer.w2_packed, layer.w2_scales,
        topk_ids=ids, topk_weights=weights, expert_map=layer.expert_map,
        progress=lambda done, total: (setattr(progress, "total", total), progress.update(done)),
        **common)

    def dequantized(packed, scales):
        return lambda e: reference.dequantize(packed[e], scales[e]).to(torch.bfloat16)

    bf16_block = reference.moe_forward_unquantized(
        hidden_states, dequantized(layer.w13_packed, layer.w13_scales),
        dequantized(layer.w2_packed, layer.w2_scales), ids, weights,
        num_experts=layer.num_experts, **common)
    print(f"rel. L2 error vs exact reference (same MXFP4 quantization, float64): "
          f"{rel_l2(out, exact):.3e}")
    print(f"rel. L2 error vs bf16 block (same weights, no activation quantization): "
          f"{rel_l2(out, bf16_block):.3e}")


def main(argv):
    del argv
    if FLAGS.backend in ("sm90", "sm100"):
        # Read by the C library when it picks a backend for CUDA pointers.
        os.environ["MXMOE_BACKEND"] = FLAGS.backend
    import torch

    if FLAGS.model is not None:
        run_model(FLAGS.model, pick_device(FLAGS.backend))
        return

    import mxmoe
    from mxmoe import ops, reference
    from mxmoe.measure import rel_l2

    experts, hidden, intermediate, top_k = SHAPES[FLAGS.shape]
    tokens = FLAGS.tokens
    device = pick_device(FLAGS.backend)
    torch.manual_seed(FLAGS.seed)
    print(f"mxmoe {mxmoe.version()}: shape {FLAGS.shape} (E={experts}, H={hidden}, "
          f"I={intermediate}, top_k={top_k}), T={tokens}, device {device}")

    # Weights: generate and quantize a few experts at a time on the target device.
    w13_packed = torch.empty(experts, 2 * intermediate, hidden // 2, dtype=torch.uint8,
                             device=device)
    w13_scales = torch.empty(experts, 2 * intermediate, hidden // 32, dtype=torch.uint8,
                             device=device)
    w2_packed = torch.empty(experts, hidden, intermediate // 2, dtype=torch.uint8, device=device)
    w2_scales = torch.empty(experts, hidden, intermediate // 32, dtype=torch.uint8, device=device)
    # On a GPU the torch peers need the bf16 weights there too (kept from the same generation).
    keep_bf16 = device.type == "cuda" and FLAGS.peers
    if keep_bf16:
        w13_bf16 = torch.empty(experts, 2 * intermediate, hidden, dtype=torch.bfloat16,
                               device=device)
        w2_bf16 = torch.empty(experts, hidden, intermediate, dtype=torch.bfloat16, device=device)
    progress = Progress("generate + quantize weights", experts)
    chunk = max(1, (1 << 26) // (3 * hidden * intermediate))
    for begin in range(0, experts, chunk):
        end = min(experts, begin + chunk)
        pairs = [expert_weights(FLAGS.seed, e, hidden, intermediate) for e in range(begin, end)]
        w13 = torch.stack([p[0] for p in pairs]).to(device)
        w2 = torch.stack([p[1] for p in pairs]).to(device)
        w13_packed[begin:end], w13_scales[begin:end] = ops.quantize_weights(w13)
        w2_packed[begin:end], w2_scales[begin:end] = ops.quantize_weights(w2)
        if keep_bf16:
            w13_bf16[begin:end], w2_bf16[begin:end] = w13, w2
        progress.update(end)
    layer = mxmoe.MoELayer(w13_packed, w13_scales, w2_packed, w2_scales)

    g = torch.Generator().manual_seed(FLAGS.seed + 1)
    hidden_states = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    router_logits = torch.randn(tokens, experts, generator=g)
    x, logits = hidden_states.to(device), router_logits.to(device)
    print(f"backend: {layer.backend}")

    def forward():
        return layer(x, logits, top_k=top_k, renormalize=FLAGS.renormalize)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    out = forward()  # warm-up (prepares weights and workspaces on a GPU)
    synchronize()
    times = []
    progress = Progress("forward", FLAGS.repeats)
    for repeat in range(FLAGS.repeats):
        start = time.perf_counter()
        out = forward()
        synchronize()
        times.append(time.perf_counter() - start)
        progress.update(repeat + 1)
    median_ms = statistics.median(times) * 1e3

    print(f"forward: {median_ms:.3f} ms (median of {FLAGS.repeats}), output "
          f"{list(out.shape)} {str(out.dtype).replace('torch.', '')}")
    if keep_bf16:
        compare_with_peers(layer, x, logits, top_k, w13_bf16, w2_bf16)
        del w13_bf16, w2_bf16
    if not FLAGS.reference:
        return
    ids, weights = reference.route(router_logits, top_k, FLAGS.renormalize)
    cpu = torch.device("cpu")
    progress = Progress("float64 reference (experts in use)", 1)
    exact = reference.moe_forward(
        hidden_states, w13_packed.to(cpu), w13_scales.to(cpu), w2_packed.to(cpu),
        w2_scales.to(cpu), topk_ids=ids, topk_weights=weights,
        progress=lambda done, total: (setattr(progress, "total", total), progress.update(done)))
    unquantized = reference.moe_forward_unquantized(
        hidden_states, lambda e: expert_weights(FLAGS.seed, e, hidden, intermediate)[0],
        lambda e: expert_weights(FLAGS.seed, e, hidden, intermediate)[1], ids, weights)
    print(f"rel. L2 error vs exact reference (same MXFP4 quantization, float64): "
          f"{rel_l2(out, exact):.3e}")
    print(f"rel. L2 error vs unquantized bf16 layer (MXFP4 quantization error): "
          f"{rel_l2(out, unquantized):.3e}")


# absl's own --help exits 1, and it prints the whole usage text before a UsageError's message;
# here asking for help succeeds and a usage error is its one line (plus a hint) on stderr.
_HELP_FLAGS = {"-h", "-?", "-help", "--help", "--helpshort", "--helpfull"}


def _main_reporting_usage_errors(argv):
    try:
        return main(argv)
    except app.UsageError as error:
        print(f"demo: error: {error}\n(--help lists the flags)", file=sys.stderr)
        return 1


def run():
    if _HELP_FLAGS.intersection(sys.argv[1:]):
        app.usage(shorthelp="--helpfull" not in sys.argv, writeto_stdout=True, exitcode=0)
    app.run(_main_reporting_usage_errors)


if __name__ == "__main__":
    run()
