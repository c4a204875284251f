"""Task metrics: one interface for the report, the accuracy guard (`--max-drop`) and `--goal`.

A metric scores a model's outputs on a dataset and says which way is better; the *drop* is how much worse the
compressed model is than the original, in the metric's own units (points for accuracies, absolute for IoU and
correlations). Every score carries n and its standard error, so a reader can tell a drop from noise.

`--metric NAME`:

- `top1` — top-1 accuracy of the first class-score output against integer `labels`.
- `ctc[:DICT]` — greedy CTC decoding of an [N, T, classes] output (argmax per step, repeats collapsed, index 0 =
  blank; index i = line i of DICT, the index after the last line = space: the PaddleOCR convention), scored by
  character accuracy against `texts`: 1 − Σ edit distance / Σ truth length over the set (1 − CER). DICT is a text file
  with one character per line, or a PaddleOCR `inference.yml` (its `character_dict`); without DICT, the
  `inference.yml` beside the model is used when it has one.
- `mask-iou[:THRESHOLD]` — the output map > THRESHOLD (default 0.5) against `masks` [N, H, W]; mean IoU over samples.
- `agreement` — top-1 agreement with the original model's class scores (no labels needed).
- `rel-l2` — relative L2 error of the outputs against the original model's, in % (lower is better).
- `attribution[:spearman|topK]` — how far compression deforms the model's input attributions: forward-only
  occlusion saliency (Zeiler & Fergus 2014) computed with ONNX Runtime on the first few samples, compared with the
  original model's maps by Spearman rank correlation (default) or the overlap of the K most salient cells.

Without `--metric`: `top1` when the data has integer labels and the model class scores, else `agreement` when an
output looks like class scores, else `rel-l2` — what the guard always did.
"""
from __future__ import annotations

import difflib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from . import runtime, verify
from .data import Dataset, input_specs
from .errors import SqueezeError

NAMES = ("top1", "ctc", "mask-iou", "agreement", "rel-l2", "attribution")
ALIASES = {"top-1": "top1", "accuracy": "top1", "iou": "mask-iou", "mask_iou": "mask-iou", "miou": "mask-iou",
           "rel_l2": "rel-l2", "rell2": "rel-l2", "l2": "rel-l2", "agree": "agreement"}
DEFAULT_IOU_THRESHOLD = 0.5
ATTRIBUTION_SAMPLES = 8   #: samples whose occlusion maps are compared (each costs cells + 1 runs per model)
ATTRIBUTION_CELLS = 8     #: occlusion cells per occluded axis (8 × 8 on images, 8 on vectors)


class MetricError(SqueezeError):
    """A --metric is unknown, malformed, or does not fit the model's outputs or the data."""


@dataclass(frozen=True)
class Score:
    """A metric's value on one model and dataset, with n and the standard error of the value.

    `samples` holds the per-sample values when the value is their (weighted) mean, `weights` their weights when
    not all 1 (paired comparisons use both).
    """

    value: float
    n: int
    stderr: float | None
    samples: np.ndarray | None = None
    weights: np.ndarray | None = None


@dataclass
class Evaluated:
    """A model and its outputs on the metric's data; `cache` keeps what a metric derived from them (saliency)."""

    model: onnx.ModelProto | None
    outputs: dict[str, np.ndarray]
    threads: int | None = None
    cache: dict[str, Any] = field(default_factory=dict)


Compute = Callable[[Evaluated, Evaluated, Dataset], Score]


