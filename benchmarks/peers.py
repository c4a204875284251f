"""squeeze next to other ONNX-level compression tools, on the same models and data → benchmarks/results/peers.md.

    python benchmarks/peers.py                                   # 3 models × every peer → benchmarks/results/peers.md
    python benchmarks/peers.py --models mnist_burn --out /tmp/peers.md

Install the peers with `pip install -e '.[peers]'` (onnxsim); ONNX Runtime's quantizer ships with onnxruntime. A peer
that is not installed gets a row saying so.

Peers, each next to the squeeze pipeline that does the same job:
- ONNX Runtime `quantize_static` (QDQ, per-channel int8 weights, uint8 activations, MinMax calibration on the
  calibration images) ↔ squeeze `quant`.
- onnxsim `apply_structured_pruning_cpp(sparsity=0.5)` (data-free L2 channel ranking; MatMul/Gemm/Conv producer →
  consumer chains), alone and followed by `apply_pruning_finetune_cpp` (its closed-form ridge refit of the surviving
  MatMul/Gemm weights against the original's activations on the calibration images) ↔ squeeze `prune(ratio=0.5)`.
- onnxsim `apply_kmeans_quantization_cpp` (per-layer 16-entry k-means codebook, MatMul/Gemm weights only; it folds the
  codebook values back into float32 initializers) ↔ squeeze `codebook(bits=4)`.

Data: benchmarks/corpus.py — the first 256 images calibrate (every tool sees the same ones), the rest evaluate (761
CIFAR-10, 9,744 MNIST), never the same image. Every model, squeeze's and the peers', is evaluated by the same code:
ONNX Runtime at 1 thread, top-1 against the labels, with n and the standard error; the drop's standard error is
paired (per image, original vs compressed). MACs: squeeze.metrics on the saved graph (a QDQ model counts its Conv /
Gemm MACs like the float one). Bytes: the serialized ONNX file with unused initializers dropped (onnxsim's k-means
leaves the replaced weights behind), and `packed` = squeeze's pack container of that same file (bit-packed
weights), so the two size columns treat every tool alike. The peers get the model upgraded to opset 13 (per-channel
QDQ needs it; squeeze's front end does the same).
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
import run as harness  # noqa: E402  (code identity, machine, load, time stamps)

import squeeze  # noqa: E402
from squeeze import metrics, pack, runtime  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["cifar10_resnet4b", "sri_resnet_a", "mnist_burn"]
CALIB = 256


PEER_TIMEOUT = 900  # seconds per peer run (onnxsim's ridge refit solves a dense K×K system in scalar code)


@dataclass
class Peer:
    """One peer method: its label, the tool, how to run it (a module-level function: model, calibration inputs,
    input name → model; run in its own process under a time limit), and squeeze's pipeline for the same job."""

    label: str
    tool: str
    run: Callable[[onnx.ModelProto, np.ndarray, str], onnx.ModelProto]
    squeeze_spec: str


# --- the peers ------------------------------------------------------------------------------------------------

def ort_quantize_static(model: onnx.ModelProto, calib: np.ndarray, input_name: str) -> onnx.ModelProto:
    """ONNX Runtime's static quantization: QDQ, per-channel int8 weights, uint8 activations, MinMax."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,  # noqa: PLC0415
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{input_name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory(prefix="squeeze-peers-") as folder:
        source, out = Path(folder) / "in.onnx", Path(folder) / "out.onnx"
        onnx.save(model, str(source))
        quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnx.load(str(out))


def onnxsim_prune(model: onnx.ModelProto, calib: np.ndarray, input_name: str, ridge: bool) -> onnx.ModelProto:
    """onnxsim's structured pruning at sparsity 0.5, then (ridge=True) its ridge refit on the calibration images."""
    import onnxsim  # noqa: PLC0415
    pruned = onnxsim.apply_structured_pruning_cpp(model, sparsity=0.5)
    if not ridge:
        return pruned
    batches = [{input_name: calib[i:i + 1]} for i in range(len(calib))]
    return onnxsim.apply_pruning_finetune_cpp(model, pruned, calibration_data=batches)


def onnxsim_prune_only(model: onnx.ModelProto, calib: np.ndarray, input_name: str) -> onnx.ModelProto:
    return onnxsim_prune(model, calib, input_name, ridge=False)


def onnxsim_prune_ridge(model: onnx.ModelProto, calib: np.ndarray, input_name: str) -> onnx.ModelProto:
    return onnxsim_prune(model, calib, input_name, ridge=True)


def onnxsim_kmeans(model: onnx.ModelProto, calib: np.ndarray, input_name: str) -> onnx.ModelProto:
    """onnxsim's k-means weight sharing (16 centroids per MatMul/Gemm weight; no data)."""
    import onnxsim  # noqa: PLC0415
    return onnxsim.apply_kmeans_quantization_cpp(model)


