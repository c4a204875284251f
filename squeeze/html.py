"""`report.html`: one self-contained page (inline SVG plots from matplotlib, inline CSS, no network)."""
from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

SECTIONS = ("summary", "pipeline", "goal", "layers", "targets", "fidelity", "guard")


def pyplot():
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    plt.rcParams.update({"svg.hashsalt": "squeeze", "svg.fonttype": "none", "font.size": 9})
    return plt


def svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    pyplot().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _stages(report: dict) -> list[tuple[str, dict]]:
    stages = [("original", report["original"])]
    stages += [(s["spec"], s) for s in report["passes"] if "failed" not in s]
    return stages


def _waterfall(report: dict) -> str:
    plt = pyplot()
    stages = _stages(report)
    labels = [name if len(name) < 24 else name[:22] + "…" for name, _ in stages]
    size = [s["bytes"].get("onnx", 0) / 1e3 for _, s in stages]
    packed = [s["bytes"].get("packed") for _, s in stages]
    macs = [s["macs"] / 1e6 for _, s in stages]
    acc = [(s.get("accuracy") or {}).get("top1") for _, s in stages]
    if report.get("accuracy"):
        acc[0] = report["accuracy"]["original"]["top1"]
    panels = 3 if any(a is not None for a in acc) else 2
    fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels, 2.8))
    x = range(len(stages))
    axes[0].bar(x, size, color="#4c72b0", label="ONNX file")
    if any(p is not None for p in packed):
        axes[0].bar(x, [p / 1e3 if isinstance(p, (int, float)) else 0 for p in packed], width=0.4,
                    color="#dd8452", label="packed")
        axes[0].legend()
    axes[0].set_title("size (kB)")
    axes[1].bar(x, macs, color="#55a868")
    axes[1].set_title("MACs (M)")
    if panels == 3:
        axes[2].plot(list(x), [100 * a if a is not None else float("nan") for a in acc], "o-", color="#c44e52")
        axes[2].set_title("top-1 (%)")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right")
    fig.tight_layout()
    return svg(fig)


def _layer_macs(report: dict) -> str | None:
    plt = pyplot()
    before, after = report["original"].get("macs_per_node", {}), report["final"].get("macs_per_node", {})
    names = list(before)
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(names) + 1.5), 2.8))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [before[n] / 1e6 for n in names], width=0.4, label="original", color="#4c72b0")
    ax.bar([i + 0.2 for i in x], [after.get(n, 0) / 1e6 for n in names], width=0.4, label="final", color="#55a868")
    ax.set_xticks(list(x))
    ax.set_xticklabels([n[-28:] for n in names], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("MACs (M)")
    ax.legend()
    ax.set_title("MACs per layer")
    fig.tight_layout()
    return svg(fig)


def _latency(report: dict) -> str | None:
    """Original vs compressed p50 of ONNX Runtime and of every target timed for real (native, rpc): one axis."""
    from .report import failed_check, real_time  # noqa: PLC0415
    rows = [r for r in report["targets"] if r.get("latency_ms") and real_time(r) and not failed_check(r)]
    ort = report.get("onnxruntime") or {}
    bars: list[tuple[str, float | None, float | None]] = []
    if ort.get("original"):
        bars.append(("onnxruntime [native]", ort["original"]["p50"], (ort.get("final") or {}).get("p50")))
    for r in rows:
        bars.append((f"{r['name']} [{r['method']}]", (r.get("original_latency_ms") or {}).get("p50"),
                     r["latency_ms"]["p50"]))
    return _bar_plot(bars, "latency p50 (ms), real time")


def _apart_plots(report: dict) -> list[str]:
    """One plot per not-device-time method (emulator time, instruction count), each on its own axis named after what
    it measures, so that no such figure is ever drawn next to a real latency."""
    from .report import NOT_DEVICE_TIME, failed_check  # noqa: PLC0415
    plots = []
    for method, what in NOT_DEVICE_TIME.items():
        rows = [r for r in report["targets"] if r.get("method") == method and not failed_check(r)]
        if rows and all(r.get("latency_ms") for r in rows):
            bars = [(f"{r['name']} [{method}]", (r.get("original_latency_ms") or {}).get("p50"),
                     r["latency_ms"]["p50"]) for r in rows]
            plots.append(_bar_plot(bars, f"{method}: p50 (ms) — {what}"))
        elif rows and all(r.get("instructions") is not None for r in rows):
            bars = [(f"{r['name']} [{method}]", (r.get("original_instructions") or 0) / 1e6, r["instructions"] / 1e6)
                    for r in rows]
            plots.append(_bar_plot(bars, f"{method}: millions — {what}"))
    return [p for p in plots if p]


def _bar_plot(bars: list[tuple[str, float | None, float | None]], xlabel: str) -> str | None:
    """Horizontal bars, original and compressed per label, on one axis."""
    if not bars:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 0.5 * len(bars) + 1.2))
    y = range(len(bars))
    ax.barh([i + 0.2 for i in y], [b[1] or 0 for b in bars], height=0.4, label="original", color="#4c72b0")
    ax.barh([i - 0.2 for i in y], [b[2] or 0 for b in bars], height=0.4, label="compressed", color="#55a868")
    ax.set_yticks(list(y))
    ax.set_yticklabels([b[0] for b in bars])
    ax.set_xlabel(xlabel)
    ax.legend()
    fig.tight_layout()
    return svg(fig)


