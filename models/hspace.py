"""h-space of a diffusers denoiser: one forward hook on a named module, for every family.

The config names the module (``h_module``): ``mid_block`` of a U-Net, ``transformer_blocks.12``
of a DiT, ``single_transformer_blocks.19`` of Flux. Its output becomes h:

  - a feature map [B, C, H, W] (a U-Net block) is h as it is;
  - image tokens [B, N, D] (a transformer block) are laid out on their patch grid
    [B, D, gh, gw] (row-major, as the patch embedding reads the latent) and, with ``pool`` = P,
    average-pooled to P x P cells: h [B, D, P, P], so a head is Linear(P*P*D -> K), as SD 1.5's
    1280x8x8 = 81,920; ``pool`` None keeps every token;
  - of a tuple output (joint blocks return their text and image streams) the element
    ``stream`` (the image stream: the last element in diffusers' SD3 and Flux blocks) is read
    and edited; the other elements pass through untouched.

An edit of a pooled h goes back to the tokens through the pooling's own gradient, normalised by
the gradient of a unit edit: a token moves by the mean of the edits of the cells that hold it,
so when P divides the grid each token moves by its cell's edit and the pooled h moves by the
edit exactly.

While the hook is active, every denoiser call hands h and a ``Step`` to ``fn(h, step)`` and goes
on with what it returns (None, or h itself: the output unchanged). A forward pre-hook on the
denoiser reads the call's timestep; ``t_scale`` maps it back to the scheduler's timestep (Flux's
pipeline passes t / 1000).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Step:
    """Where sampling is when h is handed to a guide.

    :param i: the step index from 0 (the denoiser call's index).
    :param t: the scheduler's timestep of the call.
    :param n_uncond: classifier-free guidance rows: h holds [n_uncond unconditional rows;
        n_uncond conditional rows], one of each per image; 0 when every row is an image's own.
    """
    i: int
    t: float
    n_uncond: int = 0


#: a guide's edit: (h [N, C, H, W], step) -> the edited h (or None: unchanged)
Edit = Callable[[torch.Tensor, Step], "torch.Tensor | None"]


def find_module(denoiser: torch.nn.Module, name: str) -> torch.nn.Module:
    """The sub-module ``name`` of ``denoiser``, or a ValueError listing the candidates."""
    try:
        return denoiser.get_submodule(name)
    except AttributeError:
        blocks = [n for n, _ in denoiser.named_children()]
        raise ValueError(f"h_module {name!r}: {type(denoiser).__name__} has no such module; its top-level "
                         f"modules are {blocks} (a block list is indexed, e.g. transformer_blocks.12)") from None


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Image tokens [B, N, D] -> [B, D, gh, gw] (row-major patches)."""
    gh, gw = grid
    if tokens.shape[1] != gh * gw:
        raise ValueError(f"the hooked block gave {tokens.shape[1]} tokens, not the {gh}x{gw} = {gh * gw} image "
                         f"tokens of the run's resolution: hook a block of the image stream (h_stream) or "
                         f"check model.resolution")
    return tokens.transpose(1, 2).reshape(len(tokens), tokens.shape[2], gh, gw)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, D, gh, gw] -> tokens [B, gh*gw, D]."""
    return x.flatten(2).transpose(1, 2)


def spread(delta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An edit of the pooled h [B, D, P, P] -> the edit of the grid [B, D, gh, gw] (module
    docstring: the pooling's gradient over that of a unit edit)."""
    cover = _cover(tuple(size), tuple(delta.shape[-2:]), delta.device)
    with torch.enable_grad():
        x = torch.zeros(*delta.shape[:2], *size, dtype=torch.float32, device=delta.device, requires_grad=True)
        back, = torch.autograd.grad(F.adaptive_avg_pool2d(x, delta.shape[-2:]), x, delta.float())
    return back / cover