@dataclass(frozen=True)
class Metric:
    """A named task metric: how to score (`compute(candidate, original, data)`), which way is better, its units.

    `percent`: the value is a fraction shown in %, and drops are in points; otherwise drops are absolute.
    `needs`: the Dataset field it scores against (`labels`, `texts`, `masks`), or None (compares with the
    original model's outputs).
    """

    name: str
    spec: str
    label: str
    higher_is_better: bool
    percent: bool
    needs: str | None
    compute: Compute

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"

    @property
    def drop_unit(self) -> str:
        return "pts" if self.percent else "absolute"

    @property
    def basis(self) -> str:
        """What a guard or goal drop means, for the report."""
        if self.name == "top1":
            return "top-1 points on labelled data"
        against = "vs the original model" if self.needs is None else f"vs '{self.needs}'"
        return f"{self.label}, {self.drop_unit} ({against})"

    def drop(self, original: Score, candidate: Score) -> float:
        """How much worse `candidate` is than `original` (positive = worse), in points or absolute units."""
        delta = original.value - candidate.value if self.higher_is_better else candidate.value - original.value
        return (100.0 if self.percent else 1.0) * delta

    def drop_stderr(self, original: Score, candidate: Score) -> float | None:
        """Standard error of the drop: paired over samples when both scores have them, else from the two stderrs."""
        scale = 100.0 if self.percent else 1.0
        a, b = original.samples, candidate.samples
        if a is not None and b is not None and len(a) == len(b) and len(a) > 1:
            same = (original.weights is None and candidate.weights is None) or (
                original.weights is not None and candidate.weights is not None
                and np.array_equal(original.weights, candidate.weights))
            if same:
                return scale * mean_score(a - b, original.weights).stderr  # type: ignore[operator]
        if original.stderr is None or candidate.stderr is None:
            return None
        return scale * math.hypot(original.stderr, candidate.stderr)

    def show(self, score: Score) -> str:
        """`82.23 % ± 1.10` or `0.483 ± 0.021`."""
        if self.percent:
            se = "" if score.stderr is None else f" ± {100 * score.stderr:.2f}"
            return f"{100 * score.value:.2f} %{se}"
        se = "" if score.stderr is None else f" ± {score.stderr:.3f}"
        return f"{score.value:.3f}{se}"

    def show_drop(self, drop: float) -> str:
        return f"{drop:.2f} pts" if self.percent else f"{drop:.4f}"


# ------------------------------------------------------------------------------------------ parsing


def parse_metric(text: str, model_path: str | Path | None = None) -> Metric:
    """A Metric from `--metric NAME[:ARG]`; a bad name or argument raises a one-line MetricError.

    `model_path` lets bare `ctc` find the PaddleOCR `inference.yml` beside the model.
    """
    raw = text.strip()
    name, _, arg = raw.partition(":")
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    arg = arg.strip()
    if name not in NAMES:
        close = difflib.get_close_matches(name, NAMES + tuple(ALIASES), n=1)
        hint = f" (did you mean {ALIASES.get(close[0], close[0])!r}?)" if close else ""
        raise MetricError(f"--metric {raw!r}: unknown metric{hint}; choose from {', '.join(NAMES)}")
    if name in ("top1", "agreement", "rel-l2") and arg:
        raise MetricError(f"--metric {raw!r}: {name} takes no argument")
    if name == "top1":
        return Metric("top1", raw, "top-1", True, True, "labels", _top1)
    if name == "agreement":
        return Metric("agreement", raw, "top-1 agreement", True, True, None, _agreement)
    if name == "rel-l2":
        return Metric("rel-l2", raw, "rel. L2 error", False, True, None, _rel_l2)
    if name == "ctc":
        return ctc_metric(_dictionary_path(raw, arg, model_path), raw)
    if name == "mask-iou":
        return mask_iou_metric(_threshold(raw, arg), raw)
    return attribution_metric(*_attribution_mode(raw, arg), spec=raw)


def resolve_metric(value: "str | Metric | Callable | None", model_path: str | Path | None = None) -> Metric | None:
    """`compress(metric=...)`: a name, a Metric, or a callable `fn(outputs, data) -> number or per-sample array`
    (higher is better); None keeps the default (chosen from the data and outputs by `default_metric`)."""
    if value is None or isinstance(value, Metric):
        return value
    if isinstance(value, str):
        return parse_metric(value, model_path) if value.strip() else None
    if callable(value):
        return callable_metric(value)
    raise MetricError(f"metric must be a name such as 'ctc:dict.txt', a Metric or a callable, not {type(value).__name__}")


