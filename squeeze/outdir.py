"""The output folder: locked against concurrent runs, written through a staging folder, committed at the end.

Everything a run writes (model, reports, target artifacts) goes to `OUTDIR/.squeeze-staging-PID/` first; only
when the run gets to the end are the files moved into OUTDIR, one atomic rename each. An interrupted or crashed
run removes its staging folder, so the previous outputs stay as they were and no partial file is left. A second
run into the same folder while one is going is refused (an advisory `flock` on `OUTDIR/.squeeze.lock`).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from .errors import OutputError

LOCK_NAME = ".squeeze.lock"
STAGING_PREFIX = ".squeeze-staging-"
OWN_MARKERS = ("report.json",)
STALE_UNLESS_WRITTEN = ("model.onnx.data",)


def check(out: Path, force: bool = False) -> None:
    """Refuse a path that is a file, a symlink, or a non-empty folder squeeze did not write (unless `force`)."""
    if out.is_symlink():
        raise OutputError(f"{out}: is a symbolic link; give a real directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if out.is_dir() and not force:
        entries = [p for p in out.iterdir() if p.name != LOCK_NAME and not p.name.startswith(STAGING_PREFIX)]
        if entries and not _holds_squeeze_report(out):
            raise OutputError(f"{out}: directory is not empty and holds no squeeze report; "
                              "choose another -o or pass --force")


def _holds_squeeze_report(out: Path) -> bool:
    """True if `out` has a report.json that squeeze wrote (not just any file of that name)."""
    report = out / OWN_MARKERS[0]
    try:
        if report.is_symlink() or not report.is_file() or report.stat().st_size > 64 * 2**20:
            return False
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "squeeze_version" in data and "schema" in data


class OutputDir:
    """`with OutputDir(path) as out:` write into `out.staging`, then `out.commit()`; anything else rolls back."""

    def __init__(self, path: str | os.PathLike, force: bool = False):
        self.path = Path(path)
        self.force = force
        self.staging: Path | None = None
        self._lock_fd: int | None = None
        self.committed: list[Path] = []
        self.had_report = False

    def __enter__(self) -> "OutputDir":
        check(self.path, self.force)
        self.had_report = self.path.is_dir() and _holds_squeeze_report(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.path / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise OutputError(f"{self.path}: output directory is not writable ({exc.strerror or exc})") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise OutputError(f"{self.path}: another squeeze run is writing to this folder; wait for it or use "
                              "another -o") from None
        for stale in self.path.glob(STAGING_PREFIX + "*"):  # left by a run that was killed outright
            if stale.is_symlink() or not stale.is_dir():
                stale.unlink(missing_ok=True)  # never follow a link someone put here
            else:
                shutil.rmtree(stale, ignore_errors=True)
        staging = self.path / f"{STAGING_PREFIX}{os.getpid()}"
        try:
            staging.mkdir()
        except OSError as exc:
            self.__exit__(None, None, None)  # releases the lock
            raise OutputError(f"{self.path}: cannot create the staging folder ({exc.strerror or exc})") from None
        self.staging = staging
        return self

    def commit(self) -> list[Path]:
        """Move every staged file into the folder (atomic rename each), never through a symlink.

        Every destination is checked before the first file moves, so a refused commit leaves the previous
        outputs as they were rather than half replaced.
        """
        assert self.staging is not None
        items = [p for p in sorted(self.staging.rglob("*")) if not p.is_dir()]
        for item in items:
            rel = item.relative_to(self.staging)
            for depth in range(1, len(rel.parts) + 1):  # the file and every folder on the way to it
                dest = self.path.joinpath(*rel.parts[:depth])
                if dest.is_symlink():
                    raise OutputError(f"{dest}: is a symbolic link; refusing to write through it")
        moved = []
        for item in items:
            dest = self.path / item.relative_to(self.staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.parent.resolve().is_relative_to(self.path.resolve()):
                raise OutputError(f"{dest}: would be written outside {self.path}")
            os.replace(item, dest)
            moved.append(dest)
        for name in STALE_UNLESS_WRITTEN if self.had_report else ():  # an earlier run's external data must not
            old = self.path / name                                       # sit beside the new model
            if old not in moved and (old.is_file() or old.is_symlink()):
                old.unlink()
        self.committed = moved
        return moved

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
