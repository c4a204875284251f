"""Reports: `report.json` (the source of truth), `report.md`, and the short table printed at the end."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .model import write_text_atomic
from .timing import contention_note

SCHEMA_VERSION = 1


def write(report: dict, out: Path) -> None:
    report = {"schema": SCHEMA_VERSION, **report}
    write_text_atomic(out / "report.json", json.dumps(_plain(report), indent=2, sort_keys=False) + "\n")
    write_text_atomic(out / "report.md", markdown(report))
    from .html import render  # noqa: PLC0415  (matplotlib is imported only when a report is written)
    write_text_atomic(out / "report.html", render(_plain(report)))


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, non-finite floats to strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.3f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _bits(b: dict) -> str:
    """Packed bits per weight parameter (report.json `bytes.bits_per_param.overall`), or — when not packed."""
    overall = (b.get("bits_per_param") or {}).get("overall") if b.get("packed") is not None else None
    return "—" if overall is None else f"{overall:.2f}"


def _macs(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f} M"


def _ms(lat: dict | None) -> str:
    return "—" if not lat else f"{lat['p50']:.3f} ms (p90 {lat['p90']:.3f})"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}×"


def _fid(f: dict | None) -> str:
    if not f:
        return "—"
    text = f"max abs {f.get('max_abs', float('nan')):.2e}, rel L2 {f.get('rel_l2', float('nan')):.2e}"
    if "top1_agreement" in f:
        text += f", top-1 agree {100 * f['top1_agreement']:.2f} %"
    return text


#: Methods whose latency is real time on the target (this machine, or a device over RPC). Only these rows share a
#: table, an axis or a ratio with each other; every other method is shown apart and never gives a speed-up.
REAL_TIME_METHODS = ("native", "rpc")
#: What the other methods' figures are, as every view labels them (`arm [emulated — qemu time, not device time]`).
NOT_DEVICE_TIME = {"emulated": "qemu time, not device time",
                   "opencl-cpu": "PoCL on this CPU: outputs checked, no time",
                   "instruction-count": "QEMU instructions, not cycles"}


def real_time(row: dict) -> bool:
    """True when a target row's figures are real time on its target (`native`, `rpc`)."""
    return row.get("method") in REAL_TIME_METHODS


def method_label(method: str | None) -> str:
    """The method as the views print it: `native`, or `emulated — qemu time, not device time` for a figure that is
    not the device's time (so a reader never takes it for one)."""
    method = method or "—"
    return f"{method} — {NOT_DEVICE_TIME[method]}" if method in NOT_DEVICE_TIME else method


def no_speedup_reason(method: str | None) -> str | None:
    """Why report.json gives no speed-up for a row measured with `method`, or None when its time is real."""
    if method in REAL_TIME_METHODS:
        return None
    return f"{method_label(method)}: no speed-up is computed from it"


def failed_check(row: dict) -> str | None:
    """`FAILED: TVM vs ONNX Runtime rel-L2 1.39` when a target row's numeric check failed, else None.

    A row whose compiled outputs differ from ONNX Runtime's timed code that computes the wrong thing: every
    view (terminal, report.md/html, compare) shows this instead of its latency and speed-up.
    """
    check = row.get("numeric_check")
    if not check or check.get("ok", True):
        return None
    if check.get("error"):
        return f"FAILED: {check['error']}"
    what = [f"rel-L2 {check['rel_l2']:.3g}"] if isinstance(check.get("rel_l2"), (int, float)) else []
    if isinstance(check.get("max_abs_rel"), (int, float)):
        what.append(f"max abs rel {check['max_abs_rel']:.3g}")
    if isinstance(check.get("top1_agreement"), (int, float)) and check["top1_agreement"] < 1:
        what.append(f"top-1 agree {100 * check['top1_agreement']:.1f} %")
    return "FAILED: TVM vs ONNX Runtime " + (", ".join(what) or "outputs differ")


