"""Accuracy against MACs for `prune` on the corpus, with and without compensation, for each criterion (issue 4).

    /work/venv/bin/python benchmarks/prune_curve.py                       # everything → benchmarks/results/
    /work/venv/bin/python benchmarks/prune_curve.py --models mnist_burn --criteria l1 --targets 30,45

Per model, calibration = the first 256 samples and evaluation = the rest; calibration samples are never
evaluated on (SqueezeNet has no labels: 3 real images and seeded noise, split 32/32, scored by top-1 agreement
with the original). For every criterion and compensation on/off, the channel ratio that gives each target MAC
reduction is found by bisection (MACs do not depend on compensation), then the model is pruned at that ratio
exactly as the `prune` pass does — same ranking, plan, cut and compensation — and evaluated: top-1, drop,
agreement with the original and McNemar's exact p-value against it. One point per model is re-run through the
real pass manager to check that this shortcut yields the same model. With --latency, cifar10_resnet4b at
ratio 0.5 (every group loses half its channels) is compiled with TVM for this CPU and timed against the original
in the same run: latency ratio vs MAC ratio.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import corpus  # noqa: E402
from squeeze import metrics, runtime  # noqa: E402
from squeeze.context import Context  # noqa: E402
from squeeze.data import Dataset, input_specs  # noqa: E402
from squeeze.model import load_model, to_graph, to_model  # noqa: E402
from squeeze.passes import compensate as compensation  # noqa: E402
from squeeze.passes.coupling import channel_groups  # noqa: E402
from squeeze.passes.cutting import apply_plan  # noqa: E402
from squeeze.passes.prune import rank_channels  # noqa: E402

MODELS = ["cifar10_resnet4b", "mnist_burn", "sri_resnet_a", "squeezenet"]
CRITERIA = ["l1", "l2", "fpgm", "activation"]
TARGETS = [10, 20, 30, 45, 50]
RESULTS = REPO / "benchmarks" / "results"


@dataclass
class Point:
    criterion: str
    compensate: bool
    target: float
    ratio: float
    mac_reduction: float
    top1: float
    agreement: float
    p_value: float
    seconds: float
    methods: dict = field(default_factory=dict)


def photo_crops(files: list[str], count: int, seed: int) -> np.ndarray:
    """`count` random resized crops (scale 0.35–1, random flips) of real photos, Caffe-style SqueezeNet inputs
    (BGR, 0..255 minus (104, 117, 123), NCHW 224×224)."""
    from PIL import Image  # noqa: PLC0415
    rng = np.random.default_rng(seed)
    photos = [Image.open(corpus.ROOT / "datasets" / "images" / f).convert("RGB") for f in files]
    out = []
    for i in range(count):
        img = photos[i % len(photos)]
        w, h = img.size
        side = int(min(w, h) * np.sqrt(rng.uniform(0.35, 1.0)))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((224, 224), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        bgr = np.asarray(crop, np.float32)[..., ::-1] - np.array([104, 117, 123], np.float32)
        out.append(bgr.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out))


def data_for(name: str) -> tuple[Dataset, Dataset, bool]:
    """(calibration, evaluation, has labels)."""
    if name == "squeezenet":  # no labels, four photos: agreement on crops never used for calibration
        photos = ["kitten_224.png", "fish_tench.png", "cat_224x224.png", "satya_face.jpg"]
        calib = photo_crops(photos, 32, seed=0)
        test = photo_crops(photos, 48, seed=1)
        source = "corpus photos (random crops)"
        return (Dataset({"data_0": calib}, None, source, {"data_0": True}),
                Dataset({"data_0": test}, None, source, {"data_0": True}), False)
    ds = corpus.dataset(name, 2256 if name == "mnist_burn" and QUICK else None)
    calib, test = corpus.split(ds, 256)
    return calib, test, True


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value for paired per-sample correctness a, b."""
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


