"""Run generated cases through squeeze and judge each outcome; a worker process gives every case a hard timeout.

A case ends in one of:

* `ok`           — `compress` returned and every pass verified;
* `pass_failed`  — `compress` returned with a recorded pass failure (the last good model kept), which is a
                   contained outcome; a pass that raised something other than a SqueezeError is also listed as a
                   `contained crash` for the pass's owner;
* `error`        — a one-line SqueezeError (CLI: one line on stderr, exit 2);
* `unexpected`   — any other exception, a multi-line message, a traceback, an invalid output, a modified input,
                   a file written where it must not be, or the wrong outcome for a case whose outcome is known;
* `hang`         — the case ran past its timeout (the worker is killed and restarted).

The parent (`Runner`) sends case indices to a worker (`python -m robustness.fuzz --worker`), which rebuilds the
case from (seed, index), runs it in-process with the Python API (or through the CLI in a subprocess), and writes
one JSON line back. Reproduce one case with:

    PYTHONPATH=tests python -m robustness.fuzz --seed SEED --index I [--out-dir] [--cli]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # benchmarks.corpus; appended so the installed squeeze wins

CASE_TIMEOUT = float(os.environ.get("SQUEEZE_FUZZ_TIMEOUT", "60"))
STARTUP_TIMEOUT = 180.0
SUMMARIES: list[str] = []  # one line per suite run, printed by conftest.py's terminal summary
OUTPUT_FILES = {"model.onnx", "model.onnx.data", "report.json", "report.md", "report.html", ".squeeze.lock"}


# ------------------------------------------------------------------------------------------------- one case

def materialize(case, folder: Path) -> Path:
    """Write the case's files and links under folder/in (with folder/outside for what must stay unread)."""
    inp = folder / "in"
    inp.mkdir(parents=True)
    (folder / "outside").mkdir()
    for rel, data in case.files.items():
        path = (inp / rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for kind, rel, target in case.links:
        path = inp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "symlink":
            path.symlink_to(target)
        elif kind == "hardlink":
            os.link(inp / target, path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "dir":
            path.mkdir(exist_ok=True)
    return inp / "model.onnx"


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (links not followed, FIFOs not opened) with a hash of regular files."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "dir" if path.is_dir() else "special"
    return found


@dataclass
class Outcome:
    index: int
    case: str
    outcome: str = "ok"
    detail: str = ""
    problems: list[str] = field(default_factory=list)
    contained_crash: str | None = None
    seconds: float = 0.0
    via: str = "api"

    def as_json(self) -> str:
        return json.dumps(self.__dict__)


def run_case(seed: int, index: int, root: Path, out_dir: bool = False, cli: bool = False,
             corpus_share: float = 0.1, keep: bool = False) -> Outcome:
    """Build, run and judge case (seed, index) in a fresh folder under `root`."""
    from robustness import mutate  # noqa: PLC0415
    case = mutate.case(seed, index, corpus_share)
    folder = Path(tempfile.mkdtemp(prefix=f"case{index}-", dir=root))
    result = Outcome(index, case.describe(), via="cli" if cli else "api")
    started = time.perf_counter()
    try:
        model_path = materialize(case, folder)
        before = snapshot(folder)
        out = folder / "out"
        if cli:
            _run_cli(case, model_path, out, result)
        else:
            _run_api(case, model_path, out if out_dir else None, result)
        after = {k: v for k, v in snapshot(folder).items() if k != "out" and not k.startswith("out/")}
        if after != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            result.problems.append(f"files outside the output folder changed or appeared: {changed[:5]}")
        if case.expect == "ok" and result.outcome == "error":
            result.problems.append(f"expected a valid output, got an error: {result.detail}")
        if case.expect == "error" and result.outcome in ("ok", "pass_failed"):
            result.problems.append("expected a SqueezeError, got an output")
    except Exception:  # a bug in the harness itself must show up, not pass silently
        result.outcome = "unexpected"
        result.detail = "harness: " + traceback.format_exc()
    finally:
        result.seconds = round(time.perf_counter() - started, 3)
        if result.problems and result.outcome != "unexpected":
            result.outcome = "unexpected"
        if not keep and result.outcome != "unexpected":
            shutil.rmtree(folder, ignore_errors=True)
        elif result.outcome == "unexpected":
            result.detail += f"\n(case folder kept: {folder})"
    return result


def _run_api(case, model_path: Path, out: Path | None, result: Outcome) -> None:
    import squeeze  # noqa: PLC0415
    from squeeze.errors import SqueezeError  # noqa: PLC0415
    calib = model_path.parent / case.calib if case.calib else None
    try:
        res = squeeze.compress(model_path, case.passes, calib=calib, targets="", seed=case.seed,
                               input_shapes=list(case.input_shapes), threads=1, runs=1, out_dir=out)
    except SqueezeError as exc:
        result.outcome, result.detail = "error", f"{type(exc).__name__}: {exc}"
        message = str(exc)
        if not message.strip() or "\n" in message or "\r" in message:
            result.problems.append(f"SqueezeError message is not one line: {message!r}")
        if out is not None and out.exists() and any(p.name != ".squeeze.lock" for p in out.iterdir()):
            result.problems.append(f"a failed run left files in the output folder: {sorted(os.listdir(out))}")
        return
    except BaseException as exc:  # noqa: BLE001  (what the suite exists to find)
        result.outcome = "unexpected"
        result.detail = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        return
    result.outcome = "ok" if res.ok else "pass_failed"
    if res.failure:
        result.detail = res.failure
        if "\n" in res.failure:
            result.problems.append(f"failure message is not one line: {res.failure!r}")
        exc = res.exception
        from squeeze.errors import SqueezeError as SE  # noqa: PLC0415
        if exc is not None and not isinstance(exc, SE):
            result.contained_crash = f"{res.failure[:300]}"
    _check_model(res.model, case, model_path, res.report, result)
    if out is not None:
        _check_out_dir(out, res, result)


def _check_model(model, case, model_path: Path, report: dict, result: Outcome) -> None:
    """The returned model is valid ONNX, and its control-flow nodes are the ones the input had."""
    import onnx  # noqa: PLC0415
    from squeeze.model import subgraph_nodes  # noqa: PLC0415
    ran = [s for s in report.get("passes", []) if "failed" not in s]
    try:
        # A model a pass produced was verified with the full check; the input itself only had to load.
        onnx.checker.check_model(model, full_check=bool(ran))
    except Exception as exc:  # noqa: BLE001
        result.problems.append(f"returned model fails the checker: {str(exc).splitlines()[0][:200]}")
    try:
        original = onnx.load(str(model_path))
    except Exception:  # external data that load_model refused would have raised before; be lenient here
        return
    if ran:  # passes start from the canonical form (the front end may tidy subgraphs and inline constant Ifs)
        from squeeze.canonical import canonicalize  # noqa: PLC0415
        try:
            original = canonicalize(original)[0]
        except Exception as exc:  # noqa: BLE001
            result.problems.append(f"the front end raised on the input: {type(exc).__name__}: {exc}"[:200])
            return
    before = {}
    for node in subgraph_nodes(original):
        before.setdefault(node.name, []).append(node)
    after = {n.name: n for n in subgraph_nodes(model)}
    for name, nodes in before.items():
        if len(nodes) != 1 or not name:
            continue
        node = after.get(name)
        if node is None:
            if not any(s["name"] == "cleanup" for s in ran):  # cleanup may fold an If with a constant condition
                result.problems.append(f"control-flow node {name!r} disappeared")
            continue
        # bytes, not message equality: a NaN weight inside a subgraph compares unequal to itself
        if [a.SerializeToString(deterministic=True) for a in node.attribute] != \
                [a.SerializeToString(deterministic=True) for a in nodes[0].attribute]:
            result.problems.append(f"control-flow node {name!r}: its subgraphs were changed")
        for step in ran:
            if not any("control-flow" in n for n in step.get("notes", [])):
                result.problems.append(f"pass {step['name']!r} does not list the control-flow nodes it left alone")


def _check_out_dir(out: Path, res, result: Outcome) -> None:
    from squeeze.model import load_model  # noqa: PLC0415
    names = set(os.listdir(out)) if out.is_dir() else set()
    unknown = sorted(names - OUTPUT_FILES)
    if unknown:
        result.problems.append(f"unexpected files in the output folder: {unknown}")
    for required in ("model.onnx", "report.json", "report.md"):
        if required not in names:
            result.problems.append(f"{required} missing from the output folder")
    if "model.onnx" in names:
        try:
            load_model(out / "model.onnx")
        except Exception as exc:  # noqa: BLE001
            result.problems.append(f"the saved model.onnx does not load: {exc}")
    if "report.json" in names:
        report = json.loads((out / "report.json").read_text())
        if report.get("failure") != res.failure:
            result.problems.append("report.json's failure differs from the result's")


def _run_cli(case, model_path: Path, out: Path, result: Outcome) -> None:
    cmd = [sys.executable, "-m", "squeeze", str(model_path), "--passes", case.passes, "--target", "none", "-o",
           str(out), "--seed", str(case.seed), "--runs", "1", "--threads", "1"]
    for shape in case.input_shapes:
        cmd += ["--input-shape", shape]
    if case.calib:
        cmd += ["--calib", str(model_path.parent / case.calib)]
    env = dict(os.environ, PYTHONWARNINGS="default")  # warnings must not reach the user's terminal either
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CASE_TIMEOUT, cwd=model_path.parent.parent,
                              env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        result.outcome, result.detail = "hang", f"CLI ran past {CASE_TIMEOUT}s"
        return
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode == 0:
        result.outcome = "ok"
        if lines:
            result.problems.append(f"exit 0 but stderr has {len(lines)} line(s): {lines[:3]}")
        _check_cli_out(out, result)
    elif proc.returncode == 2:
        result.outcome = "error"
        result.detail = lines[-1] if lines else ""
        if len(lines) != 1 or not lines[0].startswith("squeeze: error: "):
            result.problems.append(f"exit 2 with {len(lines)} stderr line(s), not one 'squeeze: error:' line: "
                                   f"{proc.stderr[-1500:]!r}")
        if "kept the last good model" in result.detail:
            result.outcome = "pass_failed"
            _check_cli_out(out, result)
    else:
        result.outcome = "unexpected"
        result.detail = f"exit {proc.returncode}\n{proc.stderr[-3000:]}"


def _check_cli_out(out: Path, result: Outcome) -> None:
    from squeeze.model import load_model  # noqa: PLC0415
    names = set(os.listdir(out)) if out.is_dir() else set()
    if not {"model.onnx", "report.json", "report.md"} <= names:
        result.problems.append(f"CLI output folder incomplete: {sorted(names)}")
    elif names - OUTPUT_FILES:
        result.problems.append(f"unexpected files in the CLI output folder: {sorted(names - OUTPUT_FILES)}")
    else:
        try:
            load_model(out / "model.onnx")
        except Exception as exc:  # noqa: BLE001
            result.problems.append(f"the CLI's model.onnx does not load: {exc}")


# ------------------------------------------------------------------------------------------------- worker

def worker() -> None:
    """Read {"seed", "index", "root", ...} lines on stdin; write one Outcome JSON line each on the protocol fd.

    Runs in a sentinel working directory that must stay empty: squeeze never writes into the working directory.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    log = os.open(os.environ.get("SQUEEZE_FUZZ_LOG", os.devnull), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)  # graphsurgeon and friends print: keep the protocol clean
    os.dup2(log, 2)
    import squeeze.registry  # noqa: PLC0415,F401  (import everything once, before the first timed case)
    squeeze.registry.all_passes()
    proto.write('{"ready": true}\n')
    cwd = Path.cwd()
    for line in sys.stdin:
        job = json.loads(line)
        if job.get("debug_sleep"):  # lets the tests check that a hang is caught
            time.sleep(job["debug_sleep"])
        outcome = run_case(job["seed"], job["index"], Path(job["root"]), out_dir=job.get("out_dir", False),
                           cli=job.get("cli", False), corpus_share=job.get("corpus_share", 0.1))
        written = os.listdir(cwd)
        if written:
            outcome.problems.append(f"files written into the working directory: {written}")
            outcome.outcome = "unexpected"
            for name in written:
                shutil.rmtree(cwd / name, ignore_errors=True) if (cwd / name).is_dir() else (cwd / name).unlink()
        proto.write(outcome.as_json() + "\n")


class Runner:
    """Parent side: one worker process, a timeout per case, a fresh worker after a hang."""

    def __init__(self, root: Path, log: Path | None = None, timeout: float = CASE_TIMEOUT):
        self.root = root
        self.timeout = timeout
        self.log = log
        self.cwd = root / "cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        if self.log:
            env["SQUEEZE_FUZZ_LOG"] = str(self.log)
        self.proc = subprocess.Popen([sys.executable, "-m", "robustness.fuzz", "--worker"], cwd=self.cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready, _, _ = select.select([self.proc.stdout], [], [], STARTUP_TIMEOUT)  # imports are not a case's time
        if not ready or not self.proc.stdout.readline():
            self.close()
            raise RuntimeError(f"the fuzz worker did not start within {STARTUP_TIMEOUT}s")

    def run(self, seed: int, index: int, **options) -> Outcome:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"seed": seed, "index": index, "root": str(self.root), **options}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            died = self.proc.poll()
            self.close()
            what = "hang" if died is None else "unexpected"
            detail = f"no answer within {self.timeout}s" if died is None else f"worker died with exit code {died}"
            return Outcome(index, f"seed{seed}-case{index}", outcome=what, detail=detail)
        data = json.loads(line)
        return Outcome(**data)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream:
                    stream.close()
            self.proc = None


def plan(n: int, out_dir_every: int, cli_every: int) -> list[dict]:
    """Which indices save an output folder and which go through the CLI."""
    jobs = []
    for i in range(n):
        jobs.append({"index": i, "out_dir": i % out_dir_every == out_dir_every - 1,
                     "cli": cli_every > 0 and i % cli_every == cli_every // 2})
    return jobs


def summarize(outcomes: list[Outcome], seconds: float, seed: int | None = None,
              corpus_share: float | None = None) -> str:
    """Counts per outcome, then the contained pass crashes with a case that reproduces each (the seed and corpus
    share are part of a case: `--index` alone names another case when they differ from the defaults)."""
    from collections import Counter  # noqa: PLC0415
    counts = Counter(o.outcome for o in outcomes)
    via = Counter(o.via for o in outcomes)
    text = (f"{len(outcomes)} cases in {seconds:.1f}s ({via.get('api', 0)} API, {via.get('cli', 0)} CLI): "
            + ", ".join(f"{k} {counts[k]}" for k in ("ok", "pass_failed", "error", "unexpected", "hang")))
    crashes: Counter[str] = Counter()
    example: dict[str, int] = {}
    for o in outcomes:
        if o.contained_crash:
            head, _, rest = o.contained_crash.partition(":")
            what = f"{head}:{rest[:60]}"
            crashes[what] += 1
            example.setdefault(what, o.index)
    if crashes:
        text += "\n  contained pass crashes (non-SqueezeError inside a pass; last good model kept):"
        for what, k in crashes.most_common():
            args = (f"--seed {seed} " if seed is not None else "") + \
                (f"--corpus-share {corpus_share} " if corpus_share is not None else "")
            text += f"\n    {k}× {what} (e.g. {args}--index {example[what]})"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run robustness cases (see the module docstring)")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SQUEEZE_FUZZ_SEED", "11")))
    parser.add_argument("--index", type=int, action="append")
    parser.add_argument("--n", type=int)
    parser.add_argument("--out-dir", action="store_true")
    parser.add_argument("--cli", action="store_true")
    parser.add_argument("--corpus-share", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return 0
    root = Path(tempfile.mkdtemp(prefix="squeeze-fuzz-"))
    indices = args.index or list(range(args.n or 20))
    bad = 0
    for i in indices:
        from robustness import mutate  # noqa: PLC0415
        print(f"case {i}: {mutate.case(args.seed, i, args.corpus_share).describe()}")
        o = run_case(args.seed, i, root, out_dir=args.out_dir, cli=args.cli, corpus_share=args.corpus_share,
                     keep=True)
        print(f"  -> {o.outcome} ({o.seconds}s) {o.detail[:2000]}")
        for p in o.problems:
            print(f"  problem: {p}")
        bad += o.outcome in ("unexpected", "hang")
    print(f"files under {root}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
