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
from squeeze.targets import c_program, toolchains
from squeeze.targets.mcu import BOARDS, Board, Mcu

pytestmark = pytest.mark.tvm


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
    program = c_program.lower(mod, target, c_program.const_names(model))
    assert program.calls and program.inputs and program.outputs
    views = [t for t in program.views if t.region == "arena"]
    assert all(t.offset % c_program.ALIGN == 0 and t.offset + t.nbytes <= program.arena_bytes for t in views)
    # memory planning reuses storage: the arena is smaller than all intermediate tensors laid end to end
    assert program.arena_bytes < sum(t.nbytes for t in views)
    assert program.const_bytes == sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer)


def test_missing_toolchain_says_what_to_install(monkeypatch):
    monkeypatch.setattr(toolchains.shutil, "which", lambda name: None)
    why = Mcu().missing()
    assert "arm-none-eabi-gcc" in why and "install-toolchains.sh" in why


def test_harness_output_is_decoded_exactly():
    t = c_program.Tensor("t0", (1, 3), "float32", "arena")
    program = c_program.Program([], [t], [], [t], [], [], 64, None)
    values = np.array([[1.5, -2.25, 3e-8]], dtype=np.float32)
    words = " ".join(f"{w:08x}" for w in values.view(np.uint32).reshape(-1))
    text = f"OUT 0 0 {words}\nRUN 7\nTIME 1 7\nCALIB 1000000 50000\nWORKSPACE 0\nSTACK 12\nDONE\n"
    result = c_program.parse_run(text, program, 1)
    assert np.array_equal(result.outputs[0][0], values) and result.per_run == [7] and result.stack_used == 12
    with pytest.raises(TargetError, match="kernel conv failed"):
        c_program.parse_run("ERR kernel conv failed\n", program, 1)


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
    result = squeeze.compress(repo / "models" / "digits_cnn.onnx", "cleanup,fold-bn,prune(ratio=0.5,scope=layer),codebook",
                              calib=repo / "models" / "digits_calib.npz", targets="mcu", runs=3)
    (row,) = result.report["targets"]
    assert row["method"] == "instruction-count" and row["numeric_check"]["ok"], row
    assert row["flash_bytes"] < 0.5 * row["original_flash_bytes"]
    assert row["instructions"] < row["original_instructions"]


# ------------------------------------------------------------------------------------- compact weights in flash

