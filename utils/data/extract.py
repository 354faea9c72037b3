"""h-vector extraction, streamed to disk in shards; resumable.

Format of an extraction folder:
  ``meta.json``            model config + checkpoint sha256, h shape, timesteps (sampling order,
                           t = T-1 first), source (``folders`` or ``pseudo``), attributes and
                           class names, shard size, number of samples.
  ``shard_00000.pt`` ...   {"h": float16 [n, S, C, H, W], "labels": {attr: int64 [n]},
                           "ids": [n] (seeds, or image paths), "probs": {attr: float [n, K]}}
Each shard is written to a temporary name and renamed when complete, so an interrupted run
resumes after its last finished shard and never reads a half-written one. Memory stays
bounded by one batch whatever the number of samples.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from models.files import load_tensors
from utils.sampling.diffusion import DDIMSampler
from utils.sampling.seeds import SeededNoise

log = logging.getLogger(__name__)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def _write_meta(out: Path, meta: dict) -> None:
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        keys = ("model", "h_shape", "timesteps", "source", "attributes", "shard_size", "seeds", "eta", "text")
        diff = [k for k in keys if old.get(k) != meta.get(k)]
        if diff:
            raise ValueError(f"{out} already holds an extraction with different {diff}; "
                             f"use another --savepath or delete the folder")
    out.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def _save_shard(out: Path, k: int, shard: dict) -> None:
    tmp = out / f".shard_{k:05d}.pt.tmp"
    torch.save(shard, tmp)
    os.replace(tmp, out / f"shard_{k:05d}.pt")


def shard_done(out: Path, k: int) -> bool:
    return (out / f"shard_{k:05d}.pt").exists()


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
        if shard_done(out, k):
            continue
        noise = SeededNoise(batch, shape, device)
        x0, hs = sampler.sample(noise.x_T(), noise.step, record_h=True)
        probs = labeller.predict(x0.clamp(-1, 1).cpu())
        _save_shard(out, k, {"h": hs.half(), "ids": list(batch),
                             "labels": {a: p.argmax(1) for a, p in probs.items()},
                             "probs": {a: p.float() for a, p in probs.items()}})
    return out


def list_class_folders(root: Path) -> dict[str, list[Path]]:
    """{class name: image paths} from ``root/<class>/*``; clear errors for empty/missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (--test_path_one)")
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders: put the images of each "
                         f"class in its own folder, e.g. {root}/male and {root}/female")
    out = {}
    for d in classes:
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ValueError(f"class folder {d} holds no images ({sorted(IMAGE_EXTS)})")
        out[d.name] = files
    return out


def load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """An image file -> [channels, size, size] in [-1, 1] (centre-cropped square, bicubic)."""
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
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
    net = sampler.net
    channels, size, _ = net.image_shape
    items = [(p, c) for c, (_, files) in enumerate(classes.items()) for p in files]
    meta = {**meta, "source": "folders", "folder": str(root), "timesteps": sampler.timesteps,
            "h_shape": list(net.h_shape), "attributes": {attribute: list(classes)},
            "shard_size": batch_size, "n": len(items), "eta": 0.0}
    _write_meta(out, meta)
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    for k, batch in enumerate(tqdm(batches, desc="extract (DDIM inversion)")):
        if shard_done(out, k):
            continue
        x0 = torch.stack([load_image(p, size, channels) for p, _ in batch]).to(device)
        _, hs = sampler.invert(x0, record_h=True)
        _save_shard(out, k, {"h": hs.half(), "ids": [str(p) for p, _ in batch],
                             "labels": {attribute: torch.tensor([c for _, c in batch])}})
    return out


def read_meta(folder: Path) -> dict:
    path = Path(folder) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not an extraction folder (no meta.json); run "
                                f"script_extract_he.sh or main.py --extract first")
    return json.loads(path.read_text())


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
    gets the error of ``load_tensors``, naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:                     # weights_only refuses code either way; let load_tensors say why
        return load_tensors(path, "an extraction shard", ValueError)


def iter_shards(folder: Path) -> Iterator[dict]:
    """Yield the finished shards of an extraction folder in order (each read whole)."""
    for f in shard_files(folder):
        yield load_tensors(f, "an extraction shard", ValueError)     # tensors only: never runs code


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
    steps: list[int] | None = None          # indices into the stored steps (None: every step)
    prompts: list[str | None] | None = None  # text-to-image: each sample's prompt (None: unconditional)

    def __len__(self) -> int:
        return sum(self.sizes)

    def read(self, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """h [n, S, D] as stored (float16) of shard k: its local ``rows``, or all its used rows."""
        h = open_shard(self.files[k])["h"]
        h = h.reshape(h.shape[0], h.shape[1], -1)
        rows = torch.arange(self.sizes[k]) if rows is None else torch.as_tensor(rows)
        if self.steps is None:
            return h[rows]
        return h[rows[:, None], torch.tensor(self.steps)[None, :]]     # touches those steps only

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

    def at_timesteps(self, timesteps: list[int]) -> "HShards":
        """Only the h at these timesteps, in this order; ``meta["timesteps"]`` becomes them."""
        have = self.meta["timesteps"]
        missing = [t for t in timesteps if t not in have]
        if missing:
            raise ValueError(f"the extraction has no h at timesteps {missing[:5]} (it has {len(have)} "
                             f"steps, {have[:3]}...{have[-3:]}); extract on that grid")
        base = self.steps if self.steps is not None else list(range(len(have)))
        return replace(self, meta={**self.meta, "timesteps": list(timesteps)},
                       steps=[base[have.index(t)] for t in timesteps])


def _shard_rows(path: Path, shard: dict, meta: dict) -> int:
    """Rows of a shard whose h is [n, S, *h_shape] for the folder's meta; else a clear error."""
    h, s, shape = shard.get("h"), len(meta["timesteps"]), [int(v) for v in meta["h_shape"]]
    ok = (isinstance(h, torch.Tensor) and h.dim() >= 2 and h.shape[1] == s
          and int(np.prod(h.shape[2:])) == int(np.prod(shape)))
    if not ok:
        got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"{path}: h is {got}, but meta.json describes [n, {s}, {', '.join(map(str, shape))}] "
                         f"({s} timesteps, h shape {shape}); the shard belongs to another extraction")
    for a, v in shard.get("labels", {}).items():
        if len(v) != len(h):
            raise ValueError(f"{path}: {len(v)} labels for {a!r} but {len(h)} h rows")
    return len(h)


def open_h_dataset(folders: list[Path], attrs: list[str] | None = None) -> HShards:
    """Index the shards of one or more folders (their sizes and labels; h stays on disk).

    :param attrs: attributes to keep, in this order (default: every attribute of the folders'
        meta.json that is labelled). An attribute labelled in some shards only is an error.
    """
    metas = [read_meta(f) for f in folders]
    for m in metas[1:]:
        if m["timesteps"] != metas[0]["timesteps"] or m["h_shape"] != metas[0]["h_shape"]:
            raise ValueError("extraction folders disagree on timesteps or h shape")
    files, sizes, per_shard, prompts = [], [], [], []
    for folder, m in zip(folders, metas):
        for path in shard_files(folder):
            shard = open_shard(path)
            sizes.append(_shard_rows(path, shard, m))
            files.append(path)
            prompts += [shard.get("prompt")] * sizes[-1]
            per_shard.append({a: torch.as_tensor(v).long().clone() for a, v in shard.get("labels", {}).items()})
    labels = {}
    for a in dict.fromkeys(attrs or [a for m in metas for a in m["attributes"]]):
        has = [a in lab for lab in per_shard]
        if all(has):
            labels[a] = torch.cat([lab[a] for lab in per_shard])
        elif any(has):
            raise ValueError(f"attribute {a!r} is labelled in {files[has.index(True)]} but not in "
                             f"{files[has.index(False)]}; train on attributes every folder labels (--attributes)")
    meta = dict(metas[0])
    meta["attributes"] = {a: c for m in metas for a, c in m["attributes"].items() if a in labels}
    return HShards(meta, files, sizes, labels, prompts=prompts if any(q is not None for q in prompts) else None)


def load_h_dataset(folders: list[Path], attrs: list[str] | None = None) -> tuple[dict, torch.Tensor, dict]:
    """Concatenate the shards of one or more folders -> (meta, h [N,S,D] float16, labels).
    Holds all of h in memory; ``open_h_dataset`` leaves it on disk and reads rows instead."""
    data = open_h_dataset(folders, attrs)
    return data.meta, torch.cat([data.read(k) for k in range(len(data.files))]), data.labels
