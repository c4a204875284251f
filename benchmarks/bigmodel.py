"""A model over the 2 GB protobuf limit, written tensor by tensor, and a squeeze run on it with peak memory.

    python benchmarks/bigmodel.py build DIR [--side 12000 --layers 4]    # DIR/model.onnx + DIR/weights.bin
    python benchmarks/bigmodel.py run DIR/model.onnx --passes cleanup -o OUT   # prints one JSON line

The model is a chain of MatMul+Relu layers with [side, side] float32 weights (side 12000: 576 MB each, 2.3 GB for
four), stored as external data and generated in chunks, so building it never holds more than one chunk.
`run` compresses it in this process (no targets, calibration data from DIR/calib.npz) and reports the time of
each step and the peak resident memory (ru_maxrss) — run it as its own process to measure one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

CHUNK_ROWS = 500


def build(folder: str | os.PathLike, side: int = 12000, layers: int = 4, seed: int = 0, samples: int = 2) -> Path:
    """Write DIR/model.onnx (weights in DIR/weights.bin) and DIR/calib.npz; return the model's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = np.float32(1.0 / np.sqrt(side))
    nodes, inits = [], []
    h = "x"
    with open(folder / "weights.bin", "wb") as f:
        for i in range(layers):
            offset = f.tell()
            for start in range(0, side, CHUNK_ROWS):
                rows = min(CHUNK_ROWS, side - start)
                f.write((rng.standard_normal((rows, side), dtype=np.float32) * scale).tobytes())
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[side, side])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "weights.bin"), ("offset", str(offset)),
                               ("length", str(side * side * 4))):
                tensor.external_data.add(key=key, value=value)
            inits.append(tensor)
            nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"], name=f"mm{i}"))
            h = f"mm{i}"
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [h], [f"relu{i}"], name=f"relu{i}"))
                h = f"relu{i}"
    nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))  # something for cleanup to remove
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, side])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="squeeze-bigmodel")
    model.ir_version = 8
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    np.savez(folder / "calib.npz", x=rng.standard_normal((samples, side)).astype(np.float32))
    return folder / "model.onnx"


def run(model: str | os.PathLike, passes: str, out: str | os.PathLike, threads: int = 1) -> dict:
    """Compress `model` (calibration data beside it) into `out`; timings, sizes and peak RSS as a dict."""
    import squeeze  # noqa: PLC0415
    model = Path(model)
    steps: list[tuple[str, float]] = []
    start = time.perf_counter()
    result = squeeze.compress(model, passes, calib=model.parent / "calib.npz", targets="", runs=1, threads=threads,
                              out_dir=out, progress=lambda msg: steps.append((msg, time.perf_counter() - start)))
    seconds = time.perf_counter() - start
    report = result.report
    return {
        "passes": passes,
        "ok": result.ok,
        "failure": result.failure,
        "seconds": round(seconds, 1),
        "steps": [{"at_s": round(t, 1), "step": msg} for msg, t in steps],
        "pass_seconds": {p["name"]: p.get("seconds") for p in report["passes"]},
        "original_bytes": report["original"]["bytes"],
        "final_bytes": report["final"]["bytes"],
        "params": [report["original"]["param_count"], report["final"]["param_count"]],
        "fidelity": {k: v for k, v in (report.get("fidelity") or {}).items() if k != "outputs"},
        "files": sorted(os.listdir(out)),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("folder")
    b.add_argument("--side", type=int, default=12000)
    b.add_argument("--layers", type=int, default=4)
    r = sub.add_parser("run")
    r.add_argument("model")
    r.add_argument("--passes", default="cleanup")
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "build":
        start = time.perf_counter()
        path = build(args.folder, args.side, args.layers)
        print(json.dumps({"model": str(path), "seconds": round(time.perf_counter() - start, 1),
                          "weights_bytes": (path.parent / "weights.bin").stat().st_size}))
    else:
        print(json.dumps(run(args.model, args.passes, args.output, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
