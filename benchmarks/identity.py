"""Which output models a code change altered: sha256 of every corpus model × pipeline of BENCHMARKS.md's main table.

    python benchmarks/identity.py --out /tmp/after.json                      # this checkout
    python benchmarks/identity.py --code /tmp/wt_before --out /tmp/before.json  # another checkout (git worktree)
    python benchmarks/identity.py --compare /tmp/before.json /tmp/after.json

A restructuring must not change what squeeze writes (issue 20): run this before and after and compare. With
`--code DIR` the squeeze package is imported from the checkout DIR (a `git worktree add DIR COMMIT`) instead of
the installed one, so two commits are compared with one environment; the corpus loaders and pipelines are this
file's. Data as in benchmarks/run.py: the first 256 samples calibrate (SqueezeNet: 32 random images), seed 0, no
evaluation set and no target (neither changes the model).
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _import_from(code: Path) -> None:
    """Make `import squeeze` load the checkout `code`: a folder laid out as the installed package (core files,
    with passes/ and targets/ inside) made of links to the checkout, first on sys.path."""
    folder = tempfile.mkdtemp(prefix="squeeze-identity-")
    atexit.register(shutil.rmtree, folder, True)  # links only: removing them leaves the checkout untouched
    shim = Path(folder) / "squeeze"
    shim.mkdir()
    for item in (code / "squeeze").iterdir():
        (shim / item.name).symlink_to(item.resolve())
    (shim / "passes").symlink_to((code / "passes").resolve())
    (shim / "targets").symlink_to((code / "targets").resolve())
    sys.path.insert(0, str(shim.parent))
    import squeeze  # noqa: PLC0415
    import squeeze.passes  # noqa: PLC0415, F401
    import squeeze.targets  # noqa: PLC0415, F401
    for name in ("squeeze", "squeeze.passes", "squeeze.targets"):
        where = Path(sys.modules[name].__file__)
        assert where.resolve().is_relative_to(code.resolve()), f"{name} from {where}, not {code}"


def hashes(models: list[str], pipelines: list[str], out_file: Path | None = None) -> dict[str, str]:
    """sha256 (16 hex digits) of each model × pipeline's output; written to `out_file` after every cell, so a
    stopped run keeps what it finished."""
    sys.path.insert(0, str(HERE))
    import run  # noqa: PLC0415  (benchmarks/run.py: the main table's data and pipelines)

    import squeeze  # noqa: PLC0415
    out = {}
    for model in models:
        calib, _ = run._data(model, None)
        for pipeline in pipelines:
            start = time.perf_counter()
            why = run._applicable(pipeline, model)
            if why:
                out[f"{model} | {pipeline}"] = why
                continue
            try:
                result = squeeze.compress(run.corpus.model_path(model), pipeline, calib=calib, targets="", seed=0)
                digest = hashlib.sha256(result.model.SerializeToString()).hexdigest()[:16]
                if result.failure:
                    digest += f" (failed: {result.failure[:80]})"
            except Exception as exc:  # noqa: BLE001 - recorded, compared like a digest
                digest = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            out[f"{model} | {pipeline}"] = digest
            print(f"{model} | {pipeline}: {digest}  ({time.perf_counter() - start:.1f} s)", flush=True)
            if out_file:
                out_file.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return out


def compare(before: dict, after: dict) -> int:
    same = [k for k in before if after.get(k) == before[k]]
    differ = [k for k in before if k in after and after[k] != before[k]]
    print(f"identical: {len(same)} of {len(before)}")
    for k in differ:
        print(f"DIFFERENT: {k}: {before[k]} → {after[k]}")
    for k in sorted(set(before) ^ set(after)):
        print(f"only in one: {k}")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", type=Path, help="import squeeze from this checkout (default: the installed one)")
    ap.add_argument("--models", nargs="*", help="corpus models (default: benchmarks/run.py's MODELS)")
    ap.add_argument("--pipelines", nargs="*", help="pipelines (default: benchmarks/run.py's PIPELINES)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*(json.loads(p.read_text()) for p in args.compare))
    if args.code:
        _import_from(args.code)
    sys.path.insert(0, str(HERE))
    import run  # noqa: PLC0415
    result = hashes(args.models or run.MODELS, args.pipelines or run.PIPELINES, args.out)
    if not args.out:
        print(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
