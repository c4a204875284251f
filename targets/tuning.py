"""Cached MetaSchedule tuning for CPU targets (`--tune TRIALS`, `--tune-cache DIR`).

    db = tune(mod, target, trials=200, cache=cache_dir(), threads=2)
    executable = tvm.compile(mod, target, relax_pipeline=schedules.build_pipeline(target, db))

1. The module is legalized and fused exactly as the compile pipeline does (`schedules.fused_module`), so the
   fused TIR functions MetaSchedule extracts are the ones `MetaScheduleApplyDatabase` later looks up.
2. Every task is first given squeeze's default schedule (`schedules.rules()`), measured with MetaSchedule's own
   builder and runner and committed to the database as a record: the database's best is never worse than the
   default, and the measurement ranks the tasks by their share of the latency (time × calls per inference).
3. The trial budget goes to the tasks in proportion to that share (tasks under `MIN_TRIALS` get none), and each
   task's records already in the database count against its budget: a second run with the same budget tunes
   nothing and compiles at once.
4. A task's trials go first to the variants of its rule (other register tiles, parallel on/off: the rule's
   `variants`), then, if trials remain, to MetaSchedule's evolutionary search, which starts from the best
   records in the database.

Where candidates are measured: on this machine by default (MetaSchedule's LocalRunner); on a device when
`runner` is MetaSchedule's RPCRunner (`remote.ms_runner`: `--tracker HOST:PORT --key KEY` or `--rpc HOST:PORT`).
Behind a tracker, each batch of candidates is timed on every device registered under the key at once (one
runner worker per device; the report's `tuning.devices` says how many).
Both the default-schedule seeds and every tuning candidate then go through that runner: built (and, for a
cross target, linked with `export=library_export("aarch64-linux-gnu-g++")`) here, uploaded and timed there.

The JSON database lives in `cache/<target>-<digest>-t<threads>[-<device>]/`, one per target, thread count (the
best schedule for one core is not the best for two), device (`remote.Runner.identity()`: `key-KEY` or
`rpc-HOST-PORT`; this machine's CPU model otherwise), TVM version and version of squeeze's default schedules, so
times from different machines or code never meet in one database.
`cache_dir()` is `--tune-cache`, else `$SQUEEZE_CACHE/tuning`, else `~/.cache/squeeze/tuning`.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from squeeze.errors import TargetError
from squeeze.host import host_model

from . import tvm_build

MIN_TRIALS = 8          #: a task whose share of the budget is smaller than this is not tuned
TRIALS_PER_ITER = 32    #: candidates measured per search round (MetaSchedule's num_trials_per_iter)


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where tuning databases live: `explicit`, else $SQUEEZE_CACHE/tuning, else ~/.cache/squeeze/tuning."""
    if explicit:
        return Path(explicit).expanduser()
    root = os.environ.get("SQUEEZE_CACHE")
    if root:
        return Path(root).expanduser() / "tuning"
    return Path.home() / ".cache" / "squeeze" / "tuning"


def database_dir(cache: Path, target, threads: int, device: str | None = None) -> Path:
    """One database per target (kind, CPU, attributes), thread count, device (None: this machine) and version of
    the default schedules: a record replays its schedule on the same workload, so records made with older rules
    (e.g. before their epilogues were vectorized) would otherwise stand in for the better current default."""
    from .schedules.pipeline import SCHEDULES_VERSION  # noqa: PLC0415
    # TVM's version too: its codegen and its MetaSchedule rules change what a record's schedule compiles to.
    # This machine is named by its CPU model (two hosts with the same -mcpu can still differ in caches and
    # clocks); a device by its RPC identity.
    text = f"{target} rules={SCHEDULES_VERSION} tvm={tvm_build.tvm().__version__}"
    text += f" device={device}" if device else f" host={host_model()}"
    cpu = str(target.attrs.get("mcpu", "") or "generic")
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    name = f"{target.kind.name}-{cpu}-{digest}-t{threads}" + (f"-{device}" if device else "")
    return cache / re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@dataclass
