"""Generation runs: load the model (and ADP), sample vanilla / sample-guided / distribution-guided
batches with a seed per image, write PNGs, a grid and a self-describing ``run.json``."""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.adp import ADP
from models.base import HSpaceUNet
from models.loader import file_sha256, load_model, resolve_path
from utils.diffusion import DDIMSampler, Schedule
from utils.guidance import GuidanceConfig, HGuidance, RunningBalance, SampleCheck
from utils.images import save_grid, save_images, to_uint8
from utils.seeds import SeededNoise

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """A loaded model with its sampler and identity (config name + checkpoint hash)."""
    net: HSpaceUNet
    sampler: DDIMSampler
    model_id: dict
    image_shape: tuple[int, int, int]
    device: torch.device


def load_pipeline(cfg: dict, device: torch.device, steps: int | None = None,
                  eta: float | None = None) -> Pipeline:
    """Build the U-Net from ``cfg['model']`` (strict load) and a DDIM sampler from ``cfg``."""
    net = load_model(cfg["model"], cfg.get("name", "<config>"), device)
    s = cfg.get("sampling", {})
    sampler = DDIMSampler(net, Schedule.from_config(cfg["diffusion"]),
                          steps or int(s.get("steps", 50)),
                          float(s.get("eta", 1.0) if eta is None else eta),
                          s.get("skip_type", "uniform"))
    ckpt = resolve_path(cfg["model"]["checkpoint"])
    model_id = {"config": cfg.get("name"), "checkpoint": cfg["model"]["checkpoint"],
                "checkpoint_sha256": cfg["model"].get("sha256") or file_sha256(ckpt)}
    return Pipeline(net, sampler, model_id, net.image_shape, device)


def load_adp_for(pipe: Pipeline, path: str | Path) -> ADP:
    """Load an ADP checkpoint and check it belongs to this model and sampling grid."""
    adp = ADP.load(resolve_path(path), pipe.model_id, pipe.net.h_shape)
    for t in pipe.sampler.timesteps[1:]:
        adp.step_index(t)
    return adp.to(pipe.device)


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


def sample_batches(pipe: Pipeline, batches: list[list[int]], make_edit=None,
                   asymmetric: bool = False, desc: str = "sample", progress: bool = True,
                   make_guide=None):
    """Yield (seeds, images uint8 [n,H,W,C], last predicted distribution) batch by batch.

    :param batches: seed lists (``plan_batches``), one per batch.
    :param make_edit: batch seeds -> edit_h callable (or None for vanilla). An edit with a
        running balance gets its batch's last-step estimate added once the batch is done.
    :param make_guide: batch seeds -> guide_eps callable (pixel-space guidance baselines).
    """
    for batch in tqdm(batches, desc=desc, disable=not progress):
        noise = SeededNoise(batch, pipe.image_shape, pipe.device)
        edit = make_edit(batch) if make_edit else None
        guide = make_guide(batch) if make_guide else None
        x0, _ = pipe.sampler.sample(noise.x_T(), noise.step, edit_h=edit, asymmetric=asymmetric,
                                    guide_eps=guide)
        if getattr(edit, "balance", None) is not None and edit.last_distribution:
            edit.balance.update(edit.last_distribution, edit.batch_total, x0, edit.cfg.distributed)
        if getattr(make_edit, "check", None) is not None and edit.cfg.mode == "sample":
            x0 = _redraw_misses(pipe, batch, x0, make_edit, asymmetric)
        told = edit if edit is not None else guide
        yield batch, to_uint8(x0), (dict(told.last_distribution) if told is not None else None)


def _redraw_misses(pipe: Pipeline, batch: list[int], x0: torch.Tensor, make_edit,
                   asymmetric: bool) -> torch.Tensor:
    """Sample guidance, checked: the images the check's classifier does not put in their
    requested class are drawn again from the same seeds with the step cap multiplied by
    ``check.boost`` (then boost**2, ... up to ``check.retries`` times)."""
    check = make_edit.check
    want = make_edit.sample_classes
    for r in range(1, check.retries + 1):
        with torch.no_grad():
            probs = check.labeller.predict(x0.clamp(-1, 1).float().cpu())
        miss = torch.zeros(len(batch), dtype=torch.bool)
        for a, c in want.items():
            miss |= probs[a].argmax(1) != c
        idx = miss.nonzero().flatten().tolist()
        check.redrawn += len(idx)
        if not idx:
            break
        sub = [batch[k] for k in idx]
        noise = SeededNoise(sub, pipe.image_shape, pipe.device)
        edit = make_edit(sub, boost=check.boost ** r)
        redo, _ = pipe.sampler.sample(noise.x_T(), noise.step, edit_h=edit, asymmetric=asymmetric)
        x0 = x0.clone()
        x0[idx] = redo
    return x0


