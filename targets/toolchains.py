"""External tools the non-host targets need (cross compilers, emulators, OpenCL), found on PATH.

Each tool belongs to a group that `scripts/install-toolchains.sh GROUP` installs from Debian packages. A target
asks `missing(group)` before it builds: a missing tool becomes one line saying what to install, never a
traceback, and the other targets still run. `squeeze doctor` prints `report()`.
"""
from __future__ import annotations

import ctypes.util
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from squeeze.registry import provides

INSTALL_SCRIPT = "scripts/install-toolchains.sh"


@dataclass(frozen=True)
class Tool:
    name: str          # executable (or library) looked up
    group: str         # install-toolchains.sh group
    package: str       # Debian package that provides it
    purpose: str
    library: bool = False


TOOLS = (
    Tool("aarch64-linux-gnu-gcc", "arm", "gcc-aarch64-linux-gnu", "cross-compile arm shared libraries and executables"),
    Tool("aarch64-linux-gnu-g++", "arm", "g++-aarch64-linux-gnu", "link arm shared libraries (TVM export_library)"),
    Tool("qemu-aarch64", "arm", "qemu-user", "run arm executables without a device (method=emulated)"),
    Tool("arm-none-eabi-gcc", "mcu", "gcc-arm-none-eabi libnewlib-arm-none-eabi", "build bare-metal Cortex-M firmware"),
    Tool("arm-none-eabi-size", "mcu", "binutils-arm-none-eabi", "measure firmware flash and RAM"),
    Tool("qemu-system-arm", "mcu", "qemu-system-arm", "run firmware on an emulated MPS2 board (method=instruction-count)"),
    Tool("OpenCL", "mobile-gpu", "ocl-icd-opencl-dev pocl-opencl-icd", "OpenCL loader and a CPU OpenCL driver (PoCL)",
         library=True),
    Tool("clinfo", "mobile-gpu", "clinfo", "list OpenCL platforms (diagnostics only)"),
)


def find(tool: Tool) -> str | None:
    """Path of the tool, or None."""
    if tool.library:
        return ctypes.util.find_library(tool.name)
    return shutil.which(tool.name)


def install_hint(group: str) -> str:
    packages = " ".join(dict.fromkeys(p for t in TOOLS if t.group == group for p in t.package.split()))
    return f"run `{INSTALL_SCRIPT} {group}` (Debian/Ubuntu: apt-get install {packages}), or `squeeze doctor`"


def missing(group: str, *, optional: tuple[str, ...] = ("clinfo",)) -> str | None:
    """None when every required tool of `group` is present, else one line naming the missing ones and the fix."""
    gone = [t.name for t in TOOLS if t.group == group and t.name not in optional and not find(t)]
    if not gone:
        return None
    return f"{', '.join(gone)} not found; {install_hint(group)}"


def newlib_present() -> bool:
    """arm-none-eabi-gcc can be installed without newlib (libnewlib-arm-none-eabi): libm/libc are then missing."""
    gcc = shutil.which("arm-none-eabi-gcc")
    if not gcc:
        return False
    out = subprocess.run([gcc, "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16",
                          "-print-file-name=libm.a"], capture_output=True, text=True).stdout.strip()
    return bool(out) and Path(out).is_absolute() and Path(out).exists()


def opencl_devices() -> list[str]:
    """'platform: device' for each OpenCL device the ICD loader finds (empty without a loader or driver)."""
    from . import opencl_cpu  # noqa: PLC0415
    try:
        return opencl_cpu.list_devices()
    except Exception:  # no loader, no ICD, broken driver: doctor reports it as none
        return []


def version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.splitlines()[0].strip() if out else ""


