"""Cost of h-space guidance on text-to-image sampling: guided / vanilla wall time and peak memory.

    python bench/t2i_overhead.py                  # tiny random SD components, CPU
    python bench/t2i_overhead.py --sd15 --device cuda --bs 4 8   # an SD-1.5-sized U-Net, random weights, 512 px

The tiny pipeline is built by ``models.sd_tiny`` (random weights, saved to a temporary folder);
``--sd15`` builds the published SD 1.5 U-Net configuration with random weights (and the tiny VAE
and text encoder scaled to it), so the U-Net's cost is that of the real model. The ADP has random
heads with directions; guidance runs every step (ours: quota estimate, covariance step, cap;
the check is off, its labeller's cost is not guidance). Vanilla and guided batches alternate
(the same seeds) after one warm-up pair; the median seconds per image of each are compared:
``guided / vanilla``.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from bench.common import random_adp
from utils.app.cli import guarded
from utils.app.runtime import pick_device
from utils.guidance import build_plan
from utils.guidance.guide import Guide


def build(args, folder: Path):
    from models.sd_tiny import SD15_UNET, save_tiny_sd
    from utils.sampling.text2image import load_t2i
    unet = dict(SD15_UNET, sample_size=64, cross_attention_dim=32) if args.sd15 else None
    save_tiny_sd(folder, unet=unet)
    cfg = {"name": "bench_sd", "model": {"family": "sd", "checkpoint": str(folder),
                                          "resolution": 512 if args.sd15 else 16},
           "sampling": {"steps": args.steps, "eta": 0.0, "cfg": 7.5}}
    return load_t2i(cfg, pick_device(args.device)).with_prompt("a photo of a doctor")


def timed(pipe, seeds, guide, device) -> tuple[float, float]:
    """(seconds per image, peak GPU MB or 0)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe.draw(seeds, guide.start(seeds) if guide is not None else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else 0.0
    return (time.perf_counter() - t0) / len(seeds), peak


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bs", type=int, nargs="+", default=[4])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batches", type=int, default=3, help="timed batches per configuration (after a warm-up)")
    p.add_argument("--sd15", action="store_true", help="the SD 1.5 U-Net configuration at 512 px")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build(args, Path(tmp) / "sd")
        adp = random_adp(pipe)
        rows = []
        for bs in args.bs:
            for preset in ("ours", "paper"):
                plan = build_plan({"model": {"family": "sd"}, "guidance": {"preset": preset}}, "distribution",
                                  {"gender": "0.5"}, adp.attributes, {"check": False}, None, adp.class_prior)
                guide = Guide(plan, adp, pipe.betas.to(pipe.device))
                runs = {"vanilla": [], "guided": []}
                for k in range(args.batches + 1):          # alternate, so load drift hits both alike
                    seeds = list(range(k * bs, (k + 1) * bs))
                    for name, g in (("vanilla", None), ("guided", guide)):
                        r = timed(pipe, seeds, g, pipe.device)
                        if k:                                                   # k = 0: warm-up
                            runs[name].append(r)
                res = {name: (sorted(r[0] for r in rs)[len(rs) // 2], max(r[1] for r in rs))
                       for name, rs in runs.items()}
                rows.append((bs, preset, res))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kind = "SD 1.5 U-Net, random weights, 512 px" if args.sd15 else "tiny random SD components, 16 px"
    print(f"\n{kind}, {args.steps} steps, CFG 7.5, device {pipe.device}, torch threads {torch.get_num_threads()}; "
          f"median of {args.batches} batches; process peak RSS {rss:.0f} MB\n")
    print("| batch | preset | vanilla s/img | guided s/img | guided / vanilla | peak GPU MB (vanilla / guided) |")
    print("|---|---|---|---|---|---|")
    for bs, preset, r in rows:
        print(f"| {bs} | {preset} | {r['vanilla'][0]:.4f} | {r['guided'][0]:.4f} | "
              f"{r['guided'][0] / r['vanilla'][0]:.3f} | {r['vanilla'][1]:.0f} / {r['guided'][1]:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
