"""Real devices over TVM RPC: a server on the device (`--rpc HOST:PORT`) or a tracker fronting a pool of them
(`--tracker HOST:PORT --key KEY`), TVM's own distributed runner.

A target that supports devices exports its library, and `measure()` here uploads it, loads it in a Relax VM on
the device, runs every sample for the outputs and times `main` with TVM's `time_evaluator` (warm-up, then many
repeats; median and p90): `method=rpc`. `ms_runner()` gives MetaSchedule the same device for tuning
(`--tune` with `--tracker` or `--rpc`: every candidate is built here and timed there).

Start a device (or, for a test, this machine on loopback):

    python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port 9190
    python -m tvm.exec.rpc_server --host 127.0.0.1 --port 9090 --tracker 127.0.0.1:9190 --key rpi4
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from squeeze.errors import SqueezeError, TargetError
from squeeze.registry import provides

from . import tvm_build

DEFAULT_SESSION_TIMEOUT = 600


class RemoteError(SqueezeError):
    """Bad --rpc/--tracker/--key settings (the CLI prints one line and exits 2)."""


@dataclass(frozen=True)
class Runner:
    """Where to run: a device's RPC server, or a tracker and the key of the devices to ask it for."""

    rpc: tuple[str, int] | None = None
    tracker: tuple[str, int] | None = None
    key: str | None = None
    session_timeout: int = DEFAULT_SESSION_TIMEOUT

    @classmethod
    def from_args(cls, rpc: str | None = None, tracker: str | None = None, key: str | None = None) -> Runner | None:
        """None without --rpc/--tracker; RemoteError for a bad address or a tracker without a key."""
        if not rpc and not tracker:
            if key:
                raise RemoteError("--key needs --tracker HOST:PORT (the key names devices registered there)")
            return None
        if rpc and tracker:
            raise RemoteError("give either --rpc HOST:PORT (one device) or --tracker HOST:PORT --key KEY, not both")
        if tracker and not key:
            raise RemoteError("--tracker needs --key KEY: the key the device's rpc_server registered with")
        return cls(rpc=_address(rpc, "--rpc") if rpc else None,
                   tracker=_address(tracker, "--tracker") if tracker else None, key=key or None)

    def describe(self) -> str:
        if self.tracker:
            return f"tracker {self.tracker[0]}:{self.tracker[1]} key {self.key}"
        return f"rpc {self.rpc[0]}:{self.rpc[1]}"

    def as_dict(self) -> dict:
        return {"rpc": _join(self.rpc), "tracker": _join(self.tracker), "key": self.key}

    def identity(self) -> str:
        """A file-name-safe name for the device: `key-KEY` behind a tracker (the key names one kind of device,
        wherever the tracker runs), `rpc-HOST-PORT` for a lone server. Tuning databases are kept per identity."""
        text = f"key-{self.key}" if self.tracker else f"rpc-{self.rpc[0]}-{self.rpc[1]}"
        return re.sub(r"[^A-Za-z0-9_.-]", "_", text)

    def devices(self) -> int:
        """How many devices can measure at once: the servers the tracker reports under the key (at least 1; a
        tracker that cannot be asked counts as 1, `connect()` says what is wrong), 1 for a lone `--rpc` server.

        A server registers as `server:KEY` in the tracker's summary, whether it is idle or serving a session.
        """
        if not self.tracker:
            return 1
        tvm_build.tvm()
        from tvm import rpc  # noqa: PLC0415
        try:
            summary = rpc.connect_tracker(*self.tracker).summary()
        except Exception:  # noqa: BLE001 - unreachable: the session request reports it with a hint
            return 1
        return max(1, registered(summary, self.key))

    def connect(self):
        """An RPC session with the device; TargetError saying what to check when it cannot be had."""
        tvm_build.tvm()
        from tvm import rpc  # noqa: PLC0415
        try:
            if self.tracker:
                tracker = rpc.connect_tracker(*self.tracker)
                return tracker.request(self.key, priority=1, session_timeout=self.session_timeout)
            return rpc.connect(*self.rpc, session_timeout=self.session_timeout)
        except Exception as exc:  # TVM raises RuntimeError/TVMError/socket errors, all with long text
            hint = (f"is `python -m tvm.exec.rpc_tracker` running there, and a server registered with key "
                    f"{self.key!r}?" if self.tracker else "is `python -m tvm.exec.rpc_server` running there?")
            raise TargetError(f"cannot reach the device ({self.describe()}): {tvm_build.error_line(exc)}; "
                              f"{hint}") from exc


@provides("device-runner")
def device_runner(rpc: str | None = None, tracker: str | None = None, key: str | None = None) -> Runner | None:
    """The device behind --rpc HOST:PORT or --tracker HOST:PORT --key KEY (None for neither)."""
    return Runner.from_args(rpc, tracker, key)


def registered(summary: dict, key: str | None) -> int:
    """Servers under `key` in a tracker's `summary()` (its `server_info` entries keyed `server:KEY`)."""
    return sum(1 for info in summary.get("server_info", []) if info.get("key") == f"server:{key}")