def report() -> list[tuple[str, str, str, str]]:
    """(group, tool, status, detail) rows for `squeeze doctor`."""
    rows = []
    for tool in TOOLS:
        path = find(tool)
        if not path:
            rows.append((tool.group, tool.name, "missing", f"apt-get install {tool.package}  ({tool.purpose})"))
            continue
        detail = path if tool.library else f"{version(path) or path}"
        rows.append((tool.group, tool.name, "ok", detail))
    if shutil.which("arm-none-eabi-gcc"):
        ok = newlib_present()
        rows.append(("mcu", "newlib (libc/libm)", "ok" if ok else "missing",
                     "arm-none-eabi newlib" if ok else "apt-get install libnewlib-arm-none-eabi"))
    if find(TOOLS[6]):
        devices = opencl_devices()
        rows.append(("mobile-gpu", "OpenCL devices", "ok" if devices else "missing",
                     "; ".join(devices) if devices else "no OpenCL device: apt-get install pocl-opencl-icd"))
    return rows


def run_tool(cmd: list[str], *, what: str, cwd: Path | None = None, timeout: float = 600,
             check: bool = True) -> str:
    """Run an external tool; TargetError with the tool's last lines when it fails or times out."""
    from squeeze.errors import TargetError  # noqa: PLC0415
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              errors="replace")
    except FileNotFoundError:
        raise TargetError(f"{what}: {cmd[0]} not found") from None
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        raise TargetError(f"{what}: timed out after {timeout:.0f} s (last output: "
                          f"{' | '.join(out.strip().splitlines()[-2:]) or 'none'})") from None
    if check and proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()] or lines
        raise TargetError(f"{what} failed (exit {proc.returncode}): {' | '.join(errors[:3])[:400]}")
    return proc.stdout + proc.stderr


def script_path() -> Path | None:
    """scripts/install-toolchains.sh of this checkout (absent from a wheel install)."""
    path = Path(__file__).resolve().parents[1] / INSTALL_SCRIPT
    return path if path.is_file() else None


@provides("doctor")
def doctor(install: bool = False, out=print) -> int:
    """`squeeze doctor [--install]`: what each target needs and whether it is here. Returns the exit status."""
    if install:
        script = script_path()
        if script is None:
            out(f"squeeze doctor: {INSTALL_SCRIPT} is not part of this installation; install the packages "
                f"listed below with apt-get")
        else:
            status = subprocess.run(["bash", str(script), "all"]).returncode
            if status != 0:
                out(f"squeeze doctor: {INSTALL_SCRIPT} failed (exit {status})")
                return 1
    rows = report()
    out("Toolchains (scripts/install-toolchains.sh installs them on Debian/Ubuntu):")
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for group, name, status, detail in rows:
        out(f"  {group.ljust(widths[0])}  {name.ljust(widths[1])}  {status.ljust(widths[2])}  {detail}")
    out("")
    out("Targets:")
    from squeeze.registry import all_targets  # noqa: PLC0415
    for entry in sorted(all_targets().values(), key=lambda e: e.name):
        try:
            target = entry.obj()
            why = target.missing()
        except Exception as exc:  # a target that cannot even be constructed here says why
            why = f"{type(exc).__name__}: {exc}"
        out(f"  {entry.name.ljust(12)}  {'ready' if not why else 'not ready: ' + why}")
        for line in getattr(target, "doctor_notes", lambda: [])() if not why else []:
            out(f"  {''.ljust(12)}  {line}")
    tvm_version = _tvm_version()
    out("")
    out(f"TVM {tvm_version or 'not installed (targets cannot compile)'}; devices over RPC: --rpc HOST:PORT or "
        "--tracker HOST:PORT --key KEY (python -m tvm.exec.rpc_server on the device)")
    missing_rows = [r for r in rows if r[2] != "ok"]
    if missing_rows and not install:
        hint = f"bash {script_path()} all" if script_path() else "apt-get install the packages above"
        out(f"Missing: {', '.join(r[1] for r in missing_rows)}. Install: {hint}  (or: squeeze doctor --install)")
    return 0


def _tvm_version() -> str | None:
    try:
        from importlib.metadata import version  # noqa: PLC0415
        return version("apache-tvm")
    except Exception:  # not installed
        return None
