"""h-vector extraction, streamed to disk in shards; resumable.

Format of an extraction folder:
  ``meta.json``            model config + checkpoint sha256, h shape, timesteps (sampling order,
                           t = T-1 first), source (``folders`` or ``pseudo``), attributes and
                           class names, shard size, number of samples ``n`` and what they are
                           (``seeds``; for folders ``images_sha256``, the sha256 of the sorted
                           ``class/file`` names).
  ``shard_00000.pt`` ...   {"h": float16 [n, S, C, H, W], "labels": {attr: int64 [n]},
                           "ids": [n] (seeds, or image paths), "probs": {attr: float [n, K]}}
Each shard is written to a temporary name and renamed when complete, so an interrupted run
resumes after its last finished shard and never reads a half-written one. A rerun into the same
folder resumes only the same extraction (meta.json's identity keys, ``IDENTITY_KEYS``, agree)
and redoes any shard that does not load or does not hold its samples. Memory stays bounded by
one batch whatever the number of samples.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from models.files import check_writable, load_tensors, read_json_object, write_atomic
from utils.sampling.diffusion import DDIMSampler
from utils.sampling.seeds import SeededNoise

log = logging.getLogger(__name__)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


#: meta.json keys that must agree for a rerun into a folder to resume the extraction there
IDENTITY_KEYS = ("model", "h_shape", "timesteps", "source", "attributes", "shard_size", "seeds", "eta", "text",
                 "folder", "n", "images_sha256")
#: the keys every reader of an extraction needs
META_KEYS = ("timesteps", "h_shape", "attributes")
REDO = "re-run the extraction (script_extract_he.sh, main.py) into a new --savepath"


def check_savepath(out: Path) -> None:
    """Refuse, before anything is written, an output folder that cannot take an extraction: a
    file, a folder holding other files and no extraction, or a place that cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--savepath {out} is a file; give a folder (a new one, or an extraction to resume)")
    if out.is_dir() and not (out / "meta.json").exists() and any(out.iterdir()):
        raise ValueError(f"--savepath {out} holds other files and no extraction (no meta.json); "
                         f"give a new or empty folder")
    check_writable(out, "--savepath")


def _changes(old: dict, new: dict, keys: list[str]) -> str:
    """'key: old -> new' for the identity keys on which two records differ."""
    out = []
    for k in keys:
        if k == "images_sha256":
            out.append("the image list (class/file names) differs")
        else:                                        # paths in full, other values shortened
            a, b = (v if isinstance(v, str) else json.dumps(v, sort_keys=True)[:60] for v in (old.get(k), new.get(k)))
            out.append(f"{k}: {a} -> {b}")
    return "; ".join(out)


def _write_meta(out: Path, meta: dict) -> None:
    """Start an extraction in ``out``, or check that the one already there is this one."""
    check_savepath(out)
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = read_meta(out)
        diff = [k for k in IDENTITY_KEYS if old.get(k) != meta.get(k)
                and (k in old or k != "images_sha256")]       # older records: shards' ids are checked
        if diff:
            raise ValueError(f"{out} already holds an extraction with different {diff} ({_changes(old, meta, diff)}); "
                             f"use another --savepath or delete the folder")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode())


def _save_shard(out: Path, k: int, shard: dict) -> None:
    tmp = out / f".shard_{k:05d}.pt.tmp"
    torch.save(shard, tmp)
    os.replace(tmp, out / f"shard_{k:05d}.pt")


def _shard_problem(path: Path, ids: list, meta: dict, prompt: str | None) -> str | None:
    """Why shard ``path`` is not the finished shard of the samples ``ids`` (None: it is)."""
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:                       # truncated, empty, not a shard
        return f"cannot be read ({type(e).__name__})"
    if not isinstance(shard, dict):
        return f"holds a {type(shard).__name__}, not a shard"
    h, labels = shard.get("h"), shard.get("labels")
    want = (len(ids), len(meta["timesteps"]), *meta["h_shape"])
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != want:
        return f"holds h of shape {tuple(h.shape) if isinstance(h, torch.Tensor) else None}, not {want}"
    if not isinstance(labels, dict) or sorted(labels) != sorted(meta["attributes"]) or any(
            not isinstance(v, torch.Tensor) or v.shape != (len(ids),) for v in labels.values()):
        return f"does not hold one label per sample for {sorted(meta['attributes'])}"
    if list(shard.get("ids") or []) != list(ids):
        return "holds other samples"
    if shard.get("prompt") != prompt:
        return f"holds the prompt {shard.get('prompt')!r}, not {prompt!r}"
    return None


