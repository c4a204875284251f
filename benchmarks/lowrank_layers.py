"""TVM latency of `lowrank`'s factorised layers, layer by layer and whole models (issue 21's TVM item).

    python benchmarks/lowrank_layers.py                       # → benchmarks/results/lowrank_layers.md
    python benchmarks/lowrank_layers.py --models cifar10_resnet4b --rounds 5 --out /tmp/layers.md

Per model (first 256 labelled images calibrate), `lowrank(rank=0.5)` and the plan `--goal
macs=0.65,using=prune+lowrank` chose (`GOAL_PLANS`, from benchmarks/results/lowrank_goal_uniform.md; `--search`
reruns the goal search instead) run through the real pass manager, each also with `multiple=M` (ranks rounded
to the cpu target's channel multiple, so the first factor's outputs fill whole vectors). Every model is compiled for the `cpu` target
(LLVM for this host, 1 thread) twice: with the current default schedules and with those of `--baseline`
(a commit's `targets/schedules`, loaded from git: by default the one before conv→conv pairs were fused), and
all builds are timed in alternating rounds in this one process; each ratio is the median of per-round ratios.

Per layer: every factorised layer is cut out of the original model (the Conv/Gemm with its bias) and out of the
factorised one (the two factors), each compiled alone and timed the same way: `speed-up` = original layer /
factored pair, next to `MAC ×` = original / factored multiply-adds. Whole models: TVM latency against the
original's, with and without the pair schedules. `TVM=ORT`: the compiled model's outputs against ONNX Runtime on
8 evaluation images (max |Δ| / max |ORT|). `--others` adds models without factorised layers (their code must be
unchanged: the same latency with both schedule sets).
"""
from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import importlib.util
import io
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from benchmarks import corpus  # noqa: E402
from benchmarks import run as harness  # noqa: E402

MODELS = ["cifar10_resnet4b", "sri_resnet_a"]
OTHERS = ["cifar10_resnet4b", "sri_resnet_a", "mnist_burn", "squeezenet"]
#: what `--goal macs=0.65,using=prune+lowrank` chose (benchmarks/results/lowrank_goal_uniform.md, seed 0)
GOAL_PLANS = {
    "cifar10_resnet4b": "lowrank(layer_rank=['Conv_0=0.5','Conv_2=0.5','Conv_4=0.5','Conv_5=0.25','Conv_8=0.5',"
                        "'Conv_10=0.5','Conv_19=0.75'],skip=[Conv_13,Conv_15,Conv_21,Gemm_25])",
    "sri_resnet_a": "lowrank(layer_rank=['Conv_0=0.5','Conv_2=0.5','Conv_3=0.5','Conv_5=0.5','Conv_8=0.5',"
                    "'Conv_9=0.5','Conv_11=0.5','Conv_14=0.5','Conv_15=0.5','Conv_17=0.5','Gemm_21=0.5'])",
}
BASELINE = "07c3130"  # the last commit before schedules/conv_pair.py


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, check=False).stdout.strip()


