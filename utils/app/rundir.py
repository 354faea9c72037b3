"""The output folder of a run: what a run may write there, a lock for the length of a run, the
check that ``--resume`` continues the same run, ``--overwrite`` that removes only a run's own
files, and images written atomically.

A run writes ``{seed:06d}.png`` (at least six digits), ``grid.png``, ``run.json``, ``eval.json``
and, while it runs, ``.lock`` and ``.*.tmp`` files. ``run.json`` is written when the run starts
(``"status": "running"``) and again when it ends, so a killed run can be resumed and checked.
"""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import numpy as np
from PIL import Image

from models.files import check_writable, write_atomic

OWN_FILE = re.compile(r"^(\d{6,}\.png|grid\.png|run\.json|eval\.json|\.lock|\..*\.tmp(\.png)?)$")
#: the keys of run.json's "identity" that --resume compares
IDENTITY_KEYS = ("mode", "config", "model_sha256", "adp", "adp_sha256", "steps", "timesteps", "eta",
                 "asymmetric", "batch_size", "world_size", "guidance", "text")


class RunFolderError(ValueError):
    """The output folder cannot take this run (not empty, another run, locked, not writable)."""


def foreign_files(out: Path) -> list[str]:
    """Names in ``out`` that a run of this project does not write."""
    return sorted(p.name for p in out.iterdir() if not OWN_FILE.match(p.name))