class Task:
    """One fused TIR function: how often `main` calls it, its default-schedule time, the trials it gets."""

    name: str
    weight: int
    workload_mod: object
    default_us: float | None = None
    done: int = 0
    budget: int = 0

    @property
    def share_us(self) -> float:
        return (self.default_us or 0.0) * self.weight


def _light_tensor_intrin(arch: str = "x86") -> None:
    """Stand in for `tvm.s_tir.tensor_intrin` with the intrinsics of one CPU family only (`x86`, `arm_cpu`).

    MetaSchedule imports that package in every TuneContext; its CUDA, ROCm, Hexagon and ARM intrinsics are
    TVMScript parsed at import and take 30-100 s on a busy 2-core machine. CPU tuning needs its own family's
    (x86: the VNNI dot product MetaSchedule's x86 rules look up by name).
    """
    import importlib  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import types  # noqa: PLC0415
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    shell = types.ModuleType(name)
    shell.__path__ = list(spec.submodule_search_locations)
    shell.__spec__ = spec
    sys.modules[name] = shell
    importlib.import_module(f"{name}.{arch}")


def _build(mod, target, _params):
    """MetaSchedule's default_build without its tensor-intrinsic import (runs in the builder's worker), lowered
    as the model build lowers it: partial tiles peeled (`schedules.common.peel_partial_tiles`), squeeze's TIR
    pipeline (byte-table lookups, transposing epilogues: `schedules.pipeline.register_tir_pipeline`)."""
    from tvm.driver import build  # noqa: PLC0415
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock  # noqa: PLC0415

    from .schedules import COMPILE_CONFIG  # noqa: PLC0415
    from .schedules.common import mark_partial_tiles  # noqa: PLC0415
    from .schedules.pipeline import register_tir_pipeline  # noqa: PLC0415
    from .tvm_build import pass_context  # noqa: PLC0415
    mod = mark_partial_tiles(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod))
    with pass_context(COMPILE_CONFIG):
        return build(mod, target=target, pipeline=register_tir_pipeline())


def _export_library(mod, cross_compiler: str | None = None) -> str:
    """MetaSchedule builder export: a shared library (linked here, by `cross_compiler` when given) that a device's
    rpc_server loads as it is. MetaSchedule's default, a tar of objects, makes the server link it with its own
    compiler, which a board without a toolchain lacks (and which cannot be the host's for a cross target)."""
    from tvm.support import cc  # noqa: PLC0415
    path = os.path.join(tempfile.mkdtemp(prefix="squeeze-candidate-"), "candidate.so")
    if cross_compiler:
        mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    else:
        mod.export_library(path)
    return path


def library_export(cross_compiler: str | None = None) -> Callable:
    """An `f_export` for MetaSchedule's LocalBuilder: candidates as `.so`, cross-linked by `cross_compiler`."""
    return functools.partial(_export_library, cross_compiler=cross_compiler)


def open_database(path: Path):
    tvm_build.tvm()
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415
    path.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")