def shard_done(out: Path, k: int, ids: list, meta: dict, prompt: str | None = None) -> bool:
    """Whether shard k of ``out`` is finished for the samples ``ids`` (and ``prompt``). A shard
    that is not (cut short, other rows or h shape, other samples) is removed, with a warning,
    so that it is extracted again."""
    path = out / f"shard_{k:05d}.pt"
    if not path.exists():
        return False
    problem = _shard_problem(path, ids, meta, prompt)
    if problem is None:
        return True
    log.warning("%s %s: removed, to be extracted again", path, problem)
    path.unlink()
    return False


def extract_pseudo_labelled(sampler: DDIMSampler, seeds: list[int], labeller, out: Path,
                            meta: dict, batch_size: int = 100, device="cpu") -> Path:
    """The paper's way: sample with the model, record h at every step, label the final images.

    :param labeller: a Judge (``predict(images) -> {attr: probs [N,K]}``, ``attributes``).
    """
    net = sampler.net
    meta = {**meta, "source": "pseudo", "timesteps": sampler.timesteps, "h_shape": list(net.h_shape),
            "attributes": labeller.attributes, "shard_size": batch_size, "n": len(seeds),
            "eta": sampler.eta, "seeds": [seeds[0], seeds[-1]] if seeds == list(range(seeds[0], seeds[-1] + 1))
            else list(seeds)}
    _write_meta(out, meta)
    shape = net.image_shape
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    for k, batch in enumerate(tqdm(batches, desc="extract (pseudo-labels)")):
        if shard_done(out, k, list(batch), meta):
            continue
        noise = SeededNoise(batch, shape, device)
        x0, hs = sampler.sample(noise.x_T(), noise.step, record_h=True)
        probs = labeller.predict(x0.clamp(-1, 1).cpu())
        _save_shard(out, k, {"h": hs.half(), "ids": list(batch),
                             "labels": {a: p.argmax(1) for a, p in probs.items()},
                             "probs": {a: p.float() for a, p in probs.items()}})
    return out