def image_ok(path: Path, shape: tuple[int, int, int] | None = None) -> bool:
    """Whether a PNG decodes completely (and has the image shape C,H,W when given)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception:                         # truncated, empty, not a PNG
        return False
    if shape is None:
        return True
    c, h, w = shape
    return arr.shape[:2] == (h, w) and (arr.ndim == 2 and c == 1 or arr.ndim == 3 and arr.shape[2] == c)


def differences(old: dict, new: dict) -> list[str]:
    """The identity keys on which two run.json records differ, as 'key: old -> new'."""
    out = []
    for k in IDENTITY_KEYS:
        if old.get(k) != new.get(k):
            a, b = json.dumps(old.get(k), sort_keys=True), json.dumps(new.get(k), sort_keys=True)
            out.append(f"{k}: {a[:120]} -> {b[:120]}")
    return out


class RunFolder:
    """The output folder of one run (rank 0 checks and locks it; every rank writes images)."""

    def __init__(self, out: Path, image_shape: tuple[int, int, int] | None = None):
        self.out, self.image_shape = Path(out), image_shape
        self.lock = self.out / ".lock"
        self._locked = False
        self._created: list[Path] = []        # folders this run made (``abandon`` removes them)
        self._was_empty = False

    # ---- before anything is written -----------------------------------------------------------
    def check(self, identity: dict, overwrite: bool, resume: bool, seeds: list[int] | None = None) -> None:
        """Refuse, before touching anything, a folder this run must not write into (``seeds``:
        the run's; --resume continues a run of the same seeds, or of more)."""
        if overwrite and resume:
            raise RunFolderError("--overwrite and --resume contradict each other; give one")
        out = self.out
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--exp {out} is a file, not a folder")
        if not out.exists() or not any(out.iterdir()):
            self._check_writable(out)
            return
        self._check_not_locked()
        foreign = foreign_files(out)
        if overwrite:
            if foreign:
                raise RunFolderError(f"--overwrite refuses {out}: it holds files a run does not write "
                                     f"({foreign[:8]}{' ...' if len(foreign) > 8 else ''}); move them or "
                                     f"choose another --exp")
        elif resume:
            rec = out / "run.json"
            if not rec.exists():
                raise RunFolderError(f"--resume: {out} has no run.json, so it cannot be checked to be the "
                                     f"same run; pass --overwrite to replace it or choose another --exp")
            try:
                record = json.loads(rec.read_text())
                old = record.get("identity", {})
            except (json.JSONDecodeError, AttributeError):
                raise RunFolderError(f"--resume: {rec} is not a run record (broken JSON); pass "
                                     f"--overwrite to replace the run") from None
            diff = differences(old, identity)
            if diff:
                raise RunFolderError(f"--resume: {out} holds another run; it differs in "
                                     + "; ".join(diff) + ". Use the same settings, or another --exp")
            if seeds is not None:
                self._check_same_seeds(record.get("seeds") or [], set(seeds))
        else:
            raise RunFolderError(f"output folder {out} is not empty; pass --resume to continue the run "
                                 f"there or --overwrite to replace it")
        self._check_writable(out)

    def _check_same_seeds(self, recorded: list, seeds: set[int]) -> None:
        """--resume: the folder's seeds (``recorded``, its run.json's, and its images') are among
        this run's."""
        on_disk = [int(p.name[:-4]) for p in self.out.iterdir() if re.fullmatch(r"\d{6,}\.png", p.name)]
        other = sorted(({int(s) for s in recorded if isinstance(s, int)} | set(on_disk)) - seeds)
        if other:
            shown = ", ".join(map(str, other[:6])) + (" ..." if len(other) > 6 else "")
            raise RunFolderError(f"--resume: {self.out} holds the run of other seeds ({len(other)} not asked "
                                 f"for now: {shown}); --resume continues a run with the same seeds (or more). "
                                 f"Pass that run's seeds (run.json 'seeds'), or choose another --exp")

    @staticmethod
    def _check_writable(folder: Path) -> None:
        try:
            check_writable(folder, "--exp")
        except ValueError as e:
            raise RunFolderError(str(e)) from None

    def _lock_owner(self) -> tuple[int, str] | None:
        try:
            pid, host = self.lock.read_text().split()[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None

    def _check_not_locked(self) -> None:
        owner = self._lock_owner()
        if owner is None:
            return
        pid, host = owner
        if host != socket.gethostname():
            raise RunFolderError(f"{self.out} is locked by process {pid} on {host} ({self.lock}); if that "
                                 f"run is over, delete the lock file")
        if pid != os.getpid() and _alive(pid):
            raise RunFolderError(f"{self.out} is being written by process {pid} (lock {self.lock}); wait "
                                 f"for it to finish or choose another --exp")

    # ---- the run ------------------------------------------------------------------------------
    def open(self, overwrite: bool) -> None:
        """Create the folder, take the lock (a stale one is taken over), clear it if asked."""
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        self._created = missing
        self._was_empty = not any(p for p in self.out.iterdir() if p.name != ".lock")
        self._check_not_locked()
        tmp = self.out / f".lock.{os.getpid()}.tmp"
        tmp.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        os.replace(tmp, self.lock)
        if self._lock_owner() != (os.getpid(), socket.gethostname()):     # lost a race
            raise RunFolderError(f"{self.out} was locked by another run at the same moment")
        self._locked = True
        if overwrite:
            for p in self.out.iterdir():
                if OWN_FILE.match(p.name) and p.name != ".lock":
                    p.unlink()

    def abandon(self) -> None:
        """After a run failed: if it wrote no image into a folder that was empty, remove what it
        wrote (run.json) and the folders it made, so the folder is as it was."""
        if not self._locked or not self._was_empty:
            return
        if any(p.suffix == ".png" and p.name != "grid.png" for p in self.out.iterdir()):
            return
        for p in self.out.iterdir():
            if OWN_FILE.match(p.name) and p.name != ".lock":
                p.unlink(missing_ok=True)
        self.close()
        for folder in self._created:           # innermost first
            try:
                folder.rmdir()
            except OSError:
                break

    def close(self) -> None:
        if self._locked and self._lock_owner() == (os.getpid(), socket.gethostname()):
            self.lock.unlink(missing_ok=True)
        self._locked = False

    def finished_seeds(self, seeds: list[int]) -> set[int]:
        """Seeds whose image is there and decodes (a broken image is removed and redone)."""
        done = set()
        for s in seeds:
            p = self.out / f"{s:06d}.png"
            if p.exists():
                if image_ok(p, self.image_shape):
                    done.add(s)
                else:
                    p.unlink(missing_ok=True)
        return done

    def write_record(self, record: dict) -> None:
        write_atomic(self.out / "run.json", (json.dumps(record, indent=1) + "\n").encode())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