def markdown(report: dict) -> str:
    o, f = report["original"], report["final"]
    lines = [f"# squeeze report: {Path(report['model']['path']).name if report['model']['path'] else 'model'}", ""]
    lines += [f"- passes: `{report['pass_spec'] or '(none)'}`"]
    lines += [f"- {line}" for line in data_lines(report["data"])]
    lines += [
              f"- inputs: {', '.join(f'{k} {v}' for k, v in report['model']['inputs'].items())}",
              f"- seed {report['seed']}; squeeze {report['squeeze_version']}, onnxruntime "
              f"{report['environment']['onnxruntime']}, TVM {report['environment']['tvm']}; "
              f"{report['environment']['threads']} thread(s)", ""]
    if report.get("failure"):
        lines += [f"**Pipeline stopped:** {report['failure']}. The saved model is the last one that verified.", ""]
    lines += ["## Size and compute", "", "| | original | final | ratio |", "|---|---:|---:|---:|",
              f"| file size | {_mb(o['bytes'].get('file'))} | {_mb(f['bytes'].get('file'))} | "
              f"{_ratio(o['bytes'].get('file'), f['bytes'].get('file'))} |",
              f"| packed size | {_mb(o['bytes'].get('packed'))} | {_mb(f['bytes'].get('packed'))} | "
              f"{_ratio(o['bytes'].get('packed'), f['bytes'].get('packed'))} |",
              f"| bits/param (packed) | {_bits(o['bytes'])} | {_bits(f['bytes'])} | |",
              f"| parameters | {o['param_count']:,} | {f['param_count']:,} | {_ratio(o['param_count'], f['param_count'])} |",
              f"| MACs | {_macs(o['macs'])} | {_macs(f['macs'])} | {_ratio(o['macs'], f['macs'])} |",
              f"| nodes | {o['nodes']} | {f['nodes']} | |", ""]
    if o.get("macs_not_counted"):
        lines += ["Ops counted as zero MACs: " + ", ".join(f"{k} ×{v}" for k, v in o["macs_not_counted"].items()), ""]
    acc = report.get("accuracy")
    if acc:
        lines += ["## Accuracy", "", f"top-1 original {top1_text(acc['original'])}, final {top1_text(acc['final'])} "
                  f"on the evaluation data (drop {acc['drop_pts']:.2f}"
                  + (f" ± {acc['drop_stderr_pts']:.2f}" if isinstance(acc.get("drop_stderr_pts"), (int, float)) else "")
                  + f" pts, n = {acc['original']['n']}; {test_text(acc.get('test'))})", ""]
    lines += _metric_lines(report.get("metric"), report.get("validation"))
    if report.get("fidelity"):
        lines += [f"Final vs original outputs: {_fid(report['fidelity'])}", ""]
    lines += _goal_lines(report.get("goal"))
    lines += _front_end_lines(report.get("front_end"))
    if report["passes"]:
        lines += ["## Passes", "", "| pass | seconds | size | packed | bits/param | params | MACs "
                  "| fidelity vs previous | top-1 (evaluation) | notes |", "|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
        for step in report["passes"]:
            if "failed" in step:
                lines.append(f"| `{step['spec']}` | {step['seconds']:.2f} | | | | | | **failed** | | "
                             f"{step['failed']} |")
                continue
            top1 = top1_text(step["accuracy"]) if step.get("accuracy") else "—"
            notes = "; ".join(step.get("notes", [])).replace("|", "\\|")
            b = step["bytes"]
            lines.append(f"| `{step['spec']}` | {step['seconds']:.2f} | {_mb(b['onnx'])} | {_mb(b.get('packed'))} | "
                         f"{_bits(b)} | {step['param_count']:,} | {_macs(step['macs'])} | {_fid(step['fidelity'])} | "
                         f"{top1} | {notes} |")
        lines += ["", "Size is the ONNX file; packed is `squeeze pack`'s container (bit-packed weights, estimated for "
                  "every pass; — where skipped for big models); bits/param: packed bits of all weights per parameter.",
                  ""]
    lines += ["## Targets", ""]
    lines += [f"**{row['spec']}: {failed_check(row)}** — its outputs are wrong; no latency is reported for it.\n"
              for row in report["targets"] if "error" not in row and failed_check(row)]
    real = [r for r in report["targets"] if "error" in r or real_time(r)]
    apart = [r for r in report["targets"] if "error" not in r and not real_time(r)]
    if real or not apart:
        lines += _real_time_lines(real)
    lines += _not_device_time_lines(apart)
    lines += _device_counts(report["targets"])
    lines += _firmware_lines(report["targets"])
    lines += compute_lines(report["targets"])
    notes = [f"- **{row['spec']}**: {note}" for row in report["targets"]
             for note in [*(row.get("notes") or []), *([row["contention"]] if row.get("contention") else [])]]
    lines += ["", "Notes on the targets:", "", *notes] if notes else []
    ort = report.get("onnxruntime", {})
    busy = contention_note(ort.get("original") or {}, 1, "ONNX Runtime")
    lines += ["", f"ONNX Runtime on this machine: original {_ms(ort.get('original'))}, final {_ms(ort.get('final'))}"
              + (f" ({busy})." if busy else "."),
              "", "Methods: `native` = run and timed on this machine. Latency is per call from Python, batch 1, "
              "after warm-up; p50 is the median. `rpc` = timed on a device through TVM RPC. `emulated` = run in qemu: "
              "outputs are checked, the time is the emulator's (not representative). `opencl-cpu` = the OpenCL "
              "kernels run on a CPU OpenCL (PoCL): correctness only. `instruction-count` = bare-metal firmware in "
              "QEMU with -icount: instructions, not cycles.", "", f"Total run time: {report.get('seconds', 0):.1f} s", ""]
    return "\n".join(lines)


def _real_time_lines(rows: list[dict]) -> list[str]:
    """The targets table of report.md: rows timed for real (native, rpc) and error rows, with speed-ups."""
    lines = ["| target | method | latency (compressed) | original (same target) | "
             "ONNX Runtime original | speed-up vs ORT | TVM vs ORT check |", "|---|---|---|---|---|---:|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['spec']} | — | **error:** {row['error']} | | | | |")
            continue
        check = row.get("numeric_check") or {}
        failed = failed_check(row)
        if failed:  # wrong outputs: no latency, no speed-up
            lines.append(f"| {row['spec']} | {row['method']} | **{failed}** | — | — | — | **FAILED**: {_fid(check)} |")
            continue
        ok = "ok" if check else "—"
        base = row.get("baseline", {}).get("latency_ms")
        speedup = f"{row['speedup']:.2f}×" if "speedup" in row else "—"
        tuned = f" (untuned {_ms(row['untuned_latency_ms'])})" if row.get("untuned_latency_ms") else ""
        lines.append(f"| {row['spec']} | {row['method']} | {_ms(row.get('latency_ms'))}{tuned} | "
                     f"{_ms(row.get('original_latency_ms'))} | {_ms(base)} | {speedup} | {ok}: {_fid(check)} |")
    return lines


def _not_device_time_lines(rows: list[dict]) -> list[str]:
    """The emulated / opencl-cpu / instruction-count rows in their own table, labelled with what their figure is,
    with no speed-up: an emulator's time or an instruction count says nothing about the device's real speed."""
    if not rows:
        return []
    lines = ["", "### Not device time (emulated, opencl-cpu, instruction-count)", "",
             "These figures are not the target's real speed: they are not compared with timed rows and no speed-up "
             "is computed from them. Give a device with --rpc/--tracker for real time.", "",
             "| target | method | figure (compressed) | figure (original, same method) | TVM vs ORT check |",
             "|---|---|---|---|---|"]
    for row in rows:
        check = row.get("numeric_check") or {}
        failed = failed_check(row)
        if failed:
            lines.append(f"| {row['spec']} | {method_label(row['method'])} | **{failed}** | — | **FAILED**: "
                         f"{_fid(check)} |")
            continue
        final, original = apart_figures(row)
        lines.append(f"| {row['spec']} | {method_label(row['method'])} | {final} | {original} | "
                     f"{'ok' if check else '—'}: {_fid(check)} |")
    return lines


def apart_figures(row: dict, short: bool = False) -> tuple[str, str]:
    """(compressed, original) figures of a not-device-time row: emulator time, instruction count, or none."""
    if row.get("latency_ms"):
        time = _short if short else _ms
        return time(row["latency_ms"]), time(row.get("original_latency_ms"))
    if row.get("instructions") is not None:
        unit = " M" if short else " M instructions"
        original = row.get("original_instructions")
        return (f"{row['instructions'] / 1e6:.2f}{unit}", "—" if original is None else f"{original / 1e6:.2f}{unit}")
    return ("—", "—") if short else ("— (outputs checked only)", "—")


def _front_end_lines(front: dict | None) -> list[str]:
    """What the canonical front end did before the first pass (squeeze.canonical)."""
    if not front:
        return []
    lines = ["## Front end (lossless, before the first pass)", ""]
    lines += [f"- {step}" for step in front.get("steps", [])] or ["- nothing to change"]
    lines += [f"- skipped: {why}" for why in front.get("skipped", [])]
    lines += [f"- {front['nodes_before']} → {front['nodes_after']} nodes, opset {front['opset_before']} → "
              f"{front['opset_after']}; verified on {front['verified_on']}; {front['seconds']:.2f} s", ""]
    return lines


def metric_value(block: dict, value: float | None, stderr: float | None) -> str:
    """A task-metric value from report.json's `metric` block: `82.23 % ± 1.10` or `0.483 ± 0.004`."""
    if value is None or not isinstance(value, (int, float)):
        return "—"
    if block.get("unit") == "%":
        return f"{100 * value:.2f} %" + ("" if not isinstance(stderr, (int, float)) else f" ± {100 * stderr:.2f}")
    return f"{value:.3f}" + ("" if not isinstance(stderr, (int, float)) else f" ± {stderr:.3f}")


def metric_drop(block: dict, drop: float | None, stderr: float | None = None) -> str:
    """The drop in points (accuracies) or absolute units, with its standard error when known."""
    if not isinstance(drop, (int, float)):
        return "—"
    pts = block.get("drop_unit") == "pts"
    text = f"{drop:.2f} pts" if pts else f"{drop:.4f}"
    return text + ("" if not isinstance(stderr, (int, float)) else f" ± {stderr:.2f}" if pts else f" ± {stderr:.4f}")


def metric_label(block: dict) -> str:
    """`char acc (ctc)`: the metric's label with its name, as the report rows show it."""
    label, name = block.get("label", block.get("name", "metric")), block.get("name", "")
    return label if name in ("top1", "") or name in label else f"{label} ({name})"


def _metric_lines(block: dict | None, validation: dict | None = None) -> list[str]:
    """The task metric (squeeze.task_metrics): original vs final with n and standard errors, the drop and its paired
    test; with a validation block, the drop that chose (validation) beside the one reported (evaluation)."""
    if not block:
        return []
    how = "the default (no --metric)" if block.get("default") else f"`--metric {block.get('spec', block['name'])}`"
    lines = ["## Task metric", "", "| metric | data | original | final | drop | paired test |",
             "|---|---|---:|---:|---:|---|"]
    for role, b in (("evaluation: reported", block), ("validation: chose", validation)):
        if not b:
            continue
        se = b.get("stderr") or {}
        role = role if validation else b.get("drop_basis", "evaluation")
        lines.append(f"| {metric_label(b)} (n={b['n']}) | {role} | {metric_value(b, b['original'], se.get('original'))} "
                     f"| {metric_value(b, b['final'], se.get('final'))} | {metric_drop(b, b['drop'], se.get('drop'))} | "
                     f"{test_text(b.get('test'))} |")
    lines += ["", f"Metric: {how}, {block.get('direction', '')}; reported on {block.get('data', 'the evaluation data')}."
              + (f" --max-drop/--goal chose on the validation data (n = {validation.get('n')}); the evaluation data "
                 "is never used to choose." if validation else "")
              + " ± is one standard error (the drop's is paired over the same samples).", ""]
    lines += [f"Note: {n}" for n in (validation or {}).get("notes", [])]
    return lines + ([""] if (validation or {}).get("notes") else [])


def data_lines(data: dict) -> list[str]:
    """The three data roles with their sources and n: calibration fits, validation chooses, evaluation reports."""
    calib = f"calibration data (fits): {data['calib']}"
    fit, total = data.get("calib_fit_samples"), data.get("calib_samples")
    if fit is not None and total is not None and fit != total:
        calib += f" — the passes fit on {fit} of {total}"
    val, role = data.get("val"), data.get("val_role") or "(none)"
    if val:
        shown = "" if role.startswith("held out") else f" ({role})"  # the held-out part's source says so itself
        lines = [calib, f"validation data (chooses): {val}, n = {data['val_samples']}{shown}"]
    else:
        lines = [calib, f"validation data (chooses): {role}"]
    lines.append(f"evaluation data (reports only): {data['eval']}, n = {data['eval_samples']}" if data.get("eval")
                 else "evaluation data (reports only): (none)")
    return lines


def top1_text(entry: dict) -> str:
    """`99.26 % ± 0.37 (n=540)` from an accuracy entry (top1, n, stderr)."""
    se = entry.get("stderr")
    return (f"{100 * entry['top1']:.2f} %" + (f" ± {100 * se:.2f}" if isinstance(se, (int, float)) else "")
            + (f" (n={entry['n']})" if entry.get("n") is not None else ""))


def test_text(test: dict | None) -> str:
    """`McNemar b=3 c=1, p=0.62 (exact)` or `paired z=1.20, p=0.23`: the paired test against the original."""
    if not test:
        return "—"
    if test.get("test") == "McNemar":
        exact = " (exact)" if test.get("method") == "exact binomial" else " (χ²)"
        return f"McNemar b={test['b']} c={test['c']}, p={test['p']:.3g}{exact}"
    z = test.get("z")
    return f"paired z={'—' if z is None else f'{z:.2f}'}, p={test['p']:.3g}"


def _goal_lines(goal: dict | None) -> list[str]:
    """The --goal section: status, why, the chosen passes, the measured plans (Pareto points), the plan."""
    if not goal:
        return []
    limit = "" if goal.get("max_drop") is None else f", --max-drop {goal['max_drop']}"
    within = " within --max-drop" if limit else ""
    status = {"met": "met", "closest": f"not met{within}; the closest point is kept",
              "unreachable": "nothing within --max-drop"}.get(goal["status"], goal["status"])
    lines = ["## Goal", "", f"`{goal['goal']}` with {'+'.join(goal['using'])}{limit}: **{status}**. Chosen passes: `{goal.get('spec') or '(none)'}`. Drop measured on {goal['drop_basis']}; "
             f"search {goal['seconds']:.0f} s (tables {goal['tables']['seconds']:.0f} s"
             f"{', from the cache' if goal['tables'].get('cached') else ''}).", ""]
    lines += [f"- {w}" for w in goal.get("why", [])] + [""]
    metrics = list(goal["budgets"])
    lines += ["| measured plan | " + " | ".join(f"{m} × (predicted)" for m in metrics) + " | drop on validation | "
              "loss predicted | loss measured |", "|---|" + "---:|" * (len(metrics) + 3)]
    for p in goal.get("points", []):
        cells = [f"{p['ratios'].get(m, 0):.3g} ({(p.get('predicted') or {}).get(m, float('nan')):.3g})" for m in metrics]
        lines.append(f"| {p['label']} | " + " | ".join(cells) + f" | {p['drop']:.2f} | {p['predicted_loss']:.3g} | "
                     f"{p['measured_loss']:.3g} |")
    changed = [r for r in goal.get("plan", []) if r.get("bits", "float") != "float"
               or r.get("channels_after", 0) != r.get("channels_before", 0)]
    if changed:
        lines += ["", "| layer / group | change | predicted loss |", "|---|---|---:|"]
        for r in changed:
            what = (f"{r['channels_before']} → {r['channels_after']} channels" if r["kind"] == "prune"
                    else f"codebook {r['bits']} bits")
            lines.append(f"| `{r['name']}` | {what} | {r['predicted_loss']:.3g} |")
    return lines + [""]


def terminal_table(report: dict) -> str:
    """A few lines for the end of a CLI run."""
    o, f = report["original"], report["final"]
    rows = [("", "original", "final", "ratio"),
            ("file size", _mb(o["bytes"].get("file")), _mb(f["bytes"].get("file")),
             _ratio(o["bytes"].get("file"), f["bytes"].get("file"))),
            ("parameters", f"{o['param_count']:,}", f"{f['param_count']:,}", _ratio(o["param_count"], f["param_count"])),
            ("MACs", _macs(o["macs"]), _macs(f["macs"]), _ratio(o["macs"], f["macs"]))]
    acc = report.get("accuracy")
    metric = report.get("metric")
    if acc and (not metric or metric.get("name") != "top1"):
        se = acc.get("drop_stderr_pts")
        rows.append((f"top-1 (n={acc['original']['n']})", top1_text({**acc["original"], "n": None}),
                     top1_text({**acc["final"], "n": None}), f"{0.0 - acc['drop_pts']:+.2f}"
                     + (f" ± {se:.2f}" if isinstance(se, (int, float)) else "") + " pts"))
    validation = report.get("validation")
    for block, role in ((metric, "eval"), (validation, "val, chose")):
        if not block:  # the task metric, its n and standard errors; the change is signed (negative = worse)
            continue
        se = block.get("stderr") or {}
        change = 0.0 - block["drop"]
        drop_se = se.get("drop")
        pts = block.get("drop_unit") == "pts"
        text = f"{change:+.2f}" if pts else f"{change:+.4f}"
        if isinstance(drop_se, (int, float)):
            text += f" ± {drop_se:.2f}" if pts else f" ± {drop_se:.4f}"
        p = (block.get("test") or {}).get("p")
        text += (" pts" if pts else "") + (f" (p={p:.2g})" if isinstance(p, (int, float)) else "")
        rows.append((f"{metric_label(block)} ({role + ', ' if validation else ''}n={block['n']})",
                     metric_value(block, block["original"], se.get("original")),
                     metric_value(block, block["final"], se.get("final")), text))
    ort = report.get("onnxruntime", {})
    rows.append(("ONNX Runtime", _short(ort.get("original")), _short(ort.get("final")),
                 _ratio((ort.get("original") or {}).get("p50"), (ort.get("final") or {}).get("p50"))))
    apart: list[tuple[str, str, str]] = []  # emulated / opencl-cpu / instruction-count: own table, no ratio
    for row in report["targets"]:
        if "error" in row:
            rows.append((f"{row['name']}", "error", row["error"][:60], ""))
            continue
        label = f"{row['name']} [{method_label(row['method'])}]"
        failed = failed_check(row)
        if failed:  # wrong outputs: the failure instead of latency and ratio
            if real_time(row):
                rows.append((label, "", failed, ""))
            else:
                apart.append((label, "", failed))
            continue
        if real_time(row):
            rows.append((label, _short(row.get("original_latency_ms") or row.get("latency_ms")),
                         _short(row.get("latency_ms")), _ratio((row.get("original_latency_ms") or {}).get("p50"),
                                                              (row.get("latency_ms") or {}).get("p50"))))
        else:
            final, original = apart_figures(row, short=True)
            apart.append((label, original, final))
        for key, what, fmt in _COUNTS[:2]:  # MCU rows: flash and RAM are byte sizes (exact), original vs final
            if row.get(key) is not None:
                rows.append((f"{row['name']} {what}", fmt(row.get(f"original_{key}") or row[key]), fmt(row[key]),
                             _ratio(row.get(f"original_{key}") or row[key], row[key])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    goal = report.get("goal")
    tail = ""
    if goal:
        best = next((p for p in goal.get("points", []) if p.get("spec") == goal.get("spec")), None)
        tail = f"\ngoal {goal['goal']}: {goal['status']}" + (
            f" ({', '.join(f'{m} {v:.3g}×' for m, v in best['ratios'].items())}; drop {best['drop']:.2f} pts)"
            if best else "")
    busy = [f"note: {row['name']}: {row['contention']}" for row in report["targets"] if row.get("contention")]
    return _aligned(rows, widths) + _apart_table(apart) + tail + "".join("\n" + b for b in busy)


def _aligned(rows: list[tuple[str, ...]], widths: list[int]) -> str:
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _apart_table(apart: list[tuple[str, str, str]]) -> str:
    """The terminal's second table: figures that are not device time, each labelled, with no ratio column."""
    if not apart:
        return ""
    rows = [("not device time (no ratio)", "original", "final"), *apart]
    return "\n\n" + _aligned(rows, [max(len(r[i]) for r in rows) for i in range(3)])


_COUNTS = (("flash_bytes", "flash", lambda n: _mb(n)), ("ram_bytes", "RAM", lambda n: _mb(n)),
           ("instructions", "instructions", lambda n: f"{n / 1e6:.2f} M"))


def _device_counts(rows: list[dict]) -> list[str]:
    """Flash, RAM and instruction counts of bare-metal targets, original vs final."""
    counted = [r for r in rows if "error" not in r and r.get("flash_bytes") is not None]
    if not counted:
        return []
    lines = ["", "| target | flash (final) | flash (original) | RAM (final) | RAM (original) | instructions (final) | "
             "instructions (original) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in counted:
        cells = []
        for key, _, fmt in _COUNTS:
            cells += [fmt(r[key]) if r.get(key) is not None else "—",
                      fmt(r[f"original_{key}"]) if r.get(f"original_{key}") is not None else "—"]
        lines.append(f"| {r['spec']} | " + " | ".join(cells) + " |")
    lines += ["", "Flash = code + weights + initialised data; RAM = arena + workspace + data/bss + measured stack. "
              "Instructions are counted by QEMU (-icount), not cycles: on silicon they differ."]
    return lines


def _firmware_lines(rows: list[dict]) -> list[str]:
    """Per firmware target row (mcu): how the weights are stored, the flash and RAM breakdowns, and per layer the
    weight storage, compute type and MACs (the row's `weights`, `flash_breakdown`, `ram_breakdown`, `layers`)."""
    lines: list[str] = []
    for r in rows:
        if "error" in r or not r.get("flash_breakdown"):
            continue
        flash, ram, weights = r["flash_breakdown"], r.get("ram_breakdown") or {}, r.get("weights") or {}
        lines += ["", f"### Firmware memory: {r['spec']}", "",
                  f"weights={weights.get('mode', '?')}: {weights.get('why', '')}.", "",
                  "| flash | " + " | ".join(k.replace("_", " ") for k in flash) + " | total |",
                  "|---|" + "---:|" * (len(flash) + 1),
                  "| bytes | " + " | ".join(f"{v:,}" for v in flash.values()) + f" | {sum(flash.values()):,} |"]
        if ram:
            lines += ["", "| RAM | " + " | ".join(k.replace("_", " ") for k in ram) + " | total |",
                      "|---|" + "---:|" * (len(ram) + 1),
                      "| bytes | " + " | ".join(f"{v:,}" for v in ram.values()) + f" | {sum(ram.values()):,} |"]
        layers = r.get("layers") or []
        if layers:
            lines += ["", "| layer | op | MACs | weight storage | weight flash | as float32 | compute |",
                      "|---|---|---:|---|---:|---:|---|"]
            for x in layers:
                size = f"{x['flash_bytes']:,}" if x.get("flash_bytes") is not None else "—"
                full = f"{x['float_bytes']:,}" if x.get("float_bytes") is not None else "—"
                lines.append(f"| {x['layer']} | {x['op']} | {x['macs']:,} | {x.get('storage', '—')} | {size} | "
                             f"{full} | {x['compute']} |")
    if lines:
        lines += ["", "Layers that compute in int8 run squeeze's int8 kernels on their int8 weights in flash (no "
                  "decode); other compact weights are decoded into the RAM decode scratch right before the layer that "
                  "reads them, which computes in float32. Flash and RAM parts are measured from the firmware ELF "
                  "(sections and symbols) and the stack's high-water mark."]
    return lines


def compute_lines(rows: list[dict]) -> list[str]:
    """Per target row: whether its figures come from int8 or float arithmetic (the row's `compute`,
    `int8_layers`, `float_layers`, `instruction`; squeeze.targets.schedules.int8.compute_summary)."""
    marked = [r for r in rows if "error" not in r and r.get("compute")]
    if not marked:
        return []
    lines = ["", "| target | compute | int8 layers | float layers | int8 instruction |", "|---|---|---:|---:|---|"]
    for r in marked:
        lines.append(f"| {r['spec']} | {r['compute']} | {r.get('int8_layers', 0)} | {r.get('float_layers', 0)} | "
                     f"{r.get('instruction') or '—'} |")
    lines += ["", "compute: the arithmetic of the Conv/Gemm/MatMul layers the figures come from — int8 (u8×s8→s32 "
              "dot products with requantization), float, or mixed (some layers stay float: no QDQ around them, or a "
              "form the integer kernels do not compute exactly)."]
    return lines


def _short(lat: dict | None) -> str:
    return "—" if not lat else f"{lat['p50']:.3f} ms"
