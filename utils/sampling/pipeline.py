"""A loaded model with its DDIM sampler, the batch plan (a seed per image) and the batch loop.

The loop talks to a guide only through ``guide.start(seeds)`` and the returned batch guide's
``hooks()`` (keyword arguments for the sampler) and ``after_batch(x0)`` (a report with the
guide's estimate and the images to redraw from their own seeds).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from models.adp import ADP
from models.base import HSpaceUNet
from models.files import checkpoint_sha256, model_identity, resolve_path
from models.loader import load_model
from utils.config import RunConfig
from utils.sampling.diffusion import DDIMSampler, Schedule
from utils.sampling.images import to_uint8
from utils.sampling.seeds import SeededNoise


@dataclass
class Pipeline:
    """A loaded model with its sampler and identity (config name + checkpoint hash)."""
    net: HSpaceUNet
    sampler: DDIMSampler
    model_id: dict
    image_shape: tuple[int, int, int]
    device: torch.device

    @property
    def h_shape(self) -> tuple[int, int, int]:
        return self.net.h_shape

    @property
    def betas(self) -> torch.Tensor:
        return self.sampler.schedule.betas

    @property
    def eta(self) -> float:
        return self.sampler.eta

    @property
    def timesteps(self) -> list[int]:
        """The sampler's timesteps, first (noisiest) to last."""
        return self.sampler.timesteps

    def draw(self, seeds: list[int], batch=None, asymmetric: bool = False) -> torch.Tensor:
        """Images x0 [n,C,H,W] in [-1,1] from the seeds' noise, with a batch guide's hooks."""
        noise = SeededNoise(seeds, self.image_shape, self.device)
        hooks = batch.hooks() if batch is not None else {}
        x0, _ = self.sampler.sample(noise.x_T(), noise.step, asymmetric=asymmetric, **hooks)
        return x0


def load_pipeline(cfg: dict, device: torch.device, steps: int | None = None,
                  eta: float | None = None) -> Pipeline:
    """Build the U-Net from ``cfg['model']`` (strict load) and a DDIM sampler from ``cfg``."""
    rc = RunConfig.of(cfg)
    net = load_model(rc.model, rc.name or "<config>", device)
    sampler = DDIMSampler(net, Schedule.from_config(rc.diffusion), steps if steps is not None else rc.sampling.steps,
                          float(rc.eta if eta is None else eta), rc.sampling.skip_type)
    model_id = model_identity(rc.name, rc.model["checkpoint"], checkpoint_sha256(rc.model))
    return Pipeline(net, sampler, model_id, net.image_shape, device)


def load_adp_for(pipe, path, check_grid: bool = True) -> ADP:
    """Load an ADP checkpoint and check it belongs to this model (identity, h shape) and, with
    ``check_grid``, has a head for every timestep but the first of the sampling grid (a run
    checks the steps it guides instead: ``guided_head_map``)."""
    adp = ADP.load(resolve_path(path), pipe.model_id, pipe.h_shape)
    if check_grid:
        for t in pipe.timesteps[1:]:
            adp.step_index(t)
    return adp.to(pipe.device)


def guided_head_map(adp: ADP, timesteps: list, settings) -> dict[str, int]:
    """{timestep of a guided step: the trained timestep whose head serves it} under the
    settings' head rule and guided steps; an error for a step no head serves."""
    last = settings.last_step if settings.last_step is not None else len(timesteps)
    return adp.head_map(timesteps[settings.first_step:last], settings.head_rule)


def plan_batches(seeds: list[int], batch_size: int, rank: int = 0, world: int = 1,
                 skip: set[int] | frozenset = frozenset()) -> list[list[int]]:
    """This rank's seed lists, one per global batch of ``batch_size * world`` seeds.

    Global batch g holds seeds[g*B:(g+1)*B], split over the ranks in order (rank r gets the r-th
    part), so the ranks' seeds are disjoint and together complete. A global batch whose seeds
    are all in ``skip`` (images already written) is left out on every rank alike, which keeps
    the ranks in step for the all-reduce; one with any seed missing is redone whole.
    """
    gb = batch_size * world
    plan = []
    for g in range(0, len(seeds), gb):
        glob = seeds[g:g + gb]
        if all(s in skip for s in glob):
            continue
        if len(glob) < world:
            raise ValueError(f"the last global batch has {len(glob)} seeds for {world} processes; "
                             f"make the number of images a multiple of {world}")
        parts = np.array_split(np.asarray(glob), world)
        plan.append([int(s) for s in parts[rank]])
    return plan


def sample_seeds(pipe, seeds: list[int], guide=None, asymmetric: bool = False):
    """Draw one batch: (x0 [n,C,H,W] in [-1,1], the guide's report or None). Images the
    guide's report names are drawn again from their own seeds with the guide it gives."""
    batch = guide.start(seeds) if guide is not None else None
    x0, report = _draw(pipe, seeds, batch, asymmetric)
    if not bool(torch.isfinite(x0).all()):
        raise ValueError(f"the model's images for seeds {seeds[0]}..{seeds[-1]} are not finite (NaN or inf): "
                         + ("lower --scale" if guide is not None else "check the checkpoint and its config"))
    return x0, report


def _draw(pipe, seeds: list[int], batch, asymmetric: bool):
    x0 = pipe.draw(seeds, batch, asymmetric)
    if batch is None:
        return x0, None
    report = batch.after_batch(x0)
    if report.redraw:
        redo, _ = _draw(pipe, [seeds[k] for k in report.redraw], report.retry, asymmetric)
        x0 = x0.clone()
        x0[report.redraw] = redo
    return x0, report


def sample_batches(pipe, batches: list[list[int]], guide=None, asymmetric: bool = False,
                   desc: str = "sample", progress: bool = True):
    """Yield (seeds, images uint8 [n,H,W,C], the guide's last-step estimate or None) per batch.

    :param pipe: a ``Pipeline`` or anything with its ``draw`` (``utils.sampling.text2image``).
    :param batches: seed lists (``plan_batches``), one per batch.
    :param guide: None (vanilla), a ``utils.guidance.guide.Guide`` or a pixel-space baseline.
    """
    for seeds in tqdm(batches, desc=desc, disable=not progress):
        x0, report = sample_seeds(pipe, seeds, guide, asymmetric)
        yield seeds, to_uint8(x0), (report.estimate if report is not None else None)
