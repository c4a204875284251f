"""Recipe files (`--recipe recipe.yaml` or `.toml`): the same pipeline as the flags, under version control.

    model: models/digits_cnn.onnx          # paths are relative to the recipe file
    passes:                                # a spec string, or a list of specs / {name: {param: value}}
      - cleanup
      - fold-bn: {}
    target: cpu                            # string or list
    calib: models/digits_calib.npz
    eval: models/digits_test.npz
    output: digits.squeeze
    seed: 0
    max_drop: 1.0
    metric: top1                           # or ctc:dict.txt (relative to the recipe), mask-iou:0.2, ...
    input_shape: {input: 1x1x8x8}

Flags given on the command line override the recipe.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .errors import SqueezeError

KEYS = {"model", "passes", "target", "targets", "calib", "val", "eval", "output", "seed", "max_drop", "input_shape",
        "threads", "runs", "force", "goal", "metric"}
PATH_KEYS = ("model", "calib", "val", "eval", "output")


class RecipeError(SqueezeError):
    pass


def load(path: str | Path) -> dict[str, Any]:
    """Read a recipe into CLI-shaped values (passes/targets as spec strings, paths resolved)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # noqa: PLC0415
            data = yaml.safe_load(text)
        else:
            raise RecipeError(f"{path}: a recipe must be .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise RecipeError(f"{path}: cannot parse: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # yaml.YAMLError and friends
        if type(exc).__module__.startswith("yaml"):
            raise RecipeError(f"{path}: cannot parse: {str(exc).splitlines()[0]}") from None
        raise
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of settings")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise RecipeError(f"{path}: unknown setting(s) {unknown}; valid: {', '.join(sorted(KEYS))}")
    out: dict[str, Any] = dict(data)
    if "targets" in out:
        out["target"] = out.pop("targets")
    for key in PATH_KEYS:
        if key in out and out[key] is not None:
            out[key] = str((path.parent / str(out[key])))
    if "passes" in out:
        out["passes"] = _spec(out["passes"], path, "passes")
    if "target" in out:
        out["target"] = _spec(out["target"], path, "target")
    if "metric" in out:
        out["metric"] = _metric(out["metric"], path)
    if "goal" in out:
        goal = out["goal"]
        if isinstance(goal, dict):  # goal: {size: 8x, using: prune+codebook}
            goal = ",".join(f"{k}={v}" for k, v in goal.items())
        if not isinstance(goal, str):
            raise RecipeError(f"{path}: goal must be a string like 'size=8x' or a mapping like {{size: 8x}}")
        out["goal"] = goal
    if "input_shape" in out:
        shapes = out["input_shape"]
        if isinstance(shapes, dict):
            out["input_shape"] = [f"{k}={v}" for k, v in shapes.items()]
        elif isinstance(shapes, str):
            out["input_shape"] = [shapes]
    return out


def _metric(value: Any, path: Path) -> str:
    """`metric: ctc:dict.txt` (a dictionary path relative to the recipe) or `metric: {ctc: dict.txt}`."""
    if isinstance(value, dict) and len(value) == 1:
        (name, arg), = value.items()
        value = f"{name}:{arg}" if arg is not None else str(name)
    if not isinstance(value, str):
        raise RecipeError(f"{path}: metric must be a string like 'ctc:dict.txt' or a mapping like {{ctc: dict.txt}}")
    name, colon, arg = value.partition(":")
    if name.strip().lower() == "ctc" and arg.strip():
        return f"{name}:{path.parent / arg.strip()}"
    return value


def _spec(value: Any, path: Path, key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RecipeError(f"{path}: '{key}' must be a spec string or a list")
    items = []
    for item in value:
        if isinstance(item, str):
            items.append(item)
        elif isinstance(item, dict) and len(item) == 1:
            (name, params), = item.items()
            params = params or {}
            if not isinstance(params, dict):
                raise RecipeError(f"{path}: parameters of {name!r} must be a mapping")
            items.append(name + ("(" + ",".join(f"{k}={_literal(v)}" for k, v in params.items()) + ")" if params else ""))
        else:
            raise RecipeError(f"{path}: each entry of '{key}' is a spec string or {{name: {{param: value}}}}")
    return ",".join(items)


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_literal(k)}:{_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def arguments(path: str | Path) -> dict[str, Any]:
    """A recipe as keyword arguments for `squeeze.compress` (the Python twin of `squeeze --recipe`)."""
    r = load(path)
    if "model" not in r:
        raise RecipeError(f"{path}: the recipe names no model")
    names = {"model": "model", "passes": "passes", "target": "targets", "calib": "calib", "val": "val", "eval": "eval",
             "output": "out_dir", "seed": "seed", "max_drop": "max_drop", "input_shape": "input_shapes",
             "threads": "threads", "runs": "runs", "force": "force", "goal": "goal", "metric": "metric"}
    return {names[k]: v for k, v in r.items()}
