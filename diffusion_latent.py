"""Generation runs: load the model (and ADP), sample vanilla / sample-guided / distribution-guided
batches with a seed per image, write PNGs, a grid and a self-describing ``run.json``."""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.adp import ADP
from models.base import HSpaceUNet
from models.loader import file_sha256, load_model, resolve_path
from utils.diffusion import DDIMSampler, Schedule
from utils.guidance import GuidanceConfig, HGuidance
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


def sample_batches(pipe: Pipeline, seeds: list[int], batch_size: int,
                   make_edit=None, asymmetric: bool = False, desc: str = "sample"):
    """Yield (seeds, images uint8 [n,H,W,C], last predicted distribution) batch by batch.

    :param make_edit: batch seeds -> edit_h callable (or None for vanilla).
    """
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    for batch in tqdm(batches, desc=desc):
        noise = SeededNoise(batch, pipe.image_shape, pipe.device)
        edit = make_edit(batch) if make_edit else None
        x0, _ = pipe.sampler.sample(noise.x_T(), noise.step, edit_h=edit, asymmetric=asymmetric)
        yield batch, to_uint8(x0), (dict(edit.last_distribution) if edit is not None else None)


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
                     sample_classes: dict[str, int] | None = None):
    """batch seeds -> a fresh HGuidance for that batch (None for vanilla sampling).

    :param sample_classes: sample mode: the requested class index per attribute.
    """
    def make_edit(batch: list[int]):
        if guidance is None:
            return None
        g = HGuidance(adp, guidance, pipe.sampler.schedule.betas)
        if guidance.mode == "sample":
            g.sample_targets = {a: torch.full((len(batch),), c)
                                for a, c in (sample_classes or {}).items()}
        return g
    return make_edit


def run_generation(pipe: Pipeline, out: Path, seeds: list[int], batch_size: int,
                   guidance: GuidanceConfig | None, adp: ADP | None, resolved: dict,
                   asymmetric: bool = False, resume: bool = False,
                   sample_classes: dict[str, int] | None = None) -> dict:
    """Generate one run into ``out``: ``{seed:06d}.png`` per image, ``grid.png``, ``run.json``."""
    todo = [s for s in seeds if not (resume and (out / f"{s:06d}.png").exists())]
    make_edit = guidance_factory(pipe, adp, guidance, sample_classes)

    t0, dists = time.time(), []
    for batch, imgs, dist in sample_batches(pipe, todo, batch_size, make_edit, asymmetric,
                                            desc=resolved.get("mode", "sample")):
        save_images(out, batch, imgs)
        if dist is not None:
            dists.append({"seeds": [batch[0], batch[-1]], "adp_distribution": dist})
    wall = time.time() - t0
    files = [out / f"{s:06d}.png" for s in seeds]
    save_grid(out / "grid.png", files[:100])
    record = {"resolved": resolved, "seeds": seeds, "model": pipe.model_id,
              "timesteps": pipe.sampler.timesteps, "wall_time_s": round(wall, 2),
              "images_generated_now": len(todo), "device": str(pipe.device),
              "adp_distribution_last_step": dists}
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
