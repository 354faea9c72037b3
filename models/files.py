"""Files of the project: paths relative to the repository root, checkpoint hashes, errors."""
from __future__ import annotations

import hashlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class CheckpointError(ValueError):
    """A checkpoint is missing, or does not fit the architecture its config describes."""


def resolve_path(path: str | Path) -> Path:
    """Paths in configs are relative to the repository root unless absolute."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def file_sha256(path: Path) -> str:
    """sha256 of a checkpoint file (or of a folder's files), used to tie classifiers to models."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
