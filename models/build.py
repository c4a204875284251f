#!/usr/bin/env python3
"""Rebuild the bundled example model and its data files.

Trains a small residual CNN on scikit-learn's bundled 8x8 digits data set
(offline, no downloads), exports it to ONNX and writes:

    digits_cnn.onnx     the model (input "input" [N,1,8,8] float32,
                        output "logits" [N,10] float32, dynamic batch)
    digits_test.npz     preprocessed test split: input, labels
    digits_calib.npz    first 256 preprocessed train samples: input, labels

Usage:
    pip install torch==2.13.0 scikit-learn onnx onnxruntime numpy
    python models/build.py [--out DIR] [--epochs N]

The .onnx and .npz files are committed, so users of squeeze never need torch.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------
# Fixed settings. Changing any of these changes the artifacts.
# ---------------------------------------------------------------------------
SEED = 0
TEST_SIZE = 0.3
SPLIT_RANDOM_STATE = 0
NUM_THREADS = 2
DEFAULT_EPOCHS = 40
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
OPSET = 17
CALIB_SAMPLES = 256

# Preprocessing: x = (pixels / 16.0 - PIXEL_MEAN) / PIXEL_STD, where the
# scalar mean/std are those of pixels/16.0 over the whole train split
# (1,257 images x 64 pixels). The script recomputes them and checks they
# still match these constants.
PIXEL_SCALE = 16.0
PIXEL_MEAN = 0.30555451968973746
PIXEL_STD = 0.3761244633054805

EXPECTED_BN_NODES = 4
TORCH_HINT = "build.py needs PyTorch: pip install torch==2.13.0"


def load_split():
    """Deterministic stratified split of sklearn's digits (0..16 pixels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float64)  # [1797, 8, 8]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=TEST_SIZE,
        random_state=SPLIT_RANDOM_STATE,
        stratify=labels,
    )
    return x_train, x_test, y_train, y_test


def preprocess(images: np.ndarray) -> np.ndarray:
    """[N,8,8] raw pixels 0..16 -> [N,1,8,8] float32, standardized."""
    x = (images / PIXEL_SCALE - PIXEL_MEAN) / PIXEL_STD
    return x[:, None, :, :].astype(np.float32)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps so that
    rebuilding produces byte-identical files."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def build_model(nn):
    class ResidualBlock(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)
            self.relu_out = nn.ReLU()

        def forward(self, x):
            y = self.relu1(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu_out(y + x)

    class DigitsCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1, bias=False),
                nn.BatchNorm2d(16),
                nn.ReLU(),
            )
            self.block = ResidualBlock(16)
            self.down = nn.Sequential(
                nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(32),
                nn.ReLU(),
            )
            self.flatten = nn.Flatten(1)
            self.fc1 = nn.Linear(32 * 4 * 4, 64)
            self.relu_fc = nn.ReLU()
            self.fc2 = nn.Linear(64, 10)

        def forward(self, x):
            x = self.stem(x)
            x = self.block(x)
            x = self.down(x)
            x = self.flatten(x)
            x = self.relu_fc(self.fc1(x))
            return self.fc2(x)

    return DigitsCNN()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output folder (default: this script's folder)",
    )
    parser.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"training epochs (default {DEFAULT_EPOCHS})"
    )
    args = parser.parse_args(argv)

    try:
        import torch
        from torch import nn
    except ImportError:
        print(TORCH_HINT, file=sys.stderr)
        return 2
    try:
        import onnx
        import onnxruntime as ort
        import sklearn  # noqa: F401
    except ImportError as exc:
        print(f"build.py needs {exc.name}: pip install scikit-learn onnx onnxruntime", file=sys.stderr)
        return 2

    t0 = time.time()
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)

    # ---- data -------------------------------------------------------------
    x_train_raw, x_test_raw, y_train, y_test = load_split()
    scaled = x_train_raw / PIXEL_SCALE
    mean, std = float(scaled.mean()), float(scaled.std())
    print(f"preprocess: x/{PIXEL_SCALE:g}, mean={PIXEL_MEAN!r}, std={PIXEL_STD!r}")
    assert abs(mean - PIXEL_MEAN) < 1e-9 and abs(std - PIXEL_STD) < 1e-9, (
        f"train-split mean/std changed: {mean!r} {std!r}; update PIXEL_MEAN/PIXEL_STD"
    )
    x_train = preprocess(x_train_raw)
    x_test = preprocess(x_test_raw)
    print(f"data: train {x_train.shape[0]}, test {x_test.shape[0]} (sklearn load_digits)")

    # ---- train ------------------------------------------------------------
    model = build_model(nn)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters")
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    loss_fn = nn.CrossEntropyLoss()
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(xt.shape[0], generator=gen)
        total = 0.0
        for i in range(0, xt.shape[0], BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        if epoch == 1 or epoch % 10 == 0 or epoch == args.epochs:
            print(f"epoch {epoch:3d}  loss {total / xt.shape[0]:.4f}")

    model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    torch_correct = int((torch_logits.argmax(1) == y_test).sum())
    n_test = len(y_test)
    print(f"torch test accuracy: {torch_correct}/{n_test} = {torch_correct / n_test:.4%}")

    # ---- export -----------------------------------------------------------
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "digits_cnn.onnx"
    with warnings.catch_warnings():
        # torch >= 2.9 warns that the TorchScript-based exporter is legacy;
        # it is used on purpose (do_constant_folding=False keeps the BN nodes).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.from_numpy(x_test[:1]),),
            str(onnx_path),
            dynamo=False,
            export_params=True,
            opset_version=OPSET,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )

    onnx_model = onnx.load(str(onnx_path))
    onnx.checker.check_model(onnx_model, full_check=True)
    op_counts = Counter(node.op_type for node in onnx_model.graph.node)
    print("onnx ops: " + ", ".join(f"{op} x{n}" for op, n in sorted(op_counts.items())))
    assert op_counts["BatchNormalization"] == EXPECTED_BN_NODES, op_counts
    onnx_params = sum(int(np.prod(init.dims)) for init in onnx_model.graph.initializer)
    print(f"onnx initializers: {len(onnx_model.graph.initializer)} tensors, {onnx_params} values")

    so = ort.SessionOptions()
    so.intra_op_num_threads = NUM_THREADS
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": x_test})[0]
    ort_correct = int((ort_logits.argmax(1) == y_test).sum())
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    print(f"onnxruntime test accuracy: {ort_correct}/{n_test} = {ort_correct / n_test:.4%}")
    print(f"max |logits(torch) - logits(onnxruntime)| = {max_diff:.3g}")
    assert abs(ort_correct - torch_correct) <= 1, (ort_correct, torch_correct)

    # ---- data files -------------------------------------------------------
    save_npz(out / "digits_test.npz", input=x_test, labels=y_test.astype(np.int64))
    save_npz(
        out / "digits_calib.npz",
        input=x_train[:CALIB_SAMPLES],
        labels=y_train[:CALIB_SAMPLES].astype(np.int64),
    )

    for name in ("digits_cnn.onnx", "digits_test.npz", "digits_calib.npz"):
        print(f"wrote {out / name} ({(out / name).stat().st_size} bytes)")
    print(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