def prepare_out_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to write into a non-empty folder unless --overwrite or --resume says so."""
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise FileExistsError(f"output folder {out} is not empty; pass --resume to continue "
                                  f"the run there or --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)


def guidance_factory(pipe: Pipeline, adp: ADP | None, guidance: GuidanceConfig | None,
                     sample_classes: dict[str, int] | None = None,
                     balance: RunningBalance | None = None, check: SampleCheck | None = None):
    """batch seeds -> a fresh HGuidance for that batch (None for vanilla sampling).

    :param sample_classes: sample mode: the requested class index per attribute.
    :param balance: distribution mode: the run's running balance, shared by its batches.
    :param check: sample mode: redraw the images a classifier finds outside their class.
    """
    def make_edit(batch: list[int], boost: float = 1.0):
        if guidance is None:
            return None
        cfg = guidance if boost == 1.0 else replace(guidance, max_step=guidance.max_step * boost)
        g = HGuidance(adp, cfg, pipe.sampler.schedule.betas, balance)
        if guidance.mode == "sample":
            g.sample_targets = {a: torch.full((len(batch),), c)
                                for a, c in (sample_classes or {}).items()}
        return g
    if check is not None and (guidance is None or guidance.mode != "sample"):
        raise ValueError("a sample check applies to sample guidance (--mode sample)")
    make_edit.check, make_edit.sample_classes = check, sample_classes
    return make_edit


def run_generation(pipe: Pipeline, out: Path, seeds: list[int], batch_size: int,
                   guidance: GuidanceConfig | None, adp: ADP | None, resolved: dict,
                   asymmetric: bool = False, resume: bool = False,
                   sample_classes: dict[str, int] | None = None, running_balance: bool = False,
                   rank: int = 0, world: int = 1, labeller=None,
                   guidance_settings: dict | None = None) -> dict:
    """Generate one run into ``out``: ``{seed:06d}.png`` per image, ``grid.png``, ``run.json``.

    With ``world`` > 1 (torchrun) every rank calls this with the same arguments; each writes the
    images of its share of every global batch, rank 0 the grid and ``run.json``. ``labeller``
    (an image classifier, or None) checks finished images: the running balance counts its
    classes, sample guidance redraws misses (``SampleCheck``; its retries and boost come from
    ``guidance_settings``, the config's ``guidance:`` section).
    """
    done = {s for s in seeds if resume and (out / f"{s:06d}.png").exists()}
    batches = plan_batches(seeds, batch_size, rank, world, done)
    balance = RunningBalance(labeller) if running_balance else None
    if balance is not None and done:
        log.warning("resuming a running-balance run: the balance restarts from the batches still "
                    "to do (the finished ones are not re-estimated)")
    check = None
    if labeller is not None and guidance is not None and guidance.mode == "sample":
        check = SampleCheck.from_config(labeller, guidance_settings or {})
    make_edit = guidance_factory(pipe, adp, guidance, sample_classes, balance, check)

    t0, dists, n_new = time.time(), [], 0
    for batch, imgs, dist_ in sample_batches(pipe, batches, make_edit, asymmetric,
                                             desc=resolved.get("mode", "sample"), progress=rank == 0):
        keep = [k for k, s in enumerate(batch) if s not in done]     # never rewrite a finished image
        save_images(out, [batch[k] for k in keep], imgs[keep])
        n_new += len(keep)
        if dist_ is not None:
            dists.append({"seeds": [batch[0], batch[-1]], "adp_distribution": dist_})
    wall = time.time() - t0
    if world > 1:
        torch.distributed.barrier()
    record = {"resolved": resolved, "seeds": seeds, "model": pipe.model_id,
              "timesteps": pipe.sampler.timesteps, "wall_time_s": round(wall, 2),
              "images_generated_now": n_new, "device": str(pipe.device), "world_size": world,
              "adp_distribution_last_step": dists,
              "running_balance": balance.state() if balance is not None else None,
              "redrawn_by_check": check.redrawn if check is not None else None}
    if rank == 0:
        save_grid(out / "grid.png", [out / f"{s:06d}.png" for s in seeds[:100]])
        (out / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def read_images(folder: Path) -> tuple[list[int], torch.Tensor]:
    """The ``{seed}.png`` images of a run folder -> (seeds, tensor [N,C,H,W] in [-1,1])."""
    from PIL import Image
    files = sorted(p for p in Path(folder).glob("*.png") if p.stem.isdigit())
    if not files:
        raise ValueError(f"{folder} holds no generated images (<seed>.png)")
    arrs = [np.asarray(Image.open(f)) for f in files]
    x = torch.from_numpy(np.stack(arrs)).float() / 127.5 - 1
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return [int(f.stem) for f in files], x
