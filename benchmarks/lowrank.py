"""Benchmark `lowrank` (issue 21, first part): top-1 against MACs kept, next to `prune` at the same MACs, with TVM.

    python benchmarks/lowrank.py                                  # → benchmarks/results/lowrank.md
    python benchmarks/lowrank.py --models mnist_burn --ranks 0.5 --no-tvm --out /tmp/lowrank.md

Per model, the first 256 labelled samples calibrate and the rest evaluate (calibration samples are never
evaluated on). For every `--ranks` value, `lowrank(rank=R)` runs through the real pass manager; then `prune` — as
the pass ships (criterion reconstruction, scope layer) and with scope=sensitivity (the better prune-only setting
in prune_curve.md) — is applied at the channel ratio whose MAC reduction is closest to lowrank's (bisection over
the pass's own ranking, then cut and compensated as the pass does; `squeeze s` for prune = ranking + that). `--extra` adds ablation rows (the channel form only,
plain weight-SVD init, no refit). Each cell: MACs and parameters kept, top-1 and its drop with McNemar's exact
p-value against the original on the same images.

Latency: the original model is compiled for the `cpu` target (LLVM for this host, squeeze's default schedules)
once per model (`benchmarks/run.py`'s `Original`); every compressed model is compiled, checked against ONNX Runtime
and timed back to back with the original in alternating rounds (`run._tvm_cell`), so each speed-up is a ratio from
the same minutes of the same run. The header gives the machine and its load (other jobs share it).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from benchmarks import prune_curve  # noqa: E402
from benchmarks import run as harness  # noqa: E402
from squeeze import metrics  # noqa: E402
from squeeze.model import to_graph, to_model  # noqa: E402
from squeeze.passes import compensate as compensation  # noqa: E402
from squeeze.passes.coupling import channel_groups  # noqa: E402
from squeeze.passes.prune import rank_channels  # noqa: E402
from squeeze.pipeline import run_pipeline  # noqa: E402
from squeeze.registry import get_pass  # noqa: E402
from squeeze.spec import bind  # noqa: E402

MODELS = ["cifar10_resnet4b", "sri_resnet_a", "mnist_burn"]
RANKS = [0.75, 0.5, 0.25]
EXTRA = ["lowrank(rank=0.5,form=channel)", "lowrank(rank=0.5,init=weight)", "lowrank(rank=0.5,compensate=false)"]
PRUNES = {"prune": "", "prune (sensitivity)": "scope=sensitivity"}
GOALS = ["macs=0.65,using=prune", "macs=0.65,using=prune+lowrank"]
GOAL_PRUNES = {"prune (layer)": "scope=layer", "prune (sensitivity)": "scope=sensitivity"}


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, check=False).stdout.strip()


def _apply(m: prune_curve.Model, spec: str) -> tuple[object, float, list[str]]:
    """(model, seconds, notes) from the real pass manager."""
    t0 = time.perf_counter()
    result = run_pipeline(m.model, bind(spec, get_pass), m.calib, m.shapes, seed=0)
    if result.failure:
        raise RuntimeError(result.failure)
    notes = [n for step in result.steps for n in step.get("notes", [])]
    return result.model, time.perf_counter() - t0, notes


def _row(m: prune_curve.Model, label: str, spec: str, orig, log, make=None) -> dict:
    row = {"pipeline": label, "spec": spec}
    try:
        model, seconds, notes = (make or (lambda: _apply(m, spec)))()
    except Exception as exc:  # noqa: BLE001 (one cell's failure must not stop the table)
        traceback.print_exc()
        return {**row, "error": harness._one_line(exc)}
    summary = metrics.summary(model, m.shapes)
    top1, agreement, p, _, drop_se = m.evaluate(model)
    row.update(macs=summary["macs"] / m.macs, params=summary["params"] / m.params, top1=100 * top1,
               drop=100 * (m.base - top1), drop_se=100 * drop_se, agreement=100 * agreement, p=p, seconds=seconds,
               forms=" ".join(n for n in notes if n.startswith("factorized"))[:400])
    if orig is not None:
        try:
            row.update(harness._tvm_cell(orig, model))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row["TVM"] = "TVM failed: " + harness._one_line(exc)
    log(f"  {label:34s} MACs {row['macs']:.3f} params {row['params']:.3f} top-1 {row['top1']:.2f} "
        f"(drop {row['drop']:+.2f}) {row.get('TVM speed-up', float('nan')):.2f}x TVM  {seconds:.1f} s")
    return row


def _pruned(m: prune_curve.Model, options: str, mac_reduction: float, rankings: dict):
    """(spec, maker) for `prune` at the ratio whose MAC reduction is closest to `mac_reduction` (%), ranked with
    the pass's own ranking once per setting; the maker cuts and compensates exactly as the pass does (as in
    prune_curve.py, whose pass check found identical outputs), so the sensitivity scan is not redone per point."""
    t0 = time.perf_counter()
    if options not in rankings:
        kw = dict(criterion="reconstruction", scope="layer", multiple=1, compensate=True)
        kw.update(dict(item.split("=") for item in options.split(",") if item))
        rankings[options] = (rank_channels(channel_groups(to_graph(m.model), m.shapes), m.context(), **kw),
                             time.perf_counter() - t0)
    ranking, rank_seconds = rankings[options]
    ratio, _ = prune_curve.ratio_for(m, ranking, mac_reduction)

    def make():
        t1 = time.perf_counter()
        graph, fresh = m.cut(ranking.plan(ratio))
        compensation.compensate(graph, m.context(), fresh)
        graph.cleanup().toposort()
        return to_model(graph, like=m.model), rank_seconds + time.perf_counter() - t1, []
    return f"prune(ratio={ratio:.4f}{',' + options if options else ''})", make


def _goal(m: prune_curve.Model, text: str):
    """(spec, maker) for `--goal TEXT` without --max-drop: squeeze.goal.search allocates on the calibration data
    alone (its tables hold out every 4th calibration image), then the plan's pass calls run for real."""
    from squeeze import goal as goal_mod  # noqa: PLC0415
    found = {}

    def make():
        t0 = time.perf_counter()
        result = goal_mod.search(m.model, goal_mod.parse_goal(text), m.calib, m.shapes, original=m.model, seed=0,
                                 say=lambda msg: None)
        spec = ",".join(str(c) for c in result.calls)
        found.update(spec=spec, why=result.report["why"], tables_s=result.report["tables"]["seconds"])
        model, seconds, notes = _apply(m, spec)
        return model, time.perf_counter() - t0, notes
    return found, make


