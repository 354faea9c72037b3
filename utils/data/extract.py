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
from pathlib import Path
from typing import Callable, Iterator

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
        keys = ("model", "h_shape", "timesteps", "source", "attributes", "shard_size", "seeds", "eta")
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


def iter_shards(folder: Path) -> Iterator[dict]:
    """Yield the finished shards of an extraction folder in order."""
    files = sorted(Path(folder).glob("shard_*.pt"))
    if not files:
        raise ValueError(f"{folder} holds no finished shards")
    for f in files:
        yield load_tensors(f, "an extraction shard", ValueError)     # tensors only: never runs code


def load_h_dataset(folders: list[Path], attrs: list[str] | None = None,
                   step_filter: Callable | None = None) -> tuple[dict, torch.Tensor, dict]:
    """Concatenate the shards of one or more folders -> (meta, h [N,S,D] float16, labels)."""
    metas = [read_meta(f) for f in folders]
    for m in metas[1:]:
        if m["timesteps"] != metas[0]["timesteps"] or m["h_shape"] != metas[0]["h_shape"]:
            raise ValueError("extraction folders disagree on timesteps or h shape")
    hs, labels = [], {}
    for f in folders:
        for sh in iter_shards(f):
            hs.append(sh["h"].reshape(sh["h"].shape[0], sh["h"].shape[1], -1))
            for a, v in sh["labels"].items():
                labels.setdefault(a, []).append(torch.as_tensor(v))
    order = attrs or [a for m in metas for a in m["attributes"]]
    labels = {a: torch.cat(labels[a]) for a in dict.fromkeys(order) if a in labels}
    meta = dict(metas[0])
    meta["attributes"] = {a: c for m in metas for a, c in m["attributes"].items() if a in labels}
    return meta, torch.cat(hs), labels
