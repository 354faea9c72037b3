"""Files of the project: paths relative to the repository root, checkpoint hashes and the model
identity built from them, errors."""
from __future__ import annotations

import hashlib
import json
import os
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


def checkpoint_sha256(model: dict, missing_ok: bool = False) -> str | None:
    """sha256 of a config's ``model:`` checkpoint file: the config's ``model.sha256`` when it
    gives one, else the file's; an absent file: None with ``missing_ok`` (else the OSError)."""
    if model.get("sha256"):
        return model["sha256"]
    path = resolve_path(model["checkpoint"])
    if missing_ok and not path.exists():
        return None
    return file_sha256(path)


def model_identity(config: str | None, checkpoint: str | Path, sha256: str | None, *,
                   family: str | None = None, h_module: str | None = None, h_pool=None) -> dict:
    """The identity of a model that runs, extractions and ADPs record and ``ADP.load`` checks:
    the config's name, the checkpoint as the config names it, its sha256 (None: unknown) and, for
    a text-to-image ``family``, the family and where h is read (``h_module``, ``h_pool``)."""
    identity = {"config": config, "checkpoint": str(checkpoint), "checkpoint_sha256": sha256}
    if family is not None:
        identity.update(family=family, h_module=h_module, h_pool=h_pool)
    return identity


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_tensors(path: str | Path, what: str, error: type = CheckpointError):
    """``torch.load(path, weights_only=True)``: tensors and plain values only, so a file can
    never run code while it loads. Any failure (a pickle that needs code, a truncated or a text
    file) is an ``error`` that names the file and what it should have been."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                       # UnpicklingError, EOFError, RuntimeError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise error(f"{path} cannot be read as {what}: files of this project hold tensors and plain "
                    f"values only, and this one is not such a file ({type(e).__name__}: {first})") from None


def check_writable(path: str | Path, flag: str) -> Path:
    """The folder that writing ``path`` (a file or folder, existing or not) writes into: the
    nearest existing folder at or above it, checked to be a folder this process may write into;
    otherwise a ValueError naming ``flag``, the path and the fix."""
    path = Path(path)
    place = path if path.is_dir() else path.parent
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise ValueError(f"{flag} {path}: {place} is a file, not a folder, so nothing can be made inside it; "
                         f"choose another {flag}")
    if not os.access(place, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write to {place} (permission denied); choose another {flag}")
    return place


def read_json_object(path: str | Path, what: str, fix: str) -> dict:
    """The JSON object in ``path``; a file that is not valid JSON, or holds something else than
    an object, is a ``ValueError`` that names the file, ``what`` it should be and the ``fix``."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not text"
        raise ValueError(f"{path} is not valid JSON ({where}); it should be {what}; {fix}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise ValueError(f"{path} holds {kind}, not {what} (a JSON object); {fix}")
    return value