def tune(mod, target, *, trials: int, cache: Path, threads: int, say: Callable[[str], None] | None = None,
         seed: int = 0, stats: dict | None = None, runner=None, device: str | None = None,
         export: Callable | None = None):
    """Tune the fused functions of the Relax module `mod` for `target`; return the (persistent) database.

    `stats`, when given, receives per function: calls, default-schedule µs, best µs in the database, trials.
    `runner`: a MetaSchedule runner that measures elsewhere (`remote.ms_runner`), with `device` naming that
    machine (it keys the database) and `export` (`library_export()`) the builder's export; default: this machine.
    """
    say = say or (lambda msg: None)
    if runner is not None and not device:
        raise ValueError("tune(runner=...) needs device=: the device's name keeps its records apart from this "
                         "machine's")
    tvm_build.tvm()
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    from . import schedules  # noqa: PLC0415
    from .schedules.common import planned_threads  # noqa: PLC0415
    for module in ("xgboost", "psutil", "cloudpickle"):
        try:
            __import__(module)
        except ImportError:
            raise TargetError(f"--tune needs the Python package {module!r}: pip install "
                              f"{'xgboost-cpu' if module == 'xgboost' else module}") from None
    triple = str(target.attrs.get("mtriple", "") or "")
    folder = database_dir(cache, target, threads, device)
    database = open_database(folder)
    import tvm  # noqa: PLC0415
    target = tvm.target.Target({**target.export(), "num-cores": threads})  # MetaSchedule requires it
    with tvm_build.keep_affinity():
        fused = schedules.fused_module(mod, target)
        extracted = ms.relax_integration.extract_tasks(fused, target)
    tasks = [Task(t.task_name, int(t.weight), t.dispatched[0]) for t in extracted]
    if not tasks:
        return database
    builder = ms.builder.LocalBuilder(max_workers=1, f_build=_build, f_export=export, timeout_sec=120)
    if runner is None:
        runner = ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=10, repeat=5,
                                                                                 min_repeat_ms=20))
    # the default schedules and the rules' variants are planned for the thread count they are timed with (on a
    # device: unknown here); a 1-thread seed with parallel loops would be replayed as the tuned schedule
    planned = threads if device is None else None
    with tvm_build.keep_affinity(), planned_threads(planned):
        _seed(database, tasks, target, builder, runner, device or "this machine")
    plan_budget(tasks, trials)
    todo = [t for t in tasks if t.budget > t.done]
    say(f"tuning {len(todo)} of {len(tasks)} functions, {sum(t.budget - t.done for t in todo)} trials "
        f"(database {folder})")
    with tempfile.TemporaryDirectory(prefix="squeeze-tune-") as work_dir:
        for i, task in enumerate(sorted(todo, key=lambda t: -t.share_us)):
            remaining = task.budget - task.done
            say(f"tuning {task.name} ({i + 1}/{len(todo)}): {remaining} trials")
            with tvm_build.keep_affinity(), planned_threads(planned):
                remaining -= _measure_variants(database, task, target, builder, runner, remaining)
            if remaining < MIN_TRIALS:
                continue
            _light_tensor_intrin("arm_cpu" if triple.startswith(("aarch64", "arm")) else "x86")
            context = ms.TuneContext(mod=task.workload_mod, target=target, space_generator="post-order-apply",
                                     search_strategy=_search(remaining), task_name=task.name,
                                     rand_state=seed + i, num_threads=max(1, os.cpu_count() or 1))
            with tvm_build.keep_affinity():
                ms.tune_tasks(tasks=[context], task_weights=[float(task.weight)], work_dir=work_dir,
                              max_trials_global=remaining, num_trials_per_iter=min(TRIALS_PER_ITER, remaining),
                              builder=builder, runner=runner, database=database, cost_model="xgb",
                              task_scheduler="round-robin")
    for task in sorted(tasks, key=lambda t: -t.share_us):
        workload = database.commit_workload(task.workload_mod)
        top = database.get_top_k(workload, 1)
        best = _us(top[0]) if top else None
        entry = {"calls": task.weight, "default_us": _round(task.default_us), "best_us": _round(best),
                 "records": len(database.get_top_k(workload, 1 << 20)), "budget": task.budget}
        if stats is not None:
            stats[task.name] = entry
        say(f"{task.name}: {entry}")
    return database