def list_class_folders(root: Path) -> dict[str, list[Path]]:
    """{class name: image paths} from ``root/<class>/*``; clear errors for empty/missing (hidden
    files are left out, other files that are not images are left out with a warning)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (--test_path_one)")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders: put the images of each "
                         f"class in its own folder, e.g. {root}/male and {root}/female")
    out = {}
    for d in classes:
        visible = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
        files = [p for p in visible if p.suffix.lower() in IMAGE_EXTS]
        if not files:
            raise ValueError(f"class folder {d} holds no images ({sorted(IMAGE_EXTS)}); put its images "
                             f"there or remove the folder")
        if len(files) < len(visible):
            log.warning("class folder %s: %d files that are not images left out (%s)", d,
                        len(visible) - len(files), ", ".join(p.name for p in visible if p not in files)[:120])
        out[d.name] = files
    return out


def check_image(path: Path) -> None:
    """Refuse a file that is not a readable image (its header; for PNG every chunk's checksum),
    naming it; cheap: nothing is decoded."""
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:                  # UnidentifiedImageError, OSError, SyntaxError, struct.error
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise ValueError(f"cannot read image {path} ({first}); replace or remove the file") from None


def images_sha256(classes: dict[str, list[Path]]) -> str:
    """sha256 of the sorted ``class/file`` names: which images a folder extraction is of."""
    names = [f"{c}/{p.name}" for c, files in classes.items() for p in files]
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """An image file -> [channels, size, size] in [-1, 1] (centre-cropped square, bicubic)."""
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}; replace or remove the file") from None
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    arr = np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1
    t = torch.from_numpy(arr)
    return t[None] if channels == 1 else t.permute(2, 0, 1)


def extract_from_folders(sampler: DDIMSampler, root: Path, attribute: str, out: Path, meta: dict,
                         batch_size: int = 50, device="cpu") -> Path:
    """The original way: DDIM-invert (eta 0) each image of ``root/<class>/``, record h per step."""
    classes = list_class_folders(root)
    for files in classes.values():
        for p in files:
            check_image(p)                  # every image, before anything is written
    net = sampler.net
    channels, size, _ = net.image_shape
    items = [(p, c) for c, (_, files) in enumerate(classes.items()) for p in files]
    meta = {**meta, "source": "folders", "folder": str(root), "timesteps": sampler.timesteps,
            "h_shape": list(net.h_shape), "attributes": {attribute: list(classes)},
            "shard_size": batch_size, "n": len(items), "images_sha256": images_sha256(classes), "eta": 0.0}
    _write_meta(out, meta)
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    for k, batch in enumerate(tqdm(batches, desc="extract (DDIM inversion)")):
        if shard_done(out, k, [str(p) for p, _ in batch], meta):
            continue
        x0 = torch.stack([load_image(p, size, channels) for p, _ in batch]).to(device)
        _, hs = sampler.invert(x0, record_h=True)
        _save_shard(out, k, {"h": hs.half(), "ids": [str(p) for p, _ in batch],
                             "labels": {attribute: torch.tensor([c for _, c in batch])}})
    return out


def _numbers(v, positive_ints: bool = False) -> bool:
    """Whether v is a non-empty list of numbers (of integers >= 1)."""
    if not isinstance(v, list) or not v:
        return False
    if positive_ints:
        return all(type(x) is int and x >= 1 for x in v)
    return all(type(x) in (int, float) for x in v)


def _meta_problem(meta: dict) -> str | None:
    """What makes a meta.json's object no extraction record (None: nothing)."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        return f"it lacks the keys {missing}"
    if not _numbers(meta["timesteps"]):
        return "'timesteps' is not a list of numbers"
    if not _numbers(meta["h_shape"], positive_ints=True):
        return "'h_shape' is not a list of positive integers"
    attrs = meta["attributes"]
    if not isinstance(attrs, dict) or not all(isinstance(c, list) and c and all(isinstance(x, str) for x in c)
                                              for c in attrs.values()):
        return "'attributes' does not map each attribute to its class names (e.g. {\"gender\": [\"female\", \"male\"]})"
    return None


def read_meta(folder: Path) -> dict:
    """An extraction folder's meta.json, checked to be an extraction record (an error names the
    file and what is wrong)."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an extraction folder (no meta.json); extract h first "
                                f"(script_extract_he.sh, or main.py --extract_pseudo N / --just_precompute True)")
    meta = read_json_object(path, "the record of an extraction", REDO)
    problem = _meta_problem(meta)
    if problem:
        raise ValueError(f"{path} is not the record of an extraction: {problem}; {REDO}")
    return meta


def shard_files(folder: Path) -> list[Path]:
    """The finished shards of an extraction folder, in order (a half-written one has another name)."""
    files = sorted(Path(folder).glob("shard_*.pt"))
    if not files:
        raise ValueError(f"{folder} holds no finished shards")
    return files


def open_shard(path: Path) -> dict:
    """One shard, tensors only (never runs code), memory-mapped: indexing some rows of its h
    reads only those rows from disk, and the mapping goes when the dict is dropped. A file that
    cannot be mapped (another ``torch.save`` format) is read whole; one that is no shard at all
    gets the error of ``load_tensors``, naming the file, and how to redo it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:                     # weights_only refuses code either way; let load_tensors say why
        pass
    try:
        return load_tensors(path, "an extraction shard", ValueError)
    except ValueError as e:
        raise ValueError(f"{e}; to redo it, run its extraction again with the same command (a broken "
                         f"shard is extracted again), or {REDO}") from None


@dataclass(frozen=True, eq=False)
class HShards:
    """The h-vectors of extraction folder(s), left on disk and read by rows from the mapped shards.

    Sample i is row ``i - sum(sizes[:k])`` of shard ``files[k]`` (folders in the order given, shards
    in file order, as ``load_h_dataset`` concatenates them). Only the labels {attr: int64 [N]} are
    held in memory; ``read`` returns h of the rows asked for, so memory follows the rows read,
    not N.
    """
    meta: dict
    files: list[Path]
    sizes: list[int]                        # samples used from each shard
    labels: dict[str, torch.Tensor]
    prompts: list[str | None] | None = None  # text-to-image: each sample's prompt (None: unconditional)

    def __len__(self) -> int:
        return sum(self.sizes)

    def read(self, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """h [n, S, D] as stored (float16) of shard k: its local ``rows``, or all its used rows."""
        h = open_shard(self.files[k])["h"]
        h = h.reshape(h.shape[0], h.shape[1], -1)
        rows = torch.arange(self.sizes[k]) if rows is None else torch.as_tensor(rows)
        return h[rows]

    def head(self, n: int) -> "HShards":
        """The first n samples (all of them if there are fewer)."""
        sizes, left = [], n
        for s in self.sizes:
            if left <= 0:
                break
            sizes.append(min(s, left))
            left -= sizes[-1]
        n = sum(sizes)
        return replace(self, files=self.files[:len(sizes)], sizes=sizes,
                       labels={a: v[:n] for a, v in self.labels.items()},
                       prompts=None if self.prompts is None else self.prompts[:n])


def _shard_rows(path: Path, shard: dict, meta: dict) -> int:
    """Rows of a shard whose h is [n, S, *h_shape] for the folder's meta, with [n] integer labels;
    else a clear error."""
    if not isinstance(shard, dict) or not isinstance(shard.get("labels", {}), dict):
        raise ValueError(f"{path} is not an extraction shard (a dict with h and labels); {REDO}")
    h, s, shape = shard.get("h"), len(meta["timesteps"]), [int(v) for v in meta["h_shape"]]
    ok = (isinstance(h, torch.Tensor) and h.dim() >= 2 and h.shape[1] == s
          and int(np.prod(h.shape[2:])) == int(np.prod(shape)))
    if not ok:
        got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"{path}: h is {got}, but meta.json describes [n, {s}, {', '.join(map(str, shape))}] "
                         f"({s} timesteps, h shape {shape}); the shard belongs to another extraction")
    for a, v in shard.get("labels", {}).items():
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.is_floating_point():
            raise ValueError(f"{path}: the labels for {a!r} are not a vector of class indices; {REDO}")
        if len(v) != len(h):
            raise ValueError(f"{path}: {len(v)} labels for {a!r} but {len(h)} h rows")
    return len(h)


def open_h_dataset(folders: list[Path], attrs: list[str] | None = None) -> HShards:
    """Index the shards of one or more folders (their sizes and labels; h stays on disk).

    :param attrs: attributes to keep, in this order (default: every attribute of the folders'
        meta.json that is labelled). An attribute labelled in some shards only, or asked for and
        labelled nowhere, is an error (naming the attributes the data has).
    """
    metas = [read_meta(f) for f in folders]
    for f, m in zip(folders[1:], metas[1:]):
        if m["timesteps"] != metas[0]["timesteps"] or m["h_shape"] != metas[0]["h_shape"]:
            raise ValueError(f"extraction folders {folders[0]} and {f} disagree on timesteps or h shape; "
                             f"train on extractions of the same model and grid")
    files, sizes, per_shard, prompts = [], [], [], []
    for folder, m in zip(folders, metas):
        for path in shard_files(folder):
            shard = open_shard(path)
            sizes.append(_shard_rows(path, shard, m))
            files.append(path)
            prompts += [shard.get("prompt")] * sizes[-1]
            per_shard.append({a: v.long().clone() for a, v in shard.get("labels", {}).items()})
    classes = {a: c for m in metas for a, c in m["attributes"].items()}
    have = [a for a in dict.fromkeys([*classes, *(a for lab in per_shard for a in lab)])
            if a in classes and all(a in lab for lab in per_shard)]
    missing = [a for a in attrs or [] if not any(a in lab for lab in per_shard) or a not in classes]
    if missing:
        raise ValueError(f"the data has no labels for {missing}; it has "
                         + (f"labels for {have} (train on those: --attributes)" if have
                            else "no labels (an unlabelled extraction)"))
    labels = {}
    for a in dict.fromkeys(attrs or [a for m in metas for a in m["attributes"]]):
        has = [a in lab for lab in per_shard]
        if all(has):
            labels[a] = torch.cat([lab[a] for lab in per_shard])
        elif any(has):
            raise ValueError(f"attribute {a!r} is labelled in {files[has.index(True)]} but not in "
                             f"{files[has.index(False)]}; train on attributes every folder labels (--attributes)")
    for a, v in labels.items():
        if len(v) and not 0 <= int(v.min()) <= int(v.max()) < len(classes[a]):
            raise ValueError(f"labels for {a!r} run {int(v.min())}..{int(v.max())}, but meta.json names "
                             f"{len(classes[a])} classes {classes[a]}; the shards belong to another extraction")
    no_model = [f for f, m in zip(folders, metas) if not isinstance(m.get("model"), dict)]
    if no_model:
        raise ValueError(f"{Path(no_model[0]) / 'meta.json'} records no model ('model': config and checkpoint "
                         f"sha256), so the ADP could not be tied to one; {REDO}")
    meta = dict(metas[0])
    meta["attributes"] = {a: c for a, c in classes.items() if a in labels}
    return HShards(meta, files, sizes, labels, prompts=prompts if any(q is not None for q in prompts) else None)


def load_h_dataset(folders: list[Path], attrs: list[str] | None = None) -> tuple[dict, torch.Tensor, dict]:
    """Concatenate the shards of one or more folders -> (meta, h [N,S,D] float16, labels).
    Holds all of h in memory; ``open_h_dataset`` leaves it on disk and reads rows instead."""
    data = open_h_dataset(folders, attrs)
    return data.meta, torch.cat([data.read(k) for k in range(len(data.files))]), data.labels
