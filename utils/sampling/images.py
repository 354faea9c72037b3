"""Saving images and grids with Pillow + numpy (no torchvision)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.files import write_atomic


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N,C,H,W] in [-1,1] -> uint8 [N,H,W,C]."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def save_png(img: Image.Image, path: Path) -> None:
    """Write a PNG atomically (``write_atomic``): a crash never leaves half a file."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def save_images(out: Path, seeds: list[int], imgs: np.ndarray) -> None:
    """One PNG per image, named by its seed: ``{seed:06d}.png`` (written atomically)."""
    for s, a in zip(seeds, imgs):
        save_png(_pil(a), out / f"{s:06d}.png")


def grid_array(imgs: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 [N,H,W,C] -> one uint8 grid image [rows*(H+pad)+pad, cols*(W+pad)+pad, C]."""
    n, h, w, c = imgs.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for k, a in enumerate(imgs):
        r, q = divmod(k, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = a
    return grid


def save_grid(path: Path, files_or_imgs, ncol: int | None = None, upscale: int = 1) -> None:
    """A grid PNG from image files or an array [N,H,W,C]; ``upscale`` enlarges small images."""
    if isinstance(files_or_imgs, np.ndarray):
        imgs = files_or_imgs
    else:
        imgs = [np.asarray(Image.open(f)) for f in files_or_imgs if Path(f).exists()]
        if not imgs:
            return
        imgs = np.stack([a[..., None] if a.ndim == 2 else a for a in imgs])
    img = _pil(grid_array(imgs, ncol))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    save_png(img, Path(path))


def read_images(folder: Path) -> tuple[list[int], torch.Tensor]:
    """The ``{seed}.png`` images of a run folder -> (seeds, tensor [N,C,H,W] in [-1,1])."""
    files = sorted(p for p in Path(folder).glob("*.png") if p.stem.isdigit())
    if not files:
        raise ValueError(f"{folder} holds no generated images (<seed>.png)")
    arrs = [np.asarray(Image.open(f)) for f in files]
    x = torch.from_numpy(np.stack(arrs)).float() / 127.5 - 1
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return [int(f.stem) for f in files], x