def tune_model(mod, target, *, trials: int, tune_cache: str = "", device=None,
               cross_compiler: str | None = None):
    """What a CPU target's `build()` does for `tune=N`: tune `mod` where it will run; return (database, info).

    `device` is the target's `remote.Runner` (--rpc/--tracker) or None (this machine); `cross_compiler` links the
    candidates for it (aarch64-linux-gnu-g++ for arm). `info` is the report's `tuning` entry: trials, database,
    seconds, where candidates were measured, per-function stats, and the sums over functions (µs per inference)
    of the default-schedule times and of the best times, both measured where the model runs.
    """
    import time  # noqa: PLC0415
    start = time.perf_counter()
    cache = cache_dir(tune_cache or None)
    threads = tvm_build.threads()
    options: dict = {}
    devices = 1
    if device is not None:
        from . import remote  # noqa: PLC0415
        device.connect()  # a device that cannot be reached: TargetError with a hint, before anything is built
        devices = device.devices()  # every device under the tracker key measures candidates at once
        options = {"runner": remote.ms_runner(device, workers=devices), "device": device.identity(),
                   "export": library_export(cross_compiler)}
    functions: dict = {}
    database = tune(mod, target, trials=trials, cache=cache, threads=threads, stats=functions, **options)
    timed = [f for f in functions.values() if f["default_us"] is not None and f["best_us"] is not None]
    info = {"trials": trials, "database": str(database_dir(cache, target, threads, options.get("device"))),
            "seconds": tvm_build.seconds_since(start),
            "measured": "rpc" if device is not None else "native",
            "measured_on": device.describe() if device is not None else "this machine",
            "devices": devices,
            "functions": functions,
            "kernels_us": {"untuned": _round(sum(f["default_us"] * f["calls"] for f in timed)),
                           "tuned": _round(sum(f["best_us"] * f["calls"] for f in timed))}}
    return database, info


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _search(trials: int):
    """Evolutionary search sized to the budget: MetaSchedule's defaults (population 512, 4 generations) spend
    about a minute per round on a 2-core machine, more than measuring a handful of candidates takes."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415
    population = int(min(512, max(64, 8 * trials)))
    return ms.search_strategy.EvolutionarySearch(population_size=population,
                                                 init_min_unmeasured=min(50, population // 2),
                                                 genetic_num_iters=4 if trials >= 64 else 2)


def plan_budget(tasks: list[Task], trials: int) -> None:
    """Trials in proportion to each task's share of the latency.

    Tasks whose share would be under MIN_TRIALS get none and their trials go to the others (all to the
    slowest task when no share reaches MIN_TRIALS).
    """
    total = sum(t.share_us for t in tasks)
    for task in tasks:
        task.budget = 0
    if total <= 0 or trials <= 0:
        return
    kept = [t for t in tasks if trials * t.share_us / total >= MIN_TRIALS]
    if not kept:
        kept = [max(tasks, key=lambda t: t.share_us)]
    kept_total = sum(t.share_us for t in kept)
    for task in kept:
        task.budget = int(trials * task.share_us / kept_total)


def _seed(database, tasks: list[Task], target, builder, runner, where: str = "this machine") -> None:
    """Commit each task's default schedule as a measured record (once); set `done` and `default_us`.

    All the new default schedules are built in one builder call and timed in one runner call (each builder
    call starts fresh worker processes). TargetError when none of them could be measured (a device that is
    gone, a library it cannot load): tuning would otherwise go on blind.
    """
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415
    pending = []
    for task in tasks:
        workload = database.commit_workload(task.workload_mod)
        records = database.get_top_k(workload, 1 << 20)
        task.done = len(records)
        seed = next((r for r in records if _is_default(r)), None)
        if seed is not None:
            task.default_us = _us(seed)
            continue
        schedule = _default_schedule(task.workload_mod, target)
        if schedule is None:  # no rule: rank by the best record there is, if any
            task.default_us = _us(records[0]) if records else None
            continue
        pending.append((task, workload, schedule))
    if not pending:
        return
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, _, sch in pending])
    inputs, kept = [], []
    for (task, workload, sch), result in zip(pending, built):
        if result.error_msg is None:
            inputs.append(ms.runner.RunnerInput(result.artifact_path, "cpu",
                                                ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])))
            kept.append((task, workload, sch))
    errors = [r.error_msg for r in built if r.error_msg is not None]
    measured = 0
    results = [future.result() for future in runner.run(inputs)]
    _remove_artifacts(built)
    for (task, workload, sch), result in zip(kept, results):
        if result.error_msg or not result.run_secs:
            errors.append(result.error_msg or "no time")
            continue
        measured += 1
        seconds = min(float(s) for s in result.run_secs)
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, run_secs=[seconds], target=target,
            args_info=ms.arg_info.ArgInfo.from_prim_func(task.workload_mod["main"])))
        task.done += 1
        task.default_us = seconds * 1e6
    if not measured and errors:
        raise TargetError(f"tuning: no default schedule could be measured on {where}: {_error_line(errors[0])}")


def _error_line(text: str) -> str:
    """The line of a MetaSchedule error that says what went wrong (its messages start with a generic header and
    end in a traceback)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    tail = [ln for ln in lines if not ln.startswith(("File ", "Traceback", "RPCRunner:", "LocalRunner:",
                                                      "LocalBuilder:"))]
    return (tail[-1] if tail else lines[0] if lines else "unknown error")[:300]


