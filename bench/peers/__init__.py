"""Optional peers for the benchmarks: other libraries' MoE kernels, run their own way.

Nothing here is vendored and nothing in the library or its tests imports it. A peer is loaded
at run time from a path given on the benchmark's command line (a wheel, or a directory holding
the peer's files), and its adapter converts mxmoe's MXFP4 expert weights (the same E2M1 codes
and E8M0 scales) to the peer's layout with the peer's own preparation ops.

  vllm_marlin  vLLM's Marlin W4A16 MXFP4 MoE (``moe_wna16_marlin_gemm``): what vLLM serves
               MXFP4 MoE checkpoints with on Hopper. ``bench_moe.py --vllm PATH``.

FlashInfer's SM90 MXFP4 MoE (W4A16 / W4A8) has no adapter yet (see docs/perf-notes.md).
"""
