"""Model inputs: specs, concrete shapes, calibration/evaluation data from .npz, and synthetic inputs.

A `Dataset` holds one array per model input with the samples on the first axis, plus optional integer labels.
`batches()` yields feeds the model accepts: slices along a leading batch dimension when the model has one that
is dynamic, otherwise one sample at a time.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper

from .errors import DataError

Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """One graph input that is not an initializer: its name, numpy dtype and (possibly symbolic) shape."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) and d > 0 for d in self.shape)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of `model` (initializers that old IR versions also list as inputs are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise DataError(f"input {value.name!r} is not a tensor; squeeze handles tensor inputs only")
        dims: list[Dim] = []
        for d in ttype.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(None)
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"input {value.name!r} has element type {ttype.elem_type}, which has no numpy "
                            "equivalent; squeeze cannot feed it") from None
        specs.append(InputSpec(value.name, dtype, tuple(dims)))
    return specs


def parse_shape_overrides(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse `--input-shape NAME=1x3x32x32` items (a bare `1x3x32x32` applies to a single-input model as `''`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or []:
        name, _, dims = item.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise DataError(f"--input-shape {item!r}: expected NAME=DxDxD, e.g. input=1x3x32x32") from None
        if not shape or any(d <= 0 for d in shape):
            raise DataError(f"--input-shape {item!r}: dimensions must be positive integers")
        shapes[name] = shape
    return shapes


def resolve_shapes(specs: list[InputSpec], overrides: dict[str, tuple[int, ...]],
                   data: "Dataset | None" = None) -> dict[str, tuple[int, ...]]:
    """Concrete shape (batch 1 where the batch is dynamic) for every input, from overrides, data or the model."""
    if "" in overrides:
        if len(specs) != 1:
            raise DataError("--input-shape without NAME= is only allowed for single-input models; "
                            f"inputs are: {', '.join(s.name for s in specs)}")
        overrides = {specs[0].name: overrides[""]}
    unknown = set(overrides) - {s.name for s in specs}
    if unknown:
        raise DataError(f"--input-shape names unknown input(s) {sorted(unknown)}; inputs are: "
                        f"{', '.join(s.name for s in specs)}")
    shapes = {}
    for spec in specs:
        if spec.name in overrides:
            shape = overrides[spec.name]
            if len(shape) != len(spec.shape) or any(isinstance(m, int) and m != d for m, d in zip(spec.shape, shape)):
                raise DataError(f"--input-shape {spec.name}={'x'.join(map(str, shape))} does not fit the model's "
                                f"shape {_fmt(spec.shape)}")
        elif spec.is_static:
            shape = tuple(spec.shape)  # type: ignore[arg-type]
        elif data is not None and spec.name in data.arrays:
            shape = data.sample_shape(spec)
        elif len(spec.shape) > 0 and all(isinstance(d, int) for d in spec.shape[1:]):
            shape = (1,) + tuple(spec.shape[1:])  # only the batch dimension is dynamic: use batch 1
        else:
            raise DataError(f"input {spec.name!r} has dynamic dimensions {_fmt(spec.shape)}; give them with "
                            f"--input-shape {spec.name}={'x'.join(str(d) if isinstance(d, int) else 'N' for d in spec.shape)}"
                            " or pass --calib data")
        shapes[spec.name] = shape
    return shapes


def _fmt(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


#: Every HOLDOUT_EVERY-th calibration sample is held out where a choice needs samples the fit did not see.
HOLDOUT_EVERY = 4


def holdout(n: int, every: int = HOLDOUT_EVERY) -> np.ndarray:
    """Boolean mask over `n` samples, True for the held-out ones: indices every−1, 2·every−1, ... (every 4th)."""
    if every < 2:
        raise ValueError("every must be at least 2")
    return np.arange(n) % every == every - 1


def _nth(k: int) -> str:
    return f"{k}{'nd' if k == 2 else 'rd' if k == 3 else 'th'}"


@dataclass
class Dataset:
    """Arrays named after the model inputs (samples on axis 0), optional ground truth, and where they came from.

    Ground truth, one entry per sample, for the task metrics (squeeze.task_metrics): `labels` (integer classes,
    top1), `texts` (strings, ctc), `masks` (arrays [N, ...], mask-iou).
    """

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "synthetic"
    # per input: True if each sample is fed with the model's own leading batch axis (arr[i:i+1]).
    stacked: dict[str, bool] = field(default_factory=dict)
    texts: np.ndarray | None = None
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        # A model without inputs has exactly one possible sample: the empty feed.
        return len(next(iter(self.arrays.values()))) if self.arrays else 1

    def sample_shape(self, spec: InputSpec) -> tuple[int, ...]:
        arr = self.arrays[spec.name]
        return (1,) + arr.shape[1:] if self.stacked.get(spec.name, True) else arr.shape[1:]

    def subset(self, start: int, stop: int | None = None) -> "Dataset":
        def part(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[start:stop]
        return Dataset({k: v[start:stop] for k, v in self.arrays.items()}, part(self.labels), self.source,
                       dict(self.stacked), part(self.texts), part(self.masks))

    def take(self, keep: np.ndarray, source: str) -> "Dataset":
        """The samples where the boolean mask `keep` is True (or at the given indices), described as `source`."""
        def part(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[keep]
        return Dataset({k: v[keep] for k, v in self.arrays.items()}, part(self.labels), source, dict(self.stacked),
                       part(self.texts), part(self.masks))

    def split_holdout(self, every: int = HOLDOUT_EVERY) -> tuple["Dataset", "Dataset"]:
        """(fit, held): every `every`-th sample (indices every−1, 2·every−1, ...) is held out, the rest fit.

        Deterministic and order-preserving; ground truth travels with its samples. Needs at least 2·every samples
        (else a DataError: the held-out part would be one sample or none).
        """
        n = len(self)
        if n < 2 * every:
            raise DataError(f"{self.source}: {n} sample(s) are too few to hold out every {_nth(every)} sample for "
                            f"validation (need at least {2 * every}); give more, or validation data with --val")
        held = holdout(n, every)
        return (self.take(~held, f"{self.source}: {int((~held).sum())} fitting samples (every {_nth(every)} held out)"),
                self.take(held, f"{self.source}: {int(held.sum())} held-out samples (every {_nth(every)})"))

    def samples(self, count: int) -> list[dict[str, np.ndarray]]:
        """The first `count` samples, each as a single-sample feed (batch 1 where the model has a batch axis)."""
        feeds = []
        for i in range(min(count, len(self))):
            feeds.append({k: (v[i:i + 1] if self.stacked.get(k, True) else np.asarray(v[i])) for k, v in self.arrays.items()})
        return feeds

    def batches(self, specs: list[InputSpec], max_batch: int = 64) -> Iterator[dict[str, np.ndarray]]:
        """Feeds for the model: whole batches along a dynamic leading axis, else one sample per feed."""
        dynamic_batch = all(self.stacked.get(s.name, True) and s.shape and not isinstance(s.shape[0], int)
                            for s in specs)
        step = max_batch if dynamic_batch else 1
        for start in range(0, len(self), step):
            feed = {}
            for spec in specs:
                arr = self.arrays[spec.name]
                # np.asarray: a rank-0 input's sample is a numpy scalar, which ONNX Runtime does not take
                feed[spec.name] = arr[start:start + step] if self.stacked.get(spec.name, True) else np.asarray(arr[start])
            yield feed


def load_npz(path: str | Path, specs: list[InputSpec], shapes: dict[str, tuple[int, ...]] | None = None) -> Dataset:
    """Load calibration/eval data: arrays named after the inputs (or one unnamed array), optional ground truth
    `labels` (integers), `texts` (strings) and `masks` (arrays), one per sample."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    # np.load takes anything: a .npy array, or a pickle (refused with allow_pickle=False, in words about pickles).
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a readable .npz file (not a zip archive; write it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except Exception as exc:  # corrupt members raise zlib.error, BadZipFile, ValueError, EOFError, SyntaxError ...
        raise DataError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    names = [s.name for s in specs]
    # Ground truth keys; an input that happens to have one of these names is an input.
    labels, texts, masks = (raw.pop(key) if key in raw and key not in names else None for key in TRUTH_KEYS)
    if len(specs) == 1 and specs[0].name not in raw and len(raw) == 1:
        raw = {specs[0].name: next(iter(raw.values()))}
    missing = [n for n in names if n not in raw]
    if missing:
        raise DataError(f"{path}: no array for input(s) {missing}; the file has {sorted(raw) or 'no arrays'} "
                        f"(name arrays after the model inputs: {names}, plus optional {_truth_keys()})")
    extra = sorted(set(raw) - set(names))
    if extra:
        raise DataError(f"{path}: arrays {extra} match no model input (inputs: {names}, plus optional {_truth_keys()})")
    arrays, stacked, count = {}, {}, None
    for spec in specs:
        arr = raw[spec.name]
        if arr.ndim == 0:
            raise DataError(f"{path}: array {spec.name!r} is a scalar; the first axis must be the samples")
        rank = len(spec.shape)
        if arr.ndim == rank:
            stacked[spec.name] = True
            sample = (1,) + arr.shape[1:]
        elif arr.ndim == rank + 1:
            stacked[spec.name] = False
            sample = arr.shape[1:]
        else:
            raise DataError(f"{path}: array {spec.name!r} has shape {list(arr.shape)}, but the model expects "
                            f"samples of shape {_fmt(spec.shape)} (first axis = samples)")
        want = shapes.get(spec.name) if shapes else None
        first = 1 if stacked[spec.name] else 0
        fixed = [m if isinstance(m, int) else None for m in spec.shape]
        if want:
            fixed = list(want)
        if any(m is not None and m != d for m, d in zip(fixed[first:], sample[first:])):
            raise DataError(f"{path}: array {spec.name!r} has samples of shape {list(sample)}, but the model "
                            f"expects {_fmt(want or spec.shape)}")
        if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
            raise DataError(f"{path}: array {spec.name!r} has non-numeric dtype {arr.dtype}")
        if arr.dtype.kind == "c":
            raise DataError(f"{path}: array {spec.name!r} has complex dtype {arr.dtype}; give real numbers")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # every fidelity and calibration figure would be NaN
            raise DataError(f"{path}: array {spec.name!r} holds {int((~np.isfinite(arr)).sum())} NaN or infinite "
                            "value(s); give finite inputs")
        arrays[spec.name] = np.ascontiguousarray(arr.astype(spec.dtype, copy=False))
        if count is not None and len(arr) != count:
            raise DataError(f"{path}: arrays have different sample counts ({count} vs {len(arr)} for {spec.name!r})")
        count = len(arr)
    if count == 0:
        raise DataError(f"{path}: the arrays hold no samples")
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1 or len(labels) != count:
            raise DataError(f"{path}: 'labels' must be a 1-D integer array with one label per sample ({count})")
        labels = labels.astype(np.int64)
    return Dataset(arrays, labels, f"{path} ({count} samples)", stacked, _texts(texts, path, count),
                   _masks(masks, path, count))


TRUTH_KEYS = ("labels", "texts", "masks")


def _truth_keys() -> str:
    return ", ".join(repr(k) for k in TRUTH_KEYS)


def _texts(texts: np.ndarray | None, path: Path, count: int) -> np.ndarray | None:
    """`texts`: one string per sample (numpy unicode, or UTF-8 bytes)."""
    if texts is None:
        return None
    if texts.dtype.kind not in "US" or texts.ndim != 1 or len(texts) != count:
        raise DataError(f"{path}: 'texts' must be a 1-D array of strings with one text per sample ({count}); it has "
                        f"dtype {texts.dtype} and shape {list(texts.shape)}")
    if texts.dtype.kind == "S":
        try:
            return np.array([t.decode("utf-8") for t in texts])
        except UnicodeDecodeError:
            raise DataError(f"{path}: 'texts' holds bytes that are not UTF-8; save the strings as str") from None
    return texts


def _masks(masks: np.ndarray | None, path: Path, count: int) -> np.ndarray | None:
    """`masks`: one numeric (or boolean) array per sample, samples on the first axis."""
    if masks is None:
        return None
    if masks.ndim < 2 or len(masks) != count:
        raise DataError(f"{path}: 'masks' must hold one mask per sample on the first axis ({count}, H, W); it has "
                        f"shape {list(masks.shape)}")
    if masks.dtype.kind not in "biuf":
        raise DataError(f"{path}: 'masks' has dtype {masks.dtype}; give numbers (1 inside, 0 outside) or booleans")
    if masks.dtype.kind == "f" and not np.isfinite(masks).all():
        raise DataError(f"{path}: 'masks' holds NaN or infinite values")
    return masks


def synthesize(specs: list[InputSpec], shapes: dict[str, tuple[int, ...]], count: int, seed: int) -> Dataset:
    """Random inputs from the specs: N(0,1) for floats, small non-negative integers for integer inputs."""
    rng = np.random.default_rng(seed)
    arrays, stacked = {}, {}
    for spec in specs:
        shape = shapes[spec.name]
        # A leading dimension of 1 is the batch: stack samples along it; otherwise each sample is a whole feed.
        stacked[spec.name] = len(shape) > 0 and shape[0] == 1
        full = (count,) + (shape[1:] if stacked[spec.name] else shape)
        if spec.dtype.kind == "f":
            arr = rng.standard_normal(full).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            arr = rng.integers(0, 2, full).astype(spec.dtype)
        else:
            arr = rng.integers(0, 4, full).astype(spec.dtype)
        arrays[spec.name] = arr
    return Dataset(arrays, None, f"synthetic (N(0,1), seed {seed}, {count} samples)", stacked)