def _measure_variants(database, task: Task, target, builder, runner, limit: int) -> int:
    """Measure the rule's own variants (other register tiles, parallel on/off) not yet in the database.

    MetaSchedule's generic search space rarely gets near the default schedules in a few hundred trials (on
    cifar10_resnet4b its best after 160 trials was 1.2-6× slower, function by function), so the budget goes
    first to the neighbours of the default. Returns the number of trials used.
    """
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    from . import schedules  # noqa: PLC0415
    from .schedules.common import VARIANT  # noqa: PLC0415
    func = task.workload_mod["main"]
    workload = database.commit_workload(task.workload_mod)
    seen = "\n".join(str(r.trace) for r in database.get_top_k(workload, 1 << 20))
    candidates = []
    with target:
        for rule in schedules.rules():
            if hasattr(rule, "variants") and rule.apply(func, target, False) is not None:
                candidates = rule.variants(func, target, limit + 64)
                break
    fresh = []
    for sch in candidates:
        mark = next((str(v) for b in [sch.get(sch.get_sblock(n)) for n in _block_names(sch)]
                     for k, v in b.annotations.items() if k == VARIANT), None)
        if mark is not None and mark not in seen:
            fresh.append(sch)
        if len(fresh) >= limit:
            break
    if not fresh:
        return 0
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for sch in fresh])
    args = ms.arg_info.ArgInfo.from_prim_func(func)
    pairs = [(sch, ms.runner.RunnerInput(b.artifact_path, "cpu", args)) for sch, b in zip(fresh, built)
             if b.error_msg is None]
    results = [future.result() for future in runner.run([inp for _, inp in pairs])]
    _remove_artifacts(built)
    for (sch, _), result in zip(pairs, results):
        if result.error_msg or not result.run_secs:
            continue
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, run_secs=[min(float(x) for x in result.run_secs)], target=target, args_info=args))
        task.done += 1
    return len(fresh)


def _remove_artifacts(built) -> None:
    """Delete the builder's artifacts once measured (each is alone in a temp folder; MetaSchedule's own search
    does this with its RemoveBuildArtifact callback)."""
    import shutil  # noqa: PLC0415
    for result in built:
        if result.error_msg is None and result.artifact_path:
            shutil.rmtree(os.path.dirname(str(result.artifact_path)), ignore_errors=True)


def _block_names(sch) -> list[str]:
    from .schedules.common import root_blocks  # noqa: PLC0415
    return [sch.get(b).name_hint for b in root_blocks(sch)]


def _default_schedule(workload_mod, target):
    """squeeze's default schedule of the task's function (a traced Schedule), or None where no rule applies."""
    from . import schedules  # noqa: PLC0415
    func = workload_mod["main"]
    with target:
        for rule in schedules.rules():
            try:
                sch = rule.apply(func, target, False)
            except Exception:  # noqa: BLE001 - a rule that fails here also fails in the pipeline: no seed
                return None
            if sch is not None:  # mark the record as the default (a block annotation codegen ignores)
                from .schedules.common import root_blocks  # noqa: PLC0415
                sch.annotate(root_blocks(sch)[0], DEFAULT_MARK, 1)
                return sch
    return None


DEFAULT_MARK = "squeeze.default_schedule"


def _is_default(record) -> bool:
    return DEFAULT_MARK in str(record.trace)


def _us(record) -> float | None:
    secs = [float(s) for s in record.run_secs]
    return min(secs) * 1e6 if secs else None