def bench_model(name: str, args, log) -> dict:
    m = prune_curve.Model(name)
    m.base = float(np.mean(m.ref_correct))
    m.params = metrics.summary(m.model, m.shapes)["params"]
    log(f"{name}: top-1 {100 * m.base:.2f} % on {len(m.test)} images, {m.macs / 1e6:.2f} M MACs")
    orig = None
    if not args.no_tvm:
        try:
            orig = harness.Original(name, m.test, args.threads, args.runs)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            log(f"  TVM failed on the original: {harness._one_line(exc)}")
    rows, rankings = [], {}
    for text in args.goals:
        found, make = _goal(m, text)
        row = _row(m, f"--goal {text}", f"--goal {text}", orig, log, make)
        row["plan"] = found.get("spec", "")
        rows.append(row)
        if "macs" in row and text == args.goals[-1]:
            for label, options in GOAL_PRUNES.items():
                spec, mk = _pruned(m, options, 100 * (1 - row["macs"]), rankings)
                rows.append({**_row(m, f"{label} at the same MACs", spec, orig, log, mk), "matches": row["pipeline"]})
    for rank in args.ranks:
        row = _row(m, f"lowrank(rank={rank:g})", f"lowrank(rank={rank:g})", orig, log)
        rows.append(row)
        if "macs" not in row:
            continue
        for label, options in PRUNES.items():
            spec, make = _pruned(m, options, 100 * (1 - row["macs"]), rankings)
            rows.append({**_row(m, f"{label} at the same MACs", spec, orig, log, make), "matches": row["pipeline"]})
    for spec in args.extra:
        rows.append(_row(m, spec, spec, orig, log))
    tvm_orig = harness._median_p50([orig.vm.time(orig.samples[0], args.runs) for _ in range(3)]) if orig else None
    return {"name": name, "base": 100 * m.base, "n": len(m.test), "macs": m.macs, "params": m.params, "rows": rows,
            "tvm_orig_ms": tvm_orig}


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value).replace("|", "\\|")


