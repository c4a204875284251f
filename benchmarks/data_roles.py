"""Issue 19's done-when for the three data roles: does `--max-drop` hold on images squeeze never saw?

    .venv/bin/python benchmarks/data_roles.py            # → benchmarks/results/data_roles.md
    .venv/bin/python benchmarks/data_roles.py --out -    # print only

cifar10_resnet4b with `--calib` = CIFAR images 0–255 (no `--val`: every 4th of them is held out to validate, the
passes fit on the other 192), `--eval` = images 256–599 (reported only), `--passes "prune(ratio=0.5),codebook(bits=3)"
--max-drop 1.0`, run through the CLI into a temporary folder. The saved model is then scored with ONNX Runtime on
images 600–1016 (n = 417), which squeeze never read: top-1 with its standard error, the drop from the original with
the paired standard error, and McNemar's test (squeeze.task_metrics.mcnemar).
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import corpus  # noqa: E402
from squeeze import runtime, verify  # noqa: E402
from squeeze.model import load_model  # noqa: E402
from squeeze.task_metrics import mcnemar  # noqa: E402

MODEL = "cifar10_resnet4b"
PASSES = "prune(ratio=0.5),codebook(bits=3)"
MAX_DROP = 1.0
CALIB, EVAL, UNSEEN = (0, 256), (256, 600), (600, None)


def unseen_scores(original: Path, compressed: Path, data) -> dict:
    """Top-1 of both models on `data` with n, standard errors, the paired drop and McNemar's test."""
    correct = []
    for path in (original, compressed):
        acc = verify.accuracy(runtime.run(load_model(path), data), data.labels)
        assert acc is not None
        correct.append(acc["correct"].astype(np.float64))
    a, b = correct
    n = len(a)
    se = lambda x: float(x.std(ddof=1) / np.sqrt(n))  # noqa: E731
    return {"n": n, "original": float(a.mean()), "original_se": se(a), "final": float(b.mean()), "final_se": se(b),
            "drop_pts": 100 * float(a.mean() - b.mean()), "drop_se_pts": 100 * se(a - b), "test": mcnemar(a, b)}


#: (label, validation images or None for the held-out quarter of --calib, --eval images or None, guard margin in SE)
VARIANTS = [
    ("default: every 4th --calib image validates (n = 64), keep if drop + 1 SE ≤ 1.0", None, EVAL, 1.0),
    ("point estimate: same split, keep if drop ≤ 1.0 (guard margin 0 SE)", None, EVAL, 0.0),
    ("--val images 256–599 (n = 344), no --eval; keep if drop + 1 SE ≤ 1.0", EVAL, None, 1.0),
]


def _named(ds, source: str):
    return dataclasses.replace(ds, source=f"{source} ({len(ds)} samples)")


