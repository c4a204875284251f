"""Benchmark `blockperm`: accuracy, parameters, MACs and measured TVM CPU latency, per rewritten layer and per model.

    python benchmarks/blockperm.py                                   # → benchmarks/results/blockperm.md
    python benchmarks/blockperm.py --models mnist_burn --blocks 2 4 --out /tmp/blockperm.md

For every model, block count B and fold setting: `blockperm(blocks=B, fold=F)` with and without compensation
(first 256 labelled samples calibrate, the rest evaluate). Then, in the same process and one after another, the
`cpu` target (as squeeze ships it: LLVM for this host, squeeze's default schedules; and, for reference, with
schedules=false, i.e. TVM's default Relax pipeline) times, at batch 1,
- each rewritten layer on its own (first fold setting only): the original node(s) vs the block form (runtime
  Gathers, Reshapes, the batched MatMul or grouped Conv, bias Add), both cut out of their models between the same
  input and output tensor (`onnx.utils.Extractor`); folded permutations live in the neighbours' weights and
  cost nothing;
- the whole model, original vs rewritten;
and ONNX Runtime does the same for comparison. Each latency is the median of `--repeats` alternating rounds of
the timing loop (warm-up, then at least `--runs` calls; p50); ratios are original / rewritten (> 1: faster), and
in brackets the ratio of the fastest single calls, which other jobs on a shared machine disturb least.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import corpus  # noqa: E402

MODELS = ["mnist_burn", "marabou_cifar10_medium", "cifar10_resnet4b"]
#: Extra rows with explicit layers (the default selection skips layers below min_size, like mnist_burn's fc2).
EXPLICIT = {"mnist_burn": ["/fc1/Gemm", "/fc2/Gemm"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--blocks", nargs="+", type=int, default=[4])
    parser.add_argument("--folds", nargs="+", default=["auto", "always", "never"],
                        help="fold settings; rewritten layers are timed one by one for the first only")
    parser.add_argument("--runs", type=int, default=100, help="timed calls per latency measurement (at least)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per latency pair")
    parser.add_argument("--threads", type=int, default=1, help="TVM and ONNX Runtime threads (1: least noise)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "blockperm.md")
    args = parser.parse_args(argv)

    from squeeze.targets import tvm_build  # noqa: PLC0415
    tvm_build.set_threads(args.threads)
    given = shlex.join(argv if argv is not None else sys.argv[1:])
    command = f"python benchmarks/blockperm.py {given}".strip()
    lines = _header(command, args)
    print("\n".join(lines), flush=True)
    started = time.perf_counter()
    summary, per_layer = [], []
    for name in args.models:
        for blocks in args.blocks:
            for i, fold in enumerate(args.folds):
                print(f"\n== {name}, blocks={blocks}, fold={fold}", flush=True)
                model_row, layer_rows = run_model(name, blocks, fold, args, per_layer=i == 0)
                summary.append(model_row)
                per_layer.extend(layer_rows)
            if name in EXPLICIT:
                print(f"\n== {name}, blocks={blocks}, layers={EXPLICIT[name]}", flush=True)
                summary.append(run_model(name, blocks, args.folds[0], args, per_layer=False, layers=EXPLICIT[name])[0])
    lines += ["", "## Whole models", "",
              "Accuracy on the evaluation split (labels), parameters and MACs of the rewritten layers and of the whole "
              "model, TVM CPU and ONNX Runtime latency of the whole model (batch 1, original / rewritten).", ""]
    lines += _table(summary)
    lines += ["", "## Rewritten layers", "",
              "Each layer cut out between its input and output tensor and timed alone; `Gather` lists the runtime "
              "permutations its block form kept (folded ones cost nothing).", ""]
    lines += _table(per_layer)
    lines += ["", "## What the numbers say", ""] + _findings(per_layer, summary)
    lines += ["", f"Total benchmark time: {time.perf_counter() - started:.0f} s."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(per_layer) - len(summary) - 12:]))
    print(f"\nwrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------- one model

def run_model(name: str, blocks: int, fold: str, args, per_layer: bool = True, layers: list[str] | None = None
              ) -> tuple[dict, list[dict]]:
    from squeeze import metrics, runtime  # noqa: PLC0415
    from squeeze.data import input_specs, resolve_shapes  # noqa: PLC0415
    from squeeze.model import load_model  # noqa: PLC0415
    from squeeze.pipeline import run_pipeline  # noqa: PLC0415
    from squeeze.registry import get_pass  # noqa: PLC0415
    from squeeze.spec import bind  # noqa: PLC0415

    original = load_model(corpus.model_path(name))
    calib, evald = corpus.split(corpus.dataset(name), 256)
    input_name = corpus._input_name(name)
    shapes = resolve_shapes(input_specs(original), {input_name: (1,) + calib.arrays[input_name].shape[1:]})
    results = {}
    for compensate in (True, False):
        chosen = f", layers={layers}" if layers else ""
        spec = f"blockperm(blocks={blocks}, fold={fold}, compensate={compensate}{chosen})"
        t0 = time.perf_counter()
        result = run_pipeline(original, bind(spec, get_pass), calib, shapes, seed=0, threads=args.threads)
        if result.failure:
            raise SystemExit(f"{name}: {result.failure}")
        results[compensate] = (result, time.perf_counter() - t0)
        print(f"  {spec}: {results[compensate][1]:.1f} s", flush=True)
    result, seconds = results[True]
    model = result.model
    step = result.steps[0]
    table = step["details"]["layer_table"]
    out_name = original.graph.output[0].name

    def accuracy(m: onnx.ModelProto) -> float:
        out = runtime.run(m, evald, [out_name], threads=args.threads)[out_name]
        return 100.0 * float((out.reshape(len(evald), -1).argmax(1) == evald.labels).mean())

    acc = {"orig": accuracy(original), "comp": accuracy(model), "plain": accuracy(results[False][0].model)}
    feed = {input_name: calib.arrays[input_name][:1]}
    whole_before, whole_after = metrics.summary(original, shapes), metrics.summary(model, shapes)
    tvm_lat = _latency_pair(original, model, feed, args, "cpu")
    raw_lat = _latency_pair(original, model, feed, args, "tvm-default")
    ort_lat = _latency_pair(original, model, feed, args, "ort")
    p_before = sum(r["params_before"] for r in table)
    p_after = sum(r["params_after"] for r in table)
    gathers = sum(len(r["runtime_gather"]) for r in table)
    model_row = {
        "model": name, "B": blocks, "fold": fold, "layers": ", ".join(layers) if layers else f"{len(table)} (default)",
        "runtime Gathers": gathers,
        "top-1 orig": f"{acc['orig']:.2f}", "top-1 comp.": f"{acc['comp']:.2f}",
        "top-1 no comp.": f"{acc['plain']:.2f}", "drop (comp.)": f"{acc['orig'] - acc['comp']:.2f}",
        "layer params": f"{p_before:,} → {p_after:,} ({p_before / p_after:.2f}×)",
        "model MACs ratio": f"{whole_before['macs'] / whole_after['macs']:.2f}×",
        "cpu ms orig": f"{tvm_lat[0]:.4f}", "cpu ms new": f"{tvm_lat[1]:.4f}",
        "cpu ratio p50 (min)": _ratio(tvm_lat),
        "TVM-default ratio p50 (min)": _ratio(raw_lat),
        "ORT ms orig": f"{ort_lat[0]:.4f}", "ORT ms new": f"{ort_lat[1]:.4f}",
        "ORT ratio p50 (min)": _ratio(ort_lat),
        "pass s": f"{seconds:.1f}",
        "_tvm_min": tvm_lat[2] / tvm_lat[3],
        "_raw_min": raw_lat[2] / raw_lat[3],
    }
    print("  " + ", ".join(f"{k}: {v}" for k, v in model_row.items() if not k.startswith("_")), flush=True)
    layer_rows: list[dict] = []
    if not per_layer:
        return model_row, layer_rows
    fixed_orig, fixed_new = _with_shapes(original, shapes), _with_shapes(model, shapes)
    values = runtime.activations(original, calib.subset(0, 1), _layer_inputs(original, table))
    values.update({k: v for k, v in feed.items()})
    for r in table:
        x_name, y_name = _io(original, r["layer"])
        before = onnx.utils.Extractor(fixed_orig).extract_model([x_name], [y_name])
        after = onnx.utils.Extractor(fixed_new).extract_model([x_name], [y_name])
        layer_shapes = {x_name: tuple(values[x_name].shape)}
        layer_feed = {x_name: values[x_name]}
        macs_b, macs_a = metrics.summary(before, layer_shapes)["macs"], metrics.summary(after, layer_shapes)["macs"]
        tvm_l = _latency_pair(before, after, layer_feed, args, "cpu")
        raw_l = _latency_pair(before, after, layer_feed, args, "tvm-default")
        ort_l = _latency_pair(before, after, layer_feed, args, "ort")
        row = {
            "model": name, "layer": r["layer"], "op": r["op"], "B": r["blocks"], "fold": fold,
            "shape → blocks": f"{r['shape']} → {r['blocks']}×{r['block_shape']}",
            "kept energy (id / rand)": f"{r['kept_energy']:.3f} ({r['kept_energy_identity']:.3f} / "
                                       f"{r['kept_energy_random']:.3f})",
            "params ratio": f"{r['params_before'] / r['params_after']:.2f}×",
            "MAC ratio": f"{macs_b / macs_a:.2f}×",
            "form": r.get("form", ""),
            "cpu µs orig": f"{1000 * tvm_l[0]:.1f}", "cpu µs new": f"{1000 * tvm_l[1]:.1f}",
            "cpu ratio p50 (min)": _ratio(tvm_l),
            "TVM-default ratio p50 (min)": _ratio(raw_l),
            "ORT µs orig": f"{1000 * ort_l[0]:.1f}", "ORT µs new": f"{1000 * ort_l[1]:.1f}",
            "ORT ratio p50 (min)": _ratio(ort_l),
            "Gather": ", ".join(g.split(" (")[0] for g in r["runtime_gather"]) or "—",
            "_ratios": (macs_b / macs_a, tvm_l[2] / tvm_l[3], ort_l[2] / ort_l[3], raw_l[2] / raw_l[3]),
        }
        layer_rows.append(row)
        print("  " + ", ".join(f"{k}: {v}" for k, v in row.items() if not k.startswith("_")), flush=True)
    return model_row, layer_rows


def _io(model: onnx.ModelProto, layer: str) -> tuple[str, str]:
    """The input and output tensor of a layer in the original model (a MatMul's output after its bias Add)."""
    node = next(n for n in model.graph.node if n.name == layer)
    out = node.output[0]
    if node.op_type == "MatMul":
        consumers = [n for n in model.graph.node if out in n.input]
        if len(consumers) == 1 and consumers[0].op_type == "Add":
            out = consumers[0].output[0]
    return node.input[0], out


def _layer_inputs(model: onnx.ModelProto, table: list[dict]) -> list[str]:
    inputs = {i.name for i in model.graph.input}
    return sorted({_io(model, r["layer"])[0] for r in table} - inputs)


def _with_shapes(model: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    """A copy with fixed input shapes and inferred value_info (what `onnx.utils.Extractor` needs)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in shapes:
            for d, n in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
                d.Clear()
                d.dim_value = int(n)
    return onnx.shape_inference.infer_shapes(fixed, data_prop=True)


# ------------------------------------------------------------------------------------------------- latency

def _latency_pair(before: onnx.ModelProto, after: onnx.ModelProto, feed: dict, args, engine: str
                  ) -> tuple[float, float, float, float]:
    """(median p50 before, after, fastest call before, after) in ms, measured in alternating rounds. The fastest
    call is the least disturbed by other jobs on a shared machine."""
    runners = [_runner(m, feed, args, engine) for m in (before, after)]
    p50: list[list[float]] = [[], []]
    fastest: list[list[float]] = [[], []]
    for _ in range(args.repeats):
        for i, run in enumerate(runners):
            timing = run()
            p50[i].append(timing["p50"])
            fastest[i].append(timing["min"])
    return (float(np.median(p50[0])), float(np.median(p50[1])), float(np.min(fastest[0])),
            float(np.min(fastest[1])))


def _ratio(lat: tuple[float, float, float, float]) -> str:
    return f"{lat[0] / lat[1]:.2f}× ({lat[2] / lat[3]:.2f}×)"


def _runner(model: onnx.ModelProto, feed: dict, args, engine: str):
    from squeeze.timing import time_calls  # noqa: PLC0415
    if engine == "ort":
        from squeeze import runtime  # noqa: PLC0415
        sess = runtime.session(model, args.threads)
        return lambda: time_calls(lambda: sess.run(None, feed), runs=args.runs)
    import tempfile  # noqa: PLC0415

    from squeeze.registry import get_target  # noqa: PLC0415
    from squeeze.targets import tvm_build  # noqa: PLC0415
    tvm = tvm_build.tvm()
    cpu = get_target("cpu").obj(schedules=engine == "cpu")  # the cpu target as squeeze ships it, or TVM's own
    with tempfile.TemporaryDirectory() as work:
        executable, names = cpu.build(model, {k: tuple(v.shape) for k, v in feed.items()}, Path(work)).handle
    vm = tvm_build.VMRunner(executable, tvm.cpu(), names)
    got = vm.run(feed)[0]
    from squeeze import runtime  # noqa: PLC0415
    ref = runtime.session(model).run(None, feed)[0]
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    if err > 1e-4:
        raise SystemExit(f"TVM and ONNX Runtime disagree ({err:.2e}) on {model.graph.name}")
    return lambda: vm.time(feed, args.runs)


# -------------------------------------------------------------------------------------------------- output

def _header(command: str, args) -> list[str]:
    import onnxruntime  # noqa: PLC0415

    from squeeze.targets import tvm_build  # noqa: PLC0415
    tvm = tvm_build.tvm()
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or cpu
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        "# blockperm benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}, squeeze commit {commit} (plus working tree)",
        f"- machine: {cpu}, {cores} usable core(s) (shared with other jobs), {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}",
        f"- TVM {tvm.__version__}, llvm mcpu={tvm_build.host_cpu()}, no tuning: `cpu` = squeeze's cpu target as "
        "shipped (its default schedules, targets/schedules), `TVM-default` = the same target with schedules=false "
        f"(Relax default pipeline); ONNX Runtime {onnxruntime.__version__} (CPU EP); {args.threads} thread(s) "
        "each; batch 1",
        f"- latency: median over {args.repeats} alternating rounds of p50 over ≥ {args.runs} calls after warm-up; "
        "ratios original/rewritten (> 1: faster), in brackets the ratio of the fastest single calls",
        "- data: first 256 labelled samples calibrate, the rest evaluate (MNIST: 9744, CIFAR-10: 761)",
    ]


def _findings(per_layer: list[dict], summary: list[dict]) -> list[str]:
    """Sentences computed from this run's ratios."""
    if not per_layer:
        return []
    macs, tvm, ort = (np.array([r["_ratios"][i] for r in per_layer]) for i in range(3))
    spread = []
    for name in dict.fromkeys(r["model"] for r in summary):
        orig = [float(r["cpu ms orig"]) for r in summary if r["model"] == name]
        if len(orig) > 1:
            spread.append(f"{name} {min(orig):.2f}-{max(orig):.2f} ms")
    noise = [f"- Noise: the same original model measured {', '.join(spread)} (cpu target, p50) in different rows: a shared "
             "2-core machine under load from other jobs. Compare ratios within a row (alternating rounds), "
             "preferably of the fastest calls, not absolute times across rows."] if spread else []
    raw = np.array([r["_ratios"][3] for r in per_layer])
    slower = [r["layer"] + f" ({r['form'] or r['op']}, {r['_ratios'][1]:.2f}×)" for r in per_layer
              if r["_ratios"][1] < 1]
    return noise + [
        "- The ratios below are those of the fastest calls (the least disturbed by other jobs).",
        "- Whole models, `cpu` target (speed-up for the MAC ratio): " + "; ".join(
            f"{r['model']} fold={r['fold']}{'' if 'default' in r['layers'] else ' (' + r['layers'] + ')'}: "
            f"{r['_tvm_min']:.2f}× for {r['model MACs ratio']}" for r in summary) + ".",
        f"- `cpu` target, rewritten layers: {int((tvm > 1).sum())} of {len(tvm)} ran faster, "
        f"{tvm.min():.2f}-{tvm.max():.2f}× (median {np.median(tvm):.2f}×) for MAC ratios of "
        f"{macs.min():.2f}-{macs.max():.2f}×" + (f"; slower: {', '.join(slower)}" if slower else "") + ".",
        f"- TVM's default pipeline (schedules=false): {raw.min():.2f}-{raw.max():.2f}× (median "
        f"{np.median(raw):.2f}×): it leaves the dense Conv/Gemm unscheduled, so ratios above the MAC ratio there "
        "measure how far the dense kernels are from peak, not less work.",
        f"- ONNX Runtime: {int((ort < 1).sum())} of {len(ort)} rewritten layers ran slower "
        f"({ort.min():.2f}-{ort.max():.2f}× as fast, median {np.median(ort):.2f}×): its dense kernels (MLAS) are "
        "tuned, its grouped paths less so, and its Gather copies single features one by one. Where the block "
        "forms are not faster, the pass says so in its notes.",
        "- Folding: `fold=always` removes every runtime Gather but constrains the partitions (a Flatten→Gemm can "
        "only group whole channels; a residual stream shares one partition across all its layers), which costs "
        "accuracy; compare the whole-model rows of the same model for what the Gathers cost.",
    ]


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(none)"]
    keys = [k for k in rows[0] if not k.startswith("_")]
    out = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    out += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return out


if __name__ == "__main__":
    sys.exit(main())