def default_metric(outputs: dict[str, np.ndarray], data: Dataset | None) -> Metric:
    """top1 with integer labels and a class-score output, else agreement with class scores, else rel-l2."""
    if data is not None and data.labels is not None and verify.accuracy(outputs, data.labels) is not None:
        return parse_metric("top1")
    if any(verify.looks_like_scores(v) for v in outputs.values()):
        return parse_metric("agreement")
    return parse_metric("rel-l2")


def callable_metric(fn: Callable, name: str | None = None, higher_is_better: bool = True) -> Metric:
    """Wrap `fn(outputs, data)` returning a number or one number per sample (then mean ± stderr)."""
    label = name or getattr(fn, "__name__", "custom")

    def compute(candidate: Evaluated, original: Evaluated, data: Dataset) -> Score:
        result = np.asarray(fn(candidate.outputs, data), dtype=np.float64)
        if result.ndim == 0:
            return Score(float(result), len(data), None)
        if result.ndim == 1 and len(result) == len(data):
            return mean_score(result)
        raise MetricError(f"metric {label!r} returned shape {list(result.shape)}; return a number or one number "
                          f"per sample ({len(data)})")

    return Metric(label, label, f"{label} (custom)", higher_is_better, False, None, compute)


def _dictionary_path(raw: str, arg: str, model_path: str | Path | None) -> Path:
    if arg:
        path = Path(arg).expanduser()
        if not path.is_file():
            raise MetricError(f"--metric {raw!r}: dictionary {arg} not found (give a text file with one character "
                              "per line, or a PaddleOCR inference.yml)")
        return path
    beside = Path(model_path).parent / "inference.yml" if model_path else None
    if beside is not None and beside.is_file():
        return beside
    raise MetricError(f"--metric {raw!r}: ctc needs a dictionary: --metric ctc:DICT.txt (one character per line, "
                      "or a PaddleOCR inference.yml)")


def _threshold(raw: str, arg: str) -> float:
    if not arg:
        return DEFAULT_IOU_THRESHOLD
    try:
        value = float(arg)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise MetricError(f"--metric {raw!r}: the threshold must be a number, e.g. mask-iou:0.2")
    return value


def _attribution_mode(raw: str, arg: str) -> tuple[str, int]:
    mode = arg.lower() or "spearman"
    if mode == "spearman":
        return "spearman", 0
    if mode.startswith("top") and mode[3:].isdigit() and int(mode[3:]) >= 1:
        return "top", int(mode[3:])
    raise MetricError(f"--metric {raw!r}: attribution compares maps by 'spearman' or 'topK' (e.g. attribution:top5)")


# ------------------------------------------------------------------------------------------ scoring


def mean_score(values: np.ndarray, weights: np.ndarray | None = None) -> Score:
    """(Weighted) mean of per-sample values with its standard error; None below two samples.

    Unweighted: sample std / √n. Weighted (v = Σwx / Σw, a ratio of sums): the ratio estimator's
    se = √(n/(n−1) · Σ w²(x − v)²) / Σw, which is the same formula with every w = 1.
    """
    values = np.asarray(values, dtype=np.float64)
    w = np.ones(len(values)) if weights is None else np.asarray(weights, dtype=np.float64)
    n, total = len(values), float(w.sum())
    if n == 0 or total <= 0:
        return Score(float("nan"), n, None, values, None if weights is None else w)
    value = float((w * values).sum() / total)
    stderr = math.sqrt(n / (n - 1) * float((w * w * (values - value) ** 2).sum())) / total if n > 1 else None
    return Score(value, n, stderr, values, None if weights is None else w)


#: Below this many discordant samples McNemar's test uses the exact binomial; from it, chi-square with continuity
#: correction (the usual rule: the normal approximation is poor for b + c < 25).
MCNEMAR_EXACT_BELOW = 25