def _goal_plot(goal: dict) -> str | None:
    """Loss and accuracy drop against the goal's ratio: the predicted frontier and every measured plan."""
    points = goal.get("points") or []
    metric = next(iter(goal.get("budgets") or {}), "bytes")
    if not points:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0))
    curve = (goal.get("predicted_curve") or {}).get(metric) or []
    if curve:
        axes[0].plot([c["ratio"] for c in curve], [c["loss"] for c in curve], "-", color="#8c8c8c",
                     label="predicted frontier (tables)")
    xs = [p["ratios"].get(metric, 1.0) for p in points]
    axes[0].plot(xs, [p["measured_loss"] for p in points], "o", color="#c44e52", label="measured")
    axes[0].plot([(p.get("predicted") or {}).get(metric, x) for p, x in zip(points, xs)],
                 [p["predicted_loss"] for p in points], "x", color="#4c72b0", label="predicted")
    axes[0].set_ylabel("output loss (KL / rel. MSE)")
    axes[0].set_yscale("symlog", linthresh=1e-4)
    axes[1].plot(xs, [p["drop"] for p in points], "o", color="#c44e52")
    if goal.get("max_drop") is not None:
        axes[1].axhline(goal["max_drop"], color="#888", linestyle="--", label="--max-drop")
        axes[1].legend()
    axes[1].set_ylabel("drop on validation data")
    limit = (goal.get("budgets") or {}).get(metric, {}).get("ratio")
    for ax in axes:
        if limit:
            ax.axvline(limit, color="#55a868", linestyle=":")
        ax.set_xlabel(f"{'size' if metric == 'bytes' else metric} ratio vs original (goal: dotted)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return svg(fig)


def _goal_section(report: dict) -> str:
    goal = report.get("goal")
    if not goal:
        return "<p>No --goal: the passes ran with the strengths given.</p>"
    within = "" if goal.get("max_drop") is None else " within --max-drop"
    status = {"met": "goal met", "closest": f"goal not met{within}: closest point kept",
              "unreachable": "nothing within --max-drop"}.get(goal["status"], goal["status"])
    head = (f"<p><b>{_esc(goal['goal'])}</b> ({_esc('+'.join(goal['using']))}): {_esc(status)}. Chosen passes: "
            f"<code>{_esc(goal.get('spec') or '(none)')}</code>. Drop measured on {_esc(goal.get('drop_basis'))}; "
            f"search {goal.get('seconds')} s (tables {goal['tables']['seconds']} s"
            f"{', cached' if goal['tables'].get('cached') else ''}).</p>")
    why = "<ul>" + "".join(f"<li>{_esc(w)}</li>" for w in goal.get("why", [])) + "</ul>"
    points = [{"plan": p["label"], **{f"{m} ×": v for m, v in p["ratios"].items()}, "drop on validation": p["drop"],
               "predicted loss": p["predicted_loss"], "measured loss": p["measured_loss"],
               "meets goal": p["meets_goal"], "within max-drop": p["within_max_drop"]} for p in goal["points"]]
    plan = [r for r in goal.get("plan", []) if r.get("bits", "float") != "float" or
            r.get("channels_after", 0) != r.get("channels_before", 0)]
    return (head + why + (_goal_plot(goal) or "") + "<h3>Measured plans (Pareto points)</h3>" + html_table(points)
            + "<h3>Per-layer plan (what changed)</h3>" + (html_table(plan) or "<p>No layer changed.</p>"))


def html_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(r.get(k, '')))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)[:200]
    return str(value)


