"""Cost of h-space guidance per text-to-image family: guided / vanilla wall time through the one
h-space hook, on each family's tiny random components (``models.tiny_families``).

    python bench/t2i_families.py                          # every family, CPU
    python bench/t2i_families.py --families flux sana --steps 28 --device cuda

Each family's stock pipeline is built with tiny random components in a temporary folder and
loaded as a run loads it (``load_t2i``: h at the family's middle block, image tokens pooled to
4x4 cells of their 8x8 grid, as tests/test_t2i_families.py). The ADP has random gender heads with
directions; distribution guidance (the ``ours`` preset, the check off: its labeller's cost is not
guidance) runs every step. Vanilla and guided batches of the same seeds alternate after one
warm-up pair; the fastest batch of each kind (timeit's rule: noise on a shared machine only adds
time) gives ``guided / vanilla``; the medians are shown beside it.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import random_adp
from models.t2i import FAMILIES
from utils.app.cli import guarded
from utils.app.runtime import pick_device
from utils.guidance import build_guide, build_plan


def load(family: str, folder: Path, steps: int, device):
    from models.tiny_families import CALL_KWARGS, TINY_RESOLUTION, save_tiny
    from utils.sampling.text2image import load_t2i
    save_tiny(family, folder)
    model = {"family": family, "checkpoint": str(folder), "resolution": TINY_RESOLUTION[family]}
    if family != "sd":
        model["h_pool"] = 4
    cfg = {"name": f"tiny_{family}", "model": model,
           "sampling": {"steps": steps, "eta": 0.0, "cfg": CALL_KWARGS[family]["guidance_scale"]},
           "guidance": {"preset": "ours"}}
    return cfg, load_t2i(cfg, device).with_prompt("a photo of a doctor")


def seconds(pipe, seeds, guide) -> float:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe.draw(seeds, guide.start(seeds) if guide is not None else None)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(seeds)


def measure(family: str, args, device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, pipe = load(family, Path(tmp) / family, args.steps, device)
        adp = random_adp(pipe)
        plan = build_plan(cfg, "distribution", {"gender": "0.5"}, adp.attributes, {"check": False}, None,
                          adp.class_prior)
        guide = build_guide(cfg, plan, adp, pipe.betas.to(device))
        times = {"vanilla": [], "guided": []}
        for k in range(args.batches + 1):                    # alternate, so load drift hits both alike
            seeds = list(range(k * args.bs, (k + 1) * args.bs))
            for name, g in (("vanilla", None), ("guided", guide)):
                s = seconds(pipe, seeds, g)
                if k:                                        # k = 0: the warm-up pair
                    times[name].append(s)
        best = {name: min(v) for name, v in times.items()}
        med = {f"{name}_median": sorted(v)[len(v) // 2] for name, v in times.items()}
        return {"family": family, "module": pipe.hspec.module, "h": "x".join(map(str, pipe.h_shape)),
                "params": sum(p.numel() for p in pipe.denoiser.parameters()), **best, **med}


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--bs", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batches", type=int, default=9, help="timed batches per run kind (after a warm-up pair)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    rows = [measure(f, args, device) for f in args.families]
    print(f"\ntiny random components, {args.steps} steps, batch {args.bs}, device {device}, torch threads "
          f"{torch.get_num_threads()}; distribution guidance (ours) every step; fastest (median) of "
          f"{args.batches} batches\n")
    print("| family | h module | h | denoiser params | vanilla s/img | guided s/img | guided / vanilla |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['module']} | {r['h']} | {r['params']:,} | {r['vanilla']:.4f} "
              f"({r['vanilla_median']:.4f}) | {r['guided']:.4f} ({r['guided_median']:.4f}) | "
              f"{r['guided'] / r['vanilla']:.3f} ({r['guided_median'] / r['vanilla_median']:.3f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