def baseline_schedules(commit: str):
    """`targets/schedules` as of `commit`, imported as a package of its own (`baseline_schedules`)."""
    data = subprocess.run(["git", "archive", commit, "targets/schedules"], capture_output=True, cwd=REPO,
                          check=True).stdout
    root = Path(tempfile.mkdtemp(prefix="squeeze-schedules-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # imported lazily while the script runs: keep till exit
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(root, filter="data")
    pkg = root / "targets" / "schedules"
    spec = importlib.util.spec_from_file_location("baseline_schedules", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_schedules"] = module
    spec.loader.exec_module(module)
    return module


class Build:
    """One model compiled with one schedule set, its VM and a fixed input."""

    def __init__(self, model: onnx.ModelProto, shapes: dict, schedules, feed: dict):
        from squeeze.targets import tvm_build  # noqa: PLC0415
        from squeeze.targets.cpu import Cpu  # noqa: PLC0415
        tvm = tvm_build.tvm()
        target = Cpu().tvm_target()
        mod = tvm_build.import_onnx(model, shapes)
        executable = tvm_build.compile_module(mod, target, schedules.build_pipeline(target, None, 1))
        self.vm = tvm_build.VMRunner(executable, tvm.cpu(), list(shapes))
        self.feed = feed
        self.runs = 0
        pairs = [name for name in _function_names(mod, target, schedules) if "conv2d_pair" in name]
        self.pair_functions = len(pairs)

    def time(self) -> float:
        if not self.runs:  # ~0.2 s a round
            once = self.vm.time(self.feed, 5)["p50"]
            self.runs = int(min(2000, max(10, 0.2 / max(once, 1e-6))))
        return self.vm.time(self.feed, self.runs)["p50"]


def scheduled_tir(model: onnx.ModelProto, shapes: dict, schedules) -> list[str]:
    """The scheduled TIR of every function of `model` with `schedules` (1 thread), sorted: equal lists mean the
    two schedule sets generate the same code for this model."""
    from squeeze.targets import tvm_build  # noqa: PLC0415
    from squeeze.targets.cpu import Cpu  # noqa: PLC0415
    from tvm import tirx  # noqa: PLC0415
    from tvm.s_tir import dlight as dl  # noqa: PLC0415
    tvm = tvm_build.tvm()
    target = Cpu().tvm_target()
    planned = sys.modules[schedules.__name__ + ".common"].planned_threads
    with target:
        mod = tvm.transform.Sequential(schedules.fuse_passes(target))(tvm_build.import_onnx(model, shapes))
        with planned(1):
            mod = dl.ApplyDefaultSchedule(*schedules.rules())(mod)
    return sorted(f.script() for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


def _function_names(mod, target, schedules) -> list[str]:
    from tvm import tirx  # noqa: PLC0415
    fused = schedules.fused_module(mod, target)
    return [g.name_hint for g, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)]


def _check(model: onnx.ModelProto, build: Build, samples: list[dict]) -> float:
    """max |TVM − ORT| / max |ORT| over `samples` and every output."""
    from squeeze import runtime  # noqa: PLC0415
    sess = runtime.session(model, 1)
    worst = 0.0
    for s in samples:
        ref = sess.run(None, s)
        got = build.vm.run(s)
        for r, g in zip(ref, got):
            worst = max(worst, float(np.abs(g.reshape(r.shape) - r).max() / max(float(np.abs(r).max()), 1e-12)))
    return worst


def interleaved(builds: dict[str, Build], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in builds}
    for _ in range(rounds):
        for key, build in builds.items():
            times[key].append(build.time())
    return times


def ratio(times: dict, num: str, den: str) -> float:
    return float(np.median(np.array(times[num]) / np.array(times[den])))


# ---------------------------------------------------------------------------------------- layers

def _shapes_of(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        out[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return out


def _sub_model(model: onnx.ModelProto, names: list[str], shapes: dict) -> onnx.ModelProto:
    """The nodes `names` (in order) of `model` as a model of their own: first node's data input → last output."""
    nodes = [n for name in names for n in model.graph.node if n.name == name]
    inits = {i.name: i for i in model.graph.initializer}
    used = [inits[i] for n in nodes for i in n.input if i in inits]
    x, y = nodes[0].input[0], nodes[-1].output[0]
    graph = onnx.helper.make_graph(
        nodes, "layer", [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, shapes[x])],
        [onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, shapes[y])], used)
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def factored_layers(original: onnx.ModelProto, factored: onnx.ModelProto) -> list[tuple[str, onnx.ModelProto,
                                                                                        onnx.ModelProto]]:
    """(layer, original layer model, factor pair model) for every layer `lowrank` split into NAME_lowrank + NAME."""
    names = {n.name for n in factored.graph.node}
    shapes, fshapes = _shapes_of(original), _shapes_of(factored)
    out = []
    for node in original.graph.node:
        if node.name + "_lowrank" in names:
            out.append((node.name, _sub_model(original, [node.name], shapes),
                        _sub_model(factored, [node.name + "_lowrank", node.name], fshapes)))
    return out


def _describe(model: onnx.ModelProto) -> str:
    parts = []
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    for n in model.graph.node:
        w = inits.get(n.input[1], [])
        if n.op_type == "Conv":
            parts.append(f"{w[1]}→{w[0]} {w[2]}×{w[3]}")
        else:
            parts.append(f"{n.op_type} {'×'.join(map(str, w))}")
    return " + ".join(parts)


def layer_rows(original, factored, current, baseline, rounds: int, log) -> list[dict]:
    from squeeze import metrics  # noqa: PLC0415
    rows = []
    for name, orig_layer, pair in factored_layers(original, factored):
        x = orig_layer.graph.input[0]
        shape = tuple(d.dim_value for d in x.type.tensor_type.shape.dim)
        feed = {x.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        shapes = {x.name: shape}
        builds = {"orig": Build(orig_layer, shapes, current, feed), "pair": Build(pair, shapes, current, feed),
                  "pair_base": Build(pair, shapes, baseline, feed)}
        times = interleaved(builds, rounds)
        macs = metrics.summary(orig_layer, shapes)["macs"] / metrics.summary(pair, shapes)["macs"]
        row = {"layer": name, "shape": "×".join(map(str, shape[1:])), "orig": _describe(orig_layer),
               "pair": _describe(pair), "mac_x": macs, "orig_us": 1e3 * float(np.median(times["orig"])),
               "pair_us": 1e3 * float(np.median(times["pair"])), "speedup": ratio(times, "orig", "pair"),
               "speedup_base": ratio(times, "orig", "pair_base"), "fused": builds["pair"].pair_functions > 0,
               "err": _check(pair, builds["pair"], [feed])}
        rows.append(row)
        log(f"  {name:10s} {row['pair']:28s} MAC× {macs:.2f}  speed-up {row['speedup']:.2f} "
            f"(unfused {row['speedup_base']:.2f})  err {row['err']:.1e}")
    return rows


# ---------------------------------------------------------------------------------------- models

def _apply(model, calib, shapes, spec: str):
    from squeeze.pipeline import run_pipeline  # noqa: PLC0415
    from squeeze.registry import get_pass  # noqa: PLC0415
    from squeeze.spec import bind  # noqa: PLC0415
    result = run_pipeline(model, bind(spec, get_pass), calib, shapes, seed=0)
    if result.failure:
        raise RuntimeError(result.failure)
    return result.model


def _top1(model, test) -> tuple[float, float, int]:
    """(top-1 %, its standard error, n) on the evaluation images (ONNX Runtime)."""
    from squeeze import runtime  # noqa: PLC0415
    out = next(iter(runtime.run(model, test).values()))
    correct = out.reshape(out.shape[0], -1).argmax(axis=1) == test.labels
    p = float(np.mean(correct))
    return 100 * p, 100 * float(np.sqrt(p * (1 - p) / len(correct))), len(correct)


def _goal_plan(name: str, model, calib, shapes, search: bool) -> str:
    if not search:
        return GOAL_PLANS[name]
    from squeeze import goal as goal_mod  # noqa: PLC0415
    result = goal_mod.search(model, goal_mod.parse_goal("macs=0.65,using=prune+lowrank"), calib, shapes,
                             original=model, seed=0, say=lambda msg: None)
    return ",".join(str(c) for c in result.calls)


def bench_model(name: str, args, current, baseline, log) -> dict:
    from squeeze import metrics  # noqa: PLC0415
    from squeeze.data import input_specs  # noqa: PLC0415
    from squeeze.model import load_model  # noqa: PLC0415
    model = load_model(corpus.model_path(name))
    calib, test = corpus.split(corpus.dataset(name), 256)
    shapes = {s.name: (1,) + tuple(calib.arrays[s.name].shape[1:]) for s in input_specs(model)}
    samples = test.samples(8)
    variants = {"original": model}
    specs = {"original": ""}
    goal = _goal_plan(name, model, calib, shapes, args.search)
    multiple = f"multiple={args.multiple}"
    for label, spec in (("lowrank(rank=0.5)", "lowrank(rank=0.5)"),
                        (f"lowrank(rank=0.5,{multiple})", f"lowrank(rank=0.5,{multiple})"),
                        ("goal mix", goal), (f"goal mix, {multiple}", goal.replace("lowrank(", f"lowrank({multiple},"))):
        variants[label] = _apply(model, calib, shapes, spec)
        specs[label] = spec
    top1 = {label: _top1(m, test) for label, m in variants.items()}
    macs = {k: metrics.summary(m, shapes)["macs"] for k, m in variants.items()}
    builds, errors = {}, {}
    for label, m in variants.items():
        for which, sched in (("new", current), ("base", baseline)):
            builds[(label, which)] = Build(m, shapes, sched, samples[0])
        errors[label] = _check(m, builds[(label, "new")], samples)
    times = interleaved(builds, args.rounds)
    rows = []
    for label in variants:
        rows.append({"pipeline": label, "spec": specs[label], "macs_kept": macs[label] / macs["original"],
                     "ms": float(np.median(times[(label, "new")])),
                     "speedup": ratio(times, ("original", "new"), (label, "new")),
                     "speedup_base": ratio(times, ("original", "base"), (label, "base")),
                     "new_vs_base": ratio(times, (label, "base"), (label, "new")),
                     "pairs": builds[(label, "new")].pair_functions, "err": errors[label], "top1": top1[label]})
        r = rows[-1]
        log(f"  {label:18s} MACs {r['macs_kept']:.3f}  {r['ms']:.4f} ms  speed-up {r['speedup']:.2f} "
            f"(baseline schedules {r['speedup_base']:.2f})  err {r['err']:.1e}")
    layers = {label: layer_rows(model, variants[label], current, baseline, args.rounds, log)
              for label in variants if label in ("lowrank(rank=0.5)", f"lowrank(rank=0.5,{multiple})", "goal mix")}
    return {"name": name, "rows": rows, "layers": layers}


def bench_others(names: list[str], args, current, baseline, log) -> list[dict]:
    """Models compiled with both schedule sets, alternating rounds: the same code must time the same."""
    from squeeze.data import input_specs  # noqa: PLC0415
    from squeeze.model import load_model  # noqa: PLC0415
    from benchmarks.prune_curve import data_for  # noqa: PLC0415
    rows = []
    for name in names:
        model = load_model(corpus.model_path(name))
        _, test, _ = data_for(name)
        shapes = {s.name: (1,) + tuple(test.arrays[s.name].shape[1:]) for s in input_specs(model)}
        feed = test.samples(1)[0]
        builds = {"new": Build(model, shapes, current, feed), "base": Build(model, shapes, baseline, feed)}
        times = interleaved(builds, args.rounds)
        rows.append({"model": name, "new_ms": float(np.median(times["new"])),
                     "base_ms": float(np.median(times["base"])), "ratio": ratio(times, "base", "new"),
                     "pairs": builds["new"].pair_functions, "err": _check(model, builds["new"], [feed]),
                     "same_code": scheduled_tir(model, shapes, current) == scheduled_tir(model, shapes, baseline)})
        log(f"  {name:18s} base {rows[-1]['base_ms']:.4f} ms  now {rows[-1]['new_ms']:.4f} ms  "
            f"base/now {rows[-1]['ratio']:.3f}")
    return rows


# ---------------------------------------------------------------------------------------- report

def markdown(results: list[dict], others: list[dict], command: str, started: dict, args) -> str:
    lines = ["# lowrank: TVM latency of factorised layers, per layer and per model (issue 21)", "",
             f"Command: `{command}`  ", f"Commit: {_git('rev-parse', '--short', 'HEAD')}; baseline schedules: "
             f"{args.baseline} ({_git('log', '-1', '--format=%s', args.baseline)[:80]}…)  ",
             f"Machine: {harness._machine()}; 1 TVM/ORT thread  ",
             f"Load (1/5/15 min): {started['load']} at the start, {_load()} at the end (a shared machine: every "
             f"figure is a median of per-round ratios, {args.rounds} alternating rounds in one process)  ",
             f"Started {started['at']}, took {(time.time() - started['t']) / 60:.1f} min", "",
             "`speed-up` = original / compressed latency (TVM, cpu target, default schedules, batch 1); `baseline` "
             "= the same with the baseline commit's schedules (factor pairs as two functions); `MAC ×` = original / "
             "compressed multiply-adds; `TVM=ORT` = max |TVM − ORT| / max |ORT| on 8 evaluation images (a layer: "
             "one random input).", ""]
    for res in results:
        lines += [f"## {res['name']}", "",
                  "| pipeline | top-1 % (± SE) | MACs kept | MAC × | TVM ms | speed-up | speed-up, baseline schedules "
                  "| pair functions | TVM=ORT |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        n = res["rows"][0]["top1"][2]
        for r in res["rows"]:
            label = r["pipeline"] if not r["spec"] or r["spec"] == r["pipeline"] else \
                f"{r['pipeline']}: `{r['spec']}`"
            lines.append(f"| {label} | {r['top1'][0]:.2f} ± {r['top1'][1]:.2f} | {r['macs_kept']:.3f} "
                         f"| {1 / r['macs_kept']:.2f} | {r['ms']:.4f} | {r['speedup']:.2f} | {r['speedup_base']:.2f} "
                         f"| {r['pairs']} | {r['err']:.1e} |")
        lines += ["", f"(top-1 on the {n} images after the 256 calibration ones, ONNX Runtime; "
                  "`pair functions`: distinct `conv2d_pair` functions in the build)"]
        for label, rows in res["layers"].items():
            lines += ["", f"Per layer, {label}:", "",
                      "| layer | input | original | factors | MAC × | original µs | factors µs | speed-up "
                      "| speed-up, baseline | one function | TVM=ORT |",
                      "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
            for r in rows:
                lines.append(f"| {r['layer']} | {r['shape']} | {r['orig']} | {r['pair']} | {r['mac_x']:.2f} "
                             f"| {r['orig_us']:.2f} | {r['pair_us']:.2f} | {r['speedup']:.2f} "
                             f"| {r['speedup_base']:.2f} | {'yes' if r['fused'] else 'no'} | {r['err']:.1e} |")
        lines.append("")
    if others:
        lines += ["## Models without factorised layers: baseline vs current schedules", "",
                  "| model | baseline ms | current ms | baseline / current | pair functions | same scheduled TIR "
                  "| TVM=ORT |", "|---|---:|---:|---:|---:|---|---:|"]
        lines += [f"| {r['model']} | {r['base_ms']:.4f} | {r['new_ms']:.4f} | {r['ratio']:.3f} | {r['pairs']} "
                  f"| {'yes' if r['same_code'] else 'no'} | {r['err']:.1e} |" for r in others]
        lines.append("")
    return "\n".join(lines)


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--others", nargs="*", default=OTHERS, help="models timed with both schedule sets")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--baseline", default=BASELINE, help="commit whose targets/schedules is the baseline")
    parser.add_argument("--search", action="store_true", help="rerun the goal search instead of GOAL_PLANS")
    parser.add_argument("--multiple", type=int, default=0, help="rank multiple of the extra rows (default: the "
                        "cpu target's channel_multiple)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lowrank_layers.md")
    args = parser.parse_args(argv)
    command = "python benchmarks/lowrank_layers.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    started = {"load": _load(), "at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "t": time.time()}
    from squeeze.targets import schedules as current, tvm_build  # noqa: PLC0415
    tvm_build.set_threads(1)
    baseline = baseline_schedules(args.baseline)
    if not args.multiple:
        from squeeze.targets.cpu import Cpu  # noqa: PLC0415
        args.multiple = Cpu().channel_multiple
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    results, others = [], []
    for name in args.models:
        log(name)
        results.append(bench_model(name, args, current, baseline, log))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(results, others, command.strip(), started, args))
    if args.others:
        log("models without factorised layers")
        others = bench_others(args.others, args, current, baseline, log)
    args.out.write_text(markdown(results, others, command.strip(), started, args))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
