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

SUBCOMMANDS = ("passes", "targets", "report", "compare")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _interrupt_on_sigterm()
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return _subcommand(argv[0], argv[1:])
        return _run(argv)
    except SqueezeError as exc:
        if debug:
            raise
        print(f"squeeze: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("squeeze: interrupted; earlier outputs were left as they were", file=sys.stderr)
        return 130


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
    p.add_argument("--eval", metavar="FILE.npz", help="evaluation inputs, optionally with integer 'labels'")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="output folder (default: MODEL_STEM.squeeze/ beside the model)")
    p.add_argument("--seed", type=int, default=None, help="seed for everything random (default 0)")
    p.add_argument("--input-shape", action="append", metavar="NAME=1x3x32x32",
                   help="concrete shape for an input with dynamic dimensions (repeatable)")
    p.add_argument("--threads", type=int, metavar="N", help="threads for ONNX Runtime and TVM (default: all cores)")
    p.add_argument("--max-drop", type=float, metavar="PTS",
                   help="accuracy guard: back passes off so top-1 drops at most PTS points (else disagreement)")
    p.add_argument("--runs", type=int, default=None, metavar="N", help="timed runs per latency measurement (default 50)")
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
    model = Path(args.model)
    out = Path(args.output) if args.output else model.with_name(model.stem + ".squeeze")
    from .runtime import cpu_count  # noqa: PLC0415
    threads = args.threads or cpu_count()
    from .api import compress  # noqa: PLC0415
    progress = _Progress()
    targets = "" if args.target.strip().lower() == "none" else args.target
    result = compress(model, args.passes, calib=args.calib, eval=args.eval, targets=targets, seed=args.seed,
                      input_shapes=args.input_shape or [], threads=threads, runs=args.runs, out_dir=out,
                      force=args.force, max_drop=args.max_drop, progress=progress)
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


def _subcommand(name: str, argv: list[str]) -> int:
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
