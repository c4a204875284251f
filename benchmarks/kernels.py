"""Kernel by kernel: squeeze's compiled model (cpu target, default schedules) next to ONNX Runtime's node profile.

    python benchmarks/kernels.py squeezenet                       # 1 thread, the model's static input size
    python benchmarks/kernels.py ppocrv6_tiny_det --input-shape x=1x3x640x640 --top 30
    python benchmarks/kernels.py path/to/model.onnx --input-shape input=1x3x224x224 --json /tmp/k.json
    python benchmarks/kernels.py det_quant.onnx --as-is --input-shape x=1x3x320x320   # a model squeeze wrote

Issue 17's profiling tool: where a compiled model loses to ONNX Runtime. TVM side: every call the Relax VM makes
(one per fused PrimFunc call) is timed by a VM instrument, `--runs` runs, median per call; ORT side: its own
per-node profile (after its graph optimisations, so fused nodes appear as ORT runs them), median per node. Both
tables print the slowest entries with their share (TVM's with its first argument shapes). The sums are lower
than end-to-end latency by the VM's and ORT's own overhead (and, for TVM, by the instrument's, a few µs per call).
Prints text; `--json` also writes every entry. Not a timed test: run it on a quiet machine and compare ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import corpus  # noqa: E402


def tvm_profile(model, shapes: dict, runs: int) -> tuple[list[dict], float]:
    """Per VM call (in call order): symbol, argument shapes, median ms over `runs` runs; and the end-to-end p50 ms
    (timed before the instrument is set)."""
    from squeeze.targets import schedules, tvm_build  # noqa: PLC0415
    from squeeze.targets.cpu import Cpu  # noqa: PLC0415
    tvm = tvm_build.tvm()
    target = Cpu().tvm_target()
    mod = tvm_build.import_onnx(model, shapes)
    exe = tvm_build.compile_module(mod, target, schedules.build_pipeline(target, None, tvm_build.threads()))
    names = [i.name for i in model.graph.input if i.name in shapes]
    runner = tvm_build.VMRunner(exe, tvm.cpu(), names)
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal(shapes[n]).astype(np.float32) for n in names}
    calls: list[list] = []
    state = {"start": 0.0, "index": 0}

    def instrument(func, symbol, before, ret, *args):
        if before:
            state["start"] = time.perf_counter()
            return 0
        took = time.perf_counter() - state["start"]
        i = state["index"]
        state["index"] += 1
        if i == len(calls):
            calls.append([symbol, [tuple(a.shape) for a in args if hasattr(a, "shape")], []])
        calls[i][2].append(took)
        return 0

    whole = runner.time(feed, runs)["p50"]
    runner.vm.set_instrument(instrument)
    for _ in range(runs):
        state["index"] = 0
        runner.run(feed)
    return [{"kernel": s, "shapes": shp, "ms": 1e3 * float(np.median(t))} for s, shp, t in calls], whole


def ort_profile(model, shapes: dict, runs: int, threads: int) -> tuple[list[dict], float]:
    """Per ORT node (as ORT runs it, optimised): name, op, median ms over `runs` runs; and the end-to-end p50 ms
    of a session without profiling."""
    import onnxruntime as ort  # noqa: PLC0415
    from squeeze import runtime  # noqa: PLC0415
    from squeeze.timing import time_calls  # noqa: PLC0415
    plain = runtime.session(model, threads)
    rng = np.random.default_rng(0)
    feed = {i.name: rng.standard_normal(shapes[i.name]).astype(np.float32) for i in plain.get_inputs()}
    whole = time_calls(lambda: plain.run(None, feed), runs=runs)["p50"]
    with tempfile.TemporaryDirectory(prefix="squeeze-kernels-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for _ in range(2 + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    nodes: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        entry = nodes.setdefault(name, {"node": name, "op": e.get("args", {}).get("op_name", "?"), "us": []})
        entry["us"].append(e["dur"])
    out = []
    for entry in nodes.values():
        us = entry.pop("us")[2:] or [0]  # the first two runs warm up
        out.append({**entry, "ms": float(np.median(us)) / 1e3})
    return out, whole


def _table(rows: list[dict], key: str, top: int) -> str:
    total = sum(r["ms"] for r in rows) or 1.0
    rows = sorted(rows, key=lambda r: -r["ms"])[:top]
    lines = []
    for r in rows:
        what = r[key] if key == "kernel" else f"{r['op']:<22} {r['node']}"
        extra = " " + " ".join("x".join(map(str, s)) for s in r.get("shapes", [])[:3]) if "shapes" in r else ""
        lines.append(f"  {r['ms']:8.3f} ms {100 * r['ms'] / total:5.1f}%  {what[:70]}{extra[:80]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a corpus model name or an .onnx path")
    p.add_argument("--input-shape", "--shape", dest="shape", action="append", default=[],
                   help="NAME=1x3x224x224 (repeatable), as squeeze's --input-shape")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", help="also write every entry here")
    p.add_argument("--as-is", action="store_true",
                   help="profile the file without squeeze's canonical front end: a model squeeze wrote (a `quant` "
                        "output), which the front end would change (it folds Cast(int8)·scale weights to floats)")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its pool
    from squeeze.model import load_model  # noqa: PLC0415
    path = Path(args.model) if args.model.endswith(".onnx") else corpus.model_path(args.model)
    if not path.exists():
        print(f"no model at {path}", file=sys.stderr)
        return 2
    model = load_model(path)
    from squeeze.data import input_specs, parse_shape_overrides, resolve_shapes  # noqa: PLC0415
    from squeeze.errors import SqueezeError  # noqa: PLC0415
    try:  # as the CLI's --input-shape: batch 1 where only the batch is dynamic; other dynamic sizes must be given
        shapes = resolve_shapes(input_specs(model), parse_shape_overrides(args.shape))
    except SqueezeError as exc:
        print(f"kernels.py: {exc}", file=sys.stderr)
        return 2
    if not args.as_is:
        from squeeze.canonical import canonicalize  # noqa: PLC0415
        model, _ = canonicalize(model)  # what squeeze compiles: its canonical front end runs before every pass
    tvm_rows, tvm_whole = tvm_profile(model, shapes, args.runs)
    ort_rows, ort_whole = ort_profile(model, shapes, args.runs, args.threads)
    t_sum, o_sum = sum(r["ms"] for r in tvm_rows), sum(r["ms"] for r in ort_rows)
    print(f"{path.name} {shapes} {args.threads} thread(s), {args.runs} runs\n"
          f"  end to end: TVM {tvm_whole:.3f} ms, ORT {ort_whole:.3f} ms, TVM/ORT {tvm_whole / ort_whole:.3f}\n"
          f"  kernels:    TVM {t_sum:.3f} ms ({len(tvm_rows)} calls), ORT {o_sum:.3f} ms ({len(ort_rows)} nodes), "
          f"TVM/ORT {t_sum / o_sum:.3f}")
    print("TVM (squeeze's schedules):\n" + _table(tvm_rows, "kernel", args.top))
    print("ONNX Runtime:\n" + _table(ort_rows, "node", args.top))
    if args.json:
        Path(args.json).write_text(json.dumps({"tvm": tvm_rows, "ort": ort_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
