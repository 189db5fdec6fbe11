"""The demo runs end to end on the CPU at its default shape and prints its three results."""

from absl import flags

from mxmoe import demo


def test_demo_small_shape_on_cpu(capsys):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["demo", "--tokens=5", "--backend=cpu", "--repeats=1", "--seed=3"])
    try:
        demo.main([])
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    assert "backend: cpu" in out
    assert "forward:" in out and " ms " in out
    exact = [line for line in out.splitlines() if "vs exact reference" in line]
    assert exact, out
    assert float(exact[0].rsplit(":", 1)[1]) <= 5e-3, exact[0]
    assert "vs unquantized bf16 layer" in out


def test_demo_model_block_on_cpu(capsys):
    # The --model path: a checkpoint in the model's own format written, loaded and run, with
    # both error lines (Qwen3-30B-A3B: the fastest of the four real blocks on a CPU, ~10 s).
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["demo", "--model=qwen3-30b-a3b", "--tokens=2", "--backend=cpu", "--repeats=1"])
    try:
        demo.main([])
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    assert "from the compressed-tensors checkpoint" in out and "backend: cpu" in out
    exact = [line for line in out.splitlines() if "vs exact reference" in line]
    assert exact, out
    assert float(exact[0].rsplit(":", 1)[1]) <= 5e-3, exact[0]
    bf16 = [line for line in out.splitlines() if "vs bf16 block" in line]
    assert bf16 and 0.05 < float(bf16[0].rsplit(":", 1)[1]) < 0.5, bf16
