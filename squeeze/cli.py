"""Command line: `squeeze MODEL [--passes SPEC] [--target LIST] ...`, plus `squeeze passes|targets|inspect`.

User errors print one line and exit 2 (tracebacks only with --debug).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import SqueezeError

SUBCOMMANDS = ("passes", "targets", "report", "compare", "doctor", "pack", "unpack", "inspect")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not debug:  # numpy's NaN/Inf RuntimeWarnings and the like: the report records them; stderr is for errors
        import warnings  # noqa: PLC0415
        warnings.simplefilter("ignore")
    _interrupt_on_sigterm()
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return _subcommand(argv[0], argv[1:])
        return _run(argv)
    except SqueezeError as exc:
        if debug:
            raise
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"squeeze: error: {message}", file=sys.stderr)  # one line, whatever the message held
        return 2
    except KeyboardInterrupt:
        print("squeeze: interrupted; earlier outputs were left as they were", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so staging folders are removed and locks released."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415
    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, handler)


class _ArgumentError(SqueezeError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        raise _ArgumentError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="squeeze",
        description="Compress an ONNX model with verified graph rewrites, compile it with TVM, and measure it. "
                    "Other commands: 'squeeze passes' and 'squeeze targets' list what is available.",
        epilog="Example: squeeze model.onnx --passes 'cleanup,fold-bn' --target cpu --eval test.npz")
    p.add_argument("model", nargs="?", help="the ONNX model to compress (never modified)")
    p.add_argument("--recipe", metavar="FILE", help="a .yaml/.toml recipe with the same settings as these flags "
                   "(flags given here override it)")
    p.add_argument("--passes", default=None, metavar="SPEC",
                   help="comma-separated passes, e.g. 'prune(ratio=0.5,criterion=fpgm),quant' (default: none)")
    p.add_argument("--target", default=None, metavar="LIST",
                   help="comma-separated targets to compile and measure on (default: cpu; 'none' skips)")
    p.add_argument("--calib", metavar="FILE.npz", help="calibration inputs (arrays named after the model inputs)")
    p.add_argument("--val", metavar="FILE.npz", help="validation data: what --max-drop and --goal choose on, "
                   "with the same ground truth keys as --eval (default: every 4th --calib sample, held out from fitting)")
    p.add_argument("--eval", metavar="FILE.npz", help="evaluation data, only reported (never used to choose), "
                   "optionally with ground truth: integer 'labels', string 'texts' or 'masks' arrays")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="output folder (default: MODEL_STEM.squeeze/ beside the model)")
    p.add_argument("--seed", type=int, default=None, help="seed for everything random (default 0)")
    p.add_argument("--input-shape", action="append", metavar="NAME=1x3x32x32",
                   help="concrete shape for an input with dynamic dimensions (repeatable)")
    p.add_argument("--threads", type=int, metavar="N", help="threads for ONNX Runtime and TVM (default: all cores)")
    p.add_argument("--max-drop", type=float, metavar="PTS",
                   help="accuracy guard: back passes off so the --metric drops at most PTS on the validation data "
                        "(points for accuracies, absolute for IoU and correlations)")
    p.add_argument("--metric", metavar="NAME", help="task metric of the report, --max-drop and --goal: top1, "
                   "ctc:DICT.txt, mask-iou[:THRESHOLD], agreement, rel-l2, attribution[:spearman|topK] "
                   "(default: top1 with integer labels, else agreement)")
    p.add_argument("--goal", metavar="GOAL",
                   help="compress to a budget, allocated per layer: size=8x (packed bytes), bytes=200k, macs=0.5, "
                        "latency=1.5x@cpu, comma-joined; using=prune+codebook picks the passes. Runs after "
                        "--passes; --max-drop bounds it")
    p.add_argument("--runs", type=int, default=None, metavar="N", help="timed runs per latency measurement (default 50)")
    p.add_argument("--rpc", metavar="HOST:PORT", help="measure device targets (arm, mobile-gpu, gpu, cpu) on the TVM "
                   "RPC server there (python -m tvm.exec.rpc_server on the device)")
    p.add_argument("--tracker", metavar="HOST:PORT", help="ask this TVM RPC tracker for a device (with --key)")
    p.add_argument("--key", metavar="KEY", help="the key the device's rpc_server registered with the tracker")
    p.add_argument("--tune", type=int, metavar="TRIALS", help="MetaSchedule trials for the targets that tune "
                   "(cpu, arm; timed on the device with --rpc/--tracker), cached and reused by later runs "
                   "(default 0: default schedules only)")
    p.add_argument("--batch", type=int, metavar="N", help="also report throughput (inferences/s on all cores) at "
                   "batch 1 and at batch N, each measured on its own build (cpu target, local or --rpc/--tracker)")
    p.add_argument("--tune-cache", metavar="DIR", help="tuning database folder (default $SQUEEZE_CACHE/tuning, "
                   "else ~/.cache/squeeze/tuning)")
    p.add_argument("--force", action="store_true", default=None, help="write into a non-empty output folder squeeze did not create")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"squeeze {__version__}")
    return p


# Values used when neither the command line nor a recipe sets them.
DEFAULTS = {"passes": "", "target": "cpu", "seed": 0, "runs": 50, "force": False}


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    recipe = {}
    if args.recipe:
        from .recipe import load  # noqa: PLC0415
        recipe = load(args.recipe)
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model is None:
        raise _ArgumentError("the following arguments are required: model (or a --recipe that names it)")
    if args.threads is not None and args.threads < 1:
        raise _ArgumentError("--threads must be at least 1")
    if args.runs < 1:
        raise _ArgumentError("--runs must be at least 1")
    if args.tune is not None and args.tune < 0:
        raise _ArgumentError("--tune must be 0 or more trials")
    if args.batch is not None and not 1 <= args.batch <= 4096:
        raise _ArgumentError("--batch must be between 1 and 4096")
    model = Path(args.model)
    out = Path(args.output) if args.output else model.with_name(model.stem + ".squeeze")
    from .runtime import cpu_count  # noqa: PLC0415
    threads = args.threads or cpu_count()
    from .api import compress  # noqa: PLC0415
    if not args.debug:  # ONNX Runtime logs the errors it raises (squeeze reports them) to stderr; graphsurgeon's
        import onnxruntime  # noqa: PLC0415   constant folding makes sessions of its own
        onnxruntime.set_default_logger_severity(4)
    progress = _Progress()
    targets = "" if args.target.strip().lower() == "none" else args.target
    result = compress(model, args.passes, calib=args.calib, val=args.val, eval=args.eval, targets=targets, seed=args.seed,
                      input_shapes=args.input_shape or [], threads=threads, runs=args.runs, out_dir=out,
                      force=args.force, max_drop=args.max_drop, progress=progress,
                      rpc=args.rpc, tracker=args.tracker, key=args.key, tune=args.tune, tune_cache=args.tune_cache,
                      batch=args.batch, goal=args.goal, metric=args.metric)
    progress.done()
    from .report import terminal_table  # noqa: PLC0415
    print(terminal_table(result.report))
    print(f"wrote {out / 'model.onnx'}, {out / 'report.json'}, {out / 'report.md'}, {out / 'report.html'}")
    if result.failure:
        if args.debug and result.exception is not None:
            raise result.exception
        print(f"squeeze: error: {result.failure} (kept the last good model)", file=sys.stderr)
        return 2
    return 0


class _Progress:
    """One self-overwriting status line on a terminal; silent when stderr is not a TTY (CI logs)."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty() and os.environ.get("CI") is None
        self.start = time.perf_counter()
        self.width = 0

    def __call__(self, message: str) -> None:
        if self.live:
            text = f"[{time.perf_counter() - self.start:6.1f}s] {message}"
            sys.stderr.write("\r" + text.ljust(self.width))
            sys.stderr.flush()
            self.width = len(text)

    def done(self) -> None:
        if self.live and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()