def _tiny_conv_net() -> onnx.ModelProto:
    """x[1,3,8,8] ─Conv 3→8 3×3─ Relu ─Conv 8→16 3×3 /2─ Relu ─ Flatten ─ Gemm 256→32 (transB) ─ Relu ─ Gemm 32→10 ─ y"""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
               "w2": rng.normal(0, 0.2, (16, 8, 3, 3)), "b2": rng.normal(0, 0.1, 16),
               "w3": rng.normal(0, 0.1, (32, 256)), "b3": rng.normal(0, 0.1, 32),
               "w4": rng.normal(0, 0.2, (10, 32)), "b4": rng.normal(0, 0.1, 10)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], transB=1),
             helper.make_node("Relu", ["g"], ["r3"]),
             helper.make_node("Gemm", ["r3", "w4", "b4"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


TINY_WEIGHTS = 8 * 3 * 9 + 16 * 8 * 9 + 32 * 256 + 10 * 32   # parameters of the four weight tensors


@pytest.fixture(scope="module")
def tiny_compressed():
    import squeeze
    from squeeze.registry import all_passes
    if not {"quant", "codebook"} <= set(all_passes()):
        pytest.skip("the quant and codebook passes are not registered in this checkout")
    model = _tiny_conv_net()
    return {spec: squeeze.compress(model, spec, targets=[], runs=1).model
            for spec in ("quant", "codebook(bits=4)", "codebook(bits=4,scale=layer)")}


def _check_breakdowns(measured) -> None:
    extra = measured.extra
    assert sum(extra["flash_breakdown"].values()) == extra["flash_bytes"]
    assert sum(extra["ram_breakdown"].values()) == extra["ram_bytes"]
    assert extra["flash_breakdown"]["code"] > 0 and extra["ram_breakdown"]["stack"] > 0
    assert extra["ram_breakdown"]["io"] == (3 * 64 + 10) * 4


_CHANNEL_SCALED = [f"packed 4-bit + codebook[16] × scale[{o}]" for o in (8, 16, 32, 10)]


@pytest.mark.parametrize("spec, storage, per_weight", [("quant", ["int8"] * 4, 1.0),
                                                       ("codebook(bits=4)", _CHANNEL_SCALED, 0.5),
                                                       ("codebook(bits=4,scale=layer)",
                                                        ["packed 4-bit + codebook[16]"] * 4, 0.5)])
def test_quant_and_codebook_weights_stay_compact_in_flash(mcu_tools, tiny_compressed, tmp_path, spec, storage,
                                                          per_weight):
    model = tiny_compressed[spec]
    artifact, measured, expected = _run(model, [1, 3, 8, 8], tmp_path)
    np.testing.assert_allclose(measured.outputs["0"], expected, rtol=1e-4, atol=1e-5)
    extra = measured.extra
    flash = extra["flash_breakdown"]
    # every weight tensor is stored at 1 byte (int8) or 4 bits (+1 padding byte per tensor), not 4 bytes
    assert TINY_WEIGHTS * per_weight <= flash["weights_compact"] <= TINY_WEIGHTS * per_weight + 4
    assert flash["weights_float"] <= 4 * (8 + 16 + 32 + 10) + 64   # the biases only
    assert flash["tables"] > 0
    if spec.startswith("codebook"):  # four 16-entry float codebooks, plus a float scale per output channel
        scales = 4 * (8 + 16 + 32 + 10) if "scale=layer" not in spec else 0
        assert flash["tables"] == 4 * 16 * 4 + scales
    assert [r["storage"] for r in extra["layers"]] == storage
    assert [r["macs"] for r in extra["layers"]] == [8 * 64 * 27, 16 * 16 * 72, 32 * 256, 10 * 32]
    assert all(r["compute"] == "float32" for r in extra["layers"])
    # the decode scratch holds the largest decoded weight (the 256→32 Gemm), in RAM
    assert extra["ram_breakdown"]["decode_scratch"] == 32 * 256 * 4
    assert extra["weights"]["mode"] == "auto" and extra["weights"]["compact"] == 4
    _check_breakdowns(measured)
    source = (artifact.handle["folder"] / "model.c").read_text()
    assert "squeeze_decode_" in source
    assert ("squeeze_decode_codebook_scaled((const uint8_t*)" in source) == (storage == _CHANNEL_SCALED)  # a call


def test_float_weights_mode_holds_every_weight_as_float(mcu_tools, tiny_compressed, tmp_path):
    model = tiny_compressed["quant"]
    _, compact, expected = _run(model, [1, 3, 8, 8], tmp_path / "compact", weights="compact")
    _, full, _ = _run(model, [1, 3, 8, 8], tmp_path / "float", weights="float")
    np.testing.assert_allclose(full.outputs["0"], expected, rtol=1e-4, atol=1e-5)
    assert full.extra["flash_breakdown"]["weights_compact"] == 0
    assert full.extra["flash_breakdown"]["weights_float"] >= 4 * TINY_WEIGHTS
    assert full.extra["ram_breakdown"]["decode_scratch"] == 0
    # int8 weights: the weight bytes in flash are a quarter; the whole firmware well under half
    assert compact.extra["flash_bytes"] < 0.5 * full.extra["flash_bytes"]
    _check_breakdowns(full)


def test_auto_keeps_the_largest_weight_float_when_its_scratch_overflows_ram(mcu_tools, tiny_compressed, tmp_path,
                                                                             monkeypatch):
    model = tiny_compressed["codebook(bits=4)"]
    probe = Mcu(weights="compact").build(model, {"x": (1, 3, 8, 8)}, tmp_path / "probe")
    memory = probe.handle["memory"]
    # RAM for everything but the Gemm's 32 KiB scratch (the next largest decoded weight is 4.6 KiB)
    ram = memory["arena_bytes"] + memory["workspace_pool_bytes"] + 8 * 1024 + 8 * 1024
    monkeypatch.setitem(BOARDS, "stm32f401", Board("cortex-m4", 512 * 1024, ram, 84, "mps2-an386"))
    artifact, measured, expected = _run(model, [1, 3, 8, 8], tmp_path, board="stm32f401")
    np.testing.assert_allclose(measured.outputs["0"], expected, rtol=1e-4, atol=1e-5)
    weights = measured.extra["weights"]
    assert len(weights["float_for_ram"]) == 1 and weights["compact"] == 3
    gemm = next(r for r in measured.extra["layers"] if r["macs"] == 32 * 256)
    assert gemm["storage"].startswith("float32") and measured.extra["flash_breakdown"]["weights_float"] >= 32 * 256 * 4
    assert measured.extra["ram_breakdown"]["decode_scratch"] < 8 * 1024
    with pytest.raises(TargetError, match="does not fit stm32f401"):
        Mcu(board="stm32f401", weights="compact").build(model, {"x": (1, 3, 8, 8)}, tmp_path / "compact")


def test_report_renders_the_firmware_breakdowns():
    from squeeze import report
    row = {"spec": "mcu", "flash_breakdown": {"code": 5000, "weights_float": 360, "weights_compact": 10879,
                                              "tables": 256, "other": 1905},
           "ram_breakdown": {"activations": 29144, "io": 3176, "decode_scratch": 64000, "workspace_pool": 26176,
                             "other_static": 432, "stack": 376},
           "weights": {"mode": "auto", "why": "4 weight(s) compact in flash"},
           "layers": [{"layer": "Gemm_7", "op": "Gemm", "macs": 16000, "storage": "packed 4-bit + codebook[16]",
                       "flash_bytes": 8065, "float_bytes": 64000, "compute": "float32"}]}
    text = "\n".join(report._firmware_lines([row, {"spec": "cpu", "latency_ms": {}}]))
    assert "### Firmware memory: mcu" in text and "weights=auto: 4 weight(s) compact in flash." in text
    assert "| bytes | 5,000 | 360 | 10,879 | 256 | 1,905 | 18,400 |" in text
    assert "| bytes | 29,144 | 3,176 | 64,000 | 26,176 | 432 | 376 | 123,304 |" in text
    assert "| Gemm_7 | Gemm | 16,000 | packed 4-bit + codebook[16] | 8,065 | 64,000 | float32 |" in text
    assert report._firmware_lines([{"spec": "cpu"}]) == []