def run_variant(ds, model: Path, tmp: Path, val, evaluation, margin: float, threads) -> tuple[dict, str, float]:
    """One squeeze run through the API (as the CLI does); (report, terminal summary, seconds)."""
    import squeeze  # noqa: PLC0415
    from squeeze import guard  # noqa: PLC0415
    from squeeze.report import terminal_table  # noqa: PLC0415
    default, guard.MARGIN_SE = guard.MARGIN_SE, margin
    try:
        start = time.perf_counter()
        result = squeeze.compress(model, PASSES, calib=_named(ds.subset(*CALIB), "images 0–255"),
                                  val=None if val is None else _named(ds.subset(*val), "images 256–599"),
                                  eval=None if evaluation is None else _named(ds.subset(*evaluation), "images 256–599"),
                                  targets="", max_drop=MAX_DROP, threads=threads, out_dir=tmp, force=True)
        seconds = time.perf_counter() - start
    finally:
        guard.MARGIN_SE = default
    return result.report, terminal_table(result.report), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/data_roles.md"), help="markdown file, or - to print")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", type=int, default=len(VARIANTS), help="run the first N variants (default all)")
    args = ap.parse_args()
    ds = corpus.dataset(MODEL)
    model = corpus.model_path(MODEL)
    unseen_data = ds.subset(*UNSEEN)
    sections = []
    for label, val, evaluation, margin in VARIANTS[:args.variants]:
        with tempfile.TemporaryDirectory(prefix="squeeze-data-roles-") as tmp:
            report, summary, seconds = run_variant(ds, model, Path(tmp) / "out", val, evaluation, margin, args.threads)
            unseen = unseen_scores(model, Path(tmp) / "out/model.onnx", unseen_data)
        sections.append(render(label, report, unseen, seconds, summary))
        print(sections[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "passes/", "squeeze/"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    head = ["# Data roles: --max-drop chosen on validation, checked on unseen images (issue 19, item 1)", "",
            f"Commit {commit}{' (with uncommitted changes in passes/ or squeeze/ of other helpers)' if dirty else ''}; "
            f"{platform.machine()} {corpus.cpu_model()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
            "Command: `python benchmarks/data_roles.py`.", "",
            f"`squeeze {MODEL} --calib <images 0–255> --eval <images 256–599> --passes \"{PASSES}\" --max-drop {MAX_DROP}`, "
            "then the saved model is scored on images 600–1016, which squeeze never read. ± is one standard error; a "
            "drop's is paired over the same images. McNemar: b = images the original got right and the compressed model "
            "wrong, c = the reverse (exact binomial below 25 discordant images).", ""]
    text = "\n".join(head + sections)
    if args.out != "-":
        Path(args.out).write_text(text)


def _pm(value: float, se: float | None, pct: bool = True) -> str:
    scale = 100 if pct else 1
    return f"{scale * value:.2f} %" + ("" if se is None else f" ± {scale * se:.2f}")


def render(label: str, report: dict, unseen: dict, seconds: float, summary: str) -> str:
    d, acc, val = report["data"], report.get("accuracy") or {}, report.get("validation") or {}
    vse = val.get("stderr") or {}
    steps = [(s["spec"], s.get("guard", {})) for s in report["passes"]]
    ok = unseen["drop_pts"] <= 1.5
    lines = [
        f"## {label}", "", f"squeeze run {seconds:.0f} s; final {report['final']['bytes'].get('packed', 0) / 1e3:.1f} kB "
        f"packed ({report['original']['bytes'].get('packed', 0) / report['final']['bytes'].get('packed', 1):.2f}× smaller), "
        f"MACs {report['original']['macs'] / max(report['final']['macs'], 1):.2f}× fewer.", "",
        "| role | data | n |", "|---|---|---:|",
        f"| calibration (fits) | {d['calib']} | {d['calib_fit_samples']} of {d['calib_samples']} |",
        f"| validation (chooses) | {d['val']} | {d['val_samples']} |",
        f"| evaluation (reports) | {d['eval'] or '—'} | {d['eval_samples']} |",
        f"| unseen (this script) | images 600–1016 | {unseen['n']} |", "",
        "Guard (drops on the validation data): " + "; ".join(
            f"`{spec}` → {g.get('action', '—')} ({g.get('drop', float('nan')):.2f} ± {g.get('stderr') or 0:.2f} pts, "
            f"{len(g.get('attempts', []))} attempt(s))" for spec, g in steps), "",
        "| top-1 | n | original | final | drop (pts) | paired test |", "|---|---:|---:|---:|---:|---|"]
    if val:
        lines.append(f"| validation ({val['label']}, chose) | {val['n']} | {_pm(val['original'], vse.get('original'))} | "
                     f"{_pm(val['final'], vse.get('final'))} | {val['drop']:.2f} ± {vse.get('drop') or 0:.2f} | "
                     f"{_test(val.get('test') or {})} |")
    if acc:
        lines.append(f"| evaluation (report.json) | {acc['original']['n']} | {_pm(acc['original']['top1'], acc['original']['stderr'])} | "
                     f"{_pm(acc['final']['top1'], acc['final']['stderr'])} | {acc['drop_pts']:.2f} ± "
                     f"{acc['drop_stderr_pts']:.2f} | {_test(acc['test'])} |")
    lines += [f"| **unseen (images 600–1016)** | {unseen['n']} | {_pm(unseen['original'], unseen['original_se'])} | "
              f"{_pm(unseen['final'], unseen['final_se'])} | **{unseen['drop_pts']:.2f} ± {unseen['drop_se_pts']:.2f}** | "
              f"{_test(unseen['test'])} |", "",
              f"Unseen drop ≤ 1.5 pts: **{'yes' if ok else 'no'}** ({unseen['drop_pts']:.2f} ± {unseen['drop_se_pts']:.2f} pts).",
              "", "Terminal summary:", "", "```", summary, "```", ""]
    return "\n".join(lines)


def _test(t: dict) -> str:
    if not t:
        return "—"
    if t.get("test") == "McNemar":
        return f"McNemar b={t['b']} c={t['c']}, p={t['p']:.3g}"
    return f"paired z={t.get('z')}, p={t['p']:.3g}"


if __name__ == "__main__":
    main()
