"""`squeeze doctor` and scripts/install-toolchains.sh: what each target needs, whether it is here, how to get it."""
from __future__ import annotations

import subprocess

from squeeze.cli import main
from squeeze.targets import toolchains


def test_doctor_lists_every_toolchain_and_target(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for tool in ("aarch64-linux-gnu-gcc", "qemu-aarch64", "arm-none-eabi-gcc", "qemu-system-arm", "OpenCL"):
        assert tool in out
    for target in ("cpu", "arm", "mcu"):
        assert f"\n  {target} " in out
    assert "--tracker" in out


def test_doctor_names_the_install_command_when_tools_are_missing(monkeypatch, capsys):
    monkeypatch.setattr(toolchains.shutil, "which", lambda name: None)
    monkeypatch.setattr(toolchains, "find", lambda tool: None)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "missing" in out and "apt-get install gcc-arm-none-eabi" in out
    assert "install-toolchains.sh" in out
    assert "not ready" in out


def test_missing_names_group_packages():
    hint = toolchains.install_hint("mcu")
    assert "scripts/install-toolchains.sh mcu" in hint and "libnewlib-arm-none-eabi" in hint


def test_install_script_check_mode_is_fast_and_says_what_is_missing(repo):
    script = repo / "scripts" / "install-toolchains.sh"
    proc = subprocess.run(["bash", str(script), "--check", "mcu"], capture_output=True, text=True, timeout=30)
    assert proc.returncode in (0, 1)
    assert ("all present" in proc.stdout) if proc.returncode == 0 else ("missing:" in proc.stdout)
    bad = subprocess.run(["bash", str(script), "bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_doctor_rejects_unknown_flags(capsys):
    assert main(["doctor", "--bogus"]) == 2
