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


def read_png(path: Path) -> np.ndarray:
    """One image file -> uint8 [H,W] (grey) or [H,W,3] (RGB; other modes are converted); a file
    that does not decode is an error naming it."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "RGB"):
                im = im.convert("L" if im.mode in ("1", "LA", "I", "I;16", "F") else "RGB")
            return np.asarray(im)
    except Exception as e:                    # PIL raises OSError, SyntaxError, zlib.error, ...
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e}); regenerate it "
                         f"(main.py --resume redoes broken images) or move it out of the folder") from None


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]} " + ("grey" if len(shape) == 2 else "RGB")


def read_images(folder: Path, seeds: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """A run folder's images -> (seeds, tensor [N,C,H,W] in [-1,1]): those of ``seeds``
    (``{seed:06d}.png``, every one required), else every ``<seed>.png`` in it, by seed.
    A file that does not decode, or images of two sizes, is an error naming the files."""
    folder = Path(folder)
    if seeds is None:
        files = sorted((p for p in folder.glob("*.png") if p.stem.isdigit()), key=lambda p: int(p.stem))
    else:
        files = [folder / f"{s:06d}.png" for s in seeds]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"{folder}: the run lists {len(seeds)} seeds but has no image for "
                             f"{len(missing)} of them ({', '.join(missing[:5])}{more}); the run is "
                             f"incomplete: finish it with its main.py command and --resume")
    if not files:
        raise ValueError(f"{folder} holds no images (<seed>.png); generate some there with "
                         f"main.py --exp {folder}")
    arrs = [read_png(f) for f in files]
    for f, a in zip(files, arrs):
        if a.shape != arrs[0].shape:
            raise ValueError(f"{folder} holds images of two sizes: {files[0].name} is {_size(arrs[0].shape)}, "
                             f"{f.name} is {_size(a.shape)}; the images judged together must have one "
                             f"size: move the others out of the folder")
    x = torch.from_numpy(np.stack(arrs)).float() / 127.5 - 1
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return [int(f.stem) for f in files], x