def mcnemar(original: np.ndarray, candidate: np.ndarray) -> dict:
    """McNemar's paired test of two classifiers on the same samples (per-sample correct = 1, wrong = 0).

    b = samples the original got right and the candidate wrong, c = the reverse. Under "same accuracy" each
    discordant sample goes either way with probability ½: two-sided p = min(1, 2 · P(X ≤ min(b, c))), X ~ Bin(b + c, ½)
    for b + c < MCNEMAR_EXACT_BELOW; else χ² = (|b − c| − 1)² / (b + c) with one degree of freedom.
    """
    a, c_ = np.asarray(original).astype(bool), np.asarray(candidate).astype(bool)
    if a.shape != c_.shape:
        raise ValueError(f"McNemar needs paired samples; got {a.shape} and {c_.shape}")
    b, c = int((a & ~c_).sum()), int((~a & c_).sum())
    n = b + c
    if n == 0:
        return {"test": "McNemar", "method": "exact binomial", "b": 0, "c": 0, "n": int(a.size), "p": 1.0}
    if n < MCNEMAR_EXACT_BELOW:
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
        return {"test": "McNemar", "method": "exact binomial", "b": b, "c": c, "n": int(a.size),
                "p": min(1.0, 2 * tail)}
    chi2 = (abs(b - c) - 1) ** 2 / n
    return {"test": "McNemar", "method": "chi-square, continuity-corrected", "b": b, "c": c, "n": int(a.size),
            "statistic": chi2, "p": math.erfc(math.sqrt(chi2 / 2))}


def paired_test(metric: "Metric", original: Score, candidate: Score) -> dict | None:
    """The paired test of `candidate` against `original` on the same samples.

    Binary per-sample scores (top-1, agreement): McNemar. Otherwise (character accuracy, IoU, rel-L2, custom) a
    z test of the drop over its paired standard error (the per-sample differences'), two-sided normal p.
    None when neither is possible (no per-sample scores and no standard errors).
    """
    a, b = original.samples, candidate.samples
    if (a is not None and b is not None and len(a) == len(b) and original.weights is None
            and candidate.weights is None and np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()):
        return mcnemar(a, b)
    drop, se = metric.drop(original, candidate), metric.drop_stderr(original, candidate)
    if se is None:
        return None
    if se == 0:
        return {"test": "paired z", "se": 0.0, "z": None, "p": 1.0 if drop == 0 else 0.0}
    z = drop / se
    return {"test": "paired z", "se": se, "z": z, "p": math.erfc(abs(z) / math.sqrt(2))}


def _top1(candidate: Evaluated, original: Evaluated, data: Dataset) -> Score:
    assert data.labels is not None
    acc = verify.accuracy(candidate.outputs, data.labels)
    if acc is None:
        raise MetricError(f"--metric top1: no output looks like class scores [N, C] with one row per label; outputs: "
                          f"{_shapes(candidate.outputs)}")
    return mean_score(acc["correct"].astype(np.float64))


def _agreement(candidate: Evaluated, original: Evaluated, data: Dataset) -> Score:
    names = [k for k, v in original.outputs.items() if verify.looks_like_scores(v)]
    # one row per sample: an output that is not per sample (a constant output, say) cannot agree row by row
    per_sample = [k for k in names if len(original.outputs[k]) == len(data)]
    names = per_sample or names[:1]
    if not names:
        raise MetricError(f"--metric agreement: no output looks like class scores [N, C] (outputs: "
                          f"{_shapes(original.outputs)}); use --metric rel-l2")
    agree = np.ones(len(original.outputs[names[0]]), bool)
    for name in names:
        ref, new = original.outputs[name], candidate.outputs[name]
        agree &= ref.reshape(len(ref), -1).argmax(1) == new.reshape(len(new), -1).argmax(1)
    return mean_score(agree.astype(np.float64))