@functools.lru_cache(maxsize=32)
def _cover(size: tuple[int, int], pooled: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The pooling's gradient of a unit edit on a grid of ``size`` ([1, 1, gh, gw])."""
    with torch.enable_grad():
        x = torch.zeros(1, 1, *size, dtype=torch.float32, device=device, requires_grad=True)
        cover, = torch.autograd.grad(F.adaptive_avg_pool2d(x, pooled).sum(), x)
    return cover


class HSpaceHook:
    """``with HSpaceHook(denoiser, fn, "transformer_blocks.12", pool=8, grid=(64, 64)): pipe(...)``

    :param denoiser: the pipeline's U-Net or transformer.
    :param fn: ``fn(h, step)`` (``Step``), called at every denoiser call.
    :param module: the hooked sub-module's name.
    :param pool: P of the module docstring (token outputs), or None.
    :param stream: which element of a tuple output is the image stream.
    :param grid: the image tokens' patch grid (gh, gw) (token outputs); None: read off each call's
        latent input with ``patch`` (a packed token input, Flux's, is taken as a square grid).
    :param images: the number of images of the batch: a call with 2 x images rows holds CFG's
        [unconditional; conditional] rows (``Step.n_uncond``); None: no CFG rows.
    :param halves: instead of ``images``, a callable asked at each call whether its rows are
        CFG's two halves (e.g. a pipeline's ``do_classifier_free_guidance``).
    :param t_scale: the scheduler's timestep = the denoiser's timestep input x t_scale.

    A pool P applies to grids larger than P x P; a grid already that small is h as it is.
    """

    def __init__(self, denoiser: torch.nn.Module, fn: Edit, module: str = "mid_block", pool: int | None = None,
                 stream: int = -1, grid: tuple[int, int] | None = None, images: int | None = None,
                 t_scale: float = 1.0, patch: int = 1, halves: Callable[[], bool] | None = None):
        self.denoiser, self.fn, self.module = denoiser, fn, find_module(denoiser, module)
        self.pool, self.stream, self.grid, self.images, self.t_scale = pool, stream, grid, images, t_scale
        self.patch, self.halves, self._fixed_grid = patch, halves, grid
        self.t, self.i, self._handles = 0.0, -1, []

    def __enter__(self) -> "HSpaceHook":
        self.i = -1
        self._handles = [self.denoiser.register_forward_pre_hook(self._timestep, with_kwargs=True),
                         self.module.register_forward_hook(self._h)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _timestep(self, module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        if torch.is_tensor(t):           # (a shape check on the meta device has no values)
            t = float("nan") if t.is_meta else float(t.flatten()[0])
        self.t = float(t) * self.t_scale
        self.i += 1
        if self._fixed_grid is None:
            self.grid = _input_grid(kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None)),
                                    self.patch)

    def _h(self, module, args, output):
        out = output[self.stream] if isinstance(output, tuple) else output
        h = self.read(out)
        rows = len(h)
        if self.halves is not None:
            n_uncond = rows // 2 if rows % 2 == 0 and self.halves() else 0
        else:
            n_uncond = rows // 2 if self.images is not None and rows == 2 * self.images else 0
        new = self.fn(h, Step(self.i, self.t, n_uncond))
        if new is None or new is h:
            return None
        edited = self.write(out, h, new)
        if not isinstance(output, tuple):
            return edited
        items = list(output)
        items[self.stream] = edited
        return tuple(items)

    def read(self, out: torch.Tensor) -> torch.Tensor:
        """The module's output (its image stream) -> h [B, C, H, W]."""
        if out.ndim == 4:
            return out if self._pool(out.shape[-2:]) is None else F.adaptive_avg_pool2d(out, self.pool)
        if out.ndim != 3 or self.grid is None:
            raise ValueError(f"the hooked module's output has shape {tuple(out.shape)}: expected a feature map "
                             f"[B, C, H, W] or image tokens [B, N, D] with their patch grid")
        x = tokens_to_grid(out, self.grid)
        return x if self._pool(self.grid) is None else F.adaptive_avg_pool2d(x, self.pool)

    def _pool(self, grid) -> int | None:
        """The pool that applies to a grid (class docstring)."""
        return self.pool if self.pool is not None and min(grid) > self.pool else None

    def write(self, out: torch.Tensor, h: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The module's output with h replaced by ``new`` (a pooled h's edit goes back through the
        pooling)."""
        size = tuple(out.shape[-2:]) if out.ndim == 4 else tuple(self.grid)
        if self._pool(size) is None:
            return (new if out.ndim == 4 else grid_to_tokens(new)).to(out.dtype)
        delta = spread(new.float() - h.float(), size)
        if out.ndim == 3:
            delta = grid_to_tokens(delta)
        return (out.float() + delta).to(out.dtype)


def _input_grid(x, patch: int) -> tuple[int, int] | None:
    """The image tokens' grid of a denoiser call from its latent input: [B, C, H, W] -> (H/p, W/p);
    packed tokens [B, N, C] -> a square grid of N."""
    if not torch.is_tensor(x):
        return None
    if x.ndim == 4:
        return (x.shape[-2] // patch, x.shape[-1] // patch)
    side = int(round(x.shape[1] ** 0.5))
    if x.ndim != 3 or side * side != x.shape[1]:
        raise ValueError(f"the denoiser's input {tuple(x.shape)} does not tell its image-token grid: give the "
                         f"grid (square images), e.g. through model.resolution")
    return (side, side)


def h_shape_of(width: int, grid: tuple[int, int], pool: int | None) -> tuple[int, int, int]:
    """(C, H, W) of h for a module output of ``width`` channels on ``grid``."""
    return (int(width), *((pool, pool) if pool is not None else tuple(int(g) for g in grid)))
