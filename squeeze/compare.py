"""`squeeze compare DIR...` (several runs side by side) and `squeeze report DIR` (re-render from report.json)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import SqueezeError
from .model import write_text_atomic
from .report import failed_check


def load_report(folder: str | Path) -> dict:
    path = Path(folder)
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        raise SqueezeError(f"{folder}: no report.json found (give a squeeze output folder)")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SqueezeError(f"{path}: not a readable report ({exc})") from None
    if not isinstance(report, dict) or "original" not in report or "final" not in report:
        raise SqueezeError(f"{path}: not a squeeze report")
    return report


def rerender(folder: str | Path) -> list[Path]:
    """Write report.md and report.html again from the folder's report.json."""
    from .html import render  # noqa: PLC0415
    from .report import markdown  # noqa: PLC0415
    folder = Path(folder)
    report = load_report(folder)
    write_text_atomic(folder / "report.md", markdown(report))
    write_text_atomic(folder / "report.html", render(report))
    return [folder / "report.md", folder / "report.html"]


def rows(folders: list[str | Path]) -> list[dict]:
    """One row per run: size, MACs, accuracy and latency per target."""
    result = []
    for folder in folders:
        r = load_report(folder)
        row = {"run": str(folder), "passes": r.get("pass_spec") or "(none)",
               "file bytes": r["final"]["bytes"].get("file"), "packed bytes": r["final"]["bytes"].get("packed"),
               "size ratio": _ratio(r["original"]["bytes"].get("file"), r["final"]["bytes"].get("file")),
               "MACs": r["final"]["macs"], "MAC ratio": _ratio(r["original"]["macs"], r["final"]["macs"])}
        acc = r.get("accuracy")
        row["top-1"] = acc["final"]["top1"] if acc else None
        row["drop (pts)"] = acc["drop_pts"] if acc else None
        metric = r.get("metric")  # the task metric (squeeze.task_metrics): name, final value, drop in its units
        if metric:
            from .report import metric_drop, metric_label, metric_value  # noqa: PLC0415
            row["metric"] = f"{metric_label(metric)} (n={metric['n']})"
            row["metric (final)"] = metric_value(metric, metric["final"], (metric.get("stderr") or {}).get("final"))
            row["metric drop"] = metric_drop(metric, metric["drop"], (metric.get("stderr") or {}).get("drop"))
        for t in r.get("targets", []):
            key = f"{t['name']} p50 ms [{t.get('method', 'error')}]"
            failed = failed_check(t)  # wrong outputs: the failure, not a latency
            row[key] = failed or (t.get("latency_ms") or {}).get("p50")
        result.append(row)
    return result


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def markdown_table(table: list[dict]) -> str:
    keys: list[str] = []
    for r in table:
        keys += [k for k in r if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in table:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def plot_html(table: list[dict]) -> str:
    """A self-contained page with the table and an accuracy-vs-size / latency plot."""
    import html as html_mod  # noqa: PLC0415

    from .html import _plt, _svg, _table  # noqa: PLC0415
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for r in table:
        label = r["passes"][:30]
        if r.get("top-1") is not None and r.get("file bytes"):
            axes[0].scatter(r["file bytes"] / 1e3, 100 * r["top-1"], label=label)
    axes[0].set_xlabel("file size (kB)")
    axes[0].set_ylabel("top-1 (%)")
    lat_keys = sorted({k for r in table for k in r if k.endswith("]") and " p50 ms " in k})
    for i, r in enumerate(table):
        axes[1].bar([j + i * 0.8 / len(table) for j in range(len(lat_keys))],
                    [r[k] if isinstance(r.get(k), (int, float)) else 0 for k in lat_keys],  # FAILED: no bar
                    width=0.8 / len(table), label=r["passes"][:30])
    axes[1].set_xticks(range(len(lat_keys)))
    axes[1].set_xticklabels(lat_keys, rotation=20, ha="right", fontsize=7)
    axes[1].set_ylabel("latency p50 (ms)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>squeeze compare</title></head><body>"
            f"<h1>squeeze compare</h1>{_svg(fig)}{_table(table)}"
            f"<p>{html_mod.escape(', '.join(r['run'] for r in table))}</p></body></html>\n")
