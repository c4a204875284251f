"""`squeeze compare DIR...` (several runs side by side) and `squeeze report DIR` (re-render from report.json)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import SqueezeError
from .model import write_text_atomic
from .report import NOT_DEVICE_TIME, failed_check, method_label, real_time


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
        acc = r.get("accuracy")  # on the evaluation data, with n, standard errors and McNemar's p
        row["top-1"] = acc["final"]["top1"] if acc else None
        row["top-1 SE"] = (acc["final"].get("stderr") if acc else None)
        row["n"] = acc["final"].get("n") if acc else None
        row["drop (pts)"] = acc["drop_pts"] if acc else None
        row["drop SE"] = acc.get("drop_stderr_pts") if acc else None
        row["McNemar p"] = (acc.get("test") or {}).get("p") if acc else None
        metric = r.get("metric")  # the task metric (squeeze.task_metrics): name, final value, drop in its units
        if metric:
            from .report import metric_drop, metric_label, metric_value  # noqa: PLC0415
            row["metric"] = f"{metric_label(metric)} (n={metric['n']})"
            row["metric (final)"] = metric_value(metric, metric["final"], (metric.get("stderr") or {}).get("final"))
            row["metric drop"] = metric_drop(metric, metric["drop"], (metric.get("stderr") or {}).get("drop"))
            row["metric p"] = (metric.get("test") or {}).get("p")
        val = r.get("validation")  # what --max-drop/--goal chose on (never the evaluation data)
        if val:
            row["validation drop"] = (f"{metric_drop(val, val['drop'], (val.get('stderr') or {}).get('drop'))} "
                                      f"(n={val['n']})")
        for t in r.get("targets", []):
            row.update(_target_cells(t))
        result.append(row)
    return result


def _target_cells(t: dict) -> dict:
    """A target's cells: `cpu p50 ms [native]` for real time; apart from them, labelled with what the figure is,
    `arm p50 ms [emulated — qemu time, not device time]` or `mcu instructions [instruction-count — …]`."""
    method = t.get("method", "error")
    failed = failed_check(t)  # wrong outputs: the failure, not a figure
    if "error" in t or real_time(t):
        return {f"{t['name']} p50 ms [{method}]": failed or (t.get("latency_ms") or {}).get("p50")}
    label = method_label(method)
    if t.get("instructions") is not None:
        return {f"{t['name']} instructions [{label}]": failed or t["instructions"]}
    if t.get("latency_ms"):
        return {f"{t['name']} p50 ms [{label}]": failed or t["latency_ms"]["p50"]}
    return {f"{t['name']} check [{label}]": failed or ("ok" if t.get("numeric_check") else None)}


def apart_method(key: str) -> str | None:
    """The method of a not-device-time column (`arm p50 ms [emulated — …]` → `emulated`), None for the others."""
    if not key.endswith("]") or " [" not in key:
        return None
    method = key[key.rindex(" [") + 2:-1].split(" — ")[0]
    return method if method in NOT_DEVICE_TIME else None


def split_columns(table: list[dict]) -> tuple[list[str], list[str]]:
    """(columns of the main table, columns shown apart: figures that are not device time), in first-seen order;
    the apart list starts with `run` and `passes` so that its own table says which run each row is."""
    keys: list[str] = []
    for r in table:
        keys += [k for k in r if k not in keys]
    apart = [k for k in keys if apart_method(k)]
    main = [k for k in keys if k not in apart]
    return main, ([k for k in ("run", "passes") if k in keys] + apart) if apart else []


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def markdown_table(table: list[dict]) -> str:
    """The runs as a markdown table; emulated / opencl-cpu / instruction-count figures in a second table of their
    own (they are not device time and are never set beside a real latency)."""
    main, apart = split_columns(table)
    text = _markdown(table, main)
    if apart:
        text += ("\n\nNot device time (emulated, opencl-cpu, instruction-count): each column says what its figure "
                 "is; not comparable with the latencies above, no ratio is computed from them.\n\n"
                 + _markdown(table, apart))
    return text


def _markdown(table: list[dict], keys: list[str]) -> str:
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

    from .html import pyplot, svg, html_table  # noqa: PLC0415
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for r in table:
        label = r["passes"][:30]
        if r.get("top-1") is not None and r.get("file bytes"):
            axes[0].scatter(r["file bytes"] / 1e3, 100 * r["top-1"], label=label)
    axes[0].set_xlabel("file size (kB)")
    axes[0].set_ylabel("top-1 (%)")
    main, apart = split_columns(table)
    _bars(axes[1], table, [k for k in main if k.endswith("]") and " p50 ms " in k], "latency p50 (ms), real time")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    plots = svg(fig)
    for method, what in NOT_DEVICE_TIME.items():  # each on its own axis, named after what it measures
        keys = [k for k in apart if apart_method(k) == method and " check [" not in k]
        if keys:
            fig, ax = plt.subplots(figsize=(4.5, 3.2))
            _bars(ax, table, keys, f"{method}: {what}")
            fig.tight_layout()
            plots += svg(fig)
    tables = html_table([{k: r.get(k) for k in main} for r in table])
    if apart:
        tables += ("<h2>Not device time (emulated, opencl-cpu, instruction-count)</h2><p>Not comparable with the "
                   "latencies above; no ratio is computed from them.</p>" + html_table([{k: r.get(k) for k in apart}
                                                                                   for r in table]))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>squeeze compare</title></head><body>"
            f"<h1>squeeze compare</h1>{plots}{tables}"
            f"<p>{html_mod.escape(', '.join(r['run'] for r in table))}</p></body></html>\n")


def _bars(ax, table: list[dict], keys: list[str], ylabel: str) -> None:
    """Grouped bars: one group per column in `keys`, one bar per run (a FAILED or missing cell draws none)."""
    for i, r in enumerate(table):
        ax.bar([j + i * 0.8 / len(table) for j in range(len(keys))],
               [r[k] if isinstance(r.get(k), (int, float)) else 0 for k in keys],
               width=0.8 / len(table), label=r["passes"][:30])
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
