"""The `mcu` target: squeeze's standalone C program (TVM C kernels + a static-arena entry point) built with
arm-none-eabi-gcc for Cortex-M4/M7, run in QEMU MPS2 with semihosting and -icount. Outputs match ONNX Runtime,
flash/RAM/instructions are reported, and a board that is too small fails naming the tensors that dominate.

Tests that build firmware skip with the install hint when the toolchain is missing.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from squeeze.errors import TargetError
from squeeze.targets import mcu_program, toolchains
from squeeze.targets.mcu import BOARDS, Board, Mcu

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def mcu_tools():
    why = Mcu().missing()
    if why:
        pytest.skip(why)


def _samples(model: onnx.ModelProto, shape, count=3, seed=0):
    name = model.graph.input[0].name
    rng = np.random.default_rng(seed)
    return name, [{name: rng.random(shape, dtype=np.float32)} for _ in range(count)]


def _ort(model: onnx.ModelProto, samples) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString())
    return np.stack([sess.run(None, s)[0] for s in samples])


def _run(model, shape, tmp_path, **params):
    name, samples = _samples(model, shape)
    target = Mcu(**params)
    artifact = target.build(model, {name: tuple(shape)}, tmp_path)
    return artifact, target.measure(artifact, samples, runs=3), _ort(model, samples)


def test_digits_cnn_matches_onnx_runtime_on_cortex_m4(mcu_tools, repo, tmp_path):
    model = onnx.load(repo / "models" / "digits_cnn.onnx")
    artifact, measured, expected = _run(model, [1, 1, 8, 8], tmp_path)
    assert measured.method == "instruction-count" and measured.latency_ms is None
    got = measured.outputs["0"]
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max()) < 1e-4
    extra = measured.extra
    weights = sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer)
    # flash holds every weight plus the code; RAM holds at least the activations and the stack
    assert weights <= extra["flash_bytes"] < weights + 64 * 1024
    assert extra["ram_bytes"] > extra["memory"]["arena_bytes"] > 0
    assert extra["memory"]["stack_bytes"] > 0
    assert extra["memory"]["workspace_peak_bytes"] <= extra["memory"]["workspace_pool_bytes"]
    assert 1e5 < extra["instructions"] < 1e9
    assert any("not cycles" in n for n in measured.notes)
    folder = artifact.handle["folder"]
    for name in ("model.c", "kernels.c", "firmware.elf", "firmware.ld"):
        assert (folder / name).is_file()
    assert "squeeze_arena" in (folder / "model.c").read_text()


def test_mnist_ortjava_matches_onnx_runtime(mcu_tools, corpus, tmp_path):
    model = onnx.load(corpus.model_path("mnist_ortjava"))
    _, measured, expected = _run(model, [1, 1, 28, 28], tmp_path)
    assert float(np.abs(measured.outputs["0"] - expected).max()) < 1e-4
    assert 80_000 < measured.extra["flash_bytes"] < 200_000
    assert measured.extra["ram_bytes"] < 256 * 1024


def test_cortex_m7_board_runs_on_mps2_an500(mcu_tools, repo, tmp_path):
    model = onnx.load(repo / "models" / "digits_cnn.onnx")
    artifact, measured, expected = _run(model, [1, 1, 8, 8], tmp_path, board="stm32h743")
    assert artifact.info["emulator"].endswith("mps2-an500")
    assert float(np.abs(measured.outputs["0"] - expected).max()) < 1e-4


def test_a_board_too_small_fails_naming_the_largest_tensors(repo, tmp_path, monkeypatch):
    # Needs TVM only: the fit is checked before anything is compiled.
    monkeypatch.setitem(BOARDS, "stm32f401", Board("cortex-m4", 64 * 1024, 8 * 1024, 84, "mps2-an386"))
    model = onnx.load(repo / "models" / "digits_cnn.onnx")
    with pytest.raises(TargetError) as err:
        Mcu(board="stm32f401").build(model, {"input": (1, 1, 8, 8)}, tmp_path)
    text = str(err.value)
    assert "does not fit stm32f401" in text and "flash" in text and "RAM" in text
    biggest = max(model.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    assert biggest.name in text  # the dominant weight, by its ONNX name


def test_the_plan_puts_every_tensor_in_one_arena(repo):
    from squeeze.targets import tvm_build
    model = onnx.load(repo / "models" / "digits_cnn.onnx")
    mod = tvm_build.import_onnx(model, {"input": (1, 1, 8, 8)})
    target = Mcu().tvm_target()
    program = mcu_program.lower(mod, target, mcu_program.const_names(model))
    assert program.calls and program.inputs and program.outputs
    views = [t for t in program.views if t.region == "arena"]
    assert all(t.offset % mcu_program.ALIGN == 0 and t.offset + t.nbytes <= program.arena_bytes for t in views)
    # memory planning reuses storage: the arena is smaller than all intermediate tensors laid end to end
    assert program.arena_bytes < sum(t.nbytes for t in views)
    assert program.const_bytes == sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer)


def test_missing_toolchain_says_what_to_install(monkeypatch):
    monkeypatch.setattr(toolchains.shutil, "which", lambda name: None)
    why = Mcu().missing()
    assert "arm-none-eabi-gcc" in why and "install-toolchains.sh" in why


def test_harness_output_is_decoded_exactly():
    t = mcu_program.Tensor("t0", (1, 3), "float32", "arena")
    program = mcu_program.Program([], [t], [], [t], [], [], 64, None)
    values = np.array([[1.5, -2.25, 3e-8]], dtype=np.float32)
    words = " ".join(f"{w:08x}" for w in values.view(np.uint32).reshape(-1))
    text = f"OUT 0 0 {words}\nRUN 7\nTIME 1 7\nCALIB 1000000 50000\nWORKSPACE 0\nSTACK 12\nDONE\n"
    result = mcu_program.parse_run(text, program, 1)
    assert np.array_equal(result.outputs[0][0], values) and result.per_run == [7] and result.stack_used == 12
    with pytest.raises(TargetError, match="kernel conv failed"):
        mcu_program.parse_run("ERR kernel conv failed\n", program, 1)


def test_cli_row_for_mcu_compares_flash_with_the_original(mcu_tools, repo, tmp_path):
    import json
    from squeeze.cli import main
    out = tmp_path / "out"
    assert main([str(repo / "models" / "digits_cnn.onnx"), "--passes", "cleanup,fold-bn", "--target", "mcu",
                 "--calib", str(repo / "models" / "digits_calib.npz"), "-o", str(out), "--runs", "3"]) == 0
    row = json.loads((out / "report.json").read_text())["targets"][0]
    assert row["method"] == "instruction-count" and row["numeric_check"]["ok"]
    # fold-bn removes the BatchNorm parameters: less flash than the original model
    assert row["flash_bytes"] < row["original_flash_bytes"]
    assert row["instructions"] > 0 and row["original_instructions"] > 0
    assert "flash" in (out / "report.md").read_text()
    assert (out / row["artifact_dir"] / "firmware.elf").is_file()


def test_pruned_and_codebook_model_needs_less_flash(mcu_tools, repo):
    from squeeze.registry import all_passes
    import squeeze
    if not {"prune", "codebook"} <= set(all_passes()):
        pytest.skip("the prune and codebook passes are not registered in this checkout")
    result = squeeze.compress(repo / "models" / "digits_cnn.onnx", "cleanup,fold-bn,prune(ratio=0.5),codebook",
                              calib=repo / "models" / "digits_calib.npz", targets="mcu", runs=3)
    (row,) = result.report["targets"]
    assert row["method"] == "instruction-count" and row["numeric_check"]["ok"], row
    assert row["flash_bytes"] < 0.5 * row["original_flash_bytes"]
    assert row["instructions"] < row["original_instructions"]