def _report_cmd(argv: list[str]) -> int:
    parser = _Parser(prog="squeeze report", description="Re-render report.md and report.html from report.json.")
    parser.add_argument("dir", help="a squeeze output folder")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    from .compare import rerender  # noqa: PLC0415
    for path in rerender(args.dir):
        print(f"wrote {path}")
    return 0


def _compare_cmd(argv: list[str]) -> int:
    parser = _Parser(prog="squeeze compare", description="Several runs side by side: size, MACs, accuracy, latency.")
    parser.add_argument("dirs", nargs="+", help="squeeze output folders")
    parser.add_argument("--html", metavar="FILE", help="also write a page with the table and plots")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    from .compare import markdown_table, plot_html, rows  # noqa: PLC0415
    table = rows(args.dirs)
    print(markdown_table(table))
    if args.html:
        from .model import write_text_atomic  # noqa: PLC0415
        write_text_atomic(args.html, plot_html(table))
        print(f"wrote {args.html}")
    return 0


def _doctor_cmd(argv: list[str]) -> int:
    parser = _Parser(prog="squeeze doctor", description="Which toolchains, emulators and devices each target "
                     "needs, and whether they are here.")
    parser.add_argument("--install", action="store_true", help="first run scripts/install-toolchains.sh (apt-get)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    from .registry import hook  # noqa: PLC0415
    return hook("doctor")(install=args.install)


def _pack_cmd(argv: list[str]) -> int:
    parser = _Parser(prog="squeeze pack", description="Write a model's deployable weights into a packed container "
                     "(bit-packed indices, Huffman coding); 'squeeze unpack' restores the model bit for bit.")
    parser.add_argument("model", help="the ONNX model to pack (never modified)")
    parser.add_argument("-o", "--output", metavar="FILE.sqz", help="container to write (default: MODEL.sqz)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    from .pack import describe, pack_file  # noqa: PLC0415
    out = Path(args.output) if args.output else Path(args.model).with_suffix(".sqz")
    print(describe(pack_file(args.model, out, force=args.force), out))
    return 0


def _unpack_cmd(argv: list[str]) -> int:
    parser = _Parser(prog="squeeze unpack", description="Restore the ONNX model from a 'squeeze pack' container.")
    parser.add_argument("packed", help="the container written by 'squeeze pack'")
    parser.add_argument("-o", "--output", metavar="MODEL.onnx", help="model to write (default: PACKED.onnx)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    from .pack import unpack_file  # noqa: PLC0415
    out = Path(args.output) if args.output else Path(args.packed).with_suffix(".onnx")
    unpack_file(args.packed, out, force=args.force)
    print(f"wrote {out}")
    return 0


def _inspect_cmd(argv: list[str]) -> int:
    parser = _Parser(prog="squeeze inspect", description="Print the model's channel groups: the channels that must "
                     "be pruned together, their members, and whether each group can be pruned (or why not).")
    parser.add_argument("model", help="the ONNX model to analyse (never modified)")
    parser.add_argument("--input-shape", action="append", metavar="NAME=1x3x32x32",
                        help="concrete shape for an input with dynamic dimensions (repeatable)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    from .data import input_specs, parse_shape_overrides  # noqa: PLC0415
    from .canonical import canonicalize  # noqa: PLC0415
    from .model import load_model  # noqa: PLC0415
    from .registry import hook  # noqa: PLC0415
    model, _ = canonicalize(load_model(args.model))  # the groups as passes see them: after the front end
    shapes = parse_shape_overrides(args.input_shape)
    if "" in shapes:
        shapes = {spec.name: shapes[""] for spec in input_specs(model)[:1]}
    print(hook("inspect-channels")(model, shapes))
    return 0


def _subcommand(name: str, argv: list[str]) -> int:
    if name == "inspect":
        return _inspect_cmd(argv)
    if name in ("pack", "unpack"):
        return _pack_cmd(argv) if name == "pack" else _unpack_cmd(argv)
    if name == "doctor":
        return _doctor_cmd(argv)
    if name == "report":
        return _report_cmd(argv)
    if name == "compare":
        return _compare_cmd(argv)
    parser = _Parser(prog=f"squeeze {name}", description=f"List the registered {name} and their parameters.")
    parser.add_argument("--debug", action="store_true")
    parser.parse_args(argv)
    from .registry import all_passes, all_targets  # noqa: PLC0415
    entries = all_passes() if name == "passes" else all_targets()
    for entry in sorted(entries.values(), key=lambda e: e.name):
        print(f"{entry.name}: {entry.summary}")
        for p in entry.params:
            bounds = f" in {p.range}" if p.range else ""
            default = str(p.default).lower() if isinstance(p.default, bool) else p.default
            print(f"    {p.name}: {p.type_name}{bounds} = {default}" + (f"  — {p.help}" if p.help else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
