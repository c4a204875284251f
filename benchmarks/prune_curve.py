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
from squeeze.verify import output_loss  # noqa: E402

MODELS = ["cifar10_resnet4b", "mnist_burn", "sri_resnet_a", "squeezenet"]
CRITERIA = ["l1", "l2", "fpgm", "activation", "reconstruction", "hessian"]
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
    scope: str = ""
    commit: str = ""
    top1_se: float = float("nan")       # standard error of top-1 on the evaluation samples
    drop_se: float = float("nan")       # paired standard error of the drop against the original
    val_top1: float | None = None       # --holdout: top-1 on the held-out calibration samples (what chooses)
    val_drop_se: float | None = None
    val_loss: float | None = None       # --holdout: output loss (KL of the class scores) on them


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
    """(calibration, evaluation, has labels); with --holdout the calibration is the fitting part only (the
    validation part is `Model.val`)."""
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
        self.val = None
        if HOLDOUT and self.labelled:  # every 4th of the first 256 validates (squeeze.data.HOLDOUT_EVERY), the rest fit
            self.calib, self.val = self.calib.split_holdout()
        self.shapes = {s.name: (1,) + tuple(self.calib.arrays[s.name].shape[1:]) for s in input_specs(self.model)}
        self.macs = metrics.summary(self.model, self.shapes)["macs"]
        self.reference = runtime.run(self.model, self.test)
        self.ref_pred = _pred(self.reference)
        self.ref_correct = self.ref_pred == self.test.labels if self.labelled else np.ones_like(self.ref_pred, bool)
        if self.val is not None:
            self.val_reference = runtime.run(self.model, self.val)
            self.val_ref_correct = _pred(self.val_reference) == self.val.labels

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

    def evaluate(self, pruned) -> tuple[float, float, float, float, float]:
        """(top-1, agreement, McNemar p, se of top-1, paired se of the drop) on the evaluation samples."""
        pred = _pred(runtime.run(pruned, self.test))
        agreement = float(np.mean(pred == self.ref_pred))
        correct = pred == self.test.labels if self.labelled else pred == self.ref_pred
        return (float(np.mean(correct)), agreement, mcnemar(self.ref_correct, correct), standard_error(correct),
                standard_error(correct.astype(float) - self.ref_correct))

    def validate(self, pruned) -> tuple[float, float, float]:
        """(top-1, paired se of the drop, output loss against the original) on the held-out calibration samples."""
        out = runtime.run(pruned, self.val)
        correct = _pred(out) == self.val.labels
        return (float(np.mean(correct)), standard_error(correct.astype(float) - self.val_ref_correct),
                output_loss(self.val_reference, out))


def standard_error(values: np.ndarray) -> float:
    values = np.asarray(values, np.float64)
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


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
        seconds = rank_seconds + time.perf_counter() - start
        top1, agreement, p, top1_se, drop_se = m.evaluate(pruned)
        methods: dict[str, int] = {}
        for row in rows:
            key = row["method"].split("(")[0]
            methods[key] = methods.get(key, 0) + 1
        point = Point(criterion, comp, target, ratio, reduction, top1, agreement, p, seconds, methods, scope,
                      COMMIT, top1_se, drop_se)
        if m.val is not None:
            point.val_top1, point.val_drop_se, point.val_loss = m.validate(pruned)
        points.append(point)
        val = "" if m.val is None else f"  val {100 * point.val_top1:6.2f} loss {point.val_loss:.4f}"
        log(f"  {m.name} {criterion:10s} {scope:11s} comp={str(comp):5s} target {target:4.0f}%: ratio {ratio:.3f} "
            f"MACs -{reduction:5.1f}%  top-1 {100 * top1:6.2f}  agree {100 * agreement:6.2f}  p={p:.3g}{val}  "
            f"{seconds:.1f} s")
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
    cpu = corpus.cpu_model()
    import onnxruntime  # noqa: PLC0415
    return (f"{cpu}, {runtime.cpu_count()} core(s) available; Python {platform.python_version()}, numpy "
            f"{np.__version__}, onnxruntime {onnxruntime.__version__}; {time.strftime('%Y-%m-%d %H:%M')}")


#: The commit the rows of the first tables (issue 4, scope sensitivity, no held-out validation) were made at.
OLD_COMMIT = "3abac27"


def _key(p: dict) -> tuple:
    return p["criterion"], p.get("scope") or "", p["compensate"], p.get("val_top1") is not None