PEERS = [
    Peer("int8 static quantization", "onnxruntime quantize_static", ort_quantize_static, "quant"),
    Peer("structured pruning 0.5", "onnxsim structured_pruning", onnxsim_prune_only, "prune(ratio=0.5)"),
    Peer("structured pruning 0.5 + recovery", "onnxsim structured_pruning + pruning_finetune (ridge)",
         onnxsim_prune_ridge, "prune(ratio=0.5)"),
    Peer("4-bit k-means weight sharing", "onnxsim kmeans_quantization", onnxsim_kmeans, "codebook(bits=4)"),
]


def _missing(tool: str) -> str | None:
    """Why a peer cannot run here (its package is not installed), else None."""
    import importlib.util  # noqa: PLC0415
    module = "onnxsim" if tool.startswith("onnxsim") else "onnxruntime.quantization"
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return f"{module.split('.')[0]} is not installed (pip install -e '.[peers]')"
    return None


def run_peer(peer: Peer, model: onnx.ModelProto, calib: np.ndarray, input_name: str,
             timeout: float = PEER_TIMEOUT) -> onnx.ModelProto:
    """`peer.run` in a fresh process (spawned: no state shared with this one's ONNX Runtime sessions), stopped after
    `timeout` seconds; raises TimeoutError or RuntimeError with the peer's own error."""
    import multiprocessing  # noqa: PLC0415
    with tempfile.TemporaryDirectory(prefix="squeeze-peers-") as folder:
        source, out = Path(folder) / "in.onnx", Path(folder) / "out.onnx"
        onnx.save(model, str(source))
        np.save(Path(folder) / "calib.npy", calib)
        ctx = multiprocessing.get_context("spawn")
        errors = ctx.Queue()
        proc = ctx.Process(target=_peer_worker, args=(peer.run.__name__, folder, input_name, errors))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.terminate()
            proc.join()
            raise TimeoutError(f"stopped after {timeout:.0f} s")
        if proc.exitcode != 0 or not out.is_file():
            raise RuntimeError(errors.get() if not errors.empty() else f"peer process exited {proc.exitcode}")
        return onnx.load(str(out))


def _peer_worker(function: str, folder: str, input_name: str, errors) -> None:
    """In the spawned process: run the peer function named `function` on folder/in.onnx, write folder/out.onnx."""
    try:
        model = onnx.load(str(Path(folder) / "in.onnx"))
        calib = np.load(Path(folder) / "calib.npy")
        onnx.save(globals()[function](model, calib, input_name), str(Path(folder) / "out.onnx"))
    except Exception as exc:  # noqa: BLE001  (reported as the row's note)
        errors.put(f"{type(exc).__name__}: {str(exc)[:300]}")
        raise SystemExit(1) from None


# --- measuring ------------------------------------------------------------------------------------------------