class Model:
    def __init__(self, name: str):
        self.name = name
        self.model = load_model(corpus.model_path(name))
        self.calib, self.test, self.labelled = data_for(name)
        self.shapes = {s.name: (1,) + tuple(self.calib.arrays[s.name].shape[1:]) for s in input_specs(self.model)}
        self.macs = metrics.summary(self.model, self.shapes)["macs"]
        self.reference = runtime.run(self.model, self.test)
        self.ref_pred = _pred(self.reference)
        self.ref_correct = self.ref_pred == self.test.labels if self.labelled else np.ones_like(self.ref_pred, bool)

    def context(self) -> Context:
        return Context(calib=self.calib, seed=0, model=self.model, input_shapes=self.shapes)

    def cut(self, plan) -> tuple:
        graph = to_graph(self.model)
        groups = channel_groups(graph, self.shapes)
        fresh = {groups[g.index]: keep for g, keep in plan.items()}
        apply_plan(graph, fresh)
        return graph, fresh

    def mac_reduction(self, plan) -> float:
        graph, _ = self.cut(plan)
        graph.cleanup().toposort()
        return 100.0 * (1 - metrics.summary(to_model(graph, like=self.model), self.shapes)["macs"] / self.macs)

    def evaluate(self, pruned) -> tuple[float, float, float]:
        pred = _pred(runtime.run(pruned, self.test))
        agreement = float(np.mean(pred == self.ref_pred))
        correct = pred == self.test.labels if self.labelled else pred == self.ref_pred
        return float(np.mean(correct)), agreement, mcnemar(self.ref_correct, correct)


def _pred(outputs: dict[str, np.ndarray]) -> np.ndarray:
    out = next(iter(outputs.values()))
    return out.reshape(out.shape[0], -1).argmax(axis=1)


def ratio_for(m: Model, ranking, target: float) -> tuple[float, float]:
    """The ratio whose plan's MAC reduction is closest to `target` % (bisection; MACs grow with the ratio)."""
    lo, hi, best = 0.0, 0.95, (0.0, 0.0)
    for _ in range(13):
        mid = (lo + hi) / 2
        plan = ranking.plan(mid)
        reduction = m.mac_reduction(plan) if plan else 0.0
        if abs(reduction - target) < abs(best[1] - target):
            best = (mid, reduction)
        lo, hi = (mid, hi) if reduction < target else (lo, mid)
    return best


def curve(m: Model, criterion: str, comp: bool, scope: str, targets: list[float], log) -> list[Point]:
    ctx = m.context()
    start = time.perf_counter()
    ranking = rank_channels(channel_groups(to_graph(m.model), m.shapes), ctx, criterion=criterion, scope=scope,
                            multiple=1, compensate=comp)
    rank_seconds = time.perf_counter() - start
    points = []
    for target in targets:
        ratio, reduction = ratio_for(m, ranking, target)
        start = time.perf_counter()
        plan = ranking.plan(ratio)
        graph, fresh = m.cut(plan)
        rows = compensation.compensate(graph, m.context(), fresh) if comp else []
        graph.cleanup().toposort()
        pruned = to_model(graph, like=m.model)
        top1, agreement, p = m.evaluate(pruned)
        methods: dict[str, int] = {}
        for row in rows:
            key = row["method"].split("(")[0]
            methods[key] = methods.get(key, 0) + 1
        points.append(Point(criterion, comp, target, ratio, reduction, top1, agreement, p,
                            rank_seconds + time.perf_counter() - start, methods))
        log(f"  {m.name} {criterion:10s} comp={str(comp):5s} target {target:4.0f}%: ratio {ratio:.3f} "
            f"MACs -{reduction:5.1f}%  top-1 {100 * top1:6.2f}  agree {100 * agreement:6.2f}  p={p:.3g}")
    return points