def _details_tables(report: dict) -> str:
    """Per-layer tables that passes put in `details` (any list of dicts), plus bits/param per layer."""
    parts = []
    for step in report["passes"]:
        for key, value in (step.get("details") or {}).items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                parts.append(f"<h3>{_esc(step['spec'])}: {_esc(key)}</h3>" + html_table(value))
        bpp = (step.get("bytes") or {}).get("bits_per_param")
        if isinstance(bpp, dict) and isinstance(bpp.get("layers"), dict):
            rows = [{"layer": k, "bits/param": v} for k, v in bpp["layers"].items()]
            parts.append(f"<h3>{_esc(step['spec'])}: bits per parameter</h3>" + html_table(rows))
    return "".join(parts)


def _failed(row: dict) -> str | None:
    from .report import failed_check  # noqa: PLC0415
    return failed_check(row)


def _target_row(r: dict) -> dict:
    """One row of the targets table; a failed numeric check replaces the latencies (they time wrong code)."""
    failed = _failed(r)
    return {"target": r["spec"], "method": r.get("method", "—"),
            "latency p50 (ms)": "FAILED" if failed else (r.get("latency_ms") or {}).get("p50"),
            "original p50 (ms)": "—" if failed else (r.get("original_latency_ms") or {}).get("p50"),
            "speed-up vs ORT": "—" if failed else r.get("speedup"),
            "TVM vs ORT": failed or ("ok" if r.get("numeric_check") else "—"), "error": r.get("error", "")}


def _apart_row(r: dict) -> dict:
    """One row of the not-device-time table: the method with what its figure is, the figures, no speed-up."""
    from .report import apart_figures, method_label  # noqa: PLC0415
    failed = _failed(r)
    final, original = ("FAILED", "—") if failed else apart_figures(r)
    return {"target": r["spec"], "method": method_label(r.get("method")), "figure (compressed)": final,
            "figure (original, same method)": original,
            "TVM vs ORT": failed or ("ok" if r.get("numeric_check") else "—")}


def _targets_section(report: dict) -> str:
    """Real-time rows (native, rpc) with their plot and table; then, apart, the emulated / opencl-cpu /
    instruction-count rows with their own plots and table, labelled, and no speed-up."""
    from .report import real_time  # noqa: PLC0415
    real = [r for r in report["targets"] if "error" in r or real_time(r)]
    apart = [r for r in report["targets"] if "error" not in r and not real_time(r)]
    failures = [f"{r['spec']}: {_failed(r)}" for r in report["targets"] if _failed(r)]
    text = "".join(f"<p class='bad'><b>{_esc(f)}</b></p>" for f in failures) + (_latency(report) or "")
    text += html_table([_target_row(r) for r in real])
    if apart:
        text += ("<h3>Not device time (emulated, opencl-cpu, instruction-count)</h3><p>These figures are not the "
                 "target's real speed: they are drawn on their own axes, never next to a real latency, and no "
                 "speed-up is computed from them.</p>" + "".join(_apart_plots(report))
                 + html_table([_apart_row(r) for r in apart]))
    return text + ("<p>Every latency is labelled with how it was measured: native = timed on this machine; rpc = on a "
                   "device through TVM RPC; emulated = qemu's time, opencl-cpu = PoCL on this CPU (correctness only); "
                   "instruction-count = QEMU instruction counts, not cycles.</p>")