def _address(text: str, flag: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", text.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise RemoteError(f"{flag} {text!r}: expected HOST:PORT, e.g. 192.168.1.20:9090")
    return m.group(1), int(m.group(2))


def _join(addr: tuple[str, int] | None) -> str | None:
    return f"{addr[0]}:{addr[1]}" if addr else None


# ------------------------------------------------------------------------------------------------ measuring

def export(executable, path: Path, cross_compiler: str | None = None) -> Path:
    """`executable.export_library(path)`, with `cross_compiler` (e.g. aarch64-linux-gnu-g++) when given."""
    tvm_build.tvm()
    from tvm.support import cc  # noqa: PLC0415
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if cross_compiler:
            executable.export_library(str(path), fcompile=cc.cross_compiler(cross_compiler))
        else:
            executable.export_library(str(path))
    except Exception as exc:
        raise TargetError(f"exporting the library failed: {tvm_build.error_line(exc)}") from exc
    return path


def measure(runner: Runner, library: Path, input_names: list[str], samples: list[dict[str, np.ndarray]],
            runs: int, device: str = "cpu") -> tuple[dict[str, np.ndarray], dict, dict]:
    """Upload `library`, run every sample on the device, time `main` there.

    Returns (stacked outputs, latency {p50, p90, min, runs} in ms, device info).
    """
    tvm = tvm_build.tvm()
    from tvm import relax  # noqa: PLC0415
    sess = runner.connect()
    try:
        sess.upload(str(library))
        rlib = sess.load_module(library.name)
        dev = sess.device(_DEVICE_TYPES[device], 0)
        vm = relax.VirtualMachine(rlib, dev)
        outputs = []
        for feed in samples:
            args = [tvm.runtime.tensor(np.ascontiguousarray(feed[n]), dev) for n in input_names]
            outputs.append(tvm_build.flatten_outputs(vm["main"](*args)))
        args = [tvm.runtime.tensor(np.ascontiguousarray(samples[0][n]), dev) for n in input_names]
        vm.set_input("main", *args)
        # One warm-up call is built in; each repeat averages `number` calls lasting at least 10 ms in all.
        timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=max(runs, 1), min_repeat_ms=10)
        result = timer("main")
        ms = np.array(result.results) * 1e3
        latency = {"p50": float(np.median(ms)), "p90": float(np.percentile(ms, 90)), "min": float(ms.min()),
                   "runs": int(len(ms))}
    except TargetError:
        raise
    except Exception as exc:
        raise TargetError(f"running on the device ({runner.describe()}) failed: {tvm_build.error_line(exc)}") \
            from exc
    finally:
        try:
            sess.remove(library.name)
        except Exception:  # the session may already be gone; the server cleans its temp dir anyway
            pass
    stacked = {str(i): np.stack([o[i] for o in outputs]) for i in range(len(outputs[0]))}
    return stacked, latency, {"device": runner.describe(), **runner.as_dict()}


_DEVICE_TYPES = {"cpu": 1, "cuda": 2, "opencl": 4, "vulkan": 7, "metal": 8}


def measure_executable(runner: Runner, executable, input_names: list[str], samples, runs: int, *,
                       cross_compiler: str | None = None, device: str = "cpu", folder: Path | None = None):
    """Export an in-memory executable (to `folder`, else a temp dir) and `measure()` it on the device."""
    if folder is not None:
        return measure(runner, export(executable, folder / "model.so", cross_compiler), input_names, samples, runs,
                       device)
    with tempfile.TemporaryDirectory(prefix="squeeze-rpc-") as scratch:  # removed with its model.so afterwards
        lib = export(executable, Path(scratch) / "model.so", cross_compiler)
        return measure(runner, lib, input_names, samples, runs, device)


# ------------------------------------------------------------------------------------------------ tuning

def ms_runner(runner: Runner, *, number: int = 10, repeat: int = 5, min_repeat_ms: int = 20,
              workers: int | None = None) -> Any:
    """A MetaSchedule runner that times candidates on the device: through the tracker (`--tracker --key`), or
    straight at a lone server (`--rpc`). The evaluator settings are those of squeeze's local tuning runner, so
    a database's records are measured alike wherever they come from.

    Behind a tracker the candidates of a batch are timed on every device registered under the key at once:
    the runner gets one worker per device (`workers`, default `Runner.devices()`), each worker asks the tracker
    for a session and the tracker hands each a free server. With one worker (MetaSchedule's default on a
    2-core host) they queued for one device however many were registered.

    MetaSchedule's RPCRunner asks a tracker for a session; for `--rpc` its `f_create_session` hook connects to
    the server itself instead (RPCConfig's tracker fields then carry the server's address).
    """
    tvm_build.tvm()
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner  # noqa: PLC0415
    host, port = runner.tracker or runner.rpc
    config = RPCConfig(tracker_host=host, tracker_port=port, tracker_key=runner.key or "direct",
                       session_timeout_sec=runner.session_timeout)
    evaluator = EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                enable_cpu_cache_flush=False)
    return RPCRunner(rpc_config=config, evaluator_config=evaluator,
                     f_create_session=None if runner.tracker else _direct_session,
                     max_workers=max(1, workers or runner.devices()))


def _direct_session(config):
    """RPCRunner's session for `--rpc HOST:PORT` (runs in the runner's worker process)."""
    from tvm import rpc  # noqa: PLC0415
    return rpc.connect(config.tracker_host, int(config.tracker_port), session_timeout=config.session_timeout_sec)