def check_against_pass(m: Model, point: Point, scope: str) -> float:
    """Run the real pass manager at the point's ratio; max |output difference| to the benchmark's model."""
    from squeeze.pipeline import run_pipeline  # noqa: PLC0415
    from squeeze.registry import get_pass  # noqa: PLC0415
    from squeeze.spec import bind  # noqa: PLC0415
    spec = (f"prune(ratio={point.ratio!r},criterion={point.criterion},scope={scope},"
            f"compensate={str(point.compensate).lower()})")
    result = run_pipeline(m.model, bind(spec, get_pass), m.calib, m.shapes)
    assert result.failure is None, result.failure
    ctx = m.context()
    ranking = rank_channels(channel_groups(to_graph(m.model), m.shapes), ctx, criterion=point.criterion,
                            scope=scope, multiple=1, compensate=point.compensate)
    graph, fresh = m.cut(ranking.plan(point.ratio))
    if point.compensate:
        compensation.compensate(graph, m.context(), fresh)
    graph.cleanup().toposort()
    ours = runtime.run(to_model(graph, like=m.model), m.test.subset(0, 64))
    theirs = runtime.run(result.model, m.test.subset(0, 64))
    return max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours)


def latency(log, threads_list: list[int]) -> dict:
    """cifar10_resnet4b at ratio 0.5 (layer scope: every group halves) against the original, TVM on this CPU, for
    each thread count (a fresh process each: TVM reads its thread count once)."""
    import subprocess  # noqa: PLC0415
    results = {}
    for threads in threads_list:
        proc = subprocess.run([sys.executable, __file__, "--latency-worker", str(threads)], capture_output=True,
                              text=True, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results[str(threads)] = result
        log(f"latency, {threads} thread(s): MAC ratio {result['mac_ratio']:.2f}; TVM latency ratio "
            f"{result['ratio_p50']:.2f} by p50 (original {result['original']['p50']:.4f} ms, pruned "
            f"{result['pruned']['p50']:.4f} ms), {result['ratio_min']:.2f} by min, {result['ratio_evaluator']:.2f} "
            f"by TVM's time_evaluator; needs ≥ {0.7 * result['mac_ratio']:.2f}")
    return results


def _latency_worker(threads: int) -> None:
    from squeeze.targets import tvm_build  # noqa: PLC0415
    from squeeze.targets.cpu import Cpu  # noqa: PLC0415
    tvm_build.set_threads(threads)
    tvm = tvm_build.tvm()
    from tvm import relax  # noqa: PLC0415
    m = Model("cifar10_resnet4b")
    ranking = rank_channels(channel_groups(to_graph(m.model), m.shapes), m.context(), criterion="l1",
                            scope="layer", multiple=1, compensate=False)
    graph, _ = m.cut(ranking.plan(0.5))
    graph.cleanup().toposort()
    pruned = to_model(graph, like=m.model)
    mac_ratio = m.macs / metrics.summary(pruned, m.shapes)["macs"]
    import tempfile  # noqa: PLC0415
    target = Cpu()
    sample = m.test.samples(1)
    with tempfile.TemporaryDirectory() as workdir:
        built = {k: target.build(v, m.shapes, Path(workdir)) for k, v in (("original", m.model), ("pruned", pruned))}
    p50: dict[str, list[float]] = {"original": [], "pruned": []}
    low: dict[str, list[float]] = {"original": [], "pruned": []}
    evaluator: dict[str, list[float]] = {"original": [], "pruned": []}
    for _ in range(5):  # interleaved rounds, so that both models see the same machine load
        for key, artifact in built.items():
            timing = target.measure(artifact, sample, runs=300).latency_ms
            p50[key].append(timing["p50"])
            low[key].append(timing["min"])
            executable, names = artifact.handle
            with tvm_build.keep_affinity():
                vm = relax.VirtualMachine(executable, tvm.cpu())
                args = [tvm.runtime.tensor(np.ascontiguousarray(sample[0][n]), tvm.cpu()) for n in names]
                runs = vm.time_evaluator("main", tvm.cpu(), number=100, repeat=3)(*args).results
            evaluator[key].append(1e3 * min(runs))
    best = {k: {"p50": min(p50[k]), "min": min(low[k]), "evaluator": min(evaluator[k])} for k in p50}
    print(json.dumps({"threads": threads, "mac_ratio": mac_ratio, **best, "rounds_p50": p50,
                      "ratio_p50": best["original"]["p50"] / best["pruned"]["p50"],
                      "ratio_min": best["original"]["min"] / best["pruned"]["min"],
                      "ratio_evaluator": best["original"]["evaluator"] / best["pruned"]["evaluator"]}))


def machine() -> str:
    cpu = corpus.cpu_model(platform.processor() or platform.machine())
    import onnxruntime  # noqa: PLC0415
    return (f"{cpu}, {runtime.cpu_count()} core(s) available; Python {platform.python_version()}, numpy "
            f"{np.__version__}, onnxruntime {onnxruntime.__version__}; {time.strftime('%Y-%m-%d %H:%M')}")


def markdown(commands: list[str], scope: str, models: dict[str, dict], lat: dict | None) -> str:
    lines = ["# prune: accuracy against MACs (benchmarks/prune_curve.py)", "",
             "Command" + ("s" if len(commands) > 1 else "") + ": " + "; then ".join(f"`{c}`" for c in commands), "",
             f"Machine: {machine()}", "",
             f"Scope `{scope}` (per model below), multiple 1, seed 0. Calibration = first 256 samples, "
             "evaluation = the rest (SqueezeNet, no labels and only four photos in the corpus: calibration = 32 "
             "random crops of the four, evaluation = 48 other crops of them, scored by top-1 *agreement* with the "
             "original). "
             "Each cell: MAC reduction, top-1 (drop in points vs the original); `p` is McNemar's exact p-value "
             "against the original on the same samples.", ""]
    for name, entry in models.items():
        base = entry["baseline"]
        kind = "top-1 agreement" if name == "squeezenet" else "top-1"
        lines += [f"## {name} (scope `{entry['scope']}`)", "",
                  f"Original: {kind} {100 * base:.2f} % on {entry['samples']} samples, "
                  f"{entry['macs'] / 1e6:.2f} M MACs. Pass check: the real pass at one point gives outputs within "
                  f"{entry['pass_check']:.1e} of the benchmark's model.", ""]
        targets = sorted({p["target"] for p in entry["points"]})
        lines.append("| criterion | compensation | " + " | ".join(f"~{t:g} % MACs" for t in targets) + " |")
        lines.append("|---|---|" + "---|" * len(targets))
        for criterion in dict.fromkeys(p["criterion"] for p in entry["points"]):
            for comp in (False, True):
                cells = []
                for t in targets:
                    p = next((p for p in entry["points"] if p["criterion"] == criterion and p["compensate"] == comp
                              and p["target"] == t), None)
                    cells.append("—" if p is None else
                                 f"−{p['mac_reduction']:.1f} %: {100 * p['top1']:.2f} "
                                 f"({100 * (p['top1'] - base):+.2f}, p={p['p_value']:.2g})")
                lines.append(f"| {criterion} | {'on' if comp else 'off'} | " + " | ".join(cells) + " |")
        worse = [p for p in entry["points"] if p["compensate"] and any(
            q["criterion"] == p["criterion"] and not q["compensate"] and q["target"] == p["target"]
            and q["top1"] > p["top1"] for q in entry["points"])]
        lines += ["", "Compensation never worse than none: " + ("yes" if not worse else "NO at " + ", ".join(
            f"{p['criterion']} ~{p['target']:g} %" for p in worse)), ""]
    if lat:
        lines += ["## Latency (cifar10_resnet4b, ratio 0.5 = every group keeps half its channels; TVM on this CPU)",
                  "", "Original and pruned are built in the same process and timed in 5 interleaved rounds (300 calls "
                  "each, after warm-up); each figure is the best round. `p50`/`min`: the cpu target's own timing "
                  "(Python call + sync); `evaluator`: TVM's time_evaluator (no Python in the loop). Requirement: "
                  "latency ratio ≥ 0.7 × MAC ratio.", "",
                  "| threads | MAC ratio | original p50 (ms) | pruned p50 (ms) | ratio p50 | ratio min "
                  "| ratio evaluator | 0.7 × MAC ratio |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for threads, r in lat.items():
            lines.append(f"| {threads} | {r['mac_ratio']:.2f} | {r['original']['p50']:.4f} | {r['pruned']['p50']:.4f} "
                         f"| {r['ratio_p50']:.2f} | {r['ratio_min']:.2f} | {r['ratio_evaluator']:.2f} "
                         f"| {0.7 * r['mac_ratio']:.2f} |")
        lines.append("")
    return "\n".join(lines)


QUICK = False


def main(argv: list[str] | None = None) -> int:
    global QUICK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--criteria", default=",".join(CRITERIA))
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="MAC reductions in %%")
    parser.add_argument("--scope", default="sensitivity", choices=["layer", "global", "sensitivity"])
    parser.add_argument("--large-scope", default="layer", choices=["layer", "global", "sensitivity"],
                        help="scope for SqueezeNet (its sensitivity scan takes long on two cores)")
    parser.add_argument("--latency", action="store_true", help="also time resnet4b at ratio 0.5 with TVM")
    parser.add_argument("--latency-threads", default="1,2", help="TVM thread counts to time with")
    parser.add_argument("--latency-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="MNIST: evaluate on 2,000 images, not 9,744")
    parser.add_argument("--out", default=str(RESULTS / "prune_curve.md"))
    parser.add_argument("--append", action="store_true",
                        help="keep the results of models not run now from the existing OUT .json")
    args = parser.parse_args(argv)
    if args.latency_worker:
        _latency_worker(args.latency_worker)
        return 0
    QUICK = args.quick
    command = "python benchmarks/prune_curve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    targets = [float(t) for t in args.targets.split(",")]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    models: dict[str, dict] = {}
    commands = [command]
    previous_latency = None
    if args.append and out.with_suffix(".json").is_file():
        previous = json.loads(out.with_suffix(".json").read_text())
        commands = previous.get("commands", []) + commands
        previous_latency = previous.get("latency")
        models = {k: v for k, v in previous.get("models", {}).items() if k not in args.models.split(",")}
    for name in args.models.split(","):
        m = Model(name)
        base = float(np.mean(m.ref_correct)) if m.labelled else 1.0
        log(f"{name}: baseline {100 * base:.2f} % on {len(m.test)} samples, {m.macs / 1e6:.2f} M MACs")
        scope = args.large_scope if name == "squeezenet" else args.scope
        points = []
        for criterion in args.criteria.split(","):
            for comp in (False, True):
                points += curve(m, criterion, comp, scope, targets, log)
        check = next(p for p in points if p.compensate)
        diff = check_against_pass(m, check, scope)
        log(f"  pass check ({check.criterion}, ratio {check.ratio:.3f}, compensated): max |diff| {diff:.2e}")
        models[name] = {"baseline": base, "samples": len(m.test), "macs": m.macs, "pass_check": diff, "scope": scope,
                        "points": [p.__dict__ for p in points]}
        out.with_suffix(".json").write_text(json.dumps({"commands": commands, "models": models,
                                                        "latency": previous_latency}, indent=1))
    lat = latency(log, [int(t) for t in args.latency_threads.split(",")]) if args.latency else previous_latency
    out.write_text(markdown(commands, args.scope, models, lat))
    out.with_suffix(".json").write_text(json.dumps({"commands": commands, "models": models, "latency": lat},
                                                   indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