def render(report: dict) -> str:
    """The whole page as a string."""
    o, f = report["original"], report["final"]
    name = Path(report["model"]["path"]).name if report["model"].get("path") else "model"
    summary_rows = [
        {"": "file size (bytes)", "original": o["bytes"].get("file"), "final": f["bytes"].get("file")},
        {"": "parameters", "original": o["param_count"], "final": f["param_count"]},
        {"": "MACs", "original": o["macs"], "final": f["macs"]},
    ]
    from .report import data_lines, metric_drop, metric_label, metric_value, test_text, top1_text  # noqa: PLC0415
    if report.get("accuracy"):
        acc = report["accuracy"]
        se = acc.get("drop_stderr_pts")
        summary_rows.append({"": f"top-1 (evaluation, n={acc['original']['n']})",
                             "original": top1_text({**acc["original"], "n": None}),
                             "final": top1_text({**acc["final"], "n": None}),
                             "drop": f"{acc['drop_pts']:.2f}" + (f" ± {se:.2f}" if isinstance(se, (int, float)) else "")
                             + " pts", "paired test": test_text(acc.get("test"))})
    for key, role in (("metric", "evaluation: reported"), ("validation", "validation: chose")):
        if report.get(key):  # the task metric with n, standard errors and the paired test (squeeze.task_metrics)
            m, se = report[key], report[key].get("stderr") or {}
            summary_rows.append({"": f"{metric_label(m)} ({role}, n={m['n']}; {m.get('direction', '')})",
                                 "original": metric_value(m, m["original"], se.get("original")),
                                 "final": metric_value(m, m["final"], se.get("final")),
                                 "drop": metric_drop(m, m["drop"], se.get("drop")), "paired test": test_text(m.get("test"))})
    fidelity_rows = [{"pass": s["spec"], "max abs": (s.get("fidelity") or {}).get("max_abs"),
                      "rel L2": (s.get("fidelity") or {}).get("rel_l2"),
                      "top-1 agreement": (s.get("fidelity") or {}).get("top1_agreement"),
                      "top-1 (evaluation)": top1_text(s["accuracy"]) if s.get("accuracy") else None,
                      "notes": "; ".join(s.get("notes", [])) or s.get("failed", "")} for s in report["passes"]]
    guard_rows = [{"pass": s["spec"], "action": s["guard"]["action"], "drop on validation": s["guard"]["drop"],
                   "validation n": s["guard"].get("n"),
                   "limit": s["guard"]["max_drop"], "skipped": ", ".join(s["guard"].get("skipped", [])),
                   "basis": s["guard"]["basis"]} for s in report["passes"] if s.get("guard")]
    layers_svg = _layer_macs(report)
    sections = {
        "summary": "<p>" + "<br>".join(_esc(x) for x in (
            f"passes: {report['pass_spec'] or '(none)'}", *data_lines(report["data"]),
            f"squeeze {report['squeeze_version']}, TVM {report['environment'].get('tvm')}, onnxruntime "
            f"{report['environment'].get('onnxruntime')}, {report['environment'].get('threads')} thread(s)")) + "</p>"
        + (f"<p class='bad'>Pipeline stopped: {_esc(report['failure'])}</p>" if report.get("failure") else "")
        + html_table(summary_rows),
        "pipeline": _waterfall(report),
        "goal": _goal_section(report),
        "layers": (layers_svg or "<p>No layers with counted MACs.</p>") + _details_tables(report),
        "targets": _targets_section(report),
        "fidelity": html_table(fidelity_rows) or "<p>No passes.</p>",
        "guard": html_table(guard_rows) or "<p>The accuracy guard was not used"
        + (" (no pass needed backing off)." if report.get("max_drop") is not None else " (no --max-drop).") + "</p>",
    }
    titles = {"goal": "Goal: per-layer allocation", "summary": "Summary", "pipeline": "Pipeline: size, MACs and accuracy after each pass",
              "layers": "Per layer", "targets": "Targets: latency, original vs compressed", "fidelity":
              "Fidelity per pass", "guard": "Accuracy guard"}
    body = "".join(f"<section id='{k}'><h2>{titles[k]}</h2>{sections[k]}</section>" for k in SECTIONS)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>squeeze report: {_esc(name)}</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:.5em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px;"
            "text-align:right}th{background:#f3f3f3}section{margin-bottom:2em}.bad{color:#b00}svg{max-width:100%;"
            f"height:auto}}</style></head><body><h1>squeeze report: {_esc(name)}</h1>{body}</body></html>\n")