def _rel_l2(candidate: Evaluated, original: Evaluated, data: Dataset) -> Score:
    """The worst output's relative L2 error over all samples (as verify.fidelity), stderr by the delta method."""
    worst: Score | None = None
    for name, ref in original.outputs.items():
        new = candidate.outputs[name]
        if ref.shape != new.shape:
            raise MetricError(f"--metric rel-l2: output {name!r} changed shape {list(ref.shape)} → {list(new.shape)}")
        score = relative_l2(ref, new)
        if worst is None or score.value > worst.value:
            worst = score
    return worst if worst is not None else Score(0.0, len(data), None)


def relative_l2(reference: np.ndarray, candidate: np.ndarray) -> Score:
    """‖candidate − reference‖ / ‖reference‖ over all samples, with the ratio estimator's standard error.

    With per-sample a_i = ‖d_i‖², b_i = ‖r_i‖², R = Σa/Σb and the value √R: se(R)² ≈ n/(n−1) Σ(a_i − R b_i)² / (Σb)²,
    se(√R) = se(R) / (2√R).
    """
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    diff = candidate.astype(np.float64).reshape(len(candidate), -1) - ref
    finite = np.isfinite(diff) & np.isfinite(ref)
    a = (np.where(finite, diff, 0.0) ** 2).sum(1)
    b = (np.where(finite, ref, 0.0) ** 2).sum(1)
    total = max(float(b.sum()), 1e-60)
    ratio = float(a.sum()) / total
    value = math.sqrt(ratio)
    n = len(a)
    if n < 2:
        return Score(value, n, None)
    se_ratio = math.sqrt(n / (n - 1) * float(((a - ratio * b) ** 2).sum())) / total
    return Score(value, n, se_ratio / (2 * value) if value > 0 else 0.0)


# ------------------------------------------------------------------------------------------ CTC


def ctc_metric(dictionary: str | Path, spec: str | None = None) -> Metric:
    """Character accuracy of greedy CTC decoding against `texts`, with the characters of `dictionary`.

    Over the whole set: 1 − Σ edit distance / Σ truth length (1 − CER; the per-line accuracies weighted by the
    lines' lengths), so a long line counts by its characters.
    """
    chars = load_dictionary(dictionary)

    def compute(candidate: Evaluated, original: Evaluated, data: Dataset) -> Score:
        assert data.texts is not None
        probs = _ctc_output(candidate.outputs, len(data), len(chars), Path(dictionary).name)
        table = chars + [" "] if probs.shape[2] == len(chars) + 2 else list(chars)
        best = probs.argmax(2)
        truths = [str(t) for t in data.texts]
        scores = [char_accuracy("".join(table[i - 1] for i in ctc_greedy_decode(row)), truth)
                  for row, truth in zip(best, truths)]
        return mean_score(np.array(scores), np.array([len(t) for t in truths], np.float64))

    return Metric("ctc", spec or f"ctc:{dictionary}", "char acc (ctc)", True, True, "texts", compute)


def load_dictionary(path: str | Path) -> list[str]:
    """The characters of a CTC dictionary: one per line of a text file, or a PaddleOCR yml's `character_dict`."""
    path = Path(path)
    if path.suffix.lower() in (".yml", ".yaml"):
        import yaml  # noqa: PLC0415
        try:
            found = _find_key(yaml.safe_load(path.read_text(encoding="utf-8")), "character_dict")
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise MetricError(f"{path}: not a readable yml ({str(exc).splitlines()[0]})") from None
        if not isinstance(found, list) or not found:
            raise MetricError(f"{path}: no 'character_dict' list in this yml (PaddleOCR's inference.yml has one)")
        return [str(c) for c in found]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MetricError(f"{path}: the dictionary is not UTF-8 text") from None
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    if not lines:
        raise MetricError(f"{path}: the dictionary is empty")
    return lines


