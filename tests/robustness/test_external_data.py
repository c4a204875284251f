"""External data and .npz safety: what a hostile model or data file can make squeeze read or execute.

Reading: external-data locations that are absolute, leave the model's folder (`../`), go through a symlink (file
or folder) or a hard link, or name something that is not a regular file (FIFO, device, folder) are refused with a
clear one-line error before anything is opened (CVE-2022-25882, CVE-2024-27318, CVE-2026-27489 were this class of
bug in onnx's own loader, which squeeze also requires to be new enough to defend itself). Writing: see
test_outputs_safety.py (CVE-2025-51480). `.npz` files load with pickles off.
"""
from __future__ import annotations

import io
import os
import pickle
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
import squeeze
from squeeze.data import input_specs, load_npz
from squeeze.errors import DataError, ModelLoadError
from squeeze.model import load_model

from conftest import REPO


@contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds}s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_onnx_is_new_enough_to_defend_its_own_loader():
    version = tuple(int(p) for p in onnx.__version__.split(".")[:2])
    assert version >= (1, 21)
    assert '"onnx>=1.21"' in (REPO / "pyproject.toml").read_text()


def _model_with_external_weight(folder: Path, location: str) -> Path:
    model = graphs.conv_bn_relu()
    weight = next(t for t in model.graph.initializer if t.name == "conv.weight")
    raw = numpy_helper.to_array(weight).tobytes()
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        weight.external_data.add(key=key, value=value)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return folder / "model.onnx"


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "secret" / "weights.bin"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(b"\x00" * 432)  # exactly the size the tensor wants: only the location gives it away
    return secret


def _absolute(tmp_path, folder):
    return str(_secret(tmp_path))


def _parent(tmp_path, folder):
    _secret(tmp_path)
    return "../secret/weights.bin"


def _nested_parent(tmp_path, folder):
    _secret(tmp_path)
    (folder / "sub").mkdir(parents=True)
    return "sub/../../secret/weights.bin"


def _symlink_file(tmp_path, folder):
    folder.mkdir(parents=True)
    (folder / "weights.bin").symlink_to(_secret(tmp_path))
    return "weights.bin"


def _symlink_folder(tmp_path, folder):
    folder.mkdir(parents=True)
    (folder / "data").symlink_to(_secret(tmp_path).parent)
    return "data/weights.bin"


def _hardlink(tmp_path, folder):
    folder.mkdir(parents=True)
    os.link(_secret(tmp_path), folder / "weights.bin")
    return "weights.bin"


def _fifo(tmp_path, folder):
    folder.mkdir(parents=True)
    os.mkfifo(folder / "weights.bin")
    return "weights.bin"


def _directory(tmp_path, folder):
    (folder / "weights.bin").mkdir(parents=True)
    return "weights.bin"


HOSTILE = {
    "absolute": (_absolute, "outside the model's folder"),
    "parent": (_parent, "outside the model's folder"),
    "nested parent": (_nested_parent, "outside the model's folder"),
    "device": (lambda t, f: "/dev/zero", "outside the model's folder"),
    "proc": (lambda t, f: "/proc/self/environ", "outside the model's folder"),
    "symlink to a file": (_symlink_file, "symbolic link"),
    "symlink to a folder": (_symlink_folder, "symbolic link"),
    "hard link": (_hardlink, "hard link"),
    "fifo": (_fifo, "not a regular file"),
    "directory": (_directory, "not a regular file"),
    "nul byte": (lambda t, f: "weights.bin\x00.png", "control characters"),
    "empty": (lambda t, f: "", "outside the model's folder"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_external_data_locations_are_refused(tmp_path, case):
    make, expected = HOSTILE[case]
    folder = tmp_path / "model"
    location = make(tmp_path, folder)
    path = _model_with_external_weight(folder, location)
    with _deadline(20), pytest.raises(ModelLoadError) as info:
        load_model(path)
    message = str(info.value)
    assert expected in message and "conv.weight" in message and "\n" not in message, message
    with _deadline(20), pytest.raises(ModelLoadError):  # the API and the CLI go through the same loader
        squeeze.compress(path, "cleanup", targets="")


def test_benign_external_data_in_a_subfolder_loads(tmp_path):
    folder = tmp_path / "model"
    (folder / "data").mkdir(parents=True)
    weight = next(t for t in graphs.conv_bn_relu().graph.initializer if t.name == "conv.weight")
    (folder / "data" / "weights.bin").write_bytes(numpy_helper.to_array(weight).tobytes())
    model = load_model(_model_with_external_weight(folder, "data/weights.bin"))
    loaded = next(t for t in model.graph.initializer if t.name == "conv.weight")
    np.testing.assert_array_equal(numpy_helper.to_array(loaded), numpy_helper.to_array(weight))


def test_an_in_memory_model_that_points_at_external_data_is_refused(tmp_path):
    """The API takes a ModelProto too; its locations would be read relative to the working directory."""
    model = onnx.load(_model_with_external_weight(tmp_path / "model", "/etc/passwd"), load_external_data=False)
    with pytest.raises(ModelLoadError, match="refers to external data"):
        squeeze.compress(model, "cleanup", targets="")


# ------------------------------------------------------------------------------------------------- .npz

class _Payload:
    """Unpickling this creates a file: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_npz_pickles_are_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    payload = np.empty(2, dtype=object)
    payload[0] = payload[1] = _Payload(marker)
    buf = io.BytesIO()
    np.savez(buf, x=payload)
    (tmp_path / "evil.npz").write_bytes(buf.getvalue())
    specs = input_specs(graphs.conv_bn_relu())
    with pytest.raises(DataError) as info:
        load_npz(tmp_path / "evil.npz", specs)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_a_plain_pickle_or_npy_named_npz_is_not_a_readable_npz(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "pickle.npz").write_bytes(pickle.dumps(_Payload(marker)))
    np.save(tmp_path / "array.npy", np.zeros((2, 3, 8, 8), np.float32))
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    specs = input_specs(graphs.conv_bn_relu())
    for name in ("pickle.npz", "array.npz"):
        with pytest.raises(DataError) as info:
            load_npz(tmp_path / name, specs)
        assert "not a readable .npz file (not a zip archive" in str(info.value)
        assert "allow_pickle" not in str(info.value)  # numpy's words about pickles do not reach the user
    assert not marker.exists()


def test_non_finite_or_complex_calibration_data_is_refused(tmp_path):
    """NaN inputs make every calibration statistic and fidelity figure NaN (and crash least-squares solvers)."""
    specs = input_specs(graphs.conv_bn_relu())
    x = np.zeros((2, 3, 8, 8), np.float32)
    x[1, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    np.savez(tmp_path / "complex.npz", x=np.zeros((2, 3, 8, 8), np.complex64))
    with pytest.raises(DataError, match="holds 1 NaN or infinite value"):
        load_npz(tmp_path / "nan.npz", specs)
    with pytest.raises(DataError, match="complex dtype"):
        load_npz(tmp_path / "complex.npz", specs)