def _cell(p: dict | None, base: float) -> str:
    if p is None:
        return "—"
    text = f"−{p['mac_reduction']:.1f} %: {100 * p['top1']:.2f}"
    if p.get("top1_se") is not None and not math.isnan(p.get("top1_se", float("nan"))):
        text += f" ± {100 * p['top1_se']:.2f} ({100 * (p['top1'] - base):+.2f} ± {100 * p['drop_se']:.2f}"
    else:
        text += f" ({100 * (p['top1'] - base):+.2f}"
    text += f", p={p['p_value']:.2g})"
    if p.get("val_top1") is not None:
        text += f"; val {100 * p['val_top1']:.1f}, loss {p['val_loss']:.3f}"
    return text


def choice(models: dict[str, dict]) -> list[str]:
    """Which (criterion, scope) keeps most top-1 on the validation samples, over every model and target that has
    held-out rows with compensation; the evaluation columns confirm and are not used to choose."""
    rows: dict[tuple, dict] = {}
    for name, entry in models.items():
        for p in entry["points"]:
            if p.get("val_top1") is None or not p["compensate"]:
                continue
            r = rows.setdefault((p["criterion"], p["scope"]), {"val": [], "loss": [], "eval": [], "models": set(),
                                                                 "seconds": []})
            r["val"].append(100 * (p["val_top1"] - entry["val_baseline"]))
            r["loss"].append(p["val_loss"])
            r["eval"].append(100 * (p["top1"] - entry["baseline"]))
            r["models"].add(name)
            r["seconds"].append(p["seconds"])
    if not rows:
        return []
    full = max(len(r["val"]) for r in rows.values())
    ranked = sorted(rows.items(), key=lambda kv: (len(kv[1]["val"]) < full, -np.mean(kv[1]["val"]),
                                                  np.mean(kv[1]["loss"])))
    lines = ["## Choosing the default criterion and scope (held-out validation)", "",
             "Rows with `val`: the pass fits on 192 of the first 256 samples and every 4th of them (64) validates "
             "(squeeze.data.HOLDOUT_EVERY); evaluation on samples 256+ as above. Ranked by the mean validation "
             "top-1 drop over every model × target (ties: mean validation output loss); the evaluation drop is "
             "shown to confirm, not to choose. Seconds: ranking + one cut and compensation, per point.", "",
             "| criterion | scope | points | models | mean val drop (pts) | mean val loss | mean eval drop (pts) "
             "| mean seconds |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for (criterion, scope), r in ranked:
        lines.append(f"| {criterion} | {scope} | {len(r['val'])} | {', '.join(sorted(r['models']))} | "
                     f"{np.mean(r['val']):+.2f} | {np.mean(r['loss']):.4f} | {np.mean(r['eval']):+.2f} | "
                     f"{np.mean(r['seconds']):.1f} |")
    return lines + [""]


def markdown(commands: list[str], scope: str, models: dict[str, dict], lat: dict | None) -> str:
    lines = ["# prune: accuracy against MACs (benchmarks/prune_curve.py)", "",
             "Command" + ("s" if len(commands) > 1 else "") + ": " + "; then ".join(f"`{c}`" for c in commands), "",
             f"Machine: {machine()}", "",
             "Multiple 1, seed 0. Calibration = first 256 samples, evaluation = the rest (SqueezeNet, no labels and "
             "only four photos in the corpus: calibration = 32 random crops of the four, evaluation = 48 other crops "
             "of them, scored by top-1 *agreement* with the original). Rows without `val` (commit "
             f"{OLD_COMMIT}) fit on all 256; rows with `val` fit on 192 of them and validate on the other 64. "
             "Each cell: MAC reduction, top-1 ± its standard error (drop in points vs the original ± its paired "
             "standard error, McNemar's exact p-value against the original on the same samples); with `val`: top-1 "
             "and output loss (KL) on the 64 held-out calibration samples.", ""]
    lines += choice(models)
    for name, entry in models.items():
        base = entry["baseline"]
        kind = "top-1 agreement" if name == "squeezenet" else "top-1"
        n = entry["samples"]
        se = math.sqrt(base * (1 - base) / n) if n else float("nan")
        val = "" if entry.get("val_baseline") is None else \
            f"; on the 64 validation samples {100 * entry['val_baseline']:.2f} %"
        lines += [f"## {name}", "",
                  f"Original: {kind} {100 * base:.2f} ± {100 * se:.2f} % on {n} samples{val}, "
                  f"{entry['macs'] / 1e6:.2f} M MACs. Pass check: the real pass at one point gives outputs within "
                  f"{entry['pass_check']:.1e} of the benchmark's model.", ""]
        targets = sorted({p["target"] for p in entry["points"]})
        lines.append("| criterion | scope | compensation | commit | " + " | ".join(f"~{t:g} % MACs" for t in targets)
                     + " |")
        lines.append("|---|---|---|---|" + "---|" * len(targets))
        for key in dict.fromkeys(_key(p) for p in entry["points"]):
            criterion, sc, comp, _ = key
            rows = [p for p in entry["points"] if _key(p) == key]
            cells = [_cell(next((p for p in rows if p["target"] == t), None), base) for t in targets]
            commit = rows[0].get("commit") or OLD_COMMIT
            lines.append(f"| {criterion} | {sc or entry['scope']} | {'on' if comp else 'off'} | {commit} | "
                         + " | ".join(cells) + " |")
        worse = [p for p in entry["points"] if p["compensate"] and any(
            _key(q)[:2] == _key(p)[:2] and not q["compensate"] and q["target"] == p["target"]
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
HOLDOUT = False
COMMIT = ""


def _commit() -> str:
    import subprocess  # noqa: PLC0415
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "passes", "squeeze", "benchmarks/prune_curve.py"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    global QUICK, HOLDOUT, COMMIT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--criteria", default=",".join(CRITERIA))
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="MAC reductions in %%")
    parser.add_argument("--scope", default="sensitivity",
                        help="scope(s), comma-separated: layer, global, sensitivity")
    parser.add_argument("--large-scope", default="layer", choices=["layer", "global", "sensitivity"],
                        help="scope for SqueezeNet (its sensitivity scan takes long on two cores)")
    parser.add_argument("--compensation", default="both", choices=["both", "on", "off"])
    parser.add_argument("--holdout", action="store_true",
                        help="fit on 3/4 of the calibration samples, validate on every 4th (what chooses)")
    parser.add_argument("--latency", action="store_true", help="also time resnet4b at ratio 0.5 with TVM")
    parser.add_argument("--latency-threads", default="1,2", help="TVM thread counts to time with")
    parser.add_argument("--latency-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-pass-check", action="store_true",
                        help="skip re-running one point through the pass manager (keeps the previous figure)")
    parser.add_argument("--quick", action="store_true", help="MNIST: evaluate on 2,000 images, not 9,744")
    parser.add_argument("--out", default=str(RESULTS / "prune_curve.md"))
    parser.add_argument("--append", action="store_true",
                        help="keep the existing OUT .json's results: other models whole, and the rows (criterion, "
                             "scope, compensation, holdout) of the models run now that are not run again")
    args = parser.parse_args(argv)
    if args.latency_worker:
        _latency_worker(args.latency_worker)
        return 0
    QUICK, HOLDOUT, COMMIT = args.quick, args.holdout, _commit()
    command = "python benchmarks/prune_curve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    targets = [float(t) for t in args.targets.split(",")]
    scopes = args.scope.split(",")
    comps = {"both": (False, True), "on": (True,), "off": (False,)}[args.compensation]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    models: dict[str, dict] = {}
    commands = [command]
    previous_latency = None
    if args.append and out.with_suffix(".json").is_file():
        previous = json.loads(out.with_suffix(".json").read_text())
        commands = previous.get("commands", []) + commands
        previous_latency = previous.get("latency")
        models = previous.get("models", {})
    for name in args.models.split(","):
        m = Model(name)
        base = float(np.mean(m.ref_correct)) if m.labelled else 1.0
        log(f"{name}: baseline {100 * base:.2f} % on {len(m.test)} samples, {m.macs / 1e6:.2f} M MACs")
        default_scope = args.large_scope if name == "squeezenet" else scopes[0]
        points = []
        for scope in ([args.large_scope] if name == "squeezenet" else scopes):
            for criterion in args.criteria.split(","):
                for comp in comps:
                    points += curve(m, criterion, comp, scope, targets, log)
        entry = models.get(name) or {"scope": default_scope}
        diff = entry.get("pass_check", float("nan"))
        if not args.no_pass_check:
            check = next((p for p in points if p.compensate), points[0])
            diff = check_against_pass(m, check, check.scope)
            log(f"  pass check ({check.criterion}, ratio {check.ratio:.3f}, compensated): max |diff| {diff:.2e}")
        new = [p.__dict__ for p in points]
        old = [p for p in entry.get("points", []) if _key(p) not in {_key(q) for q in new}]
        for p in old:
            p.setdefault("scope", entry["scope"])
            p.setdefault("commit", OLD_COMMIT)
        entry.update({"baseline": base, "samples": len(m.test), "macs": m.macs, "pass_check": diff,
                      "points": old + new})
        if m.val is not None:
            entry["val_baseline"] = float(np.mean(m.val_ref_correct))
        models[name] = entry
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
