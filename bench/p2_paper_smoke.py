"""The paper preset with an imported original classifier on the CelebA-HQ P2 U-Net (random
weights): the face path end to end where the real weights cannot be downloaded.

    python bench/p2_paper_smoke.py --size 256 --n 2       # the paper's model size, one batch on CPU

Builds configs/celeba_hq_p2.yml's U-Net (93.6 M parameters at 256 px) with random weights,
writes it and a random classifier in the original code's format (linears.{0..48}, h 512x8x8),
imports the classifier (multi_classifier.py --import_original), runs main.py with --preset paper
for one batch on the original grid, and prints the time and what the guide saw. Work files go to
a temporary folder (--keep DIR to keep them).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

import multi_classifier
from main import main as run_main
from models.files import resolve_path
from models.loader import build_model


def smoke(work: Path, size: int, n: int, steps: int, device: str) -> dict:
    cfg = yaml.safe_load(resolve_path("configs/celeba_hq_p2.yml").read_text())
    cfg["model"].update(image_size=size, checkpoint=str(work / "celebahq_p2_random.pt"))
    cfg["sampling"]["steps"] = steps
    torch.manual_seed(0)
    net = build_model(cfg["model"], "celeba_hq_p2")
    torch.save(net.state_dict(), work / "celebahq_p2_random.pt")
    (work / "p2.yml").write_text(yaml.safe_dump(cfg))
    d = int(torch.tensor(net.h_shape).prod())
    heads = {}
    for i in range(steps - 1):
        heads[f"linears.{i}.weight"], heads[f"linears.{i}.bias"] = torch.randn(2, d) * 0.01, torch.zeros(2)
    torch.save(heads, work / "gender.pt")
    t0 = time.time()
    rc = multi_classifier.main(["--import_original", str(work / "gender.pt"), "--attribute", "gender",
                                "--classes", "female,male", "--config", str(work / "p2.yml"),
                                "--out", str(work / "gender_adp.pt"), "--overwrite"])
    t_import = time.time() - t0
    assert rc == 0
    rc = run_main(["--config", str(work / "p2.yml"), "--adp", str(work / "gender_adp.pt"), "--device", device,
                   "--mode", "distribution", "--target", "gender=0.5", "--preset", "paper",
                   "--n_test_img", str(n), "--bs_test", str(n), "--exp", str(work / "run"), "--overwrite"])
    assert rc == 0
    run = json.loads((work / "run" / "run.json").read_text())
    return {"image_size": size, "parameters": sum(p.numel() for p in net.parameters()), "h_shape": list(net.h_shape),
            "steps": steps, "images": n, "import_s": round(t_import, 1), "sampling_s": run["wall_time_s"],
            "preset": run["resolved"]["guidance"]["settings"]["preset"],
            "guide_estimate_last_step": run["adp_distribution_last_step"][-1]["adp_distribution"],
            "first_timesteps": run["timesteps"][:4]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--n", type=int, default=2, help="images (one batch)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--keep", help="keep the work files in this folder")
    args = p.parse_args(argv)
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(smoke(work, args.size, args.n, args.steps, args.device), indent=1))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(smoke(Path(tmp), args.size, args.n, args.steps, args.device), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