def _find_key(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        if key in value:
            return value[key]
        for v in value.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def _ctc_output(outputs: dict[str, np.ndarray], n: int, chars: int, dict_name: str) -> np.ndarray:
    """The [N, T, classes] output: classes = blank + characters (+ space)."""
    steps = [(k, v) for k, v in outputs.items() if v.ndim == 3 and len(v) == n and v.dtype.kind == "f"]
    for _, value in steps:
        if value.shape[2] in (chars + 1, chars + 2):
            return value
    if steps:
        name, value = steps[0]
        raise MetricError(f"--metric ctc: output {name!r} has {value.shape[2]} classes per step, but {dict_name} has "
                          f"{chars} characters (expected {chars + 2}: blank + characters + space, or {chars + 1})")
    raise MetricError(f"--metric ctc: no output of shape [N, T, classes] (outputs: {_shapes(outputs)})")


def ctc_greedy_decode(indices: Sequence[int], blank: int = 0) -> list[int]:
    """Best-path CTC decoding of per-step argmax indices: collapse repeats, then drop blanks (Graves et al. 2006)."""
    out: list[int] = []
    previous = None
    for i in (int(v) for v in indices):
        if i != previous and i != blank:
            out.append(i)
        previous = i
    return out


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance: insertions, deletions and substitutions, each costing 1."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def char_accuracy(prediction: str, truth: str) -> float:
    """1 − edit distance / length of the truth (an empty truth: 1 if the prediction is empty too, else 0)."""
    if not truth:
        return 1.0 if not prediction else 0.0
    return 1.0 - edit_distance(prediction, truth) / len(truth)


# ------------------------------------------------------------------------------------------ mask IoU


def mask_iou_metric(threshold: float = DEFAULT_IOU_THRESHOLD, spec: str | None = None) -> Metric:
    """Mean IoU over samples of (output map > threshold) with `masks`."""

    def compute(candidate: Evaluated, original: Evaluated, data: Dataset) -> Score:
        assert data.masks is not None
        maps = _map_output(candidate.outputs, data.masks)
        return mean_score(mask_iou(maps > threshold, data.masks))

    return Metric("mask-iou", spec or f"mask-iou:{threshold:g}", f"mask IoU (> {threshold:g})", True, False,
                  "masks", compute)


def mask_iou(predicted: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-sample IoU of boolean maps with masks (nonzero = inside; > 0.5 for float masks); empty ∪ empty = 1."""
    truth = masks > 0.5 if masks.dtype.kind == "f" else masks.astype(bool)
    pred = predicted.reshape(len(predicted), -1)
    truth = truth.reshape(len(truth), -1)
    inter = (pred & truth).sum(1)
    union = (pred | truth).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _map_output(outputs: dict[str, np.ndarray], masks: np.ndarray) -> np.ndarray:
    """The first output whose per-sample map has the masks' shape (axes of size 1 ignored)."""
    want = tuple(d for d in masks.shape[1:] if d != 1)
    for value in outputs.values():
        if len(value) == len(masks) and tuple(d for d in value.shape[1:] if d != 1) == want:
            return value.reshape(len(value), -1)
    raise MetricError(f"--metric mask-iou: no output has maps of the masks' shape {list(masks.shape[1:])} "
                      f"(outputs: {_shapes(outputs)}); give masks at the model's output resolution")


# ------------------------------------------------------------------------------------------ attribution


def attribution_metric(mode: str = "spearman", k: int = 0, spec: str | None = None) -> Metric:
    """Agreement of occlusion maps of the compressed and the original model (1 = the same explanation)."""

    def compute(candidate: Evaluated, original: Evaluated, data: Dataset) -> Score:
        if "attribution" not in original.cache:
            original.cache["attribution"] = occlusion_saliency(original.model, data, threads=original.threads)
        ref_maps, classes = original.cache["attribution"]
        if candidate is original:
            maps = ref_maps
        else:
            maps, _ = occlusion_saliency(candidate.model, data, classes=classes, threads=candidate.threads)
        compare = spearman if mode == "spearman" else (lambda a, b: top_k_overlap(a, b, k))
        return mean_score(np.array([compare(a, b) for a, b in zip(ref_maps, maps)]))

    label = "attribution rank corr." if mode == "spearman" else f"attribution top-{k} overlap"
    return Metric("attribution", spec or ("attribution" if mode == "spearman" else f"attribution:top{k}"), label,
                  True, False, None, compute)


def occlusion_saliency(model: onnx.ModelProto | None, data: Dataset, count: int = ATTRIBUTION_SAMPLES,
                       cells: int = ATTRIBUTION_CELLS, classes: list[int | None] | None = None,
                       threads: int | None = None) -> tuple[np.ndarray, list[int | None]]:
    """Occlusion maps [samples, cells] of the first `count` samples, and the class each map explains.

    The first float input is cut into up to `cells` parts along each of its last two axes (the last axis of a
    vector); each part in turn is set to the sample's mean over those axes (per channel) and the model is run.
    A cell's saliency is the drop of the explained class's score when the model has class scores (the original's
    predicted class, given in `classes` for the compressed model so both explain the same decision), else the
    change of the outputs, ‖y_occluded − y‖ / ‖y‖ summed over outputs. Forward passes only: any ONNX model works.
    """
    if model is None:
        raise MetricError("--metric attribution needs the model itself, not only its outputs")
    spec = next((s for s in input_specs(model) if s.dtype.kind == "f"), None)
    if spec is None:
        raise MetricError("--metric attribution: the model has no float input to occlude")
    sess = runtime.session(model, threads)
    maps, explained = [], []
    for i, feed in enumerate(data.samples(count)):
        stacked = {k: data.stacked.get(k, True) for k in feed}
        one = {k: v if stacked[k] else v[None] for k, v in feed.items()}  # a one-sample Dataset's arrays
        base = runtime.run(model, Dataset(one, stacked=stacked), sess=sess)
        sample = feed[spec.name]
        occluded = occlusions(sample, cells)  # [parts, *sample.shape]
        batch = {k: np.repeat(v, len(occluded), axis=0) for k, v in one.items()}
        batch[spec.name] = occluded.reshape((-1,) + sample.shape[1:]) if stacked[spec.name] else occluded
        runs = runtime.run(model, Dataset(batch, stacked=stacked), sess=sess)
        target = classes[i] if classes is not None else _predicted_class(base)
        maps.append(_saliency(base, runs, target))
        explained.append(target)
    return np.array(maps), explained


def occlusions(sample: np.ndarray, cells: int = ATTRIBUTION_CELLS) -> np.ndarray:
    """[parts, *sample.shape]: copies of `sample`, each with one grid cell set to the sample's mean there.

    The grid spans the last two axes longer than 1 (H and W of [1, C, H, W]; the features of [1, F]), at most
    `cells` parts along each; the mean is taken over those axes, so each channel keeps its own.
    """
    axes = [a for a in range(sample.ndim) if sample.shape[a] > 1][-2:]
    if not axes:
        raise MetricError(f"--metric attribution: an input sample of shape {list(sample.shape)} has nothing to occlude")
    fill = np.broadcast_to(sample.mean(axis=tuple(axes), keepdims=True), sample.shape)
    splits = [np.array_split(np.arange(sample.shape[a]), min(cells, sample.shape[a])) for a in axes]
    out = []
    for parts in itertools.product(*splits):
        index = [slice(None)] * sample.ndim
        for axis, part in zip(axes, parts):
            index[axis] = slice(int(part[0]), int(part[-1]) + 1)
        copy = sample.copy()
        copy[tuple(index)] = fill[tuple(index)]
        out.append(copy)
    return np.stack(out)


def _predicted_class(outputs: dict[str, np.ndarray]) -> int | None:
    for value in outputs.values():
        if verify.looks_like_scores(value):
            return int(value.reshape(len(value), -1)[0].argmax())
    return None


def _saliency(base: dict[str, np.ndarray], runs: dict[str, np.ndarray], target: int | None) -> np.ndarray:
    if target is not None:
        name = next(k for k, v in base.items() if verify.looks_like_scores(v))
        return float(base[name].reshape(-1)[target]) - runs[name].reshape(len(runs[name]), -1)[:, target].astype(np.float64)
    total = None
    for name, ref in base.items():
        if ref.dtype.kind != "f":
            continue
        ref64 = ref.astype(np.float64).reshape(-1)
        diff = runs[name].astype(np.float64).reshape(len(runs[name]), -1) - ref64
        change = np.linalg.norm(diff, axis=1) / max(float(np.linalg.norm(ref64)), 1e-30)
        total = change if total is None else total + change
    if total is None:
        raise MetricError("--metric attribution: the model has no float output to measure")
    return total


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n−1 with ties given their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(len(values))
    for value in np.unique(values[np.isfinite(values)]):
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation; two constant maps agree (1), one constant map against a varying one is 0."""
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    da, db = ra - ra.mean(), rb - rb.mean()
    norm = math.sqrt(float((da * da).sum() * (db * db).sum()))
    if norm == 0:
        return 1.0 if not da.any() and not db.any() else 0.0
    return float((da * db).sum() / norm)


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Share of the `k` most salient cells of `a` that are also among the `k` most salient of `b`."""
    k = max(1, min(k, len(a)))
    top_a = set(np.argsort(-np.asarray(a), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.asarray(b), kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


# ------------------------------------------------------------------------------------------ scorer


class Scorer:
    """One metric on one dataset, bound to the original model: scores candidates and their drop from it.

    With `metric` None the default is chosen from the data and the original's outputs (`default_metric`).
    """

    def __init__(self, metric: Metric | None, original: onnx.ModelProto, data: Dataset, threads: int | None = None,
                 outputs: dict[str, np.ndarray] | None = None):
        self.data = data
        self.threads = threads
        reference = outputs if outputs is not None else runtime.run(original, data, threads=threads)
        self.reference = Evaluated(original, reference, threads)
        self.metric = metric or default_metric(reference, data)
        self.default = metric is None
        check_data(self.metric, data)
        self.original = self.metric.compute(self.reference, self.reference, data)

    def score(self, model: onnx.ModelProto, outputs: dict[str, np.ndarray] | None = None) -> Score:
        if outputs is None:
            outputs = runtime.run(model, self.data, threads=self.threads)
        return self.metric.compute(Evaluated(model, outputs, self.threads), self.reference, self.data)

    def drop(self, score: Score) -> float:
        return self.metric.drop(self.original, score)

    def block(self, final: Score) -> dict:
        """report.json's `metric` block: values in the metric's scale (fractions for accuracies), the drop and its
        standard error in points (accuracies) or absolute units."""
        m = self.metric
        return {"name": m.name, "spec": m.spec, "label": m.label, "direction": m.direction,
                "unit": "%" if m.percent else "absolute", "default": self.default,
                "original": self.original.value, "final": final.value,
                "drop": round(m.drop(self.original, final), 6), "drop_unit": m.drop_unit,
                "n": final.n, "stderr": {"original": self.original.stderr, "final": final.stderr,
                                         "drop": m.drop_stderr(self.original, final)},
                "test": paired_test(m, self.original, final),
                "data": self.data.source, "basis": m.basis}


def check_data(metric: Metric, data: Dataset) -> None:
    """A one-line MetricError when `data` lacks what `metric` scores against."""
    if metric.needs is not None and getattr(data, metric.needs, None) is None:
        raise MetricError(f"--metric {metric.spec}: {data.source} has no '{metric.needs}' array to score against "
                          f"(add '{metric.needs}' to the evaluation npz; see the README's npz keys)")


def _shapes(outputs: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items()) or "none"