def markdown(results: list[dict], command: str, started: dict, args) -> str:
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--", "passes/lowrank.py", "benchmarks/lowrank.py")
    lines = ["# lowrank: top-1 against MACs kept, next to prune at the same MACs (issue 21)", "",
             f"Command: `{command}`  ", f"Commit: {commit}" + (" (with uncommitted changes to lowrank files)"
                                                             if dirty else "") + "  ",
             f"Machine: {harness._machine()}; {args.threads} TVM/ORT thread(s)  ",
             f"Load (1/5/15 min): {started['load']} at the start, {_load()} at the end "
             "(a shared machine: latency figures are ratios timed back to back in alternating rounds)  ",
             f"Started {started['at']}, took {(time.time() - started['t']) / 60:.1f} min  ", f"{harness._versions()}",
             "",
             "Calibration: the first 256 labelled images; top-1 on the images after them (never calibrated on). "
             "`prune at the same MACs`: the `prune` pass at the channel ratio whose MAC reduction is closest to the "
             "lowrank row above it (default criterion reconstruction, scope layer; and scope sensitivity). "
             "`± se`: the paired standard error of the drop; `agreement`: the share of images whose top class is "
             "the original's. `p`: McNemar's exact test against the original on the same images. TVM: the `cpu` "
             "target, default schedules, batch 1; `speed-up` = original / compressed latency (medians of "
             "alternating rounds), `MAC ×` = original / compressed MACs; `TVM=ORT` checks the compiled model "
             "against ONNX Runtime.", ""]
    for res in results:
        lines += [f"## {res['name']}", "",
                  f"Original: top-1 {res['base']:.2f} % on {res['n']} images, {res['macs'] / 1e6:.2f} M MACs, "
                  f"{res['params']:,} parameters" + (f", TVM {res['tvm_orig_ms']:.3f} ms" if res["tvm_orig_ms"]
                                                     else "") + ".", "",
                  "| pipeline | MACs kept | params kept | top-1 | drop (pts) ± se | agreement % | p | TVM ms "
                  "| TVM orig ms | TVM speed-up | MAC × | TVM=ORT | squeeze s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in res["rows"]:
            if "error" in r:
                lines.append(f"| `{r['spec']}` | error: {_fmt(r['error'])} |" + " |" * 11)
                continue
            label = f"`{r['spec']}`" if not r.get("matches") else f"{r['pipeline']}: `{r['spec']}`"
            lines.append(
                f"| {label} | {_fmt(r['macs'])} | {_fmt(r['params'])} | {_fmt(r['top1'], 2)} "
                f"| {_fmt(-r['drop'], 2)} ± {_fmt(r['drop_se'], 2)} | {_fmt(r['agreement'], 2)} | {r['p']:.2g} "
                f"| {_fmt(r.get('TVM ms'))} | {_fmt(r.get('TVM orig ms'))} "
                f"| {_fmt(r.get('TVM speed-up'), 2)} | {1 / r['macs']:.2f} | {_fmt(r.get('TVM=ORT', r.get('TVM')))} "
                f"| {r['seconds']:.1f} |")
        lines += ["", "Lowrank vs prune at matched MACs (top-1 points, lowrank − prune; positive: lowrank better):", ""]
        by_name = {r["pipeline"]: r for r in res["rows"] if "top1" in r and not r.get("matches")}
        for r in res["rows"]:
            base = by_name.get(r.get("matches", ""))
            if base is not None and "top1" in r:
                lines.append(f"- {base['pipeline']} (MACs {base['macs']:.3f}) vs {r['pipeline']} (MACs "
                             f"{r['macs']:.3f}): {base['top1'] - r['top1']:+.2f}")
        forms = [f"- `{r['spec']}`: {r['forms']}" for r in res["rows"] if r.get("forms")]
        plans = [f"- `{r['spec']}` chose: `{r['plan']}`" for r in res["rows"] if r.get("plan")]
        if plans:
            lines += ["", "What the goal searches chose (pass calls):", ""] + plans
        lines += ["", "What lowrank did (the pass's note):", ""] + forms + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--ranks", nargs="*", type=float, default=RANKS)
    parser.add_argument("--extra", nargs="*", default=EXTRA, help="ablation specs run at the end of each model")
    parser.add_argument("--goals", nargs="*", default=GOALS, help="--goal texts run first (no --max-drop), the "
                        "last one followed by prune at its MACs")
    parser.add_argument("--no-tvm", action="store_true", help="accuracy and MACs only")
    parser.add_argument("--runs", type=int, default=100, help="timed calls per latency round")
    parser.add_argument("--threads", type=int, default=1, help="TVM and ONNX Runtime threads (1: least noise)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lowrank.md")
    args = parser.parse_args(argv)
    harness.ROUNDS = 5
    command = "python benchmarks/lowrank.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    started = {"load": _load(), "at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "t": time.time()}
    if not args.no_tvm:
        from squeeze.targets import tvm_build  # noqa: PLC0415
        tvm_build.set_threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    results = []
    for name in args.models:
        results.append(bench_model(name, args, log))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(results, command.strip(), started, args))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
