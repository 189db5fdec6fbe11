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

FLAGS = flags.FLAGS
flags.DEFINE_enum("shape", "small", list(SHAPES), "MoE layer shape.")
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


def main(argv):
    del argv
    if FLAGS.backend in ("sm90", "sm100"):
        # Read by the C library when it picks a backend for CUDA pointers.
        os.environ["MXMOE_BACKEND"] = FLAGS.backend
    import torch

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
