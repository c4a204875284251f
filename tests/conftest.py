"""Shared fixtures: the corpus (skipped cleanly when absent) and tiny graphs built in code."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # for `benchmarks.corpus`; appended so the installed squeeze wins

from benchmarks import corpus as corpus_mod  # noqa: E402


@pytest.fixture(scope="session")
def corpus():
    """The corpus helper module; skips the test when ../shared/corpus is absent."""
    if not corpus_mod.available():
        pytest.skip(f"corpus not found at {corpus_mod.ROOT}")
    return corpus_mod


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture
def temp_pass():
    """Register passes for one test only: `temp_pass("test-name")(fn)`; removed from the registry afterwards."""
    from squeeze.registry import PASSES, all_passes, register_pass
    all_passes()  # load the real passes first, so a test's name can never shadow one of them
    added: list[str] = []

    def register(name: str):
        def decorate(fn):
            register_pass(name)(fn)
            added.append(name)
            return fn
        return decorate

    yield register
    for name in added:
        PASSES.pop(name, None)


@pytest.fixture
def digits_copy(tmp_path, repo) -> Path:
    """A private copy of models/digits_cnn.onnx in tmp_path (tests never write beside the repo's model)."""
    import shutil
    return Path(shutil.copy(repo / "models" / "digits_cnn.onnx", tmp_path / "digits_cnn.onnx"))


@pytest.fixture
def calib_data():
    """`calib_data(model, count, seed=0)`: real-looking calibration data (helpers.calibration)."""
    import helpers  # noqa: PLC0415
    return helpers.calibration


@pytest.fixture(scope="module")
def mcu_tools():
    """Skips the test when the mcu target's tools (arm-none-eabi-gcc, newlib, qemu-system-arm) are missing."""
    from squeeze.targets.mcu import Mcu
    why = Mcu().missing()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def arm_tools():
    """Skips the test when the arm target's tools (aarch64 cross compiler, ...) are missing."""
    from squeeze.targets.arm import Arm
    why = Arm().missing()
    if why:
        pytest.skip(why)