def drop_unused_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without initializers that no node (or subgraph) reads and no graph output names: lossless, so that
    the file size counts only what the model uses."""
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.g:
                used |= {n for sub in attr.g.node for n in sub.input}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out


def correct(model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray, input_name: str) -> np.ndarray:
    """Per-image top-1 correctness of `model` (ONNX Runtime, 1 thread), one image per call."""
    sess = runtime.session(model, 1)
    preds = [int(np.argmax(sess.run(None, {input_name: x[i:i + 1]})[0].reshape(-1))) for i in range(len(x))]
    return np.asarray(preds) == labels


def measure(model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray, input_name: str, base: np.ndarray | None,
            shapes: dict) -> dict:
    """top-1 with n and standard error, the drop against `base` (paired standard error), MACs and bytes."""
    model = drop_unused_initializers(model)
    ok = correct(model, x, labels, input_name)
    n = len(ok)
    row = {"n": n, "top1": 100 * ok.mean(), "se": 100 * np.sqrt(ok.mean() * (1 - ok.mean()) / n),
           "macs": metrics.summary(model, shapes)["macs"], "file": len(model.SerializeToString()),
           "packed": pack.size_report(model)["packed"]}
    if base is not None:
        diff = base.astype(float) - ok.astype(float)
        row["drop"], row["drop_se"] = 100 * diff.mean(), 100 * diff.std(ddof=1) / np.sqrt(n)
    row["ok"] = ok
    return row


def model_rows(name: str, say: Callable[[str], None], timeout: float = PEER_TIMEOUT) -> list[dict]:
    """Original, then every peer next to its squeeze pipeline, for corpus model `name`."""
    calib, evald = corpus.split(corpus.dataset(name), CALIB)
    input_name = corpus._input_name(name)
    x, labels, cx = evald.arrays[input_name], evald.labels, calib.arrays[input_name]
    shapes = {input_name: (1, *x.shape[1:])}
    source = onnx.load(str(corpus.model_path(name)))
    model = source if source.opset_import[0].version >= 13 else onnx.version_converter.convert_version(source, 13)
    say(f"{name}: original")
    t0 = time.perf_counter()
    base = measure(model, x, labels, input_name, None, shapes)
    rows = [{"model": name, "method": "original (float)", "tool": "—", "seconds": 0.0, **base}]
    squeezed: dict[str, dict] = {}
    for peer in PEERS:
        missing = _missing(peer.tool)
        say(f"{name}: {peer.tool}")
        t0 = time.perf_counter()
        try:
            if missing:
                raise RuntimeError(missing)
            out = run_peer(peer, model, cx, input_name, timeout)
            rows.append({"model": name, "method": peer.label, "tool": peer.tool,
                         **measure(out, x, labels, input_name, base["ok"], shapes),
                         "seconds": time.perf_counter() - t0})
        except Exception as exc:  # noqa: BLE001  (a peer's failure is a row, not the end of the table)
            rows.append({"model": name, "method": peer.label, "tool": peer.tool, "note": harness._one_line(exc)})
        if peer.squeeze_spec not in squeezed:
            say(f"{name}: squeeze {peer.squeeze_spec}")
            t0 = time.perf_counter()
            result = squeeze.compress(corpus.model_path(name), peer.squeeze_spec, calib=calib, targets="",
                                      threads=1, seed=0)
            squeezed[peer.squeeze_spec] = {
                "model": name, "method": peer.label, "tool": f"squeeze `{peer.squeeze_spec}`",
                **measure(result.model, x, labels, input_name, base["ok"], shapes),
                "seconds": time.perf_counter() - t0, "note": result.failure or ""}
            rows.append(squeezed[peer.squeeze_spec])
        else:
            rows.append({**squeezed[peer.squeeze_spec], "method": peer.label, "note": "same squeeze run as above"})
    return rows


# --- output ---------------------------------------------------------------------------------------------------

def _cells(row: dict, base: dict) -> list[str]:
    if "top1" not in row:
        return [row["model"], row["method"], row["tool"], "—", "—", "—", "—", "—", "—", "—",
                f"**not run:** {row.get('note', '')}".replace("|", "\\|")]
    drop = "—" if "drop" not in row else f"{row['drop']:.2f} ± {row['drop_se']:.2f}"
    return [row["model"], row["method"], row["tool"], f"{row['top1']:.2f} ± {row['se']:.2f} (n={row['n']})", drop,
            f"{row['macs'] / 1e6:.3f} M", f"{base['macs'] / row['macs']:.2f}×", f"{row['file']:,}",
            f"{row['packed']:,}", f"{row['seconds']:.1f}", (row.get("note") or "").replace("|", "\\|")]


def markdown(rows: list[dict], command: str, started: dict) -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415
    versions = []
    for package in ("onnxruntime", "onnxsim", "onnx"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            versions.append(f"{package} not installed")
    code, dirty = harness.script_code_key("peers")
    lines = ["# Peers: squeeze next to ONNX Runtime's quantizer and onnxsim's pruning and k-means", "",
             f"Command: `{command}`. Code `{code}` (squeeze/, passes/, targets/, benchmarks/peers.py and what it "
             f"imports; HEAD `{harness._git('rev-parse', '--short', 'HEAD') or '?'}`"
             + (f"; uncommitted: {', '.join(dirty)}" if dirty else "") + f"); {started['at']} → {harness._now()}; "
             f"load {started['load']} → {harness._load()}; {harness._machine()}; {', '.join(versions)}.", "",
             "Same models, same data for every row: the first 256 images calibrate, the rest evaluate; top-1 in % "
             "± one standard error, drop in points ± its paired standard error (same images), all evaluated by the "
             "same ONNX Runtime code at 1 thread. MAC ratio = original ÷ this row. `file` = ONNX bytes without unused "
             "initializers; `packed` = squeeze's pack container of that file (bit-packed weights), for every tool "
             "alike. Each squeeze row is the squeeze pipeline for the same job as the peer row above it, with "
             "defaults. onnxsim's k-means touches MatMul/Gemm weights only and stores the shared values back as "
             "float32 (its file does not shrink; its packed size does); squeeze's codebook covers Conv weights too.",
             "", "| model | method | tool | top-1 % (n) | drop (pts) | MACs | MAC ratio | file bytes | packed bytes | "
             "seconds | note |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    base = {}
    for row in rows:
        if row["method"].startswith("original"):
            base = row
        lines.append("| " + " | ".join(_cells(row, base)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.md")
    parser.add_argument("--timeout", type=float, default=PEER_TIMEOUT, help="seconds per peer run (default "
                        f"{PEER_TIMEOUT}); a peer stopped by it gets a row saying so")
    args = parser.parse_args(argv)
    if not corpus.available():
        print(f"corpus not found at {corpus.ROOT}", file=sys.stderr)
        return 2
    raw = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/peers.py", *(shlex.quote(a) for a in raw)])
    started = {"at": harness._now(), "load": harness._load()}
    print(f"{command} ({platform.node()})", file=sys.stderr, flush=True)
    rows: list[dict] = []
    for name in args.models:
        rows += model_rows(name, lambda text: print(text, file=sys.stderr, flush=True), args.timeout)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(rows, command, started))  # after each model: a stopped run keeps its rows
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
